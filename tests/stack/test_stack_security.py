"""Every door the stack's SeaweedFS opens, found at runtime from /proc (not from a list of ports),
and what a local process without the keys gets at each: no bucket data over HTTP, no gRPC without
the stack's client certificate, no CORS for a web page. With the keys, S3 still works. The
MLflow server (basic-auth, ``NO_PERMISSIONS`` by default) gives a request without the stack's
login, or with a wrong one, nothing: no artifact through its proxy into ``s3://<bucket>/mlflow/``,
no run, no registry; with the login, all of it works. The Prefect server (HTTP basic auth with the
stack's auth string) answers a request without it, or with a wrong one, 401: no flow run is read or
started; with it, all of it works.

The doors and how each is closed: docs/reliability.md, "The stack's doors"."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from flows.cli import build_parser
from tasks import stack
from tasks.s3 import list_objects

pytestmark = pytest.mark.stack

SECRET = b"bucket data no one without the keys may read " * 40
EVIL_ORIGIN = "http://evil.example"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


# ---- finding the doors -------------------------------------------------------------------------

@dataclass(frozen=True)
class Door:
    kind: str  # "tcp" or "unix"
    address: str  # "127.0.0.1:8333" or a socket path
    pid: int

    def connect(self, timeout: float = 2.0) -> socket.socket:
        if self.kind == "tcp":
            host, port = self.address.rsplit(":", 1)
            return socket.create_connection((host, int(port)), timeout=timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(self.address)
        return sock


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.scandir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(fd.path)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _hex_ip(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def find_doors(pids: list[int]) -> list[Door]:
    """Every listening TCP (v4 and v6) and unix stream socket the given processes hold."""
    doors = []
    for pid in pids:
        inodes = _socket_inodes(pid)
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ip, port = fields[1].split(":")
                    doors.append(Door("tcp", f"{_hex_ip(ip)}:{int(port, 16)}", pid))
        for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            # Num RefCount Protocol Flags Type St Inode [Path]; flag 0x10000 = accepting connections
            if fields[6] in inodes and int(fields[3], 16) & 0x10000:
                doors.append(Door("unix", fields[7] if len(fields) > 7 else "(abstract or unnamed)", pid))
    return sorted(set(doors), key=lambda d: (d.kind, d.address))


def weed_pids(running_stack) -> list[int]:
    record = stack._read_record(running_stack.config, "s3")
    assert record is not None, "the session stack's SeaweedFS is not running"
    return stack._group_members(record["pid"])


# ---- talking to a door without keys ------------------------------------------------------------

class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def http_request(door: Door, method: str, path: str, body: bytes | None = None,
                 headers: dict | None = None) -> tuple[int, dict, bytes] | None:
    """(status, headers, body) of a plain HTTP/1.1 request, or None if the door does not answer
    HTTP (a TLS-only gRPC port closes the connection or sends no HTTP status line)."""
    if door.kind == "tcp":
        host, port = door.address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
    else:
        conn = _UnixHTTPConnection(door.address, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    except (http.client.HTTPException, OSError):
        return None
    finally:
        conn.close()


def _read_some(sock: socket.socket, limit: int = 64) -> bytes:
    data = b""
    with contextlib.suppress(OSError, ssl.SSLError):
        while len(data) < limit:
            chunk = sock.recv(limit - len(data))
            if not chunk:
                break
            data += chunk
    return data


def _is_h2_settings(data: bytes) -> bool:
    return len(data) >= 9 and data[3] == 0x04  # frame header: length(3) type(1) flags(1) stream(4)


def h2c_answers(door: Door) -> bool:
    """True if the door speaks HTTP/2 in clear text, i.e. would serve gRPC to anyone."""
    with contextlib.suppress(OSError), door.connect() as sock:
        sock.sendall(H2_PREFACE)
        return _is_h2_settings(_read_some(sock))
    return False


def h2_over_tls_answers(door: Door, cert: tuple[Path, Path] | None) -> bool:
    """True if a TLS connection (trusting any server) with this client certificate, or none, gets
    HTTP/2 spoken back: gRPC would be served to whoever holds that certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    try:
        with door.connect() as raw, ctx.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(H2_PREFACE)
            return _is_h2_settings(_read_some(sock))
    except (OSError, ssl.SSLError):
        return False


def foreign_certificate(directory: Path) -> tuple[Path, Path]:
    """A client certificate from a CA that is not the stack's (what another local user could make)."""

    stack._make_tls(directory)
    return directory / "weed.crt", directory / "weed.key"


def weed_shell(cwd: Path, home: Path, commands: str, master: str, filer: str, timeout: float) -> str:
    """Run `weed shell` (SeaweedFS's own gRPC client); with no security.toml in ``cwd``/``home``
    it connects without a client certificate. Returns what it printed (also on timeout)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEED_")}
    env["HOME"] = str(home)
    try:
        done = subprocess.run([stack._executable("weed"), "shell", f"-master={master}", f"-filer={filer}"],
                              input=commands, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
        return done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        return (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")


# ---- fixtures ----------------------------------------------------------------------------------

@dataclass
class Probe:
    doors: list[Door]
    key: str
    fid: str  # the volume file id of the secret object's one chunk
    master: str
    filer: str


@pytest.fixture(scope="module")
def probe(running_stack) -> Probe:
    """The secret object written with the keys, its chunk's file id (read with the stack's own
    certificate: the gRPC path works for whoever holds it), and the doors open at that moment."""
    s3 = running_stack.client()
    key = "security-probe/secret.bin"
    s3.put_object(Bucket=running_stack.bucket, Key=key, Body=SECRET)
    ports = stack._weed_ports(running_stack.config)
    master, filer = f"{stack.HOST}:{ports['master']}", f"{stack.HOST}:{ports['filer']}"
    root = running_stack.config.root
    out = weed_shell(root, root, f"fs.meta.cat /buckets/{running_stack.bucket}/{key}\n", master, filer, 60)
    fids = re.findall(r'"fileId":\s*"(\d+,[0-9a-f]+)"', out)
    assert len(fids) == 1, f"the authenticated weed shell did not find the chunk: {out[-2000:]}"
    doors = find_doors(weed_pids(running_stack))
    print("\nSeaweedFS doors:", *(f"{d.kind} {d.address} (pid {d.pid})" for d in doors), sep="\n  ")
    return Probe(doors, key, fids[0], master, filer)


# ---- the tests ---------------------------------------------------------------------------------

def test_every_door_is_on_loopback_or_in_the_private_stack_directory(running_stack, probe):
    root = running_stack.config.root.resolve()
    tcp = [d for d in probe.doors if d.kind == "tcp"]
    unix = [d for d in probe.doors if d.kind == "unix"]
    assert f"{stack.HOST}:{running_stack.config.ports['s3']}" in {d.address for d in tcp}
    assert all(d.address.startswith(f"{stack.HOST}:") for d in tcp), tcp
    assert root.stat().st_mode & 0o077 == 0, oct(root.stat().st_mode)
    for door in unix:
        path = Path(door.address)
        assert path.is_relative_to(root), f"{door.address}: a socket outside the stack directory {root}"
        assert path.parent.stat().st_mode & 0o077 == 0, f"{path.parent} is open to other users"


def test_no_door_reads_or_writes_bucket_data_over_http_without_keys(running_stack, probe):
    bucket, key, fid = running_stack.bucket, probe.key, probe.fid
    vid = fid.split(",")[0]
    new_fid = f"{vid},{0x7fffff:x}{0xdeadbeef:08x}"
    requests = [
        ("GET", f"/buckets/{bucket}/{key}", None),  # filer path
        ("GET", f"/buckets/{bucket}/", None),  # filer directory listing
        ("PUT", f"/buckets/{bucket}/intruder-filer.txt", b"intruder"),
        ("POST", f"/buckets/{bucket}/intruder-filer-post.txt", b"intruder"),
        ("DELETE", f"/buckets/{bucket}/{key}", None),
        ("GET", f"/{fid}", None),  # volume read of the real chunk
        ("GET", f"/{vid}/{fid.split(',')[1]}", None),
        ("POST", f"/{new_fid}", b"intruder"),  # volume write
        ("DELETE", f"/{fid}", None),
        ("GET", "/dir/assign", None),  # master: a file id plus a write token
        ("POST", "/dir/assign", None),
        ("GET", f"/dir/lookup?volumeId={vid}", None),
        ("GET", f"/{bucket}/{key}", None),  # S3 path, unsigned
        ("PUT", f"/{bucket}/intruder-s3.txt", b"intruder"),
    ]
    answers = {}
    for door in probe.doors:
        for method, path, body in requests:
            result = http_request(door, method, path, body)
            answers[(door.address, method, path)] = result and result[0]
            if result is None:
                continue  # not an HTTP door: the gRPC test covers it
            status, _, text = result
            assert SECRET[:40] not in text, f"{method} {door.address}{path} returned bucket data"
            assert status >= 400, f"{method} {door.address}{path} answered {status} without keys: {text[:200]!r}"
    print("\nHTTP without keys (None: not HTTP):", *(f"{k[0]} {k[1]} {k[2]} -> {v}" for k, v in answers.items()),
          sep="\n  ")
    s3 = running_stack.client()
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == SECRET
    listed = {key for key, *_ in list_objects(s3, bucket, "")}
    assert not {k for k in listed if "intruder" in k}, listed


def test_no_door_serves_grpc_without_the_stack_certificate(running_stack, probe, tmp_path):
    tls = running_stack.config.root / stack.TLS_DIR
    own = (tls / "weed.crt", tls / "weed.key")
    foreign = foreign_certificate(tmp_path / "foreign")
    grpc_doors = []
    for door in probe.doors:
        assert not h2c_answers(door), f"{door.address} serves HTTP/2 (gRPC) in clear text to anyone"
        assert not h2_over_tls_answers(door, None), f"{door.address} serves HTTP/2 over TLS without a client certificate"
        assert not h2_over_tls_answers(door, foreign), f"{door.address} accepts a certificate from another CA"
        if h2_over_tls_answers(door, own):
            grpc_doors.append(door.address)
    print("\ngRPC doors (HTTP/2 over TLS with the stack's certificate only):", *grpc_doors, sep="\n  ")
    # The probe can see an open gRPC door: with the stack's certificate, master, volume, filer and the
    # S3 gateway answer; without it, none does.
    assert len(grpc_doors) >= 3, grpc_doors


def test_seaweedfs_own_client_without_the_certificate_cannot_read_or_write(running_stack, probe):
    bucket = running_stack.bucket
    with tempfile.TemporaryDirectory() as clean:
        out = weed_shell(Path(clean), Path(clean), f"fs.meta.cat /buckets/{bucket}/{probe.key}\n"
                         f"fs.mkdir /buckets/{bucket}/intruder-grpc\n", probe.master, probe.filer, 20)
    assert probe.fid not in out and "fileId" not in out, out[-2000:]
    root = running_stack.config.root
    out = weed_shell(root, root, f"fs.ls /buckets/{bucket}/\n", probe.master, probe.filer, 60)
    assert "security-probe" in out, out[-2000:]  # the authenticated listing works ...
    assert "intruder-grpc" not in out  # ... and shows nothing written without the certificate


def test_no_door_lets_a_web_page_at_bucket_data(running_stack, probe):
    """A page in the browser sends an Origin header. The S3 gateway sends no CORS headers for the
    bucket; the volume server (and the gateway's 405 for a path it does not route) always add
    ``Access-Control-Allow-Origin: *`` (hard-coded in SeaweedFS), so there the test is that all a
    page can see is the refusal."""
    bucket = running_stack.bucket
    s3_door = f"{stack.HOST}:{running_stack.config.ports['s3']}"
    seen = {}
    for door in probe.doors:
        for method, path in (("OPTIONS", f"/{bucket}/{probe.key}"), ("GET", f"/{bucket}/{probe.key}"),
                             ("GET", f"/buckets/{bucket}/{probe.key}"), ("GET", f"/{probe.fid}"),
                             ("PUT", f"/{bucket}/intruder-web.txt"), ("POST", f"/{probe.fid}")):
            result = http_request(door, method, path, body=b"intruder" if method in ("PUT", "POST") else None,
                                  headers={"Origin": EVIL_ORIGIN, "Access-Control-Request-Method": "PUT"})
            if result is None:
                continue
            status, headers, body = result
            allowed = headers.get("access-control-allow-origin")
            seen[(door.address, method, path)] = (status, allowed)
            assert SECRET[:40] not in body
            if door.address == s3_door and path.startswith(f"/{bucket}/"):
                assert allowed is None, (door.address, method, path, status, headers)  # -s3.allowedOrigins
            elif allowed is not None and method != "OPTIONS":
                assert status >= 400, (door.address, method, path, status, body[:200])
    print("\nwith Origin (status, Access-Control-Allow-Origin):", *(f"{k} -> {v}" for k, v in seen.items()),
          sep="\n  ")


def test_s3_with_keys_works_and_without_keys_is_refused(running_stack, probe):
    s3 = running_stack.client()
    assert s3.get_object(Bucket=running_stack.bucket, Key=probe.key)["Body"].read() == SECRET
    anonymous = boto3.client("s3", endpoint_url=running_stack.config.s3_url, region_name="us-east-1",
                             config=Config(signature_version=UNSIGNED))
    for call in (lambda: anonymous.get_object(Bucket=running_stack.bucket, Key=probe.key),
                 lambda: anonymous.put_object(Bucket=running_stack.bucket, Key="intruder-anon.txt", Body=b"x"),
                 lambda: anonymous.list_objects_v2(Bucket=running_stack.bucket)):
        with pytest.raises(ClientError) as exc:
            call()
        assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_stack_directory_is_private_and_up_prints_no_secret(running_stack, capsys):
    root = running_stack.config.root
    for path in (root, root / "run", root / stack.TLS_DIR):
        assert path.stat().st_mode & 0o077 == 0, f"{path}: {oct(path.stat().st_mode)}"
    for path in (root / stack.SECURITY_FILE, root / "credentials.json", *(root / stack.TLS_DIR).iterdir()):
        assert path.stat().st_mode & 0o077 == 0, f"{path}: {oct(path.stat().st_mode)}"
    parser = build_parser()
    args = parser.parse_args(["stack", "up", "--dir", str(root)])
    capsys.readouterr()
    assert args.func(args) == 0  # already running: prints the status and what to export
    printed = capsys.readouterr().out
    jwt_keys = re.findall(r'key = "([A-Za-z0-9_-]{40,})"', (root / stack.SECURITY_FILE).read_text())
    assert len(jwt_keys) == 4
    assert running_stack.creds.secret_key not in printed, printed
    logs = "".join(p.read_text(errors="replace") for p in (root / "logs").iterdir())
    _, mlflow_password = stack.mlflow_login(root)
    assert (root / stack.MLFLOW_AUTH_FILE).stat().st_mode & 0o077 == 0
    prefect_password = stack.prefect_auth_string(root).split(":", 1)[1]
    assert (root / stack.PREFECT_AUTH_FILE).stat().st_mode & 0o077 == 0
    for secret in (*jwt_keys, (root / stack.TLS_DIR / "weed.key").read_text().splitlines()[1], mlflow_password,
                   prefect_password):
        assert secret not in printed and secret not in logs
    assert running_stack.creds.secret_key not in logs


# ---- MLflow: basic-auth -----------------------------------------------------------------------

MLFLOW_SECRET = "an MLflow artifact no one without the login may read " * 20
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"


def mlflow_request(running_stack, method: str, path: str, login: tuple[str, str] | None,
                   body: bytes | dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request to the stack's MLflow server, with HTTP basic auth
    for ``login`` (None: no Authorization header)."""
    headers = {}
    if isinstance(body, dict):
        body, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    if login is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(login).encode()).decode()
    request = urllib.request.Request(running_stack.config.mlflow_url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


@dataclass
class MlflowProbe:
    login: tuple[str, str]
    experiment_id: str
    run_id: str
    artifact: str  # the proxy path of the run's secret artifact, under ARTIFACTS
    model: str


@pytest.fixture(scope="module")
def mlflow_probe(running_stack) -> MlflowProbe:
    """A run with a secret artifact and a registered model, made with the stack's login (the MLflow
    client reads it from MLFLOW_TRACKING_USERNAME/PASSWORD, which the session exported)."""
    from mlflow import MlflowClient

    login = stack.mlflow_login(running_stack.config.root)
    assert login is not None and (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == login
    client = MlflowClient()
    tag = str(time.time_ns())
    experiment_id = client.create_experiment(f"security-probe-{tag}")
    run = client.create_run(experiment_id)
    client.log_text(run.info.run_id, MLFLOW_SECRET, "secret.txt")
    client.set_terminated(run.info.run_id)
    model = f"security-probe-{tag}"
    client.create_registered_model(model)
    assert run.info.artifact_uri == f"mlflow-artifacts:/{experiment_id}/{run.info.run_id}/artifacts"
    return MlflowProbe(login, experiment_id, run.info.run_id, f"{experiment_id}/{run.info.run_id}/artifacts", model)


def mlflow_requests(p: MlflowProbe) -> list[tuple[str, str, bytes | dict | None]]:
    """What a local process would try: read and write artifacts through the proxy (REST and the UI's
    ajax-api), read and change runs and experiments, read and change the registry, make a user."""
    run, exp = p.run_id, p.experiment_id
    return [
        ("GET", f"{ARTIFACTS}/{p.artifact}/secret.txt", None),
        ("GET", f"/ajax-api/2.0/mlflow-artifacts/artifacts/{p.artifact}/secret.txt", None),
        ("GET", f"{ARTIFACTS}?path={p.artifact}", None),  # listing
        ("GET", f"/get-artifact?path=secret.txt&run_uuid={run}", None),  # the UI's download
        ("GET", f"/api/2.0/mlflow-artifacts/presigned/{p.artifact}/secret.txt", None),
        ("PUT", f"{ARTIFACTS}/{p.artifact}/intruder.txt", b"intruder"),
        ("PUT", f"/ajax-api/2.0/mlflow-artifacts/artifacts/{p.artifact}/intruder-ajax.txt", b"intruder"),
        ("PUT", f"{ARTIFACTS}/intruder/evil.txt", b"intruder"),
        ("PUT", f"{ARTIFACTS}/{p.artifact}/secret.txt", b"intruder"),  # overwrite
        ("DELETE", f"{ARTIFACTS}/{p.artifact}/secret.txt", None),
        ("GET", f"/api/2.0/mlflow/runs/get?run_id={run}", None),
        ("POST", "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp]}),
        ("GET", f"/api/2.0/mlflow/artifacts/list?run_id={run}", None),
        ("POST", "/api/2.0/mlflow/runs/create", {"experiment_id": exp}),
        ("POST", "/api/2.0/mlflow/runs/set-tag", {"run_id": run, "key": "intruder", "value": "x"}),
        ("POST", "/api/2.0/mlflow/runs/delete", {"run_id": run}),
        ("GET", "/api/2.0/mlflow/experiments/search?max_results=100", None),
        ("GET", f"/api/2.0/mlflow/experiments/get?experiment_id={exp}", None),
        ("POST", "/api/2.0/mlflow/experiments/create", {"name": "intruder-experiment"}),
        ("GET", "/api/2.0/mlflow/registered-models/search", None),
        ("GET", f"/api/2.0/mlflow/registered-models/get?name={p.model}", None),
        ("POST", "/api/2.0/mlflow/registered-models/create", {"name": "intruder-model"}),
        ("POST", "/api/2.0/mlflow/model-versions/create", {"name": p.model, "source": f"runs:/{run}/secret.txt",
                                                           "run_id": run}),
        ("PATCH", "/api/2.0/mlflow/registered-models/update", {"name": p.model, "description": "intruder"}),
        ("DELETE", "/api/2.0/mlflow/registered-models/delete", {"name": p.model}),
        ("POST", "/graphql", {"query": f'{{ mlflowGetRun(input: {{runId: "{run}"}}) {{ run {{ info {{ runName }} }} }} }}'}),
        ("POST", "/api/2.0/mlflow/users/create", {"username": "intruder", "password": "intruder-password-1234"}),
        ("GET", "/", None),  # the UI itself
    ]


def assert_mlflow_unchanged(running_stack, p: MlflowProbe) -> None:
    """With the login: the secret is intact and nothing an intruder tried is there."""
    from mlflow import MlflowClient

    status, _, body = mlflow_request(running_stack, "GET", f"{ARTIFACTS}/{p.artifact}/secret.txt", p.login)
    assert (status, body.decode()) == (200, MLFLOW_SECRET)
    client = MlflowClient()
    run = client.get_run(p.run_id)
    assert run.info.lifecycle_stage == "active" and "intruder" not in run.data.tags
    assert len(client.search_runs([p.experiment_id])) == 1
    assert client.get_experiment_by_name("intruder-experiment") is None
    assert {m.name for m in client.search_registered_models()} & {"intruder-model"} == set()
    model = client.get_registered_model(p.model)
    assert not model.description and not client.search_model_versions(f"name='{p.model}'")
    status, _, _ = mlflow_request(running_stack, "GET", "/api/2.0/mlflow/users/get?username=intruder", p.login)
    assert status == 404
    keys = {key for key, *_ in list_objects(running_stack.client(), running_stack.bucket, "mlflow/")}
    assert not {k for k in keys if "intruder" in k or "evil" in k}, keys


def test_mlflow_without_the_login_reads_and_writes_nothing(running_stack, mlflow_probe):
    """Every request without the stack's login, with a wrong password, an unknown user or MLflow's
    old default admin is 401 (and the browser is asked for the login)."""
    user, password = mlflow_probe.login
    answers = {}
    for login in (None, (user, "wrong-" + password), (user, ""), ("intruder", password), ("admin", "password1234")):
        for method, path, body in mlflow_requests(mlflow_probe):
            status, headers, text = mlflow_request(running_stack, method, path, login, body)
            answers[(login and login[0], method, path.split("?")[0])] = status
            assert MLFLOW_SECRET[:40].encode() not in text, (login, method, path)
            assert status == 401, (login and login[0], method, path, status, text[:200])
            assert headers.get("www-authenticate") == 'Basic realm="mlflow"'
    print(f"\nMLflow without the login: {len(answers)} requests, statuses {sorted(set(answers.values()))}")
    assert_mlflow_unchanged(running_stack, mlflow_probe)
    # what stays open: the health check (for `cns stack status`) and static files of the UI
    status, _, body = mlflow_request(running_stack, "GET", "/health", None)
    assert (status, body) == (200, b"OK")


def test_mlflow_gives_another_user_nothing_by_default(running_stack, mlflow_probe):
    """``default_permission = NO_PERMISSIONS``: a user the admin makes (with no grants) is known to
    the server but may read or change nothing of the stack's (403)."""
    other = ("security-probe-user", "another-users-password-" + str(time.time_ns()))
    status, _, _ = mlflow_request(running_stack, "POST", "/api/2.0/mlflow/users/create", mlflow_probe.login,
                                  {"username": other[0], "password": other[1]})
    assert status in (200, 201)
    try:
        for method, path, body in mlflow_requests(mlflow_probe):
            if path == "/" or path.startswith(("/api/2.0/mlflow/experiments/search", "/api/2.0/mlflow/registered-models/search",
                                               "/api/2.0/mlflow/runs/search", "/graphql")):
                continue  # allowed to a signed-in user, filtered to what it may read: checked below
            if "/intruder/" in path or path.endswith(("/experiments/create", "/registered-models/create")):
                continue  # creating its own experiment or model is what any user may do (nothing of ours)
            status, _, text = mlflow_request(running_stack, method, path, other, body)
            assert MLFLOW_SECRET[:40].encode() not in text, (method, path)
            assert status == 403, (method, path, status, text[:200])
        for method, path, body, listed in (
                ("GET", "/api/2.0/mlflow/experiments/search?max_results=1000", None, "experiments"),
                ("GET", "/api/2.0/mlflow/registered-models/search", None, "registered_models"),
                ("POST", "/api/2.0/mlflow/runs/search", {"experiment_ids": [mlflow_probe.experiment_id]}, "runs")):
            status, _, text = mlflow_request(running_stack, method, path, other, body)
            assert status == 403 or not json.loads(text).get(listed), (path, status, text[:300])
        assert_mlflow_unchanged(running_stack, mlflow_probe)
    finally:
        mlflow_request(running_stack, "DELETE", "/api/2.0/mlflow/users/delete", mlflow_probe.login,
                       {"username": other[0]})


def test_mlflow_with_the_login_works_and_stack_env_exports_it(running_stack, mlflow_probe, capsys):
    login = mlflow_probe.login
    path = f"{ARTIFACTS}/{mlflow_probe.artifact}/written-with-the-login.txt"
    assert mlflow_request(running_stack, "PUT", path, login, b"with the login")[0] == 200
    assert mlflow_request(running_stack, "GET", path, login)[::2] == (200, b"with the login")
    status, _, text = mlflow_request(running_stack, "GET", f"/api/2.0/mlflow/runs/get?run_id={mlflow_probe.run_id}",
                                     login)
    assert status == 200 and json.loads(text)["run"]["info"]["run_id"] == mlflow_probe.run_id
    status, _, text = mlflow_request(running_stack, "GET", f"/api/2.0/mlflow/registered-models/get?name={mlflow_probe.model}",
                                     login)
    assert status == 200 and json.loads(text)["registered_model"]["name"] == mlflow_probe.model
    assert mlflow_request(running_stack, "GET", "/", login)[0] == 200  # the UI, once the browser has the login
    exports = stack_env_exports(running_stack, capsys)
    assert (exports["MLFLOW_TRACKING_USERNAME"], exports["MLFLOW_TRACKING_PASSWORD"]) == login


def stack_env_exports(running_stack, capsys) -> dict[str, str]:
    """What `cns stack env` exports, as a user's shell would get it."""
    parser = build_parser()
    args = parser.parse_args(["stack", "env", "--dir", str(running_stack.config.root)])
    capsys.readouterr()
    assert args.func(args) == 0
    return dict(line[len("export "):].split("=", 1) for line in capsys.readouterr().out.splitlines()
                if line.startswith("export "))


def test_mlflow_artifact_proxy_reaches_only_the_mlflow_prefix(running_stack, mlflow_probe):
    """Even with the login, the artifact proxy writes with the stack's S3 keys only under
    ``s3://<bucket>/mlflow/``: paths that leave it are refused."""
    base = f"{ARTIFACTS}/"
    s3 = running_stack.client()
    s3.put_object(Bucket=running_stack.bucket, Key="incoming/proxy-probe/concept.yaml", Body=b"name: proxy-probe")
    for method, path in (("GET", "../incoming/proxy-probe/concept.yaml"), ("PUT", "../incoming/proxy-probe/evil.txt"),
                         ("GET", "..%2Fincoming%2Fproxy-probe%2Fconcept.yaml"), ("PUT", "%2E%2E/dvc/evil.txt")):
        status, _, _ = mlflow_request(running_stack, method, base + path, mlflow_probe.login,
                                      b"x" if method == "PUT" else None)
        assert status == 400, (method, path, status)
    keys = {key for key, *_ in list_objects(s3, running_stack.bucket, "")}
    assert not {k for k in keys if "evil" in k}, keys


# ---- Prefect: HTTP basic auth -----------------------------------------------------------------

def basic(auth_string: str) -> str:
    return "Basic " + base64.b64encode(auth_string.encode()).decode()


def prefect_request(running_stack, method: str, path: str, authorization: str | None,
                    body: dict | None = None) -> tuple[int, bytes]:
    """(status, body) of one request to the stack's Prefect server (``path`` under its ``/api``),
    with ``authorization`` as the Authorization header (None: no header)."""
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    data = json.dumps(body).encode() if body is not None else (b"{}" if method in ("POST", "PATCH") else None)
    request = urllib.request.Request(running_stack.config.prefect_api_url + path, data=data, method=method,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class PrefectProbe:
    auth_string: str
    flow_id: str
    deployment_id: str
    flow: str
    deployment: str
    as_made: dict  # the deployment as the API returned it after it was made


@pytest.fixture(scope="module")
def prefect_probe(running_stack) -> PrefectProbe:
    """A flow and a deployment (as `cns serve` makes for watch, nightly, personalize and forget),
    made with the Prefect client, which reads PREFECT_API_AUTH_STRING from the session's exports."""
    from prefect.client.orchestration import get_client

    auth_string = stack.prefect_auth_string(running_stack.config.root)
    assert auth_string is not None and os.environ["PREFECT_API_AUTH_STRING"] == auth_string
    name = f"security-probe-{time.time_ns()}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(name)
        deployment_id = client.create_deployment(flow_id=flow_id, name="probe", parameters={"concept": "x"})
    status, text = prefect_request(running_stack, "GET", f"/deployments/{deployment_id}", basic(auth_string))
    assert status == 200, text[:300]
    return PrefectProbe(auth_string, str(flow_id), str(deployment_id), name, "probe", json.loads(text))


def prefect_requests(p: PrefectProbe) -> list[tuple[str, str, dict | None]]:
    """What a local process would try: read flows, deployments, runs, logs, events, settings and
    the concurrency limits; start a served deployment; change or delete it; write variables."""
    dep = p.deployment_id
    return [
        ("POST", "/flows/filter", None),
        ("GET", f"/flows/{p.flow_id}", None),
        ("POST", "/deployments/filter", None),
        ("GET", f"/deployments/{dep}", None),
        ("GET", f"/deployments/name/{p.flow}/{p.deployment}", None),
        ("POST", f"/deployments/{dep}/create_flow_run", {"parameters": {"concept": "intruder"}}),
        ("POST", "/flow_runs/", {"flow_id": p.flow_id, "deployment_id": dep, "name": "intruder-run"}),
        ("POST", "/flow_runs/filter", None),
        ("POST", "/task_runs/filter", None),
        ("POST", "/logs/filter", None),
        ("POST", "/events/filter", None),
        ("PATCH", f"/deployments/{dep}", {"description": "intruder"}),
        ("POST", f"/deployments/{dep}/pause_deployment", None),
        ("DELETE", f"/deployments/{dep}", None),
        ("POST", "/variables/", {"name": "intruder", "value": "x"}),
        ("POST", "/variables/filter", None),
        ("POST", "/v2/concurrency_limits/filter", None),
        ("POST", "/v2/concurrency_limits/", {"name": "intruder-limit", "limit": 1}),
        ("POST", "/work_pools/filter", None),
        ("POST", "/automations/filter", None),
        ("GET", "/admin/settings", None),
        ("GET", "/admin/version", None),
        ("GET", "/openapi.json", None),
        ("POST", "/health", None),  # only GET /health and GET /ready are exempt
    ]


def assert_prefect_unchanged(running_stack, p: PrefectProbe) -> None:
    """With the auth string: the deployment is as it was, no flow run was made, nothing an intruder
    tried is there."""
    auth = basic(p.auth_string)
    status, text = prefect_request(running_stack, "GET", f"/deployments/{p.deployment_id}", auth)
    assert status == 200, text[:300]
    deployment = json.loads(text)
    for key in ("updated", "description", "paused", "parameters"):
        assert deployment[key] == p.as_made[key], key
    status, text = prefect_request(running_stack, "POST", "/flow_runs/filter", auth,
                                   {"flows": {"id": {"any_": [p.flow_id]}}})
    assert status == 200 and json.loads(text) == [], text[:300]
    status, text = prefect_request(running_stack, "POST", "/variables/filter", auth)
    assert status == 200 and "intruder" not in {v["name"] for v in json.loads(text)}
    status, text = prefect_request(running_stack, "POST", "/v2/concurrency_limits/filter", auth)
    assert status == 200 and "intruder-limit" not in {c["name"] for c in json.loads(text)}


def ws_answer(url: str, subprotocols: list[str] | None, token: str | None) -> str:
    """What a websocket client gets from ``url``: 'refused' (handshake), 'closed <code>' (after the
    auth message) or the server's first message."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    try:
        with connect(url, subprotocols=subprotocols, open_timeout=30, close_timeout=2) as ws:
            if token is not None:
                ws.send(json.dumps({"type": "auth", "token": token}))
            try:
                return ws.recv(timeout=30)
            except ConnectionClosed as exc:
                return f"closed {exc.rcvd.code if exc.rcvd else None}"
    except InvalidStatus as exc:
        return f"refused {exc.response.status_code}"
    except ConnectionClosed as exc:
        return f"closed {exc.rcvd.code if exc.rcvd else None}"


def test_prefect_without_the_auth_string_reads_and_starts_nothing(running_stack, prefect_probe):
    """Every API request without the stack's auth string, with a wrong one, or with it in another
    scheme is 401: no flow, deployment, run, log, event or setting is read, no served deployment is
    started, changed or deleted. Websockets (events in, task runs) are refused too."""
    p = prefect_probe
    user, password = p.auth_string.split(":", 1)
    wrong = [None, basic(f"{user}:wrong-{password}"), basic(f"{user}:"), basic(password), basic(f"admin:{password}"),
             basic(""), f"Bearer {p.auth_string}", f"Bearer {base64.b64encode(p.auth_string.encode()).decode()}",
             "Basic not-base64!"]
    answers = {}
    for authorization in wrong:
        for method, path, body in prefect_requests(p):
            status, text = prefect_request(running_stack, method, path, authorization, body)
            answers[(authorization, method, path)] = status
            assert status == 401, (authorization and authorization[:6], method, path, status, text[:200])
            assert p.flow.encode() not in text
    print(f"\nPrefect without the auth string: {len(answers)} requests, statuses {sorted(set(answers.values()))}")
    assert_prefect_unchanged(running_stack, p)
    ws = running_stack.config.prefect_api_url.replace("http://", "ws://")
    for path in ("/events/in", "/events/out", "/logs/out", "/task_runs/subscriptions/scheduled"):
        assert ws_answer(ws + path, None, None).startswith("refused"), path  # no 'prefect' subprotocol
        for token in ("", f"{user}:wrong-{password}", password):
            answer = ws_answer(ws + path, ["prefect"], token)
            assert answer == "closed 1008", (path, token[:6], answer)
    # what stays open (Prefect exempts them): the health and readiness checks, and the UI's
    # static files and its settings (which tell the browser to ask for the auth string)
    assert prefect_request(running_stack, "GET", "/health", None) == (200, b"true")
    assert not stack.prefect_open(running_stack.config)  # what `up` checks of a server it did not start
    base = running_stack.config.prefect_api_url.removesuffix("/api")
    with urllib.request.urlopen(base + "/ui-settings", timeout=30) as resp:
        assert json.loads(resp.read())["auth"] == "BASIC"


def test_prefect_cli_without_the_auth_string_cannot_start_a_deployment(running_stack, prefect_probe):
    """A local user's `prefect deployment run` against the stack, without the auth string (or with a
    wrong one), fails and starts nothing."""
    prefect = Path(os.environ.get("VIRTUAL_ENV", "")) / "bin" / "prefect"
    prefect = str(prefect) if prefect.exists() else stack._executable("prefect")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_AUTH_STRING"}
    user = prefect_probe.auth_string.split(":", 1)[0]
    for extra in ({}, {"PREFECT_API_AUTH_STRING": f"{user}:wrong"}):
        result = subprocess.run([prefect, "deployment", "run", f"{prefect_probe.flow}/{prefect_probe.deployment}"],
                                env={**env, **extra}, capture_output=True, text=True, timeout=180)
        assert result.returncode != 0, result.stdout
        assert "401" in result.stdout + result.stderr or "Unauthorized" in result.stdout + result.stderr, \
            (result.stdout[-500:], result.stderr[-500:])
    assert_prefect_unchanged(running_stack, prefect_probe)


def test_prefect_with_the_auth_string_works_and_stack_env_exports_it(running_stack, prefect_probe, capsys):
    from prefect.client.orchestration import get_client

    p = prefect_probe
    auth = basic(p.auth_string)
    status, text = prefect_request(running_stack, "POST", "/deployments/filter", auth,
                                   {"deployments": {"id": {"any_": [p.deployment_id]}}})
    assert status == 200 and [d["id"] for d in json.loads(text)] == [p.deployment_id]
    status, text = prefect_request(running_stack, "POST", f"/deployments/{p.deployment_id}/create_flow_run", auth)
    assert status == 201, text[:300]
    run_id = json.loads(text)["id"]
    with get_client(sync_client=True) as client:  # the client, from PREFECT_API_AUTH_STRING
        assert str(client.read_flow_run(run_id).deployment_id) == p.deployment_id
        client.delete_flow_run(run_id)
    ws = running_stack.config.prefect_api_url.replace("http://", "ws://")
    assert json.loads(ws_answer(ws + "/events/out", ["prefect"], p.auth_string)) == {"type": "auth_success"}
    exports = stack_env_exports(running_stack, capsys)
    assert exports["PREFECT_API_AUTH_STRING"] == p.auth_string
    assert (running_stack.config.root / stack.PREFECT_AUTH_FILE).stat().st_mode & 0o077 == 0
