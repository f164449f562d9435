"""The model's lock (cns.lock): one writer, a wait that ends in an error naming the holder, and
the line a killed holder leaves for the next one (issue 10, items 5 and 8)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from cns.lock import LockTimeout, lock_path, model_lock

HOLD = textwrap.dedent("""
    import os, sys
    from cns.lock import model_lock
    with model_lock(sys.argv[1], 5, what="held by the test"):
        print("held", flush=True)
        if sys.argv[2] == "die":
            os.kill(os.getpid(), 9)
        sys.stdin.read()
""")


def _holder(model_dir, how: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(model_dir), how], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_wait_past_the_timeout_names_the_lock_file_and_its_holder(tmp_path):
    holder = _holder(tmp_path / "model", "wait")
    try:
        with pytest.raises(LockTimeout) as caught:
            with model_lock(tmp_path / "model", 0.3):
                pass
    finally:
        holder.communicate("")
    assert caught.value.path == str(tmp_path / ".model.lock") == str(lock_path(tmp_path / "model"))
    assert f"still held after 0.3 s by pid {holder.pid} " in caught.value.message
    assert "(held by the test)" in caught.value.message
    with model_lock(tmp_path / "model", 0.3) as left:  # released: free, and no line left
        assert left is None


def test_the_next_holder_reads_the_line_of_a_holder_that_was_killed(tmp_path):
    holder = _holder(tmp_path / "model", "die")
    holder.wait()
    with model_lock(tmp_path / "model", 1) as left:
        assert left.startswith(f"pid {holder.pid} on ") and "(held by the test)" in left


def test_device_slots_let_n_steps_share_a_device_and_name_the_files_on_timeout(tmp_path, monkeypatch):
    """Scoring and finetuning take a machine-local slot of their device (issue 14: not a Prefect
    tag limit, which is global to the server and cost each learn ~4 s)."""
    import threading

    from cns.lock import device_slot

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with device_slot("cuda:0", 2, 1.0) as first, device_slot("cuda:0", 2, 1.0) as second:
        assert first != second  # two slots: both held at once
        with pytest.raises(LockTimeout) as err:
            with device_slot("cuda:0", 2, 0.3):
                pass
        assert "device-cuda-0-*.lock" in str(err.value) and "2 slot(s) of cuda:0" in str(err.value)
        with device_slot("cuda:1", 2, 0.3):  # another device is not taken
            pass
    order = []

    def take(label, hold):
        with device_slot("cpu", 1, 10.0):
            order.append(f"{label} in")
            time.sleep(hold)
            order.append(f"{label} out")

    one = threading.Thread(target=take, args=("a", 0.5))
    one.start()
    time.sleep(0.1)
    take("b", 0)
    one.join()
    assert order == ["a in", "a out", "b in", "b out"]  # one slot: the second waits for the first
