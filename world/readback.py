"""Exact readings of an image by the palette rules: background, object colour, and the object's
bitmap read back cell by cell (the truth-based identity metric).

The generator knows every colour, so these need no training. ``read_bitmap`` crops the object
and reads it back to the 8x8 letter grid the concepts are written in (data/world/concepts.yaml);
``bitmap_agreement`` compares two grids. A concept rendered fresh reads back to its own bitmap
(agreement ~1.0); how far other concepts and family glyphs score is the metric's chance level,
stored in judge.json next to it.
"""

from __future__ import annotations

import numpy as np

from world.scene import BACKGROUNDS, COLORS, GLYPH_CELLS, PALETTE_LETTERS

FAR_FROM_BACKGROUND = 70.0  # RGB distance: pixels farther than this from the background are object
# A pixel belongs to the object when it snaps to a palette colour and is at least this far from
# the background: lower than FAR_FROM_BACKGROUND because green on teal is only 84 apart.
OBJECT_MIN_DISTANCE = 40.0
# Each cell is read from its central part only (this share of its width): at 20-27 px an object's
# cells are 2.5-3.4 px and their borders fall inside pixels, so a whole-cell average would mix
# neighbours (half red, half yellow reads as orange).
CELL_CORE = 0.5
# Shifts (in cells) over which bitmap_agreement takes the best match: a crop that misses an empty
# edge column (the moon's right side is blank) is centred one cell off. ±1 is enough for that and
# inflates chance agreement little (measured in judge.json: bitmap_*).
SHIFTS = (-1, 0, 1)

_BG = np.array(list(BACKGROUNDS.values()), np.float32)
_FG = np.array(list(COLORS.values()), np.float32)
_LETTERS = "".join(PALETTE_LETTERS)
EMPTY = tuple("." * GLYPH_CELLS for _ in range(GLYPH_CELLS))


def read_background(image: np.ndarray) -> str:
    """image uint8 (h, w, 3) -> background name (median of the 2-pixel border, snapped)."""
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3),
                             image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)]).astype(np.float32)
    rgb = np.median(border, axis=0)
    return list(BACKGROUNDS)[int(np.argmin(((_BG - rgb) ** 2).sum(1)))]


def read_color(image: np.ndarray, background: str | None = None) -> str | None:
    """The dominant object colour, or None when (almost) nothing differs from the background."""
    background = background or read_background(image)
    pixels = image.reshape(-1, 3).astype(np.float32)
    far = np.sqrt(((pixels - np.asarray(BACKGROUNDS[background], np.float32)) ** 2).sum(1)) > FAR_FROM_BACKGROUND
    if far.sum() < 4:
        return None
    # Snap each object pixel, then take the most common colour (robust to anti-aliased edges).
    snapped = np.argmin(((pixels[far][:, None] - _FG[None]) ** 2).sum(-1), axis=1)
    return list(COLORS)[int(np.bincount(snapped, minlength=len(COLORS)).argmax())]


def _snap(rgb: np.ndarray, background: str) -> np.ndarray:
    """Index per pixel into palette letters, len(PALETTE_LETTERS) meaning the background."""
    choices = np.concatenate([_FG, np.asarray(BACKGROUNDS[background], np.float32)[None]])
    return np.argmin(((rgb[..., None, :] - choices) ** 2).sum(-1), axis=-1)


def object_mask(image: np.ndarray, background: str) -> np.ndarray:
    """bool (h, w): pixels of the object. Isolated pixels (no object 4-neighbour) are dropped, so
    a speck of sampling noise does not stretch the crop."""
    rgb = image.astype(np.float32)
    dist = np.sqrt(((rgb - np.asarray(BACKGROUNDS[background], np.float32)) ** 2).sum(-1))
    mask = (_snap(rgb, background) < len(_FG)) & (dist > OBJECT_MIN_DISTANCE)
    padded = np.pad(mask, 1)
    neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return mask & neighbours


def _cell_weights(start: float, side: float, pixels: int) -> np.ndarray:
    """(8, pixels): the overlap of each cell's central part with each pixel, rows summing to 1
    (or 0 where the cell lies outside the image)."""
    cell = side / GLYPH_CELLS
    lo = start + (np.arange(GLYPH_CELLS) + (1 - CELL_CORE) / 2) * cell
    hi = lo + CELL_CORE * cell
    p = np.arange(pixels)
    overlap = np.clip(np.minimum(hi[:, None], p[None] + 1) - np.maximum(lo[:, None], p[None]), 0, None)
    total = overlap.sum(1, keepdims=True)
    return np.divide(overlap, total, out=np.zeros_like(overlap), where=total > 0)


def read_bitmap(image: np.ndarray, background: str | None = None) -> tuple[str, ...]:
    """The object read back as 8 rows of 8 letters (palette letters or '.').

    The object is the pixels far from the background (``object_mask``); its bounding box, made
    square (every object in the world is square) and centred on the box, is cut into 8x8 cells;
    each cell's central area average snaps to the nearest palette colour or to the background
    ('.'). An image with no object reads as all '.'."""
    image = np.asarray(image)
    background = background or read_background(image)
    mask = object_mask(image, background)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        return EMPTY
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = float(max(y1 - y0, x1 - x0))
    wy = _cell_weights((y0 + y1 - side) / 2, side, image.shape[0])
    wx = _cell_weights((x0 + x1 - side) / 2, side, image.shape[1])
    rgb = np.einsum("ip,pqc,jq->ijc", wy, image.astype(np.float32), wx)
    outside = (wy.sum(1)[:, None] * wx.sum(1)[None]) == 0
    rgb[outside] = BACKGROUNDS[background]
    codes = _snap(rgb, background)
    alphabet = _LETTERS + "."
    return tuple("".join(alphabet[c] for c in row) for row in codes)


def bitmap_agreement(read: tuple[str, ...], truth: tuple[str, ...]) -> float:
    """Share of the 64 cells equal, at the best shift of ``read`` by up to one cell each way
    (cells shifted in are '.'): in [0, 1]."""
    a = np.array([list(r) for r in read])
    b = np.array([list(r) for r in truth])
    n = GLYPH_CELLS
    best = 0
    for dy in SHIFTS:
        for dx in SHIFTS:
            shifted = np.full_like(a, ".")
            shifted[max(dy, 0):n + min(dy, 0), max(dx, 0):n + min(dx, 0)] = \
                a[max(-dy, 0):n + min(-dy, 0), max(-dx, 0):n + min(-dx, 0)]
            best = max(best, int((shifted == b).sum()))
    return best / (n * n)
