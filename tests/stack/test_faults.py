"""Fault injection on the real stack (issue 10): the worker (`cns run-once`, in a process group of
its own) SIGKILLed inside each step of a learn, and the S3, MLflow and Prefect servers stopped or
restarted under a running pass. After each fault the next pass must leave what
:func:`stack_helpers.assert_learned_exactly_once` checks: every dropped dataset learned exactly
once, ``model-v1..N`` contiguous, each tag's lineage equal to its DVC content, one complete MLflow
run and one registry version per version, no stale lock.

The kills come from ``tasks.faults.fault_point``: ``CNS_FAULT_AT=<point>`` in the worker's
environment makes it SIGKILL itself there (inert without the variable). The kills inside
finetuning, inside ``git commit`` and between commit and tag are in ``test_pipeline.py`` and
``test_versioning_faults.py``. A killed worker's Prefect concurrency slot would stay taken until
its 60 s lease runs out; the next pass on the same machine releases it at once (its lease id is
in ``data/.model.lease``), as ``test_a_worker_killed_on_this_machine_gives_its_prefect_slot_back_at_once``
checks step by step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks import bucket, s3
from tasks.faults import FAULT_VARIABLE
from tasks.learning import lease_path, lock_name, release_dead_lease
from tasks.versioning import last_version

from stack_helpers import assert_learned_exactly_once, make_concept, own_workspace, start_services, stop_service

pytestmark = pytest.mark.stack

FAST = {"train": {"max_train_steps": 4}, "scoring": {"num_score_samples": 2, "score_batch_size": 2},
        "evaluate": {"num_inference_steps": 2, "num_images_per_prompt": 1, "loss_draws": 2}}
CNS = Path(sys.executable).parent / "cns"
# The named points of tasks.faults, in the order a learn reaches them; True: the version is tagged there.
KILL_POINTS = {"fetch": False, "score": False, "commit": False, "mlflow-log": False, "dvc-add-half": False,
               "dvc-add": False, "dvc-push-half": False, "dvc-push": False, "registry": True}


@pytest.fixture(scope="module")
def workspace(running_stack, tmp_path_factory):
    """(workspace, model name, source folder, names dropped so far) shared by the module's tests, in order."""
    with own_workspace(tmp_path_factory, "faults", **FAST) as (ws, name, root):
        yield ws, name, root / "src", []


def drop(workspace, concept: str) -> None:
    _, _, src, dropped = workspace
    bucket.drop(s3.client(), s3.bucket_name(), make_concept(src, concept, seed=len(dropped) + 1))
    dropped.append(concept)


def start_worker(ws, **env) -> subprocess.Popen:
    return subprocess.Popen([str(CNS), "run-once", "--workspace", str(ws.root)], env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 500) -> int:
    """The worker's exit status; its process group (ours) is killed if anything of it is left."""
    try:
        return proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def next_pass(ws) -> list[tuple]:
    from flows.pipeline import watch

    return [(o["concept"], o["outcome"], o.get("version")) for o in watch(str(ws.root))]


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_worker_killed_inside_a_step_is_finished_by_the_next_pass(workspace, point):
    ws, name, _, dropped = workspace
    before = last_version(ws)
    concept = f"killed-at-{point}"
    drop(workspace, concept)
    assert finish(start_worker(ws, **{FAULT_VARIABLE: point})) == -signal.SIGKILL
    tagged = KILL_POINTS[point]
    assert last_version(ws) == before + tagged

    assert next_pass(ws) == ([] if tagged else [(concept, "learned", before + 1)])
    assert_learned_exactly_once(ws, name, dropped)


@pytest.mark.parametrize("point", ["dvc-add", "dvc-push"])
def test_the_first_version_killed_after_dvc_add_is_learned_by_the_next_pass(running_stack, tmp_path_factory, point):
    """With no tag yet, the untracked data/model.dvc that `dvc add` wrote must go with the rest of
    the unfinished version (it used to bring the thrown-away model back: the dataset then read as
    learned, with no version)."""
    with own_workspace(tmp_path_factory, "first-kill", **FAST) as (ws, name, root):
        bucket.drop(s3.client(), name, make_concept(root / "src", "first", seed=1))
        assert finish(start_worker(ws, **{FAULT_VARIABLE: point})) == -signal.SIGKILL
        assert last_version(ws) == 0
        assert next_pass(ws) == [("first", "learned", 1)]
        assert_learned_exactly_once(ws, name, ["first"])


def active_slots(limit: str) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(limit).active_slots


def test_a_worker_killed_on_this_machine_gives_its_prefect_slot_back_at_once(workspace):
    """Its lease would hold the lineage's slot for up to a minute after the kill; the next pass
    releases it as soon as it has the model's file lock (which the kernel freed)."""
    ws, name, _, dropped = workspace
    before = last_version(ws)
    drop(workspace, "killed-holding-the-slot")
    assert finish(start_worker(ws, **{FAULT_VARIABLE: "score"})) == -signal.SIGKILL
    limit = lock_name(ws.config())
    assert lease_path(ws).is_file() and active_slots(limit) == 1  # the dead pass's lease, still taken
    assert release_dead_lease(ws) is not None
    assert active_slots(limit) == 0 and not lease_path(ws).exists()
    assert release_dead_lease(ws) is None  # nothing left to release
    started = time.monotonic()
    assert next_pass(ws) == [("killed-holding-the-slot", "learned", before + 1)]
    print(f"\nthe next pass learned it {time.monotonic() - started:.0f} s later (a lease lasts 60 s)")
    assert not lease_path(ws).exists() and active_slots(limit) == 0
    assert_learned_exactly_once(ws, name, dropped)


def wait_for_run_of(model_name: str, concept: str, worker: subprocess.Popen, timeout: float = 300) -> None:
    """Until the worker has started the concept's MLflow run (fetched, model loaded: mid-learn)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    deadline = time.monotonic() + timeout
    while True:
        experiment = client.get_experiment_by_name(model_name)
        if experiment and client.search_runs([experiment.experiment_id],
                                             f"tags.`cns.concept` = '{concept}' and tags.`cns.state` = 'running'"):
            return
        assert worker.poll() is None, f"the worker ended (status {worker.returncode}) before learning {concept}"
        assert time.monotonic() < deadline, f"no run of {concept} after {timeout:.0f} s"
        time.sleep(0.2)


def server_fault(workspace, running_stack, concept: str, service: str, down_seconds: float) -> None:
    """Stop ``service`` of the session's stack once the worker is mid-learn, start it again after
    ``down_seconds``; the worker either retries through it or fails (the dataset stays pending),
    and a next pass leaves everything learned exactly once."""
    ws, name, _, dropped = workspace
    before = last_version(ws)
    drop(workspace, concept)
    worker = start_worker(ws)
    try:
        wait_for_run_of(name, concept, worker)
        stop_service(running_stack.config, service)
        time.sleep(down_seconds)
    finally:
        start_services(running_stack.config)
    status = finish(worker)  # it ends, whether it retried through the fault or failed
    learned_by_worker = last_version(ws) == before + 1
    print(f"\n{service} down {down_seconds} s: the worker exited with {status}, "
          f"{'having learned' if learned_by_worker else 'without learning'} {concept}")
    assert next_pass(ws) == ([] if learned_by_worker else [(concept, "learned", before + 1)])
    assert_learned_exactly_once(ws, name, dropped)


def test_s3_stopped_for_60_seconds_mid_run(workspace, running_stack):
    server_fault(workspace, running_stack, "s3-down-60s", "s3", 60)


def test_mlflow_down_during_a_run(workspace, running_stack):
    server_fault(workspace, running_stack, "mlflow-down", "mlflow", 30)


def test_prefect_server_restarted_mid_run(workspace, running_stack):
    server_fault(workspace, running_stack, "prefect-restarted", "prefect", 0)
