"""Validation before training: each kind of bad dataset gets its error code in
rejected/<concept>/<hash>/error.json, and nothing else changes (incoming objects, lineage)."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import pytest

from cns.config import LimitsConfig
from cns.lineage import LINEAGE, ConceptRecord, Lineage, read_lineage, write_lineage
from tasks import bucket

from stack_helpers import make_concept, write_png

pytestmark = pytest.mark.stack
# Small limits so the too-many / too-large cases need only a few small files.
LIMITS = LimitsConfig(min_images=2, max_images=4, max_image_pixels=100 * 100, max_object_bytes=200_000)
TAKEN_NAME, TAKEN_TOKEN = "taken-concept", "<taken1>"


def upload_raw(s3, bucket_name, directory, concept, extra: dict[str, bytes] | None = None):
    """Upload as any S3 tool would (no checks): files, extra keys, then the manifest if present."""
    prefix = f"incoming/{concept}/"
    for path in sorted(directory.iterdir()):
        if path.name != "concept.yaml":
            s3.upload_file(str(path), bucket_name, prefix + path.name)
    for name, body in (extra or {}).items():
        s3.put_object(Bucket=bucket_name, Key=prefix + name, Body=body)
    if (directory / "concept.yaml").exists():
        s3.upload_file(str(directory / "concept.yaml"), bucket_name, prefix + "concept.yaml")


def build(kind: str, tmp_path, concept: str):
    """(local directory, extra raw keys) for one kind of bad dataset."""
    extra = {}
    manifest = None
    images = 3
    if kind == "manifest_invalid":
        manifest = "token: [unclosed\n"
    elif kind == "manifest_unknown_key":
        manifest = {"token": "<ok1>", "class_noun": "dog", "colour": "red"}
    elif kind == "token_invalid":
        manifest = {"token": "dog1", "class_noun": "dog"}
    elif kind == "no_images":
        images = 0
        extra = {"notes.txt": b"not an image"}
    elif kind == "too_few_images":
        images = 1
    elif kind == "too_many_images":
        images = LIMITS.max_images + 1
    elif kind == "image_unreadable":
        extra = {"99.png": b"\x89PNG\r\n\x1a\n this is not really a png"}
    elif kind == "image_too_large":  # pixels over max_image_pixels (a small file)
        pass
    elif kind == "object_too_large":
        extra = {"98.png": b"\0" * (LIMITS.max_object_bytes + 1)}
    elif kind == "key_in_subfolder":
        extra = {"nested/04.png": b"whatever"}
    elif kind == "key_with_control_character":
        extra = {"bad\x01name.png": b"whatever"}
    elif kind == "key_ending_in_slash":  # listed as a 0-byte "folder" that looks like an image
        extra = {"07.png/": b""}
    elif kind == "key_ending_in_slash_with_a_body":  # SeaweedFS keeps it as a folder (listed with size 0)
        extra = {"08.png/": b"not a folder"}
    elif kind == "subfolder_marker":
        extra = {"more/": b""}
    elif kind == "name_differs_from_folder":
        manifest = {"name": "some-other-name", "token": "<other1>", "class_noun": "dog"}
    elif kind == "manifest_not_utf8":
        manifest = "token: <caf1>\nclass_noun: caf\xe9\n"  # written as latin-1 below
    elif kind == "too_many_prompts":
        manifest = {"token": "<many1>", "class_noun": "dog", "prompts": [f"a <many1> dog, {i}" for i in range(65)]}
    elif kind == "manifest_over_64_kb":  # refused on the listing's size alone
        manifest = "token: <big1>\nclass_noun: dog\n" + "# padding\n" * 8000
    elif kind == "token_taken":
        manifest = {"token": TAKEN_TOKEN, "class_noun": "dog"}
    elif kind == "name_taken":
        manifest = {"name": TAKEN_NAME, "token": "<fresh1>", "class_noun": "dog"}
    elif kind == "zero_byte_image":
        extra = {"05.png": b""}
    elif kind == "truncated_png":  # a real PNG cut off half way (an interrupted upload)
        extra = {"05.png": png_bytes(size=48)[:1500]}
    elif kind == "image_1x1":
        extra = {"05.png": png_bytes(size=1)}
    elif kind == "svg_named_png":
        extra = {"05.png": b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" '
                           b'height="64" fill="red"/></svg>'}
    elif kind == "html_named_jpg":  # what a browser's "save as" can give
        extra = {"05.jpg": b"<!DOCTYPE html><html><body><img src='photo.jpg'></body></html>"}
    elif kind == "gif_animation_named_png":
        extra = {"05.png": gif_animation_bytes()}
    elif kind == "manifest_yaml_list":
        manifest = "- token: <list1>\n- class_noun: dog\n"
    elif kind == "manifest_empty":
        manifest = ""
    elif kind == "token_not_a_string":
        manifest = {"token": 12345, "class_noun": "dog"}
    elif kind == "class_noun_empty":
        manifest = {"token": "<empty1>", "class_noun": "  "}
    elif kind == "prompt_without_token":
        manifest = {"token": "<prompt1>", "class_noun": "dog", "prompts": ["a photo of a dog"]}
    elif kind == "caption_for_a_missing_image":
        manifest = {"token": "<cap1>", "class_noun": "dog", "captions": {"99.png": "a <cap1> dog"}}
    elif kind == "non_ascii_folder_name":  # a concept name is lower-case ASCII; the folder gives the default
        manifest = {"token": "<cafe1>", "class_noun": "dog"}
    directory = make_concept(tmp_path, concept, images=images, manifest=manifest)
    if kind == "image_too_large":
        write_png(directory / "00.png", seed=5, size=120)
    if kind == "manifest_not_utf8":
        (directory / "concept.yaml").write_bytes(manifest.encode("latin-1"))
    if kind == "name_taken":  # the folder must carry the taken name too, or the name default differs
        directory = directory.rename(directory.parent / TAKEN_NAME)
    if kind == "non_ascii_folder_name":
        directory = directory.rename(directory.parent / f"{concept}-caf\u00e9")
    return directory, extra


def png_bytes(size: int, seed: int = 3) -> bytes:
    path = write_png(Path(tempfile.mkdtemp()) / "image.png", seed, size=size)
    return path.read_bytes()


def gif_animation_bytes() -> bytes:
    from PIL import Image

    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "green", "blue")]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


CASES = {  # kind -> expected code
    "manifest_invalid": "manifest_invalid",
    "manifest_unknown_key": "manifest_unknown_key",
    "token_invalid": "token_invalid",
    "no_images": "no_images",
    "too_few_images": "too_few_images",
    "too_many_images": "too_many_images",
    "image_unreadable": "image_unreadable",
    "image_too_large": "image_too_large",
    "object_too_large": "object_too_large",
    "key_in_subfolder": "key_invalid",
    "key_with_control_character": "key_invalid",
    "key_ending_in_slash": "key_invalid",
    "key_ending_in_slash_with_a_body": "key_invalid",
    "subfolder_marker": "key_invalid",
    "name_differs_from_folder": "manifest_invalid",
    "manifest_not_utf8": "manifest_invalid",
    "too_many_prompts": "manifest_too_large",
    "manifest_over_64_kb": "manifest_too_large",
    "token_taken": "token_taken",
    "name_taken": "name_taken",
    "zero_byte_image": "image_unreadable",
    "truncated_png": "image_unreadable",
    "image_1x1": "image_unreadable",
    "svg_named_png": "image_unreadable",
    "html_named_jpg": "image_unreadable",
    "gif_animation_named_png": "image_unreadable",
    "manifest_yaml_list": "manifest_invalid",
    "manifest_empty": "manifest_invalid",
    "token_not_a_string": "manifest_invalid",
    "class_noun_empty": "manifest_invalid",
    "prompt_without_token": "manifest_invalid",
    "caption_for_a_missing_image": "manifest_invalid",
    "non_ascii_folder_name": "manifest_invalid",
}


@pytest.fixture
def model_dir(tmp_path):
    """A model whose lineage already holds one concept (for the collision cases)."""
    directory = tmp_path / "model"
    write_lineage(directory, Lineage(base={"model": "tiny"}, concepts=[ConceptRecord(
        version=1, name=TAKEN_NAME, token=TAKEN_TOKEN, class_noun="dog", dataset_hash="0" * 64,
        mask="taken/mask.safetensors", delta="taken/delta.safetensors")]))
    return directory


def snapshot(s3, bucket_name):
    return {o.key: (o.etag, o.size) for o in bucket.list_objects(s3, bucket_name, "")}


def reject_and_check(s3, bucket_name, dataset, model_dir, expected_code):
    """Validate; assert exactly one new object (the error record) and an untouched lineage."""
    lineage_before = (model_dir / LINEAGE).read_bytes()
    before = snapshot(s3, bucket_name)
    concept, key = bucket.validate_or_reject(s3, bucket_name, dataset, limits=LIMITS,
                                             lineage=read_lineage(model_dir))
    assert concept is None
    after = snapshot(s3, bucket_name)
    assert set(after) - set(before) == {key}
    assert {k: v for k, v in after.items() if k != key} == before
    assert (model_dir / LINEAGE).read_bytes() == lineage_before
    assert key == bucket.error_key(dataset.concept, dataset.hash)  # rejected/<concept, quoted>/<hash>/error.json
    record = json.loads(s3.get_object(Bucket=bucket_name, Key=key)["Body"].read())
    assert record["code"] == expected_code
    assert record["object"].startswith(f"s3://{bucket_name}/incoming/{dataset.concept}")
    assert record["message"].startswith(record["object"] + ": ")
    assert tempfile.gettempdir() + "/" not in record["message"]  # no local path, only the bucket's
    assert "\n" not in record["message"]
    return record


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_dataset_gets_its_error_code_and_changes_nothing(running_stack, tmp_path, concept_name, model_dir,
                                                             kind):
    s3, name = running_stack.client(), running_stack.bucket
    directory, extra = build(kind, tmp_path, concept_name)
    concept = directory.name  # the folder's name: the concept's, or the taken or non-ASCII one
    if kind == "name_taken":  # other tests may not reuse the folder: clear what an earlier run left
        for key in snapshot(s3, name):
            if key.startswith(f"incoming/{TAKEN_NAME}/") or key.startswith(f"rejected/{TAKEN_NAME}/"):
                s3.delete_object(Bucket=name, Key=key)
    upload_raw(s3, name, directory, concept, extra)
    (dataset,) = bucket.scan(s3, name, limits=LIMITS, lineage=read_lineage(model_dir), concept=concept)
    assert dataset.state == "pending"
    reject_and_check(s3, name, dataset, model_dir, CASES[kind])
    (again,) = bucket.scan(s3, name, limits=LIMITS, lineage=read_lineage(model_dir), concept=concept)
    assert (again.state, again.hash) == ("rejected", dataset.hash)


def changed_and_check(s3, bucket_name, dataset, model_dir):
    """Validate a dataset that changes while read: dataset_changed is noted in changed.json, not
    error.json, so the dataset is never rejected for it; nothing else changes."""
    lineage_before = (model_dir / LINEAGE).read_bytes()
    before = snapshot(s3, bucket_name)
    concept, key = bucket.validate_or_reject(s3, bucket_name, dataset, limits=LIMITS,
                                             lineage=read_lineage(model_dir))
    assert concept is None
    after = snapshot(s3, bucket_name)
    assert key == f"rejected/{dataset.concept}/{dataset.hash}/changed.json"
    assert set(after) - set(before) == {key} and (model_dir / LINEAGE).read_bytes() == lineage_before
    record = json.loads(s3.get_object(Bucket=bucket_name, Key=key)["Body"].read())
    assert record["code"] == "dataset_changed" and record["message"].startswith(record["object"] + ": ")
    return record


def test_dataset_changed_while_being_read_is_read_again_later(running_stack, tmp_path, concept_name, model_dir):
    s3, name = running_stack.client(), running_stack.bucket
    directory = make_concept(tmp_path, concept_name)
    upload_raw(s3, name, directory, concept_name)
    (listed,) = bucket.scan(s3, name, limits=LIMITS, lineage=None, concept=concept_name)
    # another upload replaces an image after the listing the validation works from
    write_png(directory / "01.png", seed=77)
    s3.upload_file(str(directory / "01.png"), name, f"incoming/{concept_name}/01.png")
    record = changed_and_check(s3, name, listed, model_dir)
    assert record["object"] == f"s3://{name}/incoming/{concept_name}/01.png"
    (now,) = bucket.scan(s3, name, limits=LIMITS, lineage=None, concept=concept_name)
    assert now.hash != listed.hash and now.state == "pending"  # the settled upload is read again


def test_the_same_bytes_back_after_a_change_are_pending_not_rejected(running_stack, tmp_path, concept_name,
                                                                     model_dir):
    """Regression (issue 10, item 6): a transient dataset_changed became a permanent rejection of
    the dataset's hash, so when the upload settled on the same bytes they were never learned."""
    s3, name = running_stack.client(), running_stack.bucket
    directory = make_concept(tmp_path, concept_name)
    upload_raw(s3, name, directory, concept_name)
    (listed,) = bucket.scan(s3, name, limits=LIMITS, lineage=None, concept=concept_name)
    s3.put_object(Bucket=name, Key=f"incoming/{concept_name}/01.png", Body=b"half an upload")
    bucket.validate_or_reject(s3, name, listed, limits=LIMITS, lineage=None)
    s3.upload_file(str(directory / "01.png"), name, f"incoming/{concept_name}/01.png")  # the same bytes again
    (again,) = bucket.scan(s3, name, limits=LIMITS, lineage=None, concept=concept_name)
    assert (again.hash, again.state) == (listed.hash, "pending")


def test_object_added_while_being_read_is_read_again_later(running_stack, tmp_path, concept_name, model_dir):
    s3, name = running_stack.client(), running_stack.bucket
    directory = make_concept(tmp_path, concept_name)
    upload_raw(s3, name, directory, concept_name)
    (listed,) = bucket.scan(s3, name, limits=LIMITS, lineage=None, concept=concept_name)
    s3.upload_file(str(write_png(tmp_path / "late.png", seed=8)), name, f"incoming/{concept_name}/late.png")
    record = changed_and_check(s3, name, listed, model_dir)
    assert record["object"] == f"s3://{name}/incoming/{concept_name}/"


def test_error_record_names_the_offending_object(running_stack, tmp_path, concept_name, model_dir):
    s3, name = running_stack.client(), running_stack.bucket
    directory, extra = build("image_unreadable", tmp_path, concept_name)
    upload_raw(s3, name, directory, concept_name, extra)
    (dataset,) = bucket.scan(s3, name, limits=LIMITS, lineage=None, concept=concept_name)
    record = reject_and_check(s3, name, dataset, model_dir, "image_unreadable")
    assert record["object"] == f"s3://{name}/incoming/{concept_name}/99.png"
    assert "not a readable image" in record["message"]


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_key_ending_in_slash_is_rejected_before_any_file_is_written(running_stack, tmp_path, concept_name,
                                                                    model_dir):
    """Regression (issue 10, item 3): ``03.png/`` was skipped as a folder marker by the listing
    rules but downloaded as a file ``03.png`` (on a server that also holds ``03.png``, over it)."""
    s3, name = running_stack.client(), running_stack.bucket
    directory = make_concept(tmp_path / "src", concept_name)
    upload_raw(s3, name, directory, concept_name, {"03.png/": b""})
    (dataset,) = bucket.scan(s3, name, limits=LIMITS, lineage=None, concept=concept_name)
    work = tmp_path / "work" / "inner"
    work.mkdir(parents=True)
    with pytest.raises(bucket.ConceptError) as caught:
        bucket.validate(s3, name, dataset, work, limits=LIMITS, lineage=None)
    assert caught.value.code == "key_invalid"
    assert caught.value.path == f"s3://{name}/incoming/{concept_name}/03.png/"
    assert files_under(tmp_path / "work") == ["inner"]


def test_dot_dot_keys_are_refused_by_the_server(running_stack, concept_name):
    """SeaweedFS refuses '.' and '..' segments on upload, so no such key can enter this bucket."""
    s3, name = running_stack.client(), running_stack.bucket
    for key in (f"incoming/{concept_name}/../escape.png", f"incoming/{concept_name}/a/../../escape.png/",
                f"incoming/{concept_name}/./00.png"):
        with pytest.raises(bucket.client_errors()):
            s3.put_object(Bucket=name, Key=key, Body=b"x")
    assert list(bucket.list_objects(s3, name, f"incoming/{concept_name}/")) == []


def test_a_name_over_255_bytes_is_refused_by_the_server_and_by_the_listing_rules(running_stack, tmp_path,
                                                                                concept_name):
    """SeaweedFS refuses a 256-byte file name on upload; a server that takes it (AWS keys may be
    1,024 bytes) gets the dataset rejected from its listing (no name longer than a file name on disk)."""
    s3, name = running_stack.client(), running_stack.bucket
    long_name = "k" * 252 + ".png"
    with pytest.raises(bucket.client_errors()):
        s3.put_object(Bucket=name, Key=f"incoming/{concept_name}/{long_name}", Body=png_bytes(size=16))
    upload_raw(s3, name, make_concept(tmp_path / "src", concept_name), concept_name)
    (dataset,) = bucket.scan(s3, name, limits=LIMITS, lineage=None, concept=concept_name)
    dataset.objects.append(bucket.S3Object(f"incoming/{concept_name}/{long_name}", dataset.objects[0].etag, 16))
    problem = bucket.listing_problem(dataset, name, LIMITS)
    assert problem.code == "key_invalid" and "longer than 255 bytes" in problem.message


@pytest.mark.parametrize("odd_key", ["../../escape.png", "../../escape.png/", "a/../../escape.png/", "./00.png"])
def test_a_listing_with_dot_dot_keys_is_rejected_and_nothing_escapes(running_stack, tmp_path, concept_name,
                                                                     model_dir, odd_key):
    """Other S3 servers (AWS) accept '..' in keys: the listing rules reject them before any read.
    The listing is the real one of a good dataset plus the key such a server would list."""
    s3, name = running_stack.client(), running_stack.bucket
    upload_raw(s3, name, make_concept(tmp_path / "src", concept_name), concept_name)
    (dataset,) = bucket.scan(s3, name, limits=LIMITS, lineage=None, concept=concept_name)
    dataset.objects.append(bucket.S3Object(f"incoming/{concept_name}/{odd_key}", dataset.objects[0].etag, 0))
    dataset.problem = bucket.listing_problem(dataset, name, LIMITS)
    dataset.hash, dataset.hash_kind = dataset.signature, "listing"
    work = tmp_path / "work" / "inner"
    work.mkdir(parents=True)
    with pytest.raises(bucket.ConceptError) as caught:
        bucket.validate(s3, name, dataset, work, limits=LIMITS, lineage=None)
    assert caught.value.code == "key_invalid"
    assert files_under(tmp_path / "work") == ["inner"]
    # and the download itself refuses a key that is not one plain file name
    dataset.problem = None
    with pytest.raises(bucket.ConceptError) as caught:
        bucket.download(s3, name, dataset, work)
    assert caught.value.code == "key_invalid"
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "work" / "escape.png").exists()


def test_phone_photos_validate(running_stack, tmp_path, concept_name):
    """A multi-picture JPEG with an EXIF orientation, a 16-bit PNG and a transparent PNG, as phones
    and editors write them, pass the bucket's validation."""
    import numpy as np
    from PIL import Image

    s3, name = running_stack.client(), running_stack.bucket
    directory = make_concept(tmp_path, concept_name, images=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 30), (200, 0, 0)).save(directory / "00.jpg", "MPO", save_all=True, exif=exif,
                                                 append_images=[Image.new("RGB", (40, 30))])
    Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)).save(directory / "01.png")
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(directory / "02.png")
    upload_raw(s3, name, directory, concept_name)
    (dataset,) = bucket.scan(s3, name, limits=LIMITS, lineage=None, concept=concept_name)
    concept = bucket.validate(s3, name, dataset, tmp_path / "work", limits=LIMITS, lineage=None)
    images = concept.load_images()
    assert [im.size for im in images] == [(30, 40), (32, 32), (32, 32)]
    assert images[1].getpixel((0, 0)) == (156, 156, 156) and images[2].getpixel((0, 0)) == (255, 255, 255)
