"""``cns stack up|down|status|env``, ``cns drop DIR`` and ``cns datasets``: the commands that talk
to the local stack and the drop bucket (handlers; their options are declared in ``flows/cli.py``)."""

from __future__ import annotations

import json
import shlex
import sys
import time


# ---- stack -------------------------------------------------------------------------------------

def _config(args):
    from tasks import stack

    ports = {s: getattr(args, f"{s}_port", None) for s in stack.SERVICES}
    return stack.StackConfig.resolve(root=args.dir, ports=ports)


def _print_status(items) -> None:
    for s in items:
        extra = f"pid {s.pid}, {s.rss_mb:.0f} MB" if s.pid else ""
        print(f"{s.name:8} {s.state:10} {s.url:32} {extra}")


def _print_env(config, creds) -> None:
    from tasks import stack

    env = stack.client_env(config, creds, with_secret=bool(creds and creds.generated), logins=True)
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")
    if creds and not creds.generated:
        print("# AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY: the ones already in your environment")
    if "MLFLOW_TRACKING_PASSWORD" in env:
        print("# MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD: also the MLflow UI's login")
    if "PREFECT_API_AUTH_STRING" in env:
        print("# PREFECT_API_AUTH_STRING: also the Prefect UI's login (the whole user:password string)")


def cmd_up(args) -> int:
    from tasks import stack

    config = _config(args)
    start = time.monotonic()
    items, creds = stack.up(config, timeout=args.timeout)
    print(f"stack up in {time.monotonic() - start:.1f} s (data in {config.root})")
    _print_status(items)
    print(f"\n# use it from this shell: eval \"$(cns stack env{' --dir ' + shlex.quote(args.dir) if args.dir else ''})\"")
    # never the secret here: `up` output ends up in CI logs and terminal scrollback; `env` prints it on demand
    for key, value in stack.client_env(config, creds, with_secret=False).items():
        print(f"export {key}={shlex.quote(value)}")
    if creds and creds.generated:
        print(f"# AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY: in {config.root / 'credentials.json'} (cns stack env prints them)")
    elif creds:
        print("# AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY: the ones already in your environment")
    print(f"# MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (also the MLflow UI's login): in "
          f"{config.root / stack.MLFLOW_AUTH_FILE} (cns stack env prints them)")
    print(f"# PREFECT_API_AUTH_STRING (also the Prefect UI's login): in {config.root / stack.PREFECT_AUTH_FILE} "
          "(cns stack env prints it)")
    print(f"# CNS_EVENTS_TOKEN (`cns serve` hears of new datasets from the event relay with it): in "
          f"{config.root / stack.EVENTS_TOKEN_FILE} (cns stack env prints it)")
    return 0


def cmd_down(args) -> int:
    from tasks import stack

    stopped = stack.down(_config(args))
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def cmd_status(args) -> int:
    from tasks import stack

    items = stack.status(_config(args))
    if args.json:
        print(json.dumps(stack.to_dict(items), indent=1))
    else:
        _print_status(items)
    return 0 if all(s.state == "running" for s in items) else 1


def cmd_env(args) -> int:
    from tasks import stack

    config = _config(args)
    _print_env(config, stack.credentials(config.root))
    return 0


# ---- bucket ------------------------------------------------------------------------------------

def _settings(args):
    """(config, model directory) of the workspace (``--workspace``, ``$CNS_WORKSPACE``, or the current
    directory if it is one), never of whatever directory the command runs in; ``--config`` replaces
    the workspace's params.yaml. Outside any workspace: the defaults, and no model."""
    import os
    from pathlib import Path

    from cns.config import load_config
    from tasks.versioning import WorkspaceError, open_workspace

    try:
        ws = open_workspace(args.workspace)
    except WorkspaceError:
        if args.workspace or os.environ.get("CNS_WORKSPACE"):
            raise
        ws = None
    config = load_config(args.params) if args.params else ws.config() if ws else load_config(None)
    return config, (ws.model_dir if ws else Path(config.model_dir))


def cmd_drop(args) -> int:
    from tasks import bucket, s3

    config, _ = _settings(args)
    name, digest = bucket.drop(s3.client(), s3.bucket_name(), args.directory, limits=config.limits)
    print(f"dropped s3://{s3.bucket_name()}/incoming/{name}/ (dataset hash {digest})")
    return 0


def cmd_datasets(args) -> int:
    from cns.lineage import read_lineage
    from tasks import bucket, s3

    config, model_dir = _settings(args)
    client, name = s3.client(), s3.bucket_name()
    found = bucket.scan(client, name, limits=config.limits, lineage=read_lineage(model_dir),
                        cache=bucket.HashCache(bucket.default_cache_path(client, name)))
    found = [d for d in found if args.state in (None, d.state)]
    rows = []
    for d in found:
        reason = bucket.read_error(client, name, d) if d.state == "rejected" else None
        rows.append({"concept": d.concept, "state": d.state, "hash": d.hash, "hash_kind": d.hash_kind,
                     "objects": len(d.objects), "error": reason and {"code": reason["code"],
                                                                     "message": reason["message"]}})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no datasets{' in state ' + args.state if args.state else ''} in s3://{name}/incoming/",
              file=sys.stderr)
    for r in rows:
        line = f"{r['state']:10} {r['concept']:24} {(r['hash'] or '-')[:16]}"
        print(line + (f"  {r['error']['code']}: {r['error']['message']}" if r["error"] else ""))
    return 0
