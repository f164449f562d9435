"""Selection: concept neurons = base neurons - general neurons - rows owned by earlier concepts."""

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


def select_concept_neurons(scores: dict[str, torch.Tensor], base_ratio: float, general: Mask, owned: Mask,
                           exclude_owned: bool = True) -> Selection:
    base = top_rows(scores, base_ratio)
    concept = difference(base, general)
    if exclude_owned:
        concept = difference(concept, owned)
    return Selection(base=base, general=general, owned=owned, concept=concept)
