"""The bucket contract on a real SeaweedFS: readiness, content hashes and derived states."""

from __future__ import annotations

import shutil

import pytest

from cns.concept import hash_concept_dir
from cns.config import LimitsConfig
from cns.lineage import ConceptRecord, Lineage, read_lineage, write_lineage
from tasks import bucket

from stack_helpers import SAMPLES, make_concept, token_for, write_png

pytestmark = pytest.mark.stack
LIMITS = LimitsConfig()


def one(s3, bucket_name, concept, lineage=None, cache=None) -> bucket.Dataset:
    (dataset,) = bucket.scan(s3, bucket_name, limits=LIMITS, lineage=lineage, cache=cache, concept=concept)
    return dataset


def test_dropped_dataset_is_listed_pending_with_its_content_hash(running_stack, tmp_path, concept_name):
    if (SAMPLES / "dog" / "concept.yaml").is_file():
        source = shutil.copytree(SAMPLES / "dog", tmp_path / concept_name)
        (source / "concept.yaml").write_text(f"name: {concept_name}\ntoken: '<{concept_name[:20]}>'\nclass_noun: dog\n")
    else:
        source = make_concept(tmp_path, concept_name)
    s3 = running_stack.client()
    name, digest = bucket.drop(s3, running_stack.bucket, source)
    dataset = one(s3, running_stack.bucket, name)
    assert (dataset.state, dataset.hash, dataset.hash_kind) == ("pending", hash_concept_dir(source), "content")
    assert digest == dataset.hash


def test_full_scan_lists_every_dataset_sorted(running_stack, tmp_path, concept_name):
    s3 = running_stack.client()
    for suffix in ("b", "a"):
        bucket.drop(s3, running_stack.bucket, make_concept(tmp_path, f"{concept_name}-{suffix}"))
    names = [d.concept for d in bucket.scan(s3, running_stack.bucket, limits=LIMITS, lineage=None)]
    assert names == sorted(names)
    assert {f"{concept_name}-a", f"{concept_name}-b"} <= set(names)


def test_dataset_without_manifest_is_not_ready(running_stack, tmp_path, concept_name):
    source = make_concept(tmp_path, concept_name)
    s3 = running_stack.client()
    for image in sorted(source.glob("*.png")):
        s3.upload_file(str(image), running_stack.bucket, f"incoming/{concept_name}/{image.name}")
    dataset = one(s3, running_stack.bucket, concept_name)
    assert (dataset.ready, dataset.state, dataset.hash) == (False, "incomplete", None)
    assert [d.concept for d in bucket.scan(s3, running_stack.bucket, limits=LIMITS, lineage=None)
            if d.state == "pending" and d.concept == concept_name] == []


def test_same_bytes_dropped_again_give_the_same_hash(running_stack, tmp_path, concept_name):
    source = make_concept(tmp_path, concept_name)
    s3 = running_stack.client()
    bucket.drop(s3, running_stack.bucket, source)
    first = one(s3, running_stack.bucket, concept_name)
    bucket.drop(s3, running_stack.bucket, source)
    again = one(s3, running_stack.bucket, concept_name)
    assert again.hash == first.hash == hash_concept_dir(source)
    assert [o.key for o in again.objects] == [o.key for o in first.objects]


def test_changed_image_gives_a_new_hash(running_stack, tmp_path, concept_name):
    source = make_concept(tmp_path, concept_name)
    s3 = running_stack.client()
    bucket.drop(s3, running_stack.bucket, source)
    before = one(s3, running_stack.bucket, concept_name)
    write_png(source / "01.png", seed=999)
    bucket.drop(s3, running_stack.bucket, source)
    after = one(s3, running_stack.bucket, concept_name)
    assert after.hash != before.hash
    assert after.hash == hash_concept_dir(source)


def test_redrop_removes_images_no_longer_in_the_directory(running_stack, tmp_path, concept_name):
    source = make_concept(tmp_path, concept_name, images=4)
    s3 = running_stack.client()
    bucket.drop(s3, running_stack.bucket, source)
    (source / "03.png").unlink()
    bucket.drop(s3, running_stack.bucket, source)
    dataset = one(s3, running_stack.bucket, concept_name)
    assert sorted(o.key.rsplit("/", 1)[1] for o in dataset.objects) == ["00.png", "01.png", "02.png", "concept.yaml"]
    assert dataset.hash == hash_concept_dir(source)


def test_drop_uploads_the_manifest_last(running_stack, tmp_path, concept_name):
    s3 = running_stack.client()
    puts = []
    s3.meta.events.register("provide-client-params.s3.PutObject", lambda params, **_: puts.append(params["Key"]))
    bucket.drop(s3, running_stack.bucket, make_concept(tmp_path, concept_name))
    assert puts[-1] == f"incoming/{concept_name}/concept.yaml"
    assert len(puts) == 4


def test_learned_state_comes_from_the_lineage(running_stack, tmp_path, concept_name):
    source = make_concept(tmp_path, concept_name)
    s3 = running_stack.client()
    _, digest = bucket.drop(s3, running_stack.bucket, source)
    write_lineage(tmp_path / "model", Lineage(base={"model": "tiny"}, concepts=[ConceptRecord(
        version=1, name=concept_name, token=token_for(concept_name), class_noun="thing", dataset_hash=digest,
        mask="m", delta="d")]))
    assert one(s3, running_stack.bucket, concept_name, lineage=read_lineage(tmp_path / "model")).state == "learned"


def test_rejected_state_comes_from_the_error_record_and_a_fixed_redrop_is_pending(running_stack, tmp_path,
                                                                                  concept_name):
    source = make_concept(tmp_path, concept_name, images=1)
    s3 = running_stack.client()
    bucket.drop(s3, running_stack.bucket, source, check=False)
    concept, key = bucket.validate_or_reject(s3, running_stack.bucket, one(s3, running_stack.bucket, concept_name),
                                             limits=LIMITS, lineage=None)
    assert concept is None and key.startswith(f"rejected/{concept_name}/")
    assert one(s3, running_stack.bucket, concept_name).state == "rejected"
    write_png(source / "01.png", seed=11)
    write_png(source / "02.png", seed=12)
    bucket.drop(s3, running_stack.bucket, source)
    assert one(s3, running_stack.bucket, concept_name).state == "pending"


def test_known_dataset_is_not_read_again(running_stack, tmp_path, concept_name):
    s3 = running_stack.client()
    bucket.drop(s3, running_stack.bucket, make_concept(tmp_path, concept_name))
    gets = []
    s3.meta.events.register("provide-client-params.s3.GetObject", lambda params, **_: gets.append(params["Key"]))
    cache_path = tmp_path / "cache.json"
    first = one(s3, running_stack.bucket, concept_name, cache=bucket.HashCache(cache_path))
    assert len(gets) == 4  # the first scan reads every object once to hash it
    second = one(s3, running_stack.bucket, concept_name, cache=bucket.HashCache(cache_path))
    assert second.hash == first.hash
    assert len(gets) == 4  # the second one only lists


def test_good_dataset_validates_and_writes_no_record(running_stack, tmp_path, concept_name):
    s3 = running_stack.client()
    bucket.drop(s3, running_stack.bucket, make_concept(tmp_path, concept_name, token="<fine1>"))
    concept = bucket.validate(s3, running_stack.bucket, one(s3, running_stack.bucket, concept_name),
                              tmp_path / "work", limits=LIMITS, lineage=None)
    assert (concept.name, concept.token, len(concept.image_paths)) == (concept_name, "<fine1>", 3)
    assert list(bucket.list_objects(s3, running_stack.bucket, f"rejected/{concept_name}/")) == []


def test_full_scan_reads_every_folders_rejection_records(running_stack, tmp_path, concept_name):
    """Regression (issue 10, item 1): a full scan read only the last folder's rejected/ records, so
    every other rejected dataset came back as pending and was fetched and rejected on every pass."""
    s3 = running_stack.client()
    rejected = [f"{concept_name}-a", f"{concept_name}-b"]
    for name in rejected:
        bucket.drop(s3, running_stack.bucket, make_concept(tmp_path, name, images=1), check=False)
        concept, _ = bucket.validate_or_reject(s3, running_stack.bucket, one(s3, running_stack.bucket, name),
                                               limits=LIMITS, lineage=None)
        assert concept is None
    bucket.drop(s3, running_stack.bucket, make_concept(tmp_path, f"{concept_name}-z"))
    states = {d.concept: d.state for d in bucket.scan(s3, running_stack.bucket, limits=LIMITS, lineage=None)}
    assert [states[name] for name in rejected] == ["rejected", "rejected"]
    assert states[f"{concept_name}-z"] == "pending"


def test_a_partial_upload_is_not_ready_until_it_settles(running_stack, tmp_path, concept_name, monkeypatch):
    """Seen with `aws s3 sync` (issue 10, item 6): the manifest arrived before the last image. A
    dataset is ready only once its newest object is CNS_SETTLE_SECONDS old (server clock)."""
    import time

    monkeypatch.setenv("CNS_SETTLE_SECONDS", "4")
    s3 = running_stack.client()
    source = make_concept(tmp_path, concept_name)
    prefix = f"incoming/{concept_name}/"
    for path in ("00.png", "concept.yaml", "01.png"):  # manifest before the last image
        s3.upload_file(str(source / path), running_stack.bucket, prefix + path)
    early = one(s3, running_stack.bucket, concept_name)
    assert (early.ready, early.state) == (False, "settling")
    time.sleep(2)
    s3.upload_file(str(source / "02.png"), running_stack.bucket, prefix + "02.png")
    assert one(s3, running_stack.bucket, concept_name).state == "settling"  # the newest object restarts it
    time.sleep(5)
    settled = one(s3, running_stack.bucket, concept_name)
    assert (settled.state, settled.hash) == ("pending", hash_concept_dir(source))  # all three images
