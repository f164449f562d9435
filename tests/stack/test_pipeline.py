"""End to end on the real stack: datasets dropped into SeaweedFS are learned by the Prefect flows,
tracked in the MLflow server and versioned with DVC in a git workspace."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cns.lineage import read_lineage
from tasks import bucket, s3
from tasks.versioning import git, last_version

from stack_helpers import SAMPLES, assert_learned_exactly_once, make_concept, own_workspace, set_params

pytestmark = pytest.mark.stack

FAST = {"train": {"max_train_steps": 15}, "scoring": {"num_score_samples": 4, "score_batch_size": 2},
        "evaluate": {"num_inference_steps": 3, "num_images_per_prompt": 1, "loss_draws": 4}}


def _drop(directory: Path) -> None:
    bucket.drop(s3.client(), s3.bucket_name(), directory)


@pytest.fixture(scope="module")
def pipeline(running_stack, tmp_path_factory):
    """A workspace and a bucket of its own, dog and cat2 dropped and learned by one watch pass."""
    from flows.pipeline import watch

    with own_workspace(tmp_path_factory, "pipe", **FAST) as (ws, name, _):
        for concept in ("dog", "cat2"):
            _drop(SAMPLES / concept)
        yield ws, name, watch(str(ws.root))


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _concept_runs(model_name: str):
    from tasks.tracking import STATE

    client = _client()
    experiment = client.get_experiment_by_name(model_name)
    return client.search_runs([experiment.experiment_id], f"tags.`{STATE}` = 'complete'")


def test_two_dropped_concepts_give_two_model_versions(pipeline):
    ws, _, outcomes = pipeline
    assert [o["outcome"] for o in outcomes] == ["learned", "learned"]
    assert git(ws, "tag", "--list", "model-v*").split() == ["model-v1", "model-v2"]
    lineage = read_lineage(ws.model_dir)
    assert sorted(c.name for c in lineage.concepts) == ["cat2", "dog"]
    assert git(ws, "log", "-1", "--format=%s") == f"model v2: learn {lineage.concepts[1].name}"
    assert git(ws, "status", "--porcelain", "--", "data", "dvc.lock", "metrics") == ""


def test_each_concept_has_a_complete_mlflow_run_with_its_artifacts(pipeline):
    from cns.info import short_layer_name

    ws, name, _ = pipeline
    client = _client()
    runs = _concept_runs(name)
    assert len(runs) == 2
    for run in runs:
        concept = run.data.params["concept.name"]
        assert run.info.status == "FINISHED"
        assert run.data.tags["cns.git_tag"] == f"model-v{run.data.tags['cns.model_version']}"
        assert run.data.tags["prefect.flow_run_id"] and run.data.tags["git.commit"]
        assert run.data.params["train.max_train_steps"] == "15"
        assert run.data.params["dataset.uri"].endswith(f"/incoming/{concept}/")
        assert "AWS_SECRET_ACCESS_KEY" not in str(run.data.params) and os.environ["AWS_SECRET_ACCESS_KEY"] \
            not in str(run.data.params) + str(run.data.tags)
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] not in str(run.data.params) + str(run.data.tags)
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 15
        record = read_lineage(ws.model_dir).find(concept)
        assert run.data.metrics["neurons/total"] == record.stats["neurons_total"]
        assert run.data.metrics["train/text_dim"] == record.stats["text_dim"] > 0  # null-space rows' room, logged
        layer = next(iter(record.stats["neurons_per_layer"]))
        assert f"neurons/layer/{short_layer_name(layer)}" in run.data.metrics
        assert f"eval/{concept}/heldout_loss" in run.data.metrics
        assert run.data.tags[f"eval.{concept}.clip_t"] == "unavailable"
        paths = {a.path for folder in ("neurons", "delta", "samples", "forgetting", "model")
                 for a in client.list_artifacts(run.info.run_id, folder)}
        assert {"neurons/mask.safetensors", "neurons/neurons.json", "neurons/neurons.png", "delta/delta.safetensors",
                f"samples/{concept}.png", "forgetting/forgetting.csv", "forgetting/forgetting.png",
                "model/lineage.json"} <= paths
        local = Path(client.download_artifacts(run.info.run_id, "neurons/mask.safetensors",
                                               str(ws.root.parent / run.info.run_id)))
        assert local.read_bytes() == (ws.model_dir / record.mask).read_bytes()


def test_each_version_is_a_registry_version_and_the_newest_has_the_alias(pipeline):
    ws, name, _ = pipeline
    client = _client()
    versions = client.search_model_versions(f"name='{name}'")
    assert sorted(v.tags["model_version"] for v in versions) == ["1", "2"]
    current = client.get_model_version_by_alias(name, "current")
    assert current.tags["model_version"] == "2" and current.tags["git_tag"] == "model-v2"


def test_a_fresh_clone_restores_model_v1_bitwise(pipeline, tmp_path):
    ws, _, _ = pipeline
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws.root), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", "model-v1"], cwd=clone, check=True)
    shutil.copy(ws.root / ".dvc" / "config.local", clone / ".dvc" / "config.local")  # the endpoint, not in git
    dvc = Path(sys.executable).parent / "dvc"
    subprocess.run([str(dvc), "pull", "-q"], cwd=clone, check=True)
    v2 = read_lineage(ws.model_dir)
    v1 = read_lineage(clone / "data" / "model")
    assert v1.concepts == v2.concepts[:1]
    first = v1.concepts[0].name
    for path in sorted((clone / "data/model/concepts").rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (ws.model_dir / path.relative_to(clone / "data/model")).read_bytes()
    assert sorted(p.name for p in (clone / "data/model/concepts").iterdir()) == [first]
    assert (clone / "data" / "datasets" / first / "concept.yaml").is_file()


def test_the_same_bytes_dropped_again_give_no_new_version(pipeline):
    from flows.pipeline import watch

    ws, _, _ = pipeline
    _drop(SAMPLES / "dog")
    assert watch(str(ws.root)) == []
    assert last_version(ws) == 2


def test_a_bad_dataset_gives_no_version_and_its_error_json(pipeline, tmp_path):
    from flows.pipeline import watch

    ws, name, _ = pipeline
    bad = make_concept(tmp_path, "reuses-token", manifest={"token": "<dog1>", "class_noun": "dog"})
    _drop(bad)
    assert [o["outcome"] for o in watch(str(ws.root))] == ["rejected"]
    assert last_version(ws) == 2 and read_lineage(ws.model_dir).version == 2
    keys = [o.key for o in bucket.list_objects(s3.client(), name, "rejected/reuses-token/")]
    assert len(keys) == 1 and keys[0].endswith("/error.json")
    s3.client().delete_object(Bucket=name, Key="incoming/reuses-token/concept.yaml")


def test_a_run_killed_during_finetuning_is_redone_as_exactly_one_version(pipeline, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (TaskRunFilter, TaskRunFilterName, TaskRunFilterState,
                                                TaskRunFilterStateName)

    ws, name, _ = pipeline
    _drop(SAMPLES / "teapot")
    original = (ws.root / "params.yaml").read_text()
    set_params(ws, train={"max_train_steps": 100000})
    cns = Path(sys.executable).parent / "cns"
    proc = subprocess.Popen([str(cns), "run-once", "--workspace", str(ws.root)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        running = TaskRunFilter(name=TaskRunFilterName(like_="train"),
                                state=TaskRunFilterState(name=TaskRunFilterStateName(any_=["Running"])))
        with get_client(sync_client=True) as client:
            while not client.read_task_runs(task_run_filter=running):
                assert proc.poll() is None and time.monotonic() < deadline, "finetuning never started"
                time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        (ws.root / "params.yaml").write_text(original)
    assert last_version(ws) == 2

    from flows.pipeline import watch

    outcomes = watch(str(ws.root))
    assert [(o["concept"], o["outcome"], o["version"]) for o in outcomes] == [("teapot", "learned", 3)]
    assert git(ws, "tag", "--list", "model-v*").split() == ["model-v1", "model-v2", "model-v3"]
    client = _client()
    assert sorted(v.tags["model_version"] for v in client.search_model_versions(f"name='{name}'")) == ["1", "2", "3"]
    experiment = client.get_experiment_by_name(name)
    killed = client.search_runs([experiment.experiment_id], "tags.`cns.state` = 'rolled_back'")
    assert len(killed) == 1 and killed[0].info.status == "FAILED"
    assert killed[0].data.tags["cns.concept"] == "teapot"
    assert_learned_exactly_once(ws, name, ["dog", "cat2", "teapot"])


def test_nightly_logs_a_forgetting_report_covering_every_concept(pipeline):
    import pandas as pd

    from flows.pipeline import nightly

    ws, name, _ = pipeline
    result = nightly(str(ws.root))
    concepts = sorted(c.name for c in read_lineage(ws.model_dir).concepts)
    assert sorted(result["concepts"]) == concepts
    client = _client()
    run = client.get_run(result["run_id"])
    assert run.data.tags["cns.kind"] == "nightly" and run.info.status == "FINISHED"
    for concept in concepts:
        assert f"eval/{concept}/output_change" in run.data.metrics
    local = client.download_artifacts(result["run_id"], "forgetting/forgetting_matrix.csv", str(ws.root.parent))
    matrix = pd.read_csv(local, index_col=0)
    assert sorted(matrix.columns) == concepts
    assert matrix.index.max() == last_version(ws)
    paths = {a.path for a in client.list_artifacts(result["run_id"], "forgetting")}
    assert "forgetting/forgetting.png" in paths


def test_dvc_sees_the_evaluate_stage_up_to_date_and_diffs_metrics_between_versions(pipeline):
    import json

    ws, _, _ = pipeline
    dvc = str(Path(sys.executable).parent / "dvc")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    status = subprocess.run([dvc, "status", "--json"], cwd=ws.root, env=env, capture_output=True, text=True,
                            check=True)
    assert json.loads(status.stdout) == {}
    diff = subprocess.run([dvc, "metrics", "diff", "model-v1", "model-v2", "--json"], cwd=ws.root, env=env,
                          capture_output=True, text=True, check=True)
    changes = json.loads(diff.stdout)["metrics/eval.json"]
    assert changes["version"] == {"old": 1, "new": 2, "diff": 1}
    first = read_lineage(ws.model_dir).concepts[0].name
    assert changes[f"concepts.{first}.output_change"]["old"] == 0.0
