"""Concept directories for the stack tests: small noise PNGs (or the shipped samples) and a manifest."""

from __future__ import annotations

import hashlib
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
