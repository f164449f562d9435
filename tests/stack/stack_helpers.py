"""Concept directories for the stack tests: small noise PNGs (or the shipped samples) and a manifest."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"


def token_for(name: str) -> str:
    """A valid token (at most 32 characters inside the brackets) unique to a concept name."""
    return f"<t{hashlib.sha256(name.encode()).hexdigest()[:12]}>"


def write_png(path: Path, seed: int, size: int = 64) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def make_concept(root: Path, name: str, *, images: int = 3, token: str | None = None, seed: int = 0,
                 manifest: dict | str | None = None) -> Path:
    """A concept directory of small noise PNGs and a manifest (a dict, raw YAML text, or default)."""
    directory = root / name
    directory.mkdir(parents=True)
    for i in range(images):
        write_png(directory / f"{i:02d}.png", seed * 1000 + i)
    if manifest is None:
        manifest = {"name": name, "token": token or token_for(name), "class_noun": "thing"}
    text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
    (directory / "concept.yaml").write_text(text)
    return directory


def set_params(ws, **sections) -> None:
    """Update sections of the workspace's params.yaml."""
    path = ws.root / "params.yaml"
    data = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@contextlib.contextmanager
def own_workspace(tmp_path_factory, prefix: str, **sections):
    """A new bucket (CNS_BUCKET while the block runs) and a workspace whose model_name is the
    bucket's name, with ``sections`` set in its params.yaml; yields (workspace, name, root)."""
    from tasks import s3
    from tasks.versioning import init_workspace

    name = f"{prefix}-{random.randrange(10**8)}"
    s3.client().create_bucket(Bucket=name)
    saved = os.environ.get("CNS_BUCKET")
    os.environ["CNS_BUCKET"] = name
    try:
        root = tmp_path_factory.mktemp(prefix)
        ws = init_workspace(root / "workspace")
        set_params(ws, pipeline={"model_name": name}, **sections)
        yield ws, name, root
    finally:
        if saved is None:
            os.environ.pop("CNS_BUCKET", None)
        else:
            os.environ["CNS_BUCKET"] = saved


def runs_tagged(model_name: str, tag: str, value: str) -> list:
    """The MLflow runs of the lineage ``model_name`` whose tag ``tag`` is ``value`` (none while the
    lineage's experiment does not exist yet: its first run creates it)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(model_name)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], f"tags.`{tag}` = '{value}'")


# ---- the invariants every fault test ends with ------------------------------------------------

def _remote_json(ws, md5: str):
    """A JSON object of the workspace's DVC remote (``s3://<bucket>/dvc``), read from the bucket."""
    import json

    from tasks import s3

    body = s3.client().get_object(Bucket=s3.bucket_name(), Key=f"dvc/files/md5/{md5[:2]}/{md5[2:]}")["Body"]
    return json.loads(body.read())


def _remote_has(md5: str) -> bool:
    from tasks import bucket, s3

    try:
        s3.client().head_object(Bucket=s3.bucket_name(), Key=f"dvc/files/md5/{md5[:2]}/{md5[2:]}")
    except bucket.client_errors():
        return False
    return True


def _tag_file_md5(ws, tag: str, dvc_file: str) -> str:
    from tasks.versioning import git

    return yaml.safe_load(git(ws, "show", f"{tag}:{dvc_file}"))["outs"][0]["md5"]


def assert_learned_exactly_once(ws, model_name: str, dropped: list[str], in_order: bool = False,
                                lock_wait: float = 5) -> list[str]:
    """What the pipeline promises after any fault, once a pass has run to its end:

    - every dropped dataset learned exactly once (``in_order``: in the order given);
    - versions ``model-v1..N`` contiguous, N = the number of datasets, the workspace at ``model-vN``
      with nothing uncommitted;
    - each tag's lineage, read from the DVC remote through the tag's ``data/model.dvc``, holds the
      first k concepts, and the remote holds the tag's dataset and the new concept's files;
    - one complete (FINISHED) MLflow run per version, linked to its tag, none left running, and one
      registry version per version, from that run, the alias on the newest;
    - no stale lock: no git lock file, no DVC lock entry, the lineage lock free at once (the file
      lock and the Prefect concurrency slot, within ``lock_wait`` seconds).

    Returns the learned concept names in version order."""
    import json

    from mlflow import MlflowClient

    from cns.lineage import read_lineage
    from tasks import learning, tracking
    from tasks.versioning import git

    lineage = read_lineage(ws.model_dir)
    names = [c.name for c in lineage.concepts] if lineage else []
    assert len(names) == len(set(names)), f"learned twice: {names}"
    assert (names if in_order else sorted(names)) == (list(dropped) if in_order else sorted(dropped))
    n = len(names)
    assert lineage.version == n and [c.version for c in lineage.concepts] == list(range(1, n + 1))

    tags = git(ws, "tag", "--list", "model-v*").split()
    assert sorted(tags, key=lambda t: int(t.split("v")[-1])) == [f"model-v{k}" for k in range(1, n + 1)]
    assert git(ws, "rev-parse", "HEAD") == git(ws, "rev-list", "-n", "1", f"model-v{n}")
    assert git(ws, "status", "--porcelain", "--", "data", "dvc.lock", "metrics") == ""
    for k, name in enumerate(names, start=1):
        tag = f"model-v{k}"
        assert git(ws, "log", "-1", "--format=%s", tag) == f"model v{k}: learn {name}"
        listing = {entry["relpath"]: entry["md5"] for entry in _remote_json(ws, _tag_file_md5(ws, tag, "data/model.dvc"))}
        tagged = _remote_json(ws, listing["lineage.json"])
        assert tagged["version"] == k and [c["name"] for c in tagged["concepts"]] == names[:k], tag
        newest = tagged["concepts"][-1]
        assert _remote_has(listing[newest["mask"]]) and _remote_has(listing[newest["delta"]]), tag
        assert _remote_has(_tag_file_md5(ws, tag, f"{ws.datasets}/{name}.dvc")), tag

    client = MlflowClient()
    experiment = client.get_experiment_by_name(model_name)
    runs = client.search_runs([experiment.experiment_id], "", max_results=5000) if experiment else []
    concept_runs = [r for r in runs if r.data.tags.get("cns.kind") is None]
    assert [r.info.run_id for r in concept_runs if r.data.tags.get(tracking.STATE) == "running"] == []
    complete = {int(r.data.tags[tracking.VERSION]): r for r in concept_runs
                if r.data.tags.get(tracking.STATE) == "complete"}
    assert len(complete) == len([r for r in concept_runs if r.data.tags.get(tracking.STATE) == "complete"]), \
        "two complete runs for one version"
    assert sorted(complete) == list(range(1, n + 1))
    for k, run in complete.items():
        assert run.info.status == "FINISHED" and run.data.tags["cns.concept"] == names[k - 1]
        assert run.data.tags.get("cns.git_tag") == f"model-v{k}", f"run of v{k} not linked to its tag"
        assert run.data.tags.get("cns.workspace_commit") == git(ws, "rev-list", "-n", "1", f"model-v{k}")
    versions = client.search_model_versions(f"name='{model_name}'") if n else []
    assert sorted(int(v.tags["model_version"]) for v in versions) == list(range(1, n + 1))
    assert all(v.run_id == complete[int(v.tags["model_version"])].info.run_id for v in versions)
    if n:
        assert client.get_model_version_by_alias(model_name, "current").tags["model_version"] == str(n)

    assert not list((ws.root / ".git").glob("*.lock")) and not list((ws.root / ".git" / "refs").rglob("*.lock"))
    rwlock = ws.root / ".dvc" / "tmp" / "rwlock"
    if rwlock.exists() and rwlock.read_text().strip():
        assert not any(json.loads(rwlock.read_text()).values()), rwlock.read_text()
    config = ws.config()
    with learning.lineage_lock(ws, config, timeout_seconds=lock_wait):
        pass
    return names


# ---- stopping one server of the test session's stack -------------------------------------------

def stop_service(stack_config, name: str, timeout: float = 20.0) -> None:
    """Stop one service of the stack this test session started (``tests/stack/conftest.py``): the
    process group its pid record names, as ``stack.down`` does (SIGTERM, SIGKILL after ``timeout``).
    Never touches another stack: the record lives in the session's own stack directory."""
    import signal
    import time

    from tasks import stack

    record = stack._read_record(stack_config, name)
    assert record is not None, f"{name} of {stack_config.root} is not running"
    pgid = record["pid"]
    stack._signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while stack._group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if stack._group_members(pgid):
        stack._signal_group(pgid, signal.SIGKILL)
        while stack._group_members(pgid):
            time.sleep(0.1)
    stack._record_path(stack_config, name).unlink(missing_ok=True)


def start_services(stack_config) -> None:
    """Start again whatever service of the session's stack is stopped (``stack.up`` leaves the
    running ones alone) and wait for its health check."""
    from tasks import stack

    stack.up(stack_config, timeout=120)
