"""One writer per cumulative model: an advisory file lock beside the model directory.

``cns learn``, ``cns forget`` and every pipeline pass (``tasks.learning.lineage_lock``) take the
same lock, ``<parent>/.<model dir name>.lock`` (``data/.model.lock`` for ``data/model``), so a
library learn and a pipeline pass never write one model at once. The lock is ``flock``: the
kernel frees it when its holder dies, so it is never stale. Its file names the holder (pid,
host, command, since when) while it is held and is emptied on release: a line found there by
the next holder names one that was killed. A wait that passes its timeout is a one-line error
naming the lock file and its holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from cns.errors import CNSError

POLL_SECONDS = 0.2


class LockTimeout(CNSError):
    code = "lock_timeout"


def lock_path(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir).resolve()
    return model_dir.parent / f".{model_dir.name}.lock"


def _holder(what: str) -> str:
    since = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()} ({what}) since {since}"


@contextlib.contextmanager
def model_lock(model_dir: str | Path, timeout_seconds: float, what: str | None = None):
    """Hold the model directory's lock; wait at most ``timeout_seconds`` for it (LockTimeout
    naming the lock file and its holder after that). ``what`` says who holds it (default: argv).
    Yields the line of a previous holder that was killed while it held the lock, else None."""
    path = lock_path(model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_seconds
    with open(path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "a process that has not written its name yet"
                    raise LockTimeout(path, f"still held after {timeout_seconds:g} s by {holder}; wait for it to "
                                            "finish (or stop it), or raise pipeline.lock_timeout_seconds") from None
                time.sleep(min(POLL_SECONDS, max(deadline - time.monotonic(), 0.01)))
        try:
            handle.seek(0)
            left = handle.read().strip() or None  # a holder that died holding it never cleared its line
            handle.seek(0)
            handle.truncate()
            handle.write(_holder(what or " ".join([Path(sys.argv[0]).name, *sys.argv[1:3]])) + "\n")
            handle.flush()
            yield left
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)


def slots_dir() -> Path:
    """Where this machine's device slots live: ``$XDG_CACHE_HOME/cns-pipeline/locks`` (~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cns-pipeline" / "locks"


@contextlib.contextmanager
def device_slot(device: str, slots: int, timeout_seconds: float, what: str | None = None):
    """One of ``slots`` places on this machine's ``device`` (``cpu``, ``cuda:0``, ...), held while a
    step trains or scores on it, by any process of this user: N pipelines (or lineages) on one GPU
    take turns, one per GPU on N machines run at once. flock files, freed when a holder dies; a wait
    past ``timeout_seconds`` is a LockTimeout naming the files."""
    directory = slots_dir()
    directory.mkdir(parents=True, exist_ok=True)
    # cuda:0 is a different card in each process that sets CUDA_VISIBLE_DEVICES (one worker per GPU)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "") if device.startswith("cuda") else ""
    name = "".join(ch if ch.isalnum() else "-" for ch in device + (f"-of-{visible}" if visible else ""))
    handles = [open(directory / f"device-{name}-{i}.lock", "a+") for i in range(max(1, slots))]
    deadline = time.monotonic() + timeout_seconds
    try:
        while True:
            for handle in handles:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                try:
                    handle.seek(0)
                    handle.truncate()
                    handle.write(_holder(what or " ".join([Path(sys.argv[0]).name, *sys.argv[1:3]])) + "\n")
                    handle.flush()
                    yield Path(handle.name)
                finally:
                    handle.seek(0)
                    handle.truncate()
                    handle.flush()
                    fcntl.flock(handle, fcntl.LOCK_UN)
                return
            if time.monotonic() >= deadline:
                raise LockTimeout(directory / f"device-{name}-*.lock", f"all {len(handles)} slot(s) of {device} still "
                                  f"taken after {timeout_seconds:g} s; raise pipeline.lock_timeout_seconds or "
                                  "pipeline.gpu_task_concurrency")
            time.sleep(POLL_SECONDS / 4)
    finally:
        for handle in handles:
            handle.close()
