"""World metrics from the generator's truth, read back by world.judge.

- attribute accuracy: for base captions "a {colour} {shape} on a {bg} background", the share of
  samples whose shape, colour and background read back as asked (and all three at once);
- concept fidelity, concept similarity and prompt fidelity: see world.bench.evaluate_concepts;
- two concepts in one prompt: the share where the left and right objects are both right;
- bitmap agreement (``concept_agreement``): the truth-based reading of a concept's samples, each
  object cropped and read back to its 8x8 bitmap (world.readback), compared with the concept's;
- the judge on a model's own samples (``validate_on_samples``): how often a concept is read where
  the model cannot have drawn it, and the bitmap agreement there (the metric's floor).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from cns.generate import sample_pixels
from cns.models import DiffusionModel
from world.judge import OTHER, Judge
from world.readback import bitmap_agreement, read_bitmap
from world.scene import BACKGROUNDS, GLYPH, HELDOUT_PAIRS, Obj, WorldConcept, caption, seen_pairs

SAMPLING = {"num_inference_steps": 20, "guidance_scale": 3.0}


def sample(model: DiffusionModel, prompts: list[str], seeds: list[int], regions=None,
           region_base: float = 0.0) -> np.ndarray:
    """uint8 samples; ``regions`` (cns.regions) apply to every prompt of the call."""
    return sample_pixels(model, prompts, seeds, regions=regions, region_base=region_base, **SAMPLING).numpy()


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


def concept_captions(concept: WorldConcept, backgrounds: list[str] | None = None) -> list[tuple[str, str]]:
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


def concept_agreement(images: np.ndarray | torch.Tensor, concept: WorldConcept) -> list[float]:
    """Per image, the share of the concept's 64 bitmap cells its object reads back to."""
    images = images.numpy() if torch.is_tensor(images) else images
    return [bitmap_agreement(read_bitmap(image), concept.bitmap) for image in images]


def _identity_shares(reads: list[dict], concept_names: set[str]) -> dict:
    ids = [r["identity"] for r in reads]
    return {"read_as_a_concept": float(np.mean([i in concept_names for i in ids])),
            "read_as_other": float(np.mean([i == OTHER for i in ids])),
            "read_as_glyph": float(np.mean([i == GLYPH for i in ids]))}


@torch.no_grad()
def validate_on_samples(judge: Judge, model: DiffusionModel | str | Path, concepts: list[WorldConcept], *,
                        seeds_per_prompt: int = 2, base_triples: list[tuple[str, str, str]] | None = None,
                        seed: int = 90_000) -> dict:
    """The judge on a model's samples, where the truth is known without looking.

    Base captions (every held-out pair and as many seen pairs, each on every background): the
    shape read back, and how often a concept is read although none was asked for. Concept prompts
    ``a <token> glyph on a <bg> background`` on a model that never learned the token (the
    pretrained model: its tokenizer splits the token into pieces): every read of the concept is
    wrong, and the bitmap agreement there is the floor a learned concept must rise above.
    ``model`` is a loaded model or a model folder (diffusers layout, e.g. data/world/model)."""
    if not isinstance(model, DiffusionModel):
        from cns.models import load_pretrained

        model = load_pretrained(str(model))
    names = {c.name for c in concepts}
    triples = base_triples if base_triples is not None else base_prompts("heldout") + base_prompts("seen")
    images = sample(model, [caption([Obj(s, c)], bg) for s, c, bg in triples],
                    [seed + i for i in range(len(triples))])
    reads = judge.read(images)
    out = {"base": {"samples": len(triples),
                    "shape": float(np.mean([r["identity"] == s for r, (s, _, _) in zip(reads, triples)])),
                    **_identity_shares(reads, names)}}
    vocab = model.tokenizer.get_vocab()
    prompts, owners, seeds = [], [], []
    for k, concept in enumerate(concepts):
        for j, (text, _) in enumerate(concept_captions(concept)):
            for s in range(seeds_per_prompt):
                prompts.append(text)
                owners.append(k)
                seeds.append(seed + 10_000 + 1000 * k + 10 * j + s)
    images = sample(model, prompts, seeds)
    reads = judge.read(images)
    per_concept = {}
    for k, concept in enumerate(concepts):
        mine = [i for i, o in enumerate(owners) if o == k]
        per_concept[concept.name] = {
            "token_known": concept.token in vocab,  # True: the model learned it, and the truth is unknown here
            "read_as_this_concept": float(np.mean([reads[i]["identity"] == concept.name for i in mine])),
            **_identity_shares([reads[i] for i in mine], names),
            "bitmap_agreement": float(np.mean([bitmap_agreement(reads[i]["bitmap"], concept.bitmap) for i in mine])),
        }
    out["concepts"] = per_concept
    out["concept_prompts"] = {"samples": len(prompts)} | {
        key: float(np.mean([v[key] for v in per_concept.values()]))
        for key in ("read_as_this_concept", "read_as_a_concept", "read_as_other", "read_as_glyph", "bitmap_agreement")}
    return out
