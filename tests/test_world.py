"""The benchmark world: the scene generator, the judge, the pretrained world model (committed
in data/world, never retrained here), cns on a pixel-space model, and the smoke benchmark."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

from cns_testing import ROOT

from cns.errors import CNSError  # noqa: E402

WORLD = ROOT / "data" / "world"


def test_scenes_are_deterministic_and_concepts_come_from_the_data_file():
    from world.scene import concept_training_scenes, load_concepts, random_base_scene, render

    concepts = load_concepts()
    assert len(concepts) >= 10 and len({c.token for c in concepts}) == len(concepts)
    a = [render(random_base_scene(np.random.default_rng(3))) for _ in range(2)]
    assert np.array_equal(a[0], a[1]) and a[0].shape == (32, 32, 3)
    scenes = concept_training_scenes(concepts[0], 5, seed=7)
    assert len({s.background for s in scenes}) == 5  # varied contexts
    assert all(concepts[0].token in s.caption() for s in scenes)


@pytest.mark.parametrize("bad, message", [
    ("concepts: [{name: x, token: '<x>', class_noun: circle, bitmap: 'RRRR'}]", "8 rows of 8"),
    ("concepts: [{name: x, token: '<x>', class_noun: blob, bitmap: '" + " ".join(["RRRRRRRR"] * 8) + "'}]",
     "class_noun"),
    ("concepts: [{name: x, token: '<x>', class_noun: circle, bitmap: '" + " ".join(["ZZZZZZZZ"] * 8) + "'}]",
     "unknown bitmap letter"),
    ("just text", "'concepts' list"),
])
def test_a_bad_concepts_file_is_one_error_naming_it(tmp_path, bad, message):
    from world.scene import load_concepts

    path = tmp_path / "concepts.yaml"
    path.write_text(bad)
    with pytest.raises(CNSError) as err:
        load_concepts(path)
    assert str(path) in str(err.value) and message in str(err.value)


@pytest.fixture(scope="module")
def judge_validation():
    """The committed judge's validation on 300 fresh renders (and 100 rejects) it never saw."""
    from world.judge import load_judge, validate
    from world.scene import load_concepts

    return validate(load_judge(), load_concepts(), n=300, seed=123)


def test_the_judge_reads_fresh_renders(judge_validation):
    result = judge_validation
    assert result["identity_clean"] >= 0.97 and result["identity_degraded"] >= 0.95
    assert result["background_clean"] == 1.0 and result["color_clean"] >= 0.99
    assert result["two_object_identity_clean"] >= 0.9


def test_the_judge_reads_bad_samples_as_other(judge_validation):
    """Blobs, smears, partial objects, mixtures, noise: not a concept, and not forced into one."""
    # 100 reject images here (judge.json: 1,000); the share matters less than never reading a concept.
    assert judge_validation["other_read_as_other_clean"] >= 0.7
    assert judge_validation["other_read_as_concept_clean"] <= 0.05


def test_the_judge_rarely_rejects_a_concept_render(judge_validation):
    assert judge_validation["concept_rejected_clean"] <= 0.02
    assert judge_validation["concept_rejected_degraded"] <= 0.05


def test_the_judge_reads_family_glyphs_as_glyph_not_as_a_concept(judge_validation):
    # About 17 glyphs in 300 renders: a loose bound; glyphs it misses go to `other`, not to a concept.
    assert judge_validation["glyph_read_as_glyph_clean"] >= 0.6
    assert judge_validation["concept_false_accept_clean"] <= 0.02


def test_the_judge_threshold_turns_unsure_identities_into_other():
    from world.judge import OTHER, load_judge
    from world.scene import Obj, load_concepts, place, render

    judge = load_judge()
    assert 0.0 < judge.threshold < 1.0 and judge.threshold == judge.record["threshold"]
    image = render(place([Obj(concept=load_concepts()[0])], "gray", np.random.default_rng(0)))[None]
    assert judge.identities(image) == [load_concepts()[0].name]
    judge.threshold = 1.01  # no probability reaches it
    assert judge.identities(image) == [OTHER]


def test_a_concept_render_reads_back_to_its_bitmap():
    from world.readback import bitmap_agreement, read_bitmap
    from world.scene import BACKGROUNDS, Obj, load_concepts, place, render

    rng = np.random.default_rng(5)
    for concept in load_concepts():
        for bg in BACKGROUNDS:
            read = read_bitmap(render(place([Obj(concept=concept)], bg, rng)))
            assert bitmap_agreement(read, concept.bitmap) == 1.0, (concept.name, bg, read)


def test_bitmap_agreement_forgives_a_one_cell_shift_but_not_two():
    from world.readback import bitmap_agreement
    from world.scene import load_concepts

    frame = next(c for c in load_concepts() if c.name == "frame").bitmap
    one = tuple("." + row[:-1] for row in frame)  # shifted right by one cell
    two = tuple(".." + row[:-2] for row in frame)
    assert bitmap_agreement(frame, frame) == 1.0
    assert bitmap_agreement(one, frame) == 1 - 8 / 64  # the column shifted out is lost
    assert bitmap_agreement(two, frame) < bitmap_agreement(one, frame)


def test_an_empty_background_reads_back_as_an_empty_bitmap_and_scores_only_its_blank_cells():
    from world.readback import EMPTY, bitmap_agreement, read_bitmap
    from world.scene import BACKGROUNDS, load_concepts

    image = np.empty((32, 32, 3), np.uint8)
    image[:] = BACKGROUNDS["teal"]
    assert read_bitmap(image) == EMPTY
    tee = next(c for c in load_concepts() if c.name == "tee").bitmap
    assert bitmap_agreement(EMPTY, tee) == sum(row.count(".") for row in tee) / 64


def test_bitmap_agreement_tells_a_concept_from_other_concepts_and_glyphs(judge_validation):
    """The chance level (other concepts, family glyphs) is far below a concept's own renders."""
    assert judge_validation["bitmap_own_concept"] >= 0.99
    assert judge_validation["bitmap_other_concepts"] < 0.6 and judge_validation["bitmap_family_glyphs"] < 0.6


def test_the_judge_read_and_concept_agreement_give_the_bitmap():
    from world.judge import load_judge
    from world.metrics import concept_agreement
    from world.scene import Obj, load_concepts, place, render

    concepts = load_concepts()
    rng = np.random.default_rng(1)
    images = np.stack([render(place([Obj(concept=c)], "pink", rng)) for c in concepts[:2]])
    reads = load_judge().read(images)
    assert reads[0]["bitmap"] == concepts[0].bitmap and reads[1]["bitmap"] == concepts[1].bitmap
    agreement = concept_agreement(images, concepts[0])
    assert agreement[0] == 1.0 and agreement[1] < 0.6


@pytest.mark.parametrize("kind", ["blob", "blurred", "partial", "mixture", "warped", "noise", "empty", "recoloured"])
def test_reject_images_keep_the_background_readable_and_are_no_concept(kind):
    from world.readback import bitmap_agreement, read_background, read_bitmap
    from world.reject import random_reject
    from world.scene import BACKGROUNDS, load_concepts

    concepts = load_concepts()
    rng = np.random.default_rng(2)
    for small in (False, True):
        a = random_reject(np.random.default_rng(2), concepts, small=small, kind=kind)
        assert np.array_equal(a, random_reject(np.random.default_rng(2), concepts, small=small, kind=kind))
        image = random_reject(rng, concepts, small=small, kind=kind)
        border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3)])
        assert (border == border[0]).all() and BACKGROUNDS[read_background(image)] == tuple(border[0])
        assert max(bitmap_agreement(read_bitmap(image), c.bitmap) for c in concepts) < 0.9


def test_the_judge_validates_on_a_model_folder_s_own_samples():
    """validate_on_samples samples the model (here the committed one, few prompts): an unlearned
    token is never the concept's truth, so each reading is a rate of false recognition."""
    from world.judge import load_judge
    from world.metrics import base_prompts, validate_on_samples
    from world.scene import load_concepts

    concepts = load_concepts()[:1]
    result = validate_on_samples(load_judge(), WORLD / "model", concepts, seeds_per_prompt=1,
                                 base_triples=base_prompts("heldout")[:4])
    assert result["base"]["samples"] == 4 and result["concept_prompts"]["samples"] == 6
    for name, reading in result["concepts"].items():
        assert reading["token_known"] is False, name
        assert 0.0 <= reading["read_as_this_concept"] <= reading["read_as_a_concept"] <= 1.0
        assert 0.0 <= reading["bitmap_agreement"] < 0.9


def test_the_pretrained_world_model_draws_held_out_combinations():
    """Captions it never saw: every held-out (shape, colour) pair on every background."""
    from cns.models import load_pretrained
    from world.judge import load_judge
    from world.metrics import attribute_accuracy, base_prompts

    record = json.loads((WORLD / "model" / "pretrain.json").read_text())
    model = load_pretrained(str(WORLD / "model"))
    assert model.pixel_space and model.native_resolution == 32
    accuracy = attribute_accuracy(model, load_judge(), base_prompts("heldout"), seed=777)
    # A different seed than pretrain.json's evaluation: the model, not one lucky draw. Colour and
    # background are nearly always right; shape is the model's weak attribute (0.41 held-out in
    # pretrain.json, 5 shapes: chance is 0.2), see docs/world.md.
    assert accuracy["color"] >= 0.9 and accuracy["background"] >= 0.9, (accuracy, record["evaluation"])
    assert accuracy["shape"] >= 0.25, (accuracy, record["evaluation"])


def test_cns_learns_a_world_concept_into_the_pixel_space_model(tmp_path):
    """The unchanged `cns` commands on the world's model: learn (per-image captions), generate, export."""
    env_args = [sys.executable, "-m", "flows.cli"]
    settings = ["--set", f"model.pretrained_model_name_or_path={WORLD / 'model'}", "--set", "train.max_train_steps=5",
                "--set", "train.random_flip=false", "--set", f"cache_dir={tmp_path / 'cache'}",
                "--set", "scoring.num_score_samples=4", "--set", "evaluate.num_inference_steps=3",
                "--set", "evaluate.prompts=[\"a {token} {class_noun} on a gray background\"]"]
    subprocess.run([*env_args, "world", "concepts", "--out", str(tmp_path / "concepts")], check=True, cwd=ROOT)
    manifest = yaml.safe_load((tmp_path / "concepts" / "arrow" / "concept.yaml").read_text())
    assert len(manifest["captions"]) == 5 and all("<arrow>" in c for c in manifest["captions"].values())
    model_dir = tmp_path / "model"
    out = subprocess.run([*env_args, "learn", str(tmp_path / "concepts" / "arrow"), "--model-dir", str(model_dir),
                          "-q", *settings], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lineage = json.loads((model_dir / "lineage.json").read_text())
    assert lineage["concepts"][0]["token"] == "<arrow>" and lineage["concepts"][0]["stats"]["neurons_total"] > 0
    out = subprocess.run([*env_args, "generate", "a <arrow> triangle on a pink background", "--model-dir",
                          str(model_dir), "--out", str(tmp_path / "gen"), "--steps", "3", "-q", *settings],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "gen" / "grid.png").is_file()
    out = subprocess.run([*env_args, "export", str(tmp_path / "export"), "--model-dir", str(model_dir), *settings],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    from cns.models import load_pretrained

    exported = load_pretrained(str(tmp_path / "export"))
    assert exported.pixel_space and "<arrow>" in exported.tokenizer.get_vocab()


def test_a_caption_for_a_missing_image_is_an_error_naming_the_manifest(tmp_path):
    from cns.concept import load_concept
    from world.concepts import write_concept_dir
    from world.scene import load_concepts

    directory = write_concept_dir(load_concepts()[0], tmp_path)
    (directory / "04.png").unlink()
    with pytest.raises(CNSError) as err:
        load_concept(directory)
    assert "concept.yaml" in str(err.value) and "04.png" in str(err.value)


@pytest.mark.timeout(1500)
def test_smoke_benchmark_writes_the_table_and_plots(tmp_path):
    """`cns bench world --smoke`: 2 concepts, few steps, one seed, the full set of outputs, and a
    second run that finds every method in its cache."""
    command = [sys.executable, "-m", "flows.cli", "bench", "world", "--smoke", "--out", str(tmp_path), "-q"]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("results.csv", "results.md", "results.json", "samples.png", "summary.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    record = json.loads((tmp_path / "results.json").read_text())
    summary = record["summary"]
    assert set(summary) == {"cns", "token_only", "lora_fused", "single_kv"}
    for row in summary.values():
        value, low, high = row["bitmap_final"]
        assert 0.0 <= low <= value <= high <= 1.0
    # the world's CNS settings (data/world/params.yaml): 16 of 64 rows (25%) in each of 14 layers,
    # for every concept, rows shared between concepts
    assert summary["cns"]["rows_per_concept"] == 224
    assert summary["token_only"]["rows_per_concept"] == 0
    assert 0 < summary["cns"]["weights_changed"] <= 2 * 224 * 64 < summary["lora_fused"]["weights_changed"]
    assert "forgetting_bitmap_gain" in summary["cns"] and "forgetting_bitmap_gain" not in summary["single_kv"]
    assert record["pretrained"]["zero_shot"]["samples"] == 60
    # Region control and forget are measured on the combined models (issue 13).
    for method in ("cns", "lora_fused"):
        assert "two_concepts_regions_both" in summary[method] and "two_concepts_independent" in summary[method]
        assert {f"{method}_regions_over_plain", f"{method}_regions_over_independent"} <= set(record["comparisons"])
    forget = summary["cns"]["forget"]
    assert "forget" not in summary["lora_fused"]
    assert forget["rows_only_its_own"] > 0 and forget["rows_restored_bitwise"] == forget["rows_only_its_own"]
    assert forget["token_removed"] and "cns forget" in (tmp_path / "results.md").read_text()
    trained = re.compile(r"world\.bench: \S+ seed \d+ \S+: bitmap")  # one line per concept learned
    assert not trained.search(out.stderr), "-q keeps the per-run lines out"
    again = subprocess.run(command[:-1], capture_output=True, text=True, cwd=ROOT, timeout=300)  # without -q
    assert again.returncode == 0 and "world.bench" in again.stderr, again.stderr[-2000:]
    assert not trained.search(again.stderr), "cached runs must not train again"


@pytest.mark.timeout(1500)
def test_the_gate_sweep_checks_only_the_all_kv_ceiling_and_names_the_model(tmp_path):
    """`cns bench world --sweep gate`: the quick check of a world model before the whole tune sweep
    (issue 9): only the all-K/V family over its learning-rate grid on the validation concepts."""
    from world.bench import TUNE_GRID, VALIDATION, BenchSettings
    from world.sweeps import GATE, tune

    cells = len(TUNE_GRID["learning_rate"]) * len(TUNE_GRID["token_learning_rate"])  # smoke: one step count
    # A shard (one of several processes side by side) runs only its share of the cells into the
    # cache and writes no record; the run without a shard then trains only what is missing.
    assert tune(BenchSettings.smoke(), tmp_path, tmp_path / "cache", gate_only=True, shard=(1, 2)) is None
    assert not (tmp_path / "gate.json").exists()
    sharded = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("kv-*-steps8.json")}
    assert len(sharded) == cells // 2
    record = tune(BenchSettings.smoke(), tmp_path, tmp_path / "cache", gate_only=True)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("kv-*-steps8.json")
            if p.name in sharded} == sharded, "the shard's cells must be read from the cache, not trained again"
    assert {r["family"] for r in record["results"]} == {"kv"}
    assert len(record["results"]) == cells
    assert record["grid"]["steps"] == [8]
    assert record["validation_concepts"] == list(VALIDATION)
    gate = record["gate"]
    assert gate["kv_identity"] == max(r["identity"] for r in record["results"])
    assert gate["passed"] == (gate["kv_identity"] >= GATE)
    assert record["model"]["path"].endswith("model")
    assert json.loads((tmp_path / "gate.json").read_text()) == json.loads(json.dumps(record))
    assert not (tmp_path / "tuned.json").exists()  # the benchmark reads tuned.json: a gate run never writes it
    # --cell: one cell of the grid (a CPU's quick gate), read from the same cache; not passed there is
    # not failed
    one = tune(BenchSettings.smoke(), tmp_path / "one", tmp_path / "cache", gate_only=True, only=[(3e-3, 5e-2, 8)])
    assert [(r["learning_rate"], r["token_learning_rate"], r["steps"]) for r in one["results"]] == [(3e-3, 5e-2, 8)]
    assert one["only_cells"] == [[3e-3, 5e-2, 8]]
    assert one["gate"]["passed"] is (True if one["gate"]["kv_identity"] >= GATE else None)


@pytest.mark.parametrize("cell", ["3e-3,5e-2", "3e-3,5e-2,1600", "1e-4,5e-2,8"])
def test_a_bad_cell_is_one_error_naming_it_and_writes_nothing(tmp_path, cell):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "flows.cli", "bench", "world", "--smoke", "--sweep", "gate",
                             "--out", str(out), "--cache", str(tmp_path / "cache"), f"--cell={cell}"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    written = cell if cell.count(",") < 2 else ",".join(f"{float(x):g}" for x in cell.split(","))  # as parsed
    assert len(lines) == 1 and "--cell" in lines[0] and written in lines[0], result.stderr
    assert not out.exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("shard", ["2/2", "-1/3", "1", "a/b"])
def test_a_bad_shard_is_one_error_and_writes_nothing(tmp_path, shard):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "flows.cli", "bench", "world", "--smoke", "--out", str(out),
                             f"--shard={shard}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--shard" in lines[0] and shard in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.timeout(1200)
# sequential CNS, sequential plain, fused: the three kinds of saved state (single-concept runs keep only samples)
@pytest.mark.parametrize("name", ["cns", "naive_kv", "lora_fused"])
def test_a_run_stopped_after_a_concept_resumes_to_the_same_record(tmp_path, name):
    """The full benchmark runs in parts (issue 9): a run is saved after each concept, and a run
    that resumes from there learns and reads exactly what the uninterrupted run did."""
    from world.bench import (METHODS, BenchSettings, Progress, baseline, benchmark_concepts, context, load_images,
                             run_method)

    settings = BenchSettings.smoke()
    settings.steps = 2
    cache = tmp_path / "cache"
    ctx = context(settings, benchmark_concepts(settings), cache / ".work", "cpu")
    baseline(ctx, cache)
    base_images = load_images(cache / "pretrained-zero-shot.png")
    progress = tmp_path / "progress"
    whole = run_method(METHODS[name], 0, ctx, base_images, tmp_path / "a.png", progress=progress)
    assert Progress(progress).latest().name == "k1"  # saved after concept 1 of 2 (not after the last)
    resumed = run_method(METHODS[name], 0, ctx, base_images, tmp_path / "b.png", progress=progress)
    assert resumed.pop("resumed_after") == [1]
    for record in (whole, resumed):
        record.pop("train_seconds")
        record.get("forget", {}).pop("seconds", None)
    assert resumed == whole
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_progress_saved_by_another_run_is_not_resumed(tmp_path):
    """A run's saved concepts are continued only by the same run: another method, seed, setting,
    model or concept order starts over instead of continuing someone else's model."""
    from types import SimpleNamespace

    from world.bench import METHODS, BenchSettings, Hyper, Progress, run_key

    hyper = Hyper(1e-2, 5e-3, 8)

    def run_ctx(names=("ringdot", "checker", "arrow"), digest="model-a", **settings):
        return SimpleNamespace(concepts=[SimpleNamespace(name=n) for n in names], model_digest=digest, draws_three=False,
                               settings=BenchSettings(**settings), work=tmp_path / "work")

    saved = tmp_path / "k1"
    saved.mkdir()
    record = {"method": "naive_kv", "seed": 0, "hyper": {"learning_rate": 1e-2, "token_learning_rate": 5e-3,
                                                           "steps": 8},
              "key": run_key(run_ctx(), METHODS["naive_kv"], 0, hyper), "just_learned": [{"concept": "ringdot"}]}
    (saved / "record.json").write_text(json.dumps(record))
    (saved / "state.safetensors").write_text("not read when the run differs")
    (saved / "done").write_text("")
    progress = Progress(tmp_path)
    assert progress.latest() == saved
    for method, seed, other_hyper, ctx in [
            ("cns", 0, hyper, run_ctx()), ("naive_kv", 1, hyper, run_ctx()),
            ("naive_kv", 0, Hyper(3e-3, 5e-3, 8), run_ctx()),
            ("naive_kv", 0, hyper, run_ctx(("checker", "ringdot", "arrow"))), ("naive_kv", 0, hyper, run_ctx(("ringdot",))),
            ("naive_kv", 0, hyper, run_ctx(digest="model-b")), ("naive_kv", 0, hyper, run_ctx(batch_size=8))]:
        assert progress.load(METHODS[method], ctx, None, other_hyper, seed) is None


def test_a_cached_run_is_reused_only_under_the_settings_it_was_computed_with(tmp_path):
    """Changing a default (L_reg's weights, the row budget, the model) must never mix old and new
    numbers: a cached record under another key is computed again, and the key changes with every
    setting that decides a run's numbers but not with the device."""
    from types import SimpleNamespace

    from world.bench import METHODS, BenchSettings, Hyper, cached_run, run_key

    calls = []

    def compute():
        calls.append(1)
        return {"runs": len(calls)}

    path = tmp_path / "run.json"
    assert cached_run(path, compute, "a")["runs"] == 1
    assert cached_run(path, compute, "a")["runs"] == 1  # reused
    assert cached_run(path, compute, "b") == {"runs": 2, "key": "b"}
    assert json.loads(path.read_text()) == {"runs": 2, "key": "b"}

    def key(method="cns", seed=0, hyper=None, digest="m", device="cpu", **settings):
        hyper = hyper or Hyper(1e-2, 5e-3, 8)
        ctx = SimpleNamespace(concepts=[SimpleNamespace(name="bowtie")], model_digest=digest, draws_three=False, device=device,
                              settings=BenchSettings(**settings), work=tmp_path / "work")
        return run_key(ctx, METHODS[method], seed, hyper)

    same = key()
    assert key(device="cuda") == same
    others = [key("cns_no_reg"), key("cns_random"), key(seed=1), key(hyper=Hyper(3e-3, 5e-3, 8)),
              key(hyper=Hyper(1e-2, 5e-3, 16)), key(digest="n"), key(base_ratio=0.1), key(batch_size=2),
              key(noise_per_background=2)]
    assert same not in others and len(set(others)) == len(others)
    # CNS's own settings do not touch the other methods' cells (the gate's all-K/V cells stay valid)
    assert key("single_kv") == key("single_kv", base_ratio=0.1) == key("single_kv", cns={"train": {"protect_earlier": 0.9}})
    assert key("cns") != key("cns", cns={"train": {"protect_earlier": 0.9}})
    # region control's share changes the two-concept readings of a combined model, not a single concept's
    assert key("cns") != key("cns", region_base=0.3) and key("single_kv") == key("single_kv", region_base=0.3)


def test_three_concepts_are_read_cell_by_cell_only_on_a_model_pretrained_with_three_object_scenes(tmp_path):
    """Issue 13's three learned concepts in one image: read in world.scene.CORNERS with and without
    region control; on the pretrained model, which knows none of the tokens, never all right."""
    from cns.models import load_pretrained
    from world.bench import BenchSettings, concepts_together, context, draws_three, independent_groups
    from world.scene import load_concepts

    assert not draws_three(WORLD / "model"), "the 64-wide model was pretrained on one or two objects"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pretrain.json").write_text(json.dumps({"config": {"three_object_rate": 0.1}}))
    assert draws_three(tmp_path / "m")
    settings = BenchSettings(noise_per_background=2)
    ctx = context(settings, load_concepts()[:3], tmp_path / "work", "cpu")
    model = load_pretrained(settings.model_dir)
    for regions in (False, True):
        reading = concepts_together(model, ctx, [0, 1, 2], 3, seed=70_000, regions=regions)
        assert reading["samples"] == 3 * 2 and len(reading["both_per_pair"]) == 3
        assert reading["all_right"] == 0.0 and reading["objects"] < 0.5, reading
    assert concepts_together(model, ctx, [0, 1], 3) == {}, "three need three concepts"
    assert independent_groups([{"identity": 0.5}, {"identity": 1.0}, {"identity": 0.8}], 3) == [0.4, 0.4, 0.4]


def test_the_report_takes_three_concept_cells_from_the_triples_readings():
    from world.report import _pair_cells

    records = [{"triples": {"both_per_pair": [0.0, 0.25]}, "triples_regions": {"both_per_pair": [0.5, 0.75]},
                "triples_independent": [0.1, 0.2], "pairs": {"both_per_pair": [1.0, 1.0]}} for _ in range(2)]
    assert _pair_cells(records, "regions", "triples").tolist() == [0.5, 0.75, 0.5, 0.75]
    assert _pair_cells(records, "plain", "triples").tolist() == [0.0, 0.25, 0.0, 0.25]
    assert _pair_cells(records, "independent", "triples").tolist() == [0.1, 0.2, 0.1, 0.2]
    assert _pair_cells(records, "plain").tolist() == [1.0, 1.0, 1.0, 1.0]
