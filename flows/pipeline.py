"""The pipeline's flows: the bucket is watched, each ready dataset is learned once into the
cumulative model, and every night every concept so far is checked again.

    watch        ready datasets in the bucket, oldest first -> personalize each
    personalize  recover -> fetch + validate -> prepare (+ general neurons) -> score + select
                 -> finetune -> write version -> evaluate -> log to MLflow -> dvc push + git tag
                 -> register
    nightly      watch, then evaluate every concept and log the forgetting report

Every setting comes from the workspace's ``params.yaml`` (committed with each version), never from
flow parameters: a model version and its recorded parameters cannot disagree.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from tasks import learning as t
from tasks.versioning import Workspace, open_workspace


@flow(name="personalize", flow_run_name="personalize-{concept}")
def personalize(concept: str, workspace: str | None = None) -> dict:
    """Learn one dataset (``incoming/<concept>/``) into the workspace's model, exactly once."""
    ws = open_workspace(workspace)
    config = ws.config()
    with t.lineage_lock(ws, config):
        t.recover(ws, config)
        found = [d for d in t.find_datasets(ws, config, concept) if d.concept == concept]
        if not found or found[0].state != "pending":
            return {"concept": concept, "outcome": found[0].state if found else "absent"}
        return _learn(ws, config, found[0])


def _learn(ws: Workspace, config, dataset) -> dict:
    """The steps of one version; the caller holds the lineage lock."""
    logger = get_run_logger()
    concept, problem = t.fetch_dataset(ws, config, dataset)
    if problem == "dataset_changed":  # not a rejection: read again once the upload settles
        logger.info("%s changed while being read; deferred to a later pass", dataset.concept)
        return {"concept": dataset.concept, "outcome": "deferred", "code": problem}
    if concept is None:
        logger.warning("rejected %s (see rejected/%s/ in the bucket)", dataset.concept, dataset.concept)
        return {"concept": dataset.concept, "outcome": "rejected", "code": problem}
    model = t.load_model(ws, config)
    run_id = t.start_run(config, concept, dataset, model.lineage.version + 1)
    try:
        prepared, general = t.prepare_concept(model, concept, config)
        scores, selection = t.score_neurons(model, prepared, general, config)
        result = t.finetune(model, prepared, selection, config)
        record = t.write_version(model, prepared, selection, scores, result, dataset.hash, config)
        evaluation = t.evaluate(ws, model, config)
    except Exception as exc:
        t.drop_model(ws)
        if not t.dataset_problem(exc, concept):
            raise  # infrastructure: the dataset stays pending and the next pass retries it
        # The dataset's own fault: reject it, and go on with the datasets behind it.
        key = t.reject_dataset(ws, config, dataset, concept, run_id, exc)
        logger.warning("rejected %s after the fetch (%s): %s", dataset.concept, key, exc.message)
        return {"concept": dataset.concept, "outcome": "rejected", "code": exc.code}
    except BaseException:
        t.drop_model(ws)
        raise
    try:
        t.log_run(ws, config, run_id, record, prepared, result, evaluation)
        versioned = t.version_model(ws, record)
    except BaseException:
        # The in-memory model holds the new concept; the next pass rolls the disk back.
        t.drop_model(ws)
        raise
    registry_version = t.register(ws, config, run_id, record, versioned)
    logger.info("learned %s as model v%d (%s, registry version %s)", concept.name, record.version,
                versioned["tag"], registry_version)
    return {"concept": concept.name, "outcome": "learned", "version": record.version, "run_id": run_id,
            "tag": versioned["tag"], "registry_version": registry_version}


@flow(name="watch")
def watch(workspace: str | None = None) -> list[dict]:
    """One pass over the bucket: learn every pending dataset, oldest manifest first."""
    ws = open_workspace(workspace)
    config = ws.config()
    outcomes = []
    with t.lineage_lock(ws, config):
        t.recover(ws, config)
        pending = [d for d in t.find_datasets(ws, config) if d.state == "pending"]
        get_run_logger().info("%d pending dataset(s): %s", len(pending), ", ".join(d.concept for d in pending))
        for dataset in pending:
            outcomes.append(_learn(ws, config, dataset))
    return outcomes


@flow(name="nightly")
def nightly(workspace: str | None = None) -> dict:
    """Learn whatever is pending, then re-check every concept so far: an MLflow run with every
    concept's metrics, samples and the forgetting matrix."""
    learned = watch(workspace)
    ws = open_workspace(workspace)
    config = ws.config()
    with t.lineage_lock(ws, config):
        model = t.load_model(ws, config)
        evaluation = t.evaluate(ws, model, config, write=False, every_concept=True)
    report = t.log_nightly(ws, config, evaluation)
    return {"learned": learned, **report}
