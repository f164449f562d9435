"""Neuron addressing: a neuron is one output row of a cross-attention key or value projection.

Layers are named by their module path in the UNet (diffusers names), e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``. A *mask* maps each layer name to
a bool tensor over its rows; masks are the currency between scoring, selection, training, deltas
and reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

Mask = dict[str, torch.Tensor]


@dataclass(frozen=True)
class KVLayer:
    name: str
    linear: nn.Linear

    @property
    def rows(self) -> int:
        return self.linear.out_features

    @property
    def weights_per_row(self) -> int:
        """Weights that move with one row: its weight row plus its bias entry, if any."""
        return self.linear.in_features + (1 if self.linear.bias is not None else 0)


def kv_layers(unet: nn.Module) -> list[KVLayer]:
    """Every cross-attention K and V projection of the UNet, in module order."""
    layers = []
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            layers.append(KVLayer(f"{name}.to_k", module.to_k))
            layers.append(KVLayer(f"{name}.to_v", module.to_v))
    if not layers:
        raise ValueError("the UNet has no cross-attention layers: CNS needs a text-conditioned UNet")
    return layers


def row_counts(layers: list[KVLayer]) -> dict[str, int]:
    return {layer.name: layer.rows for layer in layers}


def empty_mask(rows: dict[str, int]) -> Mask:
    return {name: torch.zeros(n, dtype=torch.bool) for name, n in rows.items()}


def union(masks: list[Mask], rows: dict[str, int]) -> Mask:
    out = empty_mask(rows)
    for mask in masks:
        for name, rows in mask.items():
            out[name] |= rows.cpu()
    return out


def difference(a: Mask, b: Mask) -> Mask:
    return {name: rows & ~b[name] for name, rows in a.items()}


def intersection(a: Mask, b: Mask) -> Mask:
    return {name: rows & b[name] for name, rows in a.items()}


def count(mask: Mask) -> int:
    return int(sum(int(rows.sum()) for rows in mask.values()))


def weights_in(mask: Mask, layers: list[KVLayer]) -> int:
    """How many individual weights the masked rows hold."""
    return sum(int(mask[layer.name].sum()) * layer.weights_per_row for layer in layers)
