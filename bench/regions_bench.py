"""Region control's cost: sampling time with two regional prompts against none, same prompts,
seeds and steps, on the benchmark world's pixel-space model (alternating runs, median of each).

    python bench/regions_bench.py [--images 48] [--steps 20] [--repeats 3]
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
    args = parser.parse_args()
    from cns.generate import sample_pixels
    from cns.models import load_pretrained

    model = load_pretrained(str(ROOT / "data" / "world" / "model"))
    prompt = "a red circle and a blue square on a gray background"
    regions = [((0.0, 0.0, 0.5, 1.0), "a red circle on a gray background"),
               ((0.5, 0.0, 1.0, 1.0), "a blue square on a gray background")]
    seeds = list(range(args.images))
    times = {"plain": [], "regions": []}
    for _ in range(args.repeats):
        for kind in times:
            start = time.perf_counter()
            sample_pixels(model, [prompt] * args.images, seeds, num_inference_steps=args.steps, guidance_scale=3.0,
                          regions=regions if kind == "regions" else None)
            times[kind].append(time.perf_counter() - start)
    plain, regional = statistics.median(times["plain"]), statistics.median(times["regions"])
    print(json.dumps({"images": args.images, "steps": args.steps, "threads": torch.get_num_threads(),
                      "machine": platform.machine(), "plain_s": round(plain, 2), "regions_s": round(regional, 2),
                      "ratio": round(regional / plain, 3), "all": times}, indent=1))


if __name__ == "__main__":
    main()
