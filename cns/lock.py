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
