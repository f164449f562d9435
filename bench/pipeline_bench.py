"""Pipeline benchmark (not a test): what orchestration, tracking and versioning cost per concept.

In one run, on a fresh local stack (temporary directory, its own ports) and a fresh workspace:

1. ``cns learn`` of a sample concept into an empty model directory (a subprocess, as a user runs
   it) against ``cns run-once`` learning the same concept from the bucket (subprocess): the
   difference is what the pipeline adds (bucket, validation, evaluation, MLflow, DVC, git).
2. The DVC remote's bytes after each version against the concept's own files.
3. ``cns serve`` with a 10 s watch interval: from the manifest landing in the bucket to the
   ``score`` task starting (the first step of training).

    .venv/bin/python bench/pipeline_bench.py [--interval 10] [--write-docs docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from sections import publish  # bench/ is on the path: this file runs as a script

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
CNS = str(Path(sys.executable).parent / "cns")


def timed(cmd: list[str], **kw) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    return time.perf_counter() - start


def remote_bytes(client, bucket: str) -> int:
    from tasks.bucket import list_objects

    return sum(o.size for o in list_objects(client, bucket, "dvc/"))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def task_start(name: str, after: datetime) -> datetime | None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterStartTime

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(like_=name), start_time=TaskRunFilterStartTime(after_=after)))
    starts = [r.start_time for r in runs if r.start_time]
    return min(starts) if starts else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=int, default=10, help="watch interval for the latency measure (s)")
    parser.add_argument("--write-docs", help="replace the pipeline section of this markdown file")
    args = parser.parse_args()

    os.environ.update(HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "CNS_STACK_DIR", "CNS_WORKSPACE"):
        os.environ.pop(var, None)
    from tasks import bucket, s3, stack
    from tasks.versioning import init_workspace

    tmp = Path(tempfile.mkdtemp(prefix="cns-pipeline-bench-"))
    base = random.randrange(20000, 22000, 7)
    config = stack.StackConfig.resolve(root=tmp / "stack", ports={"s3": base, "mlflow": base + 3100,
                                                                   "prefect": base + 3200, "events": base + 3300}, bucket="bench")
    print(f"stack in {tmp}", flush=True)
    _, creds = stack.up(config, timeout=120)
    os.environ.update(stack.client_env(config, creds, with_secret=True))
    rows = []
    try:
        client = s3.client()
        ws = init_workspace(tmp / "workspace")
        concepts = ["dog", "cat2", "teapot"]
        # 1 + 2: the same concept alone and through the pipeline, one after the other.
        for name in concepts[:2]:
            learn_s = timed([CNS, "learn", str(SAMPLES / name), "--model-dir", str(tmp / f"alone-{name}"), "-q",
                             "--set", f"cache_dir={tmp / 'cache'}"])
            before = remote_bytes(client, config.bucket)
            bucket.drop(client, config.bucket, SAMPLES / name)
            pipeline_s = timed([CNS, "run-once", "--workspace", str(ws.root)])
            added = remote_bytes(client, config.bucket) - before
            own = folder_bytes(ws.model_dir / "concepts" / name) + folder_bytes(ws.concepts_dir / name)
            rows.append({"concept": name, "learn_s": learn_s, "pipeline_s": pipeline_s,
                         "remote_added": added, "own_files": own, "model_bytes": folder_bytes(ws.model_dir)})
            print(rows[-1], flush=True)
        # 3: latency from the manifest landing to training starting, under `cns serve`.
        env = dict(os.environ, CNS_WATCH_INTERVAL=str(args.interval))
        serve = subprocess.Popen([CNS, "serve", "--workspace", str(ws.root)], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            time.sleep(args.interval + 15)  # deployments registered and the first pass done
            landed = datetime.now(timezone.utc)
            bucket.drop(client, config.bucket, SAMPLES / concepts[2])
            started = None
            deadline = time.monotonic() + args.interval + 240
            while started is None and time.monotonic() < deadline:
                time.sleep(0.5)
                started = task_start("score", landed)
            latency = (started - landed).total_seconds() if started else float("nan")
        finally:
            os.killpg(serve.pid, 15)
            serve.wait(timeout=30)
    finally:
        stack.down(config)

    lines = [
        "## Pipeline overhead, storage and latency (bench/pipeline_bench.py)",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d}, {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), Python {platform.python_version()}, no GPU; tiny base model, "
        "params.yaml defaults (200 training steps, evaluation 2 prompts x 2 images x 25 steps per concept). "
        "Command: `.venv/bin/python bench/pipeline_bench.py --write-docs docs/benchmarks.md`.",
        "",
        "| concept | `cns learn` s | `cns run-once` s | added by the pipeline s | ratio | DVC remote added | "
        "concept's own files (delta, mask, reference, dataset) | whole model dir |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['concept']} | {r['learn_s']:.1f} | {r['pipeline_s']:.1f} | "
                     f"{r['pipeline_s'] - r['learn_s']:.1f} | {r['pipeline_s'] / r['learn_s']:.2f} | "
                     f"{r['remote_added'] / 1024:.0f} KiB | {r['own_files'] / 1024:.0f} KiB | "
                     f"{r['model_bytes'] / 1024:.0f} KiB |")
    worst = max(r["pipeline_s"] - r["learn_s"] for r in rows)
    lines += [
        "",
        f"- Orchestration + tracking + versioning per concept: at most {worst:.1f} s over `cns learn` "
        f"(target <= 15 s): **{'MET' if worst <= 15 else 'MISSED'}**. Both are fresh processes (imports "
        "included); the pipeline's share includes the whole-model evaluation of every concept so far "
        "(fixed-seed samples, held-out loss), the MLflow run with its artifacts, `dvc add`/`push` and the git commit.",
        f"- Manifest landing -> `score` starting under `cns serve` with a {args.interval} s watch interval: "
        f"{latency:.1f} s (target <= interval + 10 s = {args.interval + 10} s): "
        f"**{'MET' if latency <= args.interval + 10 else 'MISSED'}**.",
        "- DVC remote per version: the new concept's files plus its dataset plus the small lineage/.dir "
        "entries, not a copy of the model (DVC stores files by content; unchanged files of earlier concepts "
        "are not uploaded again).",
    ]
    publish(lines, args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
