"""The benchmark world's settings come from data/world/params.yaml (world/params.py): equal to the
classes' defaults (so the committed pretraining checkpoint still resumes), strict about unknown
keys, and listed as DVC params of the world's stages so a change shows in `dvc status`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cns.config import ConfigError
from world.bench import BenchSettings
from world.model import CHECKPOINT_DIR, PretrainConfig
from world.params import PARAMS_FILE, bench_settings, pretrain_config


def test_the_pretrain_params_are_the_committed_checkpoints_config():
    assert pretrain_config() == PretrainConfig()
    state = CHECKPOINT_DIR / "state.json"
    if state.is_file():
        # a setting added later (width) is read at its default from an older checkpoint, as pretrain does
        assert PretrainConfig(**json.loads(state.read_text())["config"]) == pretrain_config()


def test_the_wider_worlds_params_differ_only_in_width_rate_three_objects_and_folders_and_match_its_checkpoint():
    from dataclasses import replace

    from world.model import world_dirs

    wide = PARAMS_FILE.with_name("params-128.yaml")
    assert pretrain_config(wide) == replace(PretrainConfig(), width=128, learning_rate=5e-4, three_object_rate=0.1)
    checkpoint, model = world_dirs(128)
    settings = bench_settings(wide)
    assert Path(settings.model_dir) == model.relative_to(PARAMS_FILE.parents[2])
    assert replace(settings, model_dir=BenchSettings().model_dir, tuned=BenchSettings().tuned) == BenchSettings()
    if (checkpoint / "state.json").is_file():  # the committed CPU pretraining (2026-12-07 on), resumed by that file
        assert PretrainConfig(**json.loads((checkpoint / "state.json").read_text())["config"]) == pretrain_config(wide)


def test_the_bench_params_are_the_full_runs_defaults():
    assert bench_settings() == BenchSettings()


def test_a_changed_value_is_read_and_an_unknown_key_is_an_error(tmp_path):
    data = yaml.safe_load(PARAMS_FILE.read_text())
    data["world"]["pretrain"]["warmup_steps"] = 10
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    assert pretrain_config(path).warmup_steps == 10
    data["world"]["pretrain"]["warmup_stepz"] = 10
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="world.pretrain.warmup_stepz"):
        pretrain_config(path)
    path.write_text(yaml.safe_dump({"world": {"pretrian": {}}}))
    with pytest.raises(ConfigError, match="world.pretrian"):
        bench_settings(path)
    path.write_text(yaml.safe_dump({"world": {"pretrain": {"width": 40}}}))  # the UNet's group norm needs 16k
    with pytest.raises(ConfigError, match="world.pretrain.width 40"):
        pretrain_config(path)


def test_dvc_sees_a_changed_world_param_in_the_stages_that_read_it(tmp_path):
    pytest.importorskip("dvc")
    from dvc.repo import Repo

    world = tmp_path / "data" / "world"
    world.mkdir(parents=True)
    shutil.copy(PARAMS_FILE.parent / "dvc.yaml", world / "dvc.yaml")
    shutil.copy(PARAMS_FILE, world / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    Repo.init(str(tmp_path)).close()
    with Repo(str(tmp_path)) as repo:
        stages = {s.name: s for s in repo.index.stages}
        params = {name: [d for d in stage.deps if type(d).__name__ == "ParamsDependency"]
                  for name, stage in stages.items()}
        assert [d.params for d in params["world-pretrain"]] == [["world.pretrain"]]
        for name in ("world-tune", "bench-world", "world-budget"):
            assert [d.params for d in params[name]] == [["world.bench"]]
        (pretrain,) = params["world-pretrain"]
        pretrain.save()  # as `dvc repro` records it in dvc.lock
        assert pretrain.status() == {}
        data = yaml.safe_load((world / "params.yaml").read_text())
        data["world"]["pretrain"]["seed"] = 1
        (world / "params.yaml").write_text(yaml.safe_dump(data))
        assert "world.pretrain" in str(pretrain.status())


@pytest.mark.parametrize("cns, message", [
    ({"train": {"reg_generic_wieght": 0.0}}, "world.bench.cns.train.reg_generic_wieght"),
    ({"selection": {"exclude_owned": "no"}}, "world.bench.cns.selection.exclude_owned"),
    ({"trian": {}}, "world.bench.cns.trian")])
def test_the_world_s_cns_settings_are_checked_like_params_yaml(tmp_path, cns, message):
    data = yaml.safe_load(PARAMS_FILE.read_text())
    data["world"]["bench"]["cns"] = cns
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message) as error:
        bench_settings(path)
    assert str(path) in str(error.value)


def test_the_world_s_cns_settings_reach_every_cns_run(tmp_path):
    from world.bench import METHODS, Hyper, cns_config

    settings = BenchSettings(cns={"train": {"protect_earlier": 0.99, "reg_generic_weight": 0.0},
                                  "selection": {"exclude_owned": False}})
    hyper = Hyper(3e-3, 5e-2, 8)
    config = cns_config(settings, tmp_path / "w", hyper, 0, method=METHODS["cns"])
    assert (config.train.protect_earlier, config.train.reg_generic_weight, config.selection.exclude_owned) == \
        (0.99, 0.0, False)
    assert (config.train.learning_rate, config.train.max_train_steps) == (3e-3, 8)  # the tuned values win
    plain = cns_config(settings, tmp_path / "w", hyper, 0, method=METHODS["cns_no_reg"])
    # the ablation drops L_reg and the null-space protection
    assert plain.train.reg_previous_weight == plain.train.reg_output_weight == plain.train.protect_earlier == 0.0
