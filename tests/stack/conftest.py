"""One real stack per test session, started as ``cns stack up`` does (tasks.stack.up) in a
temporary directory on free ports, and stopped at the end. No mocked S3: every test talks to the
SeaweedFS, MLflow and Prefect servers through the same environment variables a user exports."""

from __future__ import annotations

import os
import random
import socket
import sys
from dataclasses import dataclass

import pytest

from tasks import stack

# Ports below the usual ephemeral range (32768+) so an outgoing connection cannot hold one;
# SeaweedFS also binds s3 port + 1..4 and each of those + 10000.
S3_PORTS = range(20000, 22300, 7)
SERVICE_PORTS = range(23000, 29000)


def pytest_configure(config):
    config.addinivalue_line("markers", "stack: needs the local stack (real SeaweedFS, MLflow and Prefect servers)")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((stack.HOST, port))
        except OSError:
            return False
    return True


def free_ports() -> dict[str, int]:
    rng = random.Random()
    probe = stack.StackConfig()
    while True:
        s3 = rng.choice(S3_PORTS)
        probe.ports["s3"] = s3
        if all(_free(p) for p in probe.service_ports("s3")):
            break
    others = [p for p in rng.sample(SERVICE_PORTS, 50) if _free(p)]
    return {"s3": s3, "mlflow": others[0], "prefect": others[1], "events": others[2]}


@dataclass
class Stack:
    config: stack.StackConfig
    creds: stack.Credentials

    def client(self):
        from tasks import s3

        return s3.client()

    @property
    def bucket(self) -> str:
        return self.config.bucket


@pytest.fixture(scope="session")
def running_stack(tmp_path_factory) -> Stack:
    """The stack, up, with the client environment exported for the whole session."""
    saved = dict(os.environ)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_PROFILE", "CNS_BUCKET",
                "CNS_STACK_DIR", "CNS_S3_PORT", "CNS_MLFLOW_PORT", "CNS_PREFECT_PORT", "CNS_EVENTS_PORT",
                "CNS_EVENTS_URL", "CNS_EVENTS_TOKEN"):
        os.environ.pop(var, None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    root = tmp_path_factory.mktemp("stack")
    config = stack.StackConfig.resolve(root=root, ports=free_ports(), bucket="cns-test")
    try:
        _, creds = stack.up(config, timeout=90)
        os.environ.update(stack.client_env(config, creds, with_secret=True))
        os.environ["CNS_STACK_DIR"] = str(root)
        # Uploads here finish before a test scans; the settle time has its own test.
        os.environ["CNS_SETTLE_SECONDS"] = "0"
        # Prefect reads its settings when first imported: a test module that imports it (directly
        # or through tasks.learning) does so before this environment exists, and flows run in this
        # process (a test's next pass) would then talk to a temporary Prefect server of their own.
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
        yield Stack(config, creds)
    finally:
        stack.down(config)
        os.environ.clear()
        os.environ.update(saved)
        if "prefect.context" in sys.modules:
            sys.modules["prefect.context"].refresh_global_settings_context()


@pytest.fixture
def concept_name(request) -> str:
    """A concept name unique to the test, so tests share the bucket without seeing each other."""
    base = request.node.name.lower().replace("test_", "").replace("[", "-").replace("]", "")
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in base)[:48] + f"-{random.randrange(10**6)}"
