"""docs/benchmarks.md is one file of sections, one per benchmark; each benchmark rewrites its own."""

from __future__ import annotations

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
