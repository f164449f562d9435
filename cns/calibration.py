"""General neurons: K/V rows that are among the most active for almost any prompt.

They carry generic synthesis, not any one concept, so CNS never tunes them (paper, step b). They
depend only on the base model and the calibration set, so they are computed once and cached as
safetensors, keyed by the base model's weights hash and the calibration settings.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cns.config import CalibrationConfig
from cns.diffusion import encode_prompts, tokenize
from cns.errors import CNSError
from cns.models import DiffusionModel
from cns.neurons import KVLayer, Mask
from cns.scoring import row_activations
from cns.selection import top_rows

log = logging.getLogger(__name__)

MIN_PROMPTS = 100


def load_calibration_prompts(path: str | Path | None = None) -> list[str]:
    """The calibration captions: one per line; the shipped set when ``path`` is None."""
    if path is None:
        text = (resources.files("cns") / "assets" / "calibration_prompts.txt").read_text()
        source = "cns/assets/calibration_prompts.txt"
    else:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise CNSError(path, f"cannot read calibration prompts ({exc.strerror})", "calibration_invalid") from None
        source = str(path)
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if len(prompts) < MIN_PROMPTS:
        raise CNSError(source, f"holds {len(prompts)} prompts; general neurons need at least {MIN_PROMPTS} diverse ones",
                       "calibration_invalid")
    return prompts


@torch.no_grad()
def general_neurons(model: DiffusionModel, layers: list[KVLayer], prompts: list[str], config: CalibrationConfig,
                    weights: dict[str, torch.Tensor] | None = None,
                    batch_size: int = 32) -> tuple[Mask, dict[str, torch.Tensor]]:
    """Rows in their layer's top ``general_ratio`` for at least ``general_consistency`` of prompts.

    Returns the mask and, per row, the fraction of prompts for which it was in the top.
    Activation of a row on a prompt = mean |K/V output| over the prompt's tokens (start to end
    token; padding excluded), which needs only the text encoder. ``weights`` replaces the
    layers' K/V weights (pass the pretrained ones when the model already holds concepts).
    """
    hits = {layer.name: torch.zeros(layer.rows) for layer in layers}
    eos = model.tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        ids = tokenize(model, prompts[start:start + batch_size])
        # Everything up to and including the first end token of each prompt.
        first_eos = (ids == eos).int().argmax(dim=1, keepdim=True)
        positions = torch.arange(ids.shape[1]).unsqueeze(0) <= first_eos
        states = encode_prompts(model, ids).cpu()
        for i in range(len(ids)):
            acts = row_activations(layers, states[i][positions[i]], weights)
            top = top_rows(acts, config.general_ratio)
            for name in hits:
                hits[name] += top[name].float()
    frequency = {name: h / len(prompts) for name, h in hits.items()}
    mask = {name: f >= config.general_consistency - 1e-9 for name, f in frequency.items()}
    return mask, frequency


def cache_path(cache_dir: str | Path, base_hash: str, prompts: list[str], config: CalibrationConfig) -> Path:
    settings = f"{config.general_ratio}|{config.general_consistency}|" + "\n".join(prompts)
    key = hashlib.sha256(settings.encode()).hexdigest()[:12]
    return Path(cache_dir) / f"general-{base_hash[:16]}-{key}.safetensors"


def cached_general_neurons(model: DiffusionModel, layers: list[KVLayer], config: CalibrationConfig,
                           base_hash: str, cache_dir: str | Path,
                           weights: dict[str, torch.Tensor] | None = None) -> tuple[Mask, Path]:
    """General neurons from the cache, computing and caching them on a miss (see general_neurons)."""
    prompts = load_calibration_prompts(config.prompts_file)
    path = cache_path(cache_dir, base_hash, prompts, config)
    if path.exists():
        try:
            tensors = load_file(path)
        except (OSError, SafetensorError) as exc:
            raise CNSError(path, f"unreadable general-neuron cache ({exc}); delete it to recompute",
                           "cache_invalid") from None
        return {layer.name: tensors[f"general/{layer.name}"].bool() for layer in layers}, path
    log.info("computing general neurons over %d calibration prompts (cached in %s)", len(prompts), path)
    mask, frequency = general_neurons(model, layers, prompts, config, weights)
    tensors = {f"general/{n}": m.to(torch.uint8) for n, m in mask.items()}
    tensors.update({f"frequency/{n}": f.float().contiguous() for n, f in frequency.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".general-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    save_file(tensors, tmp, metadata={"base_hash": base_hash, "prompts": str(len(prompts)),
                                      "general_ratio": str(config.general_ratio),
                                      "general_consistency": str(config.general_consistency)})
    os.replace(tmp, path)
    return mask, path
