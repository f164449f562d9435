"""`cns forget`: a concept taken out of the cumulative model again, with no training."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from cns_testing import ROOT, SAMPLES, state_snapshot


@pytest.fixture()
def forgotten(two_concepts, tmp_path):
    """A copy of the two-concept model (dog, then cat2) with dog removed, reopened."""
    from cns.cumulative import open_model
    from cns.forget import forget

    model_dir = tmp_path / "model"
    shutil.copytree(two_concepts.model_dir, model_dir)
    removal = forget(model_dir, "dog")
    cumulative = open_model(model_dir, two_concepts.config)
    return removal, cumulative, state_snapshot(cumulative.model)


def test_forgetting_restores_the_concepts_rows_bitwise_and_keeps_every_other_row(two_concepts, forgotten):
    from cns.delta import load_masks

    _, cumulative, after = forgotten
    dog = load_masks(two_concepts.model_dir / two_concepts.records[0].mask)[0]["concept"]
    assert sum(int(m.sum()) for m in dog.values()) > 0
    for layer in cumulative.layers:
        key = f"unet.{layer.name}.weight"
        rows = dog[layer.name]
        assert torch.equal(after[key][rows], two_concepts.base[key][rows]), f"{key}: dog's rows not restored"
        assert torch.equal(after[key][~rows], two_concepts.after_second[key][~rows]), f"{key}: another row moved"
    for key, value in two_concepts.base.items():
        if ".attn2.to_k." not in key and ".attn2.to_v." not in key and not key.endswith("token_embedding.weight"):
            assert torch.equal(after[key], value), key


def test_forgetting_removes_the_token_and_keeps_the_later_concepts_token(two_concepts, forgotten):
    _, cumulative, after = forgotten
    vocab = cumulative.model.tokenizer.get_vocab()
    assert two_concepts.records[0].token not in vocab
    (emb,) = [k for k in after if k.endswith("token_embedding.weight")]
    base_rows = two_concepts.base[emb].shape[0]
    assert after[emb].shape[0] == base_rows + 1
    cat = two_concepts.records[1].token
    assert torch.equal(after[emb][vocab[cat]], two_concepts.after_second[emb][two_concepts.cumulative.token_ids["cat2"]])


def test_the_removal_is_a_new_version_and_the_dataset_is_not_learned_again(two_concepts, forgotten):
    from cns.concept import load_concept
    from cns.errors import CNSError
    from cns.learn import prepare

    removal, cumulative, _ = forgotten
    assert removal["version"] == 3 and cumulative.lineage.version == 3
    assert removal["later_concepts"] == ["cat2"] and removal["rows_kept_by_later_concepts"] == 0
    assert [c.name for c in cumulative.lineage.concepts] == ["cat2"]
    assert two_concepts.records[0].dataset_hash in cumulative.lineage.dataset_hashes
    with pytest.raises(CNSError, match="removed"):
        prepare(cumulative, load_concept(SAMPLES / "dog"), two_concepts.config)


def test_forgetting_an_unknown_concept_is_one_error_naming_the_lineage_and_changes_nothing(two_concepts, tmp_path):
    from cns_testing import tree_digest

    model_dir = tmp_path / "model"
    shutil.copytree(two_concepts.model_dir, model_dir)
    before = tree_digest(model_dir)
    out = subprocess.run([sys.executable, "-m", "flows.cli", "forget", "rex", "--model-dir", str(model_dir),
                          "--params", str(ROOT / "params.yaml")], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "lineage.json" in lines[0] and "rex" in lines[0] and "dog" in lines[0]
    assert tree_digest(model_dir) == before


def test_a_concept_learned_after_a_removal_keeps_the_removal_on_record(two_concepts, tmp_path):
    from cns.concept import hash_concept_dir, load_concept
    from cns.cumulative import open_model
    from cns.forget import forget
    from cns.learn import learn_into

    model_dir = tmp_path / "model"
    shutil.copytree(two_concepts.model_dir, model_dir)
    forget(model_dir, "dog")
    cumulative = open_model(model_dir, two_concepts.config)
    record, _ = learn_into(cumulative, load_concept(SAMPLES / "teapot"), two_concepts.config,
                           hash_concept_dir(SAMPLES / "teapot"), progress=False)
    assert record.version == 4
    reopened = open_model(model_dir, two_concepts.config).lineage
    assert [r["name"] for r in reopened.removals] == ["dog"]
    assert two_concepts.records[0].dataset_hash in reopened.dataset_hashes
