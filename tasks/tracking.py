"""MLflow: one experiment per model lineage, one run per learned concept, one registered model
version per model version (tracking URI and credentials from the environment).

A run is tagged ``cns.state``: ``running`` while its concept is learned, ``complete`` once its
model version is committed and registered, ``rolled_back`` when a crash threw its version away,
``rejected`` when the dataset failed for a reason of its own after the run started.

What a reviewer opens: the experiment (kind ``custom_model_development``, so MLflow 3 shows its
training runs, not the GenAI overview), each run's dataset in the runs table's Dataset column
(an MLflow dataset input: S3 source, content hash as digest, one row per image), and every
concept's samples as images keyed ``samples/<concept>`` with the model version as the step, so
the image view compares a concept's samples across versions.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from cns.config import Config
from tasks.versioning import PROJECT_ROOT

log = logging.getLogger(__name__)

STATE = "cns.state"
VERSION = "cns.model_version"
# MLflow 3 opens an experiment of unknown kind as a GenAI one (traces, the Overview tab); the UI
# sets this tag itself when a user picks "Machine learning" for an experiment.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# The UI's workflow type comes from the link (or the browser's last choice), and it decides which
# tabs an experiment has, so links to the runs table say it.
RUNS_VIEW = "?workflowType=machine_learning"
DIGEST_LENGTH = 16  # MLflow keeps at most 36 characters of a dataset digest; `cns datasets` shows 16


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.learning_rate": "0.0001", ...} (MLflow params are strings)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


def experiment_id(name: str) -> str:
    """The lineage's experiment, created (or, made before kinds existed, tagged) as a training one."""
    client = _client()
    key, kind = EXPERIMENT_KIND
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, tags={key: kind})
    if experiment.tags.get(key) != kind:
        client.set_experiment_tag(experiment.experiment_id, key, kind)
    return experiment.experiment_id


def ui_url() -> str | None:
    """The MLflow UI of the tracking server (None for a local file or database store)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def runs_url(experiment: str) -> str | None:
    """A link to the experiment's runs table."""
    base = ui_url()
    return f"{base}/#/experiments/{experiment}/runs{RUNS_VIEW}" if base else None


def run_url(experiment: str, run_id: str) -> str | None:
    """A link to one run."""
    base = ui_url()
    return f"{base}/#/experiments/{experiment}/runs/{run_id}" if base else None


def code_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def prefect_tags() -> dict[str, str]:
    """The Prefect flow run this code runs in (id and UI link), when there is one."""
    try:
        from prefect.runtime import flow_run
    except ImportError:
        return {}
    tags = {}
    if flow_run.id:
        tags["prefect.flow_run_id"] = str(flow_run.id)
        tags["prefect.flow_run_name"] = str(flow_run.name)
        if flow_run.ui_url:
            tags["prefect.flow_run_url"] = str(flow_run.ui_url)
    return tags


def start_concept_run(config: Config, *, concept: str, token: str, class_noun: str, dataset_hash: str,
                      dataset_uri: str, version: int, base: str, images: dict[str, str]) -> str:
    """The concept's run: params, tags and its dataset input (``images``: file name -> caption)."""
    client = _client()
    tags = {STATE: "running", VERSION: str(version), "cns.concept": concept, "cns.dataset_hash": dataset_hash,
            "git.commit": code_commit(), "mlflow.runName": f"v{version} {concept}", **prefect_tags()}
    experiment = experiment_id(config.pipeline.model_name)
    # A retry (the task's, after the run was created and a later call failed) takes up the run
    # the first attempt made: one run per version, never an orphan that a later recovery would
    # register as that version. Runs of an earlier pass are closed by then (recover).
    earlier = client.search_runs([experiment], f"tags.`{STATE}` = 'running' and tags.`{VERSION}` = '{version}' "
                                 f"and tags.`cns.dataset_hash` = '{dataset_hash}'", max_results=1)
    if not earlier:
        run = client.create_run(experiment, tags=tags)
    else:
        run = earlier[0]
        log.info("taking up run %s of %s (model v%d), made by an earlier attempt", run.info.run_id, concept, version)
        for key, value in tags.items():
            client.set_tag(run.info.run_id, key, value)
    params = flatten(config.to_dict())
    params.update({"concept.name": concept, "concept.token": token, "concept.class_noun": class_noun,
                   "dataset.hash": dataset_hash, "dataset.uri": dataset_uri, "base_model": base})
    params.pop("model_dir", None)
    params.pop("cache_dir", None)
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    log_dataset(run.info.run_id, concept=concept, token=token, class_noun=class_noun, dataset_hash=dataset_hash,
                dataset_uri=dataset_uri, images=images)
    return run.info.run_id


def log_dataset(run_id: str, *, concept: str, token: str, class_noun: str, dataset_hash: str, dataset_uri: str,
                images: dict[str, str]) -> None:
    """The concept's dataset as the run's training input: one row per image (file name and the
    caption it trains with), its S3 prefix as source, its content hash as digest, and the token,
    class noun, image count and full hash as input tags."""
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    frame = pd.DataFrame({"image": list(images), "caption": list(images.values())})
    dataset = mlflow.data.from_pandas(frame, source=dataset_uri, name=concept, digest=dataset_hash[:DIGEST_LENGTH])
    tags = {MLFLOW_DATASET_CONTEXT: "training", "cns.token": token, "cns.class_noun": class_noun,
            "cns.images": str(len(images)), "cns.dataset_hash": dataset_hash}
    # MlflowClient has no Dataset overload: the entity is what its log_inputs takes.
    entry = DatasetInput(dataset._to_mlflow_entity(), [InputTag(k, v) for k, v in tags.items()])
    _client().log_inputs(run_id, datasets=[entry])


def log_sample_images(run_id: str, grids: dict[str, Path], version: int) -> None:
    """Each concept's sample grid as an MLflow image ``samples/<concept>`` at step ``version``,
    so the run's image view shows it and compares it across runs."""
    from PIL import Image

    client = _client()
    for concept, path in grids.items():
        with Image.open(path) as image:
            client.log_image(run_id, image.convert("RGB"), key=f"samples/{concept}", step=version, synchronous=True)


def _log_batch(run_id: str, points: list[tuple[str, float, int]]) -> None:
    """(key, value, step) points in batches of 500 (the server's limit is 1,000)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(key, float(value), now, step) for key, value, step in points]
    client = _client()
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i:i + 500])


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    _log_batch(run_id, [(k, v, step) for k, v in metrics.items() if isinstance(v, (int, float))])


def log_series(run_id: str, key: str, values: list[float]) -> None:
    """A metric over steps (e.g. the training loss)."""
    _log_batch(run_id, [(key, v, step) for step, v in enumerate(values)])


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    client = _client()
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def log_artifacts(run_id: str, files: dict[str, Path]) -> None:
    """{artifact sub-folder: local file or folder} -> the run's artifacts."""
    client = _client()
    for folder, path in files.items():
        path = Path(path)
        if path.is_dir():
            client.log_artifacts(run_id, str(path), folder)
        else:
            client.log_artifact(run_id, str(path), folder or None)


def register_version(config: Config, run_id: str, version: int, tags: dict[str, str]) -> str:
    """The run's model version in the registry (created once), aliased, run marked complete."""
    from mlflow.exceptions import MlflowException

    client = _client()
    name = config.pipeline.model_name
    try:
        client.create_registered_model(name, description="Cumulative CNS model: base + one sparse delta per concept. "
                                                         "Restore with `git checkout model-vN && dvc pull`.")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if existing:
        model_version = existing[0].version
    else:
        model_version = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id,
                                                    tags={"model_version": str(version), **tags}).version
    client.set_registered_model_alias(name, config.pipeline.registry_alias, model_version)
    client.set_tag(run_id, STATE, "complete")
    client.set_terminated(run_id, "FINISHED")
    return str(model_version)


def registered_run(config: Config, version: int) -> str | None:
    """The run whose registry version holds model v``version``, if one was registered."""
    from mlflow.exceptions import MlflowException

    try:
        found = _client().search_model_versions(f"name='{config.pipeline.model_name}'")
    except MlflowException:
        return None
    return next((v.run_id for v in found if v.tags.get("model_version") == str(version)), None)


def unfinished_runs(config: Config) -> list:
    client = _client()
    experiment = client.get_experiment_by_name(config.pipeline.model_name)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], f"tags.`{STATE}` = 'running'")


def mark_rolled_back(run_id: str, reason: str) -> None:
    client = _client()
    client.set_tag(run_id, STATE, "rolled_back")
    client.set_tag(run_id, "cns.rollback_reason", reason)
    client.set_terminated(run_id, "FAILED")


def mark_rejected(run_id: str, code: str, message: str) -> None:
    """The dataset turned out bad after its run started: the run ends FAILED, state ``rejected``."""
    client = _client()
    client.set_tag(run_id, STATE, "rejected")
    client.set_tag(run_id, "cns.error_code", code)
    client.set_tag(run_id, "cns.error", message[:4000])
    client.set_terminated(run_id, "FAILED")


def start_report_run(config: Config, name: str, version: int) -> str:
    """A run for a report on the model (the nightly re-check), beside the concept runs."""
    tags = {"cns.kind": "nightly", VERSION: str(version), "git.commit": code_commit(), "mlflow.runName": name,
            **prefect_tags()}
    run = _client().create_run(experiment_id(config.pipeline.model_name), tags=tags)
    return run.info.run_id


def finish_report_run(run_id: str) -> None:
    _client().set_terminated(run_id, "FINISHED")


def start_forget_run(config: Config, *, removal: dict) -> str:
    """The run of a removal (``cns forget-version``, the ``forget`` flow): tagged ``cns.kind=forget``
    with the removed concept's name and token and the new model version, state ``running`` until
    that version is committed and registered (so crash recovery treats it like a concept run)."""
    version, name, token = removal["version"], removal["name"], removal["token"]
    tags = {STATE: "running", VERSION: str(version), "cns.kind": "forget", "cns.concept": name,
            "cns.removed_concept": name, "cns.removed_token": token, "git.commit": code_commit(),
            "mlflow.runName": f"v{version} forget {name}", **prefect_tags()}
    client = _client()
    run = client.create_run(experiment_id(config.pipeline.model_name), tags=tags)
    from mlflow.entities import Param

    params = {"removal.name": name, "removal.token": token,
              "removal.learned_in_version": str(removal["record"]["version"]),
              "removal.dataset_hash": removal["record"]["dataset_hash"],
              "removal.later_concepts": json.dumps(removal["later_concepts"]),
              "removal.rows_kept_by_later_concepts": str(removal["rows_kept_by_later_concepts"]),
              "base_model": config.model.pretrained_model_name_or_path}
    client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in sorted(params.items())])
    return run.info.run_id
