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
from tqdm.auto import tqdm

from cns.config import GenerateConfig
from cns.errors import CNSError
from cns.models import DiffusionModel, to_pipeline
from cns.regions import Box, RegionalStates, region_control

log = logging.getLogger(__name__)


def unknown_tokens(model: DiffusionModel, prompt: str) -> list[str]:
    """<tokens> in the prompt that this model has not learned (a typo would silently be split)."""
    vocab = model.tokenizer.get_vocab()
    return [t for t in re.findall(r"<[A-Za-z0-9_-]{1,32}>", prompt) if t not in vocab]


def regional_states(model: DiffusionModel, regions: list[tuple[Box, str]] | None, batch: int,
                    base: float = 0.0) -> RegionalStates | None:
    """The regional prompts' text states, repeated for a conditional batch of ``batch`` images;
    ``base``: the global prompt's share inside the regions (cns.regions)."""
    if not regions:
        return None
    from cns.diffusion import encode_prompts, tokenize

    states = encode_prompts(model, tokenize(model, [prompt for _, prompt in regions]))
    return RegionalStates(boxes=[box for box, _ in regions], states=states[:, None].expand(-1, batch, -1, -1),
                          base=base)


def generate(model: DiffusionModel, prompts: list[str], config: GenerateConfig, *, resolution: int | None = None,
             progress: bool = True, regions: list[tuple[Box, str]] | None = None) -> list[list[Image.Image]]:
    """``num_images_per_prompt`` images per prompt, seeded per prompt (seed + prompt index).
    ``regions``: (box, prompt) pairs, each prompt read only inside its box, beside the global
    prompt's ``config.region_base`` share (cns.regions)."""
    for prompt in [*prompts, *(p for _, p in regions or [])]:
        missing = unknown_tokens(model, prompt)
        if missing:
            raise CNSError("prompt", f"{prompt!r} uses {', '.join(missing)}, which this model has not learned",
                           "token_unknown")
    if model.pixel_space:
        return _generate_pixels(model, prompts, config, resolution=resolution, progress=progress, regions=regions)
    pipeline = to_pipeline(model)
    pipeline.set_progress_bar_config(disable=not progress, leave=False)
    size = resolution or model.native_resolution
    out = []
    with region_control(model.unet, regional_states(model, regions, config.num_images_per_prompt, config.region_base)):
        for i, prompt in enumerate(prompts):
            generator = torch.Generator(device="cpu").manual_seed(config.seed + i)
            result = pipeline(prompt, num_inference_steps=config.num_inference_steps,
                              guidance_scale=config.guidance_scale, num_images_per_prompt=config.num_images_per_prompt,
                              generator=generator, height=size, width=size)
            out.append(result.images)
    return out


@torch.no_grad()
def sample_pixels(model: DiffusionModel, prompts: list[str], seeds: list[int], *, num_inference_steps: int,
                  guidance_scale: float, resolution: int | None = None, batch_size: int = 256,
                  progress: bool = False, regions: list[tuple[Box, str]] | None = None,
                  region_base: float = 0.0) -> torch.Tensor:
    """Batched DDIM with classifier-free guidance for a pixel-space model: one image per
    (prompt, seed), its start noise from a CPU generator seeded ``seed`` (so an image does not
    depend on the batch it was drawn in). ``regions`` as in :func:`generate`, for every image,
    with the global prompt's ``region_base`` share inside them.
    Returns uint8 (n, H, W, 3)."""
    from diffusers import DDIMScheduler

    from cns.diffusion import encode_prompts, tokenize

    if len(prompts) != len(seeds):
        raise ValueError("sample_pixels needs one seed per prompt")
    size = resolution or model.native_resolution
    channels = model.unet.config.in_channels
    device = model.device
    scheduler = DDIMScheduler.from_config(model.noise_scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    uncond = encode_prompts(model, tokenize(model, [""]))
    out = []
    chunks = range(0, len(prompts), batch_size)
    for start in tqdm(chunks, desc="sampling", disable=not progress, leave=False):
        batch_prompts, batch_seeds = prompts[start:start + batch_size], seeds[start:start + batch_size]
        cond = encode_prompts(model, tokenize(model, batch_prompts))
        states = torch.cat([uncond.expand(len(cond), -1, -1), cond])
        x = torch.stack([torch.randn((channels, size, size), generator=torch.Generator().manual_seed(s))
                         for s in batch_seeds]).to(device)
        with region_control(model.unet, regional_states(model, regions, len(cond), region_base)):
            for t in scheduler.timesteps:
                both = model.unet(torch.cat([x, x]), t.to(device), states).sample
                eps_u, eps_c = both.chunk(2)
                x = scheduler.step(eps_u + guidance_scale * (eps_c - eps_u), t, x).prev_sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(out)


def _generate_pixels(model: DiffusionModel, prompts: list[str], config: GenerateConfig, *, resolution: int | None,
                     progress: bool, regions: list[tuple[Box, str]] | None = None) -> list[list[Image.Image]]:
    n = config.num_images_per_prompt
    flat = [p for p in prompts for _ in range(n)]
    # Per prompt i and image j: seed (config.seed + i) * 1000 + j, the same image in any batch.
    seeds = [(config.seed + i) * 1000 + j for i in range(len(prompts)) for j in range(n)]
    images = sample_pixels(model, flat, seeds, num_inference_steps=config.num_inference_steps,
                           guidance_scale=config.guidance_scale, resolution=resolution, progress=progress,
                           regions=regions, region_base=config.region_base)
    pil = [Image.fromarray(a.numpy()) for a in images]
    return [pil[i * n:(i + 1) * n] for i in range(len(prompts))]


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
    learned concept (a pixel-space model: its own diffusers-style folder, see cns.models); written to a temporary directory first, so ``out_dir`` is complete or absent."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CNSError(out_dir, "exists and is not empty; choose a new directory", "export_exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
    try:
        if model.pixel_space:
            from cns.models import save_pixel_model

            save_pixel_model(model, tmp)
        else:
            to_pipeline(model).save_pretrained(tmp, safe_serialization=True)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
