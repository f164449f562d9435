"""The cumulative model: one base model plus every learned concept's delta, applied in order.

There is no merge step and no adapter at inference: opening a model directory loads the base,
checks it is bit for bit the one the lineage names, and copies each concept's rows and token in.
Layout of the directory: docs/model_format.md.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cns.config import Config
from cns.delta import apply_delta, load_delta, load_masks
from cns.device import pick_device
from cns.errors import CNSError
from cns.lineage import LINEAGE, ConceptRecord, Lineage, read_lineage
from cns.models import DiffusionModel, load_base, weights_hash
from cns.neurons import KVLayer, Mask, kv_layers, row_counts, union

log = logging.getLogger(__name__)


@dataclass
class CumulativeModel:
    model: DiffusionModel
    layers: list[KVLayer]
    lineage: Lineage
    model_dir: Path
    # Pretrained K/V weights (CPU): the L_reg anchor and the input of general-neuron calibration.
    pretrained: dict[str, torch.Tensor] = field(repr=False)
    token_ids: dict[str, int] = field(default_factory=dict)

    @property
    def base_hash(self) -> str:
        return self.lineage.base["hash"]

    def concept_masks(self, records: list[ConceptRecord] | None = None) -> list[Mask]:
        records = self.lineage.concepts if records is None else records
        return [load_masks(self.model_dir / r.mask)[0]["concept"] for r in records]

    def owned(self) -> Mask:
        """Rows trained by any concept learned so far."""
        return union(self.concept_masks(), row_counts(self.layers))


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def base_record(model: DiffusionModel, config: Config, layers: list[KVLayer], base_hash: str) -> dict:
    return {
        "pretrained_model_name_or_path": config.model.pretrained_model_name_or_path,
        "revision": config.model.revision,
        "hash": base_hash,
        "unet_parameters": model.unet_parameters(),
        "base_vocab_size": len(model.tokenizer),
        # name -> [rows, weights per row]: enough for `cns info` to account without loading a model.
        "layers": {layer.name: [layer.rows, layer.weights_per_row] for layer in layers},
    }


def open_model(model_dir: str | Path, config: Config, device: str | torch.device | None = None) -> CumulativeModel:
    """Load base + deltas of ``model_dir``; an empty or missing directory gives the bare base."""
    model_dir = Path(model_dir)
    lineage = read_lineage(model_dir)
    wanted = config.model.pretrained_model_name_or_path
    if lineage is not None and lineage.base["pretrained_model_name_or_path"] != wanted:
        raise CNSError(model_dir / LINEAGE, f"was built on base '{lineage.base['pretrained_model_name_or_path']}', "
                                            f"but model.pretrained_model_name_or_path is '{wanted}'", "base_mismatch")
    model = load_base(wanted, config.model.revision)
    layers = kv_layers(model.unet)
    base_hash = weights_hash(model)
    if lineage is None:
        lineage = Lineage(base=base_record(model, config, layers, base_hash))
    elif lineage.base["hash"] != base_hash:
        raise CNSError(model_dir / LINEAGE, f"base weights hash {lineage.base['hash']} does not match the loaded "
                                            f"base ({base_hash}): deltas only apply to their exact base", "base_mismatch")
    pretrained = {layer.name: layer.linear.weight.detach().cpu().clone() for layer in layers}
    cumulative = CumulativeModel(model=model, layers=layers, lineage=lineage, model_dir=model_dir,
                                 pretrained=pretrained)
    for record in lineage.concepts:
        apply_record(cumulative, record)
    model.to(pick_device(config.model.device) if device is None else device)
    return cumulative


def apply_record(cumulative: CumulativeModel, record: ConceptRecord) -> None:
    path = cumulative.model_dir / record.delta
    if not path.is_file():
        raise CNSError(path, f"missing: model v{record.version} ({record.name}) cannot be rebuilt "
                             "(run `dvc pull` in the workspace?)", "delta_missing")
    expected = record.stats.get("delta_sha256")
    if expected and file_digest(path) != expected:
        raise CNSError(path, f"checksum differs from the lineage's: the delta of '{record.name}' is corrupt",
                       "delta_invalid")
    rows, token, embedding, _ = load_delta(path)
    if token != record.token:
        raise CNSError(path, f"holds token {token}, the lineage says {record.token}", "delta_invalid")
    cumulative.token_ids[record.name] = apply_delta(cumulative.model, cumulative.layers, rows, token, embedding, path)
