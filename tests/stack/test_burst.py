"""A burst (issue 10): 50 small datasets uploaded in parallel (eight uploads at once, each dataset's
files in a random order, so the manifest is often not last) while two `cns serve` processes watch
one workspace. Every dataset is learned exactly once, each watch pass in arrival order, none
twice, none blocked: 50 versions, 0 duplicates, 0 gaps (stack_helpers.assert_learned_exactly_once).

The settle time is 2 s here (the other stack tests use 0), so a dataset whose images are still
arriving is never learned with part of them. The schedule is the fewest steps the tiny model can
take; the time from the first upload to the 50th registered version is printed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cns.lineage import read_lineage
from tasks import bucket, s3, tracking
from tasks.versioning import last_version

from stack_helpers import assert_learned_exactly_once, make_concept, own_workspace

pytestmark = pytest.mark.stack

DATASETS = 50
UPLOADS_AT_ONCE = 8
SERVERS = 2
# The least work a learn can do on the tiny model: one step of everything, one prompt, no re-checks.
FEWEST_STEPS = {"train": {"max_train_steps": 1, "reg_generic_prompts": 1},
                "scoring": {"num_score_samples": 1, "score_batch_size": 1},
                "generate": {"num_inference_steps": 1, "num_images_per_prompt": 1},
                "evaluate": {"prompts": ["a photo of a {token} {class_noun}"], "num_inference_steps": 1,
                             "num_images_per_prompt": 1, "loss_draws": 1, "recheck_per_version": 0}}
SERVE_ENV = {"CNS_WATCH_INTERVAL": "3", "CNS_SETTLE_SECONDS": "2", "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
DEADLINE_SECONDS = 2400


def upload(client, name: str, directory: Path, rng: random.Random) -> None:
    """One dataset, object by object, in a random order (as a parallel `aws s3 sync` may send it)."""
    files = sorted(directory.iterdir())
    rng.shuffle(files)
    for path in files:
        client.upload_file(str(path), name, f"{bucket.INCOMING}{directory.name}/{path.name}")


def complete_runs(model_name: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(model_name)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], f"tags.`{tracking.STATE}` = 'complete'", max_results=1000)


def stop(server: subprocess.Popen) -> None:
    """SIGINT to a `cns serve` process group this test started (as Ctrl-C would), SIGKILL after 60 s."""
    for sig, wait in ((signal.SIGINT, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.timeout(DEADLINE_SECONDS + 300)
def test_a_burst_of_50_parallel_uploads_with_two_watchers_is_learned_exactly_once(running_stack, tmp_path_factory):
    with own_workspace(tmp_path_factory, "burst", **FEWEST_STEPS) as (ws, name, root):
        names = [f"burst-{i:02d}" for i in range(DATASETS)]
        sources = [make_concept(root / "src", concept, seed=i + 1) for i, concept in enumerate(names)]
        cns = Path(sys.executable).parent / "cns"
        servers = [subprocess.Popen([str(cns), "serve", "--workspace", str(ws.root)], env={**os.environ, **SERVE_ENV},
                                    stdout=open(root / f"serve-{i}.log", "wb"), stderr=subprocess.STDOUT,
                                    start_new_session=True) for i in range(SERVERS)]
        try:
            start = time.monotonic()
            client = s3.client()
            rng = random.Random(10)
            with ThreadPoolExecutor(UPLOADS_AT_ONCE) as pool:
                list(pool.map(lambda d: upload(client, name, d, random.Random(rng.random())), sources))
            uploaded = time.monotonic() - start
            while len(complete_runs(name)) < DATASETS:
                assert all(s.poll() is None for s in servers), "a `cns serve` process ended: " + \
                    " | ".join((root / f"serve-{i}.log").read_text(errors="replace")[-3000:] for i in range(SERVERS))
                assert time.monotonic() - start < DEADLINE_SECONDS, \
                    f"{last_version(ws)} of {DATASETS} learned after {DEADLINE_SECONDS} s"
                time.sleep(2)
            elapsed = time.monotonic() - start
        finally:
            for server in servers:
                stop(server)
        print(f"\nburst: {DATASETS} datasets uploaded in {uploaded:.0f} s, all learned and registered "
              f"{elapsed:.0f} s after the first upload ({SERVERS} `cns serve` processes)")

        # Every pass learned what it found in arrival order: the manifest's time, then the name.
        arrived = {d.concept: (d.ready_at, d.concept) for d in bucket.scan(client, name, limits=ws.config().limits,
                                                                              lineage=None)}
        learned = [c.name for c in read_lineage(ws.model_dir).concepts]
        passes: dict[str, list[str]] = {}
        by_version = {int(r.data.tags[tracking.VERSION]): r for r in complete_runs(name)}
        for version, concept in enumerate(learned, start=1):
            passes.setdefault(by_version[version].data.tags["prefect.flow_run_id"], []).append(concept)
        for concepts in passes.values():
            assert concepts == sorted(concepts, key=arrived.__getitem__)
        print(f"burst: learned in {len(passes)} watch passes of {[len(c) for c in passes.values()]} datasets")
        assert_learned_exactly_once(ws, name, names, lock_wait=90)
