"""Parallel lineages benchmark (not a test; issue 14, item 2): the same work on 1 and on 2 workers.

In one run, on a fresh local stack (temporary directory, its own ports): the ``lineage`` flow
deployed to a process work pool; then twice, with 1 worker and with 2 (``prefect worker start
--limit 1``, one torch thread each), 3 new lineages (``cns lineage create``, each its own bucket)
get 5 datasets each and one queued pass each (``cns lineage run``). Wall time = queued -> the last
flow run finished. Each phase is checked: 15 versions published (``git/model-v1..5.bundle`` per
lineage), each lineage's concepts exactly the 5 dropped, no duplicate.

    .venv/bin/python bench/lineages_bench.py [--lineages 3] [--datasets 5] [--steps 4] \
        [--write-docs docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from ingest_bench import make_dataset  # bench/ is on the path: this file runs as a script
from sections import local_stack, publish

PREFECT = str(Path(sys.executable).parent / "prefect")


def lineage_params(path: Path, steps: int) -> Path:
    from tasks.versioning import PROJECT_ROOT

    data = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    for section, values in {"train": {"max_train_steps": steps},
                            "scoring": {"num_score_samples": 2, "score_batch_size": 2},
                            "evaluate": {"num_inference_steps": 2, "num_images_per_prompt": 1,
                                         "loss_draws": 2}}.items():
        data[section].update(values)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def phase(workers: int, pool: str, tmp: Path, lineages_count: int, datasets: int, steps: int) -> dict:
    from cns.lineage import read_lineage
    from flows.serve import run_lineages
    from prefect.client.orchestration import get_client
    from tasks import bucket, lineages, s3

    names = [f"bench{workers}w-{k}-{time.time_ns() % 10**6}" for k in range(lineages_count)]
    params = lineage_params(tmp / f"params-{workers}.yaml", steps)
    dropped = {}
    for name in names:
        lineages.create(name, name, params)
        dropped[name] = [f"{name.split('-')[0]}-{k}-c{i}" for k, i in
                         ((names.index(name), i) for i in range(datasets))]
        for i, concept in enumerate(dropped[name]):
            bucket.drop(s3.client(), name, make_dataset(tmp / f"src{workers}", concept, seed=1000 * workers + i))
    procs = [subprocess.Popen([PREFECT, "worker", "start", "--pool", pool, "--limit", "1"],
                              env={**os.environ, "CNS_LINEAGES_DIR": str(tmp / f"w{workers}-{w}"),
                                   "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                              stdout=open(tmp / f"w{workers}-{w}.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True) for w in range(workers)]
    time.sleep(5)  # the workers' start-up is not the work
    try:
        start = time.monotonic()
        ids = run_lineages(names)
        with get_client(sync_client=True) as client:
            while True:
                runs = [client.read_flow_run(i) for i in ids]
                if all(r.state and r.state.is_final() for r in runs):
                    break
                time.sleep(1)
        seconds = time.monotonic() - start
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=60)
    states = [r.state.type.value for r in runs]
    versions, duplicates = 0, 0
    for name in names:
        head = lineages.published(s3.client(), name)
        versions += head[0] if head else 0
        os.environ["CNS_BUCKET"] = name
        os.environ["CNS_LINEAGES_DIR"] = str(tmp / "check")
        ws = lineages.checkout(name)
        lineages.sync(ws)
        learned = [c.name for c in read_lineage(ws.model_dir).concepts]
        duplicates += len(learned) - len(set(learned))
        assert sorted(learned) == sorted(dropped[name]), (name, learned)
    return {"workers": workers, "seconds": round(seconds, 1), "states": states, "versions": versions,
            "duplicates": duplicates}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lineages", type=int, default=3)
    parser.add_argument("--datasets", type=int, default=5, help="datasets per lineage")
    parser.add_argument("--steps", type=int, default=4, help="train.max_train_steps of each learn")
    parser.add_argument("--write-docs", help="replace the lineages section of this markdown file")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="cns-lineages-bench-"))
    with local_stack(tmp, "lineages-bench"):
        from flows.serve import deploy_lineage

        pool = "bench-lineages"
        deploy_lineage(pool)
        one = phase(1, pool, tmp, args.lineages, args.datasets, args.steps)
        print(json.dumps(one), flush=True)
        two = phase(2, pool, tmp, args.lineages, args.datasets, args.steps)
        print(json.dumps(two), flush=True)
    total = args.lineages * args.datasets
    ratio = two["seconds"] / one["seconds"]
    ok = all(p["versions"] == total and p["duplicates"] == 0 and set(p["states"]) == {"COMPLETED"}
             for p in (one, two))
    lines = [
        "## Parallel lineages on a work pool",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d}, {os.cpu_count()} CPU cores ({platform.machine()}), Python "
        f"{platform.python_version()}, no GPU, load average {load:.1f} at the start; one run, fresh local stack "
        f"(S3, MLflow and Prefect servers on the same cores as the workers). {args.lineages} lineages x "
        f"{args.datasets} datasets (tiny model, {args.steps} training steps, each lineage its own bucket), one "
        "queued `lineage` pass per lineage, process workers with `--limit 1` and one torch thread each. Wall time = "
        "queued -> last flow run finished. Command: `.venv/bin/python bench/lineages_bench.py --write-docs "
        "docs/benchmarks.md`.",
        "",
        "| workers | wall time (s) | versions | duplicates | flow runs |",
        "|---|---|---|---|---|",
        *(f"| {p['workers']} | {p['seconds']} | {p['versions']} of {total} | {p['duplicates']} | "
          f"{', '.join(sorted(set(p['states'])))} |" for p in (one, two)),
        "",
        f"- 2 workers / 1 worker: **{ratio:.2f}x** the wall time (target <= 0.75): "
        f"**{'MET' if ratio <= 0.75 else 'NOT MET'}**; versions and duplicates: {'as required' if ok else 'WRONG'}.",
        f"- {args.lineages} equal passes on 2 workers would take {((args.lineages + 1) // 2) / args.lineages:.2f}x "
        "from the learning alone (one worker takes a second lineage while the other finishes its first); each "
        "worker also waits up to its polling interval (`PREFECT_WORKER_QUERY_SECONDS`, 10 s) before a queued "
        "run and starts a process per run, which 2 workers overlap, and the servers share the same 2 cores.",
    ]
    publish(lines, args.write_docs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
