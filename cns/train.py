"""Masked finetuning: only the concept's K/V rows and its token embedding train.

The trainable values are applied by forward hooks (no ``forward`` is replaced, no weight is
copied): a K/V layer's output gets ``x @ (rows - W[index])^T`` added to the selected channels,
and the embedding's output takes the trainable row where the input is the concept's token.
Gradients, and so the optimizer's state, exist only for those rows (k x in_features per layer)
and the one embedding row: a step costs the frozen model's forward and backward plus a few small
matmuls (bench/train_bench.py measured the earlier parametrization, which copied every K/V
weight and the whole embedding table per step, at 1.35x an all-K/V step on the tiny model).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cns.config import TrainConfig
from cns.device import autocast, peak_memory_bytes, reset_peak_memory
from cns.diffusion import ConceptBatchSource, diffusion_loss, encode_prompts
from cns.models import DiffusionModel
from cns.neurons import KVLayer, Mask

log = logging.getLogger(__name__)


class TrainableRows(nn.Module):
    """New values for some output rows of a frozen ``nn.Linear``, applied by a forward hook."""

    def __init__(self, linear: nn.Linear, index: torch.Tensor) -> None:
        super().__init__()
        index = index.to(linear.weight.device)
        self.register_buffer("index", index)
        self.register_buffer("frozen_weight", linear.weight.detach()[index].clone())
        self.weight = nn.Parameter(self.frozen_weight.float().clone())
        self.bias = None
        if linear.bias is not None:
            self.register_buffer("frozen_bias", linear.bias.detach()[index].clone())
            self.bias = nn.Parameter(self.frozen_bias.float().clone())
        self.projector: torch.Tensor | None = None  # (in, in): row changes keep only these input directions
        self.handle = linear.register_forward_hook(self.hook)

    def moved(self) -> torch.Tensor:
        """The change of the rows' weights that applies: confined to the projector's directions."""
        moved = self.weight - self.frozen_weight.float()
        return moved if self.projector is None else moved @ self.projector

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        delta_w = self.moved().to(x.dtype)
        delta_b = None if self.bias is None else (self.bias - self.frozen_bias).to(x.dtype)
        return output.index_add(output.dim() - 1, self.index, F.linear(x, delta_w, delta_b).to(output.dtype))

    @torch.no_grad()
    def release(self, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Remove the hook and write the trained rows into the layer (exact copies)."""
        self.handle.remove()
        new = (self.weight if self.projector is None else self.frozen_weight.float() + self.moved()).to(linear.weight.dtype)
        linear.weight.index_copy_(0, self.index, new)
        if self.bias is not None:
            linear.bias.index_copy_(0, self.index, self.bias.to(linear.bias.dtype))
        weight = new.detach().cpu()
        bias = None if self.bias is None else self.bias.detach().to(linear.bias.dtype).cpu()
        return weight, bias


class TrainableToken(nn.Module):
    """A trainable embedding for one token id, applied by a forward hook on the embedding."""

    def __init__(self, embedding: nn.Embedding, token_id: int) -> None:
        super().__init__()
        self.token_id = token_id
        self.row = nn.Parameter(embedding.weight.detach()[token_id].float().clone())
        self.handle = embedding.register_forward_hook(self.hook)

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        mask = (args[0] == self.token_id).unsqueeze(-1)
        return torch.where(mask, self.row.to(output.dtype), output)

    @torch.no_grad()
    def release(self, embedding: nn.Embedding) -> torch.Tensor:
        self.handle.remove()
        embedding.weight[self.token_id] = self.row.to(embedding.weight.dtype)
        return embedding.weight[self.token_id].detach().cpu().clone()


@dataclass
class RowDelta:
    """New values of some rows of one K/V layer (bias entries too, when the layer has a bias)."""

    index: torch.Tensor  # int64 row indices, sorted
    weight: torch.Tensor  # (k, in_features)
    bias: torch.Tensor | None = None  # (k,)


@dataclass
class TrainResult:
    rows: dict[str, RowDelta]
    token_embedding: torch.Tensor  # (d,)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_bytes: int | None = None
    trainable_parameters: int = 0
    optimizer_state_bytes: int = 0
    # Null-space rows: text-state directions closed to the rows' changes, of ``text_dim``
    # (0 of d when nothing is protected). Each protected concept closes more; when few stay open,
    # a new concept can barely use its rows.
    protected_directions: int = 0
    text_dim: int = 0


def finetune(model: DiffusionModel, layers: list[KVLayer], concept: Mask, token_id: int,
             source: ConceptBatchSource, config: TrainConfig, *, pretrained: dict[str, torch.Tensor],
             earlier_prompt_states: torch.Tensor | None = None, generic_prompt_states: torch.Tensor | None = None,
             protected: list[tuple[torch.Tensor | None, float]] | None = None,
             mixed_precision: str = "no", progress: bool = True) -> TrainResult:
    """Train the masked rows and the token embedding; writes the result into ``model`` in place.

    Loss = diffusion loss on the concept's images + L_reg (see :func:`regularization`).
    ``protected``: (text states, energy) groups whose K/V outputs the rows' changes must leave
    alone (:func:`protected_projector`).
    """
    device = model.device
    active = [layer for layer in layers if bool(concept[layer.name].any())]
    trained: dict[str, TrainableRows] = {}
    pretrained_rows: dict[str, torch.Tensor] = {}
    for layer in active:
        index = concept[layer.name].nonzero().flatten()
        trained[layer.name] = TrainableRows(layer.linear, index)
        pretrained_rows[layer.name] = pretrained[layer.name][index.cpu()].to(device).float()
    projector, closed = protected_projector(protected or [], device)
    for rows in trained.values():
        rows.projector = projector
    text_dim = layers[0].linear.in_features if layers else 0  # K/V rows read text states of this width
    if projector is not None:
        log.info("row changes confined to %d of %d text-state directions (%d protected)",
                 text_dim - closed, text_dim, closed)
        if text_dim - closed < text_dim // 4:
            log.warning("only %d of %d text-state directions are left to this concept's rows: the protected "
                        "prompts (train.protect_earlier, protect_generic) have closed the rest, so it will "
                        "learn mostly through its token", text_dim - closed, text_dim)
    embedding = model.token_embedding
    token = TrainableToken(embedding, token_id)

    row_params = [p for t in trained.values() for p in t.parameters()]
    optimizer = torch.optim.AdamW([
        {"params": row_params, "lr": config.learning_rate},
        {"params": [token.row], "lr": config.token_learning_rate},
    ], weight_decay=0.0)
    trainable = sum(p.numel() for p in row_params) + token.row.numel()

    losses: list[float] = []
    seconds, state_bytes = 0.0, 0
    reset_peak_memory(device)
    start = time.perf_counter()
    bar = tqdm(range(config.max_train_steps), desc="finetuning", disable=not progress, leave=False)
    try:
        for step in bar:
            latents, input_ids = source.sample(config.train_batch_size)
            with autocast(device, mixed_precision):
                states = encode_prompts(model, input_ids)
                loss = diffusion_loss(model, latents, states, source.generator)
            reg = regularization(trained, pretrained_rows, earlier_prompt_states, generic_prompt_states, config)
            total = loss.float() + reg
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if config.log_every and (step + 1) % config.log_every == 0:
                log.debug("step %d loss %.5f reg %.3g", step + 1, losses[-1], float(reg.detach()))
        seconds = time.perf_counter() - start
        state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                          for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    finally:
        # Always leave plain modules behind, also when training is interrupted.
        rows = {}
        for layer in active:
            weight, bias = trained[layer.name].release(layer.linear)
            rows[layer.name] = RowDelta(index=concept[layer.name].nonzero().flatten(), weight=weight, bias=bias)
        token_embedding = token.release(embedding)
    return TrainResult(rows=rows, token_embedding=token_embedding, losses=losses, seconds=seconds,
                       peak_memory_bytes=peak_memory_bytes(device), trainable_parameters=trainable,
                       optimizer_state_bytes=state_bytes, protected_directions=closed, text_dim=text_dim)


def protected_projector(groups: list[tuple[torch.Tensor | None, float]],
                        device: torch.device | str = "cpu") -> tuple[torch.Tensor | None, int]:
    """``(P, k)``: ``P = I - U U^T`` projects a K/V row's weight change off ``k`` protected
    text-state directions ``U`` (None when no group is protected). For each ``(states, energy)``
    in turn (generic captions, then earlier concepts' prompts; energy 0 = that group is not
    protected), ``U`` gains the fewest directions that hold ``energy`` of the group's state
    energy outside ``U`` so far. A row change ``dW P`` leaves the row's
    output on a protected state unchanged up to the energy left out, so other prompts and earlier
    concepts keep their K/V outputs *exactly*, not by a penalty that fights the concept's loss, and
    rows may be shared; the new token (in no protected prompt) reads the free directions. This is
    null-space training as in continual learning (Wang et al., CVPR 2021, arXiv 2103.07113) and
    model editing (AlphaEdit, ICLR 2025, arXiv 2410.02355)."""
    found = [(states, energy) for states, energy in groups if energy and states is not None and len(states)]
    if not found:
        return None, 0
    dim = found[0][0].shape[-1]
    basis = torch.zeros(dim, 0, dtype=torch.float64)
    for states, energy in found:
        states = states.detach().to("cpu", torch.float64)
        rest = states - (states @ basis) @ basis.T
        values, vectors = torch.linalg.eigh(rest.T @ rest)
        values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
        # The fewest directions that hold ``energy`` of what the group has outside ``U``: of its
        # residual, not of its whole energy, since an earlier concept's token is a small share of
        # its prompts' energy (the template words, which the generic captions hold, are most of it)
        # and must still be protected (measured: with a whole-energy rule the first concept's
        # bitmap fell 0.75 -> 0.56 when the second retrained its rows).
        total = float(values.sum())
        if total <= 1e-12 * float(states.pow(2).sum()):
            continue
        keep = int((values.cumsum(0) / total < energy).sum()) + 1
        basis = torch.cat([basis, vectors[:, :min(keep, dim - basis.shape[1])]], dim=1)
    projector = torch.eye(dim, dtype=torch.float64) - basis @ basis.T
    return projector.float().to(device), basis.shape[1]


def regularization(trained: dict[str, TrainableRows], pretrained_rows: dict[str, torch.Tensor],
                   earlier_prompt_states: torch.Tensor | None, generic_prompt_states: torch.Tensor | None,
                   config: TrainConfig) -> torch.Tensor:
    """L_reg over the trained rows, every term a *mean*:

    - ``reg_previous_weight`` x mean squared change of each trained weight since before this
      concept (exactly the frozen weight the hook starts from);
    - ``reg_pretrained_weight`` x mean squared distance to the pretrained weights;
    - ``reg_output_weight`` x mean squared change of the rows' outputs on earlier concepts'
      prompt states (protects what earlier concepts' tokens read from these rows);
    - ``reg_generic_weight`` x the same on generic captions' states (protects every other prompt,
      while the concept's own token, absent from those captions, stays free).

    Means, not sums: a sum over thousands of weights under Adam settles each weight at a change
    of about g / (2 lambda) whatever the learning rate, which pinned the rows at 9-12% of their
    norm and reduced CNS to textual inversion (docs/world.md). A mean keeps the balance between
    the terms independent of how many rows a concept trains.
    """
    device = next(iter(trained.values())).weight.device if trained else torch.device("cpu")
    weights = sum(rows.weight.numel() for rows in trained.values()) or 1
    previous = pretrained = torch.zeros((), device=device)
    outputs = {"earlier": (earlier_prompt_states, config.reg_output_weight, []),
               "generic": (generic_prompt_states, config.reg_generic_weight, [])}
    for name, rows in trained.items():
        moved = rows.moved()
        if config.reg_previous_weight:
            previous = previous + moved.pow(2).sum()
        if config.reg_pretrained_weight:
            pretrained = pretrained + (rows.frozen_weight.float() + moved - pretrained_rows[name]).pow(2).sum()
        for states, weight, terms in outputs.values():
            if weight and states is not None and len(states):
                terms.append((states.to(device).float() @ moved.T).pow(2))
    reg = config.reg_previous_weight * previous / weights + config.reg_pretrained_weight * pretrained / weights
    for states, weight, terms in outputs.values():
        if terms:
            reg = reg + weight * torch.cat(terms, dim=1).mean()
    return reg
