"""Helpers shared by the library tests (a module name of its own: tests/stack has a conftest too,
so `from conftest import ...` would be ambiguous)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

# The test processes share 2 cores with the stack's servers: one torch thread avoids OpenMP threads
# spinning against each other (sampling took 10 s with two threads under load, 0.5 s with one).
torch.set_num_threads(1)

from cns.config import config_from_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"


def small_config(tmp: Path, **sections):
    """Defaults with a short schedule, so a concept learns in a few seconds on the tiny model."""
    data = {
        "cache_dir": str(tmp / "cache"),
        "model_dir": str(tmp / "model"),
        "scoring": {"num_score_samples": 4, "score_batch_size": 2},
        "train": {"max_train_steps": 20, "learning_rate": 1e-3},
        "generate": {"num_inference_steps": 3, "num_images_per_prompt": 1},
        "model": {"device": "cpu"},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)


def state_snapshot(model) -> dict[str, torch.Tensor]:
    """Every weight of the UNet, VAE and text encoder, cloned."""
    out = {}
    for prefix, part in (("unet", model.unet), ("vae", model.vae), ("text_encoder", model.text_encoder)):
        for name, tensor in part.state_dict().items():
            out[f"{prefix}.{name}"] = tensor.detach().clone()
    return out


def tree_digest(path: Path) -> str:
    """Hash of every file (name and bytes) under ``path``: 'changes nothing' means equal digests."""
    h = hashlib.sha256()
    if path.exists():
        for p in sorted(path.rglob("*")):
            h.update(str(p.relative_to(path)).encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def copy_concept(name: str, dest: Path, **manifest) -> Path:
    """A writable copy of a sample concept, optionally with a different manifest."""
    target = dest / name
    shutil.copytree(SAMPLES / name, target)
    if manifest:
        import yaml
        data = yaml.safe_load((target / "concept.yaml").read_text())
        data.update(manifest)
        (target / "concept.yaml").write_text(yaml.safe_dump(data))
    return target


