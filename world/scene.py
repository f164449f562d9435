"""What the world holds and how it is drawn.

A scene is one or two objects on a plain background, 32x32 RGB. An object is a base shape
(circle, square, triangle, diamond, cross) in one of six colours, or a *concept*: a novel glyph
with its own colours, drawn from an 8x8 bitmap in data/world/concepts.yaml, never seen in
pretraining. Captions read "a red circle on a gray background" and "a red circle and a blue
square on a gray background" (first object on the left). Size and position vary and are not
captioned, so a prompt leaves them to the model, as a real prompt leaves the pose.

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
        """(mask (n, n), rgb) per colour of the glyph, scaled to n pixels (nearest)."""
        grid = np.array([list(row) for row in self.bitmap])
        idx = (np.arange(n) * grid.shape[0] // n)
        grid = grid[idx][:, idx]
        return [((grid == letter).astype(np.float32), COLORS[color])
                for letter, color in PALETTE_LETTERS.items() if (grid == letter).any()]


@dataclass(frozen=True)
class Obj:
    """One object to draw: a base shape in a colour, or a concept (its own colours)."""

    shape: str | None = None
    color: str | None = None
    concept: WorldConcept | None = None

    def words(self) -> str:
        if self.concept is not None:
            return f"{self.concept.token} {self.concept.class_noun}"
        return f"{self.color} {self.shape}"

    @property
    def identity(self) -> str:
        return self.concept.name if self.concept is not None else self.shape


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
        if item["class_noun"] not in SHAPES:
            raise CNSError(path, f"{where} ({item['name']}): class_noun must be one of {', '.join(SHAPES)}",
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
        else:
            layers = [(shape_mask(obj.shape, n), COLORS[obj.color])]
        y0, x0 = top * SUPERSAMPLE, left * SUPERSAMPLE
        region = canvas[y0:y0 + n, x0:x0 + n]
        for mask, rgb in layers:
            region[:] = region * (1 - mask[..., None]) + np.asarray(rgb, np.float32) * mask[..., None]
    small = canvas.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(small.round(), 0, 255).astype(np.uint8)


def place(objects: list[Obj], background: str, rng: np.random.Generator) -> Scene:
    """Random size and position: one object anywhere, two objects in the left and right halves."""
    boxes = []
    if len(objects) == 1:
        size = int(rng.integers(14, 23))
        boxes.append((int(rng.integers(1, SIZE - size)), int(rng.integers(1, SIZE - size)), size))
    else:
        half = SIZE // len(objects)
        for k in range(len(objects)):
            size = int(rng.integers(11, 15))
            boxes.append((k * half + int(rng.integers(0, half - size + 1)), int(rng.integers(2, SIZE - size - 1)), size))
    return Scene(objects=objects, background=background, boxes=boxes)


def random_base_scene(rng: np.random.Generator, two_object_rate: float = 0.25,
                      pairs: list[tuple[str, str]] | None = None) -> Scene:
    """A pretraining scene: seen (shape, colour) pairs only, unless ``pairs`` says otherwise."""
    pairs = pairs or seen_pairs()
    count = 2 if rng.random() < two_object_rate else 1
    objects = [Obj(*pairs[int(rng.integers(len(pairs)))]) for _ in range(count)]
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return place(objects, background, rng)


def concept_training_scenes(concept: WorldConcept, count: int, seed: int) -> list[Scene]:
    """A concept's personalization photos: varied backgrounds (no two alike), sizes and positions."""
    rng = np.random.default_rng([seed, zlib.crc32(concept.name.encode())])
    backgrounds = list(rng.permutation(list(BACKGROUNDS)))[:count]
    return [place([Obj(concept=concept)], str(bg), rng) for bg in backgrounds]
