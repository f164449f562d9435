"""``cns init | run-once | personalize | nightly | serve``: the pipeline's commands."""

from __future__ import annotations

import json


def _workspace(args):
    from tasks.versioning import open_workspace

    return open_workspace(args.workspace)


def _print(result) -> None:
    print(json.dumps(result, indent=2, default=str))


def _report(config, outcomes: list[dict], as_json: bool, nightly: dict | None = None) -> None:
    """One line per dataset (learned ones with the link to their MLflow run), then the link to
    the experiment's runs; ``--json`` prints the flow's result instead."""
    if as_json:
        _print(outcomes if nightly is None else nightly)
        return
    from tasks import tracking

    experiment = tracking.experiment_id(config.pipeline.model_name)
    for o in outcomes:
        if o.get("run_id"):
            where = tracking.run_url(experiment, o["run_id"]) or f"MLflow run {o['run_id']}"
            verb = "forgot" if o["outcome"] == "forgotten" else "learned"
            print(f"{verb:9} {o['concept']} as model v{o['version']} ({o['tag']}): {where}")
        else:
            print(f"{o['outcome']:9} {o['concept']}" + (f" ({o['code']})" if o.get("code") else ""))
    if not outcomes:
        print("no pending dataset")
    if nightly is not None:
        where = tracking.run_url(experiment, nightly["run_id"]) or f"MLflow run {nightly['run_id']}"
        print(f"nightly   model v{nightly['version']}, {len(nightly['concepts'])} concept(s) checked: {where}")
    if tracking.ui_url():
        print(f"runs:     {tracking.runs_url(experiment)}")


def cmd_init(args) -> int:
    from tasks.versioning import init_workspace

    ws = init_workspace(args.directory)
    print(f"workspace ready: {ws.root} (git + DVC, remote s3://<bucket>/dvc); "
          f"use it with --workspace {ws.root} or CNS_WORKSPACE={ws.root}")
    return 0


def cmd_run_once(args) -> int:
    from flows.pipeline import watch

    ws = _workspace(args)
    _report(ws.config(), watch(str(ws.root)), args.json)
    return 0


def cmd_personalize(args) -> int:
    from flows.pipeline import personalize

    ws = _workspace(args)
    result = personalize(args.concept, str(ws.root))
    if args.json:
        _print(result)
    else:
        _report(ws.config(), [result], False)
    return 0


def cmd_nightly(args) -> int:
    from flows.pipeline import nightly

    ws = _workspace(args)
    report = nightly(str(ws.root))
    _report(ws.config(), report["learned"], args.json, nightly=report)
    return 0


def cmd_serve(args) -> int:
    from flows.serve import schedule_settings, serve_all

    ws = _workspace(args)
    config = ws.config()
    interval, cron, tz = schedule_settings(config)
    print(f"serving watch (every {interval}s), nightly ({cron} {tz}) and personalize for {ws.root}")
    serve_all(config, str(ws.root))
    return 0


def cmd_forget_version(args) -> int:
    """The forget flow: one line for the new version and its MLflow run; an unknown concept is a
    one-line error (exit 2) and nothing changes."""
    import sys

    from flows.pipeline import forget, unknown_concept

    ws = _workspace(args)
    # Checked before the flow starts too (no flow run, no log lines); the flow checks again under the lock.
    message = unknown_concept(ws, args.concept)
    result = forget(args.concept, str(ws.root)) if message is None else {"outcome": "absent", "message": message}
    if result["outcome"] != "forgotten":
        print(f"cns: error: {result['message']}", file=sys.stderr)
        return 2
    if args.json:
        _print(result)
        return 0
    from tasks import tracking

    config = ws.config()
    experiment = tracking.experiment_id(config.pipeline.model_name)
    where = tracking.run_url(experiment, result["run_id"]) or f"MLflow run {result['run_id']}"
    print(f"forgot    {result['concept']} ({result['token']}) as model v{result['version']} ({result['tag']}): {where}")
    if tracking.ui_url():
        print(f"runs:     {tracking.runs_url(experiment)}")
    return 0


def cmd_lineage_create(args) -> int:
    from pathlib import Path

    from tasks.lineages import create

    create(args.bucket, args.model_name, Path(args.params) if args.params else None)
    print(f"lineage {args.model_name} ready in s3://{args.bucket} (git/model-v0.bundle); drop datasets into "
          f"s3://{args.bucket}/incoming/ (CNS_BUCKET={args.bucket} cns drop DIR), then "
          f"`cns lineage run {args.bucket}` or `cns lineage pass {args.bucket}`")
    return 0


def cmd_lineage_pass(args) -> int:
    from flows.pipeline import lineage
    from tasks.lineages import checkout

    outcomes = lineage(args.bucket)
    _report(checkout(args.bucket).config(), outcomes, args.json)
    return 0


def cmd_lineage_deploy(args) -> int:
    from flows.serve import deploy_lineage

    name = deploy_lineage(args.pool)
    print(f"deployment {name} on work pool {args.pool}; start workers with "
          f"`prefect worker start --pool {args.pool}` (the stack's environment set), then `cns lineage run BUCKET`")
    return 0


def cmd_lineage_run(args) -> int:
    from flows.serve import run_lineages

    for bucket, run_id in zip(args.buckets, run_lineages(args.buckets)):
        print(f"queued    lineage-{bucket}: flow run {run_id}")
    return 0
