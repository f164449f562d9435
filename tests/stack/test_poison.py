"""A dataset that fails for a reason of its own is rejected with error.json and the pass goes on
to the datasets behind it; nothing of it is left in the workspace (issue 10, item 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cns.concept import ConceptError
from cns.lineage import read_lineage
from tasks import bucket, s3
from tasks.versioning import git, last_version

from stack_helpers import make_concept, own_workspace, set_params, token_for

pytestmark = pytest.mark.stack

FAST = {"train": {"max_train_steps": 4}, "scoring": {"num_score_samples": 2, "score_batch_size": 2},
        "evaluate": {"num_inference_steps": 2, "num_images_per_prompt": 1, "loss_draws": 2}}


@pytest.fixture(scope="module")
def queue(running_stack, tmp_path_factory):
    """A workspace and a bucket of their own, with one concept (4 images) learned as model v1."""
    from flows.pipeline import watch

    with own_workspace(tmp_path_factory, "poison", **FAST) as (ws, name, root):
        bucket.drop(s3.client(), name, make_concept(root / "src", "first", images=4, token="<first1>"))
        assert [o["outcome"] for o in watch(str(ws.root))] == ["learned"]
        yield ws, name, root / "src"


def _runs(model_name: str, concept: str):
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(model_name)
    return client.search_runs([experiment.experiment_id], f"tags.`cns.concept` = '{concept}'")


def _error(name: str, concept: str) -> dict:
    client = s3.client()
    (obj,) = bucket.list_objects(client, name, f"rejected/{concept}/")
    return json.loads(client.get_object(Bucket=name, Key=obj.key)["Body"].read())


def upload_unchecked(name: str, directory) -> None:
    """Upload as any S3 tool would (no local checks): the images, then the manifest."""
    client = s3.client()
    for path in sorted(directory.iterdir(), key=lambda p: p.name == "concept.yaml"):
        client.upload_file(str(path), name, f"incoming/{directory.name}/{path.name}")


def _poison_then_good(ws, name, src, poison: str, manifest: dict, good: str):
    """Drop a poison dataset (unchecked) and a good one after it; one pass."""
    from flows.pipeline import watch

    upload_unchecked(name, make_concept(src, poison, manifest={"name": poison, **manifest}))
    bucket.drop(s3.client(), name, make_concept(src, good))
    before = last_version(ws)
    outcomes = watch(str(ws.root))
    assert [(o["concept"], o["outcome"]) for o in outcomes] == [(poison, "rejected"), (good, "learned")]
    assert last_version(ws) == before + 1 == read_lineage(ws.model_dir).version
    assert not (ws.datasets_dir / poison).exists()
    assert git(ws, "status", "--porcelain", "--", "data", "dvc.lock", "metrics") == ""
    assert watch(str(ws.root)) == []  # rejected for good: not fetched, trained or retried again
    return _error(name, poison)


def test_a_class_noun_holding_the_token_is_rejected_at_the_fetch_and_the_pass_goes_on(queue):
    ws, name, src = queue
    with pytest.raises(ConceptError, match="class_noun"):  # `cns drop` refuses it locally
        bucket.drop(s3.client(), name, make_concept(src / "local", "p1-noun", manifest={
            "token": "<noun1>", "class_noun": "<noun1> dog"}))
    assert list(bucket.list_objects(s3.client(), name, "incoming/p1-noun/")) == []
    record = _poison_then_good(ws, name, src, "p1-a-noun-token", {"token": "<noun2>", "class_noun": "big <noun2>"},
                               "p1-b-after")
    assert record["code"] == "manifest_invalid"
    assert record["object"] == f"s3://{name}/incoming/p1-a-noun-token/concept.yaml"
    assert _runs(name, "p1-a-noun-token") == []  # rejected before any run or training


def test_a_class_noun_the_tokenizer_reads_as_the_token_is_rejected_after_the_fetch(queue):
    """CLIP's tokenizer lower-cases text, so the class noun "<Noun3> dog" holds the token <noun3>:
    only the model can tell, after the fetch. The dataset is rejected with error.json (no local
    path in it), its MLflow run is closed as rejected, and the pass goes on."""
    ws, name, src = queue
    record = _poison_then_good(ws, name, src, "p2-a-case-noun", {"token": "<noun3>", "class_noun": "<Noun3> dog"},
                               "p2-b-after")
    assert record["code"] == "token_invalid"
    assert record["object"] == f"s3://{name}/incoming/p2-a-case-noun/concept.yaml"
    assert record["message"].startswith(record["object"] + ": ") and str(ws.root) not in record["message"]
    (run,) = _runs(name, "p2-a-case-noun")
    assert run.info.status == "FAILED" and run.data.tags["cns.state"] == "rejected"
    assert run.data.tags["cns.error_code"] == "token_invalid"


def test_an_extreme_aspect_ratio_is_rejected_before_preprocessing(queue):
    """8x4000 is 32,000 pixels, but resizing its short side to 512 would make a 512x256,000 image."""
    from flows.pipeline import watch

    ws, name, src = queue
    poison = make_concept(src, "p3-a-sliver")
    Image.fromarray(np.zeros((4000, 8, 3), dtype=np.uint8)).save(poison / "01.png")
    upload_unchecked(name, poison)
    bucket.drop(s3.client(), name, make_concept(src, "p3-b-after"))
    before = last_version(ws)
    outcomes = watch(str(ws.root))
    assert [(o["concept"], o["outcome"]) for o in outcomes] == [("p3-a-sliver", "rejected"), ("p3-b-after", "learned")]
    assert last_version(ws) == before + 1
    record = _error(name, "p3-a-sliver")
    assert record["code"] == "image_aspect_ratio"
    assert record["object"] == f"s3://{name}/incoming/p3-a-sliver/01.png"


def test_limits_tightened_after_a_concept_was_learned_do_not_stop_learning(queue):
    """`first` has 4 images; max_images 3 applies to new datasets, not to what is learned."""
    from flows.pipeline import watch

    ws, name, src = queue
    original = (ws.root / "params.yaml").read_text()
    set_params(ws, limits={"max_images": 3})
    try:
        bucket.drop(s3.client(), name, make_concept(src, "p4-after-tightening", token=token_for("p4")))
        before = last_version(ws)
        outcomes = watch(str(ws.root))
        assert [(o["concept"], o["outcome"]) for o in outcomes] == [("p4-after-tightening", "learned")]
        assert last_version(ws) == before + 1
    finally:
        (ws.root / "params.yaml").write_text(original)
