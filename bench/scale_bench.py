"""Scale benchmark (not a test): does adding concept N cost the same as adding concept 1?

On a fresh local stack (temporary directory, its own ports) and a fresh workspace on the tiny
model, N small concepts (each a sample subject's photos, made distinct by one pixel, with its
own token) are dropped and learned one after another through the pipeline's ``personalize``
flow, in this process. Per version: wall seconds of the flow run, the process's resident memory
after it, and the steps' own timings from the lineage. Writes a CSV and a plot.

    .venv/bin/python bench/scale_bench.py [--concepts 50] [--out docs/scale]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
SUBJECTS = ("dog", "cat2", "backpack", "teapot", "rc_car", "bear_plushie")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_concept(out: Path, index: int) -> Path:
    from PIL import Image

    subject = SUBJECTS[index % len(SUBJECTS)]
    folder = out / f"c{index:03d}"
    folder.mkdir(parents=True)
    for k, src in enumerate(sorted(p for p in (SAMPLES / subject).iterdir() if p.suffix == ".jpg")[:3]):
        image = Image.open(src).convert("RGB").resize((64, 64))
        image.putpixel((index % 64, k), (index % 256, 7 * index % 256, 13 * index % 256))  # distinct bytes
        image.save(folder / f"{k:02d}.png")
    (folder / "concept.yaml").write_text(f"name: c{index:03d}\ntoken: '<c{index:03d}>'\nclass_noun: thing\n")
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=50)
    parser.add_argument("--out", default="docs/scale")
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", CNS_SETTLE_SECONDS="0")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "CNS_STACK_DIR", "CNS_WORKSPACE"):
        os.environ.pop(var, None)
    import torch
    import yaml

    torch.set_num_threads(1)
    from tasks import bucket, s3, stack
    from tasks.versioning import init_workspace

    tmp = Path(tempfile.mkdtemp(prefix="cns-scale-bench-"))
    base = random.randrange(22000, 24000, 7)
    config = stack.StackConfig.resolve(root=tmp / "stack", ports={"s3": base, "mlflow": base + 3100,
                                                                   "prefect": base + 3200, "events": base + 3300}, bucket="scale")
    _, creds = stack.up(config, timeout=180)
    os.environ.update(stack.client_env(config, creds, with_secret=True))
    client = s3.client()  # `up` made the bucket
    ws = init_workspace(tmp / "workspace", bucket="scale")
    params = yaml.safe_load((ws.root / "params.yaml").read_text())
    params["model"]["device"] = "cpu"
    params["train"].update(max_train_steps=5)
    params["scoring"].update(num_score_samples=4, score_batch_size=2)
    params["evaluate"].update(num_images_per_prompt=1, num_inference_steps=3, loss_draws=4)
    params["pipeline"]["model_name"] = f"scale-{base}"
    (ws.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    from flows.pipeline import personalize
    from cns.lineage import read_lineage

    rows = []
    try:
        for i in range(args.concepts):
            folder = make_concept(tmp / "concepts", i)
            bucket.drop(client, "scale", folder)
            start = time.perf_counter()
            outcome = personalize(folder.name, str(ws.root))
            seconds = time.perf_counter() - start
            if outcome.get("outcome") != "learned":
                raise RuntimeError(f"{folder.name}: {outcome}")
            record = read_lineage(ws.model_dir).find(folder.name)
            rows.append({"version": record.version, "seconds": round(seconds, 2), "rss_mb": round(rss_mb(), 1),
                         **{f"step_{k}_s": round(v, 3) for k, v in record.stats["timings"].items()}})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        stack.down(config)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scale.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    first, last = rows[:5], rows[-5:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    summary = {"concepts": len(rows), "machine": f"{platform.machine()}, 1 torch thread",
               "seconds_first5": round(mean(first, "seconds"), 2), "seconds_last5": round(mean(last, "seconds"), 2),
               "ratio": round(mean(last, "seconds") / mean(first, "seconds"), 3),
               "rss_first5_mb": round(mean(first, "rss_mb"), 1), "rss_last5_mb": round(mean(last, "rss_mb"), 1)}
    (out / "scale.json").write_text(json.dumps(summary, indent=1) + "\n")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.5))
    for k, (key, label) in enumerate((("seconds", "seconds per version"), ("rss_mb", "resident memory (MB)"))):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.plot([r["version"] for r in rows], [r[key] for r in rows], marker=".")
        ax.set(xlabel="model version (concepts learned)", ylabel=label, ylim=(0, None))
    FigureCanvasAgg(fig)
    fig.savefig(out / "scale.png", dpi=100, bbox_inches="tight")
    print(json.dumps(summary))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
