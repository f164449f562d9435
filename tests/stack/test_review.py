"""What a reviewer sees after `cns run-once` over three datasets, read back from the real MLflow
server: the experiment opens on its training runs, each concept run has its dataset as an input
and its samples as images, and the command itself prints a few lines with links to the runs."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks import bucket, s3
from tasks.versioning import init_workspace

from stack_helpers import make_concept, token_for

pytestmark = pytest.mark.stack
REPO = Path(__file__).resolve().parents[2]
FAST = {"train": {"max_train_steps": 15}, "scoring": {"num_score_samples": 4, "score_batch_size": 2},
        "evaluate": {"num_inference_steps": 3, "num_images_per_prompt": 1, "loss_draws": 4}}
CONCEPTS = ("alpha", "beta", "gamma")
IMAGES = 4


def cns(*argv: str, env: dict) -> subprocess.CompletedProcess:
    """`cns` as a user runs it, stdout and stderr together (what the terminal shows)."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], env=dict(env, PYTHONPATH=str(REPO)),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)


@pytest.fixture(scope="module")
def reviewed(running_stack, tmp_path_factory):
    """Three datasets in a bucket of their own, learned by one `cns run-once`: (workspace, model
    name, {concept: dataset hash}, the command's result)."""
    name = f"review-{random.randrange(10**8)}"
    s3.client().create_bucket(Bucket=name)
    ws = init_workspace(tmp_path_factory.mktemp("ws") / "workspace")
    params = yaml.safe_load((ws.root / "params.yaml").read_text())
    for section, values in {"pipeline": {"model_name": name}, **FAST}.items():
        params.setdefault(section, {}).update(values)
    (ws.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sources = tmp_path_factory.mktemp("concepts")
    hashes = {}
    for seed, concept in enumerate(CONCEPTS):
        directory = make_concept(sources, concept, images=IMAGES, seed=seed)
        hashes[concept] = bucket.drop(s3.client(), name, directory)[1]
    result = cns("run-once", "--workspace", str(ws.root), env=dict(os.environ, CNS_BUCKET=name))
    return ws, name, hashes, result


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _runs(model_name: str) -> dict:
    client = _client()
    experiment = client.get_experiment_by_name(model_name)
    return {r.data.params["concept.name"]: r
            for r in client.search_runs([experiment.experiment_id], "tags.`cns.state` = 'complete'")}


def test_run_once_over_three_datasets_prints_a_few_lines_and_no_http_requests(reviewed):
    _, _, _, result = reviewed
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout
    assert len(lines) <= 40, result.stdout
    assert not [line for line in lines if "httpx" in line or "HTTP Request" in line], result.stdout
    assert not [line for line in lines if "View run" in line or "View experiment" in line], result.stdout
    for concept in CONCEPTS:
        assert any(concept in line and "learned" in line for line in lines), result.stdout


def test_run_once_prints_a_link_to_each_learned_run(reviewed):
    _, name, _, result = reviewed
    experiment = _client().get_experiment_by_name(name).experiment_id
    links = re.findall(r"http://\S+/#/experiments/\S+", result.stdout)
    runs = {r.info.run_id for r in _runs(name).values()}
    assert {link.split("/runs/")[-1] for link in links if "/runs/" in link and "?" not in link} == runs
    # Every link lands on the runs of the experiment or on one run, never on its overview.
    assert all(re.search(rf"#/experiments/{experiment}/runs(/[0-9a-f]{{32}}|\?workflowType=machine_learning)$", link)
               for link in links), links


def test_the_experiment_opens_on_its_training_runs(reviewed):
    _, name, _, _ = reviewed
    experiment = _client().get_experiment_by_name(name)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_each_concept_run_has_its_dataset_as_an_mlflow_input(reviewed):
    _, name, hashes, _ = reviewed
    runs = _runs(name)
    assert sorted(runs) == sorted(CONCEPTS)
    for concept, run in runs.items():
        (entry,) = run.inputs.dataset_inputs
        dataset = entry.dataset
        assert dataset.name == concept
        assert dataset.digest == hashes[concept][:16]
        assert yaml.safe_load(dataset.source)["uri"] == f"s3://{name}/incoming/{concept}/"
        assert dataset.source_type == "s3"
        assert yaml.safe_load(dataset.profile)["num_rows"] == IMAGES
        tags = {t.key: t.value for t in entry.tags}
        assert tags["mlflow.data.context"] == "training"
        assert tags["cns.token"] == token_for(concept) and tags["cns.class_noun"] == "thing"
        assert tags["cns.dataset_hash"] == hashes[concept]
        assert tags["cns.images"] == str(IMAGES)


def test_each_concept_run_logs_every_concepts_samples_as_images_by_version(reviewed):
    _, name, _, _ = reviewed
    client = _client()
    for concept, run in _runs(name).items():
        version = int(run.data.tags["cns.model_version"])
        assert run.data.tags["mlflow.loggedImages"] == "True"
        files = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
        learned = CONCEPTS[:version]  # run-once learns them in drop order
        for earlier in learned:
            assert any(f.startswith(f"images/samples~{earlier}+step+{version}+") and f.endswith(".png")
                       for f in files), files
        assert len([f for f in files if f.endswith(".png")]) == len(learned)


def test_verbose_run_once_shows_the_libraries_logs(reviewed):
    ws, name, _, _ = reviewed
    result = cns("-v", "run-once", "--workspace", str(ws.root), env=dict(os.environ, CNS_BUCKET=name))
    assert result.returncode == 0, result.stdout
    assert "HTTP Request" in result.stdout
