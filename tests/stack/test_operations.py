"""What an operator does beside the pipeline must not break it, and the pipeline must not break
what the operator did (issue 10, items 5, 7 and 8): `cns learn` into the workspace's model,
a changed `evaluate` setting, a lock held too long, a retried `start-run`, `cns datasets` and
`cns drop` run from another directory, a pass killed mid-way, a Prefect restart while a slot
is held. Each on the real stack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cns.lineage import read_lineage
from cns.lock import LockTimeout, lock_path, model_lock
from tasks import bucket, s3
from tasks.versioning import git, last_version

from stack_helpers import make_concept, own_workspace, runs_tagged, set_params

pytestmark = pytest.mark.stack
REPO = Path(__file__).resolve().parents[2]

FAST = {"train": {"max_train_steps": 4}, "scoring": {"num_score_samples": 2, "score_batch_size": 2},
        "evaluate": {"num_inference_steps": 2, "num_images_per_prompt": 1, "loss_draws": 2}}
# Removes itself, then kills its process group: git, and the `cns run-once` that started it.
KILL_HOOK = '#!/bin/sh\nrm -f "$0"\nkill -KILL -$(ps -o pgid= -p $$ | tr -d " ")\n'


def cns(*argv: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=300)


def _mlflow():
    from mlflow import MlflowClient

    return MlflowClient()


@pytest.fixture
def workspace(running_stack, tmp_path_factory):
    with own_workspace(tmp_path_factory, "ops", **FAST) as (ws, name, root):
        yield ws, name, root / "src"


# ---- item 5: `cns learn` and the pipeline in one workspace ---------------------------------------

def test_run_once_refuses_to_roll_back_a_model_learned_with_cns_learn(workspace):
    """The README's `cns learn` writes data/model; a pass finds it ahead of the last tag, but no
    pass was writing it: it stops with one line naming the directory and leaves it as it is."""
    ws, _, src = workspace
    concept = make_concept(src, "by-hand")
    learned = cns("learn", "--params", str(ws.root / "params.yaml"), "--model-dir", str(ws.model_dir), "-q",
                  str(concept), cwd=ws.root)
    assert learned.returncode == 0, learned.stderr
    delta = (ws.model_dir / read_lineage(ws.model_dir).concepts[0].delta).read_bytes()

    result = cns("run-once", "--workspace", str(ws.root), cwd=ws.root)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("cns: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"cns: error: {ws.model_dir}: holds model v1 (by-hand)")
    lineage = read_lineage(ws.model_dir)
    assert [c.name for c in lineage.concepts] == ["by-hand"]
    assert (ws.model_dir / lineage.concepts[0].delta).read_bytes() == delta
    assert last_version(ws) == 0


def test_cns_learn_waits_for_a_pass_and_gives_up_naming_the_lock_and_its_holder(workspace):
    from tasks.learning import lineage_lock

    ws, _, src = workspace
    with lineage_lock(ws, ws.config()):
        result = cns("learn", "--params", str(ws.root / "params.yaml"), "--model-dir", str(ws.model_dir),
                     "--set", "pipeline.lock_timeout_seconds=1", "-q", str(make_concept(src, "waits")), cwd=ws.root)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"cns: error: {lock_path(ws.model_dir)}: still held after 1 s by pid {os.getpid()} on "
                           f"{os.uname().nodename} (cns pipeline, no flow run) since ")
    assert line.endswith("raise pipeline.lock_timeout_seconds")
    assert read_lineage(ws.model_dir) is None


def test_a_pass_waits_for_cns_learn_and_gives_up_naming_the_lock_and_its_holder(workspace):
    from flows.pipeline import watch

    ws, name, src = workspace
    set_params(ws, pipeline={"lock_timeout_seconds": 1})
    bucket.drop(s3.client(), name, make_concept(src, "queued"))
    with model_lock(ws.model_dir, 5, what="cns learn"):
        with pytest.raises(LockTimeout, match=r"\.model\.lock: still held after 1 s by pid \d+ .*\(cns learn\)"):
            watch(str(ws.root))
    assert [o["outcome"] for o in watch(str(ws.root))] == ["learned"]  # free again: the dataset waited


# ---- item 7: a changed `evaluate` setting ----------------------------------------------------------

def test_a_changed_evaluate_setting_does_not_stop_learning(workspace):
    """The first concept's reference samples were made with 2 sampling steps; after the change to 3
    the second concept is learned, and the first is still measured as its reference was made."""
    from flows.pipeline import watch

    ws, name, src = workspace
    bucket.drop(s3.client(), name, make_concept(src, "before-change"))
    assert [o["outcome"] for o in watch(str(ws.root))] == ["learned"]
    set_params(ws, evaluate={"num_inference_steps": 3, "num_images_per_prompt": 2, "seed": 7})
    bucket.drop(s3.client(), name, make_concept(src, "after-change", seed=1))
    outcomes = watch(str(ws.root))
    assert [(o["concept"], o["outcome"]) for o in outcomes] == [("after-change", "learned")]
    assert last_version(ws) == 2 == read_lineage(ws.model_dir).version
    metrics = json.loads((ws.metrics_dir / "eval.json").read_text())["concepts"]
    assert isinstance(metrics["before-change"]["output_change"], float)  # comparable: same settings as its reference
    assert metrics["after-change"]["output_change"] == 0.0
    assert "num_inference_steps: 3" in git(ws, "show", "model-v2:params.yaml")


# ---- item 8: the workspace's settings, orphan runs, crashed passes, slots -------------------------

def test_datasets_and_drop_read_the_workspace_not_the_current_directory(workspace, tmp_path):
    from flows.pipeline import watch

    ws, name, src = workspace
    bucket.drop(s3.client(), name, make_concept(src, "listed"))
    assert [o["outcome"] for o in watch(str(ws.root))] == ["learned"]
    set_params(ws, limits={"min_images": 4})
    env = {"CNS_WORKSPACE": str(ws.root)}

    listed = cns("datasets", "--json", cwd=tmp_path, env=env)  # tmp_path: no params.yaml, no data/model
    assert listed.returncode == 0, listed.stderr
    assert {r["concept"]: r["state"] for r in json.loads(listed.stdout)} == {"listed": "learned"}
    dropped = cns("drop", str(make_concept(src, "three-images")), cwd=tmp_path, env=env)
    assert dropped.returncode == 2
    assert dropped.stderr.strip().endswith("holds 3 images, fewer than the minimum of 4")
    assert cns("drop", "--workspace", str(ws.root), str(src / "three-images"), cwd=tmp_path).returncode == 2


def test_a_retried_start_run_takes_up_its_run_and_no_orphan_takes_the_alias(workspace, monkeypatch):
    """The first try of `start-run` creates the MLflow run, then fails (the dataset input); the
    task's retry must not leave that run behind, to be registered later as the version."""
    from flows.pipeline import watch
    from tasks import tracking

    ws, name, src = workspace
    real, failures = tracking.log_dataset, []

    def flaky(run_id, **kwargs):
        if not failures:
            failures.append(run_id)
            raise ConnectionError("MLflow went away for a moment")
        return real(run_id, **kwargs)

    monkeypatch.setattr(tracking, "log_dataset", flaky)
    bucket.drop(s3.client(), name, make_concept(src, "retried"))
    assert [o["outcome"] for o in watch(str(ws.root))] == ["learned"]
    assert failures, "the failure was never injected"
    assert watch(str(ws.root)) == []  # the next pass's recovery sees every run
    (run,) = runs_tagged(name, "cns.concept", "retried")
    assert run.info.run_id == failures[0] and run.data.tags["cns.state"] == "complete"
    versions = _mlflow().search_model_versions(f"name='{name}'")
    assert [(v.tags["model_version"], v.run_id) for v in versions] == [("1", run.info.run_id)]
    assert _mlflow().get_model_version_by_alias(name, "current").run_id == run.info.run_id


def _flow_runs(workspace_root: Path, state: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[state]))), limit=200)
    return [r for r in runs if r.parameters.get("workspace") == str(workspace_root)]


def test_a_pass_killed_mid_way_is_marked_crashed_in_prefect_by_the_next_pass(workspace):
    from flows.pipeline import watch

    ws, name, src = workspace
    bucket.drop(s3.client(), name, make_concept(src, "killed"))
    hook = ws.root / ".git" / "hooks" / "pre-commit"
    hook.write_text(KILL_HOOK)
    hook.chmod(0o755)
    cli = Path(sys.executable).parent / "cns"
    proc = subprocess.run([str(cli), "run-once", "--workspace", str(ws.root)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True, timeout=400)
    assert proc.returncode == -signal.SIGKILL
    (left,) = _flow_runs(ws.root, "RUNNING")  # what the UI showed forever

    # (killed inside the first version's `git commit`: its staged files must not bring the model back)
    assert [o["outcome"] for o in watch(str(ws.root))] == ["learned"]
    assert git(ws, "tag", "--list", "model-v*").split() == ["model-v1"]
    assert [r.id for r in _flow_runs(ws.root, "CRASHED")] == [left.id]
    assert _flow_runs(ws.root, "RUNNING") == []
    (rolled_back,) = [r for r in runs_tagged(name, "cns.concept", "killed") if r.data.tags["cns.state"] == "rolled_back"]
    assert rolled_back.info.status == "FAILED"


def test_a_pass_killed_while_waiting_for_the_lineage_is_marked_crashed_by_the_next_pass(workspace):
    """Killed before it held the lineage, a pass leaves no holder line in the lock file; its own
    file in data/.model.waiting/ (flock-ed while it lives) tells the next pass."""
    from flows.pipeline import watch
    from tasks.learning import waiting_dir

    ws, name, src = workspace
    bucket.drop(s3.client(), name, make_concept(src, "waited"))
    cli = Path(sys.executable).parent / "cns"
    with model_lock(ws.model_dir, 5, what="cns learn"):  # the lineage is busy: the pass waits
        proc = subprocess.Popen([str(cli), "run-once", "--workspace", str(ws.root)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 240
        while not (waiting_dir(ws).is_dir() and any(waiting_dir(ws).iterdir())) and time.monotonic() < deadline:
            assert proc.poll() is None, "the pass ended instead of waiting"
            time.sleep(0.5)
        assert any(waiting_dir(ws).iterdir()), "the waiting pass left no file"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    (left,) = _flow_runs(ws.root, "RUNNING")
    assert [o["outcome"] for o in watch(str(ws.root))] == ["learned"]
    assert [r.id for r in _flow_runs(ws.root, "CRASHED")] == [left.id]
    assert _flow_runs(ws.root, "RUNNING") == []
    assert list(waiting_dir(ws).iterdir()) == []
    assert "/data/.model.waiting/" in (ws.root / ".gitignore").read_text()


def test_a_slot_held_across_a_prefect_restart_is_freed_by_its_holder(workspace, running_stack):
    """The lineage's Prefect slot is taken with a lease; the server restarts; the holder gives the
    slot back. The lease must survive the restart, or the slot stays taken for good."""
    from prefect.client.orchestration import get_client

    from tasks import stack
    from tasks.learning import ensure_limits, lineage_lock, lock_name

    ws, _, _ = workspace
    config = ws.config()
    assert ensure_limits(config)
    with get_client(sync_client=True) as client:
        lease = client.increment_concurrency_slots_with_lease(
            names=[lock_name(config)], slots=1, mode="concurrency", lease_duration=60).json()["lease_id"]

    pid = {s.name: s.pid for s in stack.status(running_stack.config)}["prefect"]
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while stack._group_members(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    stack.up(running_stack.config, timeout=120)

    with get_client(sync_client=True) as client:
        client.release_concurrency_slots_with_lease(lease)
    with lineage_lock(ws, config, timeout_seconds=10):  # LockTimeout while the slot stays taken
        pass
