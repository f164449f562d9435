"""Region control: each regional prompt is read only inside its box, during sampling."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cns_testing import ROOT

WORLD_MODEL = ROOT / "data" / "world" / "model"


@pytest.fixture(scope="module")
def world_model():
    from cns.models import load_pretrained

    return load_pretrained(str(WORLD_MODEL))


def test_regions_parse_by_name_or_box_and_a_bad_one_is_one_error():
    from cns.errors import CNSError
    from cns.regions import parse_region

    assert parse_region("left=a red circle") == ((0.0, 0.0, 0.5, 1.0), "a red circle")
    assert parse_region("0.25,0,1,0.5 = a blue square")[0] == (0.25, 0.0, 1.0, 0.5)
    for bad in ("left", "middle=a dog", "0.5,0,0.2,1=a dog", "0,0,1=a dog"):
        with pytest.raises(CNSError) as err:
            parse_region(bad)
        assert "--region" in str(err.value) and "\n" not in str(err.value)


def test_region_weights_share_every_position_out_to_sum_one():
    from cns.regions import NAMED, region_weights

    weights = region_weights([NAMED["left"], (0.25, 0.0, 1.0, 1.0)], 64)  # 8x8, overlapping boxes
    assert torch.allclose(weights.sum(0), torch.ones(64))
    grid = weights.reshape(3, 8, 8)
    assert torch.all(grid[0, :, :2] == 1) and torch.all(grid[2] == 0), "left quarter: region 0 alone; no global"
    assert torch.all(grid[0, :, 2:4] == 0.5) and torch.all(grid[1, :, 4:] == 1)


def test_a_base_share_keeps_the_global_prompt_inside_the_regions_and_weights_still_sum_to_one():
    from cns.regions import NAMED, region_weights

    weights = region_weights([NAMED["left"], (0.25, 0.0, 1.0, 1.0)], 64, base=0.6).reshape(3, 8, 8)
    assert torch.allclose(weights.sum(0), torch.ones(8, 8))
    assert torch.allclose(weights[2], torch.full((8, 8), 0.6)), "every position is inside a box: the global keeps 0.6"
    assert torch.allclose(weights[0, :, :2], torch.tensor(0.4)) and torch.allclose(weights[0, :, 2:4], torch.tensor(0.2))
    alone = region_weights([NAMED["left"]], 64, base=0.6).reshape(2, 8, 8)
    assert torch.all(alone[1, :, 4:] == 1) and torch.all(alone[0, :, 4:] == 0), "outside every box: the global alone"


def test_outside_every_region_cross_attention_is_exactly_the_global_prompts(world_model):
    from cns.diffusion import encode_prompts, tokenize
    from cns.regions import NAMED, RegionalAttnProcessor, RegionalStates

    attn = next(m for n, m in world_model.unet.named_modules() if n.endswith("attn2"))
    original = attn.processor
    states = encode_prompts(world_model, tokenize(world_model, ["", "a red circle on a gray background"]))
    regional = encode_prompts(world_model, tokenize(world_model, ["a blue square on a pink background"]))
    x = torch.randn(2, 64, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))  # (uncond, cond), 8x8
    with torch.no_grad():
        plain = attn(x, encoder_hidden_states=states)
        attn.set_processor(RegionalAttnProcessor(RegionalStates([NAMED["left"]], regional[:, None])))
        mixed = attn(x, encoder_hidden_states=states)
    attn.set_processor(original)
    right = torch.arange(64).reshape(8, 8)[:, 4:].flatten()
    left = torch.arange(64).reshape(8, 8)[:, :4].flatten()
    assert torch.allclose(mixed[:, right], plain[:, right], atol=1e-6), "outside the box: the global prompt only"
    assert torch.allclose(mixed[0], plain[0], atol=1e-6), "the unconditional half is left alone"
    assert (mixed[1, left] - plain[1, left]).abs().max() > 1e-3, "inside the box: the regional prompt"
    # with a base share, a position inside the box reads the two prompts' mixture (the output projection is linear)
    attn.set_processor(RegionalAttnProcessor(RegionalStates([NAMED["left"]], regional[:, None], base=0.25)))
    with torch.no_grad():
        shared = attn(x, encoder_hidden_states=states)
    attn.set_processor(original)
    assert torch.allclose(shared[1, left], 0.25 * plain[1, left] + 0.75 * mixed[1, left], atol=1e-5)
    assert torch.allclose(shared[:, right], plain[:, right], atol=1e-6)


def test_a_full_image_region_with_the_global_prompt_changes_nothing_and_processors_come_back(world_model):
    from cns.generate import sample_pixels

    prompt = "a red circle on a gray background"
    before = {n: type(p) for n, p in world_model.unet.attn_processors.items()}
    kwargs = {"num_inference_steps": 4, "guidance_scale": 3.0}
    plain = sample_pixels(world_model, [prompt] * 2, [1, 2], **kwargs)
    regional = sample_pixels(world_model, [prompt] * 2, [1, 2], regions=[((0.0, 0.0, 1.0, 1.0), prompt)], **kwargs)
    assert (plain.int() - regional.int()).abs().max() <= 1
    other = sample_pixels(world_model, [prompt] * 2, [1, 2], regions=[((0.5, 0.0, 1.0, 1.0),
                                                                       "a blue square on a gray background")], **kwargs)
    assert (other.int() - plain.int()).abs().max() > 10, "a different regional prompt must show"
    assert {n: type(p) for n, p in world_model.unet.attn_processors.items()} == before


def test_cns_generate_takes_regions_on_the_latent_tiny_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flows.cli", "generate", "a photo of a dog and a cat",
                          "--region", "left=a photo of a dog", "--region", "right=a photo of a cat",
                          "--num-inference-steps", "2", "--num-images-per-prompt", "1", "--out", str(tmp_path / "gen"),
                          "--model-dir", str(tmp_path / "model"), "--set", "model.device=cpu", "-q"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(list((tmp_path / "gen").glob("00-*.png"))) == 1
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "generate", "a dog", "--region", "middle=a dog",
                          "--model-dir", str(tmp_path / "model"), "-q"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "--region" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    share = subprocess.run([sys.executable, "-m", "flows.cli", "generate", "a dog", "--region", "left=a dog",
                            "--region-base", "1.5", "--out", str(tmp_path / "share"), "--model-dir",
                            str(tmp_path / "model"), "-q"], capture_output=True, text=True, cwd=ROOT)
    assert share.returncode == 2 and "--region-base" in share.stderr and len(share.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "share").exists()
