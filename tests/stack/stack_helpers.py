"""Concept directories for the stack tests: small noise PNGs (or the shipped samples) and a manifest."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"


def token_for(name: str) -> str:
    """A valid token (at most 32 characters inside the brackets) unique to a concept name."""
    return f"<t{hashlib.sha256(name.encode()).hexdigest()[:12]}>"


def write_png(path: Path, seed: int, size: int = 64) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def make_concept(root: Path, name: str, *, images: int = 3, token: str | None = None, seed: int = 0,
                 manifest: dict | str | None = None) -> Path:
    """A concept directory of small noise PNGs and a manifest (a dict, raw YAML text, or default)."""
    directory = root / name
    directory.mkdir(parents=True)
    for i in range(images):
        write_png(directory / f"{i:02d}.png", seed * 1000 + i)
    if manifest is None:
        manifest = {"name": name, "token": token or token_for(name), "class_noun": "thing"}
    text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
    (directory / "concept.yaml").write_text(text)
    return directory


def set_params(ws, **sections) -> None:
    """Update sections of the workspace's params.yaml."""
    path = ws.root / "params.yaml"
    data = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@contextlib.contextmanager
def own_workspace(tmp_path_factory, prefix: str, **sections):
    """A new bucket (CNS_BUCKET while the block runs) and a workspace whose model_name is the
    bucket's name, with ``sections`` set in its params.yaml; yields (workspace, name, root)."""
    from tasks import s3
    from tasks.versioning import init_workspace

    name = f"{prefix}-{random.randrange(10**8)}"
    s3.client().create_bucket(Bucket=name)
    saved = os.environ.get("CNS_BUCKET")
    os.environ["CNS_BUCKET"] = name
    try:
        root = tmp_path_factory.mktemp(prefix)
        ws = init_workspace(root / "workspace")
        set_params(ws, pipeline={"model_name": name}, **sections)
        yield ws, name, root
    finally:
        if saved is None:
            os.environ.pop("CNS_BUCKET", None)
        else:
            os.environ["CNS_BUCKET"] = saved
