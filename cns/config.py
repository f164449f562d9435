"""One typed config for the CLI, DVC and Prefect, loaded from ``params.yaml``.

Every tunable value lives here, grouped as in ``params.yaml``, with diffusers' names where
diffusers has one. Unknown keys are errors (a typo must not silently fall back to a default).
The CNS paper (Liao et al., ICCV 2025, arXiv 2510.02296) publishes no hyperparameters; each
default below says why it was chosen.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cns.errors import CNSError


class ConfigError(CNSError):
    code = "config_invalid"


@dataclass
class ModelConfig:
    # "tiny" builds a small SD-shaped pipeline from configs (CPU, tests, demo); anything else is a
    # diffusers Stable Diffusion 1.x/2.x directory or hub id, loaded with from_pretrained.
    pretrained_model_name_or_path: str = "tiny"
    revision: str | None = None
    # auto = cuda, then mps, then cpu.
    device: str = "auto"
    # "no", "fp16" or "bf16"; applied on cuda only (CPU autocast is slower than fp32 for conv nets).
    mixed_precision: str = "bf16"


@dataclass
class ScoringConfig:
    # taylor: |sum_j W_ij dL/dW_ij| of the diffusion loss (first-order Taylor importance,
    # Molchanov et al. 2019, arXiv 1906.10771); gradient: ||dL/dW_i||; activation: mean |K/V
    # output| on the concept prompts.
    scorer: str = "taylor"
    # Fraction of each layer's K/V rows kept as base neurons. 0.06 of SD-1.5's 24,960 rows of 768
    # weights is 1.15M weights = 0.134% of the UNet, the paper's reported ~0.13% per concept.
    base_ratio: float = 0.06
    # (image, timestep, noise) draws; |.| is taken per batch of score_batch_size draws and averaged
    # over batches. More draws give a steadier ranking; each batch costs one forward+backward.
    # Top-6% rows agreeing between two scoring seeds (first world model, bowtie / plusdot):
    # 50% / 48% with 16 draws, 79% / 79% with 64. 64 cost as much as ~64 training steps at batch 1.
    num_score_samples: int = 64
    score_batch_size: int = 4


@dataclass
class CalibrationConfig:
    # None = the shipped set (cns/assets/calibration_prompts.txt, 124 diverse captions).
    prompts_file: str | None = None
    # A neuron is "general" when it is in the top general_ratio of its layer for at least
    # general_consistency of the calibration prompts: neurons that fire for everything carry
    # generic synthesis, and tuning them would hurt zero-shot ability (paper, step b).
    general_ratio: float = 0.10
    general_consistency: float = 0.9


@dataclass
class SelectionConfig:
    # Remove rows already owned by earlier concepts: learning a new concept then cannot move an
    # earlier concept's rows at all (L_reg still ties shared rows if this is turned off).
    exclude_owned: bool = True
    # Rank among the rows still free (not general, not owned), so the 10th concept gets the same
    # budget as the 1st. False = take the top rows, then remove general and owned ones (the
    # older rule: 54 rows for the first of ten world concepts, 5 for the last).
    rank_among_free: bool = True


@dataclass
class TrainConfig:
    # Rows and the token embedding have separate rates: the embedding starts at the class noun and
    # must move much further, as in Textual Inversion (Gal et al. 2022, lr 5e-3).
    learning_rate: float = 1e-4
    token_learning_rate: float = 5e-3
    max_train_steps: int = 200
    train_batch_size: int = 1
    # None = the base model's native resolution (tiny: 64, SD-1.5: 512, SD-2: 768).
    resolution: int | None = None
    seed: int = 0
    # Random horizontal flips, as in the diffusers DreamBooth/Custom Diffusion scripts.
    random_flip: bool = True
    # L_reg (cns.train.regularization), every term a mean so that it does not grow with the
    # number of trained weights: squared change of the trained rows since before this concept
    # (protects earlier concepts that share rows) and since the pretrained model (protects
    # zero-shot ability), the L2-SP form of Li et al. 2018 (arXiv 1802.01483). As sums they
    # pinned the rows (each weight settles at g / 2 lambda under Adam): CNS became textual inversion.
    reg_previous_weight: float = 1e-1
    reg_pretrained_weight: float = 1e-2
    # Output-space terms: the trained rows' K/V outputs on earlier concepts' prompt states, and on
    # generic captions (reg_generic_prompts of the calibration set), stay where they were: the
    # rows may change what the new token reads, not what ordinary words read. Text states only,
    # no UNet pass.
    # Measured on the first world model (bowtie, 100 steps; docs/world.md): the sums moved the
    # rows 10% and fit like token-only training; these defaults move them 82% while changing
    # the rows' outputs on generic captions by 17% (108% with no L_reg at all).
    reg_output_weight: float = 1e-1
    reg_generic_weight: float = 1e-1
    reg_generic_prompts: int = 32
    # Null-space rows (cns.train.protected_projector): 0 = off; e.g. 0.99 = a row's weight change
    # may not use the text-state directions that hold 99% of the generic captions' state energy
    # (protect_generic; the same reg_generic_prompts captions) or of earlier concepts' prompts'
    # (protect_earlier), so those prompts keep their K/V outputs exactly.
    protect_generic: float = 0.0
    protect_earlier: float = 0.0
    prompt_template: str = "a photo of a {token} {class_noun}"
    log_every: int = 10


@dataclass
class GenerateConfig:
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    num_images_per_prompt: int = 2
    seed: int = 0
    # Region control (--region): the global prompt's share inside the regions. 0 is Mix-of-Show's
    # regional sampling (a region reads its own prompt alone), which its authors pair with a
    # spatial condition (pose, sketch) for the layout; without one, a region's single-object prompt
    # fills the region. In the benchmark world two shapes were both right 50% of the time at 0.6,
    # 0% at 0 and 6% without regions (docs/world/regions-base-2026-11-28). Not measured on SD.
    region_base: float = 0.0


@dataclass
class EvaluateConfig:
    # Judge models, each a local directory (transformers format). Without one, its metrics are
    # logged as "unavailable", never estimated some other way.
    clip_model_path: str | None = None  # CLIP-T (prompt alignment) and CLIP-I (image alignment)
    dino_model_path: str | None = None  # DINO (image alignment; ViT or DINOv2 checkpoints)
    # Prompts for the fixed-seed samples of every concept ({token}, {class_noun} filled in). The
    # same prompts and seeds right after learning and later give the forgetting measure.
    prompts: list[str] = field(default_factory=lambda: [
        "a photo of a {token} {class_noun}",
        "a {token} {class_noun} on the beach",
    ])
    num_images_per_prompt: int = 2
    seed: int = 1000
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    # The last N images (by file name) of a concept are held out of training, for the held-out
    # diffusion loss; 0 when that would leave fewer than limits.min_images - 1 to train on.
    holdout_images: int = 1
    # (image, timestep, noise) draws for the held-out loss; fixed seeds, never used in training.
    loss_draws: int = 16
    # Each new version re-checks its own concept and this many earlier ones, rotating, so a
    # version's cost does not grow with the number of concepts (cns.report.recheck_sample); the
    # nightly run re-checks every concept. -1: every concept at every version.
    recheck_per_version: int = 2


@dataclass
class LimitsConfig:
    # DreamBooth/Custom Diffusion use 3-20 images per subject; more is usually a mistake.
    min_images: int = 3
    max_images: int = 20
    # 50 MP: any camera photo fits, decompression bombs do not.
    max_image_pixels: int = 50_000_000
    max_object_bytes: int = 30_000_000


@dataclass
class PipelineConfig:
    # The lineage's name: the MLflow experiment and registered model, and the Prefect lock.
    model_name: str = "cns-model"
    # How often `watch` looks at the bucket (CNS_WATCH_INTERVAL overrides); a dataset starts
    # training at most this long (+ the pass itself) after its manifest lands.
    watch_interval_seconds: int = 30
    # The nightly run (CNS_NIGHTLY_CRON overrides): learn what is pending, re-check every concept.
    nightly_cron: str = "0 2 * * *"
    timezone: str = "UTC"
    # Scoring and finetuning steps on one device of one machine at once (cns.lock.device_slot).
    gpu_task_concurrency: int = 1
    # MLflow reserves the alias "latest" (models:/<name>/latest already means the newest
    # version), so each new version gets this alias instead.
    registry_alias: str = "current"
    # How long a pass, `cns learn` or `cns forget` waits for the model's lock (held by another
    # writer of the same model) before it gives up with an error naming the holder.
    lock_timeout_seconds: float = 1800.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    # Where the cumulative model and the general-neuron cache live (relative to the workspace).
    model_dir: str = "data/model"
    cache_dir: str = "data/cache"

    def validate(self, source: str = "config") -> None:
        def check(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(source, f"{key} {what}")

        check(self.scoring.scorer in ("taylor", "gradient", "activation"), "scoring.scorer",
              "must be 'taylor', 'gradient' or 'activation'")
        check(0 < self.scoring.base_ratio <= 1, "scoring.base_ratio", "must be in (0, 1]")
        check(0 < self.calibration.general_ratio <= 1, "calibration.general_ratio", "must be in (0, 1]")
        check(0 < self.calibration.general_consistency <= 1, "calibration.general_consistency", "must be in (0, 1]")
        check(self.model.mixed_precision in ("no", "fp16", "bf16"), "model.mixed_precision", "must be no, fp16 or bf16")
        check(self.model.device in ("auto", "cpu", "cuda", "mps") or self.model.device.startswith("cuda:"),
              "model.device", "must be auto, cpu, cuda[:N] or mps")
        check(self.train.max_train_steps >= 0, "train.max_train_steps", "must be >= 0")
        check(self.train.train_batch_size >= 1, "train.train_batch_size", "must be >= 1")
        check(0 <= self.train.protect_generic < 1, "train.protect_generic", "must be in [0, 1)")
        check(0 <= self.train.protect_earlier < 1, "train.protect_earlier", "must be in [0, 1)")
        check(0 <= self.generate.region_base <= 1, "generate.region_base", "must be in [0, 1]")
        check(self.scoring.num_score_samples >= 1, "scoring.num_score_samples", "must be >= 1")
        check(1 <= self.limits.min_images <= self.limits.max_images, "limits.min_images", "must be between 1 and limits.max_images")
        check("{token}" in self.train.prompt_template, "train.prompt_template", "must contain {token}")
        check(self.pipeline.lock_timeout_seconds > 0, "pipeline.lock_timeout_seconds", "must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check a YAML value against a dataclass field type (int/float/str/bool, optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    if (tp is dict or typing.get_origin(tp) is dict) and isinstance(value, dict):  # checked by its reader
        return value
    if typing.get_origin(tp) is list and isinstance(value, list):
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    raise ConfigError(source, f"{key} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(source, f"{prefix.rstrip('.') or 'top level'} must be a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(source, f"unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(value, tp, prefix + name, source)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    config = _build(Config, data, "", source)
    config.validate(source)
    return config


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(source, f"'{item}' is not key=value")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(source, f"'{key}' is not a config key")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Config:
    """Load ``params.yaml`` (missing file = all defaults) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    source = str(path) if path else "config"
    if path is not None and Path(path).exists():
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(source, f"not valid YAML ({str(exc).splitlines()[0]})") from None
    elif path is not None and str(path) != "params.yaml":
        raise ConfigError(source, "file not found")
    config = config_from_dict(data, source)
    if overrides:  # checked on their own, so that an error names --set rather than the file
        config = config_from_dict(apply_overrides(data, overrides), "--set")
    return config
