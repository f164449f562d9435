"""The world's text-to-image model and its pretraining.

Same diffusers/transformers classes as Stable Diffusion (UNet2DConditionModel with
cross-attention, CLIPTextModel with OpenAI's CLIP tokenizer), but in pixel space (no VAE) at
32x32: the UNet denoises RGB directly, so ``cns`` runs on it through its pixel-space path.
v-prediction on a cosine schedule: an earlier probe found colours came right much sooner than
with epsilon prediction. Pretraining draws fresh scenes every step (the generator is the
dataset), trains UNet and text encoder jointly, keeps an EMA of the weights and saves the EMA.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cns.diffusion import encode_prompts, tokenize
from cns.models import DiffusionModel, clip_tokenizer, save_pixel_model
from world.scene import SIZE, random_base_scene, render

log = logging.getLogger(__name__)

MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "world" / "model"


@dataclass
class PretrainConfig:
    # 5,000 steps: about 53 minutes at 0.63 s a step on 2 CPU cores, plus ~2 min of evaluation.
    steps: int = 5000
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # empty caption, for classifier-free guidance
    two_object_rate: float = 0.25
    seed: int = 0
    log_every: int = 100


def build_world_model(seed: int = 0) -> DiffusionModel:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=64,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              prediction_type="v_prediction", clip_sample=False)
    return DiffusionModel(unet=unet, vae=None, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                          noise_scheduler=scheduler, reference="world")


def scene_batch(rng: np.random.Generator, batch_size: int, config: PretrainConfig) -> tuple[torch.Tensor, list[str]]:
    scenes = [random_base_scene(rng, config.two_object_rate) for _ in range(batch_size)]
    pixels = torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    captions = ["" if rng.random() < config.caption_dropout else s.caption() for s in scenes]
    return pixels, captions


def pretrain(out_dir: str | Path, config: PretrainConfig, device: str = "cpu", progress: bool = True,
             evaluate_fn=None) -> dict:
    """Train from scratch, save the EMA model to ``out_dir`` (written to a temporary folder,
    then renamed) and return the training record (also ``out_dir/pretrain.json``)."""
    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = build_world_model(config.seed).to(device)
    parts = [model.unet, model.text_encoder]
    params = [p for part in parts for p in part.parameters()]
    for p in params:
        p.requires_grad_(True)
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    noise_scheduler = model.noise_scheduler
    generator = torch.Generator().manual_seed(config.seed)
    losses, start = [], time.perf_counter()
    bar = tqdm(range(config.steps), desc="pretraining", disable=not progress, mininterval=5)
    for step in bar:
        pixels, captions = scene_batch(rng, config.batch_size, config)
        pixels = pixels.to(device)
        noise = torch.randn(pixels.shape, generator=generator).to(device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(pixels),), generator=generator).to(device)
        noisy = noise_scheduler.add_noise(pixels, noise, t)
        states = encode_prompts(model, tokenize(model, captions))
        prediction = model.unet(noisy, t, states).sample
        loss = F.mse_loss(prediction, noise_scheduler.get_velocity(pixels, noise, t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(loss.item())
        if (step + 1) % config.log_every == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-config.log_every:]):.4f}")
            if not progress:
                log.info("step %d/%d loss %.4f", step + 1, config.steps, np.mean(losses[-config.log_every:]))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    model.freeze()
    model.to("cpu")
    record = {
        "config": asdict(config), "device": device, "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, config.steps), 4),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads" if device == "cpu" else
        (torch.cuda.get_device_name() if torch.cuda.is_available() else device),
        "torch": torch.__version__,
        "final_loss": float(np.mean(losses[-200:])),
        "loss_curve": [round(float(np.mean(losses[i:i + 100])), 5) for i in range(0, len(losses), 100)],
        "unet_parameters": model.unet_parameters(),
        "text_encoder_parameters": sum(p.numel() for p in model.text_encoder.parameters()),
    }
    if evaluate_fn is not None:
        record["evaluation"] = evaluate_fn(model)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_pixel_model(model, tmp)
    (tmp / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return record

