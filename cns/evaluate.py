"""Evaluation of one concept in the cumulative model.

Always available (no judge model): the fixed-seed samples of the concept's evaluation prompts,
the diffusion loss on its held-out images, and the change of those samples since a reference
(the same prompts and seeds right after the concept was learned), a forgetting measure.

With judge weights from a local path (``evaluate.clip_model_path``, ``evaluate.dino_model_path``),
the personalization metrics of DreamBooth (Ruiz et al. 2023, arXiv 2208.12242, section 4.1):
CLIP-T (prompt alignment), CLIP-I and DINO (alignment to the concept's real images). Without
them those metrics are ``"unavailable"``, never estimated some other way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cns.config import EvaluateConfig, GenerateConfig
from cns.diffusion import diffusion_loss, encode_prompts, image_latents, preprocess, tokenize
from cns.errors import CNSError
from cns.generate import generate
from cns.models import DiffusionModel

log = logging.getLogger(__name__)

UNAVAILABLE = "unavailable"
REFERENCE_FORMAT = "cns-reference/1"
# OpenAI CLIP's and ImageNet's normalization; a judge directory's preprocessor_config.json wins.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
JUDGE_BATCH = 16

Images = torch.Tensor | list[Image.Image]  # uint8 (n, h, w, 3) or PIL images


# ---- fixed-seed samples and the forgetting measure -------------------------------------------

def concept_prompts(token: str, class_noun: str, config: EvaluateConfig) -> list[str]:
    return [p.format(token=token, class_noun=class_noun) for p in config.prompts]


def sample_outputs(model: DiffusionModel, prompts: list[str], config: EvaluateConfig, resolution: int | None = None,
                   progress: bool = False) -> torch.Tensor:
    """uint8 (len(prompts) * num_images_per_prompt, H, W, 3), prompt-major; the same for the same
    weights, prompts and config (one CPU generator per prompt, seeded ``config.seed`` + index)."""
    sampling = GenerateConfig(num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                              num_images_per_prompt=config.num_images_per_prompt, seed=config.seed)
    rows = generate(model, prompts, sampling, resolution=resolution, progress=progress)
    return to_uint8([image for row in rows for image in row])


def sampling_settings(config: EvaluateConfig, resolution: int | None) -> dict[str, Any]:
    """What must be equal for two sample sets to be comparable (stored with a reference)."""
    return {"seed": config.seed, "num_inference_steps": config.num_inference_steps,
            "guidance_scale": config.guidance_scale, "num_images_per_prompt": config.num_images_per_prompt,
            "resolution": resolution}


def output_change(reference: torch.Tensor, current: torch.Tensor) -> float:
    """Mean absolute pixel difference in [0, 1]; 0 = identical outputs."""
    _check_same_shape(reference, current)
    return (reference.float() - current.float()).abs().mean().item() / 255.0


def _check_same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"sample sets differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def save_reference(path: str | Path, images: torch.Tensor, prompts: list[str],
                   settings: dict[str, Any] | None = None) -> Path:
    """The samples right after a concept was learned (safetensors, prompts in the metadata)."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError("reference images must be a uint8 tensor (n, h, w, 3)")
    metadata = {"format": REFERENCE_FORMAT, "prompts": json.dumps(prompts), "settings": json.dumps(settings or {})}
    save_file({"images": images.contiguous()}, str(path), metadata=metadata)
    return Path(path)


def load_reference(path: str | Path, settings: dict[str, Any] | None = None) -> tuple[torch.Tensor, list[str]]:
    """(images, prompts); with ``settings``, a reference made with other sampling settings is an error."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            images = f.get_tensor("images") if metadata.get("format") == REFERENCE_FORMAT else None
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise CNSError(path, f"not a readable reference ({exc})", "reference_invalid") from None
    if images is None:
        raise CNSError(path, f"not a {REFERENCE_FORMAT} file", "reference_invalid")
    stored = json.loads(metadata.get("settings", "{}"))
    if settings is not None and stored != settings:
        raise CNSError(path, f"made with sampling settings {stored}, not {settings}; re-make the reference",
                       "reference_stale")
    return images, json.loads(metadata["prompts"])


def reference_settings(path: str | Path) -> dict[str, Any]:
    """The sampling settings a reference was made with ({} when it did not record them)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (OSError, ValueError, SafetensorError) as exc:
        raise CNSError(path, f"not a readable reference ({exc})", "reference_invalid") from None
    return json.loads(metadata.get("settings", "{}"))


def with_sampling_settings(config: EvaluateConfig, settings: dict[str, Any]) -> EvaluateConfig:
    """``config`` with the sampling settings of :func:`sampling_settings` (resolution aside)."""
    keys = ("seed", "num_inference_steps", "guidance_scale", "num_images_per_prompt")
    return dataclasses.replace(config, **{k: settings[k] for k in keys if k in settings})


# ---- held-out diffusion loss -------------------------------------------------------------------

@torch.no_grad()
def heldout_loss(model: DiffusionModel, images: list[Image.Image], prompts: list[str], resolution: int | None = None,
                 draws: int = 16, seed: int = 0, batch_size: int = 4) -> float:
    """Mean diffusion loss over ``draws`` (image, prompt, timestep, noise) draws; the images and
    prompts cycle in order and the timesteps and noise come from one generator seeded ``seed``,
    so two model versions are scored on exactly the same draws."""
    if not images or not prompts or draws < 1:
        raise ValueError("heldout_loss needs at least one image, one prompt and one draw")
    latents = image_latents(model, images, resolution or model.native_resolution, with_flips=False)
    states = encode_prompts(model, tokenize(model, prompts))
    order = torch.arange(draws)
    generator = torch.Generator().manual_seed(seed)
    losses = [diffusion_loss(model, latents[chunk % len(latents)], states[chunk % len(states)], generator,
                             reduction="none")
              for chunk in order.split(batch_size)]
    return torch.cat(losses).mean().item()


# ---- judges ------------------------------------------------------------------------------------

@dataclass
class ImageSpec:
    """Resize the short side to ``resize``, centre crop ``size``, normalize (as the judge was trained)."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None  # None = size (CLIP); DINO resizes to 256 and crops 224

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        if self.resize and self.resize > self.size:  # crop the centre first: then preprocess's crop is exact
            images = [_centre_square(im, min(im.size) * self.size / self.resize) for im in images]
        x = torch.stack([preprocess(im, self.size) for im in images]) * 0.5 + 0.5  # [-1, 1] -> [0, 1]
        return (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)


def _centre_square(image: Image.Image, side: float) -> Image.Image:
    w, h = image.size
    left, top = (w - side) / 2, (h - side) / 2
    return image.crop((round(left), round(top), round(left + side), round(top + side)))


@dataclass
class ClipJudge:
    model: Any  # transformers CLIPModel
    tokenizer: Any
    spec: ImageSpec


@dataclass
class DinoJudge:
    model: Any  # transformers ViTModel or Dinov2Model
    spec: ImageSpec


@dataclass
class Judges:
    clip: ClipJudge | None = None
    dino: DinoJudge | None = None


def judge_image_spec(path: Path, default_size: int, mean: tuple, std: tuple) -> ImageSpec:
    """Crop size, resize and normalization from the directory's preprocessor_config.json, if any."""
    file = path / "preprocessor_config.json"
    data = json.loads(file.read_text()) if file.is_file() else {}
    crop, resize = data.get("crop_size", default_size), data.get("size")
    size = crop.get("height", default_size) if isinstance(crop, dict) else crop
    resize = resize.get("shortest_edge") if isinstance(resize, dict) else resize
    return ImageSpec(int(size), tuple(data.get("image_mean", mean)), tuple(data.get("image_std", std)),
                     int(resize) if isinstance(resize, (int, float)) else None)


def _load(path_str: str, what: str, load):
    path = Path(path_str).expanduser()
    if not path.is_dir():
        raise CNSError(path, f"{what} judge directory not found", "judge_invalid")
    try:
        return path, load(str(path))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CNSError(path, f"cannot load as a {what} model ({str(exc).splitlines()[0]})", "judge_invalid") from None


def load_judges(config: EvaluateConfig, device: torch.device | str = "cpu") -> Judges:
    """The judge models named in the config (local directories only; never the network)."""
    from transformers import AutoModel, CLIPModel, CLIPTokenizer  # heavy: only when a judge is configured

    judges = Judges()
    if config.clip_model_path:
        path, (model, tokenizer) = _load(config.clip_model_path, "CLIP", lambda p: (
            CLIPModel.from_pretrained(p, local_files_only=True), CLIPTokenizer.from_pretrained(p, local_files_only=True)))
        if len(tokenizer) != model.config.text_config.vocab_size:  # transformers loads an empty one silently
            raise CNSError(path, f"tokenizer has {len(tokenizer)} tokens, the text model "
                                 f"{model.config.text_config.vocab_size}: CLIP's tokenizer files (vocab.json, "
                                 "merges.txt) must be in the same directory", "judge_invalid")
        spec = judge_image_spec(path, model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD)
        judges.clip = ClipJudge(model.to(device).eval(), tokenizer, spec)
    if config.dino_model_path:
        path, model = _load(config.dino_model_path, "DINO", lambda p: AutoModel.from_pretrained(p, local_files_only=True))
        size = getattr(model.config, "image_size", None)
        if not isinstance(size, int) or not hasattr(model.config, "patch_size"):
            raise CNSError(path, "not a ViT/DINOv2 image model (no image_size/patch_size)", "judge_invalid")
        judges.dino = DinoJudge(model.to(device).eval(), judge_image_spec(path, size, IMAGENET_MEAN, IMAGENET_STD))
    return judges


def to_pil(images: Images) -> list[Image.Image]:
    if isinstance(images, torch.Tensor):
        return [Image.fromarray(a) for a in images.cpu().numpy()]
    return [im.convert("RGB") for im in images]


def to_uint8(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]))


@torch.no_grad()
def _embed(images: Images, spec: ImageSpec, forward) -> torch.Tensor:
    """Unit-length embeddings of the images, in batches."""
    pil = to_pil(images)
    out = [forward(spec.pixels(pil[i:i + JUDGE_BATCH])) for i in range(0, len(pil), JUDGE_BATCH)]
    return F.normalize(torch.cat(out).float(), dim=-1)


def clip_image_embeddings(judge: ClipJudge, images: Images) -> torch.Tensor:
    model = judge.model
    return _embed(images, judge.spec, lambda x: model.visual_projection(
        model.vision_model(pixel_values=x.to(model.device, model.dtype)).pooler_output))


@torch.no_grad()
def clip_text_embeddings(judge: ClipJudge, texts: list[str]) -> torch.Tensor:
    model = judge.model
    batch = judge.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                            max_length=model.config.text_config.max_position_embeddings).to(model.device)
    pooled = model.text_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).pooler_output
    return F.normalize(model.text_projection(pooled).float(), dim=-1)


def dino_embeddings(judge: DinoJudge, images: Images) -> torch.Tensor:
    """The CLS token of the last layer (after its layer norm), as in DreamBooth's DINO metric."""
    model = judge.model
    return _embed(images, judge.spec, lambda x: model(pixel_values=x.to(model.device, model.dtype))
                  .last_hidden_state[:, 0])


def judge_text(prompt: str, token: str, class_noun: str) -> str:
    """The prompt as the judge reads it: "<dog1> dog" and a lone "<dog1>" become "dog"."""
    text = re.sub(rf"{re.escape(token)}\s+{re.escape(class_noun)}\b", class_noun, prompt)
    return text.replace(token, class_noun)


def clip_t(judges: Judges, images: Images, prompts: list[str]) -> float | None:
    """Mean cosine of each image with its prompt; images are prompt-major, an equal number per prompt."""
    if judges.clip is None:
        return None
    image_emb = clip_image_embeddings(judges.clip, images)
    if not prompts or len(image_emb) % len(prompts):
        raise ValueError(f"{len(image_emb)} images do not split evenly over {len(prompts)} prompts")
    text_emb = clip_text_embeddings(judges.clip, prompts).repeat_interleave(len(image_emb) // len(prompts), dim=0)
    return (image_emb * text_emb).sum(-1).mean().item()


def _mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a @ b.T).mean().item()


def clip_i(judges: Judges, images: Images, real_images: Images) -> float | None:
    """Mean pairwise cosine of CLIP image embeddings, generated x real."""
    if judges.clip is None:
        return None
    return _mean_pairwise_cosine(clip_image_embeddings(judges.clip, images),
                                 clip_image_embeddings(judges.clip, real_images))


def dino_score(judges: Judges, images: Images, real_images: Images) -> float | None:
    """Mean pairwise cosine of DINO CLS embeddings, generated x real."""
    if judges.dino is None:
        return None
    return _mean_pairwise_cosine(dino_embeddings(judges.dino, images), dino_embeddings(judges.dino, real_images))


# ---- one concept -------------------------------------------------------------------------------

@dataclass
class ConceptEvaluation:
    metrics: dict[str, float | str]
    samples: torch.Tensor  # uint8 (n, h, w, 3), prompt-major
    prompts: list[str] = field(default_factory=list)


def _or_unavailable(value: float | None) -> float | str:
    return UNAVAILABLE if value is None else value


def evaluate_concept(model: DiffusionModel, *, token: str, class_noun: str, real_images: list[Image.Image],
                     heldout_images: list[Image.Image], reference: tuple[torch.Tensor, list[str]] | None,
                     config: EvaluateConfig, judges: Judges, resolution: int | None = None,
                     heldout_prompts: list[str] | None = None, progress: bool = False,
                     samples: torch.Tensor | None = None) -> ConceptEvaluation:
    """Every metric of one concept: clip_t, clip_i, dino, heldout_loss, output_change.

    ``reference`` is :func:`load_reference`'s (images, prompts) from right after the concept was
    learned; ``None`` (the concept is being learned now) or a reference of other prompts or shape
    gives ``output_change: "unavailable"``. The held-out loss uses ``heldout_prompts`` (default:
    the first evaluation prompt, "a photo of a {token} {class_noun}" unless configured otherwise).
    """
    prompts = concept_prompts(token, class_noun, config)
    if samples is None:  # given when they were just made from these weights (the new concept's reference)
        samples = sample_outputs(model, prompts, config, resolution=resolution, progress=progress)
    texts = [judge_text(p, token, class_noun) for p in prompts]
    metrics: dict[str, float | str] = {
        "clip_t": _or_unavailable(clip_t(judges, samples, texts)),
        "clip_i": _or_unavailable(clip_i(judges, samples, real_images)),
        "dino": _or_unavailable(dino_score(judges, samples, real_images)),
        "heldout_loss": UNAVAILABLE,
        "output_change": UNAVAILABLE,
    }
    if heldout_images:
        metrics["heldout_loss"] = heldout_loss(model, heldout_images, heldout_prompts or prompts[:1], resolution,
                                               draws=config.loss_draws, seed=config.seed)
    if reference is not None:
        ref_images, ref_prompts = reference
        if ref_prompts == prompts and ref_images.shape == samples.shape:
            metrics["output_change"] = output_change(ref_images, samples)
        else:
            log.warning("reference of %s was made with other prompts or sizes: output change unavailable", token)
    return ConceptEvaluation(metrics, samples, prompts)
