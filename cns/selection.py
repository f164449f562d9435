"""Selection: concept neurons = the top rows of each layer among those neither general nor owned
by an earlier concept.

Ranking among the free rows gives every concept the same row budget. Taking the top rows first
and *then* removing owned ones starves later concepts, because Taylor top rows are largely the
same for every concept: measured on the benchmark world, 54 rows for the first concept of ten
and 5 for the last (docs/world.md). ``rank_among_free=False`` keeps that older rule for ablations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cns.neurons import Mask, count, difference


def rows_for_ratio(rows: int, ratio: float) -> int:
    """How many of a layer's rows a ratio keeps: rounded, and at least one."""
    return max(1, min(rows, round(ratio * rows)))


def top_rows(scores: dict[str, torch.Tensor], ratio: float) -> Mask:
    """Each layer's top ``ratio`` of rows by score.

    Per layer rather than global: Taylor scores are not comparable across layers of different
    width and depth, and a global cut would hand the whole budget to one or two layers.
    """
    mask = {}
    for name, score in scores.items():
        k = rows_for_ratio(score.numel(), ratio)
        rows = torch.zeros(score.numel(), dtype=torch.bool)
        rows[torch.topk(score.float(), k, sorted=False).indices] = True
        mask[name] = rows
    return mask


@dataclass
class Selection:
    base: Mask
    general: Mask
    owned: Mask
    concept: Mask

    def summary(self) -> dict[str, int]:
        return {"base": count(self.base), "general": count(self.general), "owned": count(self.owned),
                "concept": count(self.concept)}


def top_free_rows(scores: dict[str, torch.Tensor], ratio: float, blocked: Mask) -> Mask:
    """Each layer's top ``ratio`` of rows (the same count as :func:`top_rows`) among the rows
    not ``blocked``; all free rows when fewer are free."""
    mask = {}
    for name, score in scores.items():
        free = ~blocked[name]
        k = min(rows_for_ratio(score.numel(), ratio), int(free.sum()))
        rows = torch.zeros(score.numel(), dtype=torch.bool)
        if k:
            ranked = score.float().masked_fill(~free, float("-inf"))
            rows[torch.topk(ranked, k, sorted=False).indices] = True
        mask[name] = rows
    return mask


def select_concept_neurons(scores: dict[str, torch.Tensor], base_ratio: float, general: Mask, owned: Mask,
                           exclude_owned: bool = True, rank_among_free: bool = True) -> Selection:
    """``base`` is each layer's top ``base_ratio`` of all rows (what the concept would pick on a
    fresh model); ``concept`` is what trains."""
    base = top_rows(scores, base_ratio)
    blocked = {name: general[name] | (owned[name] if exclude_owned else torch.zeros_like(general[name]))
               for name in scores}
    if rank_among_free:
        concept = top_free_rows(scores, base_ratio, blocked)
    else:
        concept = difference(base, blocked)
    return Selection(base=base, general=general, owned=owned, concept=concept)
