"""The cumulative model on disk: reload, export, generation, info, tokenizer, config, layering."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cns.config import ConfigError, load_config
from cns.info import format_table, info
from cns.lineage import ConceptRecord, Lineage, write_lineage

from cns_testing import ROOT, state_snapshot


def test_base_plus_deltas_reloaded_from_disk_equals_the_in_memory_model(two_concepts):
    from cns.cumulative import open_model

    tc = two_concepts
    reloaded = open_model(tc.model_dir, tc.config)
    fresh = state_snapshot(reloaded.model)
    assert fresh.keys() == tc.after_second.keys()
    for key, tensor in tc.after_second.items():
        assert torch.equal(tensor, fresh[key]), key
    assert reloaded.token_ids == tc.cumulative.token_ids
    assert len(reloaded.model.tokenizer) == len(tc.cumulative.model.tokenizer)


def test_a_corrupted_delta_is_refused(two_concepts, tmp_path):
    import shutil

    from cns.cumulative import open_model
    from cns.errors import CNSError

    tc = two_concepts
    copy = tmp_path / "model"
    shutil.copytree(tc.model_dir, copy)
    delta = copy / tc.records[0].delta
    data = bytearray(delta.read_bytes())
    data[-1] ^= 0xFF
    delta.write_bytes(bytes(data))
    with pytest.raises(CNSError, match="checksum"):
        open_model(copy, tc.config)


def test_exported_directory_loads_with_from_pretrained_and_gives_the_same_images(two_concepts, tmp_path):
    from diffusers import StableDiffusionPipeline

    from cns.generate import export
    from cns.models import to_pipeline

    tc = two_concepts
    out = export(tc.cumulative.model, tmp_path / "export")
    assert not list(out.rglob("*.bin")), "export must be safetensors only"
    loaded = StableDiffusionPipeline.from_pretrained(out, local_files_only=True, safety_checker=None,
                                                     requires_safety_checker=False)
    prompt = "a photo of a <dog1> dog next to a <cat2> cat"
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np")
    ours = to_pipeline(tc.cumulative.model)(prompt, generator=torch.Generator().manual_seed(7), **kwargs).images
    theirs = loaded(prompt, generator=torch.Generator().manual_seed(7), **kwargs).images
    assert loaded.tokenizer("<dog1> <cat2>", add_special_tokens=False).input_ids == \
        tc.cumulative.model.tokenizer("<dog1> <cat2>", add_special_tokens=False).input_ids
    np.testing.assert_array_equal(ours, theirs)


def test_generation_with_two_learned_tokens_writes_pngs(two_concepts, tmp_path):
    from cns.generate import generate, grid, save_images

    tc = two_concepts
    prompts = ["a <dog1> dog and a <cat2> cat on a sofa", "a <cat2> cat"]
    images = generate(tc.cumulative.model, prompts, tc.config.generate, progress=False)
    paths = save_images(images, prompts, tmp_path)
    assert len(paths) == 2 and all(p.stat().st_size > 0 for p in paths)
    assert grid(images).size == (128, 256)
    # The learned token changes the conditioning: the same seed without it gives another image.
    other = generate(tc.cumulative.model, ["a dog and a cat cat on a sofa"], tc.config.generate, progress=False)
    assert not np.array_equal(np.asarray(images[0][0]), np.asarray(other[0][0]))


def test_generation_refuses_a_token_the_model_has_not_learned(two_concepts):
    from cns.errors import CNSError
    from cns.generate import generate

    with pytest.raises(CNSError, match="<bird9>"):
        generate(two_concepts.cumulative.model, ["a <bird9> bird"], two_concepts.config.generate, progress=False)


def _hand_model(tmp_path: Path) -> Path:
    """Two layers (4 rows x 10 weights, 2 rows x 5 weights), two concepts with known masks."""
    masks = [
        {"a": [1, 1, 0, 0], "b": [0, 1]},  # 3 neurons, 2*10 + 1*5 = 25 weights, no earlier concept
        {"a": [0, 1, 1, 0], "b": [0, 0]},  # 2 neurons, 20 weights, shares row a[1] with the first
    ]
    records = []
    for i, mask in enumerate(masks, start=1):
        folder = tmp_path / "concepts" / f"c{i}"
        folder.mkdir(parents=True)
        save_file({f"concept/{k}": torch.tensor(v, dtype=torch.uint8) for k, v in mask.items()},
                  str(folder / "mask.safetensors"))
        records.append(ConceptRecord(version=i, name=f"c{i}", token=f"<c{i}>", class_noun="thing", dataset_hash="x",
                                     mask=f"concepts/c{i}/mask.safetensors", delta=f"concepts/c{i}/delta.safetensors"))
    base = {"pretrained_model_name_or_path": "hand", "hash": "0" * 32, "unet_parameters": 1000,
            "layers": {"a": [4, 10], "b": [2, 5]}}
    write_lineage(tmp_path, Lineage(base=base, concepts=records))
    return tmp_path


def test_info_accounting_matches_a_case_checked_by_hand(tmp_path):
    _, rows = info(_hand_model(tmp_path))
    assert [r["neurons_total"] for r in rows] == [3, 2]
    assert [r["neurons_per_layer"] for r in rows] == [{"a": 2, "b": 1}, {"a": 2, "b": 0}]
    assert [r["overlap_with_earlier"] for r in rows] == [0, 1]
    assert [r["weights_changed"] for r in rows] == [25, 20]
    assert [r["percent_unet_weights"] for r in rows] == pytest.approx([2.5, 2.0])
    assert [r["percent_kv_rows"] for r in rows] == pytest.approx([50.0, 100 / 3])


def test_cns_info_command_prints_the_table(tmp_path, capsys):
    from flows.cli import main

    model = _hand_model(tmp_path)
    assert main(["info", "--model-dir", str(model), "--per-layer"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:8] == ["v", "name", "token", "class", "neurons", "overlap", "weights", "%"]
    assert out[2].split() == ["1", "c1", "<c1>", "thing", "3", "0", "25", "2.5000", "2", "1"]
    assert out[3].split() == ["2", "c2", "<c2>", "thing", "2", "1", "20", "2.0000", "2", "0"]
    assert main(["info", "--model-dir", str(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["concepts"][1]["overlap_with_earlier"] == 1


def test_info_of_the_learned_model_agrees_with_the_lineage_stats(two_concepts):
    base, rows = info(two_concepts.model_dir)
    assert "base: tiny" in format_table(base, rows)
    for row, record in zip(rows, two_concepts.records):
        assert row["neurons_total"] == record.stats["neurons_total"] > 0
        assert row["weights_changed"] == record.stats["weights_changed"]


def test_shipped_tokenizer_gives_openai_clip_ids():
    from cns.models import clip_tokenizer

    tokenizer = clip_tokenizer()
    assert tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  learning_rate: 1e-4\n  max_steps: 10\n")
    with pytest.raises(ConfigError, match=r"params.yaml: unknown key 'train.max_steps'"):
        load_config(params)
    params.write_text("train:\n  max_train_steps: many\n")
    with pytest.raises(ConfigError, match="train.max_train_steps must be int"):
        load_config(params)
    params.write_text("scoring:\n  base_ratio: 1.5\n")
    with pytest.raises(ConfigError, match="base_ratio"):
        load_config(params)


def test_repository_params_yaml_loads_with_overrides():
    config = load_config(ROOT / "params.yaml", ["train.max_train_steps=7", "scoring.scorer=activation"])
    assert config.train.max_train_steps == 7 and config.scoring.scorer == "activation"
    assert isinstance(config.train.learning_rate, float)


def test_cns_library_imports_no_orchestration_tracking_or_storage_client():
    forbidden = {"prefect", "mlflow", "dvc", "boto3", "botocore", "tasks", "flows"}
    for path in (ROOT / "cns").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.relative_to(ROOT)} imports {name}"


@pytest.mark.parametrize("text", ["{not json", '{"format": 9, "base": {}}', '{"format": 1}'])
def test_a_corrupt_lineage_is_the_models_error_not_a_datasets(tmp_path, text):
    """The pipeline rejects a dataset for a ConceptError; a broken lineage must never look like one."""
    from cns.concept import ConceptError
    from cns.errors import CNSError
    from cns.lineage import read_lineage

    (tmp_path / "lineage.json").write_text(text)
    with pytest.raises(CNSError) as err:
        read_lineage(tmp_path)
    assert not isinstance(err.value, ConceptError)
    assert err.value.code == "lineage_invalid" and "lineage.json" in str(err.value)


def test_each_step_records_its_own_seconds_and_no_memory_in_the_timings(two_concepts):
    """Steps time themselves under their own names (cns.learn.timed); peak memory is the pipeline's,
    in its own stats key, never mixed into the timings and told apart by a suffix (issue 12)."""
    for record in two_concepts.records:
        timings = record.stats["timings"]
        assert set(timings) == {"prepare", "score", "select", "train", "reference"}  # the tasks' too
        assert all(isinstance(v, float) and v >= 0 for v in timings.values())
        assert "peak_rss_mb" not in record.stats  # `cns learn` measures no memory


def test_a_workspace_keeps_datasets_in_data_datasets_and_an_old_one_in_data_concepts(tmp_path):
    from cns.lineage import datasets_dir

    assert datasets_dir(tmp_path) == tmp_path / "datasets"  # a new workspace: the name is free of "concepts"
    (tmp_path / "concepts").mkdir()
    assert datasets_dir(tmp_path) == tmp_path / "concepts"  # made before the rename: every tag holds it there
    (tmp_path / "datasets").mkdir()
    assert datasets_dir(tmp_path) == tmp_path / "datasets"
