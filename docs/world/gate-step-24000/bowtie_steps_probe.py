"""Bowtie ceiling probe on the finished world model: all-K/V (single_kv, alone), lr 1e-2, token lr
5e-2, seed 0, with more steps than the gate's 200. Run from the repository root after a gate run
whose cache holds the pretrained model's zero-shot strip:

    .venv/bin/cns bench world --sweep gate --out /tmp/gate24k/out --cache /tmp/gate24k/cache
    HF_HUB_OFFLINE=1 .venv/bin/python docs/world/gate-step-24000/bowtie_steps_probe.py 400 800
"""

import json
import sys
from pathlib import Path

from world.bench import BenchSettings, Hyper, context, load_images, run_method
from world.scene import load_concepts
from world.sweeps import _alone

cache = Path("/tmp/gate24k/cache")
work = Path("/tmp/probe24k/work")
concepts = [c for c in load_concepts() if c.name == "bowtie"]
ctx = context(BenchSettings(base_ratio=0.06, cns={}), concepts, work, "cpu")  # the settings it ran with
base_images = load_images(cache / "pretrained-zero-shot.png")
out = {}
for steps in [int(s) for s in sys.argv[1:]]:
    run = run_method(_alone("single_kv"), 0, ctx, base_images, Path(f"/tmp/probe24k/bowtie-{steps}.png"),
                     hyper=Hyper(1e-2, 5e-2, steps))
    out[steps] = run["final"][0] | {"train_seconds": run["train_seconds"]}
    print(steps, json.dumps(out[steps]), flush=True)
Path("/tmp/probe24k/probe.json").write_text(json.dumps(out, indent=1))
