"""The bucket-event relay and subscriber (tasks/events.py) on real sockets: authentication, both
payload formats, long polls, what wakes a pass, and passes that coalesce. The filer's webhook to
the stack's relay and a `cns serve` that learns from it: tests/stack/test_events_ingest.py."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from cns.errors import CNSError
from tasks.events import BucketEvent, PassTrigger, Relay, Subscriber, parse_events

TOKEN = "t" * 40


class Wakes:
    def __init__(self):
        self.reasons = []

    def wake(self, reason, delay=None):
        self.reasons.append(reason)

    def wake_at(self, when, reason):
        self.reasons.append(reason)

    def wake_trailing(self, reason):
        self.reasons.append(reason)


@pytest.fixture
def relay():
    rel = Relay("127.0.0.1:0", TOKEN).start()
    yield rel
    rel.stop()


def request(url, path="/seaweedfs", body=None, token=TOKEN, headers=None, method=None):
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {}),
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def post(url, body, **kwargs):
    return request(url, body=body, **kwargs)[0]


def events(url, after=0, wait=0):
    status, body = request(url, f"/events?after={after}&wait={wait}")
    assert status == 200
    return json.loads(body)


def filer_event(key, kind="create"):
    return {"event_type": kind, "key": key, "message": {"new_entry": {"name": key.rsplit("/", 1)[-1]}}}


def s3_records(*keys, bucket="cns", name="ObjectCreated:Put"):
    return {"Records": [{"eventName": name, "s3": {"bucket": {"name": bucket}, "object": {"key": k}}} for k in keys]}


@pytest.mark.parametrize("token", [None, "", "wrong", TOKEN[:-1], TOKEN + "x"])
def test_a_request_without_the_token_is_refused_and_publishes_or_reads_nothing(relay, token):
    assert post(relay.url, filer_event("/buckets/cns/incoming/dog/concept.yaml"), token=token) == 401
    assert request(relay.url, "/events?after=0", token=token)[0] == 401
    assert events(relay.url)["events"] == []


def test_a_basic_auth_header_carrying_the_token_is_refused(relay):
    status = post(relay.url, filer_event("/buckets/cns/incoming/dog/concept.yaml"), token=None,
                  headers={"Authorization": f"Basic {TOKEN}"})
    assert status == 401 and events(relay.url)["events"] == []


def test_only_health_is_open(relay):
    assert request(relay.url, "/health", token=None)[0] == 200
    assert request(relay.url, "/", token=None)[0] == 401
    assert request(relay.url, "/nothing")[0] == 404


def test_bad_bodies_are_400_and_large_ones_413(relay, monkeypatch):
    import tasks.events

    assert post(relay.url, b"not json") == 400
    assert post(relay.url, b"[1, 2]") == 400
    assert post(relay.url, {"something": "else"}) == 400
    monkeypatch.setattr(tasks.events, "MAX_BODY", 100)
    assert post(relay.url, b"x" * 101) == 413
    assert events(relay.url)["events"] == []


def test_filer_events_are_relayed_with_their_bucket_and_key(relay):
    for key in ("/buckets/cns/incoming/dog/concept.yaml", "/buckets/other/forget/cat", "/elsewhere/x",
                "/buckets/cns"):
        assert post(relay.url, filer_event(key)) == 204
    got = events(relay.url)
    assert [(e["bucket"], e["key"], e["kind"]) for e in got["events"]] == [
        ("cns", "incoming/dog/concept.yaml", "create"), ("other", "forget/cat", "create")]
    assert got["next"] == 2 and events(relay.url, after=1)["events"][0]["key"] == "forget/cat"


def test_a_long_poll_returns_as_soon_as_an_event_arrives(relay):
    import threading

    threading.Timer(0.3, lambda: post(relay.url, filer_event("/buckets/cns/incoming/a/b.png"))).start()
    start = time.monotonic()
    got = events(relay.url, after=0, wait=10)
    assert 0.2 < time.monotonic() - start < 3 and [e["key"] for e in got["events"]] == ["incoming/a/b.png"]


def test_a_rename_into_a_dataset_folder_counts_where_it_lands():
    body = {"event_type": "rename", "key": "/buckets/cns/staging/concept.yaml",
            "message": {"old_entry": {"name": "concept.yaml"}, "new_entry": {"name": "concept.yaml"},
                        "new_parent_path": "/buckets/cns/incoming/cat"}}
    assert parse_events(json.dumps(body).encode())[-1] == BucketEvent("cns", "incoming/cat/concept.yaml", "create")


def test_s3_event_notifications_are_understood_and_keys_unquoted():
    body = json.dumps(s3_records("incoming/my+dog/concept.yaml", "forget/x%2Fy")).encode()
    assert parse_events(body) == [BucketEvent("cns", "incoming/my dog/concept.yaml", "create"),
                                  BucketEvent("cns", "forget/x/y", "create")]
    removed = json.dumps(s3_records("forget/dog", name="ObjectRemoved:Delete")).encode()
    assert parse_events(removed) == [BucketEvent("cns", "forget/dog", "delete")]


def test_eventbridge_s3_events_are_understood():
    created = {"source": "aws.s3", "detail-type": "Object Created",
               "detail": {"bucket": {"name": "cns"}, "object": {"key": "incoming/dog/concept.yaml"}}}
    deleted = {**created, "detail-type": "Object Deleted"}
    assert parse_events(json.dumps(created).encode()) == [BucketEvent("cns", "incoming/dog/concept.yaml", "create")]
    assert parse_events(json.dumps(deleted).encode())[0].kind == "delete"


def test_what_wakes_a_pass():
    wakes = [BucketEvent("cns", k, "create").wakes for k in (
        "incoming/dog/concept.yaml", "incoming/dog/00.png", "forget/dog",
        "incoming/dog", "incoming", "forget/a/b", "mlflow/1/x.png", "forget/")]
    assert wakes == [True, True, True, False, False, False, False, False]


def test_the_subscriber_wakes_for_its_bucket_only_and_when_the_relay_restarts(relay):
    wakes = Wakes()
    sub = Subscriber(relay.url, TOKEN, "cns", wakes, wait=1).start()
    try:
        deadline = time.monotonic() + 10
        while not sub.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        for key in ("/buckets/cns/incoming/dog/concept.yaml", "/buckets/other/incoming/dog/concept.yaml",
                    "/buckets/cns/mlflow/1/a.png", "/buckets/cns/forget/dog"):
            post(relay.url, filer_event(key))
        while len(wakes.reasons) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        # first contact wakes a check too: something may have landed before it
        assert wakes.reasons == ["connected to the events relay", "create incoming/dog/concept.yaml",
                                 "create forget/dog"]
        relay.boot = "another"  # what a restarted relay answers; it answers at once, not after the wait
        start = time.monotonic()
        while len(wakes.reasons) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert wakes.reasons[3] == "the events relay restarted or dropped events"
        assert time.monotonic() - start < 1.5
    finally:
        sub.stop()


def test_bad_settings_are_one_line_errors():
    with pytest.raises(CNSError, match="--listen.*HOST:PORT"):
        Relay("8080", TOKEN)
    with pytest.raises(CNSError, match="CNS_EVENTS_TOKEN.*16"):
        Relay("127.0.0.1:0", "short")


def test_the_relay_process_refuses_to_start_without_a_token(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CNS_EVENTS_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "tasks.events", "--listen", "127.0.0.1:0"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "cns events: error: CNS_EVENTS_TOKEN: not set or shorter than 16 characters"]


def test_wakes_during_a_pass_coalesce_into_one_more_pass():
    started, release = threading.Event(), threading.Event()
    reasons = []

    def run_pass(reason):
        reasons.append(reason)
        started.set()
        release.wait(5)
        return None

    trigger = PassTrigger(run_pass, debounce=0.05).start()
    try:
        trigger.wake("first")
        assert started.wait(5)
        for i in range(20):  # a burst while the first pass runs
            trigger.wake(f"burst {i}")
        release.set()
        deadline = time.monotonic() + 5
        while len(reasons) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
    finally:
        trigger.stop(timeout=5)
    assert reasons == ["first", "burst 0"]


def test_a_burst_before_the_pass_starts_is_one_pass():
    reasons = []
    trigger = PassTrigger(lambda r: reasons.append(r), debounce=0.2).start()
    try:
        for i in range(20):
            trigger.wake(f"drop {i}")
        time.sleep(0.6)
    finally:
        trigger.stop(timeout=5)
    assert len(reasons) == 1


def test_a_pass_that_asks_to_run_again_is_woken_then_and_a_failed_pass_is_retried():
    calls = []

    def run_pass(reason):
        calls.append((time.monotonic(), reason))
        if len(calls) == 1:
            return 0.3  # a folder settles in 0.3 s
        if len(calls) == 2:
            raise RuntimeError("S3 is down")
        return None

    import tasks.events as events

    saved, events.RETRY_SECONDS = events.RETRY_SECONDS, 0.2
    trigger = PassTrigger(run_pass, debounce=0.01).start()
    try:
        trigger.wake("drop")
        time.sleep(1.2)
    finally:
        trigger.stop(timeout=5)
        events.RETRY_SECONDS = saved
    assert [r for _, r in calls] == ["drop", "a folder settled", "retry"]
    assert 0.25 <= calls[1][0] - calls[0][0] < 0.8
    assert 0.15 <= calls[2][0] - calls[1][0] < 0.8


def test_the_bucket_hash_cache_is_never_written_into_the_current_directory(tmp_path, monkeypatch):
    """A pass run from the workspace left an untracked `.stack/` there (issue 11, item 5)."""
    from types import SimpleNamespace

    from tasks.bucket import HashCache, default_cache_path

    client = SimpleNamespace(meta=SimpleNamespace(endpoint_url="http://127.0.0.1:8333"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CNS_STACK_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = default_cache_path(client, "cns")
    assert path.parent == tmp_path / "xdg" / "cns-pipeline"
    cache = HashCache(path)
    cache.put("signature", "digest")
    cache.save({"signature"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["xdg"]
    monkeypatch.setenv("CNS_STACK_DIR", str(tmp_path / "stack"))
    assert default_cache_path(client, "cns").parent == tmp_path / "stack" / "cache"


def test_a_subscriber_ahead_of_the_relay_or_of_another_boot_is_answered_at_once(relay):
    post(relay.url, filer_event("/buckets/cns/incoming/a/b.png"))
    for query in ("after=5&wait=5", f"after=0&wait=5&boot=not-{relay.boot}"):
        start = time.monotonic()
        status, body = request(relay.url, f"/events?{query}")
        got = json.loads(body)
        assert status == 200 and got["lost"] and got["next"] == 1 and time.monotonic() - start < 1


def test_hostile_connections_do_not_wedge_the_relay(monkeypatch):
    """Deep JSON, a chunked body, idle sockets (closed after the socket timeout) and more
    connections than the cap: each is refused or dropped, and the relay still answers."""
    import socket

    import tasks.events as module

    monkeypatch.setattr(module, "SOCKET_TIMEOUT", 0.5)
    monkeypatch.setattr(module, "MAX_CONNECTIONS", 3)
    rel = Relay("127.0.0.1:0", TOKEN).start()
    try:
        assert post(rel.url, b"[" * 100_000) == 400
        host, port = rel.server.server_address[:2]
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"POST /seaweedfs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
                         b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 411")
        idle = [socket.create_connection((host, port), timeout=5) for _ in range(3)]  # the cap, held
        extra = socket.create_connection((host, port), timeout=5)
        assert extra.recv(10) == b""  # over the cap: closed at once
        extra.close()
        for sock in idle:
            assert sock.recv(10) == b""  # closed by the socket timeout, not held forever
            sock.close()
        assert request(rel.url, "/health", token=None)[0] == 200
        assert events(rel.url)["events"] == []
    finally:
        rel.stop()


def test_the_subscriber_outlives_garbage_replies_and_names_a_refused_token(caplog):
    """A reply that is not an events reply, and a 401, leave the subscriber thread alive and
    polling; a refused token is said as such (not "unreachable")."""
    import logging
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answers = [(200, b'{"x": 1}'), (200, b"null"), (401, b"")]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            status, body = answers.pop(0) if answers else (200, b'{"boot": "b", "next": 0, "events": []}')
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    import tasks.events as events

    wakes = Wakes()
    sub = Subscriber(f"http://127.0.0.1:{server.server_address[1]}", TOKEN, "cns", wakes, wait=0.2)
    saved = events.Subscriber._loop
    try:
        with caplog.at_level(logging.WARNING, logger="tasks.events"):
            sub._stopped.wait = lambda timeout: time.sleep(0.05)  # no 2 s pause between tries here
            sub.start()
            deadline = time.monotonic() + 10
            while not sub.connected.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
        assert sub.connected.is_set() and sub._thread.is_alive()
        assert "connected to the events relay" in wakes.reasons
        assert any("token is refused" in r.getMessage() for r in caplog.records)
    finally:
        sub._stopped.set()
        events.Subscriber._loop = saved
        server.shutdown()


def test_a_burst_of_image_events_is_checked_once_it_pauses_and_never_later_than_max_defer():
    import tasks.events as events

    times = []
    trigger = PassTrigger(lambda r: times.append(time.monotonic()), debounce=0.3).start()
    try:
        start = time.monotonic()
        for _ in range(8):  # an upload: an image every 0.1 s for 0.8 s
            trigger.wake_trailing("create incoming/dog/0x.png")
            time.sleep(0.1)
        time.sleep(0.6)
        assert len(times) == 1 and 0.7 + 0.25 <= times[0] - start < 0.7 + 0.6  # 0.3 s after the last event
        times.clear()
        start = time.monotonic()
        while time.monotonic() - start < events.MAX_DEFER + 0.8:  # a burst that never pauses
            trigger.wake_trailing("create incoming/dog/0y.png")
            time.sleep(0.1)
        assert times and times[0] - start <= events.MAX_DEFER + 0.2
    finally:
        trigger.stop(timeout=5)


def test_failed_passes_back_off(monkeypatch):
    import tasks.events as events

    monkeypatch.setattr(events, "RETRY_SECONDS", 0.1)
    calls = []

    def failing(reason):
        calls.append(time.monotonic())
        raise RuntimeError("S3 is down")

    trigger = PassTrigger(failing, debounce=0.01).start()
    try:
        trigger.wake("drop")
        time.sleep(1.0)
    finally:
        trigger.stop(timeout=5)
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert len(calls) in (4, 5) and all(later > 1.6 * earlier for earlier, later in zip(gaps, gaps[1:]))
