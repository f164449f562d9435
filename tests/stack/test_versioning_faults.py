"""A version is atomic across `git commit` and `git tag` (issue 10, item 4): a worker killed
between the two gets its tag completed by the next pass, and one killed inside `git commit`
(leaving `.git/index.lock`) does not wedge the passes after it.

The kills are real: a git hook in the workspace SIGKILLs the whole `cns run-once` process group
at that exact point (post-commit: the commit is made, the tag not yet; pre-commit: git holds
the index lock)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cns.lineage import read_lineage
from tasks import bucket, s3
from tasks.versioning import git, last_version

from stack_helpers import assert_learned_exactly_once, make_concept, own_workspace, runs_tagged

pytestmark = pytest.mark.stack

FAST = {"train": {"max_train_steps": 4}, "scoring": {"num_score_samples": 2, "score_batch_size": 2},
        "evaluate": {"num_inference_steps": 2, "num_images_per_prompt": 1, "loss_draws": 2}}
# Removes itself, then kills its process group: git, and the `cns run-once` that started it.
KILL_HOOK = '#!/bin/sh\nrm -f "$0"\nkill -KILL -$(ps -o pgid= -p $$ | tr -d " ")\n'


@pytest.fixture(scope="module")
def workspace(running_stack, tmp_path_factory):
    with own_workspace(tmp_path_factory, "vfault", **FAST) as (ws, name, root):
        yield ws, name, root / "src"


def run_once_killed_by(ws, hook: str) -> None:
    """`cns run-once` in its own process group, SIGKILLed by the git hook ``hook``."""
    hook_path = ws.root / ".git" / "hooks" / hook
    hook_path.write_text(KILL_HOOK)
    hook_path.chmod(0o755)
    cns = Path(sys.executable).parent / "cns"
    proc = subprocess.run([str(cns), "run-once", "--workspace", str(ws.root)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True, timeout=400)
    assert proc.returncode == -9, "the hook never ran"
    assert not hook_path.exists()


def _mlflow():
    from mlflow import MlflowClient

    return MlflowClient()


def test_killed_between_commit_and_tag_the_next_pass_completes_the_tag(workspace):
    from flows.pipeline import watch

    ws, name, src = workspace
    bucket.drop(s3.client(), name, make_concept(src, "v-first"))
    run_once_killed_by(ws, "post-commit")
    assert git(ws, "log", "-1", "--format=%s") == "model v1: learn v-first"  # committed ...
    assert git(ws, "tag", "--list", "model-v*") == ""  # ... and not tagged

    assert watch(str(ws.root)) == []  # nothing learned twice
    assert git(ws, "tag", "--list", "model-v*").split() == ["model-v1"]
    assert git(ws, "rev-list", "-n", "1", "model-v1") == git(ws, "rev-parse", "HEAD")
    assert read_lineage(ws.model_dir).version == 1 and last_version(ws) == 1
    (run,) = runs_tagged(name, "cns.state", "complete")
    assert run.data.tags["cns.concept"] == "v-first" and run.info.status == "FINISHED"
    assert runs_tagged(name, "cns.state", "rolled_back") == []
    versions = _mlflow().search_model_versions(f"name='{name}'")
    assert [v.tags["model_version"] for v in versions] == ["1"]
    assert git(ws, "status", "--porcelain", "--", "data", "dvc.lock", "metrics") == ""
    assert_learned_exactly_once(ws, name, ["v-first"])


def test_killed_inside_git_commit_the_stale_index_lock_does_not_wedge_the_next_pass(workspace):
    from flows.pipeline import watch

    ws, name, src = workspace
    before = last_version(ws)
    bucket.drop(s3.client(), name, make_concept(src, "v-second"))
    run_once_killed_by(ws, "pre-commit")
    assert (ws.root / ".git" / "index.lock").exists()  # what git leaves behind when killed here
    assert last_version(ws) == before

    outcomes = watch(str(ws.root))
    assert [(o["concept"], o["outcome"], o["version"]) for o in outcomes] == [("v-second", "learned", before + 1)]
    assert git(ws, "tag", "--list", "model-v*").split() == [f"model-v{v}" for v in range(1, before + 2)]
    assert not list((ws.root / ".git").glob("*.lock"))
    assert git(ws, "status", "--porcelain", "--", "data", "dvc.lock", "metrics") == ""
    assert_learned_exactly_once(ws, name, ["v-first", "v-second"])


def test_a_workspace_made_before_the_datasets_rename_keeps_data_concepts_through_kills(running_stack,
                                                                                        tmp_path_factory):
    """Workspaces made before ``data/datasets`` hold their datasets in ``data/concepts`` at every
    tag: they go on using it, through recovery too (completing a tag, undoing a staged version)."""
    from flows.pipeline import watch

    with own_workspace(tmp_path_factory, "legacy", **FAST) as (ws, name, root):
        (ws.root / "data" / "concepts").mkdir(parents=True)  # as a version learned by the old code leaves it
        assert ws.datasets == "data/concepts"
        src = root / "src"
        bucket.drop(s3.client(), name, make_concept(src, "l-first"))
        run_once_killed_by(ws, "post-commit")
        assert watch(str(ws.root)) == [] and last_version(ws) == 1
        bucket.drop(s3.client(), name, make_concept(src, "l-second"))
        run_once_killed_by(ws, "pre-commit")
        outcomes = watch(str(ws.root))
        assert [(o["concept"], o["outcome"], o["version"]) for o in outcomes] == [("l-second", "learned", 2)]
        assert git(ws, "ls-files", "--", "data/concepts").split() == [
            "data/concepts/.gitignore", "data/concepts/l-first.dvc", "data/concepts/l-second.dvc"]
        assert not (ws.root / "data" / "datasets").exists()
        assert git(ws, "status", "--porcelain", "--", "data", "dvc.lock", "metrics") == ""
        assert_learned_exactly_once(ws, name, ["l-first", "l-second"])
