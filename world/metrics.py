"""World metrics from the generator's truth, read back by world.judge.

- attribute accuracy: for base captions "a {colour} {shape} on a {bg} background", the share of
  samples whose shape, colour and background read back as asked (and all three at once);
- concept fidelity, concept similarity and prompt fidelity: see world.bench.evaluate_concepts;
- two concepts in one prompt: the share where the left and right objects are both right.
"""

from __future__ import annotations

import itertools

import numpy as np

from cns.generate import sample_pixels
from cns.models import DiffusionModel
from world.judge import Judge
from world.scene import BACKGROUNDS, HELDOUT_PAIRS, Obj, WorldConcept, caption, seen_pairs

SAMPLING = {"num_inference_steps": 20, "guidance_scale": 3.0}


def sample(model: DiffusionModel, prompts: list[str], seeds: list[int]) -> np.ndarray:
    return sample_pixels(model, prompts, seeds, **SAMPLING).numpy()


def base_prompts(which: str, per_pair: int = 1, seed: int = 0) -> list[tuple[str, str, str]]:
    """(shape, colour, background) triples: every held-out pair, or a fixed sample of seen pairs,
    on every background ``per_pair`` times."""
    pairs = list(HELDOUT_PAIRS) if which == "heldout" else seen_pairs()
    if which == "seen":
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), size=len(HELDOUT_PAIRS), replace=False))]
    return [(s, c, bg) for (s, c), bg, _ in itertools.product(pairs, BACKGROUNDS, range(per_pair))]


def attribute_accuracy(model: DiffusionModel, judge: Judge, triples: list[tuple[str, str, str]],
                       seed: int = 0, images: np.ndarray | None = None) -> dict:
    prompts = [caption([Obj(s, c)], bg) for s, c, bg in triples]
    if images is None:
        images = sample(model, prompts, [seed + i for i in range(len(prompts))])
    reads = judge.read(images)
    ok = {k: [] for k in ("shape", "color", "background", "all")}
    for (s, c, bg), r in zip(triples, reads):
        hits = (r["identity"] == s, r["color"] == c, r["background"] == bg)
        for key, hit in zip(ok, (*hits, all(hits))):
            ok[key].append(hit)
    return {k: float(np.mean(v)) for k, v in ok.items()} | {"samples": len(prompts)}


def concept_prompts(concept: WorldConcept, backgrounds: list[str] | None = None) -> list[tuple[str, str]]:
    return [(caption([Obj(concept=concept)], bg), bg) for bg in (backgrounds or list(BACKGROUNDS))]


def pair_accuracy(pair_reads: list[tuple[dict, dict]], pairs: list[tuple[WorldConcept, WorldConcept]],
                  backgrounds: list[str]) -> dict:
    both = [left["identity"] == a.name and right["identity"] == b.name
            for (left, right), (a, b) in zip(pair_reads, pairs)]
    either = [(left["identity"] == a.name) + (right["identity"] == b.name)
              for (left, right), (a, b) in zip(pair_reads, pairs)]
    bg = [left["background"] == g for (left, _), g in zip(pair_reads, backgrounds)]
    return {"pair_both": float(np.mean(both)), "pair_objects": float(np.mean(either)) / 2,
            "pair_background": float(np.mean(bg))}
