"""Event-driven ingest benchmark (not a test; issue 11, item 3): manifest landing -> training start.

In one run, on a fresh local stack (temporary directory, its own ports) and a fresh workspace,
`cns serve` learns datasets dropped one at a time with `cns drop`'s code (images, then the
manifest with its `cns-files` claim), twice:

1. **events on**: `cns serve` subscribed to the stack's event relay (CNS_EVENTS_URL/TOKEN), watch
   interval 3600 s, so only an event can start the pass;
2. **events off**: the same without CNS_EVENTS_URL (polling only), watch interval ``--interval``.

Latency = the manifest's upload returned -> the `score` task run started (the first step of
training, from the Prefect server). Each drop waits for the previous learn to finish. The learns
are the fewest steps the model can take: the latency does not depend on them.

    .venv/bin/python bench/ingest_bench.py [--drops 20] [--drops-off 5] [--interval 10] \
        [--write-docs docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from pipeline_bench import task_start  # bench/ is on the path: this file runs as a script
from sections import local_stack, publish

CNS = str(Path(sys.executable).parent / "cns")
FLOW_FINISHED = re.compile(r"(prefect\.flow_runs: |Flow run '[^']*' - )Finished in state")
FEWEST_STEPS = {"train": {"max_train_steps": 1, "reg_generic_prompts": 1},
                "scoring": {"num_score_samples": 1, "score_batch_size": 1},
                "generate": {"num_inference_steps": 1, "num_images_per_prompt": 1},
                "evaluate": {"prompts": ["a photo of a {token} {class_noun}"], "num_inference_steps": 1,
                             "num_images_per_prompt": 1, "loss_draws": 1, "recheck_per_version": 0}}


def make_dataset(root: Path, name: str, seed: int) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(directory / f"{i:02d}.png")
    (directory / "concept.yaml").write_text(yaml.safe_dump(
        {"name": name, "token": f"<{name}>", "class_noun": "thing"}))
    return directory


def complete(model_name: str, concept: str) -> bool:
    from mlflow import MlflowClient

    from tasks import tracking

    client = MlflowClient()
    experiment = client.get_experiment_by_name(model_name)
    if experiment is None:
        return False
    return bool(client.search_runs([experiment.experiment_id], f"tags.`cns.concept` = '{concept}' and "
                                   f"tags.`{tracking.STATE}` = 'complete'", max_results=1))


def idle(log_path: Path) -> bool:
    """Every flow run `cns serve` began has finished: the next drop finds the pipeline idle."""
    text = log_path.read_text(errors="replace")
    # in-process runs log through cns serve's handler, the runner's subprocesses in Prefect's format
    return text.count("Beginning flow run") == len(FLOW_FINISHED.findall(text))


def phase(label: str, ws, root: Path, drops: int, env: dict, settle_wait: float) -> list[float]:
    from tasks import bucket, s3

    log_path = root / f"serve-{label}.log"
    server = subprocess.Popen([CNS, "serve", "--workspace", str(ws.root)], env=env, stdout=open(log_path, "wb"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    latencies = []
    try:
        deadline = time.monotonic() + 300
        while not any(line in log_path.read_text(errors="replace") for line in ("bucket events from",
                                                                                  "found by polling")):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"`cns serve` did not start: {log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        time.sleep(settle_wait)  # deployments registered, the schedule's first (empty) pass over
        client, name = s3.client(), s3.bucket_name()
        model_name = ws.config().pipeline.model_name
        for i in range(drops):
            concept = f"{label}-{i:02d}"
            source = make_dataset(root / "src", concept, seed=hash(concept) % 10**6)
            # `cns drop`'s code: images first, then the manifest with its cns-files claim
            bucket.drop(client, name, source)
            landed = datetime.now(timezone.utc)
            started = None
            limit = time.monotonic() + 600
            while started is None:
                if server.poll() is not None or time.monotonic() > limit:
                    raise SystemExit(f"{concept} never started: {log_path.read_text(errors='replace')[-3000:]}")
                time.sleep(0.1)
                started = task_start("score", landed)
            latencies.append((started - landed).total_seconds())
            print(f"{label}: {concept} training started {latencies[-1]:.2f} s after its manifest landed", flush=True)
            while not complete(model_name, concept) or not idle(log_path):
                if server.poll() is not None or time.monotonic() > limit:
                    raise SystemExit(f"{concept} never completed: {log_path.read_text(errors='replace')[-3000:]}")
                time.sleep(0.5)
            # the next drop lands 2-5 s after this learn finished (the servers have written its logs and
            # artifacts), at an arbitrary moment of the poll cycle
            time.sleep(random.uniform(2, 5))
    finally:
        os.killpg(server.pid, 2)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
    return latencies


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return f"{statistics.median(values):.2f} | {p90:.2f} | {max(values):.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drops", type=int, default=20, help="drops with events on")
    parser.add_argument("--drops-off", type=int, default=5, help="drops with events off (polling)")
    parser.add_argument("--interval", type=int, default=10, help="watch interval with events off (s)")
    parser.add_argument("--write-docs", help="replace the ingest section of this markdown file")
    args = parser.parse_args()

    from tasks.versioning import init_workspace

    load = os.getloadavg()[0]  # what else the machine is doing changes these numbers
    tmp = Path(tempfile.mkdtemp(prefix="cns-ingest-bench-"))
    with local_stack(tmp, "ingest"):
        ws = init_workspace(tmp / "workspace")
        data = yaml.safe_load((ws.root / "params.yaml").read_text())
        for section, values in FEWEST_STEPS.items():
            data.setdefault(section, {}).update(values)
        (ws.root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        settle = os.environ.get("CNS_SETTLE_SECONDS", "10")
        on = phase("on", ws, tmp, args.drops, {**os.environ, "CNS_WATCH_INTERVAL": "3600",
                                                "CNS_SETTLE_SECONDS": settle}, settle_wait=15)
        off_env = {k: v for k, v in os.environ.items() if k not in ("CNS_EVENTS_URL", "CNS_EVENTS_TOKEN")}
        off = phase("off", ws, tmp, args.drops_off, {**off_env, "CNS_WATCH_INTERVAL": str(args.interval),
                                                     "CNS_SETTLE_SECONDS": settle}, settle_wait=args.interval + 15)

    median_on, median_off = statistics.median(on), statistics.median(off)
    lines = [
        "## Event-driven ingest (bench/ingest_bench.py)",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d}, {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), Python {platform.python_version()}, no GPU, load average "
        f"{load:.1f} at the start; one run, "
        f"fresh stack and workspace; `cns serve` learning datasets dropped one at a time with `cns drop`'s code "
        f"(settle time {settle} s, which the manifest's `cns-files` claim makes unnecessary). Latency: the "
        "manifest's upload returned -> the `score` task run started; each drop 2-5 s after the previous "
        "learn finished. "
        "Command: `.venv/bin/python bench/ingest_bench.py --write-docs docs/benchmarks.md`.",
        "",
        "| ingest | drops | median s | p90 s | max s |",
        "|---|---:|---:|---:|---:|",
        f"| events on (relay; watch interval 3600 s) | {len(on)} | {summary(on)} |",
        f"| events off (polling every {args.interval} s) | {len(off)} | {summary(off)} |",
        "",
        f"- Median with events {median_on:.2f} s against {median_off:.2f} s polling "
        f"({median_off / median_on:.1f}x faster). Target <= 3 s median over 20 drops: "
        f"**{'MET' if median_on <= 3 and len(on) >= 20 else 'MISSED'}**; with events off <= interval + 10 s = "
        f"{args.interval + 10} s for every drop: **{'MET' if max(off) <= args.interval + 10 else 'MISSED'}**.",
    ]
    publish(lines, args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
