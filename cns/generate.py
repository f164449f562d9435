"""Generation (one or several learned tokens per prompt) and export of a merged diffusers pipeline."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image

from cns.config import GenerateConfig
from cns.errors import CNSError
from cns.models import DiffusionModel, to_pipeline

log = logging.getLogger(__name__)


def unknown_tokens(model: DiffusionModel, prompt: str) -> list[str]:
    """<tokens> in the prompt that this model has not learned (a typo would silently be split)."""
    vocab = model.tokenizer.get_vocab()
    return [t for t in re.findall(r"<[A-Za-z0-9_-]{1,32}>", prompt) if t not in vocab]


def generate(model: DiffusionModel, prompts: list[str], config: GenerateConfig, *, resolution: int | None = None,
             progress: bool = True) -> list[list[Image.Image]]:
    """``num_images_per_prompt`` images per prompt, seeded per prompt (seed + prompt index)."""
    for prompt in prompts:
        missing = unknown_tokens(model, prompt)
        if missing:
            raise CNSError("prompt", f"{prompt!r} uses {', '.join(missing)}, which this model has not learned",
                           "token_unknown")
    pipeline = to_pipeline(model)
    pipeline.set_progress_bar_config(disable=not progress, leave=False)
    size = resolution or model.native_resolution
    out = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(config.seed + i)
        result = pipeline(prompt, num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                          num_images_per_prompt=config.num_images_per_prompt, generator=generator,
                          height=size, width=size)
        out.append(result.images)
    return out


def save_images(images: list[list[Image.Image]], prompts: list[str], out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (prompt, row) in enumerate(zip(prompts, images)):
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60]
        for j, image in enumerate(row):
            path = out_dir / f"{i:02d}-{slug}-{j}.png"
            image.save(path)
            paths.append(path)
    return paths


def grid(images: list[list[Image.Image]], cell: int = 128) -> Image.Image:
    """One row per prompt, one column per sample."""
    rows, cols = len(images), max(len(r) for r in images)
    canvas = Image.new("RGB", (cols * cell, rows * cell), "white")
    for i, row in enumerate(images):
        for j, image in enumerate(row):
            canvas.paste(image.resize((cell, cell), Image.NEAREST if image.width < cell else Image.BICUBIC),
                         (j * cell, i * cell))
    return canvas


def export(model: DiffusionModel, out_dir: str | Path) -> Path:
    """Write a standard diffusers ``StableDiffusionPipeline`` directory (safetensors) that holds every
    learned concept; written to a temporary directory first, so ``out_dir`` is complete or absent."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CNSError(out_dir, "exists and is not empty; choose a new directory", "export_exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
    try:
        to_pipeline(model).save_pretrained(tmp, safe_serialization=True)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
