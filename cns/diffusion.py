"""The diffusion objective shared by scoring, finetuning and evaluation: prompts to text
embeddings, images to latents, and the denoising loss on a (latent, prompt) batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cns.models import DiffusionModel


def tokenize(model: DiffusionModel, prompts: list[str]) -> torch.Tensor:
    return model.tokenizer(prompts, padding="max_length", max_length=model.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids


def encode_prompts(model: DiffusionModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Text encoder's last hidden state, the UNet's ``encoder_hidden_states`` (as in SD)."""
    return model.text_encoder(input_ids.to(model.device))[0]


def preprocess(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to ``resolution``, centre crop, scale to [-1, 1] (diffusers scripts)."""
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


@torch.no_grad()
def image_latents(model: DiffusionModel, images: list[Image.Image], resolution: int, with_flips: bool) -> torch.Tensor:
    """VAE latents (posterior mean, scaled) of each image and, if asked, of its mirror image.

    Encoding once up front instead of every step: the images never change during finetuning.
    A pixel-space model (no VAE) denoises the [-1, 1] pixels themselves.
    """
    pixels = torch.stack([preprocess(im, resolution) for im in images])
    if with_flips:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    if model.vae is None:
        return pixels.float()
    latents = []
    for chunk in pixels.split(4):
        dist = model.vae.encode(chunk.to(model.device, dtype=model.vae.dtype)).latent_dist
        latents.append(dist.mean * model.vae.config.scaling_factor)
    return torch.cat(latents).float()


@dataclass
class ConceptBatchSource:
    """Seeded sampling of (latent, prompt) training pairs for one concept.

    Unpaired (the default), any prompt goes with any image; ``paired`` means ``input_ids[i]`` is
    image ``i``'s own caption (a manifest's ``captions``) and they are drawn together."""

    latents: torch.Tensor  # (n, 4, h, w), images then their flips when flips are on
    input_ids: torch.Tensor  # (p, 77); (n, 77) when paired
    generator: torch.Generator
    paired: bool = False

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.randint(len(self.latents), (batch_size,), generator=self.generator)
        if self.paired:
            return self.latents[i], self.input_ids[i]
        j = torch.randint(len(self.input_ids), (batch_size,), generator=self.generator)
        return self.latents[i], self.input_ids[j]


def diffusion_loss(model: DiffusionModel, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   generator: torch.Generator, reduction: str = "mean") -> torch.Tensor:
    """Denoising loss at random timesteps and noise from ``generator`` (epsilon or v target)."""
    device = model.device
    noise = torch.randn(latents.shape, generator=generator).to(device)
    steps = model.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(device)
    latents = latents.to(device)
    noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = model.unet(noisy, timesteps, encoder_hidden_states).sample
    if model.noise_scheduler.config.prediction_type == "v_prediction":
        target = model.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return loss.mean() if reduction == "mean" else loss
