"""Shared fixtures: the offline tiny model, small configs and two concepts learned in sequence."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

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


@dataclass
class TwoConcepts:
    config: object
    model_dir: Path
    cumulative: object
    base: dict  # weights before any concept
    after_first: dict
    after_second: dict
    records: list


@pytest.fixture(scope="session")
def two_concepts(tmp_path_factory) -> TwoConcepts:
    """dog then cat2 learned into one model directory, with weight snapshots before/after each."""
    from cns.concept import hash_concept_dir, load_concept
    from cns.cumulative import open_model
    from cns.learn import learn_into

    tmp = tmp_path_factory.mktemp("two")
    config = small_config(tmp)
    cumulative = open_model(config.model_dir, config)
    base = state_snapshot(cumulative.model)
    records, snapshots = [], []
    for name in ("dog", "cat2"):
        concept = load_concept(SAMPLES / name, config.limits)
        record, _ = learn_into(cumulative, concept, config, hash_concept_dir(SAMPLES / name), progress=False)
        records.append(record)
        snapshots.append(state_snapshot(cumulative.model))
    return TwoConcepts(config, Path(config.model_dir), cumulative, base, snapshots[0], snapshots[1], records)
