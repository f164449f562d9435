"""The method's guarantees, on the tiny model with two real concepts learned in sequence."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cns.calibration import cache_path, load_calibration_prompts
from cns.delta import load_masks
from cns.neurons import kv_layers
from cns.selection import rows_for_ratio

from cns_testing import SAMPLES, small_config


def _masks(tc, i):
    return load_masks(tc.model_dir / tc.records[i].mask)[0]


def _differs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row 'any bit differs' (exact comparison, no tolerance)."""
    return (a != b).reshape(a.shape[0], -1).any(dim=1)


def test_only_selected_rows_and_token_embedding_change(two_concepts):
    tc = two_concepts
    concept = _masks(tc, 0)["concept"]
    before, after = tc.base, tc.after_first
    kv = {f"unet.{name}.weight": name for name in concept}
    changed_rows = 0
    for key, old in before.items():
        new = after[key]
        if key in kv:
            differs = _differs(old, new)
            assert not (differs & ~concept[kv[key]]).any(), f"{key}: a row outside the mask changed"
            changed_rows += int(differs.sum())
        elif key.endswith("token_embedding.weight"):
            assert new.shape[0] == old.shape[0] + 1
            assert torch.equal(new[: old.shape[0]], old), "an existing token embedding changed"
        else:
            assert torch.equal(old, new), f"{key} changed"
    assert changed_rows > 0.9 * sum(int(m.sum()) for m in concept.values()), "selected rows did not train"


def test_second_concept_leaves_first_concepts_rows_bitwise_unchanged(two_concepts):
    tc = two_concepts
    first = _masks(tc, 0)["concept"]
    for name, rows in first.items():
        key = f"unet.{name}.weight"
        assert torch.equal(tc.after_first[key][rows], tc.after_second[key][rows]), name
    (emb,) = [k for k in tc.after_first if k.endswith("token_embedding.weight")]
    token_id = tc.cumulative.token_ids["dog"]
    assert torch.equal(tc.after_first[emb][token_id], tc.after_second[emb][token_id])


def test_general_neurons_are_never_selected(two_concepts):
    tc = two_concepts
    for i in range(2):
        masks = _masks(tc, i)
        assert sum(int(m.sum()) for m in masks["general"].values()) > 0, "calibration found no general neurons"
        for name, rows in masks["concept"].items():
            assert not (rows & masks["general"][name]).any(), f"general neuron selected in {name}"


def test_selection_ratios_hold(two_concepts):
    tc = two_concepts
    cfg = tc.config
    masks, scores = load_masks(tc.model_dir / tc.records[1].mask)
    for layer in kv_layers(tc.cumulative.model.unet):
        k = rows_for_ratio(layer.rows, cfg.scoring.base_ratio)
        base, concept = masks["base"][layer.name], masks["concept"][layer.name]
        blocked = masks["general"][layer.name] | masks["owned"][layer.name]
        assert int(base.sum()) == k, layer.name
        assert int(concept.sum()) == min(k, int((~blocked).sum())), "every concept gets the layer's full budget"
        assert not (concept & blocked).any()
        score = scores[layer.name]
        free_not_taken = score[~blocked & ~concept]
        if len(free_not_taken):
            assert score[concept].min() >= free_not_taken.max(), "not the top rows among the free ones"
    prompts = load_calibration_prompts()
    cached = load_file(cache_path(cfg.cache_dir, tc.cumulative.base_hash, prompts, cfg.calibration))
    for name, general in masks["general"].items():
        frequency = cached[f"frequency/{name}"]
        assert torch.equal(general, frequency >= cfg.calibration.general_consistency - 1e-9)
        top_k = rows_for_ratio(general.numel(), cfg.calibration.general_ratio)
        assert int(general.sum()) <= top_k, "more general neurons than any one prompt's top rows"


def test_later_concepts_get_the_same_row_budget_when_top_rows_are_owned():
    from cns.selection import select_concept_neurons

    scores = {"a": torch.arange(20, dtype=torch.float32), "b": torch.arange(10, dtype=torch.float32).flip(0)}
    none = {"a": torch.zeros(20, dtype=torch.bool), "b": torch.zeros(10, dtype=torch.bool)}
    owned = {"a": torch.arange(20) >= 15, "b": torch.arange(10) < 3}  # every top row is taken already
    ranked = select_concept_neurons(scores, 0.25, none, owned)
    assert [int(m.sum()) for m in ranked.concept.values()] == [5, 2]
    assert ranked.concept["a"].nonzero().flatten().tolist() == [10, 11, 12, 13, 14]
    assert ranked.concept["b"].nonzero().flatten().tolist() == [3, 4]
    older = select_concept_neurons(scores, 0.25, none, owned, rank_among_free=False)
    assert sum(int(m.sum()) for m in older.concept.values()) == 0, "the older rule starves this concept"


def test_l_reg_is_a_mean_so_its_size_does_not_grow_with_the_rows_trained():
    from cns.config import TrainConfig
    from cns.train import TrainableRows, regularization

    torch.manual_seed(0)
    config = TrainConfig(reg_previous_weight=1.0, reg_pretrained_weight=0.5, reg_output_weight=0.0,
                         reg_generic_weight=0.0)
    values = []
    for rows in (2, 16):
        linear = torch.nn.Linear(8, 32, bias=False)
        trained = TrainableRows(linear, torch.arange(rows))
        with torch.no_grad():
            trained.weight.add_(0.1)  # every weight moved by 0.1
        values.append(float(regularization({"k": trained}, {"k": trained.frozen_weight.float()}, None, None, config)))
        trained.handle.remove()
    assert values[0] == pytest.approx(values[1]) == pytest.approx(1.5 * 0.01)


def test_the_generic_prior_penalises_only_what_ordinary_words_read():
    from cns.config import TrainConfig
    from cns.train import TrainableRows, regularization

    config = TrainConfig(reg_previous_weight=0.0, reg_pretrained_weight=0.0, reg_generic_weight=1.0)
    linear = torch.nn.Linear(4, 6, bias=False)
    trained = TrainableRows(linear, torch.tensor([1, 4]))
    generic = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])  # ordinary words span dims 0-1
    with torch.no_grad():
        trained.weight[:, 3] += 2.0  # a change only a state along dim 3 (the new token) can read
    assert float(regularization({"k": trained}, {"k": trained.frozen_weight}, None, generic, config)) == 0.0
    with torch.no_grad():
        trained.weight[:, 0] += 1.0
    assert float(regularization({"k": trained}, {"k": trained.frozen_weight}, None, generic, config)) > 0.0
    trained.handle.remove()


def test_default_selection_excludes_rows_owned_by_earlier_concepts(two_concepts):
    tc = two_concepts
    first, second = _masks(tc, 0)["concept"], _masks(tc, 1)
    for name in first:
        assert torch.equal(second["owned"][name], first[name])
        assert not (second["concept"][name] & first[name]).any()


def test_training_loss_falls_on_the_concept_images(tmp_path):
    from cns.concept import load_concept
    from cns.cumulative import open_model
    from cns.diffusion import diffusion_loss, encode_prompts
    from cns.learn import general, prepare, score, select, train

    config = small_config(tmp_path, train={"max_train_steps": 60, "learning_rate": 3e-3, "token_learning_rate": 3e-2})
    cumulative = open_model(tmp_path / "model", config)
    prepared = prepare(cumulative, load_concept(SAMPLES / "dog", config.limits), config)

    def held_loss() -> float:  # the same 16 (image, timestep, noise) draws every time
        g = torch.Generator().manual_seed(123)
        latents = prepared.source.latents.repeat(2, 1, 1, 1)[:16]
        with torch.no_grad():
            states = encode_prompts(cumulative.model, prepared.source.input_ids.repeat(16, 1))
            return float(diffusion_loss(cumulative.model, latents, states, g))

    before = held_loss()
    assert held_loss() == before, "the measurement itself must be deterministic"
    selection = select(cumulative, score(cumulative, prepared, config, progress=False), general(cumulative, config)[0],
                       config)
    train(cumulative, prepared, selection, config, progress=False)
    after = held_loss()
    # The tiny model has random weights and ~40 trainable rows: the loss can only fall a little
    # (about 2.5% here), but with fixed draws any fall is a real effect of training.
    assert after < 0.99 * before, (before, after)


def test_learning_is_reproducible_for_a_seed(tmp_path):
    from cns.delta import load_delta
    from cns.learn import learn

    deltas = []
    for run in ("a", "b"):
        config = small_config(tmp_path / run, train={"max_train_steps": 5})
        _, record, _ = learn(tmp_path / run / "model", SAMPLES / "dog", config, progress=False)
        deltas.append(load_delta(tmp_path / run / "model" / record.delta))
    (rows_a, _, emb_a, _), (rows_b, _, emb_b, _) = deltas
    assert torch.equal(emb_a, emb_b)
    assert rows_a.keys() == rows_b.keys()
    for name in rows_a:
        assert torch.equal(rows_a[name].index, rows_b[name].index)
        assert torch.equal(rows_a[name].weight, rows_b[name].weight)


def test_activation_scorer_selects_the_same_number_of_base_neurons(tmp_path):
    from cns.concept import load_concept
    from cns.cumulative import open_model
    from cns.learn import general, prepare, score, select

    config = small_config(tmp_path, scoring={"scorer": "activation"})
    cumulative = open_model(tmp_path / "model", config)
    prepared = prepare(cumulative, load_concept(SAMPLES / "cat2", config.limits), config)
    scores = score(cumulative, prepared, config, progress=False)
    assert all(s.shape == (layer.rows,) and bool((s > 0).all()) for s, layer in zip(scores.values(), cumulative.layers))
    selection = select(cumulative, scores, general(cumulative, config)[0], config)
    for layer in cumulative.layers:
        assert int(selection.base[layer.name].sum()) == rows_for_ratio(layer.rows, config.scoring.base_ratio)


def _relative_output_change(states: torch.Tensor, before: dict, after: dict) -> float:
    """||states @ dW^T|| / (||states|| ||dW||) over every K/V layer's changed rows."""
    num = den = 0.0
    for name in before:
        delta = (after[name] - before[name]).float()
        num += float((states.float() @ delta.T).pow(2).sum())
        den += float(states.float().pow(2).sum()) * float(delta.pow(2).sum())
    return (num / den) ** 0.5 if den else 0.0


@pytest.mark.parametrize("share", [False, True])
def test_null_space_rows_leave_protected_prompts_k_v_outputs_unchanged(tmp_path, share):
    """train.protect_generic / protect_earlier: a row's change may not use the directions that hold 99% of the
    generic captions' text states, then of earlier concepts' prompts (padding and the empty prompt
    included), so what those prompts read from K/V stays put (also when a later concept retrains shared rows), while the rows still move."""
    from dataclasses import replace

    from cns.concept import load_concept
    from cns.cumulative import open_model
    from cns.learn import learn_into, protected_states

    def weights(cumulative):
        return {layer.name: layer.linear.weight.detach().clone() for layer in cumulative.layers}

    changes = {}
    for energy in (0.0, 0.99):
        config = small_config(tmp_path / f"e{energy}", train={"protect_generic": energy, "protect_earlier": energy,
                                                              "learning_rate": 1e-2,
                                                              "reg_previous_weight": 0.0, "reg_pretrained_weight": 0.0,
                                                              "reg_output_weight": 0.0, "reg_generic_weight": 0.0},
                              selection={"exclude_owned": not share})
        cumulative = open_model(config.model_dir, config)
        learn_into(cumulative, load_concept(SAMPLES / "dog", config.limits), config, "d1", progress=False)
        measure = replace(config, train=replace(config.train, protect_generic=0.99, protect_earlier=0.99))  # the same states either way
        # every position the UNet attends to (padding too) of the generic captions, the earlier
        # concept's prompts, and the empty prompt of classifier-free guidance
        (generic, _), (earlier, _) = protected_states(cumulative, measure)
        before = weights(cumulative)
        record, _ = learn_into(cumulative, load_concept(SAMPLES / "cat2", config.limits), config, "d2", progress=False)
        after = weights(cumulative)
        # the lineage says how much of the text-state space the protection closed to the rows
        closed, width = record.stats["protected_directions"], record.stats["text_dim"]
        assert width == cumulative.layers[0].linear.in_features
        assert (closed == 0) if energy == 0 else (0 < closed < width), (closed, width)
        moved = sum(float((after[n] - before[n]).abs().sum()) for n in before)
        changes[energy] = (_relative_output_change(generic, before, after),
                           _relative_output_change(earlier, before, after), moved)
    (generic_free, earlier_free, moved_free), (generic_kept, earlier_kept, moved_kept) = changes[0.0], changes[0.99]
    assert moved_kept > 0.1 * moved_free > 0, "the rows must still learn"
    assert generic_kept <= 0.1 < generic_free, changes  # at most sqrt(1 - 0.99) by construction
    assert earlier_kept <= 0.1 < earlier_free, changes


def test_a_captioned_concepts_captions_are_what_later_concepts_protect(tmp_path):
    """A concept trained on per-image captions trained on those captions, not on the template: the
    lineage keeps each distinct caption once, and later concepts protect them (null-space rows and
    L_reg's output term read earlier_prompts). Before, only the template was protected, so a world
    concept read "on a pink background" had its prompts unprotected."""
    import json
    import shutil

    from cns.concept import load_concept
    from cns.cumulative import open_model
    from cns.learn import earlier_prompts, learn_into, protected_states

    captioned = tmp_path / "dog"
    shutil.copytree(SAMPLES / "dog", captioned)
    captions = {f"0{i}.jpg": f"a <dog1> dog on a {'red' if i % 2 else 'blue'} rug" for i in range(5)}
    (captioned / "concept.yaml").write_text('name: dog\ntoken: "<dog1>"\nclass_noun: dog\ncaptions:\n' + "".join(
        f'  {k}: "{v}"\n' for k, v in captions.items()))
    config = small_config(tmp_path, train={"max_train_steps": 2, "protect_earlier": 0.99})
    cumulative = open_model(config.model_dir, config)
    learn_into(cumulative, load_concept(captioned, config.limits), config, "d1", progress=False)
    record = cumulative.lineage.concepts[0]
    assert record.captions == ["a <dog1> dog on a blue rug", "a <dog1> dog on a red rug"]
    assert earlier_prompts(cumulative, config) == record.captions  # no template: it never trained on it
    (earlier, _), = protected_states(cumulative, config)
    assert len(earlier) == (1 + 2 + len(config.evaluate.prompts)) * 77  # the empty prompt, captions, evaluate prompts
    learn_into(cumulative, load_concept(SAMPLES / "cat2", config.limits), config, "d2", progress=False)
    saved = json.loads((tmp_path / "model" / "lineage.json").read_text())["concepts"]
    assert saved[0]["captions"] == record.captions
    assert "captions" not in saved[1]  # uncaptioned records are written as before
    assert open_model(config.model_dir, config).lineage.concepts[0].captions == record.captions
