"""Region control: where each learned concept goes in the image, at sampling time, no retraining.

Regional prompts composed per step, in cross-attention (the regionally controllable sampling of
Mix-of-Show, Gu et al. 2023, arXiv 2305.18292, without its ED-LoRA): besides the global prompt
("a <dog1> dog and a <cat2> cat on a sofa"), each region has its own prompt ("a <dog1> dog on a
sofa" on the left half). In every cross-attention layer, a query (an image position) inside a
region reads that region's prompt; a query outside every region reads the global prompt.
Masking only the concept's own token outside its region would not be enough: CLIP's text
encoder is causal, so every word after the token, the end token included, carries it too.

``base`` (``generate.region_base``, ``--region-base``): the global prompt's share inside the regions
as well (Regional Prompter's "base ratio"). At 0 a region reads its own prompt alone, and a
single-object prompt there is drawn as one object filling the region. In the benchmark world,
two base shapes in the left and right halves: both read back right 0% of the time at 0, 6% with
no regions at all, 50% at 0.6, where the global prompt lays out two objects and each region says
which (docs/world/regions-base-2026-11-28).

Installed as a diffusers attention processor on every cross-attention module (``attn2``), then
the original processors are put back; it works for any UNet2DConditionModel that ``cns`` loads
(SD 1.x/2.x, the tiny model, the world's pixel-space model). The unconditional half of a
classifier-free-guidance batch is left alone. Regions may overlap: weights are shared out so
they sum to one at every position.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cns.errors import CNSError

Box = tuple[float, float, float, float]  # x0, y0, x1, y1, relative (0..1), x to the right, y down
NAMED: dict[str, Box] = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0),
                         "top": (0.0, 0.0, 1.0, 0.5), "bottom": (0.0, 0.5, 1.0, 1.0), "full": (0.0, 0.0, 1.0, 1.0)}


def parse_region(text: str, source: str = "--region") -> tuple[Box, str]:
    """``BOX=PROMPT``, BOX one of left/right/top/bottom/full or ``x0,y0,x1,y1`` in 0..1."""
    box_text, sep, prompt = text.partition("=")
    if not sep or not prompt.strip():
        raise CNSError(source, f"'{text}' is not BOX=PROMPT (e.g. left=a <dog1> dog on a sofa)", "region_invalid")
    box_text = box_text.strip().lower()
    if box_text in NAMED:
        return NAMED[box_text], prompt.strip()
    try:
        box = tuple(float(v) for v in box_text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
        raise CNSError(source, f"region '{box_text}' must be left, right, top, bottom, full or x0,y0,x1,y1 with "
                               "0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1", "region_invalid")
    return box, prompt.strip()


def check_base(base: float, source: str) -> float:
    """``base`` (the global prompt's share inside the regions) if it is in [0, 1], else a one-line error naming ``source``."""
    if not 0 <= base <= 1:
        raise CNSError(source, f"region base {base:g} must be in [0, 1]", "region_invalid")
    return base


def region_weights(boxes: list[Box], tokens: int, base: float = 0.0) -> torch.Tensor:
    """(regions + 1, tokens) weights of each region's prompt, and last of the global prompt, at
    each position of a square feature map of ``tokens`` positions (row-major); inside the
    regions the global prompt keeps ``base`` of the weight."""
    side = round(tokens ** 0.5)
    if side * side != tokens:
        raise ValueError(f"region control needs square feature maps, got {tokens} positions")
    centre = (torch.arange(side) + 0.5) / side
    y, x = torch.meshgrid(centre, centre, indexing="ij")
    inside = torch.stack([((x >= x0) & (x < x1) & (y >= y0) & (y < y1)).flatten().float()
                          for x0, y0, x1, y1 in boxes])
    covered = inside.sum(0)
    regional = inside / covered.clamp(min=1) * (1 - base)
    return torch.cat([regional, torch.where(covered == 0, 1.0, base)[None]])


@dataclass
class RegionalStates:
    boxes: list[Box]
    states: torch.Tensor  # (regions, conditional batch, sequence, width): each region's prompt
    base: float = 0.0  # the global prompt's share inside the regions (region_weights)


class RegionalAttnProcessor:
    """Cross-attention that composes the regional prompts' readings with the global one."""

    def __init__(self, regional: RegionalStates) -> None:
        self.regional = regional
        self._weights: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def attend(self, attn, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of ``x`` over ``context``, before the output projection."""
        batch = x.shape[0]
        query, key, value = attn.to_q(x), attn.to_k(context), attn.to_v(context)
        heads, width = attn.heads, key.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, heads, width).transpose(1, 2) for t in (query, key, value))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, heads * width)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if hidden_states.ndim != 3 or attn.norm_cross or attn.residual_connection or attn.group_norm is not None \
                or attention_mask is not None or encoder_hidden_states is None:
            raise NotImplementedError("region control supports the cross-attention of SD-style UNets only")
        states = self.regional.states.to(hidden_states.device, hidden_states.dtype)
        n = states.shape[1]
        tokens = hidden_states.shape[1]
        if tokens not in self._weights:
            weights = region_weights(self.regional.boxes, tokens, self.regional.base)
            # Per prompt (each region's, then the global one): the positions that read it. Each
            # query's attention is independent of the others, so reading a prompt only where it
            # is used is exact and costs about one attention over the image in all (two where
            # the global prompt keeps a base share inside the regions).
            self._weights[tokens] = [(w.nonzero().flatten(), w[w > 0]) for w in weights]
        cond = hidden_states[-n:]
        contexts = [*states, encoder_hidden_states[-n:]]
        mixed = torch.zeros(n, tokens, attn.to_q.out_features, device=cond.device, dtype=cond.dtype)
        for (where, weight), context in zip(self._weights[tokens], contexts):
            if len(where):
                where = where.to(cond.device)
                part = self.attend(attn, cond[:, where], context) * weight.to(cond.device, cond.dtype)[None, :, None]
                mixed[:, where] += part
        if len(hidden_states) > n:  # the unconditional half reads its own (empty) prompt everywhere
            out = torch.cat([self.attend(attn, hidden_states[:-n], encoder_hidden_states[:-n]), mixed])
        else:
            out = mixed
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


@contextmanager
def region_control(unet, regional: RegionalStates | None):
    """Install regional cross-attention on ``unet`` for the duration of the block (nothing when
    ``regional`` is None)."""
    if regional is None:
        yield
        return
    original = unet.attn_processors
    processor = RegionalAttnProcessor(regional)
    unet.set_attn_processor({name: processor if ".attn2." in name else p for name, p in original.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(original)
