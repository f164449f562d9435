"""The benchmark world's settings from ``data/world/params.yaml`` (its ``world:`` section), so the
DVC stages in ``data/world/dvc.yaml`` list them as ``params:`` and ``dvc status`` sees a change.

``world.pretrain`` is :class:`world.model.PretrainConfig` (what decides the trained weights: a
checkpoint resumes only under an equal config), ``world.bench`` is the full run's
:class:`world.bench.BenchSettings` (``--smoke`` keeps its own). Keys not in a section's class are
errors, as in the ``cns`` sections of ``params.yaml``; a missing key keeps the class default.
The file is the world's own: the workspace ``params.yaml`` holds only ``cns`` settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cns.config import ConfigError, _build

PARAMS_FILE = Path(__file__).resolve().parent.parent / "data" / "world" / "params.yaml"
SECTIONS = ("pretrain", "bench")


def world_params(path: str | Path | None = None) -> dict[str, Any]:
    """The ``world:`` section of ``path`` (default ``data/world/params.yaml``), checked for
    unknown sections; a missing file is all defaults only when it is the default file."""
    path = Path(path) if path else PARAMS_FILE
    if not path.is_file():
        if path == PARAMS_FILE:
            return {}
        raise ConfigError(path, "file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(path, f"not valid YAML ({str(exc).splitlines()[0]})") from None
    unknown = sorted(set(data) - {"world"})
    if unknown:
        raise ConfigError(path, f"unknown key '{unknown[0]}' (known: world)")
    world = data.get("world") or {}
    unknown = sorted(set(world) - set(SECTIONS))
    if unknown:
        raise ConfigError(path, f"unknown key 'world.{unknown[0]}' (known: {', '.join(SECTIONS)})")
    return world


def pretrain_config(path: str | Path | None = None):
    """``world.pretrain`` as a PretrainConfig."""
    from world.model import PretrainConfig

    source = str(path or PARAMS_FILE)
    config = _build(PretrainConfig, world_params(path).get("pretrain") or {}, "world.pretrain.", source)
    check_width(config.width, source, "world.pretrain.width")
    return config


def check_width(width: int, source: str, key: str) -> None:
    """The world's width must suit the UNet's group norm (16 groups)."""
    if width < 16 or width % 16:
        raise ConfigError(source, f"{key} {width} is not a multiple of 16 (the UNet's group norm)")


def bench_settings(path: str | Path | None = None):
    """``world.bench`` as BenchSettings; its ``cns`` settings are checked like ``params.yaml``'s."""
    from cns.config import Config
    from world.bench import BenchSettings

    source = str(path or PARAMS_FILE)
    settings = _build(BenchSettings, world_params(path).get("bench") or {}, "world.bench.", source)
    _build(Config, settings.cns, "world.bench.cns.", source)
    return settings
