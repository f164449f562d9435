"""Three shapes in one image, with and without region control, on a world model: can the model
draw three objects at all, so that three learned concepts in one image can be measured on it?
Base shapes, seen pairs ("a red circle and a green square and a blue cross on a black
background"), laid out as the three-object pretraining scenes are (world.scene.CORNERS: top left,
top right, bottom centre); with regions, each cell also reads its own one-shape caption and the
global prompt keeps ``base`` of the weight inside (cns.regions). Each cell is cut out and read by
the judge (world.judge.cells). Run from the repository root:

    HF_HUB_OFFLINE=1 .venv/bin/python docs/world/regions-three-2026-12-08/regions_three.py [--model DIR]

Writes results-<model folder>.md and grid-<model folder>.png here (rows: true renders, no
regions, then each base; 4 prompts x 3 noise seeds each).
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from cns.models import load_pretrained
from world.judge import cells, load_judge
from world.metrics import sample
from world.scene import CORNER_BOXES, CORNERS, SIZE, Obj, Scene, caption, render, seen_pairs

HERE = Path(__file__).parent
BASES = (0.0, 0.4, 0.6, 0.8)
BACKGROUNDS = ("black", "white", "gray", "teal")
TRIALS, SEEDS = 16, 3

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="data/world/model")
args = parser.parse_args()
name = Path(args.model).name
model = load_pretrained(args.model)
judge = load_judge()
pairs = seen_pairs()  # shape-colour pairs the model was pretrained on, three shapes that differ a prompt
scenes = []
for t in range(TRIALS):
    rng = np.random.default_rng(t)
    chosen: list[tuple[str, str]] = []
    while len(chosen) < 3:
        pair = pairs[int(rng.integers(len(pairs)))]
        if pair[0] not in [c[0] for c in chosen]:
            chosen.append(pair)
    scenes.append(([Obj(*pair) for pair in chosen], BACKGROUNDS[t % 4]))


def score(images: list[np.ndarray], objects: list[Obj]) -> tuple[int, int, int]:
    reads = judge.read(np.stack([c for image in images for c in cells(image, list(CORNER_BOXES))]))
    shape = all_right = 0
    for i in range(len(images)):
        right = [r["identity"] == o.shape for r, o in zip(reads[3 * i:3 * i + 3], objects)]
        shape += sum(right)
        all_right += all(right)
    return shape, all_right, len(images)


rows, strips = [], []
for base in ("truth", None, *BASES):
    shape = all_right = n = 0
    shown = []
    for t, (objects, bg) in enumerate(scenes):
        if base == "truth":  # the judge's own limit: true renders of the same layout, 13 px objects
            boxes = [(left + 1, top + 1, SIZE // 2 - 3) for left, top in CORNERS]
            images = [render(Scene(objects, bg, boxes))] * SEEDS
        else:
            regions = None if base is None else [(box, caption([o], bg)) for box, o in zip(CORNER_BOXES, objects)]
            images = list(sample(model, [caption(objects, bg)] * SEEDS, [100 * t + s for s in range(SEEDS)],
                                 regions=regions, region_base=base or 0.0))
        s, a, k = score(images, objects)
        shape, all_right, n = shape + s, all_right + a, n + k
        if t < 4:
            shown.append(np.concatenate(images, 1))
    label = "true renders" if base == "truth" else "no regions" if base is None else f"regions, base {base:g}"
    rows.append((label, shape / (3 * n), all_right / n))
    strips.append(np.concatenate(shown, 1))
    print(*rows[-1], flush=True)

lines = [f"# Three shapes in one image on `{args.model}` (regions_three.py)", "",
         f"{TRIALS} three-shape prompts x {SEEDS} noise seeds, 20 DDIM steps, guidance 3; layout world.scene.CORNERS "
         "(top left, top right, bottom centre); each cell read by the judge.", "",
         "| what | shape right (per object) | all three right |", "|---|---|---|"]
lines += [f"| {label} | {s:.2f} | {a:.2f} |" for label, s, a in rows]
(HERE / f"results-{name}.md").write_text("\n".join(lines) + "\n")
grid = np.concatenate(strips, 0)
Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(HERE / f"grid-{name}.png")
