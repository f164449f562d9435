"""Region control's cost: sampling time with two regional prompts against none, same prompts,
seeds and steps, on the benchmark world's pixel-space model (alternating runs, median of each),
for each global-prompt share inside the regions (``--region-base``, generate.region_base).

    python bench/regions_bench.py [--images 48] [--steps 20] [--repeats 3] [--region-base 0,0.6]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--region-base", default="0,0.6", help="comma-separated shares, each timed against plain")
    args = parser.parse_args()
    bases = [float(b) for b in args.region_base.split(",")]
    from cns.generate import sample_pixels
    from cns.models import load_pretrained

    model = load_pretrained(str(ROOT / "data" / "world" / "model"))
    prompt = "a red circle and a blue square on a gray background"
    regions = [((0.0, 0.0, 0.5, 1.0), "a red circle on a gray background"),
               ((0.5, 0.0, 1.0, 1.0), "a blue square on a gray background")]
    seeds = list(range(args.images))
    kinds = {"plain": None, **{f"regions base {b:g}": b for b in bases}}  # name -> share (None: no regions)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.repeats):
        for kind, base in kinds.items():
            start = time.perf_counter()
            sample_pixels(model, [prompt] * args.images, seeds, num_inference_steps=args.steps, guidance_scale=3.0,
                          regions=None if base is None else regions, region_base=base or 0.0)
            times[kind].append(time.perf_counter() - start)
    medians = {kind: statistics.median(t) for kind, t in times.items()}
    print(json.dumps({"images": args.images, "steps": args.steps, "threads": torch.get_num_threads(),
                      "machine": platform.machine(), "median_s": {k: round(v, 2) for k, v in medians.items()},
                      "ratio": {k: round(v / medians["plain"], 3) for k, v in medians.items() if k != "plain"},
                      "all": times}, indent=1))


if __name__ == "__main__":
    main()
