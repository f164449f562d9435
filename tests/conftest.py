"""Shared fixtures: two concepts learned in sequence into the tiny model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from cns_testing import SAMPLES, small_config, state_snapshot


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
