"""``cns init | run-once | personalize | nightly | serve``: the pipeline's commands."""

from __future__ import annotations

import argparse
import json


def _workspace(args):
    from tasks.versioning import open_workspace

    return open_workspace(args.workspace)


def _print(result) -> None:
    print(json.dumps(result, indent=2, default=str))


def cmd_init(args) -> int:
    from tasks.versioning import init_workspace

    ws = init_workspace(args.directory)
    print(f"workspace ready: {ws.root} (git + DVC, remote s3://<bucket>/dvc); "
          f"use it with --workspace {ws.root} or CNS_WORKSPACE={ws.root}")
    return 0


def cmd_run_once(args) -> int:
    from flows.pipeline import watch

    _print(watch(str(_workspace(args).root)))
    return 0


def cmd_personalize(args) -> int:
    from flows.pipeline import personalize

    _print(personalize(args.concept, str(_workspace(args).root)))
    return 0


def cmd_nightly(args) -> int:
    from flows.pipeline import nightly

    _print(nightly(str(_workspace(args).root)))
    return 0


def cmd_serve(args) -> int:
    from flows.serve import schedule_settings, serve_all

    ws = _workspace(args)
    config = ws.config()
    interval, cron, tz = schedule_settings(config)
    print(f"serving watch (every {interval}s), nightly ({cron} {tz}) and personalize for {ws.root}")
    serve_all(config, str(ws.root))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workspace", help="the DVC workspace (default: $CNS_WORKSPACE or the current directory)")

    p = sub.add_parser("init", help="create a workspace: git + DVC with an S3 remote in the bucket")
    p.add_argument("directory")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("run-once", parents=[common], help="one watch pass in this process: learn every pending dataset")
    p.set_defaults(func=cmd_run_once)

    p = sub.add_parser("personalize", parents=[common], help="learn one dataset of the bucket (incoming/CONCEPT/)")
    p.add_argument("concept")
    p.set_defaults(func=cmd_personalize)

    p = sub.add_parser("nightly", parents=[common], help="run the nightly flow now: watch, then re-check every concept")
    p.set_defaults(func=cmd_nightly)

    p = sub.add_parser("serve", parents=[common], help="serve watch, nightly and personalize to the Prefect server")
    p.set_defaults(func=cmd_serve)
