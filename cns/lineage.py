"""The cumulative model's record: ``<model_dir>/lineage.json`` (format in docs/model_format.md).

The lineage is the durable answer to "which concepts does this model hold, in which order, from
which datasets". It is written last and atomically (temp file + ``os.replace``), so a crash leaves
either the previous version or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cns.concept import Concept, ConceptError
from cns.errors import CNSError

LINEAGE = "lineage.json"
# The model directory: lineage.json, then one folder per learned concept, concepts/<name>/, holding
# its mask, its delta and (when sampled) its reference samples. Every layer names them through
# these, never by spelling the strings.
CONCEPTS = "concepts"
MASK = "mask.safetensors"
DELTA = "delta.safetensors"
REFERENCE = "reference.safetensors"


def concept_dir(model_dir: str | Path, name: str) -> Path:
    return Path(model_dir) / CONCEPTS / name


def concept_file(model_dir: str | Path, name: str, file: str) -> Path:
    """``file`` (MASK, DELTA or REFERENCE) of concept ``name``."""
    return concept_dir(model_dir, name) / file


def relative_file(name: str, file: str) -> str:
    """As a lineage record stores it: relative to the model directory, with forward slashes."""
    return f"{CONCEPTS}/{name}/{file}"


# Beside the model directory, a workspace keeps the datasets it learned (``data/datasets/<name>``,
# DVC-tracked): "concepts" names the model's per-concept folders only. Workspaces made before the
# rename keep their ``data/concepts`` (every tagged version of them holds it there) and go on using it.
DATASETS = "datasets"
LEGACY_DATASETS = "concepts"


def datasets_dir(data_dir: str | Path) -> Path:
    """The datasets folder in ``data_dir`` (a workspace's ``data/``, the model directory's parent)."""
    data_dir = Path(data_dir)
    legacy = data_dir / LEGACY_DATASETS
    return legacy if legacy.is_dir() and not (data_dir / DATASETS).exists() else data_dir / DATASETS
# 1: concepts only; 2: also "removals" (cns.forget). A lineage without removals is still written
# as format 1, byte for byte as before.
FORMATS = (1, 2)


@dataclass
class ConceptRecord:
    version: int
    name: str
    token: str
    class_noun: str
    dataset_hash: str
    mask: str  # path relative to the model directory
    delta: str
    prompts: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    learned_at: str = ""
    # The manifest's per-image captions (each distinct one once): with captions, these are what the
    # concept trained on, so later concepts protect them (cns.learn.earlier_prompts). Left out of
    # lineage.json when empty, which keeps uncaptioned lineages byte for byte as before.
    captions: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = dict(vars(self))
        if not data["captions"]:
            del data["captions"]
        return data


@dataclass
class Lineage:
    base: dict[str, Any]
    # The concepts the model holds, in the order their deltas apply.
    concepts: list[ConceptRecord] = field(default_factory=list)
    # Concepts taken out again (cns.forget): {"version", "name", "token", "removed_at", "record",
    # "later_concepts", "rows_kept_by_later_concepts"}. Their files stay; their deltas no longer apply.
    removals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def version(self) -> int:
        """Every learn and every removal is a version: the newest one's number."""
        return max([c.version for c in self.concepts] + [r["version"] for r in self.removals] + [0])

    @property
    def removed(self) -> list[ConceptRecord]:
        return [ConceptRecord(**r["record"]) for r in self.removals]

    @property
    def dataset_hashes(self) -> set[str]:
        """Every dataset ever learned, removed ones too: dropping it again does not bring it back."""
        return {c.dataset_hash for c in [*self.concepts, *self.removed]}

    def find(self, name: str) -> ConceptRecord | None:
        return next((c for c in self.concepts if c.name == name), None)

    def to_json(self) -> dict[str, Any]:
        data = {"format": 2 if self.removals else 1, "version": self.version, "base": self.base,
                "concepts": [c.to_json() for c in self.concepts]}
        if self.removals:
            data["removals"] = self.removals
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Lineage":
        return cls(base=data["base"], concepts=[ConceptRecord(**c) for c in data.get("concepts", [])],
                   removals=list(data.get("removals", [])))


def read_lineage(model_dir: str | Path) -> Lineage | None:
    """The model directory's lineage, or None when the directory holds no model yet."""
    path = Path(model_dir) / LINEAGE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") not in FORMATS:
            raise ValueError(f"format {data.get('format')!r}, expected one of {FORMATS}")
        return Lineage.from_json(data)
    except (ValueError, KeyError, TypeError) as exc:
        # The model's fault, not a dataset's: CNSError, so the pipeline never rejects a dataset for it.
        raise CNSError(path, f"not a valid lineage ({exc})", "lineage_invalid") from None


def write_lineage(model_dir: str | Path, lineage: Lineage) -> None:
    """Atomically replace ``lineage.json`` (fsync'd temp file, then rename)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".lineage-", suffix=".json", dir=model_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(lineage.to_json(), f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, model_dir / LINEAGE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_against_lineage(concept: Concept, lineage: Lineage | None, source: str | Path) -> None:
    """A concept may not reuse an earlier concept's name or token."""
    if lineage is None:
        return
    for record in lineage.removed:  # its files stay under concepts/<name>/ for the versions that hold it
        if concept.name == record.name or concept.token == record.token:
            raise ConceptError(source, f"'{record.name}' ({record.token}) was learned in model v{record.version} and "
                                       "removed later; pick a new name and token", "name_taken")
    for record in lineage.concepts:
        if record.token == concept.token:
            raise ConceptError(source, f"token {concept.token} is already used by concept '{record.name}' "
                                       f"(model v{record.version})", "token_taken")
        if record.name == concept.name:
            raise ConceptError(source, f"a concept named '{concept.name}' is already learned (model "
                                       f"v{record.version}); pick another name", "name_taken")
