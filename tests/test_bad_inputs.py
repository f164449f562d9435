"""Every bad input: a one-line error naming the file and the problem, exit 2, model unchanged."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from cns_testing import ROOT, copy_concept, tree_digest


def _remove_manifest(d: Path) -> None:
    (d / "concept.yaml").unlink()


def _broken_yaml(d: Path) -> None:
    (d / "concept.yaml").write_text("token: [<dog9>\nclass_noun: dog\n")


def _unknown_key(d: Path) -> None:
    (d / "concept.yaml").write_text("name: rex\ntoken: <rex1>\nclass_noun: dog\ncolour: brown\n")


def _no_images(d: Path) -> None:
    for p in d.glob("*.jpg"):
        p.unlink()


def _text_as_jpg(d: Path) -> None:
    (d / "05.jpg").write_text("this is not a picture")


def _truncated_jpg(d: Path) -> None:
    data = (d / "00.jpg").read_bytes()
    (d / "05.jpg").write_bytes(data[: len(data) // 2])


def _gif_as_png(d: Path) -> None:
    Image.new("RGB", (64, 64), "red").save(d / "05.png", format="GIF")


def _manifest(**fields):
    def write(d: Path) -> None:
        data = {"name": "rex", "token": "<rex1>", "class_noun": "dog", **fields}
        (d / "concept.yaml").write_text(yaml.safe_dump(data))
    return write


def _captions(text: str):
    def write(d: Path) -> None:
        captions = {p.name: text for p in sorted(d.glob("*.jpg"))}
        _manifest(captions=captions)(d)
    return write


def _padded_manifest(d: Path) -> None:
    (d / "concept.yaml").write_text("name: rex\ntoken: <rex1>\nclass_noun: dog\n" + "# padding\n" * 10_000)


CASES = {
    # id: (how to break a copy of the dog concept, extra CLI args, file the message names, words in it, code)
    "missing manifest": (_remove_manifest, [], "concept.yaml", "missing"),
    "invalid manifest": (_broken_yaml, [], "concept.yaml", "not valid YAML"),
    "unknown manifest key": (_unknown_key, [], "concept.yaml", "unknown key 'colour'"),
    "no images": (_no_images, [], "", "holds no images"),
    "unreadable image": (_text_as_jpg, [], "05.jpg", "not a readable image"),
    "truncated image": (_truncated_jpg, [], "05.jpg", "not a readable image"),
    "non-image format": (_gif_as_png, [], "05.png", "is GIF, not JPEG, PNG or WebP"),
    "image over pixel limit": (_manifest(), ["--set", "limits.max_image_pixels=100000"], "00.jpg",
                               "over the limit of 100000"),
    "too many images": (_manifest(), ["--set", "limits.max_images=4"], "", "over the limit of 4"),
    "token of an earlier concept": (_manifest(token="<dog1>"), [], "concept.yaml",
                                    "token <dog1> is already used by concept 'dog'"),
    "name of an earlier concept": (_manifest(name="cat2"), [], "concept.yaml", "a concept named 'cat2' is already"),
    "token with a space": (_manifest(token="sks dog"), [], "concept.yaml", "must look like <name1>"),
    "token that is a vocabulary word": (_manifest(token="dog"), [], "concept.yaml", "must look like <name1>"),
    # Bounded manifests (issue 10, item 7): every prompt is stored in the lineage and re-encoded by
    # every later concept; 150,000 prompts once took the next learn to 23 GB.
    "too many prompts": (_manifest(prompts=[f"a photo of a <rex1> dog, view {i}" for i in range(65)]), [],
                         "concept.yaml", "65 prompts, over the limit of 64"),
    "prompt too long": (_manifest(prompts=["a photo of a <rex1> dog " + "very " * 80]), [], "concept.yaml",
                        "prompt 1 is 424 characters, over the limit of 300"),
    "caption too long": (_captions("a <rex1> dog " + "on a sofa " * 40), [], "concept.yaml",
                         "characters, over the limit of 300"),
    "class noun too long": (_manifest(class_noun="dog " * 30), [], "concept.yaml", "over the limit of 64"),
    "manifest file too large": (_padded_manifest, [], "concept.yaml", "bytes, over the limit of 65536"),
    "unknown config key": (_manifest(), ["--set", "train.max_steps=3"], "--set", "unknown key 'train.max_steps'"),
}


@pytest.fixture
def workspace(two_concepts, tmp_path):
    """A copy of the two-concept model and a params file pointing at the shared cache."""
    model = tmp_path / "model"
    shutil.copytree(two_concepts.model_dir, model)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**{k: v for k, v in two_concepts.config.to_dict().items()},
                                      "model_dir": str(model)}))
    return model, params


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_a_one_line_error_and_changes_nothing(case, workspace, tmp_path, capsys):
    from flows.cli import main

    model, params = workspace
    breaker, extra, named, words = CASES[case]
    concept = copy_concept("dog", tmp_path / "in")
    breaker(concept)
    before_model, before_concept = tree_digest(model), tree_digest(concept)

    code = main(["learn", str(concept), "--params", str(params), "-q", *extra])

    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("cns: error: ")
    assert named in err and words in err, err
    assert tree_digest(model) == before_model, "the model directory changed"
    assert tree_digest(concept) == before_concept, "the concept directory changed"


def test_unknown_key_in_params_file_is_an_error_naming_the_file(tmp_path, capsys):
    from flows.cli import main

    params = tmp_path / "params.yaml"
    params.write_text("train:\n  learning_rate: 0.001\nscoring:\n  ratio: 0.1\n")
    assert main(["learn", str(ROOT / "data/samples/dog"), "--params", str(params), "--model-dir",
                 str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip() == (f"cns: error: {params}: unknown key 'scoring.ratio' "
                                               "(known: base_ratio, num_score_samples, score_batch_size, scorer)")
    assert not (tmp_path / "m").exists()


def test_console_script_exits_non_zero_with_one_line(tmp_path):
    concept = copy_concept("dog", tmp_path)
    _remove_manifest(concept)
    cns = Path(sys.executable).parent / "cns"
    proc = subprocess.run([str(cns), "learn", str(concept), "--model-dir", str(tmp_path / "m")],
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"cns: error: {concept}/concept.yaml: missing: a concept directory "
                                                "needs concept.yaml (token, class_noun)"]
    assert not (tmp_path / "m").exists()
