"""The DVC workspace: a git repository with ``dvc.yaml``, ``params.yaml`` and ``data/``, in which
every learned concept is one model version (``dvc add``, ``git commit``, tag ``model-vN``,
``dvc push`` to an S3 remote in the same bucket).

A version is committed only after its data is pushed, so a tag always points at data the remote
has. Anything written after the last tag (a crash mid-version) is rolled back by
:func:`rollback_uncommitted` before the next pass. Paths given to DVC are absolute or resolved
inside :func:`dvc_repo`, because DVC's Python API resolves paths against the current directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from cns.config import Config, load_config
from cns.errors import CNSError
from cns.lineage import ConceptRecord, datasets_dir, read_lineage
from tasks.faults import fault_point
from tasks.s3 import bucket_name, endpoint_url

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TAG_PREFIX = "model-v"
# The model as a DVC artifact (dvc.yaml `artifacts:`): each version also gets the annotated tag
# `model@v<N>.0.0` that `dvc artifacts get <workspace> model --rev v<N>.0.0` resolves (GTO's
# tag format: semver, annotated; DVC ignores lightweight tags like model-vN).
ARTIFACT = "model"
REMOTE = "storage"
METRICS = "metrics"
# Written (in .git, never committed) before a pass changes data/model, removed once the version is
# tagged or rolled back: only a version a pass was writing is ever rolled back.
IN_PROGRESS = "cns-version-in-progress"
# In .git of a clone of a lineage that lives in S3 (tasks.lineages): its bucket.
LINEAGE_MARKER = "cns-lineage"


class WorkspaceError(CNSError):
    code = "workspace_invalid"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def model_dir(self) -> Path:
        return self.root / "data" / "model"

    @property
    def datasets_dir(self) -> Path:
        """``data/datasets`` (``data/concepts`` in a workspace made before the rename)."""
        return datasets_dir(self.root / "data")

    @property
    def datasets(self) -> str:
        """:attr:`datasets_dir` relative to the root, as git and DVC name it."""
        return self.datasets_dir.relative_to(self.root).as_posix()

    def versioned(self) -> tuple[str, ...]:
        """What a version commits to git besides its dataset's .dvc file; a rollback restores all
        of it (params.yaml, the user's, is committed with the next version and never reverted)."""
        return ("data/model.dvc", "data/.gitignore", f"{self.datasets}/.gitignore", "dvc.lock", METRICS)

    @property
    def metrics_dir(self) -> Path:
        return self.root / METRICS

    def config(self, overrides: list[str] | None = None) -> Config:
        """``params.yaml`` of the workspace, with its paths made absolute."""
        config = load_config(self.root / "params.yaml", overrides)
        config.model_dir = str(self.root / config.model_dir)
        config.cache_dir = str(self.root / config.cache_dir)
        return config


def git(ws: Workspace, *args: str, check: bool = True) -> str:
    proc = subprocess.run(["git", *args], cwd=ws.root, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise WorkspaceError(ws.root, f"git {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}",
                             "git_failed")
    return proc.stdout.strip()


@contextlib.contextmanager
def dvc_repo(ws: Workspace):
    from dvc.repo import Repo

    # DVC's INFO lines are instructions for an interactive user ("To track the changes with git,
    # run: ..."); this module does those steps itself.
    logging.getLogger("dvc").setLevel(logging.WARNING)
    previous = os.getcwd()
    os.chdir(ws.root)
    try:
        with Repo(str(ws.root)) as repo:
            yield repo
    finally:
        os.chdir(previous)


def open_workspace(path: str | Path | None = None) -> Workspace:
    """The workspace at ``path``, ``$CNS_WORKSPACE`` or the current directory (the checkout)."""
    root = Path(path or os.environ.get("CNS_WORKSPACE") or ".").resolve()
    for required in (".git", ".dvc", "dvc.yaml", "params.yaml"):
        if not (root / required).exists():
            raise WorkspaceError(root / required, "missing: not a cns workspace (create one with `cns init DIR`)",
                                 "workspace_missing")
    ws = Workspace(root)
    bucket = lineage_bucket(ws)
    if bucket and not os.environ.get("CNS_BUCKET"):
        os.environ["CNS_BUCKET"] = bucket  # a lineage clone names its bucket: this process works for it
    elif bucket and os.environ["CNS_BUCKET"] != bucket:
        raise WorkspaceError(root, f"is a clone of the lineage in s3://{bucket}, but CNS_BUCKET is "
                             f"{os.environ['CNS_BUCKET']}: its datasets would be learned into the wrong lineage",
                             "lineage_mismatch")
    configure_remote_endpoint(ws, bucket)
    return ws


def lineage_bucket(ws: Workspace) -> str | None:
    """The bucket of a clone of a lineage that lives in S3 (tasks.lineages); None for a workspace of
    its own (``cns init``)."""
    path = ws.root / ".git" / LINEAGE_MARKER
    return path.read_text().strip() if path.exists() else None


def configure_remote_endpoint(ws: Workspace, bucket: str | None = None) -> None:
    """Point the DVC remote at the bucket and S3 endpoint of the environment (``CNS_BUCKET``,
    ``AWS_ENDPOINT_URL_S3``), in ``.dvc/config.local``, which stays out of git; with no endpoint
    set, DVC talks to AWS S3 itself. Credentials are read from the environment by DVC's S3 client."""
    path = ws.root / ".dvc" / "config.local"
    endpoint = endpoint_url()
    text = f"['remote \"{REMOTE}\"']\n    url = s3://{bucket or bucket_name()}/dvc\n"
    if endpoint:
        text += f"    endpointurl = {endpoint}\n"
    if (path.read_text() if path.exists() else "") != text:
        path.write_text(text)


def init_workspace(directory: str | Path, bucket: str | None = None) -> Workspace:
    """Create a workspace: git init, the project's ``params.yaml`` and ``dvc.yaml``, dvc init, an
    S3 remote at ``s3://<bucket>/dvc``, and a first commit. An existing workspace is kept."""
    root = Path(directory).resolve()
    if (root / ".dvc").exists() and (root / ".git").exists():
        return open_workspace(root)
    if root.exists() and any(root.iterdir()):
        raise WorkspaceError(root, "exists and is not empty; choose a new directory", "workspace_exists")
    root.mkdir(parents=True, exist_ok=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(PROJECT_ROOT / name, root / name)
    (root / ".gitignore").write_text("/outputs/\n/data/.model.lock\n/data/.model.lease*\n/data/.model.waiting/\n")
    ws = Workspace(root)
    git(ws, "init", "-q", "-b", "main")
    # Commits are made by the pipeline; a machine without a global git identity still needs one.
    if not git(ws, "config", "user.email", check=False):
        git(ws, "config", "user.email", "cns-pipeline@localhost")
        git(ws, "config", "user.name", "cns-pipeline")
    from dvc.repo import Repo

    Repo.init(str(root)).close()
    with dvc_repo(ws) as repo:
        with repo.config.edit() as conf:
            conf["remote"][REMOTE] = {"url": f"s3://{bucket or bucket_name()}/dvc"}
            conf["core"]["remote"] = REMOTE
            conf["core"]["analytics"] = False
    configure_remote_endpoint(ws, bucket)
    git(ws, "add", "-A")
    git(ws, "commit", "-q", "-m", "workspace: init")
    return ws


def last_version(ws: Workspace) -> int:
    tags = git(ws, "tag", "--list", f"{TAG_PREFIX}*").split()
    numbers = [int(m.group(1)) for t in tags if (m := re.fullmatch(rf"{TAG_PREFIX}(\d+)", t))]
    return max(numbers, default=0)


def dvc_hash(ws: Workspace, dvc_file: str = "data/model.dvc") -> str | None:
    path = ws.root / dvc_file
    if not path.exists():
        return None
    return yaml.safe_load(path.read_text())["outs"][0]["md5"]


def add_and_push(ws: Workspace, record: ConceptRecord | None) -> None:
    """dvc add the model and the concept's dataset (``None``: the model only, for a removal),
    record the in-process metrics as the ``evaluate`` stage's outputs, and push everything to
    the remote (idempotent)."""
    with dvc_repo(ws) as repo:
        # One target at a time, so that the fault tests can kill the worker half-way through each
        # (``dvc-add-half``: the model added, the dataset not; ``dvc-push-half``: the model's objects
        # on the remote, the rest not): the states a kill inside one dvc call can leave.
        repo.add(["data/model"])
        fault_point("dvc-add-half")
        if record is not None:
            repo.add([f"{ws.datasets}/{record.name}"])
        if (ws.metrics_dir / "eval.json").exists():
            repo.commit("evaluate", force=True)
        if (ws.root / "data" / "cache").exists():
            repo.commit("calibrate", force=True)
        fault_point("dvc-add")
        repo.push(["data/model"])
        fault_point("dvc-push-half")
        repo.push()
        fault_point("dvc-push")


def commit_and_tag(ws: Workspace, record: ConceptRecord, action: str = "learn",
                   version: int | None = None) -> dict[str, str]:
    """git commit "model vN: learn <concept>" (``action="forget"``: "model vN: forget <concept>",
    a removal, with ``version`` its model version) and tag ``model-vN``: the version exists from here."""
    version = record.version if version is None else version
    tag = f"{TAG_PREFIX}{version}"
    if git(ws, "tag", "--list", tag):  # a retry after the tag was made
        end_version(ws)
        tag_artifact_versions(ws)
        return {"commit": git(ws, "rev-list", "-n", "1", tag), "tag": tag, "dvc_hash": dvc_hash(ws) or ""}
    paths = [p for p in ("params.yaml", *ws.versioned(), f"{ws.datasets}/{record.name}.dvc") if (ws.root / p).exists()]
    git(ws, "add", "--", *paths)
    git(ws, "commit", "-q", "-m", f"model v{version}: {action} {record.name}", "--", *paths)
    git(ws, "tag", tag)
    end_version(ws)
    tag_artifact_versions(ws)
    return {"commit": git(ws, "rev-parse", "HEAD"), "tag": tag, "dvc_hash": dvc_hash(ws) or ""}


def artifact_tag(version: int) -> str:
    return f"{ARTIFACT}@v{version}.0.0"


def tag_artifact_versions(ws: Workspace) -> list[str]:
    """Give every version tag ``model-vN`` its artifact tag ``model@vN.0.0`` where it has none yet
    (idempotent: a tag missed by a crash between the two is made with the next version's)."""
    have = set(git(ws, "tag", "--list", f"{ARTIFACT}@v*").split())
    made = []
    for tag in git(ws, "tag", "--list", f"{TAG_PREFIX}*").split():
        match = re.fullmatch(rf"{TAG_PREFIX}(\d+)", tag)
        if match and artifact_tag(int(match.group(1))) not in have:
            made.append(artifact_tag(int(match.group(1))))
            git(ws, "tag", "-a", made[-1], "-m", f"Registering artifact {ARTIFACT} version v{match.group(1)}.0.0",
                f"{tag}^{{commit}}")
    return made


def begin_version(ws: Workspace, version: int) -> None:
    """Say that this pass is about to write model v``version`` into ``data/model``: from here
    until it is tagged, :func:`rollback_uncommitted` may throw it away."""
    (ws.root / ".git" / IN_PROGRESS).write_text(f"{version}\n")


def end_version(ws: Workspace) -> None:
    (ws.root / ".git" / IN_PROGRESS).unlink(missing_ok=True)


def version_in_progress(ws: Workspace) -> int | None:
    path = ws.root / ".git" / IN_PROGRESS
    text = path.read_text().strip() if path.exists() else ""
    return int(text) if text.isdigit() else None


def refuse_foreign_versions(ws: Workspace, lineage_version: int, committed: int) -> None:
    """A model in ``data/model`` ahead of the last tag that no pass was writing (``cns learn`` or
    ``cns forget`` into the workspace's model directory) is not the pipeline's to throw away."""
    writing = version_in_progress(ws)
    if lineage_version <= committed or (writing is not None and lineage_version <= writing):
        return
    names = ", ".join(c.name for c in read_lineage(ws.model_dir).concepts) or "no concept"
    raise WorkspaceError(ws.model_dir, f"holds model v{lineage_version} ({names}), written outside the pipeline "
                         f"(its last version is {f'{TAG_PREFIX}{committed}' if committed else 'none'}); a pass would "
                         "roll it back, so none runs: move this directory away (or `cns learn --model-dir` "
                         "elsewhere), or run the pipeline in its own workspace (`cns init DIR`)", "model_not_pipelines")


def clear_stale_git_locks(ws: Workspace) -> list[str]:
    """Remove the lock files a git process killed mid-command leaves in ``.git`` (``index.lock``,
    ``next-index-*.lock``, ref locks): each would fail every later git write in the workspace.

    Call only while holding the lineage lock: every git command of the pipeline runs under it, so
    a lock file present then belongs to a process that is gone. (The workspace's git is the
    pipeline's: run no git writes in it by hand while a pass runs.)"""
    gitdir = ws.root / ".git"
    stale = sorted({*gitdir.glob("*.lock"), *(gitdir / "refs").rglob("*.lock")})
    for path in stale:
        log.warning("removing %s, left by a git command that was killed", path.relative_to(ws.root))
        path.unlink(missing_ok=True)
    return [str(path.relative_to(ws.root)) for path in stale]


def complete_untagged_version(ws: Workspace) -> int | None:
    """Tag a version whose ``git commit`` was made but whose ``git tag`` was not (the process was
    killed in between); returns its number, or None when there is none.

    The commit comes only after ``dvc add`` and ``dvc push`` succeeded (:func:`version_model`'s
    order), and git makes a commit whole or not at all, so the commit ``model vN: learn <name>``
    or ``model vN: forget <name>`` (a removal) right after tag ``model-v(N-1)``, holding
    ``data/model.dvc`` (and, for a learn, ``data/datasets/<name>.dvc``), is a whole version."""
    committed = last_version(ws)
    match = re.fullmatch(r"model v(\d+): (learn|forget) (\S+)", git(ws, "log", "-1", "--format=%s"))
    if not match or int(match.group(1)) != committed + 1:
        return None
    if committed and git(ws, "rev-parse", "HEAD~1") != git(ws, "rev-list", "-n", "1", f"{TAG_PREFIX}{committed}"):
        return None
    required = ["data/model.dvc"] + ([f"{ws.datasets}/{match.group(3)}.dvc"] if match.group(2) == "learn" else [])
    if len(git(ws, "ls-tree", "--name-only", "HEAD", "--", *required).split()) != len(required):
        return None
    version = int(match.group(1))
    log.warning("completing model v%d: its commit was made, its tag was not", version)
    git(ws, "tag", f"{TAG_PREFIX}{version}", "HEAD")
    end_version(ws)
    tag_artifact_versions(ws)
    return version


def remove_untracked_datasets(ws: Workspace) -> None:
    """Remove the dataset folders no committed ``.dvc`` file tracks (an unfinished version's)."""
    tracked = set(git(ws, "ls-files", "--", ws.datasets).split())
    if ws.datasets_dir.exists():
        for folder in ws.datasets_dir.iterdir():
            if folder.is_dir() and f"{ws.datasets}/{folder.name}.dvc" not in tracked:
                shutil.rmtree(folder)


def rollback_uncommitted(ws: Workspace) -> int | None:
    """Restore the model, datasets and metrics to the last tagged version.

    Returns the lineage version that was thrown away, or None when the workspace was clean. A
    crash mid-version leaves at most: a new concept folder and lineage in ``data/model``, a new
    dataset folder, new or changed ``.dvc`` files, ``dvc.lock`` and metrics, and a commit that
    is not tagged (call :func:`complete_untagged_version` first: a whole one is kept). The files
    come back from the last *tag*, not from ``HEAD``. A model ahead of the last tag that no pass
    was writing is refused (WorkspaceError), never thrown away (:func:`refuse_foreign_versions`).
    """
    committed = last_version(ws)
    ref = f"{TAG_PREFIX}{committed}" if committed else "HEAD"
    lineage = read_lineage(ws.model_dir)
    current = lineage.version if lineage else 0
    refuse_foreign_versions(ws, current, committed)
    paths = (*ws.versioned(), ws.datasets)
    in_ref = git(ws, "ls-tree", "-r", "--name-only", ref, "--", *paths).split("\n")
    tracked = [p for p in paths if any(f == p or f.startswith(p + "/") for f in in_ref)]
    watched = ("data/model.dvc", ws.datasets, "dvc.lock", METRICS)
    dirty = git(ws, "status", "--porcelain", "--", *watched) or git(ws, "diff", "--name-only", ref, "--", *watched)
    if current == committed and not dirty:
        end_version(ws)
        return None
    log.warning("rolling back an unfinished model version (lineage v%d, last tag v%d)", current, committed)
    if tracked:
        git(ws, "checkout", ref, "--", *tracked)
    # Added by the `git add` of a version whose commit never came (killed inside `git commit`):
    # out of the index too, or the first version's data/model.dvc would bring the model back.
    staged = set(git(ws, "diff", "--cached", "--name-only", "--diff-filter=A", "HEAD", "--", *paths).split()) \
        - set(in_ref)
    if staged:
        git(ws, "rm", "-q", "--cached", "--", *staged)
    for path in staged | set(git(ws, "diff", "--name-only", ref, "HEAD", "--", *paths).split()) - set(in_ref):
        (ws.root / path).unlink(missing_ok=True)  # committed after the tag (or staged) by an unfinished version
    # Untracked files of the unfinished version: its dataset folders, metrics, and a first version's
    # data/model.dvc written by `dvc add` (which the checkout below would otherwise restore the
    # thrown-away model from). Tracked ones came back from the tag above.
    git(ws, "clean", "-fdq", "--", ws.datasets, METRICS, "data/model.dvc", "dvc.lock", check=False)
    remove_untracked_datasets(ws)
    if (ws.root / "data/model.dvc").exists():
        with dvc_repo(ws) as repo:
            repo.checkout(targets=["data/model.dvc"], force=True)
    elif ws.model_dir.exists():
        shutil.rmtree(ws.model_dir)
    end_version(ws)
    return current
