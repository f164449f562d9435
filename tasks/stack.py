"""The local stack: SeaweedFS (S3), an MLflow tracking server and a Prefect server, as real
processes bound to 127.0.0.1 with their data under one directory (default ``.stack/``).

Each service runs in its own session (process group) and leaves a pid record
``<dir>/run/<name>.json`` holding its pid, its kernel start time and its ports. A record only
counts while a process with that pid *and* that start time exists, so a record left by a crash
(or a pid reused by another program) reads as stopped and is replaced; ``down`` signals only
process groups whose leader it can prove it started. Layout and ports: docs/stack.md.
"""

from __future__ import annotations

import configparser
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cns.errors import CNSError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_DIR = ".stack"
DEFAULT_PORTS = {"s3": 8333, "mlflow": 5000, "prefect": 4200, "events": 8390}
# SeaweedFS opens a gRPC port at each HTTP port + 10000; its internal servers use s3 port + 1..3.
GRPC_OFFSET = 10000
WEED_INTERNAL = ("master", "volume", "filer")
SERVICES = ("s3", "mlflow", "prefect", "events")
PORT_RELEASE_WAIT = 5.0


class StackError(CNSError):
    code = "stack_error"


@dataclass
class StackConfig:
    root: Path = Path(DEFAULT_DIR)
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    bucket: str = "cns"

    def __post_init__(self):
        self.ports = {**DEFAULT_PORTS, **self.ports}  # a service not named keeps its standard port

    @classmethod
    def resolve(cls, root: str | Path | None = None, ports: dict[str, int | None] | None = None,
                bucket: str | None = None) -> "StackConfig":
        """Flags, then ``CNS_STACK_DIR``/``CNS_<SERVICE>_PORT``/``CNS_BUCKET``, then what the last
        ``up`` recorded in ``<dir>/stack.json``, then the defaults."""
        root = Path(root or os.environ.get("CNS_STACK_DIR") or DEFAULT_DIR)
        recorded = {}
        if (root / "stack.json").is_file():
            try:
                recorded = json.loads((root / "stack.json").read_text())
            except ValueError as exc:
                raise StackError(root / "stack.json", f"not valid JSON ({exc}); delete it and pass the ports "
                                 "again", "stack_invalid") from None
        merged = {}
        for name in SERVICES:
            value = (ports or {}).get(name) or os.environ.get(f"CNS_{name.upper()}_PORT") \
                or recorded.get("ports", {}).get(name) or DEFAULT_PORTS[name]
            try:
                merged[name] = int(value)
            except ValueError:
                raise StackError(f"CNS_{name.upper()}_PORT", f"{value!r} is not a port number", "port_invalid") from None
            if not 1024 <= merged[name] <= 65535 - (GRPC_OFFSET + len(WEED_INTERNAL) if name == "s3" else 0):
                raise StackError(f"CNS_{name.upper()}_PORT", f"{merged[name]} is out of range", "port_invalid")
        bucket = bucket or os.environ.get("CNS_BUCKET") or recorded.get("bucket") or "cns"
        return cls(root=root, ports=merged, bucket=bucket)

    @property
    def s3_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{HOST}:{self.ports['prefect']}/api"

    @property
    def events_url(self) -> str:
        return f"http://{HOST}:{self.ports['events']}"

    def service_ports(self, name: str) -> list[int]:
        """Every port a service binds (for the port-in-use check before starting it)."""
        if name != "s3":
            return [self.ports[name]]
        http = [self.ports["s3"] + i for i in range(len(WEED_INTERNAL) + 1)]
        return http + [p + GRPC_OFFSET for p in http]


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    generated: bool  # True: made by `up` and stored in <dir>/credentials.json (0600)


@dataclass
class ServiceStatus:
    name: str
    url: str
    state: str  # running (healthy), unhealthy (process up, health check fails), stopped
    pid: int | None = None
    rss_mb: float | None = None


# ---- credentials -------------------------------------------------------------------------------

def credentials(root: Path, create: bool = False) -> Credentials | None:
    """``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` from the environment, else the local pair in
    ``<root>/credentials.json``, generated once (mode 0600) when ``create`` is set."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    path = root / "credentials.json"
    stored = json.loads(path.read_text()) if path.is_file() else None
    if key and secret:
        generated = stored is not None and (key, secret) == (stored["access_key"], stored["secret_key"])
        return Credentials(key, secret, generated=generated)
    if stored:
        return Credentials(stored["access_key"], stored["secret_key"], generated=True)
    if not create:
        return None
    root.mkdir(parents=True, exist_ok=True)
    data = {"access_key": "cns" + secrets.token_hex(8), "secret_key": secrets.token_urlsafe(30)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    return Credentials(data["access_key"], data["secret_key"], generated=True)


def client_env(config: StackConfig, creds: Credentials | None, with_secret: bool,
               logins: bool | None = None) -> dict[str, str]:
    """The variables a user exports to use this stack (the secrets only when asked for: the S3
    keys with ``with_secret``; the MLflow login and the Prefect auth string with ``logins``, which
    defaults to it)."""
    env = {"AWS_ENDPOINT_URL_S3": config.s3_url, "MLFLOW_S3_ENDPOINT_URL": config.s3_url,
           "AWS_DEFAULT_REGION": "us-east-1", "CNS_BUCKET": config.bucket,
           "MLFLOW_TRACKING_URI": config.mlflow_url, "PREFECT_API_URL": config.prefect_api_url}
    if creds is not None and with_secret:
        env["AWS_ACCESS_KEY_ID"] = creds.access_key
        env["AWS_SECRET_ACCESS_KEY"] = creds.secret_key
    logins = with_secret if logins is None else logins
    login = mlflow_login(config.root) if logins else None
    if login is not None:
        env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"] = login
    auth_string = prefect_auth_string(config.root) if logins else None
    if auth_string is not None:
        env["PREFECT_API_AUTH_STRING"] = auth_string
    token = events_token(config.root)
    if token is not None:  # the bucket-event relay `cns serve` subscribes to
        env["CNS_EVENTS_URL"] = config.events_url
        if logins:
            env["CNS_EVENTS_TOKEN"] = token
    return env


# ---- MLflow: basic-auth, one admin login per stack -----------------------------------------------
#
# `mlflow server --app-name basic-auth` with <root>/mlflow/basic_auth.ini (0600, made once per stack
# directory, never printed by `up`): default_permission NO_PERMISSIONS, so a request without the
# login, with a wrong one, or from any other user gets nothing (runs, registry, the artifact proxy
# into s3://<bucket>/mlflow/). Clients read MLFLOW_TRACKING_USERNAME/PASSWORD (`cns stack env`).

MLFLOW_AUTH_FILE = Path("mlflow") / "basic_auth.ini"
MLFLOW_ADMIN = "cns-admin"


def mlflow_login(root: Path) -> tuple[str, str] | None:
    """(username, password) of the stack's MLflow admin, or None before the first ``up``."""
    path = root / MLFLOW_AUTH_FILE
    if not path.is_file():
        return None
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    return parser["mlflow"]["admin_username"], parser["mlflow"]["admin_password"]


def ensure_mlflow_auth(root: Path) -> Path:
    """``<root>/mlflow/basic_auth.ini`` (0600), made once; a user store left without it holds an
    admin whose password is lost, so it is made again."""
    path = root / MLFLOW_AUTH_FILE
    if path.is_file():
        return path
    store = path.with_name("basic_auth.db")
    if store.exists():
        log.warning("%s: no %s beside it, making a new MLflow login", store, path.name)
        store.unlink()
    lines = ["# made by `cns stack up` for this stack only; keep it private (see docs/reliability.md)",
             "[mlflow]", "default_permission = NO_PERMISSIONS",
             # relative to the server's working directory, the stack directory: the stack can be moved
             f"database_uri = sqlite:///{MLFLOW_AUTH_FILE.parent / store.name}",
             f"admin_username = {MLFLOW_ADMIN}", f"admin_password = {secrets.token_urlsafe(30)}",
             "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
             "grant_default_workspace_access = false",
             # one worker: a cached login check cannot go stale in another; saves a PBKDF2 per request
             "auth_cache_ttl_seconds = 60", ""]
    _write_private(path, "\n".join(lines).encode())
    return path


# ---- Prefect: HTTP basic auth, one auth string per stack ---------------------------------------
#
# `prefect server start` with PREFECT_SERVER_API_AUTH_STRING from <root>/prefect/auth_string (0600,
# made once per stack directory, never printed by `up`): every API request without
# `Authorization: Basic base64(<auth string>)` gets 401 (only GET /api/health and GET /api/ready are
# exempt), every websocket (events, logs, task runs, workers) is closed without it. So no local
# process can read flow runs or start the served flows (which run in a worker holding the S3 keys).
# Clients (the runner of `cns serve`, its flow runs, the CLI) read PREFECT_API_AUTH_STRING
# (`cns stack env`); the UI asks for the same string.

PREFECT_AUTH_FILE = Path("prefect") / "auth_string"
PREFECT_USER = "cns-admin"


def prefect_auth_string(root: Path) -> str | None:
    """``<user>:<password>`` of the stack's Prefect server, or None before the first ``up``."""
    path = root / PREFECT_AUTH_FILE
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def ensure_prefect_auth(root: Path) -> str:
    """``<root>/prefect/auth_string`` (0600), made once per stack directory."""
    auth_string = prefect_auth_string(root)
    if auth_string is None:
        auth_string = f"{PREFECT_USER}:{secrets.token_urlsafe(30)}"
        (root / PREFECT_AUTH_FILE).parent.mkdir(parents=True, exist_ok=True)
        _write_private(root / PREFECT_AUTH_FILE, (auth_string + "\n").encode())
    return auth_string


def prefect_open(config: StackConfig) -> bool:
    """True when the stack's Prefect server answers an API request without the auth string (one
    started before authentication was turned on)."""
    request = urllib.request.Request(f"{config.prefect_api_url}/flows/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


# ---- the three services ------------------------------------------------------------------------

def _executable(name: str) -> str:
    """The venv's copy first (the one pip installed with this package), then PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise StackError(name, "executable not found: install the pipeline extras (pip install -e '.[pipeline]')",
                         "executable_missing")
    return found


def _service_command(name: str, config: StackConfig, creds: Credentials) -> tuple[list[str], dict[str, str]]:
    root = config.root.resolve()
    env = dict(os.environ)
    env.update(AWS_ACCESS_KEY_ID=creds.access_key, AWS_SECRET_ACCESS_KEY=creds.secret_key)
    if name == "s3":
        # One process group: a shell starts master and volume in the background and becomes the filer
        # (with the S3 gateway), so the recorded pid is the gateway's and `down` stops all three.
        *background, last = (shlex.join(argv) for argv in _weed_commands(config))
        return ["/bin/sh", "-c", " & ".join(background) + " & exec " + last], env
    if name == "mlflow":
        env.update(MLFLOW_S3_ENDPOINT_URL=config.s3_url, AWS_ENDPOINT_URL_S3=config.s3_url,
                   AWS_DEFAULT_REGION=env.get("AWS_DEFAULT_REGION", "us-east-1"),
                   # the job runner forks extra workers (~3 GB); the pipeline does not use it
                   MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                   MLFLOW_AUTH_CONFIG_PATH=str(root / MLFLOW_AUTH_FILE), MLFLOW_BASIC_AUTH_FAIL_CLOSED="true",
                   # signs the sign-up form's CSRF token only; one worker, so new at every start
                   MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_urlsafe(32))
        for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):  # would override the file
            env.pop(var, None)
        argv = [_executable("mlflow"), "server", "--app-name", "basic-auth", "--host", HOST,
                "--port", str(config.ports["mlflow"]),
                "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
                "--artifacts-destination", f"s3://{config.bucket}/mlflow"]
        return argv, env
    if name == "prefect":
        env.update(PREFECT_HOME=str(root / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{root / 'prefect' / 'prefect.db'}",
                   # Concurrency leases on disk (PREFECT_HOME), not in memory: a slot taken before a
                   # server restart is still given back by its holder, or freed when its lease expires.
                   PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="prefect.server.concurrency.lease_storage.filesystem")
        # HTTP basic auth on the API (docs/reliability.md, "The stack's doors"); the server's own
        # clients (its services, the UI's settings) read the same string
        auth_string = ensure_prefect_auth(root)
        env.update(PREFECT_SERVER_API_AUTH_STRING=auth_string, PREFECT_API_AUTH_STRING=auth_string)
        env.pop("PREFECT_API_URL", None)
        env.pop("PREFECT_API_KEY", None)  # Prefect Cloud's key: would be sent instead of the auth string
        argv = [_executable("prefect"), "server", "start", "--host", HOST, "--port", str(config.ports["prefect"]),
                "--analytics-off"]
        return argv, env
    if name == "events":
        env[EVENTS_TOKEN_ENV] = events_token(root, create=True)
        return [sys.executable, "-m", "tasks.events", "--listen", f"{HOST}:{config.ports['events']}"], env
    raise ValueError(name)


# ---- SeaweedFS: only the parts S3 needs, every internal door locked -----------------------------
#
# `weed mini` also runs an admin server and a worker, serves the filer and volume HTTP APIs with
# no authentication and opens its gRPC sockets under /tmp at fixed names. Instead: master, volume
# and filer (+ the S3 gateway in the filer's process) as separate `weed` processes, with
# <root>/security.toml (read from the working directory) holding per-stack JWT keys for every
# HTTP data path and mutual TLS for every gRPC port, against a CA made for this stack whose key is
# thrown away. Table of doors and their tests: docs/reliability.md, "The stack's doors".

# Origins are compared verbatim; `.invalid` can never be a browser's origin, so any request that
# carries an Origin header (a web page) is refused, and no Access-Control-Allow-Origin is sent.
NO_CORS_ORIGIN = "https://no-cors.invalid"
SECURITY_FILE = "security.toml"
TLS_DIR = "tls"


def _weed_ports(config: StackConfig) -> dict[str, int]:
    port = config.ports["s3"]
    return {"s3": port, **{name: port + 1 + i for i, name in enumerate(WEED_INTERNAL)}}


def _weed_commands(config: StackConfig) -> list[list[str]]:
    root = config.root.resolve()
    data, run = root / "seaweedfs", root / "run"
    p = _weed_ports(config)
    weed, master = _executable("weed"), f"{HOST}:{p['master']}"
    common = [f"-ip={HOST}", f"-ip.bind={HOST}"]
    # The data layout is the one `weed mini -dir=<root>/seaweedfs` used, so an existing stack keeps its bucket.
    return [
        [weed, "master", *common, f"-port={p['master']}", f"-mdir={data / ('m' + str(p['master']))}",
         "-disableHttp", "-telemetry=false", "-volumeSizeLimitMB=128", "-defaultReplication=000",
         "-electionTimeout=1s"],  # one master, no peers: no reason to wait 10 s to lead after a restart
        [weed, "volume", *common, f"-port={p['volume']}", f"-dir={data}", f"-master={master}", "-max=0",
         "-preStopSeconds=1"],
        [weed, "filer", *common, f"-port={p['filer']}", f"-master={master}", f"-defaultStoreDir={data}",
         "-disableHttp", f"-localSocket={run / 'filer.sock'}", f"-allowedOrigins={NO_CORS_ORIGIN}",
         "-exposeDirectoryData=false", "-ui.deleteDir=false", "-webdav=false", "-sftp=false",
         "-s3", f"-s3.port={p['s3']}", f"-s3.ip.bind={HOST}", f"-s3.localSocket={run / 's3.sock'}",
         f"-s3.allowedOrigins={NO_CORS_ORIGIN}", "-s3.port.iceberg=0", "-s3.port.lance=0"],
    ]


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _make_tls(tls: Path) -> None:
    """A CA for this stack and one certificate for every SeaweedFS server and client; the CA key is
    never written, so nothing else can be signed by it."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=3650)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"cns stack CA {secrets.token_hex(4)}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cns-seaweedfs")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _private_dir(tls)
    _write_private(tls / "weed.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    _write_private(tls / "weed.crt", cert.public_bytes(serialization.Encoding.PEM))
    _write_private(tls / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))


def ensure_seaweed_security(root: Path) -> Path:
    """``<root>/security.toml`` (0600) and ``<root>/tls/``, made once per stack directory and never
    printed: JWT keys for the volume (reads and writes) and filer (reads and writes) HTTP APIs, mutual
    TLS on every gRPC port, no CORS, no filer/volume UI."""
    path = root / SECURITY_FILE
    if path.is_file() and all((root / TLS_DIR / f).is_file() for f in ("ca.crt", "weed.crt", "weed.key")):
        return path
    _make_tls(root / TLS_DIR)
    # relative to the stack directory, the servers' working directory: the stack can be moved
    tls = Path(TLS_DIR)
    cert, key = tls / "weed.crt", tls / "weed.key"
    q = json.dumps  # a TOML basic string is a JSON string for everything a path can hold
    lines = ["# made by `cns stack up` for this stack only; keep it private (see docs/reliability.md)",
             "[cors.allowed_origins]", f'values = "{NO_CORS_ORIGIN}"', "",
             "[access]", "ui = false", "", "[filer.expose_directory_metadata]", "enabled = false", ""]
    for section in ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read"):
        lines += [f"[{section}]", f'key = "{secrets.token_urlsafe(32)}"', "expires_after_seconds = 10", ""]
    lines += ["[grpc]", f"ca = {q(str(tls / 'ca.crt'))}", ""]
    for component in ("master", "volume", "filer", "s3", "client"):
        lines += [f"[grpc.{component}]", f"cert = {q(str(cert))}", f"key = {q(str(key))}", ""]
    _write_private(path, "\n".join(lines).encode())
    return path


# ---- bucket events: the filer's webhook to the relay ----------------------------------------------
#
# The filer POSTs every change under /buckets/ to the stack's event relay (tasks/events.py, the
# "events" service) with a bearer token made once per stack (<root>/events_token, 0600); each
# `cns serve` long-polls the relay with the same token (CNS_EVENTS_URL/CNS_EVENTS_TOKEN).

EVENTS_TOKEN_FILE = "events_token"
EVENTS_TOKEN_ENV = "CNS_EVENTS_TOKEN"
NOTIFICATION_FILE = "notification.toml"


def events_token(root: Path, create: bool = False) -> str | None:
    path = root / EVENTS_TOKEN_FILE
    if not path.is_file():
        if not create:
            return None
        _write_private(path, secrets.token_urlsafe(32).encode())
    return path.read_text().strip()


def ensure_notifications(config: StackConfig) -> Path:
    """``<root>/notification.toml`` (0600; the filer reads it from its working directory at start)."""
    path = config.root / NOTIFICATION_FILE
    _write_private(path, _notifications(config).encode())
    return path


def _notifications(config: StackConfig) -> str:
    token = events_token(config.root, create=True)
    q = json.dumps
    lines = ["# made by `cns stack up`: bucket events to the stack's relay (tasks/events.py); keep it private",
             "[notification.webhook]", "enabled = true",
             f"endpoint = {q(config.events_url + '/seaweedfs')}", f"bearer_token = {q(token)}",
             # the relay only appends to memory: a refused event means it is restarting
             "timeout_seconds = 5", "max_retries = 3", "backoff_seconds = 1", "max_backoff_seconds = 4",
             "workers = 2", "buffer_size = 10000", 'event_types = ["create", "update", "rename", "delete"]',
             'path_prefixes = ["/buckets/"]', ""]
    return "\n".join(lines)


def _health_urls(name: str, config: StackConfig) -> list[str]:
    if name == "s3":  # the gateway, and a volume server that has reached the master (else reads fail)
        return [f"{config.s3_url}/healthz", f"http://{HOST}:{_weed_ports(config)['volume']}/healthz"]
    return [{"mlflow": f"{config.mlflow_url}/health", "prefect": f"{config.prefect_api_url}/health",
             "events": f"{config.events_url}/health"}[name]]


def _service_healthy(name: str, config: StackConfig, timeout: float = 2.0) -> bool:
    return all(healthy(url, timeout) for url in _health_urls(name, config))


def _user_url(name: str, config: StackConfig) -> str:
    return {"s3": config.s3_url, "mlflow": config.mlflow_url, "prefect": config.prefect_api_url,
            "events": config.events_url}[name]


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


# ---- pid records -------------------------------------------------------------------------------

def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else int(fields[19])  # a zombie has exited already


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in "ZX":
                members.append(int(entry.name))
    return members


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _record_path(config: StackConfig, name: str) -> Path:
    return config.root / "run" / f"{name}.json"


def _read_record(config: StackConfig, name: str) -> dict | None:
    """The pid record if its process group is still the one we started, else None (stale: removed)."""
    path = _record_path(config, name)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        pid, ticks = int(record["pid"]), int(record["start_ticks"])
    except (ValueError, KeyError, TypeError):
        log.warning("%s: unreadable pid record, ignoring it", path)
        path.unlink()
        return None
    if _start_ticks(pid) == ticks:
        return record
    # The leader is gone. Its group may live on (a server's worker): Linux does not reuse a pid
    # while it names a process group, so members with pgid == pid are still ours.
    if _start_ticks(pid) is None and _group_members(pid):
        return record
    log.info("%s: stale pid record (process %d is not running), removing it", path, pid)
    path.unlink()
    return None


def _write_record(config: StackConfig, name: str, proc: subprocess.Popen, argv: list[str]) -> None:
    path = _record_path(config, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"pid": proc.pid, "start_ticks": _start_ticks(proc.pid), "argv": argv,
              "ports": config.service_ports(name), "url": _user_url(name, config)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


# ---- up / down / status ------------------------------------------------------------------------

def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT after `down` is fine
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def status(config: StackConfig) -> list[ServiceStatus]:
    """Each service's state from its pid record and its health endpoint (nothing is started)."""
    result = []
    for name in SERVICES:
        record = _read_record(config, name)
        url = record["url"] if record else _user_url(name, config)
        if record is None:
            result.append(ServiceStatus(name, url, "stopped"))
            continue
        ok = _service_healthy(name, config)
        result.append(ServiceStatus(name, url, "running" if ok else "unhealthy", record["pid"],
                                    round(_rss_mb(_group_members(record["pid"])), 1)))
    return result


def up(config: StackConfig, timeout: float = 60.0) -> tuple[list[ServiceStatus], Credentials]:
    """Start whatever is not running, wait for every health check, create the bucket.

    Idempotent: a running service is left alone. A port another program holds is an error that
    names the port before anything starts.
    """
    _private_dir(config.root)  # keys, TLS files, sockets and data: this user only
    (config.root / "logs").mkdir(exist_ok=True)
    for sub in ("mlflow", "prefect", "seaweedfs"):
        (config.root / sub).mkdir(exist_ok=True)
    _private_dir(config.root / "run")  # pid records and the filer's and gateway's unix sockets
    creds = credentials(config.root, create=True)
    ensure_seaweed_security(config.root)
    to_start = [name for name in SERVICES if _read_record(config, name) is None]
    events_token(config.root, create=True)
    if "s3" in to_start:
        ensure_notifications(config)
    if "mlflow" in to_start:
        ensure_mlflow_auth(config.root)
    if "prefect" in to_start:
        ensure_prefect_auth(config.root)
    for name in to_start:
        for port in config.service_ports(name):
            # a killed multi-threaded server reads as exited (its leader thread is a zombie) a moment
            # before its last thread lets go of its sockets: give such a port a few seconds
            waited = time.monotonic() + PORT_RELEASE_WAIT
            while not _port_free(port) and time.monotonic() < waited:
                time.sleep(0.2)
            if not _port_free(port):
                raise StackError(f"{HOST}:{port}", f"port is already in use by another program; {name} needs it "
                                 f"(pick another with --{name}-port or CNS_{name.upper()}_PORT)", "port_in_use")
    (config.root / "stack.json").write_text(json.dumps({"ports": config.ports, "bucket": config.bucket}, indent=1))
    procs = {}
    for name in to_start:
        argv, env = _service_command(name, config, creds)
        log_path = config.root / "logs" / f"{name}.log"
        with open(log_path, "ab") as log_file:
            procs[name] = subprocess.Popen(argv, env=env, cwd=config.root, stdin=subprocess.DEVNULL,
                                           stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        _write_record(config, name, procs[name], argv)
        log.info("started %s (pid %d), log %s", name, procs[name].pid, log_path)
    deadline = time.monotonic() + timeout
    pending = list(SERVICES)
    while pending:
        for name in list(pending):
            proc = procs.get(name)
            if proc is not None and proc.poll() is not None:
                log_path = config.root / "logs" / f"{name}.log"
                raise StackError(log_path, f"{name} exited with code {proc.returncode} while starting: "
                                 f"{_log_tail(log_path)}", "service_failed")
            if _service_healthy(name, config, timeout=1.0):
                pending.remove(name)
                if proc is not None:
                    log.info("%s healthy after %.1f s", name, timeout - (deadline - time.monotonic()))
        if pending and time.monotonic() > deadline:
            raise StackError(config.root / "logs" / f"{pending[0]}.log",
                             f"{', '.join(pending)} not healthy after {timeout:.0f} s", "service_timeout")
        if pending:
            time.sleep(0.2)
    ensure_bucket(config, creds)
    if "s3" in to_start:
        ensure_readable(config, creds, max(deadline, time.monotonic() + 20))
    notifications = config.root / NOTIFICATION_FILE
    if "s3" not in to_start and (not notifications.is_file() or notifications.read_text() != _notifications(config)):
        log.warning("the running S3 server sends its bucket events elsewhere (or not at all): it was started "
                    "with another events port or token, or before events existed; restart it (cns stack down, "
                    "then cns stack up) so that `cns serve` hears of new datasets at once")
    if "prefect" not in to_start and prefect_open(config):
        log.warning("the running Prefect server (%s) answers without authentication: it was started before "
                    "authentication was turned on; restart it (cns stack down, then cns stack up)",
                    config.prefect_api_url)
    return status(config), creds


def _s3_client(config: StackConfig, creds: Credentials, **botocore_config):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=config.s3_url, aws_access_key_id=creds.access_key,
                        aws_secret_access_key=creds.secret_key, region_name="us-east-1",
                        config=Config(**botocore_config) if botocore_config else None)


def ensure_bucket(config: StackConfig, creds: Credentials) -> None:
    from botocore.exceptions import ClientError

    s3 = _s3_client(config, creds)
    for attempt in range(50):  # the filer may answer /healthz a moment before it accepts writes
        try:
            s3.head_bucket(Bucket=config.bucket)
            return
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("404", "NoSuchBucket"):
                try:
                    s3.create_bucket(Bucket=config.bucket)
                    return
                except ClientError as create_exc:
                    if create_exc.response.get("Error", {}).get("Code") in ("BucketAlreadyOwnedByYou",):
                        return
                    err = create_exc
            elif code in ("403", "SignatureDoesNotMatch", "InvalidAccessKeyId"):
                raise StackError(f"s3://{config.bucket}", "the running S3 server refuses these credentials: "
                                 "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY differ from the ones it was started with",
                                 "access_denied") from None
            else:
                err = exc
        time.sleep(0.1)
    raise StackError(f"s3://{config.bucket}", f"cannot create the bucket ({err})", "bucket_failed")


PROBE_KEY = ".stack-ready"  # at the root: no directory entry is left behind


def ensure_readable(config: StackConfig, creds: Credentials, deadline: float) -> None:
    """Wait until the restarted gateway serves reads, not only its health check.

    After a restart the filer learns where the volumes are from the master, which learns it from
    the volume server's heartbeat; until then GetObject answers InternalError although every
    /healthz is 200 (seen on CI after a killed S3 server). One object written and read back, and
    the first stored object read, prove the path for every volume of the one volume server.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = _s3_client(config, creds, retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5)
    body, failures, last = secrets.token_bytes(16), 0, None
    while True:
        try:
            s3.put_object(Bucket=config.bucket, Key=PROBE_KEY, Body=body)
            if s3.get_object(Bucket=config.bucket, Key=PROBE_KEY)["Body"].read() != body:
                raise StackError(f"s3://{config.bucket}/{PROBE_KEY}", "read back other bytes than written",
                                 "bucket_failed")
            listed = s3.list_objects_v2(Bucket=config.bucket, MaxKeys=2).get("Contents", [])
            for item in listed:
                if item["Key"] != PROBE_KEY and item["Size"] > 0:
                    s3.get_object(Bucket=config.bucket, Key=item["Key"], Range="bytes=0-0")["Body"].read()
                    break
            s3.delete_object(Bucket=config.bucket, Key=PROBE_KEY)
            if failures:
                log.info("s3 serves reads after %d failed tries (%s)", failures, last)
            return
        except (ClientError, BotoCoreError) as exc:
            failures, last = failures + 1, exc
            if time.monotonic() > deadline:
                raise StackError(f"s3://{config.bucket}", f"the S3 server does not serve reads yet ({exc})",
                                 "service_timeout") from None
            time.sleep(0.2)


# A standalone `weed filer` waits out a 15 s gRPC graceful stop for its own metadata subscription,
# which never ends by itself (`weed mini` shortens that to 1 s; the filer command has no flag). Once
# the master and the volume server have exited there is nothing left for it to do: what it
# acknowledged is already written to its store's log, which a killed process does not lose.
FILER_GRACE = 2.0
KILL_WAIT = 10.0


def down(config: StackConfig, timeout: float = 15.0) -> list[str]:
    """Stop the process groups this stack started (SIGTERM, then SIGKILL after ``timeout``)."""
    return [name for name in reversed(SERVICES) if stop_service(config, name, timeout)]


def stop_service(config: StackConfig, name: str, timeout: float = 15.0) -> bool:
    """Stop one service's process group if this stack started it (False: it was not running)."""
    record = _read_record(config, name)
    if record is None:
        return False
    pgid = record["pid"]
    _signal_group(pgid, signal.SIGTERM)
    start = time.monotonic()
    deadline, alone_since = start + timeout, None
    while (members := _group_members(pgid)) and time.monotonic() < deadline:
        if name == "s3" and members == [pgid]:  # master and volume server are gone, the filer is not
            alone_since = alone_since or time.monotonic()
            if time.monotonic() - alone_since > FILER_GRACE:
                log.info("the filer is waiting out its gRPC graceful stop; killing it")
                _signal_group(pgid, signal.SIGKILL)
        time.sleep(0.1)
    if _group_members(pgid):
        log.warning("%s did not stop within %.0f s, killing it", name, timeout)
        _signal_group(pgid, signal.SIGKILL)
    killed = time.monotonic() + KILL_WAIT
    while _group_members(pgid) and time.monotonic() < killed:  # SIGKILL is not instant for a busy process
        time.sleep(0.05)
    if left := _group_members(pgid):
        log.warning("%s: processes %s outlived SIGKILL for %.0f s (uninterruptible I/O?); its ports may stay "
                    "busy until they exit", name, ", ".join(map(str, left)), KILL_WAIT)
    log.info("stopped %s (pid %d) in %.1f s", name, pgid, time.monotonic() - start)
    _record_path(config, name).unlink(missing_ok=True)
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    try:  # reap our own child if we are the process that started it (tests, `up` then `down`)
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass


def to_dict(items: list[ServiceStatus]) -> list[dict]:
    return [asdict(s) for s in items]
