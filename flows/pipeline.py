"""The pipeline's flows: the bucket is watched, each ready dataset is learned once into the
cumulative model, and every night every concept so far is checked again.

    watch        ready datasets in the bucket, oldest first -> personalize each; then each
                 removal request forget/<concept> -> forget
    personalize  recover -> fetch + validate -> prepare -> general -> score -> select -> train
                 -> reference -> commit (cns.learn's steps, one task each) -> evaluate -> log to
                 MLflow -> dvc push + git tag -> register
    nightly      watch, then evaluate every concept and log the forgetting report
    lineage      watch, on any worker of a work pool, for a lineage that lives in S3 alone
                 (tasks.lineages: its clone synced to the newest published version, each version
                 published with a compare-and-swap)
    forget       recover -> remove one concept (cns.forget, no training) -> evaluate -> log to
                 MLflow (cns.kind=forget) -> dvc push + git commit "model vN: forget <concept>"
                 + tag -> register

Every setting comes from the workspace's ``params.yaml`` (committed with each version), never from
flow parameters: a model version and its recorded parameters cannot disagree.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger

from cns.lineage import read_lineage
from tasks import learning as t
from tasks.versioning import Workspace, begin_version, open_workspace


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
    begin_version(ws, model.lineage.version + 1)  # from here the next pass may roll data/model back
    try:
        # cns.learn.learn_into's steps, one task each
        prepared = t.prepare(model, concept, config)
        general = t.general(model, config)
        scores = t.score(model, prepared, config)
        selection = t.select(model, prepared, scores, general, config)
        result = t.train(model, prepared, selection, config)
        reference = t.reference(model, prepared, config)
        record = t.commit(model, prepared, selection, scores, result, dataset.hash, config, reference)
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
        versioned = t.version_model(ws, record, run_id)
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
    """One pass over the bucket: learn every pending dataset, oldest manifest first, then handle
    every removal request (``forget/<concept>``), oldest first."""
    ws = open_workspace(workspace)
    config = ws.config()
    outcomes = []
    with t.lineage_lock(ws, config):
        t.recover(ws, config)
        pending = [d for d in t.find_datasets(ws, config) if d.state == "pending"]
        get_run_logger().info("%d pending dataset(s): %s", len(pending), ", ".join(d.concept for d in pending))
        for dataset in pending:
            outcomes.append(_learn(ws, config, dataset))
        # Removal requests come after the learns: a concept dropped and then asked to be removed
        # in the same pass is learned, then removed. The request is deleted once handled.
        for concept, key in t.find_removal_requests():
            message = unknown_concept(ws, concept)
            if message is None:
                outcomes.append(_forget(ws, config, concept))
            else:
                get_run_logger().warning("removal request %s: %s; request deleted", key, message)
                outcomes.append({"concept": concept, "outcome": "absent", "code": "concept_unknown"})
            t.close_removal_request(key)
    return outcomes


@flow(name="lineage", flow_run_name="lineage-{bucket}")
def lineage(bucket: str) -> list[dict]:
    """One watch pass of the lineage in ``s3://<bucket>`` (``cns lineage create``), on whichever
    machine runs it: this machine's clone of it, brought to its newest version inside the lock."""
    from tasks import lineages

    os.environ["CNS_BUCKET"] = bucket  # this flow run's process is this lineage's (a worker starts one a run)
    return watch(str(lineages.checkout(bucket).root))


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


@flow(name="forget", flow_run_name="forget-{concept}")
def forget(concept: str, workspace: str | None = None) -> dict:
    """Take a learned concept out of the workspace's model again: a new version (its rows back at
    their values before it, its token gone; ``cns.forget``), with its MLflow run (``cns.kind``
    ``forget``) and registry version, like a learn. A name the model does not hold gives outcome
    ``absent`` (code ``concept_unknown``) and changes nothing."""
    ws = open_workspace(workspace)
    config = ws.config()
    with t.lineage_lock(ws, config):
        t.recover(ws, config)
        message = unknown_concept(ws, concept)
        if message is not None:
            return {"concept": concept, "outcome": "absent", "code": "concept_unknown", "message": message}
        return _forget(ws, config, concept)


def unknown_concept(ws: Workspace, concept: str) -> str | None:
    """Why the workspace's model cannot forget ``concept`` (it holds no concept of that name), or None."""
    lineage = read_lineage(ws.model_dir)
    if lineage is not None and lineage.find(concept) is not None:
        return None
    removed = [r["version"] for r in (lineage.removals if lineage else []) if r["name"] == concept]
    held = ", ".join(c.name for c in lineage.concepts) if lineage else ""
    return (f"the model in {ws.model_dir} holds no concept named '{concept}'"
            + (f" (removed in model v{removed[-1]})" if removed else "")
            + (f"; it holds {held}" if held else ""))


def _forget(ws: Workspace, config, concept: str) -> dict:
    """The steps of one removal; the caller holds the lineage lock. A failure leaves the
    uncommitted removal to the next pass's recovery (rolled back, its run marked rolled back)."""
    logger = get_run_logger()
    begin_version(ws, read_lineage(ws.model_dir).version + 1)
    removal = t.forget_concept(ws, concept)
    try:
        run_id = t.start_forget_run(config, removal)
        model = t.load_model(ws, config)
        evaluation = t.evaluate(ws, model, config)
        t.log_forget_run(ws, config, run_id, removal, evaluation)
        versioned = t.version_removal(ws, removal, run_id)
    except BaseException:
        t.drop_model(ws)
        raise
    registry_version = t.register_removal(ws, config, run_id, removal, versioned)
    logger.info("removed %s as model v%d (%s, registry version %s)", concept, removal["version"],
                versioned["tag"], registry_version)
    return {"concept": concept, "outcome": "forgotten", "version": removal["version"], "run_id": run_id,
            "tag": versioned["tag"], "registry_version": registry_version, "token": removal["token"],
            "rows_kept_by_later_concepts": removal["rows_kept_by_later_concepts"]}
