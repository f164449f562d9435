"""What the judge must refuse: images that are none of the world's objects.

A diffusion model that has not learned a concept does not draw a clean wrong object; it draws
blobs, smears, half-formed glyphs, mixtures and noise. A judge that must pick one of its known
classes reads such a blob as whichever concept shares its colour (the review of 2026-11-27 found
red blobs read as "ringdot" 8 times in 24, docs/world.md). ``random_reject`` draws such
failures from the generator's own parts, so the judge learns an ``other`` class for them.

Every kind keeps the background clean at the border (the judge reads it there) and is
distinguishable from a *degraded* render (world.judge.degrade: noise up to 0.25, a 3x3 blur,
small colour shifts): blur here is at least sigma 1.5 px, warps move pixels by 2-4 px.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from world.readback import EMPTY, bitmap_agreement, read_bitmap
from world.scene import BACKGROUNDS, COLORS, SHAPES, SIZE, Obj, Scene, WorldConcept, place, random_glyph, render

REJECT_KINDS = ("blob", "blurred", "partial", "mixture", "warped", "noise", "empty", "recoloured")


def _smooth_field(rng: np.random.Generator, size: int, grain: int) -> np.ndarray:
    """A smooth random field (size, size), zero mean, unit scale: grain x grain knots, cubic."""
    knots = rng.standard_normal((grain, grain))
    field = ndimage.zoom(knots, size / grain, order=3, mode="nearest")[:size, :size]
    return (field - field.mean()) / (field.std() + 1e-6)


def _random_object(rng: np.random.Generator, concepts: list[WorldConcept], shapes: bool = True) -> Obj:
    """A concept half the time (failed concept samples are what the judge must refuse most)."""
    roll = rng.random() * (1.0 if shapes else 0.8)
    if roll < 0.5 and concepts:
        return Obj(concept=concepts[int(rng.integers(len(concepts)))])
    if roll < 0.8:
        return Obj(glyph=random_glyph(rng, concepts))
    return Obj(SHAPES[int(rng.integers(len(SHAPES)))], list(COLORS)[int(rng.integers(len(COLORS)))])


def _box(rng: np.random.Generator, small: bool) -> tuple[int, int, int]:
    """(left, top, size): a single object's box, or a half-scene object's box as
    world.judge.halves centres it (the strip x in [8, 24))."""
    if not small:
        return place([Obj("circle", "red")], "gray", rng).boxes[0]
    size = int(rng.integers(12, 16))
    return 8 + int(rng.integers(0, 16 - size + 1)), int(rng.integers(2, SIZE - size - 1)), size


def _render_at(obj: Obj, background: str, box: tuple[int, int, int]) -> np.ndarray:
    return render(Scene(objects=[obj], background=background, boxes=[box])).astype(np.float32)


def _paint(canvas: np.ndarray, alpha: np.ndarray, rgb) -> np.ndarray:
    return canvas * (1 - alpha[..., None]) + np.asarray(rgb, np.float32) * alpha[..., None]


def _box_alpha(rng: np.random.Generator, box: tuple[int, int, int], coverage: float, grain: int,
               round_: bool = False) -> np.ndarray:
    """Soft mask (SIZE, SIZE) of an irregular region covering about ``coverage`` of the box;
    ``round_`` pulls it away from the box's edges (a blob, not a cut-off glyph part)."""
    left, top, size = box
    field = _smooth_field(rng, size, grain)
    if round_:
        c = np.linspace(-1, 1, size)
        field = field - 2 * (c[:, None] ** 2 + c[None] ** 2)
    cut = np.quantile(field, 1 - coverage)
    alpha = np.zeros((SIZE, SIZE), np.float32)
    alpha[top:top + size, left:left + size] = np.clip((field - cut) * 3, 0, 1)
    return alpha


def random_reject(rng: np.random.Generator, concepts: list[WorldConcept], small: bool = False,
                  kind: str | None = None) -> np.ndarray:
    """uint8 (SIZE, SIZE, 3): one bad sample of a random ``kind`` (one of REJECT_KINDS); ``small``
    draws it at the size of one object of a two-object scene, centred as a half is read.
    A draw that still reads back as a concept's bitmap (a mixture of a concept with a look-alike,
    a part cut where the concept is empty) is drawn again: it would be a mislabelled example."""
    kind = kind or REJECT_KINDS[int(rng.integers(len(REJECT_KINDS)))]
    while True:
        image = _draw(rng, concepts, small, kind)
        if image is None:
            continue
        read = read_bitmap(image)
        # An empty read is no concept, however many blank cells a (small) concept has.
        if read == EMPTY or all(bitmap_agreement(read, c.bitmap) < 0.9 for c in concepts):
            return image


def _kept(image: np.ndarray, alpha: np.ndarray, background: str) -> float:
    """Share of an object's pixels that ``alpha`` keeps."""
    obj = np.abs(image - np.asarray(BACKGROUNDS[background], np.float32)).sum(-1) > 60
    return float((alpha * obj).sum() / max(obj.sum(), 1))


def _draw(rng: np.random.Generator, concepts: list[WorldConcept], small: bool, kind: str) -> np.ndarray | None:
    """One draw of ``kind``, or None where it would not show its defect (a cut through empty
    cells leaves a clean glyph; a mixture where one object hardly shows is the other object)."""
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    box = _box(rng, small)
    canvas = np.empty((SIZE, SIZE, 3), np.float32)
    canvas[:] = BACKGROUNDS[background]
    colors = [COLORS[c] for c in rng.permutation(list(COLORS))[:2]]
    if kind == "blob":  # one or two colour blobs with wobbly edges
        canvas = _paint(canvas, _box_alpha(rng, box, rng.uniform(0.3, 0.6), int(rng.integers(3, 6)), True),
                        colors[0])
        if rng.random() < 0.5:
            canvas = _paint(canvas, _box_alpha(rng, box, rng.uniform(0.1, 0.3), 3, True), colors[1])
    elif kind == "blurred":  # an object smeared: gaussian, or along one direction
        canvas = _render_at(_random_object(rng, concepts), background, box)
        if rng.random() < 0.6:
            sigma = rng.uniform(1.5, 3.0)
            canvas = ndimage.gaussian_filter(canvas, (sigma, sigma, 0), mode="nearest")
        else:
            length = int(rng.integers(5, 10))
            canvas = ndimage.uniform_filter1d(canvas, length, axis=int(rng.integers(2)), mode="nearest")
    elif kind == "partial":  # an object with an irregular part missing
        canvas = _render_at(_random_object(rng, concepts), background, box)
        cut = _box_alpha(rng, box, rng.uniform(0.35, 0.6), 3)
        if not 0.25 <= _kept(canvas, cut, background) <= 0.75:
            return None
        canvas = _paint(canvas, cut, BACKGROUNDS[background])
    elif kind == "mixture":  # two different objects, each filling part of the same box
        # Glyph-like parts only: half a cross beside half a diamond would read as a base shape.
        a, b = _random_object(rng, concepts, shapes=False), _random_object(rng, concepts, shapes=False)
        while b == a:
            b = _random_object(rng, concepts, shapes=False)
        split = _box_alpha(rng, box, rng.uniform(0.35, 0.65), int(rng.integers(1, 4)))
        first, second = _render_at(a, background, box), _render_at(b, background, box)
        if _kept(first, 1 - split, background) < 0.3 or _kept(second, split, background) < 0.3:
            return None
        canvas = _paint(first, split, 0) + second * split[..., None]
    elif kind == "warped":  # an object under a strong smooth displacement
        canvas = _render_at(_random_object(rng, concepts), background, box)
        amp = rng.uniform(2.0, 4.0)
        dy, dx = (_smooth_field(rng, SIZE, 4) * amp for _ in range(2))
        yy, xx = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
        canvas = np.stack([ndimage.map_coordinates(canvas[..., c], [yy + dy, xx + dx], order=1, mode="nearest")
                           for c in range(3)], -1)
    elif kind == "noise":  # colour noise where an object should be; finer than a glyph's 8 cells,
        left, top, size = box  # which coarser blocks would be
        grain = int(rng.choice([12, 16, 32]))
        cells = rng.integers(len(COLORS) + 1, size=(grain, grain))
        palette = np.concatenate([np.array(list(COLORS.values()), np.float32),
                                  np.asarray(BACKGROUNDS[background], np.float32)[None]])
        patch = palette[cells][np.arange(size) * grain // size][:, np.arange(size) * grain // size]
        patch = patch + rng.normal(0, rng.uniform(20, 60), patch.shape)
        canvas[top:top + size, left:left + size] = ndimage.gaussian_filter(patch, (0.7, 0.7, 0))
    elif kind == "empty":  # background only, sometimes with a faint smudge
        if rng.random() < 0.5:
            canvas = _paint(canvas, _box_alpha(rng, box, 0.4, 3) * rng.uniform(0.1, 0.3), colors[0])
    elif kind == "recoloured":  # a concept's structure in the wrong colours: not the concept
        concept = concepts[int(rng.integers(len(concepts)))]
        letters = sorted({ch for row in concept.bitmap for ch in row} - {"."})
        new = dict(zip(letters, rng.permutation([ch for ch in "RGBYPO" if ch not in letters])))
        glyph = tuple("".join(new.get(ch, ch) for ch in row) for row in concept.bitmap)
        canvas = _render_at(Obj(glyph=glyph), background, box)
    else:
        raise ValueError(f"unknown reject kind {kind!r}; one of {', '.join(REJECT_KINDS)}")
    # Keep a clean 2-pixel border: the judge reads the background there (warps and blurs spill).
    canvas[:2], canvas[-2:], canvas[:, :2], canvas[:, -2:] = (BACKGROUNDS[background],) * 4
    return np.clip(canvas.round(), 0, 255).astype(np.uint8)
