"""Evaluation of the whole cumulative model: every concept so far, and the forgetting record.

``metrics/`` of a workspace (the DVC ``evaluate`` stage's outputs and the pipeline's history):

- ``eval.json``: the current version's metrics per concept (``dvc metrics diff`` between tags);
- ``concepts.csv``: the same as one row per concept (``dvc plots``);
- ``forgetting.csv``: one row per (model version, concept) ever evaluated, appended per version:
  how far each concept's fixed-seed samples moved since right after it was learned.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from cns.concept import NO_INTAKE_LIMITS, Concept, load_concept
from cns.config import Config
from cns.cumulative import CumulativeModel
from cns.evaluate import (UNAVAILABLE, Judges, evaluate_concept, load_reference, reference_settings,
                          sampling_settings, with_sampling_settings)
from cns.lineage import REFERENCE, concept_file

log = logging.getLogger(__name__)

METRIC_NAMES = ("output_change", "heldout_loss", "clip_t", "clip_i", "dino")


@dataclass
class ModelEvaluation:
    version: int
    metrics: dict[str, dict[str, float | str]]  # concept -> metric -> value or "unavailable"
    samples: dict[str, object] = field(default_factory=dict)  # concept -> uint8 (n, h, w, 3)

    def rows(self) -> list[dict]:
        return [{"version": self.version, "concept": name, **{k: m.get(k, UNAVAILABLE) for k in METRIC_NAMES}}
                for name, m in self.metrics.items()]

    def flat_metrics(self) -> dict[str, float]:
        """{"eval/<concept>/<metric>": value} for the metrics that are numbers."""
        return {f"eval/{name}/{k}": v for name, m in self.metrics.items() for k, v in m.items()
                if isinstance(v, (int, float))}


def dataset_images(directory: Path | None, config: Config) -> tuple[list[Image.Image], list[Image.Image]]:
    """(training images, held-out images) of a learned concept's dataset, the split training used."""
    if directory is None or not directory.is_dir():
        return [], []
    concept: Concept = load_concept(directory, NO_INTAKE_LIMITS)  # learned already: today's limits are for new ones
    train, held = concept.split(config.evaluate.holdout_images, config.limits.min_images - 1)
    return concept.load_images(train), concept.load_images(held)


def recheck_sample(names: list[str], version: int, earlier: int) -> list[str]:
    """What a new version re-checks so its cost stays constant however many concepts came before:
    the newest concept and ``earlier`` of the others, rotating with the version number, so each
    earlier concept is re-checked at least every ceil(others / earlier) versions (the nightly run
    checks them all). ``earlier < 0`` means every concept."""
    *others, newest = names or [None]
    if newest is None:
        return []
    if earlier < 0 or earlier >= len(others):
        return list(names)
    start = (version * earlier) % len(others)
    picked = {others[(start + j) % len(others)] for j in range(earlier)}
    return [n for n in others if n in picked] + [newest]


def evaluate_model(cumulative: CumulativeModel, config: Config, judges: Judges, datasets_dir: Path | None,
                   progress: bool = False, concepts: list[str] | None = None) -> ModelEvaluation:
    """Every metric for every concept of the model (or only ``concepts``), at its current version."""
    resolution = config.train.resolution or cumulative.model.native_resolution
    settings = sampling_settings(config.evaluate, resolution)
    evaluation = ModelEvaluation(version=cumulative.lineage.version, metrics={})
    for record in cumulative.lineage.concepts:
        if concepts is not None and record.name not in concepts:
            continue
        ref_path = concept_file(cumulative.model_dir, record.name, REFERENCE)
        reference = load_reference(ref_path) if ref_path.exists() else None
        if reference is None:
            log.warning("%s has no reference samples: its output change is unavailable", record.name)
        # A concept is always sampled as its reference was (settings changed since it was learned
        # apply to the concepts learned after): its output change stays comparable, and a change
        # of params.yaml never stops evaluation (issue 10, item 7).
        sampling, concept_resolution = config.evaluate, resolution
        stored = reference_settings(ref_path) if reference is not None else {}
        if stored and stored != settings:
            log.info("%s: sampled with the settings of its reference %s (params.yaml now has %s)", record.name,
                     stored, settings)
            sampling = with_sampling_settings(config.evaluate, stored)
            concept_resolution = stored.get("resolution") or resolution
        real, held = dataset_images(datasets_dir / record.name if datasets_dir else None, config)
        # The newest concept's reference was sampled from exactly these weights moments ago.
        fresh = reference[0] if reference is not None and record.version == cumulative.lineage.version else None
        result = evaluate_concept(cumulative.model, token=record.token, class_noun=record.class_noun,
                                  real_images=real, heldout_images=held, reference=reference,
                                  config=sampling, judges=judges, resolution=concept_resolution, progress=progress,
                                  samples=fresh)
        if not real:
            # No dataset at hand (e.g. not pulled): image-alignment metrics cannot be computed.
            result.metrics["clip_i"] = result.metrics["dino"] = UNAVAILABLE
        evaluation.metrics[record.name] = result.metrics
        evaluation.samples[record.name] = result.samples
    return evaluation


def write_metrics(evaluation: ModelEvaluation, out_dir: str | Path) -> dict[str, Path]:
    """eval.json and concepts.csv for this version; forgetting.csv gains (or replaces) its rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"eval": out / "eval.json", "concepts": out / "concepts.csv", "forgetting": out / "forgetting.csv"}
    paths["eval"].write_text(json.dumps({"version": evaluation.version, "concepts": evaluation.metrics},
                                        indent=2, sort_keys=True) + "\n")
    rows = pd.DataFrame(evaluation.rows(), columns=["version", "concept", *METRIC_NAMES])
    rows.to_csv(paths["concepts"], index=False)
    history = pd.read_csv(paths["forgetting"]) if paths["forgetting"].exists() else rows.iloc[0:0]
    history = history[history["version"] != evaluation.version]
    pd.concat([history, rows]).sort_values(["version", "concept"]).to_csv(paths["forgetting"], index=False)
    return paths


def forgetting_matrix(forgetting_csv: str | Path, metric: str = "output_change") -> pd.DataFrame:
    """Rows: model version; columns: concepts in learning order; NaN where not learned yet."""
    history = pd.read_csv(forgetting_csv)
    history[metric] = pd.to_numeric(history[metric], errors="coerce")
    order = list(dict.fromkeys(history.sort_values("version")["concept"]))
    return history.pivot(index="version", columns="concept", values=metric).reindex(columns=order)
