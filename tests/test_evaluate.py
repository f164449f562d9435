"""Evaluation: fixed-seed samples, the forgetting measure, the held-out loss, CLIP/DINO judges
(tiny random ones, saved and loaded like real checkpoints) and the plots."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cns.config import EvaluateConfig
from cns.delta import load_masks
from cns.errors import CNSError
from cns.evaluate import (UNAVAILABLE, Judges, judge_image_spec, clip_i, clip_t, concept_prompts, dino_score, evaluate_concept,
                          heldout_loss, judge_text, load_judges, load_reference, output_change,
                          sample_outputs, sampling_settings, save_reference)
from cns.models import clip_tokenizer
from cns.neurons import kv_layers
from cns_testing import SAMPLES
from tasks.plots import forgetting_heatmap, loss_curve, mask_heatmap, save_grid

FAST = dict(num_inference_steps=3, num_images_per_prompt=1, loss_draws=4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small to split over threads; on a busy 2-core machine two
    OpenMP threads make sampling about 20x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dog_photos(n: int = 3) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted((SAMPLES / "dog").glob("*.jpg"))[:n]]


def noise_images(n: int, size: int = 48, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def judge_paths(tmp_path_factory):
    """A tiny random CLIP (with cns' real CLIP tokenizer) and a tiny random DINOv2, on disk."""
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("judges")
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16))
    clip.save_pretrained(root / "clip")
    clip_tokenizer().save_pretrained(root / "clip")
    dino = Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2))
    dino.save_pretrained(root / "dino")
    return root / "clip", root / "dino"


@pytest.fixture(scope="module")
def judges(judge_paths):
    clip, dino = judge_paths
    return load_judges(EvaluateConfig(clip_model_path=str(clip), dino_model_path=str(dino)))


@pytest.fixture(scope="module")
def dog(two_concepts):
    """The cumulative model (dog and cat2 learned) and the dog's token, class and fast eval config."""
    record = two_concepts.records[0]
    return two_concepts.cumulative.model, record.token, record.class_noun, EvaluateConfig(**FAST)


# ---- samples and forgetting ---------------------------------------------------------------------

def test_concept_prompts_fill_token_and_class_noun():
    config = EvaluateConfig(prompts=["a photo of a {token} {class_noun}", "{token} on the moon"])
    assert concept_prompts("<dog1>", "dog", config) == ["a photo of a <dog1> dog", "<dog1> on the moon"]


def test_judge_text_replaces_token_by_class_noun():
    assert judge_text("a photo of a <dog1> dog", "<dog1>", "dog") == "a photo of a dog"
    assert judge_text("<dog1> on the moon", "<dog1>", "dog") == "dog on the moon"


def test_samples_are_uint8_prompt_major_and_deterministic(dog):
    model, token, noun, config = dog
    config = dataclasses.replace(config, num_images_per_prompt=2)
    prompts = concept_prompts(token, noun, config)
    first = sample_outputs(model, prompts, config)
    second = sample_outputs(model, prompts, config)
    size = model.native_resolution
    assert first.dtype == torch.uint8 and first.shape == (len(prompts) * 2, size, size, 3)
    assert torch.equal(first, second)


def test_output_change_is_zero_for_same_weights_and_positive_after_changing_one_kv_row(dog):
    model, token, noun, config = dog
    prompts = concept_prompts(token, noun, config)
    reference = sample_outputs(model, prompts, config)
    assert output_change(reference, sample_outputs(model, prompts, config)) == 0.0
    linear = kv_layers(model.unet)[0].linear
    saved = linear.weight.detach().clone()
    try:
        with torch.no_grad():
            linear.weight[0] += 5.0
        changed = output_change(reference, sample_outputs(model, prompts, config))
    finally:
        with torch.no_grad():
            linear.weight.copy_(saved)
    assert 0.0 < changed <= 1.0


def test_output_change_scales_from_identical_to_opposite():
    black = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    white = torch.full_like(black, 255)
    assert output_change(black, white) == 1.0
    assert output_change(black, black) == 0.0
    with pytest.raises(ValueError):
        output_change(black, white[:1])


def test_reference_round_trips_exactly(tmp_path):
    images = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    prompts = ["a photo of a <dog1> dog", "ünïcode \"quoted\" prompt"]
    settings = sampling_settings(EvaluateConfig(), 64)
    path = save_reference(tmp_path / "reference.safetensors", images, prompts, settings)
    loaded, loaded_prompts = load_reference(path, settings)
    assert torch.equal(loaded, images) and loaded.dtype == torch.uint8
    assert loaded_prompts == prompts


def test_reference_made_with_other_settings_is_refused(tmp_path):
    path = save_reference(tmp_path / "r.safetensors", torch.zeros(1, 2, 2, 3, dtype=torch.uint8), ["p"],
                          sampling_settings(EvaluateConfig(seed=1), 64))
    with pytest.raises(CNSError, match="re-make the reference"):
        load_reference(path, sampling_settings(EvaluateConfig(seed=2), 64))


def test_unreadable_reference_is_a_cns_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(CNSError, match="bad.safetensors"):
        load_reference(bad)


def test_heldout_loss_is_deterministic_and_finite(dog):
    model, token, noun, _ = dog
    images, prompts = dog_photos(2), [f"a photo of a {token} {noun}"]
    first = heldout_loss(model, images, prompts, draws=6, seed=3)
    assert math.isfinite(first) and first > 0
    assert heldout_loss(model, images, prompts, draws=6, seed=3) == first
    assert heldout_loss(model, images, prompts, draws=6, seed=4) != first


# ---- judges -------------------------------------------------------------------------------------

def test_without_judge_paths_judge_metrics_are_unavailable(dog):
    model, token, noun, config = dog
    result = evaluate_concept(model, token=token, class_noun=noun, real_images=dog_photos(), heldout_images=[],
                              reference=None, config=config, judges=load_judges(config))
    assert {result.metrics[k] for k in ("clip_t", "clip_i", "dino", "heldout_loss", "output_change")} == {UNAVAILABLE}
    assert result.samples.shape[0] == len(config.prompts)


def test_with_judges_every_metric_is_a_number(dog, judge_paths, judges):
    model, token, noun, config = dog
    prompts = concept_prompts(token, noun, config)
    reference = (sample_outputs(model, prompts, config), prompts)
    result = evaluate_concept(model, token=token, class_noun=noun, real_images=dog_photos(),
                              heldout_images=dog_photos(1), reference=reference, config=config, judges=judges)
    for key in ("clip_t", "clip_i", "dino"):
        assert isinstance(result.metrics[key], float) and -1.0 <= result.metrics[key] <= 1.0, key
    assert result.metrics["heldout_loss"] > 0
    assert result.metrics["output_change"] == 0.0


def test_reference_of_other_prompts_gives_unavailable_output_change(dog):
    model, token, noun, config = dog
    reference = (torch.zeros(len(config.prompts), 64, 64, 3, dtype=torch.uint8), ["another prompt"] * 2)
    result = evaluate_concept(model, token=token, class_noun=noun, real_images=[], heldout_images=[],
                              reference=reference, config=config, judges=Judges())
    assert result.metrics["output_change"] == UNAVAILABLE


def test_identical_image_sets_have_cosine_one(judges):
    photos = dog_photos(1)
    assert clip_i(judges, photos, photos) == pytest.approx(1.0, abs=1e-5)
    assert dino_score(judges, photos, photos) == pytest.approx(1.0, abs=1e-5)


def test_judges_accept_uint8_tensors_like_pil_images(judges):
    photos = noise_images(2, size=32)
    tensor = torch.from_numpy(np.stack([np.asarray(im) for im in photos]))
    assert clip_i(judges, tensor, dog_photos()) == pytest.approx(clip_i(judges, photos, dog_photos()), abs=1e-6)
    value = clip_t(judges, tensor, ["a photo of a dog"])
    assert -1.0 <= value <= 1.0


def test_clip_t_needs_an_equal_number_of_images_per_prompt(judges):
    with pytest.raises(ValueError, match="evenly"):
        clip_t(judges, noise_images(3), ["a", "b"])


def test_missing_judge_path_is_a_cns_error_naming_it(tmp_path):
    missing = tmp_path / "no-clip-here"
    with pytest.raises(CNSError, match="no-clip-here"):
        load_judges(EvaluateConfig(clip_model_path=str(missing)))


def test_directory_without_a_model_is_a_cns_error_naming_it(tmp_path):
    empty = tmp_path / "empty-dino"
    empty.mkdir()
    with pytest.raises(CNSError, match="empty-dino"):
        load_judges(EvaluateConfig(dino_model_path=str(empty)))


def test_clip_without_its_tokenizer_files_is_a_cns_error(judge_paths, tmp_path):
    clip, _ = judge_paths
    bare = tmp_path / "clip-no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((clip / name).read_bytes())
    with pytest.raises(CNSError, match="tokenizer files"):
        load_judges(EvaluateConfig(clip_model_path=str(bare)))


def test_judge_crop_follows_the_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        '{"crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 256}, "image_mean": [0.5, 0.5, 0.5]}')
    spec = judge_image_spec(tmp_path, 32, (0.0,) * 3, (1.0,) * 3)
    assert (spec.size, spec.resize, spec.mean, spec.std) == (224, 256, (0.5,) * 3, (1.0,) * 3)
    image = Image.new("RGB", (512, 384), "white")
    image.paste((0, 0, 0), (0, 0, 60, 384))  # a black border that the 224-of-256 centre crop cuts off
    pixels = spec.pixels([image])
    assert pixels.shape == (1, 3, 224, 224) and torch.all(pixels == 0.5)  # (white - mean) / std


def test_clip_checkpoint_is_refused_as_dino_judge(judge_paths):
    clip, _ = judge_paths
    with pytest.raises(CNSError, match="not a ViT/DINOv2"):
        load_judges(EvaluateConfig(dino_model_path=str(clip)))


# ---- plots --------------------------------------------------------------------------------------

def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_mask_heatmap_of_a_learned_concept_has_one_strip_per_layer(two_concepts, tmp_path):
    masks, _ = load_masks(two_concepts.model_dir / two_concepts.records[1].mask)
    half = {kind: dict(list(mask.items())[: len(mask) // 2]) for kind, mask in masks.items()}
    full = png_size(mask_heatmap(masks, tmp_path / "masks.png", "cat2"))
    fewer = png_size(mask_heatmap(half, tmp_path / "half.png", "cat2"))
    assert full[0] == fewer[0] == 1200 and full[1] > fewer[1]


def test_forgetting_heatmap_accepts_not_yet_learned_cells(tmp_path):
    matrix = pd.DataFrame([[0.0, np.nan], [0.02, 0.0]], index=["v1 dog", "v2 cat2"], columns=["dog", "cat2"])
    width, height = png_size(forgetting_heatmap(matrix, tmp_path / "forgetting.png"))
    assert width > 300 and height > 200


def test_loss_curve_writes_a_png(tmp_path):
    assert png_size(loss_curve([0.5 - 0.01 * i for i in range(30)], tmp_path / "loss.png")) == (700, 400)


def test_save_grid_puts_per_row_samples_side_by_side(tmp_path):
    samples = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8)
    assert png_size(save_grid(samples, tmp_path / "grid.png", per_row=2)) == (2 * 128, 3 * 128)
    assert png_size(save_grid(samples, tmp_path / "native.png", per_row=3, cell=64)) == (3 * 64, 2 * 64)
