"""The `cns drop`, `cns datasets` and `cns stack` commands as a user runs them (subprocess,
environment from `cns stack env`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cns.concept import hash_concept_dir

from stack_helpers import make_concept

pytestmark = pytest.mark.stack
REPO = Path(__file__).resolve().parents[2]


def cns(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `cns` in ``cwd`` (so params.yaml and data/model are the test's, not the repo's)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_drop_then_datasets_lists_it_pending_with_its_hash(running_stack, tmp_path, concept_name):
    source = make_concept(tmp_path, concept_name)
    dropped = cns("drop", str(source), cwd=tmp_path)
    assert dropped.returncode == 0, dropped.stderr
    assert hash_concept_dir(source) in dropped.stdout
    listed = cns("datasets", "--state", "pending", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = {r["concept"]: r for r in json.loads(listed.stdout)}
    assert rows[concept_name]["hash"] == hash_concept_dir(source)


def test_drop_of_a_bad_directory_is_a_one_line_error_and_uploads_nothing(running_stack, tmp_path, concept_name):
    source = make_concept(tmp_path, concept_name, images=1)
    result = cns("drop", str(source), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"cns: error: {source}: holds 1 images, fewer than the minimum of 3")
    s3 = running_stack.client()
    assert s3.list_objects_v2(Bucket=running_stack.bucket, Prefix=f"incoming/{concept_name}/")["KeyCount"] == 0


def test_wrong_credentials_are_a_one_line_error(running_stack, tmp_path):
    env_backup = os.environ["AWS_SECRET_ACCESS_KEY"]
    os.environ["AWS_SECRET_ACCESS_KEY"] = "wrong"
    try:
        result = cns("datasets", cwd=tmp_path)
    finally:
        os.environ["AWS_SECRET_ACCESS_KEY"] = env_backup
    assert result.returncode == 2
    assert result.stderr.startswith(f"cns: error: s3://{running_stack.bucket}/incoming/: access refused")
    assert len(result.stderr.strip().splitlines()) == 1


def test_stack_env_prints_what_the_clients_need(running_stack, tmp_path):
    result = cns("stack", "env", "--dir", str(running_stack.config.root), cwd=tmp_path)
    exports = dict(line[len("export "):].split("=", 1) for line in result.stdout.splitlines()
                   if line.startswith("export "))
    assert exports["AWS_ENDPOINT_URL_S3"] == running_stack.config.s3_url
    assert exports["MLFLOW_TRACKING_URI"] == running_stack.config.mlflow_url
    assert exports["PREFECT_API_URL"] == running_stack.config.prefect_api_url
    assert exports["AWS_ACCESS_KEY_ID"] == running_stack.creds.access_key


def test_flows_run_in_the_test_process_talk_to_the_stacks_prefect(running_stack):
    """Not to a temporary server of their own: Prefect was imported (by the test modules) before
    the stack's environment was exported (tests/stack/conftest.py refreshes its settings)."""
    import prefect  # noqa: F401  (imported before the check, as a test module would)
    from prefect.settings import get_current_settings

    assert get_current_settings().api.url == running_stack.config.prefect_api_url


def test_stack_status_exits_zero_when_all_run(running_stack, tmp_path):
    result = cns("stack", "status", "--json", "--dir", str(running_stack.config.root), cwd=tmp_path)
    assert result.returncode == 0
    assert {s["name"]: s["state"] for s in json.loads(result.stdout)} == {
        "s3": "running", "mlflow": "running", "prefect": "running", "events": "running"}
