"""What the world holds and how it is drawn.

A scene is one, two or three objects on a plain background, 32x32 RGB. An object is
- a base shape (circle, square, triangle, diamond, cross) in one of six colours,
- a *glyph* of the family: an 8x8 bitmap in one or two colours, drawn from a grammar of strokes
  (rings, discs, frames, bars, stripes, checks, diagonals, triangles, crescents, dots), or
- a *concept*: one particular glyph with its own colours, from data/world/concepts.yaml.

Pretraining sees base shapes and family glyphs, never a concept: every glyph closer than
``HOLDOUT_DISTANCE`` cells to a concept's bitmap (under any swap of colours) is redrawn. A
concept is then a new instance of a kind the model knows ("a glyph"), as a user's dog is a new
dog for Stable Diffusion: personalization edits a prior instead of teaching pixels from nothing.

Captions read "a red circle on a gray background", "a red and yellow glyph on a gray
background" and "a red circle and a blue glyph on a gray background" (first object on the left;
three objects: top left, top right, bottom centre, in caption order).
Size and position vary and are not captioned, so a prompt leaves them to the model, as a real
prompt leaves the pose.

Rendering supersamples 4x and box-filters, so edges are anti-aliased and every pixel is a known
mix of the palette colours: the judge (world.judge) reads colours back exactly.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from cns.errors import CNSError

SIZE = 32
SUPERSAMPLE = 4

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230),
    "yellow": (240, 215, 40), "purple": (140, 50, 200), "orange": (250, 135, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20), "white": (245, 245, 245), "gray": (128, 128, 128),
    "pink": (250, 175, 205), "teal": (20, 120, 125), "brown": (110, 70, 35),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# (shape, colour) pairs never shown in pretraining: the test of composition.
HELDOUT_PAIRS = (("circle", "blue"), ("square", "yellow"), ("triangle", "purple"), ("diamond", "red"),
                 ("cross", "orange"))
GLYPH = "glyph"  # the class noun of family glyphs and of the concepts
CLASS_NOUNS = (*SHAPES, GLYPH)
GLYPH_CELLS = 8
# Minimum distance, in cells of the 8x8 grid, between any pretraining glyph and any concept,
# under the best swap of colours: the concepts' structures themselves are never seen.
HOLDOUT_DISTANCE = 8
CONCEPTS_FILE = Path(__file__).resolve().parent.parent / "data" / "world" / "concepts.yaml"
PALETTE_LETTERS = {"R": "red", "G": "green", "B": "blue", "Y": "yellow", "P": "purple", "O": "orange"}


def shape_mask(shape: str, n: int) -> np.ndarray:
    """float mask (n, n) of a base shape filling the unit square."""
    c = (np.arange(n) + 0.5) / n * 2 - 1  # -1..1
    x, y = np.meshgrid(c, c)
    if shape == "circle":
        m = x ** 2 + y ** 2 <= 0.92 ** 2
    elif shape == "square":
        m = (np.abs(x) <= 0.8) & (np.abs(y) <= 0.8)
    elif shape == "triangle":
        m = (y <= 0.85) & (y >= -0.85) & (np.abs(x) <= (y + 0.85) / 1.7 * 0.95)
    elif shape == "diamond":
        m = np.abs(x) + np.abs(y) <= 0.98
    elif shape == "cross":
        m = ((np.abs(x) <= 0.3) | (np.abs(y) <= 0.3)) & (np.abs(x) <= 0.95) & (np.abs(y) <= 0.95)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m.astype(np.float32)


@dataclass(frozen=True)
class WorldConcept:
    """A novel object: an 8x8 bitmap of palette letters ('.' = transparent)."""

    name: str
    token: str
    class_noun: str
    bitmap: tuple[str, ...]
    description: str = ""

    def layers(self, n: int) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
        return bitmap_layers(self.bitmap, n)


def bitmap_layers(bitmap: tuple[str, ...], n: int) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
    """(mask (n, n), rgb) per colour of an 8x8 letter bitmap, scaled to n pixels (nearest)."""
    grid = np.array([list(row) for row in bitmap])
    idx = (np.arange(n) * grid.shape[0] // n)
    grid = grid[idx][:, idx]
    return [((grid == letter).astype(np.float32), COLORS[color])
            for letter, color in PALETTE_LETTERS.items() if (grid == letter).any()]


@dataclass(frozen=True)
class Obj:
    """One object to draw: a base shape in a colour, a family glyph (its bitmap), or a concept."""

    shape: str | None = None
    color: str | None = None
    concept: WorldConcept | None = None
    glyph: tuple[str, ...] | None = None

    def words(self) -> str:
        if self.concept is not None:
            return f"{self.concept.token} {self.concept.class_noun}"
        if self.glyph is not None:
            return f"{' and '.join(glyph_colors(self.glyph))} {GLYPH}"
        return f"{self.color} {self.shape}"

    @property
    def identity(self) -> str:
        if self.concept is not None:
            return self.concept.name
        return GLYPH if self.glyph is not None else self.shape


@dataclass
class Scene:
    objects: list[Obj]
    background: str
    # (left, top, size) per object, in pixels of the final image.
    boxes: list[tuple[int, int, int]] = field(default_factory=list)

    def caption(self) -> str:
        return caption(self.objects, self.background)


def caption(objects: list[Obj], background: str) -> str:
    return " and ".join(f"a {o.words()}" for o in objects) + f" on a {background} background"


def load_concepts(path: str | Path = CONCEPTS_FILE) -> list[WorldConcept]:
    """Concepts from the data file; each problem is an error naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CNSError(path, f"cannot read concepts ({str(exc).splitlines()[0]})", "world_invalid") from None
    if not isinstance(data, dict) or not isinstance(data.get("concepts"), list):
        raise CNSError(path, "must be a mapping with a 'concepts' list", "world_invalid")
    out, seen = [], set()
    for i, item in enumerate(data["concepts"]):
        where = f"concept #{i + 1}"
        if not isinstance(item, dict) or not {"name", "token", "class_noun", "bitmap"} <= set(item):
            raise CNSError(path, f"{where} needs name, token, class_noun and bitmap", "world_invalid")
        rows = tuple(str(item["bitmap"]).split())
        if len(rows) != 8 or any(len(r) != 8 for r in rows):
            raise CNSError(path, f"{where} ({item['name']}): bitmap must be 8 rows of 8 characters", "world_invalid")
        bad = set("".join(rows)) - set(PALETTE_LETTERS) - {"."}
        if bad:
            raise CNSError(path, f"{where} ({item['name']}): unknown bitmap letter {sorted(bad)[0]!r} "
                                 f"(use {''.join(PALETTE_LETTERS)} or .)", "world_invalid")
        if item["class_noun"] not in CLASS_NOUNS:
            raise CNSError(path, f"{where} ({item['name']}): class_noun must be one of {', '.join(CLASS_NOUNS)}",
                           "world_invalid")
        if item["name"] in seen:
            raise CNSError(path, f"{where}: duplicate name {item['name']!r}", "world_invalid")
        seen.add(item["name"])
        out.append(WorldConcept(name=item["name"], token=item["token"], class_noun=item["class_noun"],
                                bitmap=rows, description=str(item.get("description", ""))))
    return out


def seen_pairs() -> list[tuple[str, str]]:
    return [p for p in itertools.product(SHAPES, COLORS) if p not in HELDOUT_PAIRS]


def render(scene: Scene) -> np.ndarray:
    """uint8 (SIZE, SIZE, 3)."""
    big = SIZE * SUPERSAMPLE
    canvas = np.empty((big, big, 3), np.float32)
    canvas[:] = BACKGROUNDS[scene.background]
    for obj, (left, top, size) in zip(scene.objects, scene.boxes):
        n = size * SUPERSAMPLE
        if obj.concept is not None:
            layers = obj.concept.layers(n)
        elif obj.glyph is not None:
            layers = bitmap_layers(obj.glyph, n)
        else:
            layers = [(shape_mask(obj.shape, n), COLORS[obj.color])]
        y0, x0 = top * SUPERSAMPLE, left * SUPERSAMPLE
        region = canvas[y0:y0 + n, x0:x0 + n]
        for mask, rgb in layers:
            region[:] = region * (1 - mask[..., None]) + np.asarray(rgb, np.float32) * mask[..., None]
    small = canvas.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(small.round(), 0, 255).astype(np.uint8)


# Three objects: the top left and top right quarters and the bottom centre, (left, top) of each
# 16 px cell, in caption order. Vertical thirds would leave 10 px an object, too small to read
# back; quarters hold the 12-15 px objects of a pair.
CORNERS = ((0, 0), (SIZE // 2, 0), (SIZE // 4, SIZE // 2))
# The same cells as boxes in 0..1 (x0, y0, x1, y1), as region control and world.judge.cells take them.
CORNER_BOXES = tuple((left / SIZE, top / SIZE, (left + SIZE // 2) / SIZE, (top + SIZE // 2) / SIZE)
                     for left, top in CORNERS)


def place(objects: list[Obj], background: str, rng: np.random.Generator) -> Scene:
    """Random size and position: one object anywhere, two objects in the left and right halves,
    three in the cells of ``CORNERS``."""
    boxes = []
    if len(objects) == 1:
        # 20-27 px: about 3 px per glyph cell, 1.5 at the UNet's 16x16 cross-attention level.
        size = int(rng.integers(20, 28))
        boxes.append((int(rng.integers(1, SIZE - size)), int(rng.integers(1, SIZE - size)), size))
    elif len(objects) == 3:
        cell = SIZE // 2
        for left, top in CORNERS:
            size = int(rng.integers(12, 16))
            boxes.append((left + int(rng.integers(0, cell - size + 1)), top + int(rng.integers(0, cell - size + 1)), size))
    else:
        half = SIZE // len(objects)
        for k in range(len(objects)):
            size = int(rng.integers(12, 16))
            boxes.append((k * half + int(rng.integers(0, half - size + 1)), int(rng.integers(2, SIZE - size - 1)), size))
    return Scene(objects=objects, background=background, boxes=boxes)


def random_base_scene(rng: np.random.Generator, two_object_rate: float = 0.25,
                      pairs: list[tuple[str, str]] | None = None, glyph_rate: float = 0.0,
                      holdout: list[WorldConcept] | None = None, three_object_rate: float = 0.0) -> Scene:
    """A pretraining scene: seen (shape, colour) pairs only, unless ``pairs`` says otherwise;
    each object is a family glyph with probability ``glyph_rate``, never within
    ``HOLDOUT_DISTANCE`` of a concept in ``holdout``. Two objects with probability
    ``two_object_rate``, three with ``three_object_rate`` (one draw decides: at 0, the scenes
    are those of a world made before three-object scenes existed)."""
    pairs = pairs or seen_pairs()
    draw = rng.random()
    count = 2 if draw < two_object_rate else 3 if draw < two_object_rate + three_object_rate else 1
    objects = [Obj(glyph=random_glyph(rng, holdout)) if rng.random() < glyph_rate
               else Obj(*pairs[int(rng.integers(len(pairs)))]) for _ in range(count)]
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return place(objects, background, rng)


def concept_training_scenes(concept: WorldConcept, count: int, seed: int) -> list[Scene]:
    """A concept's personalization photos: varied backgrounds (no two alike), sizes and positions."""
    rng = np.random.default_rng([seed, zlib.crc32(concept.name.encode())])
    backgrounds = list(rng.permutation(list(BACKGROUNDS)))[:count]
    return [place([Obj(concept=concept)], str(bg), rng) for bg in backgrounds]


# ---- the glyph family ---------------------------------------------------------------------------
# Strokes on the 8x8 grid; a glyph is one or two strokes, each in its own colour, the second
# painted over the first. The concepts of data/world/concepts.yaml are made of the same kinds
# of strokes (a ring and a dot, a frame and a dot, checks, stripes, bars, a crescent ...), so
# each is a new combination or variant of known parts, kept out of pretraining by distance.

_C = np.arange(GLYPH_CELLS) + 0.5 - GLYPH_CELLS / 2  # cell centres, -3.5..3.5
_Y, _X = np.meshgrid(_C, _C, indexing="ij")


def _stroke(rng: np.random.Generator) -> np.ndarray:
    """One random stroke: a boolean (8, 8) mask."""
    kind = int(rng.integers(14))
    r = np.hypot(_Y, _X)
    flip = bool(rng.integers(2))
    if kind == 0:  # ring
        outer = rng.choice([3.6, 4.1])
        m = (r <= outer) & (r >= outer - rng.choice([1.2, 2.2]))
    elif kind == 1:  # disc
        m = r <= rng.choice([1.6, 2.6, 3.6, 4.1])
    elif kind == 2:  # square frame
        edge = np.maximum(np.abs(_Y), np.abs(_X))
        outer = 4 - int(rng.integers(2))
        m = (edge <= outer) & (edge > outer - int(rng.integers(1, 3)))
    elif kind == 3:  # centred block (a dot)
        half = int(rng.integers(1, 4))
        m = (np.abs(_Y) < half) & (np.abs(_X) < half)
    elif kind == 4:  # stripes
        period = int(rng.choice([2, 4]))
        m = ((np.arange(8) // (period // 2) + int(rng.integers(2))) % 2 == 0)[:, None].repeat(8, 1)
    elif kind == 5:  # checks
        cell = int(rng.choice([1, 2, 4]))
        a = np.arange(8) // cell
        m = (a[:, None] + a[None, :] + int(rng.integers(2))) % 2 == 0
    elif kind == 6:  # one diagonal or both
        width = rng.choice([0.8, 1.3])
        m = np.abs(_Y - _X) <= width
        if rng.random() < 0.5:
            m |= np.abs(_Y + _X) <= width
    elif kind == 7:  # plus
        width = int(rng.integers(1, 3))
        m = (np.abs(_Y) < width) | (np.abs(_X) < width)
    elif kind == 8:  # triangle pointing one way (filled)
        m = np.abs(_X) <= (_Y + 4) / 2
    elif kind == 9:  # two triangles meeting at the centre (an hourglass)
        m = np.abs(_X) <= np.abs(_Y) + 0.1
    elif kind == 10:  # crescent
        shift = rng.choice([1.5, 2.5])
        m = (r <= 3.9) & (np.hypot(_Y, _X - shift) > 3.4)
    elif kind == 11:  # bars: letter-like strokes along the edges and the middle
        m = np.zeros((8, 8), bool)
        width = int(rng.integers(2, 4))
        for bar in rng.choice(6, size=int(rng.integers(2, 4)), replace=False):
            if bar == 0:
                m[:width] = True
            elif bar == 1:
                m[-width:] = True
            elif bar == 2:
                m[:, :width] = True
            elif bar == 3:
                m[:, -width:] = True
            elif bar == 4:
                m[4 - width // 2 - 1:4 + (width + 1) // 2 - 1] = True
            else:
                m[:, 4 - width // 2 - 1:4 + (width + 1) // 2 - 1] = True
    elif kind == 12:  # four dots, at the corners or the sides
        m = np.zeros((8, 8), bool)
        if rng.random() < 0.5:
            for y, x in ((0, 0), (0, 6), (6, 0), (6, 6)):
                m[y:y + 2, x:x + 2] = True
        else:
            for y, x in ((0, 3), (3, 0), (3, 6), (6, 3)):
                m[y:y + 2, x:x + 2] = True
    else:  # half or quarter
        m = (_Y < 0) if rng.random() < 0.5 else (_Y < 0) & (_X < 0)
    for _ in range(int(rng.integers(4))):  # one of four orientations
        m = np.rot90(m)
    return np.fliplr(m) if flip else m


_ALPHABET = "." + "".join(PALETTE_LETTERS)  # code 0 transparent, k the k-th palette letter


def _letters(grid: np.ndarray) -> tuple[str, ...]:
    """An int grid of codes as bitmap rows."""
    return tuple("".join(_ALPHABET[v] for v in row) for row in grid)


def _codes(bitmap: tuple[str, ...]) -> np.ndarray:
    return np.array([[_ALPHABET.index(ch) for ch in row] for row in bitmap])


def glyph_colors(bitmap: tuple[str, ...]) -> list[str]:
    """The colour names of a bitmap, most cells first."""
    letters = [ch for row in bitmap for ch in row if ch != "."]
    order = sorted(set(letters), key=lambda ch: (-letters.count(ch), "".join(PALETTE_LETTERS).index(ch)))
    return [PALETTE_LETTERS[ch] for ch in order]


def glyph_distance(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    """Cells that differ between two bitmaps under the best one-to-one swap of colours: the
    distance between their structures, whatever their colours."""
    ga, gb = _codes(a), _codes(b)
    ca, cb = [c for c in np.unique(ga) if c], [c for c in np.unique(gb) if c]
    best = GLYPH_CELLS * GLYPH_CELLS
    for target in itertools.permutations(cb + [-1] * len(ca), len(ca)):
        mapped = np.zeros_like(ga)
        for src, dst in zip(ca, target):
            mapped[ga == src] = dst
        best = min(best, int((mapped != gb).sum()))
    return best


def random_glyph(rng: np.random.Generator, holdout: list[WorldConcept] | None = None,
                 min_cells: int = 8) -> tuple[str, ...]:
    """A family glyph: one or two strokes in different colours, at least ``min_cells`` cells,
    never within ``HOLDOUT_DISTANCE`` of a concept in ``holdout``."""
    while True:
        colors = rng.choice(len(PALETTE_LETTERS), size=2, replace=False) + 1
        grid = np.where(_stroke(rng), colors[0], 0)
        if rng.random() < 0.6:
            grid = np.where(_stroke(rng), colors[1], grid)
        if (grid > 0).sum() < min_cells:
            continue
        bitmap = _letters(grid)
        if not holdout or all(glyph_distance(bitmap, c.bitmap) >= HOLDOUT_DISTANCE for c in holdout):
            return bitmap
