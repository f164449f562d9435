"""Event-driven ingest: bucket events start a watch pass within seconds, not at the next poll.

Two parts:

- **The relay** (``python -m tasks.events``), the stack's fourth service (``cns stack up``; port
  ``CNS_EVENTS_PORT``, default 8390, on 127.0.0.1). It takes POSTs of bucket events and keeps the
  last :data:`RING` of them; ``cns serve`` processes long-poll ``GET /events``. Both need
  ``Authorization: Bearer $CNS_EVENTS_TOKEN`` (``<stack>/events_token``, 0600; ``cns stack env``
  exports it); only ``GET /health`` is open. Formats it takes:
  - SeaweedFS's filer webhook (``<stack>/notification.toml``, written by ``cns stack up``):
    ``{"key": "/buckets/<bucket>/incoming/<concept>/concept.yaml", "event_type": "create", ...}``
  - AWS S3 event notifications as S3 sends them (``{"Records": [{"eventName": "ObjectCreated:Put",
    "s3": {"bucket": {"name": ...}, "object": {"key": ...}}}]}``), e.g. forwarded by a small Lambda
    on the bucket's notifications;
  - Amazon EventBridge's S3 events (``{"source": "aws.s3", "detail-type": "Object Created",
    "detail": {"bucket": {"name": ...}, "object": {"key": ...}}}``), e.g. from an API destination
    with the token as its bearer authorization.
  The stack's relay listens on 127.0.0.1; on AWS run it (``--listen``) where the forwarder can reach it.
  The relay is always there while the stack is, so the filer never queues events for a ``cns
  serve`` that is not running, and every ``cns serve`` sees every event.
- **The subscriber** in ``cns serve`` (:class:`Subscriber`): any change under
  ``incoming/<concept>/`` or a removal request ``forget/<concept>`` of its bucket wakes a
  :class:`PassTrigger`, whose check looks at the bucket (one listing): a pending dataset or a
  request starts a watch pass in that process; a dataset still settling (docs/bucket.md,
  "Readiness") wakes the check again when it has settled. Events that arrive while a pass runs
  coalesce into one more check after it. The watch schedule stays as the fallback for a relay that
  is down or notifications that never come.
"""

from __future__ import annotations

import argparse
import collections
import hmac
import json
import logging
import os
import secrets
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from cns.errors import CNSError
from tasks.bucket import FORGET, INCOMING, MANIFEST

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # one filer event is a few KiB; a batch of S3 records is far below this
RING = 10_000  # events the relay keeps for subscribers that fall behind
MAX_WAIT = 30.0  # the longest long-poll the relay holds
SOCKET_TIMEOUT = 10.0  # a connection that sends nothing (or a body slower than this) is closed
MAX_CONNECTIONS = 64  # the filer's workers and a few `cns serve` long-polls need far fewer
DEBOUNCE_SECONDS = 0.3  # a burst of manifests (20 drops at once) starts one pass, not twenty
MANIFEST_DELAY = 0.05  # a manifest's check waits only for the events sent with it
MAX_DEFER = 2.0  # a burst of other events defers its check at most this long
RETRY_SECONDS = 15.0  # after a failed pass (the lineage busy past its lock timeout, S3 down), doubling
MAX_RETRY_SECONDS = 600.0
TOKEN_ENV = "CNS_EVENTS_TOKEN"


@dataclass(frozen=True)
class BucketEvent:
    bucket: str
    key: str  # the object's key in the bucket
    kind: str  # create, update, delete, rename (S3: ObjectCreated -> create, ObjectRemoved -> delete)

    @property
    def concept(self) -> str | None:
        if self.key.startswith(INCOMING):
            folder, sep, _ = self.key[len(INCOMING):].partition("/")
            return folder if sep and folder else None
        return None

    @property
    def is_manifest(self) -> bool:
        return self.concept is not None and self.key == f"{INCOMING}{self.concept}/{MANIFEST}"

    @property
    def is_removal_request(self) -> bool:
        name = self.key[len(FORGET):] if self.key.startswith(FORGET) else ""
        return bool(name) and "/" not in name

    @property
    def wakes(self) -> bool:
        """A change in a dataset folder or a removal request (not the folder entries themselves)."""
        return self.is_removal_request or self.concept is not None


def _filer_path(path: str) -> tuple[str, str] | None:
    """(bucket, key) of a filer path ``/buckets/<bucket>/<key>``."""
    parts = path.split("/", 3)
    if len(parts) == 4 and parts[0] == "" and parts[1] == "buckets" and parts[2] and parts[3]:
        return parts[2], parts[3]
    return None


def parse_events(body: bytes) -> list[BucketEvent]:
    """The bucket events in one POST body (either format above). Raises ValueError for a body
    that is neither."""
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    events = []
    if isinstance(data.get("Records"), list):  # AWS S3 event notification
        for record in data["Records"]:
            s3 = record.get("s3") if isinstance(record, dict) else None
            if not isinstance(s3, dict):
                continue
            name = str((s3.get("bucket") or {}).get("name", ""))
            key = urllib.parse.unquote_plus(str((s3.get("object") or {}).get("key", "")))
            kind = "delete" if str(record.get("eventName", "")).startswith("ObjectRemoved") else "create"
            if name and key:
                events.append(BucketEvent(name, key, kind))
        return events
    if data.get("source") == "aws.s3" and isinstance(data.get("detail"), dict):  # Amazon EventBridge
        detail = data["detail"]
        name = str((detail.get("bucket") or {}).get("name", ""))
        key = str((detail.get("object") or {}).get("key", ""))
        kind = "delete" if str(data.get("detail-type", "")).startswith("Object Deleted") else "create"
        return [BucketEvent(name, key, kind)] if name and key else []
    if isinstance(data.get("key"), str):  # SeaweedFS filer webhook: the entry's full path
        kind = str(data.get("event_type", "update"))
        if where := _filer_path(data["key"]):
            events.append(BucketEvent(*where, kind))
        message = data.get("message") or {}
        # a rename's new place is in new_parent_path + new_entry.name
        new_parent, new_entry = message.get("new_parent_path") or "", message.get("new_entry") or {}
        if kind == "rename" and new_entry.get("name"):
            if where := _filer_path(f"{new_parent.rstrip('/')}/{new_entry['name']}"):
                events.append(BucketEvent(*where, "create"))
        return events
    raise ValueError("neither a SeaweedFS webhook event nor an S3 event notification")


class PassTrigger:
    """Runs ``run_pass(reason)`` in one background thread when woken; wakes during a pass coalesce
    into one more pass after it. ``run_pass`` returns the seconds until it wants to run again (a
    settling folder's ready time) or None."""

    def __init__(self, run_pass: Callable[[str], float | None], debounce: float = DEBOUNCE_SECONDS):
        self._run_pass, self._debounce = run_pass, debounce
        self._cond = threading.Condition()
        self._due: float | None = None  # monotonic time of the earliest wanted pass
        self._reason = ""
        self._trailing_since: float | None = None  # set while _due is a burst's trailing wake
        self._stopped = False
        self.passes = 0
        self._failures = 0
        self._thread = threading.Thread(target=self._loop, name="cns-event-passes", daemon=True)

    def start(self) -> "PassTrigger":
        self._thread.start()
        return self

    def wake(self, reason: str, delay: float | None = None) -> None:
        """A check after ``delay`` (default: the debounce), unless one is due sooner already."""
        self.wake_at(time.monotonic() + (self._debounce if delay is None else delay), reason)

    def wake_at(self, when: float, reason: str) -> None:
        with self._cond:
            if self._due is None or when < self._due:
                self._due, self._reason, self._trailing_since = when, reason, None
            self._cond.notify()

    def wake_trailing(self, reason: str) -> None:
        """A check once a burst of events pauses for the debounce, but no later than
        :data:`MAX_DEFER` after its first event (a long upload is still looked at now and then)."""
        now = time.monotonic()
        with self._cond:
            if self._due is not None and self._trailing_since is None:
                return  # a sooner, firm check is due already
            start = now if self._trailing_since is None else self._trailing_since
            self._due, self._reason, self._trailing_since = min(now + self._debounce, start + MAX_DEFER), reason, start
            self._cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (self._due is None or self._due > time.monotonic()):
                    self._cond.wait(None if self._due is None else max(0.0, self._due - time.monotonic()))
                if self._stopped:
                    return
                reason, self._due, self._trailing_since = self._reason, None, None
            self.passes += 1
            try:
                again = self._run_pass(reason)
                why = "a folder settled" if again else "what landed during the pass"
                self._failures = 0
            except Exception as exc:  # the flow run (if any) says why; retried with backoff, the poll stays
                self._failures += 1
                again, why = min(RETRY_SECONDS * 2 ** (self._failures - 1), MAX_RETRY_SECONDS), "retry"
                log.warning("event-triggered pass failed (%s); trying again in %.0f s", exc, again)
            if again is not None:
                self.wake_at(time.monotonic() + max(0.0, again), why)


def _check_token(token: str | None) -> str:
    if not token or len(token) < 16:
        raise CNSError(TOKEN_ENV, "not set or shorter than 16 characters", "config_invalid")
    return token


def _split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise CNSError("--listen", f"{listen!r} is not HOST:PORT", "config_invalid")
    return host, int(port)


class _CappedServer(ThreadingHTTPServer):
    """At most :data:`MAX_CONNECTIONS` connections at once (a thread each); more are closed at once."""

    daemon_threads = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class Relay:
    """The stack's event service: POSTed events in, long-polled ``GET /events?after=N&wait=S`` out."""

    def __init__(self, listen: str, token: str):
        host, port = _split_listen(listen)
        self._auth = f"Bearer {_check_token(token)}".encode()
        self.boot = secrets.token_hex(8)  # a subscriber that sees another boot id knows it missed events
        self._events: collections.deque = collections.deque(maxlen=RING)
        self._seq = 0
        self._cond = threading.Condition()
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = SOCKET_TIMEOUT  # an idle or trickling connection is closed, not held forever

            def do_POST(self):  # noqa: N802 (http.server's names)
                relay._post(self)

            def do_GET(self):  # noqa: N802
                relay._get(self)

            def log_message(self, format, *args):  # the filer sends one request per event: not logged
                pass

        self.server = _CappedServer((host, port), Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "Relay":
        self._thread = threading.Thread(target=self.server.serve_forever, name="cns-events-relay", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def publish(self, events: list[BucketEvent]) -> None:
        with self._cond:
            for event in events:
                self._seq += 1
                self._events.append((self._seq, event))
            self._cond.notify_all()

    def since(self, after: int, wait: float, boot: str | None = None) -> dict:
        """Events after ``after``, waiting up to ``wait`` s for one. A subscriber of another boot
        (the relay restarted) or ahead of this one gets its answer at once, marked ``lost``."""
        deadline = time.monotonic() + wait
        with self._cond:
            if (boot is not None and boot != self.boot) or after > self._seq:
                return {"boot": self.boot, "next": self._seq, "lost": True,
                        "events": [{"seq": n, **asdict(e)} for n, e in self._events]}
            while self._seq <= after and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            oldest = self._events[0][0] if self._events else self._seq + 1
            return {"boot": self.boot, "next": self._seq, "lost": after + 1 < oldest and after < self._seq,
                    "events": [{"seq": n, **asdict(e)} for n, e in self._events if n > after]}

    def _reply(self, handler: BaseHTTPRequestHandler, status: int, body: bytes = b"") -> None:
        # The filer keeps its connection for the next event; a request whose body was not read
        # (refused before) leaves the connection unusable, so that one is closed, and says so.
        handler.send_response(status)
        if status >= 400:
            handler.close_connection = True
            handler.send_header("Connection", "close")
        handler.send_header("Content-Length", str(len(body)))
        if body:
            handler.send_header("Content-Type", "application/json")
        handler.end_headers()
        handler.wfile.write(body)

    def _authorized(self, handler: BaseHTTPRequestHandler) -> bool:
        return hmac.compare_digest((handler.headers.get("Authorization") or "").encode(), self._auth)

    def _post(self, handler: BaseHTTPRequestHandler) -> None:
        if not self._authorized(handler):
            return self._reply(handler, 401)
        try:
            length = int(handler.headers.get("Content-Length") or -1)
        except ValueError:
            length = -1
        if handler.headers.get("Transfer-Encoding") or not 0 <= length <= MAX_BODY:
            return self._reply(handler, 413 if length > MAX_BODY else 411)  # a body needs its length
        try:
            events = parse_events(handler.rfile.read(length))
        except (ValueError, AttributeError, TypeError, RecursionError):
            return self._reply(handler, 400)
        self.publish(events)
        self._reply(handler, 204)

    def _get(self, handler: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(handler.path)
        if url.path == "/health":
            return self._reply(handler, 200, b'{"ok": true}')
        if not self._authorized(handler):
            return self._reply(handler, 401)
        if url.path != "/events":
            return self._reply(handler, 404)
        query = urllib.parse.parse_qs(url.query)
        try:
            after = int(query.get("after", ["0"])[0])
            wait = min(max(float(query.get("wait", ["0"])[0]), 0.0), MAX_WAIT)
        except ValueError:
            return self._reply(handler, 400)
        boot = query.get("boot", [None])[0]
        self._reply(handler, 200, json.dumps(self.since(after, wait, boot)).encode())


class Subscriber:
    """Long-polls the relay in a background thread and wakes ``trigger`` for events of ``bucket``
    that change a dataset folder or ask for a removal. A relay that restarted or that dropped
    events before they were read wakes it too (something may have landed)."""

    def __init__(self, url: str, token: str, bucket: str, trigger: PassTrigger, wait: float = 25.0):
        self.url, self.bucket, self.trigger, self.wait = url.rstrip("/"), bucket, trigger, wait
        self._auth = f"Bearer {_check_token(token)}"
        self._stopped = threading.Event()
        self.connected = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cns-events-subscriber", daemon=True)

    def start(self) -> "Subscriber":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def _fetch(self, after: int, boot: str | None) -> dict:
        query = f"after={after}&wait={self.wait:g}" + (f"&boot={boot}" if boot else "")
        request = urllib.request.Request(f"{self.url}/events?{query}", headers={"Authorization": self._auth})
        with urllib.request.urlopen(request, timeout=self.wait + 10) as resp:
            reply = json.loads(resp.read())
        if not (isinstance(reply, dict) and isinstance(reply.get("boot"), str) and isinstance(reply.get("next"), int)
                and isinstance(reply.get("events"), list)):
            raise ValueError("not an events reply")
        return reply

    def _loop(self) -> None:
        boot, after, failing = None, 0, None
        while not self._stopped.is_set():
            try:
                reply = self._fetch(after, boot)
            except Exception as exc:  # the thread must outlive any reply: polling covers the gap
                problem = "the token is refused (CNS_EVENTS_TOKEN is not this stack's)" \
                    if isinstance(exc, urllib.error.HTTPError) and exc.code == 401 \
                    else f"unreachable ({getattr(exc, 'reason', exc)})"
                if failing != problem:
                    log.warning("bucket events relay %s: %s; polling only until it answers", self.url, problem)
                    failing = problem
                self.connected.clear()
                self._stopped.wait(2.0)
                continue
            if failing is not None or boot is None:
                # first contact, or back after a gap: whatever landed meanwhile may be pending
                if failing is not None:
                    log.info("bucket events relay %s answers again", self.url)
                self.trigger.wake("connected to the events relay")
                failing = None
            elif reply["boot"] != boot or reply.get("lost"):
                self.trigger.wake("the events relay restarted or dropped events")
            boot, after = reply["boot"], reply["next"]
            self.connected.set()
            for item in reply["events"]:
                try:
                    event = BucketEvent(str(item["bucket"]), str(item["key"]), str(item["kind"]))
                except (KeyError, TypeError):
                    continue
                if event.bucket == self.bucket and event.wakes:
                    # a manifest is what makes a folder ready: check now; other files come in
                    # bursts (an upload's images), so they wait for the burst to pause
                    if event.is_manifest:
                        self.trigger.wake(f"{event.kind} {event.key}", MANIFEST_DELAY)
                    else:
                        self.trigger.wake_trailing(f"{event.kind} {event.key}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.events",
                                     description="the stack's bucket-event relay (token in $CNS_EVENTS_TOKEN)")
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        relay = Relay(args.listen, os.environ.get(TOKEN_ENV, ""))
    except CNSError as exc:
        print(f"cns events: error: {exc}", file=sys.stderr)
        return 2
    log.info("bucket events relay on %s", relay.url)
    try:
        relay.server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
