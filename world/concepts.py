"""A world concept as a ``cns`` concept folder: rendered photos plus concept.yaml with one
caption per photo, exactly what a user would drop in the bucket."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from PIL import Image

from world.scene import WorldConcept, concept_training_scenes, render

CONCEPT_SEED = 7


def write_concept_dir(concept: WorldConcept, out_dir: str | Path, images: int = 5, seed: int = CONCEPT_SEED) -> Path:
    """``out_dir/<name>/``: ``images`` PNGs (varied backgrounds, sizes, positions) and the manifest."""
    directory = Path(out_dir) / concept.name
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    captions = {}
    for i, scene in enumerate(concept_training_scenes(concept, images, seed)):
        name = f"{i:02d}.png"
        Image.fromarray(render(scene)).save(directory / name)
        captions[name] = scene.caption()
    manifest = {"name": concept.name, "token": concept.token, "class_noun": concept.class_noun, "captions": captions}
    (directory / "concept.yaml").write_text(
        f"# {concept.description} (rendered by `cns world concepts` from data/world/concepts.yaml)\n"
        + yaml.safe_dump(manifest, sort_keys=False))
    return directory


def write_concept_dirs(concepts: list[WorldConcept], out_dir: str | Path, images: int = 5) -> list[Path]:
    return [write_concept_dir(c, out_dir, images) for c in concepts]
