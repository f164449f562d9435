"""Masked finetuning: only the concept's K/V rows and its token embedding train.

The rows are swapped into the frozen weights with a ``torch.nn.utils.parametrize``
parametrization (no ``forward`` is replaced): the weight a layer sees is its frozen weight with
the selected rows taken from a small trainable tensor. Gradients, and so the optimizer's state,
exist only for those rows (k x in_features per layer) and the one embedding row.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from cns.config import TrainConfig
from cns.device import autocast, peak_memory_bytes, reset_peak_memory
from cns.diffusion import ConceptBatchSource, diffusion_loss, encode_prompts
from cns.models import DiffusionModel
from cns.neurons import KVLayer, Mask

log = logging.getLogger(__name__)


class RowOverride(nn.Module):
    """Parametrization: the frozen tensor with the rows at ``index`` replaced by ``rows``."""

    def __init__(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index)
        self.rows = nn.Parameter(rows.detach().clone().float())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_copy(0, self.index, self.rows.to(weight.dtype))


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


def _override(module: nn.Module, name: str, index: torch.Tensor) -> RowOverride:
    tensor = getattr(module, name)
    override = RowOverride(index.to(tensor.device), tensor.detach()[index.to(tensor.device)])
    parametrize.register_parametrization(module, name, override)
    return override


def _release(module: nn.Module, name: str) -> torch.Tensor:
    """Drop the parametrization, write the trained rows into the frozen tensor, return them."""
    override = getattr(module.parametrizations, name)[0]
    rows = override.rows.detach().clone()
    index = override.index
    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    with torch.no_grad():
        tensor = getattr(module, name)
        tensor.index_copy_(0, index, rows.to(tensor.dtype))
    return rows.to(tensor.dtype).cpu()


def finetune(model: DiffusionModel, layers: list[KVLayer], concept: Mask, token_id: int,
             source: ConceptBatchSource, config: TrainConfig, *, pretrained: dict[str, torch.Tensor],
             earlier_prompt_states: torch.Tensor | None = None, mixed_precision: str = "no",
             progress: bool = True) -> TrainResult:
    """Train the masked rows and the token embedding; writes the result into ``model`` in place.

    Loss = diffusion loss on the concept's images + L_reg, where L_reg ties each trained row to
    its value before this concept (``reg_previous_weight``) and to the pretrained value
    (``reg_pretrained_weight``), plus optionally the rows' outputs on earlier concepts' prompt
    states (``reg_output_weight``).
    """
    device = model.device
    active = [layer for layer in layers if bool(concept[layer.name].any())]
    overrides, anchors = {}, {}
    for layer in active:
        index = concept[layer.name].nonzero().flatten()
        overrides[layer.name] = _override(layer.linear, "weight", index)
        rows = overrides[layer.name].rows.detach()
        anchors[layer.name] = (rows.clone(), pretrained[layer.name][index.cpu()].to(device).float())
        if layer.linear.bias is not None:
            overrides[layer.name + ".bias"] = _override(layer.linear, "bias", index)
    embedding = model.token_embedding
    token_override = _override(embedding, "weight", torch.tensor([token_id]))

    row_params = [o.rows for o in overrides.values()]
    optimizer = torch.optim.AdamW([
        {"params": row_params, "lr": config.learning_rate},
        {"params": [token_override.rows], "lr": config.token_learning_rate},
    ], weight_decay=0.0)
    trainable = sum(p.numel() for p in row_params) + token_override.rows.numel()

    losses: list[float] = []
    reset_peak_memory(device)
    start = time.perf_counter()
    bar = tqdm(range(config.max_train_steps), desc="finetuning", disable=not progress, leave=False)
    try:
        for step in bar:
            latents, input_ids = source.sample(config.train_batch_size)
            with autocast(device, mixed_precision):
                states = encode_prompts(model, input_ids)
                loss = diffusion_loss(model, latents, states, source.generator)
            reg = _regularization(active, overrides, anchors, earlier_prompt_states, config)
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
            weight = _release(layer.linear, "weight")
            bias = _release(layer.linear, "bias") if layer.linear.bias is not None else None
            rows[layer.name] = RowDelta(index=concept[layer.name].nonzero().flatten(), weight=weight, bias=bias)
        token_embedding = _release(embedding, "weight")[0]
    return TrainResult(rows=rows, token_embedding=token_embedding, losses=losses, seconds=seconds,
                       peak_memory_bytes=peak_memory_bytes(device), trainable_parameters=trainable,
                       optimizer_state_bytes=state_bytes)


def _regularization(active: list[KVLayer], overrides: dict[str, RowOverride], anchors: dict,
                    earlier_prompt_states: torch.Tensor | None, config: TrainConfig) -> torch.Tensor:
    reg = torch.zeros((), device=next(iter(overrides.values())).rows.device) if overrides else torch.zeros(())
    for layer in active:
        rows = overrides[layer.name].rows
        previous, pretrained = anchors[layer.name]
        if config.reg_previous_weight:
            reg = reg + config.reg_previous_weight * (rows - previous).pow(2).sum()
        if config.reg_pretrained_weight:
            reg = reg + config.reg_pretrained_weight * (rows - pretrained).pow(2).sum()
        if config.reg_output_weight and earlier_prompt_states is not None and len(earlier_prompt_states):
            x = earlier_prompt_states.to(rows.device).float()
            reg = reg + config.reg_output_weight * (x @ (rows - previous).T).pow(2).mean()
    return reg
