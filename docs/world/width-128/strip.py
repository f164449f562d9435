"""Samples of the same base captions and noise from the 64-wide model and an export of the
128-wide one, one row each, for the record of how far its pretraining has come:

    HF_HUB_OFFLINE=1 .venv/bin/python docs/world/width-128/strip.py STEP

writes docs/world/width-128/strip-STEP.png (rows: fresh renders, data/world/model, data/world/model-128;
eight held-out captions, then four three-object captions in world.scene.CORNERS).
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from cns.models import load_pretrained
from world.metrics import base_prompts, sample
from world.scene import CORNERS, SIZE, Obj, Scene, caption, render, seen_pairs

HERE = Path(__file__).parent
step = sys.argv[1]
ones = [([Obj(shape, color)], bg) for shape, color, bg in base_prompts("heldout")[::4][:8]]
pairs = seen_pairs()
threes = [([Obj(*pairs[(5 * t + 7 * k) % len(pairs)]) for k in range(3)], ["gray", "black", "white", "teal"][t])
          for t in range(4)]
prompts = [caption(objects, bg) for objects, bg in ones + threes]
seeds = list(range(20_000, 20_000 + len(prompts)))
truth = [render(Scene(o, bg, [(3, 3, 26)])) for o, bg in ones]
truth += [render(Scene(o, bg, [(left + 1, top + 1, SIZE // 2 - 3) for left, top in CORNERS])) for o, bg in threes]
rows = [np.concatenate(truth, 1)]
for folder in ("data/world/model", "data/world/model-128"):
    rows.append(np.concatenate(list(sample(load_pretrained(folder), prompts, seeds)), 1))
grid = np.concatenate(rows, 0)
Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(HERE / f"strip-{step}.png")
print("\n".join(prompts))
