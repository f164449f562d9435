"""Reading a generated image back into the world's terms: background, colour, bitmap, identity.

Background, colour and the object's bitmap are exact rules on the palette (world.readback).
Identity comes from a small CNN trained on the generator's own renders, with noise and blur so
it also reads imperfect samples. Its classes are the base shapes, every concept, ``glyph`` (any
family glyph that is not a concept) and ``other``: blobs, smears, partial objects, mixtures and
noise (world.reject), what an unlearned concept looks like in a diffusion sample. A forced
choice among known classes reads such a blob as whichever concept shares its colour; with
``other`` and a confidence threshold (an identity below it reads as ``other``) it need not.
Its accuracy on fresh renders and its rejection rates are stored next to its weights
(judge.json) and reported with every benchmark; world.metrics.validate_on_samples measures it
on a model's samples.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from cns.errors import CNSError
from world.readback import FAR_FROM_BACKGROUND, bitmap_agreement, read_background, read_bitmap, read_color
from world.reject import random_reject
from world.scene import (BACKGROUNDS, COLORS, GLYPH, GLYPH_CELLS, SHAPES, Obj, WorldConcept, place, random_glyph,
                         render, shape_mask)

__all__ = ["FAR_FROM_BACKGROUND", "OTHER", "Judge", "cells", "halves", "load_judge", "read_background", "read_bitmap",
           "read_color", "train_judge", "validate"]

JUDGE_DIR = Path(__file__).resolve().parent.parent / "data" / "world" / "judge"
OTHER = "other"
# Label mix for training: the open classes are drawn more often than one concept, because each
# covers many looks (every family glyph; every kind of failure).
GLYPH_RATE, OTHER_RATE = 0.2, 0.25
HALF_RATE = 0.35  # share of examples that are one half of a two-object scene, as read_pair sees it
# The threshold is the largest candidate that rejects at most this share more of degraded renders
# of known classes, on validation data, than the argmax alone rejects: a wrongly rejected concept
# costs fidelity, a wrongly accepted blob inflates it; 1% keeps the first within the 2% target.
MAX_FALSE_REJECT = 0.01
THRESHOLDS = np.round(np.arange(0.30, 0.96, 0.05), 2)


def halves(image: np.ndarray, count: int = 2) -> list[np.ndarray]:
    """Each of ``count`` vertical strips, centred on a full-size canvas of its background colour."""
    width = image.shape[1] // count
    out = []
    for k in range(count):
        strip = image[:, k * width:(k + 1) * width]
        canvas = np.empty_like(image)
        canvas[:] = np.median(np.concatenate([strip[:2].reshape(-1, 3), strip[-2:].reshape(-1, 3)]), axis=0)
        left = (image.shape[1] - width) // 2
        canvas[:, left:left + width] = strip
        out.append(canvas)
    return out


def cells(image: np.ndarray, boxes: list[tuple[float, float, float, float]]) -> list[np.ndarray]:
    """Each box (x0, y0, x1, y1 in 0..1, as cns.regions takes them) cut out and centred on a
    full-size canvas of the image's background, for the judge to read one object at a time:
    the three-object scenes' quarters and bottom centre (world.scene.CORNERS), or any layout."""
    height, width = image.shape[:2]
    background = np.asarray(BACKGROUNDS[read_background(image)], dtype=image.dtype)
    out = []
    for x0, y0, x1, y1 in boxes:
        left, top, right, bottom = round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height)
        canvas = np.empty_like(image)
        canvas[:] = background
        at_top, at_left = (height - (bottom - top)) // 2, (width - (right - left)) // 2
        canvas[at_top:at_top + bottom - top, at_left:at_left + right - left] = image[top:bottom, left:right]
        out.append(canvas)
    return out


class IdentityNet(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(64, 64, 3, padding=1), nn.GELU(),
            nn.Conv2d(64, 96, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(96, 96, 3, padding=1), nn.GELU(),
        )
        self.head = nn.Linear(96 * 2, classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def _to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _degrade(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Noise, blur and slight colour shifts: what an imperfect sample looks like."""
    n = len(x)
    sigma = torch.from_numpy(rng.uniform(0, 0.25, (n, 1, 1, 1))).float()
    x = x + sigma * torch.from_numpy(rng.standard_normal(x.shape)).float()
    blur = rng.random(n) < 0.4
    if blur.any():
        k = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=torch.float32) / 16
        blurred = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
        x[blur] = blurred
    x = x + torch.from_numpy(rng.uniform(-0.1, 0.1, (n, 3, 1, 1))).float()
    return x.clamp(-1.2, 1.2)


def degrade(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 images through ``_degrade``, back to uint8."""
    return ((_degrade(_to_input(images), rng).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def _random_color(rng: np.random.Generator) -> str:
    return list(COLORS)[int(rng.integers(len(COLORS)))]


# A one-colour family glyph within 3 cells of a base shape's 8x8 mask is that shape in all
# but name (a centred 6x6 block is a square, a disc of radius 3.6 a circle): the judge is not
# trained or validated on those as ``glyph``, since no image could tell them apart.
SHAPE_LOOKALIKE_CELLS = 4
_SHAPE_MASKS = [shape_mask(s, GLYPH_CELLS) > 0 for s in SHAPES]


def looks_like_a_shape(bitmap: tuple[str, ...]) -> bool:
    cells = np.array([[ch != "." for ch in row] for row in bitmap])
    if len({ch for row in bitmap for ch in row} - {"."}) > 1:
        return False
    return any((cells != m).sum() < SHAPE_LOOKALIKE_CELLS for m in _SHAPE_MASKS)


def class_object(name: str, rng: np.random.Generator, concepts: dict[str, WorldConcept]) -> Obj:
    """An object of a known class (not ``other``): a concept, a family glyph, or a shape."""
    if name in concepts:
        return Obj(concept=concepts[name])
    if name == GLYPH:
        glyph = random_glyph(rng, list(concepts.values()))
        while looks_like_a_shape(glyph):
            glyph = random_glyph(rng, list(concepts.values()))
        return Obj(glyph=glyph)
    return Obj(name, _random_color(rng))


def random_label(rng: np.random.Generator, classes: list[str]) -> str:
    roll = rng.random()
    if roll < OTHER_RATE:
        return OTHER
    if roll < OTHER_RATE + GLYPH_RATE:
        return GLYPH
    known = [c for c in classes if c not in (OTHER, GLYPH)]
    return known[int(rng.integers(len(known)))]


def random_identity_scene(rng: np.random.Generator, classes: list[str],
                          concepts: dict[str, WorldConcept]) -> tuple[np.ndarray, int]:
    name = random_label(rng, classes)
    half = rng.random() < HALF_RATE
    if name == OTHER:
        return random_reject(rng, list(concepts.values()), small=half), classes.index(name)
    obj = class_object(name, rng, concepts)
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    if half:
        partner = Obj(SHAPES[int(rng.integers(len(SHAPES)))], _random_color(rng))
        side = int(rng.integers(2))
        scene = place([obj, partner] if side == 0 else [partner, obj], background, rng)
        return halves(render(scene))[side], classes.index(name)
    return render(place([obj], background, rng)), classes.index(name)


def _chunks(images: np.ndarray) -> list[np.ndarray]:
    return [c for c in np.array_split(images, max(1, len(images) // 512 + 1)) if len(c)]


@dataclass
class Judge:
    net: IdentityNet
    classes: list[str]
    record: dict
    threshold: float = 0.0  # an identity whose probability is below this reads as OTHER

    @torch.no_grad()
    def probabilities(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(n, classes) softmax over the judge's classes."""
        images = images.numpy() if torch.is_tensor(images) else images
        return torch.cat([self.net(_to_input(c)).softmax(1) for c in _chunks(images)])

    def identities(self, images: np.ndarray | torch.Tensor) -> list[str]:
        probs = self.probabilities(images)
        confidence, best = probs.max(1)
        return [self.classes[i] if p >= self.threshold else OTHER for i, p in zip(best.tolist(), confidence.tolist())]

    @torch.no_grad()
    def embeddings(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Unit-length judge features (the analogue of DINO features for image similarity)."""
        images = images.numpy() if torch.is_tensor(images) else images
        return F.normalize(torch.cat([self.net.embed(_to_input(c)) for c in _chunks(images)]), dim=1)

    def read(self, images: np.ndarray | torch.Tensor) -> list[dict]:
        """Per image: background, colour, identity, and the object's bitmap read back (8 rows)."""
        images = images.numpy() if torch.is_tensor(images) else images
        ids = self.identities(images)
        out = []
        for image, identity in zip(images, ids):
            bg = read_background(image)
            out.append({"background": bg, "color": read_color(image, bg), "identity": identity,
                        "bitmap": read_bitmap(image, bg)})
        return out

    def read_pair(self, images: np.ndarray | torch.Tensor) -> list[tuple[dict, dict]]:
        """Two-object images: (left object, right object), each with the image's background."""
        images = images.numpy() if torch.is_tensor(images) else images
        split = [h for image in images for h in halves(image)]
        reads = self.read(np.stack(split)) if split else []
        bgs = [read_background(image) for image in images]
        pairs = []
        for i, bg in enumerate(bgs):
            left, right = reads[2 * i], reads[2 * i + 1]
            left["background"] = right["background"] = bg
            pairs.append((left, right))
        return pairs


def choose_threshold(judge: Judge, concepts: list[WorldConcept], n: int = 1200, seed: int = 2) -> float:
    """The largest threshold that rejects at most MAX_FALSE_REJECT more of degraded renders of
    known classes (fresh ones, not the validation set's) than the argmax alone."""
    rng = np.random.default_rng(seed)
    by_name = {c.name: c for c in concepts}
    known = [c for c in judge.classes if c != OTHER]
    names = [known[int(rng.integers(len(known)))] for _ in range(n)]
    images = np.stack([render(place([class_object(name, rng, by_name)], list(BACKGROUNDS)[i % len(BACKGROUNDS)],
                                    rng)) for i, name in enumerate(names)])
    confidence, best = judge.probabilities(degrade(images, rng)).max(1)
    rejected = {float(t): ((confidence < t) | (best == judge.classes.index(OTHER))).float().mean().item()
                for t in THRESHOLDS}
    argmax_only = (best == judge.classes.index(OTHER)).float().mean().item()
    ok = [t for t, share in rejected.items() if share <= argmax_only + MAX_FALSE_REJECT]
    return max(ok) if ok else 0.0


def train_judge(concepts: list[WorldConcept], out_dir: str | Path = JUDGE_DIR, steps: int = 2000,
                batch_size: int = 64, seed: int = 0, device: str = "cpu", progress: bool = True) -> Judge:
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    classes = list(SHAPES) + [c.name for c in concepts] + [GLYPH, OTHER]
    by_name = {c.name: c for c in concepts}
    net = IdentityNet(len(classes)).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc="judge", disable=not progress, mininterval=5):
        batch = [random_identity_scene(rng, classes, by_name) for _ in range(batch_size)]
        x = _degrade(_to_input(np.stack([b[0] for b in batch])), rng)
        y = torch.tensor([b[1] for b in batch])
        loss = F.cross_entropy(net(x.to(device)), y.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval().to("cpu")
    judge = Judge(net, classes, {})
    judge.threshold = choose_threshold(judge, concepts, seed=seed + 2)
    judge.record = {"classes": classes, "threshold": judge.threshold, "train_steps": steps,
                    "train_seconds": round(time.perf_counter() - start, 1),
                    "validation": validate(judge, concepts, seed=seed + 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out_dir / "judge.safetensors"))
    (out_dir / "judge.json").write_text(json.dumps(judge.record, indent=2) + "\n")
    return judge


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


@torch.no_grad()
def validate(judge: Judge, concepts: list[WorldConcept], n: int = 3000, seed: int = 1) -> dict:
    """Every reading on fresh images the judge never saw: identity, background and colour on clean
    and degraded renders; the reject class; the bitmap read-back against each concept."""
    rng = np.random.default_rng(seed)
    by_name = {c.name: c for c in concepts}
    known = [c for c in judge.classes if c != OTHER]
    images, scenes = [], []
    for _ in range(n):
        obj = class_object(known[int(rng.integers(len(known)))], rng, by_name)
        scenes.append(place([obj], list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))], rng))
        images.append(render(scenes[-1]))
    images = np.stack(images)
    labels = [s.objects[0].identity for s in scenes]
    is_concept = np.array([label in by_name for label in labels])
    out = {"renders": n, "threshold": judge.threshold}
    for tag, batch in (("clean", images), ("degraded", degrade(images, rng))):
        reads = judge.read(batch)
        out[f"identity_{tag}"] = _mean(r["identity"] == y for r, y in zip(reads, labels))
        out[f"background_{tag}"] = _mean(r["background"] == s.background for r, s in zip(reads, scenes))
        out[f"color_{tag}"] = _mean(r["color"] == s.objects[0].color for r, s in zip(reads, scenes)
                                    if s.objects[0].shape is not None)
        out[f"glyph_read_as_glyph_{tag}"] = _mean(r["identity"] == GLYPH for r, y in zip(reads, labels) if y == GLYPH)
        # A concept's render read as OTHER: the price of the reject class, in fidelity.
        out[f"concept_rejected_{tag}"] = _mean(r["identity"] == OTHER for r, c in zip(reads, is_concept) if c)
        out[f"concept_false_accept_{tag}"] = _mean(r["identity"] in by_name for r, y in zip(reads, labels)
                                                   if y not in by_name)
    rejects = np.stack([random_reject(rng, concepts, small=bool(rng.random() < HALF_RATE)) for _ in range(n // 3)])
    for tag, batch in (("clean", rejects), ("degraded", degrade(rejects, rng))):
        ids = judge.identities(batch)
        out[f"other_read_as_other_{tag}"] = _mean(i == OTHER for i in ids)
        out[f"other_read_as_concept_{tag}"] = _mean(i in by_name for i in ids)
    # Two-object scenes, read by halves.
    pairs, truth = [], []
    for _ in range(n // 3):
        objs = [Obj(s, _random_color(rng)) for s in rng.choice(list(SHAPES), 2)]
        pairs.append(render(place(objs, list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))], rng)))
        truth.append(objs)
    reads = judge.read_pair(np.stack(pairs))
    out["two_object_identity_clean"] = _mean(l["identity"] == a.shape and r["identity"] == b.shape
                                             for (l, r), (a, b) in zip(reads, truth))
    out["two_object_color_clean"] = _mean(l["color"] == a.color and r["color"] == b.color
                                          for (l, r), (a, b) in zip(reads, truth))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()} | validate_bitmaps(concepts, rng)


def validate_bitmaps(concepts: list[WorldConcept], rng: np.random.Generator, per_concept: int = 24) -> dict:
    """Bitmap agreement of fresh renders with their own concept (should be ~1.0), with the other
    concepts, and of family glyphs with the concepts: the last two are the metric's chance level."""
    own, cross, glyph = [], [], []
    for concept in concepts:
        for k in range(per_concept):
            bg = list(BACKGROUNDS)[k % len(BACKGROUNDS)]
            if k % 3 == 2:  # one half of a two-object scene
                scene = place([Obj(concept=concept), Obj("circle", _random_color(rng))], bg, rng)
                image = halves(render(scene))[0]
            else:
                image = render(place([Obj(concept=concept)], bg, rng))
            read = read_bitmap(image)
            own.append(bitmap_agreement(read, concept.bitmap))
            cross += [bitmap_agreement(read, c.bitmap) for c in concepts if c is not concept]
    for k in range(per_concept * 2):
        scene = place([Obj(glyph=random_glyph(rng, concepts))], list(BACKGROUNDS)[k % len(BACKGROUNDS)], rng)
        read = read_bitmap(render(scene))
        glyph += [bitmap_agreement(read, c.bitmap) for c in concepts]
    return {"bitmap_own_concept": round(_mean(own), 4), "bitmap_own_concept_min": round(min(own), 4),
            "bitmap_other_concepts": round(_mean(cross), 4), "bitmap_family_glyphs": round(_mean(glyph), 4)}


def load_judge(directory: str | Path = JUDGE_DIR) -> Judge:
    directory = Path(directory)
    meta, weights = directory / "judge.json", directory / "judge.safetensors"
    for path in (meta, weights):
        if not path.is_file():
            raise CNSError(path, "missing: train the judge with `cns world judge`", "world_missing")
    record = json.loads(meta.read_text())
    net = IdentityNet(len(record["classes"]))
    net.load_state_dict(load_file(str(weights)))
    net.eval()
    return Judge(net, record["classes"], record, threshold=float(record.get("threshold", 0.0)))
