"""Region control's base share on the world model, chosen on base shapes (not on the concepts it is
later measured with). Two shapes per image, left and right, "a red circle and a green square on a
black background"; with regions, each half also reads its own single-shape caption, and the global
prompt keeps ``base`` of the weight inside the halves (cns.regions). Each half is cropped and read
back by the judge (shape, colour). Run from the repository root:

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python docs/world/regions-base-2026-11-28/regions_base.py

Writes results.md and grid.png (rows: no regions, then each base; 3 noise seeds of 4 prompts) here.
"""

from pathlib import Path

import numpy as np
from PIL import Image

from cns.models import load_pretrained
from cns.regions import NAMED
from world.judge import halves, load_judge
from world.metrics import sample
from world.scene import Obj, caption

HERE = Path(__file__).parent
BASES = (0.0, 0.4, 0.5, 0.6, 0.7, 0.8)
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = ("red", "green", "blue", "yellow")
BACKGROUNDS = ("black", "white", "gray", "teal")
TRIALS, SEEDS = 16, 3

model = load_pretrained("data/world/model")
judge = load_judge()
scenes = [([Obj(SHAPES[(t + j) % 5], COLORS[(t * 2 + j) % 4]) for j in range(2)], BACKGROUNDS[t % 4])
          for t in range(TRIALS)]
rows, strips = [], []
for base in (None, *BASES):
    shape = color = both = 0
    images = []
    for t, (objects, bg) in enumerate(scenes):
        regions = None if base is None else [(NAMED[side], caption([o], bg)) for side, o in zip(("left", "right"), objects)]
        im = sample(model, [caption(objects, bg)] * SEEDS, [100 * t + s for s in range(SEEDS)], regions=regions,
                    region_base=base or 0.0)
        reads = judge.read(np.stack([h for image in im for h in halves(image)]))
        for i in range(SEEDS):
            pair = reads[2 * i:2 * i + 2]
            right = [r["identity"] == o.shape for r, o in zip(pair, objects)]
            shape += sum(right)
            color += sum(r["color"] == o.color for r, o in zip(pair, objects))
            both += all(right)
        images.append(im)
    n = TRIALS * SEEDS
    rows.append(("no regions" if base is None else f"{base:g}", shape / (2 * n), color / (2 * n), both / n))
    strips.append(np.concatenate([np.concatenate(list(images[t]), 1) for t in range(4)], 1))
    print(*rows[-1], flush=True)

lines = ["# Region control's base share on the world model (2026-11-28)", "",
         f"{TRIALS} two-shape prompts x {SEEDS} noise seeds, 20 DDIM steps, guidance 3; each half read by the judge.",
         "Chosen here, on base shapes, before any concept pair is read: the benchmark's `region_base`.", "",
         "| base share | shape right (per half) | colour right (per half) | both shapes right |", "|---|---|---|---|"]
lines += [f"| {name} | {s:.2f} | {c:.2f} | {b:.2f} |" for name, s, c, b in rows]
(HERE / "results.md").write_text("\n".join(lines) + "\n")
grid = np.concatenate(strips, 0)
Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(HERE / "grid.png")
