"""Removing a concept through the pipeline (issue 13, deliverable 2): the ``forget`` flow makes a
model version, an MLflow run and a registry version like a learn, earlier versions stay
restorable, an unknown name changes nothing, and a removal killed between ``git commit`` and
``git tag`` is completed by the next pass like a learn."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cns.lineage import read_lineage
from tasks import bucket, s3
from tasks.versioning import git, last_version

from stack_helpers import make_concept, own_workspace

pytestmark = pytest.mark.stack

FAST = {"train": {"max_train_steps": 4}, "scoring": {"num_score_samples": 2, "score_batch_size": 2},
        "evaluate": {"num_inference_steps": 2, "num_images_per_prompt": 1, "loss_draws": 2}}
# Removes itself, then kills its process group: git, and the `cns forget-version` that started it.
KILL_HOOK = '#!/bin/sh\nrm -f "$0"\nkill -KILL -$(ps -o pgid= -p $$ | tr -d " ")\n'
CNS = Path(sys.executable).parent / "cns"


def _mlflow():
    from mlflow import MlflowClient

    return MlflowClient()


def _cns(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([str(CNS), *args], env=env, capture_output=True, text=True, timeout=400, **kwargs)


@pytest.fixture(scope="module")
def forgotten(running_stack, tmp_path_factory):
    """A workspace of its own: two concepts learned by a watch pass (v1, v2), then the first
    removed by the forget flow (v3)."""
    from flows.pipeline import forget, watch

    with own_workspace(tmp_path_factory, "forget", **FAST) as (ws, name, root):
        for i, concept in enumerate(("f-first", "f-second")):
            bucket.drop(s3.client(), name, make_concept(root / "src", concept, seed=i))
        learned = watch(str(ws.root))
        assert [o["outcome"] for o in learned] == ["learned", "learned"]
        first, second = (o["concept"] for o in learned)
        before = read_lineage(ws.model_dir)
        result = forget(first, str(ws.root))
        yield ws, name, first, second, before, result


def test_forget_makes_a_tagged_version_whose_lineage_records_the_removal(forgotten):
    ws, _, first, second, before, result = forgotten
    assert result["outcome"] == "forgotten" and result["version"] == 3 and result["tag"] == "model-v3"
    assert git(ws, "tag", "--list", "model-v*").split() == ["model-v1", "model-v2", "model-v3"]
    assert git(ws, "log", "-1", "--format=%s") == f"model v3: forget {first}"
    assert git(ws, "rev-list", "-n", "1", "model-v3") == git(ws, "rev-parse", "HEAD")
    lineage = read_lineage(ws.model_dir)
    assert [c.name for c in lineage.concepts] == [second]
    assert lineage.version == 3
    (removal,) = lineage.removals
    assert removal["name"] == first and removal["version"] == 3 and removal["token"] == before.find(first).token
    # the committed data/model is the one on disk, and nothing is left uncommitted
    assert git(ws, "status", "--porcelain", "--", "data", "dvc.lock", "metrics") == ""
    committed = json.loads(git(ws, "show", "model-v3:metrics/eval.json"))
    assert committed["version"] == 3 and first not in committed["concepts"]


def test_model_v2_still_holds_the_forgotten_concept_and_restores_from_the_remote(forgotten, tmp_path):
    ws, _, first, second, before, _ = forgotten
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws.root), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", "model-v2"], cwd=clone, check=True)
    shutil.copy(ws.root / ".dvc" / "config.local", clone / ".dvc" / "config.local")  # the endpoint, not in git
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "pull", "-q"], cwd=clone, check=True)
    v2 = read_lineage(clone / "data" / "model")
    assert [c.name for c in v2.concepts] == [first, second] and v2.removals == []
    assert v2.concepts == before.concepts
    delta = before.find(first).delta
    assert (clone / "data" / "model" / delta).read_bytes() == (ws.model_dir / delta).read_bytes()


def test_forget_has_a_complete_mlflow_run_and_the_current_registry_version(forgotten):
    ws, name, first, _, before, result = forgotten
    client = _mlflow()
    run = client.get_run(result["run_id"])
    tags = run.data.tags
    assert tags["cns.kind"] == "forget" and tags["cns.state"] == "complete" and run.info.status == "FINISHED"
    assert tags["cns.removed_concept"] == first and tags["cns.removed_token"] == before.find(first).token
    assert tags["cns.model_version"] == "3" and tags["cns.git_tag"] == "model-v3"
    assert tags["cns.workspace_commit"] == git(ws, "rev-list", "-n", "1", "model-v3")
    assert run.data.params["removal.name"] == first
    paths = {a.path for a in client.list_artifacts(result["run_id"], "model")}
    assert {"model/lineage.json", "model/removal.json"} <= paths
    experiment = client.get_experiment_by_name(name)
    forget_runs = client.search_runs([experiment.experiment_id], "tags.`cns.kind` = 'forget'")
    assert [r.info.run_id for r in forget_runs] == [result["run_id"]]
    versions = client.search_model_versions(f"name='{name}'")
    assert sorted(v.tags["model_version"] for v in versions) == ["1", "2", "3"]
    current = client.get_model_version_by_alias(name, "current")
    assert current.tags["model_version"] == "3" and current.tags["git_tag"] == "model-v3"
    assert current.run_id == result["run_id"] and current.version == result["registry_version"]


def test_forgetting_an_unknown_concept_is_a_one_line_error_and_changes_nothing(forgotten):
    ws, name, first, _, _, _ = forgotten
    head = git(ws, "rev-parse", "HEAD")
    lineage = (ws.model_dir / "lineage.json").read_bytes()
    client = _mlflow()
    experiment = client.get_experiment_by_name(name)
    runs = len(client.search_runs([experiment.experiment_id]))
    errors = {}
    for unknown in (first, "never-learned"):  # removed already, and never there
        proc = _cns("forget-version", unknown, "--workspace", str(ws.root))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("cns: error: ")
        assert f"'{unknown}'" in proc.stderr
        errors[unknown] = proc.stderr
    assert "removed in model v3" in errors[first] and "removed" not in errors["never-learned"]
    assert git(ws, "rev-parse", "HEAD") == head and last_version(ws) == 3
    assert (ws.model_dir / "lineage.json").read_bytes() == lineage
    assert len(client.search_runs([experiment.experiment_id])) == runs


def test_a_removal_request_in_the_bucket_is_handled_by_the_watch_pass_after_the_learns(forgotten, tmp_path):
    from flows.pipeline import watch

    ws, name, _, second, _, _ = forgotten
    client = s3.client()
    bucket.drop(client, name, make_concept(tmp_path, "f-third", seed=3))
    client.put_object(Bucket=name, Key="forget/f-third", Body=b"")
    client.put_object(Bucket=name, Key="forget/not-held", Body=b"")
    outcomes = watch(str(ws.root))
    assert [(o["concept"], o["outcome"], o.get("version")) for o in outcomes] == [
        ("f-third", "learned", 4), ("f-third", "forgotten", 5), ("not-held", "absent", None)]
    assert git(ws, "log", "-2", "--format=%s").split("\n") == ["model v5: forget f-third", "model v4: learn f-third"]
    assert last_version(ws) == 5 and [c.name for c in read_lineage(ws.model_dir).concepts] == [second]
    assert [o.key for o in bucket.list_objects(client, name, bucket.FORGET)] == []  # both requests handled
    run = _mlflow().get_run(outcomes[1]["run_id"])
    assert run.data.tags["cns.kind"] == "forget" and run.data.tags["cns.removed_concept"] == "f-third"
    assert _mlflow().get_model_version_by_alias(name, "current").tags["model_version"] == "5"


def test_removals_survive_a_later_learn_and_a_removed_dataset_is_not_learned_again(forgotten):
    from flows.pipeline import watch

    ws, _, first, _, _, _ = forgotten
    # v3 removed the first concept, v4 learned f-third, v5 removed it (the test before)
    lineage = read_lineage(ws.model_dir)
    assert [(r["name"], r["version"]) for r in lineage.removals] == [(first, 3), ("f-third", 5)]
    assert watch(str(ws.root)) == []  # the datasets stay in incoming/, and are not learned again


def test_a_removal_killed_between_commit_and_tag_is_completed_by_the_next_pass(forgotten):
    from flows.pipeline import forget

    ws, name, _, second, _, _ = forgotten
    before = last_version(ws)
    hook = ws.root / ".git" / "hooks" / "post-commit"
    hook.write_text(KILL_HOOK)
    hook.chmod(0o755)
    proc = _cns("forget-version", second, "--workspace", str(ws.root), start_new_session=True)
    assert proc.returncode == -9, f"the hook never ran: {proc.stderr[-2000:]}"
    assert git(ws, "log", "-1", "--format=%s") == f"model v{before + 1}: forget {second}"  # committed ...
    assert last_version(ws) == before  # ... and not tagged

    # the next pass of any flow recovers first (a forget pass here: a watch pass would also learn the
    # dataset whose removal record the cns bug above drops)
    assert forget("never-learned", str(ws.root))["outcome"] == "absent"
    assert last_version(ws) == before + 1
    assert git(ws, "rev-list", "-n", "1", f"model-v{before + 1}") == git(ws, "rev-parse", "HEAD")
    lineage = read_lineage(ws.model_dir)
    assert second not in [c.name for c in lineage.concepts] and lineage.removals[-1]["name"] == second
    assert lineage.version == before + 1
    client = _mlflow()
    experiment = client.get_experiment_by_name(name)
    (run,) = client.search_runs([experiment.experiment_id],
                                f"tags.`cns.kind` = 'forget' and tags.`cns.removed_concept` = '{second}'")
    assert run.data.tags["cns.state"] == "complete" and run.info.status == "FINISHED"
    assert client.get_model_version_by_alias(name, "current").tags["model_version"] == str(before + 1)
    assert git(ws, "status", "--porcelain", "--", "data", "dvc.lock", "metrics") == ""
