"""docs/benchmarks.md is one file of sections, one per benchmark; each benchmark rewrites its own."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path


def write_section(path: str | Path, section: str) -> None:
    """Replace the section whose heading is ``section``'s first line (or append it); every other
    section is left as it is. Written to a temporary file first, then renamed."""
    path = Path(path)
    heading = section.splitlines()[0].strip()
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == heading)
    except StopIteration:
        new = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        rest = "\n".join(lines[end:])
        new = "\n".join(lines[:start]) + ("\n" if start else "") + section.rstrip("\n") + "\n" + \
            (("\n" + rest + "\n") if rest else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def publish(lines: list[str], path: str | Path | None) -> str:
    """Print a benchmark's section (its heading first) and, with ``path``, write it there."""
    text = "\n".join(lines) + "\n"
    print(text)
    if path:
        write_section(path, text)
    return text


@contextlib.contextmanager
def local_stack(tmp: Path, bucket: str):
    """A fresh local stack in ``tmp/stack`` (ports of its own, bucket ``bucket``), its client
    environment exported while the block runs (no user credentials or workspace leak in)."""
    os.environ.update(HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "CNS_STACK_DIR", "CNS_WORKSPACE", "CNS_EVENTS_URL",
                "CNS_EVENTS_TOKEN"):
        os.environ.pop(var, None)
    from tasks import stack

    base = random.randrange(20000, 22000, 7)
    config = stack.StackConfig.resolve(root=tmp / "stack", ports={"s3": base, "mlflow": base + 3100,
                                                                   "prefect": base + 3200, "events": base + 3300},
                                       bucket=bucket)
    print(f"stack in {tmp}", flush=True)
    _, creds = stack.up(config, timeout=180)
    os.environ.update(stack.client_env(config, creds, with_secret=True))
    try:
        yield config
    finally:
        stack.down(config)
