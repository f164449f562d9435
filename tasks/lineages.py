"""Lineages that live in S3 alone, so that any worker of a Prefect work pool can write them.

A lineage is one bucket: the bucket contract (``incoming/``, ``forget/``, ``rejected/``), the DVC
remote (``dvc/``), and ``git/model-v<N>.bundle``, the workspace's whole git history at version N
(a git bundle: params, ``.dvc`` files and metrics, a few KB a version). Workers share nothing but
S3, MLflow and Prefect:

- **Start.** A worker clones the lineage from its newest bundle into a folder of its own machine
  (``$CNS_LINEAGES_DIR/<bucket>``, default ``~/.cache/cns-pipeline/lineages``), then, inside the
  lineage lock, brings the clone to the newest bundle and ``dvc pull``s it (:func:`sync`). What
  the clone holds beyond that (a pass that was killed, or one that lost the race below) is thrown
  away there: only a published version is a version.
- **Publish.** Each version's bundle is written with S3's conditional put (``If-None-Match: *``):
  a compare-and-swap on the tag. If two workers both make ``model-vN`` (the Prefect lock's lease
  ran out under one of them), one bundle is written and the other worker gets a
  :class:`LineageConflict`; its version never existed, its MLflow run is marked rolled back by
  the next pass, and its dataset is learned again on top of the winner's version if it still is
  pending.

Each lineage has its own ``pipeline.model_name`` (its MLflow experiment, registry name and
Prefect lock), set by :func:`create`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from cns.errors import CNSError
from cns.lineage import read_lineage
from tasks import s3
from tasks.versioning import (LINEAGE_MARKER, TAG_PREFIX, Workspace, WorkspaceError, dvc_repo, end_version, git,
                              last_version, lineage_bucket, open_workspace, remove_untracked_datasets,
                              version_in_progress)

GIT_PREFIX = "git/"
COMMIT_META = "commit"  # the bundle's x-amz-meta-commit: the version's commit
# In a clone's .git while sync resets and pulls it: a clone left with it was synced half-way.
SYNCING = "cns-sync-in-progress"


class LineageConflict(CNSError):
    code = "version_conflict"


def lineages_dir() -> Path:
    return Path(os.environ.get("CNS_LINEAGES_DIR") or Path.home() / ".cache" / "cns-pipeline" / "lineages")


def bundle_key(version: int) -> str:
    return f"{GIT_PREFIX}{TAG_PREFIX}{version}.bundle"


def published(client, bucket: str) -> tuple[int, str] | None:
    """(N, commit) of the newest bundle in ``s3://<bucket>/git/``; None when there is none."""
    numbers = [int(m.group(1)) for key, *_ in s3.list_objects(client, bucket, GIT_PREFIX)
               if (m := re.fullmatch(rf"{GIT_PREFIX}{TAG_PREFIX}(\d+)\.bundle", key))]
    if not numbers:
        return None
    version = max(numbers)
    return version, _s3(lambda: client.head_object(Bucket=bucket, Key=bundle_key(version)),
                        bucket, bundle_key(version))["Metadata"].get(COMMIT_META, "")


def _s3(call, bucket: str, key: str):
    """``call()``, its S3 errors named after the object (S3Error)."""
    try:
        return call()
    except s3.client_errors() as exc:
        raise s3.describe_error(exc, f"s3://{bucket}/{key}") from exc


def bundle_heads(bundle: Path) -> dict[str, str]:
    """{ref: commit} of a downloaded bundle (empty when git cannot read it)."""
    proc = subprocess.run(["git", "bundle", "list-heads", str(bundle)], capture_output=True, text=True)
    lines = proc.stdout.splitlines() if proc.returncode == 0 else []
    return {ref: commit for commit, ref in (line.split(maxsplit=1) for line in lines if " " in line)}


def bundle_commit(heads: dict[str, str], bundle: Path, version: int) -> str:
    """The commit of version ``version`` in a bundle's heads (tag ``model-vN``; for v0, main)."""
    wanted = f"refs/tags/{TAG_PREFIX}{version}" if version else "refs/heads/main"
    if wanted not in heads:
        raise WorkspaceError(bundle, f"is not a lineage bundle of version {version} (no {wanted})",
                             "lineage_invalid")
    return heads[wanted]


def _error_code(exc) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _put_bundle(ws: Workspace, client, bucket: str, version: int, commit: str) -> None:
    """Write ``git/model-v<version>.bundle`` unless it exists (the compare-and-swap)."""
    from botocore.exceptions import ClientError

    key = bundle_key(version)
    with tempfile.TemporaryDirectory(prefix="cns-bundle-") as tmp:
        path = Path(tmp) / "lineage.bundle"
        git(ws, "bundle", "create", "-q", str(path), "--all")
        try:
            with path.open("rb") as body:
                client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*", Metadata={COMMIT_META: commit})
            return
        except ClientError as exc:
            if _error_code(exc) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise s3.describe_error(exc, f"s3://{bucket}/{key}") from exc
    other = _s3(lambda: client.head_object(Bucket=bucket, Key=key), bucket, key)["Metadata"].get(COMMIT_META, "")
    if other != commit:
        raise LineageConflict(f"s3://{bucket}/{key}", f"{TAG_PREFIX}{version} was published by another worker "
                              f"(commit {other[:12]}); this pass's {TAG_PREFIX}{version} (commit {commit[:12]}) is "
                              "not the lineage's and is thrown away by the next pass")


def publish(ws: Workspace, version: int) -> None:
    """Make tag ``model-v<version>`` of a lineage clone the lineage's (nothing for a workspace of
    its own). Idempotent: a retry of the same commit finds its own bundle."""
    bucket = lineage_bucket(ws)
    if bucket is None:
        return
    commit = git(ws, "rev-list", "-n", "1", f"{TAG_PREFIX}{version}")
    _put_bundle(ws, s3.client(), bucket, version, commit)


def create(bucket: str, model_name: str, params: Path | None = None) -> int:
    """A new lineage in ``s3://<bucket>`` (made if missing): a workspace with ``params`` (default:
    the project's params.yaml) and ``pipeline.model_name`` set, published as ``git/model-v0.bundle``.
    Returns 0; a bucket that already holds a lineage is refused."""
    from mlflow import MlflowClient

    from tasks.versioning import PROJECT_ROOT, init_workspace

    client = s3.client()
    with contextlib.suppress(*s3.client_errors()):
        client.head_bucket(Bucket=bucket)
        if published(client, bucket) is not None:
            raise WorkspaceError(f"s3://{bucket}/{GIT_PREFIX}", "already holds a lineage", "lineage_exists")
        if any(True for _ in s3.list_objects(client, bucket, "dvc/")):
            raise WorkspaceError(f"s3://{bucket}/dvc/", "holds the DVC remote of a workspace (`cns init`): its "
                                 "datasets would be learned again into a new lineage; use a new bucket",
                                 "lineage_exists")
    if MlflowClient().get_experiment_by_name(model_name) is not None:
        raise WorkspaceError(f"--model-name {model_name}", "is in use (an MLflow experiment of that name exists): "
                             "each lineage needs its own experiment, registered model and lock", "lineage_exists")
    with contextlib.suppress(*s3.client_errors()):
        client.create_bucket(Bucket=bucket)
    text = (params or PROJECT_ROOT / "params.yaml").read_text()
    text, found = re.subn(r"(?m)^(\s+model_name:\s*)\S+", lambda m: m.group(1) + model_name, text, count=1)
    if not found:
        text += f"pipeline:\n  model_name: {model_name}\n"
    with tempfile.TemporaryDirectory(prefix="cns-lineage-") as tmp:
        ws = init_workspace(Path(tmp) / "workspace", bucket=bucket)
        (ws.root / "params.yaml").write_text(text)
        ws.config()  # refuse bad params before anything is published
        git(ws, "commit", "-q", "-m", f"workspace: lineage {model_name} in s3://{bucket}", "--", "params.yaml")
        _put_bundle(ws, client, bucket, 0, git(ws, "rev-parse", "HEAD"))
    return 0


def _download(client, bucket: str, version: int, folder: Path) -> tuple[Path, str, dict[str, str]]:
    """The bundle of ``version``, its commit and its heads (read from the bundle itself)."""
    path = folder / f"{TAG_PREFIX}{version}.bundle"
    _s3(lambda: client.download_file(bucket, bundle_key(version), str(path)), bucket, bundle_key(version))
    heads = bundle_heads(path)
    return path, bundle_commit(heads, path, version), heads


def checkout(bucket: str) -> Workspace:
    """This machine's clone of the lineage (made from the newest bundle when missing; brought up
    to date by :func:`sync` inside the lineage lock, not here)."""
    root = lineages_dir() / bucket
    if not (root / ".git").exists():
        client = s3.client()
        head = published(client, bucket)
        if head is None:
            raise WorkspaceError(f"s3://{bucket}/{GIT_PREFIX}", "holds no lineage (create one with "
                                 "`cns lineage create BUCKET --model-name NAME`)", "lineage_missing")
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{bucket}-", dir=root.parent) as tmp:
            bundle, commit, _ = _download(client, bucket, head[0], Path(tmp))
            clone = Path(tmp) / "clone"
            proc = subprocess.run(["git", "clone", "-q", str(bundle), str(clone)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise WorkspaceError(f"s3://{bucket}/{bundle_key(head[0])}",
                                     f"git clone failed: {proc.stderr.strip()[-300:]}", "git_failed")
            ws = Workspace(clone)
            git(ws, "reset", "-q", "--hard", commit)
            git(ws, "config", "user.email", "cns-pipeline@localhost")
            git(ws, "config", "user.name", "cns-pipeline")
            git(ws, "remote", "remove", "origin")
            (clone / ".git" / LINEAGE_MARKER).write_text(bucket + "\n")
            with contextlib.suppress(OSError):  # another pass on this machine made it first: use that one
                clone.rename(root)
    return open_workspace(root)


def sync(ws: Workspace) -> bool:
    """Bring a lineage clone to the lineage's newest published version: its git history and tags,
    then ``data/model`` and the datasets from the DVC remote. Anything the clone holds beyond that is
    thrown away. Call with the lineage lock held. Returns whether the clone changed."""
    bucket = lineage_bucket(ws)
    if bucket is None:
        return False
    client = s3.client()
    head = published(client, bucket)
    if head is None:
        raise WorkspaceError(f"s3://{bucket}/{GIT_PREFIX}", "holds no lineage any more", "lineage_missing")
    version, commit = head
    lineage = read_lineage(ws.model_dir)
    syncing = ws.root / ".git" / SYNCING
    current = (git(ws, "rev-parse", "HEAD") == commit and version_in_progress(ws) is None and not syncing.exists()
               and (lineage.version if lineage else 0) == version == last_version(ws)
               and not git(ws, "status", "--porcelain", "--untracked-files=all", "--", "data", "metrics", "dvc.lock"))
    if current:
        return False
    syncing.write_text(f"{version}\n")
    with tempfile.TemporaryDirectory(prefix="cns-bundle-") as tmp:
        bundle, commit, heads = _download(client, bucket, version, Path(tmp))
        git(ws, "fetch", "-q", "--force", str(bundle), "+refs/tags/*:refs/tags/*",
            "+refs/heads/*:refs/remotes/lineage/*")
        theirs = {ref.removeprefix("refs/tags/") for ref in heads if ref.startswith("refs/tags/")}
        for tag in set(git(ws, "tag", "--list").split()) - theirs:
            git(ws, "tag", "-d", tag)
        git(ws, "reset", "-q", "--hard", commit)
    git(ws, "clean", "-fdq", "--", "data", "metrics", "dvc.lock", check=False)
    if ws.model_dir.exists():
        shutil.rmtree(ws.model_dir)
    remove_untracked_datasets(ws)
    end_version(ws)
    for targets in pull_targets(ws):  # one dvc pull each: a mix of both left data/model out (DVC 3)
        with dvc_repo(ws) as repo:
            repo.pull(targets=targets, force=True)
    syncing.unlink()
    return True


def pull_targets(ws: Workspace) -> list[list[str]]:
    """What ``dvc pull`` brings into a clone: the model and the datasets (their ``.dvc`` files), then
    the stage outputs in ``data/`` that ``dvc.lock`` has a hash for (the general-neuron cache)."""
    import yaml

    tracked = [p for p in ["data/model.dvc", *git(ws, "ls-files", "--", f"{ws.datasets}/*.dvc").split()]
               if (ws.root / p).exists()]
    lock = ws.root / "dvc.lock"
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.exists() else {}
    outputs = [out["path"] for stage in stages.values() for out in stage.get("outs", [])
               if out.get("md5") and str(out.get("path", "")).startswith("data/")]
    return [group for group in (tracked, outputs) if group]
