"""`cns stack up|down|status` on real processes: authentication, idempotent up, stale pid
records, busy ports, a killed server, and a restart that keeps the data.

These run after the bucket tests (file order) because they stop and restart the session stack;
each leaves it running."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from flows.cli import build_parser
from tasks import stack

pytestmark = pytest.mark.stack


def cli(*argv: str) -> int:
    """Run a `cns` pipeline command in-process (the same parser flows.cli builds)."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    return args.func(args)


def raw_client(running_stack, **kwargs):
    return boto3.client("s3", endpoint_url=running_stack.config.s3_url, region_name="us-east-1", **kwargs)


def test_wrong_secret_is_refused_by_the_server(running_stack):
    client = raw_client(running_stack, aws_access_key_id=running_stack.creds.access_key,
                        aws_secret_access_key="not-the-secret")
    with pytest.raises(ClientError) as exc:
        client.list_objects_v2(Bucket=running_stack.bucket)
    assert exc.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


def test_unknown_access_key_is_refused_by_the_server(running_stack):
    client = raw_client(running_stack, aws_access_key_id="nobody", aws_secret_access_key="whatever")
    with pytest.raises(ClientError) as exc:
        client.put_object(Bucket=running_stack.bucket, Key="intruder.txt", Body=b"x")
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_anonymous_requests_are_refused_by_the_server(running_stack):
    client = raw_client(running_stack, config=Config(signature_version=UNSIGNED))
    with pytest.raises(ClientError) as exc:
        client.list_objects_v2(Bucket=running_stack.bucket)
    assert exc.value.response["Error"]["Code"] == "AccessDenied"


def test_generated_credentials_file_is_private(running_stack):
    assert (running_stack.config.root / "credentials.json").stat().st_mode & 0o077 == 0


def test_every_server_listens_on_localhost_only(running_stack):
    for item in stack.status(running_stack.config):
        inodes = set()
        for pid in stack._group_members(item.pid):
            for fd in (os.scandir(f"/proc/{pid}/fd")):
                target = os.readlink(fd.path)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        listening = []
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                    listening.append(fields[1].split(":")[0])
        assert listening and set(listening) == {"0100007F"}, item.name  # 127.0.0.1, little-endian hex


def test_up_twice_starts_nothing_twice(running_stack):
    before = {s.name: s.pid for s in stack.status(running_stack.config)}
    items, _ = stack.up(running_stack.config)
    assert {s.name: s.pid for s in items} == before
    assert all(s.state == "running" for s in items)


def test_port_in_use_is_a_clear_error_and_starts_nothing(tmp_path):
    with socket.socket() as busy:
        busy.bind((stack.HOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = stack.StackConfig(root=tmp_path / "other", ports={"s3": port, "mlflow": port, "prefect": port,
                                                                             "events": port})
        with pytest.raises(stack.StackError) as exc:
            stack.up(config)
    assert exc.value.code == "port_in_use"
    assert str(exc.value).startswith(f"{stack.HOST}:{port}: port is already in use by another program; s3 needs")
    assert not (tmp_path / "other" / "run").exists() or not list((tmp_path / "other" / "run").iterdir())


def test_stale_pid_record_reads_as_stopped_and_is_never_signalled(tmp_path):
    config = stack.StackConfig(root=tmp_path / "crashed")
    record = config.root / "run" / "mlflow.json"
    record.parent.mkdir(parents=True)
    # our own pid with another start time: what a pid reused after a crash looks like
    record.write_text(json.dumps({"pid": os.getpid(), "start_ticks": 1, "url": "http://x", "ports": []}))
    assert {s.name: s.state for s in stack.status(config)}["mlflow"] == "stopped"
    assert not record.exists()
    record.write_text(json.dumps({"pid": os.getpid(), "start_ticks": 1, "url": "http://x", "ports": []}))
    assert stack.down(config) == []  # and we are still alive to assert it


def test_status_reports_a_killed_server_as_down_and_up_restarts_it(running_stack, capsys):
    config = running_stack.config
    s3 = running_stack.client()
    s3.put_object(Bucket=running_stack.bucket, Key="lifecycle/kept.txt", Body=b"still here")
    pid = {s.name: s.pid for s in stack.status(config)}["s3"]
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while stack._group_members(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    states = {s.name: s.state for s in stack.status(config)}
    assert states == {"s3": "stopped", "mlflow": "running", "prefect": "running", "events": "running"}
    assert cli("stack", "status", "--dir", str(config.root)) == 1
    assert "s3       stopped" in capsys.readouterr().out
    items, _ = stack.up(config, timeout=120)
    assert all(s.state == "running" for s in items)
    assert s3.get_object(Bucket=running_stack.bucket, Key="lifecycle/kept.txt")["Body"].read() == b"still here"


def test_up_after_down_works_and_keeps_the_data(running_stack):
    import mlflow

    config = running_stack.config
    s3 = running_stack.client()
    s3.put_object(Bucket=running_stack.bucket, Key="lifecycle/before-down.txt", Body=b"data")
    mlflow.set_tracking_uri(config.mlflow_url)
    experiment_id = mlflow.create_experiment(f"lifecycle-{time.time_ns()}")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_text("artifact body", "note.txt")
    groups = [s.pid for s in stack.status(config)]

    assert cli("stack", "down", "--dir", str(config.root)) == 0
    assert all(s.state == "stopped" for s in stack.status(config))
    assert not any(stack._group_members(pid) for pid in groups)  # every process it started is gone
    assert not list((config.root / "run").glob("*.json"))

    assert cli("stack", "up", "--dir", str(config.root), "--timeout", "120") == 0
    assert all(s.state == "running" for s in stack.status(config))
    assert s3.get_object(Bucket=running_stack.bucket, Key="lifecycle/before-down.txt")["Body"].read() == b"data"
    client = mlflow.MlflowClient(config.mlflow_url)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    # the artifact went through the MLflow server into the bucket, and comes back after a restart
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/note.txt") == "artifact body"
    # (listed under the run's own prefix: by now other tests have put far more than one
    # page of 1,000 keys under mlflow/)
    stored = s3.list_objects_v2(Bucket=running_stack.bucket,
                                Prefix=f"mlflow/{experiment_id}/{run.info.run_id}/").get("Contents", [])
    assert [o["Key"].rsplit("/", 1)[-1] for o in stored] == ["note.txt"]


def test_prefect_server_answers_the_api(running_stack):
    from prefect.client.orchestration import get_client

    async def version():
        async with get_client() as client:
            return await client.api_version()

    import asyncio

    assert asyncio.run(version())
