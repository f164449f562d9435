"""Base models: the offline ``tiny`` SD-shaped pipeline and any diffusers Stable Diffusion 1.x/2.x.

A :class:`DiffusionModel` holds the parts CNS touches (UNet, VAE, text encoder, tokenizer, the
training noise scheduler) and nothing of the pipeline machinery; :func:`to_pipeline` assembles a
standard ``StableDiffusionPipeline`` from them for generation and export.

A *pixel-space* model has no VAE (``vae`` is None): the UNet denoises RGB pixels directly, as the
benchmark world's model does (world/). Its directory is a diffusers-style folder (unet,
text_encoder, tokenizer, scheduler) whose ``model_index.json`` names ``"vae": [null, null]``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

# transformers warns on import that its image processors fall back to PIL without torchvision;
# this project uses none of them and installs no torchvision on purpose.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)

from diffusers import __version__ as diffusers_version  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from cns.errors import CNSError  # noqa: E402

log = logging.getLogger(__name__)

TINY = "tiny"
TINY_SEED = 1234
# Stable Diffusion 1.x's training schedule (scaled-linear betas), reused for the tiny model.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   clip_sample=False, steps_offset=1, prediction_type="epsilon")


@dataclass
class DiffusionModel:
    unet: UNet2DConditionModel
    vae: AutoencoderKL | None
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    reference: str

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def pixel_space(self) -> bool:
        return self.vae is None

    def parts(self) -> list[torch.nn.Module]:
        return [part for part in (self.unet, self.vae, self.text_encoder) if part is not None]

    @property
    def native_resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def token_embedding(self) -> torch.nn.Embedding:
        return self.text_encoder.get_input_embeddings()

    def to(self, device: torch.device | str) -> "DiffusionModel":
        for part in self.parts():
            part.to(device)
        return self

    def freeze(self) -> None:
        for part in self.parts():
            part.requires_grad_(False)
            part.eval()

    def unet_parameters(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())


def clip_tokenizer() -> CLIPTokenizer:
    """OpenAI CLIP's BPE tokenizer, shipped with the package (see cns/assets/clip_tokenizer)."""
    path = resources.files("cns") / "assets" / "clip_tokenizer"
    return CLIPTokenizer.from_pretrained(str(path))


def build_tiny(seed: int = TINY_SEED) -> DiffusionModel:
    """A small SD-shaped pipeline with random weights, identical on every machine for one seed.

    Same classes and wiring as SD-1.5 (4-channel latents, cross-attention in every UNet block,
    a CLIP text encoder with OpenAI's vocabulary), at 64x64 pixels / 16x16 latents.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
            block_out_channels=(16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            norm_num_groups=8,
        )
        text_encoder = CLIPTextModel(tiny_clip_config())
    model = DiffusionModel(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                           noise_scheduler=DDPMScheduler(**SD_SCHEDULE),
                           reference=TINY)
    model.freeze()
    return model


def tiny_clip_config(width: int = 64):
    """The tiny text encoder of the test model and the benchmark world: CLIP's vocabulary and
    special tokens (so the real tokenizer works), ``width`` wide (64 unless the world is made
    wider), 2 layers."""
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=width,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )


def load_pretrained(name_or_path: str, revision: str | None = None) -> DiffusionModel:
    """A diffusers SD 1.x/2.x directory (never touches the network) or hub id."""
    local = Path(name_or_path).expanduser()
    kwargs: dict = {"revision": revision}
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise CNSError(local / "model_index.json", "missing: not a diffusers Stable Diffusion directory",
                           "model_invalid")
        name_or_path, kwargs = str(local), {"local_files_only": True}
    try:
        model = DiffusionModel(
            unet=UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", **kwargs),
            vae=None if _pixel_space(local, name_or_path) else AutoencoderKL.from_pretrained(
                name_or_path, subfolder="vae", **kwargs),
            text_encoder=CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", **kwargs),
            tokenizer=CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", **kwargs),
            noise_scheduler=DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **kwargs),
            reference=str(name_or_path),
        )
    except (OSError, ValueError) as exc:
        raise CNSError(name_or_path, f"cannot load as a Stable Diffusion model ({str(exc).splitlines()[0]})",
                       "model_invalid") from None
    if len(model.tokenizer) != model.text_encoder.config.vocab_size:
        raise CNSError(name_or_path, f"tokenizer holds {len(model.tokenizer)} tokens but the text encoder "
                       f"{model.text_encoder.config.vocab_size}: tokenizer files missing or wrong", "model_invalid")
    model.freeze()
    return model


def _pixel_space(local: Path, name_or_path: str) -> bool:
    """A local directory whose model_index.json names no VAE holds a pixel-space model."""
    index = local / "model_index.json"
    if not local.exists() or not index.is_file():
        return False
    try:
        vae = json.loads(index.read_text()).get("vae")
    except json.JSONDecodeError:
        raise CNSError(index, "not valid JSON", "model_invalid") from None
    return vae is None or vae == [None, None]


def save_pixel_model(model: DiffusionModel, out_dir: str | Path) -> Path:
    """Write a pixel-space model as a diffusers-style directory (safetensors, no pickle)."""
    if not model.pixel_space:
        raise ValueError("save_pixel_model writes models without a VAE; use export for latent models")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    model.text_encoder.save_pretrained(out_dir / "text_encoder", safe_serialization=True)
    model.tokenizer.save_pretrained(out_dir / "tokenizer")
    model.noise_scheduler.save_pretrained(out_dir / "scheduler")
    index = {"_class_name": "CNSPixelDiffusion", "_diffusers_version": diffusers_version,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": [None, None],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", type(model.noise_scheduler).__name__]}
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out_dir


def load_base(name_or_path: str, revision: str | None = None) -> DiffusionModel:
    return build_tiny() if name_or_path == TINY else load_pretrained(name_or_path, revision)


def weights_hash(model: DiffusionModel) -> str:
    """blake2b over the UNet and text encoder weights (names, dtypes, shapes, bytes).

    Deltas are row values for one exact base; the lineage stores this hash and loading refuses a
    base that differs by a single bit.
    """
    h = hashlib.blake2b(digest_size=16)
    for prefix, part in (("unet.", model.unet), ("text_encoder.", model.text_encoder)):
        for name, tensor in sorted(part.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{prefix}{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def to_pipeline(model: DiffusionModel) -> StableDiffusionPipeline:
    """A standard diffusers pipeline over the same modules (no copy), with a DDIM sampler."""
    if model.pixel_space:
        raise CNSError(model.reference, "is a pixel-space model (no VAE): it has no StableDiffusionPipeline",
                       "model_invalid")
    scheduler = DDIMScheduler.from_config(model.noise_scheduler.config)
    return StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
