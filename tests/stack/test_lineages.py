"""Many lineages, learned by the workers of one Prefect work pool, sharing nothing but S3, MLflow and
Prefect (issue 14, item 2): each lineage lives in its bucket (its git history as bundles, its
model and datasets on the DVC remote), each worker clones it into a folder of its own, and each
version is published with a compare-and-swap on the tag."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks import bucket, lineages, s3
from tasks.versioning import PROJECT_ROOT, git

from stack_helpers import assert_learned_exactly_once, make_concept

pytestmark = pytest.mark.stack

FAST = {"train": {"max_train_steps": 4}, "scoring": {"num_score_samples": 2, "score_batch_size": 2},
        "evaluate": {"num_inference_steps": 2, "num_images_per_prompt": 1, "loss_draws": 2}}


def fast_params(path: Path) -> Path:
    data = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    for section, values in FAST.items():
        data[section].update(values)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@contextlib.contextmanager
def env(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def new_lineage(tmp_path: Path, prefix: str) -> str:
    name = f"{prefix}-{time.time_ns() % 10**9}"
    assert lineages.create(name, name, fast_params(tmp_path / f"{name}.yaml")) == 0
    return name


def clone(bucket_name: str, folder: Path):
    """A fresh clone of the lineage, at its newest published version."""
    with env(CNS_LINEAGES_DIR=str(folder), CNS_BUCKET=bucket_name):
        ws = lineages.checkout(bucket_name)
        lineages.sync(ws)
        return ws


def test_a_lineage_is_created_once_and_a_version_is_published_by_one_writer_only(running_stack, tmp_path):
    from cns.errors import CNSError

    name = new_lineage(tmp_path, "cas")
    with pytest.raises(CNSError, match="already holds a lineage"):
        lineages.create(name, name)
    first, second = clone(name, tmp_path / "one"), clone(name, tmp_path / "two")
    for ws, text in ((first, "first"), (second, "second")):  # both make model-v1
        (ws.root / "metrics").mkdir(exist_ok=True)
        (ws.root / "metrics" / "note.txt").write_text(text)
        git(ws, "add", "metrics/note.txt")
        git(ws, "commit", "-q", "-m", f"model v1: {text}")
        git(ws, "tag", "model-v1")
    with env(CNS_BUCKET=name):
        lineages.publish(first, 1)
        lineages.publish(first, 1)  # a retry of the same commit: its own bundle, no error
        with pytest.raises(lineages.LineageConflict, match="published by another worker"):
            lineages.publish(second, 1)
        assert lineages.published(s3.client(), name) == (1, git(first, "rev-parse", "HEAD"))
        assert lineages.sync(second)  # the loser's clone becomes the winner's version
    assert git(second, "rev-parse", "HEAD") == git(first, "rev-parse", "HEAD")
    assert (second.root / "metrics" / "note.txt").read_text() == "first"
    assert git(second, "tag", "--list", "model-v*") == "model-v1"
    (second.root / ".git" / lineages.SYNCING).write_text("1\n")  # a sync killed half-way ...
    with env(CNS_BUCKET=name):
        assert lineages.sync(second)  # ... is done again, not trusted
    assert not (second.root / ".git" / lineages.SYNCING).exists()


def test_a_pass_killed_before_publishing_leaves_no_version_and_the_next_pass_learns_it_once(running_stack,
                                                                                           tmp_path):
    from stack_helpers import runs_tagged

    name = new_lineage(tmp_path, "kill")
    for i, concept in enumerate(("k-first", "k-second")):
        bucket.drop(s3.client(), name, make_concept(tmp_path / "src", concept, seed=i))
    cns = Path(sys.executable).parent / "cns"
    worker_env = {**os.environ, "CNS_LINEAGES_DIR": str(tmp_path / "worker"), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([str(cns), "lineage", "pass", name], env={**worker_env, "CNS_FAULT_AT": "publish"},
                            capture_output=True, start_new_session=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert lineages.published(s3.client(), name)[0] == 0  # tagged in the clone, never published
    ws = clone(name, tmp_path / "worker")
    assert git(ws, "tag", "--list", "model-v*") == ""  # the clone's unpublished version is thrown away
    done = subprocess.run([str(cns), "lineage", "pass", name], env=worker_env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ws = clone(name, tmp_path / "check")
    with env(CNS_BUCKET=name):
        assert_learned_exactly_once(ws, name, ["k-first", "k-second"])
        (rolled_back,) = runs_tagged(name, "cns.state", "rolled_back")
    assert rolled_back.data.tags["cns.concept"] == "k-first"


def test_a_clone_refuses_another_bucket(running_stack, tmp_path):
    from tasks.versioning import WorkspaceError, open_workspace

    name = new_lineage(tmp_path, "own")
    ws = clone(name, tmp_path / "clones")
    with env(CNS_BUCKET="some-other-bucket"), pytest.raises(WorkspaceError, match="wrong lineage"):
        open_workspace(ws.root)


def start_worker(pool: str, folder: Path, log: Path) -> subprocess.Popen:
    prefect = Path(sys.executable).parent / "prefect"
    return subprocess.Popen([str(prefect), "worker", "start", "--pool", pool, "--limit", "1"],
                            env={**os.environ, "CNS_LINEAGES_DIR": str(folder), "OMP_NUM_THREADS": "1"},
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_flow_runs(ids: list[str], timeout: float) -> list:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = [client.read_flow_run(i) for i in ids]
            if all(r.state and r.state.is_final() for r in runs) or time.monotonic() > deadline:
                return runs
            time.sleep(2)


def test_two_workers_learn_three_lineages_each_version_exactly_once(running_stack, tmp_path):
    from flows.serve import deploy_lineage, run_lineages

    pool = f"lineages-{time.time_ns() % 10**6}"
    deploy_lineage(pool)
    names = [new_lineage(tmp_path, f"lin{k}") for k in range(3)]
    dropped = {}
    for k, name in enumerate(names):
        dropped[name] = [f"{name[:4]}-c{i}" for i in range(5)]
        for i, concept in enumerate(dropped[name]):
            bucket.drop(s3.client(), name, make_concept(tmp_path / "src", concept, seed=100 * k + i))
    workers = [start_worker(pool, tmp_path / f"worker{w}", tmp_path / f"worker{w}.log") for w in range(2)]
    try:
        # and a second pass of the first lineage at the same time: the two take turns
        runs = wait_for_flow_runs(run_lineages([*names, names[0]]), timeout=900)
    finally:
        for proc in workers:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    logs = "\n".join((tmp_path / f"worker{w}.log").read_text()[-3000:] for w in range(2))
    assert [r.state.type.value for r in runs] == ["COMPLETED"] * 4, logs
    ran_on = {(tmp_path / f"worker{w}").name for w in range(2) if (tmp_path / f"worker{w}").exists()}
    assert ran_on == {"worker0", "worker1"}, "both workers took lineages"
    for name in names:
        keys = [key for key, *_ in s3.list_objects(s3.client(), name, lineages.GIT_PREFIX)]
        assert sorted(keys) == sorted(lineages.bundle_key(v) for v in range(6))
        ws = clone(name, tmp_path / "check")
        with env(CNS_BUCKET=name):
            assert_learned_exactly_once(ws, name, dropped[name])
