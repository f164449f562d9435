"""The drop bucket: ``incoming/<concept>/`` datasets, their hashes, states and validation.

Contract (docs/bucket.md): a dataset is the images and ``concept.yaml`` directly under
``incoming/<concept>/``; the manifest is uploaded last and its presence marks the dataset ready.
State is derived from durable records only: *learned* when the dataset's content hash is in the
model lineage, *rejected* when ``rejected/<concept>/<hash>/error.json`` exists, else *pending*.

Hashes are :func:`cns.concept.dataset_hash` over the manifest and image bytes, so a local
directory and its dropped copy agree. Computing one reads every object, so :func:`scan` keeps a
small local cache from the dataset's listing signature (keys, ETags, sizes: any change to an
object changes its ETag) to its hash; a known dataset then costs no read beyond the paginated
listing. The cache only saves work: deleting it costs one re-read of each dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from cns.concept import (IMAGE_SUFFIXES, MANIFEST, MAX_MANIFEST_BYTES, Concept, ConceptError, dataset_hash, load_concept, parse_manifest,
                         read_manifest_text)
from cns.config import LimitsConfig
from cns.lineage import Lineage, check_against_lineage
from tasks.s3 import client_errors, describe_error
from tasks.s3 import list_objects as s3_list_objects

log = logging.getLogger(__name__)

INCOMING = "incoming/"
REJECTED = "rejected/"
ERROR_FILE = "error.json"
# A dataset that changed while it was read gets this record instead: a note, not a rejection, so
# the same bytes coming back are read again (issue 10, item 6).
CHANGED_FILE = "changed.json"
# A dataset is ready once it has concept.yaml AND its newest object is this many seconds old on
# the server's clock: parallel uploaders (`aws s3 sync`) may send the manifest before the last
# image. CNS_SETTLE_SECONDS overrides it (0: ready as soon as the manifest is there).
SETTLE_SECONDS = 10.0
# ... unless the uploader vouches for the folder: `cns drop` (or any tool) sends concept.yaml with
# the S3 metadata `x-amz-meta-cns-files: <images>:<digest of their names and sizes>` (files_claim);
# a folder that holds exactly those images is ready at once, with no settle time.
FILES_METADATA = "cns-files"
MAX_NAME_BYTES = 255
CHUNK = 1 << 20
HASH_THREADS = 8


@dataclass(frozen=True)
class S3Object:
    key: str
    etag: str
    size: int
    last_modified: str = ""  # ISO 8601 from the listing


@dataclass
class Dataset:
    """One ``incoming/<concept>/`` prefix as listed, with its hash and derived state."""

    concept: str
    objects: list[S3Object] = field(default_factory=list)
    hash: str | None = None
    # content: dataset_hash of the bytes; listing: of keys/ETags/sizes, for a dataset whose listing
    # already breaks a rule (odd key, oversized object, too many images), so nothing is downloaded.
    hash_kind: str = "content"
    state: str = "incomplete"  # incomplete (no manifest yet), settling, pending, learned, rejected
    problem: ConceptError | None = None
    # False while the newest object is younger than the settle time and the manifest does not
    # vouch for the folder (set by scan); settles_in: seconds until it is old enough.
    settled: bool = True
    settles_in: float | None = None

    @property
    def has_manifest(self) -> bool:
        return any(_name(self, o) == MANIFEST for o in self.objects)

    @property
    def ready(self) -> bool:
        return self.has_manifest and self.settled

    @property
    def ready_at(self) -> str:
        """When the manifest landed (ISO 8601; "" while not ready): the order datasets are learned in."""
        return next((o.last_modified for o in self.objects if _name(self, o) == MANIFEST), "")

    @property
    def files(self) -> list[S3Object]:
        """The objects that make the dataset: the manifest and the images (others are ignored,
        as in a local concept directory)."""
        return [o for o in self.objects if _counts(_name(self, o))]

    @property
    def signature(self) -> str:
        return dataset_hash({_name(self, o): f"{o.etag}:{o.size}" for o in self.files})


def _name(dataset: Dataset, obj: S3Object) -> str:
    return obj.key[len(INCOMING) + len(dataset.concept) + 1:]


def _counts(name: str) -> bool:
    if "/" in name:  # a sub-folder's object or a folder key ("00.png/"): never part of the dataset
        return False
    return name == MANIFEST or Path(name).suffix.lower() in IMAGE_SUFFIXES


def _uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


# ---- listing -----------------------------------------------------------------------------------

def list_objects(s3, bucket: str, prefix: str, server: dict | None = None):
    """Every object under ``prefix``, one paginated ListObjectsV2 (1,000 keys per request);
    ``server`` receives the server's clock (see :func:`tasks.s3.list_objects`)."""
    try:
        for key, etag, size, modified in s3_list_objects(s3, bucket, prefix, server):
            yield S3Object(key, etag, size, modified)
    except client_errors() as exc:
        raise describe_error(exc, _uri(bucket, prefix)) from None


def _segment_problem(segment: str) -> str | None:
    if segment in ("", ".", ".."):
        return "has an empty, '.' or '..' path segment"
    if any(unicodedata.category(ch).startswith("C") for ch in segment) or "\\" in segment:
        return "contains a control character or a backslash"
    if len(segment.encode()) > MAX_NAME_BYTES:
        return f"has a name longer than {MAX_NAME_BYTES} bytes"
    return None


def listing_problem(dataset: Dataset, bucket: str, limits: LimitsConfig) -> ConceptError | None:
    """The bucket's own rules, checked on the listing alone (no object is read)."""
    problem = _segment_problem(dataset.concept)
    if problem:
        return ConceptError(_uri(bucket, INCOMING + dataset.concept + "/"), f"concept folder name {problem}",
                            "key_invalid")
    for obj in dataset.objects:
        name = _name(dataset, obj)
        if name == "" and obj.size == 0:
            continue  # the concept folder's own marker ("Create folder" in a console)
        if name.endswith("/"):
            # A folder (marker) inside the dataset; S3 servers also list "00.png/" this way, and
            # a download would write it as a file named 00.png.
            return ConceptError(_uri(bucket, obj.key), "key ends in '/' (a folder); images and concept.yaml must "
                                "sit directly under incoming/<concept>/", "key_invalid")
        for segment in name.split("/"):
            problem = _segment_problem(segment)
            if problem:
                return ConceptError(_uri(bucket, obj.key), f"key {problem}", "key_invalid")
        if "/" in name:
            return ConceptError(_uri(bucket, obj.key), "is in a sub-folder; images and concept.yaml must sit "
                                "directly under incoming/<concept>/", "key_invalid")
        if name == MANIFEST and obj.size > MAX_MANIFEST_BYTES:
            return ConceptError(_uri(bucket, obj.key), f"the manifest is {obj.size} bytes, over the limit of "
                                f"{MAX_MANIFEST_BYTES}", "manifest_too_large")
        if obj.size > limits.max_object_bytes:
            return ConceptError(_uri(bucket, obj.key), f"object is {obj.size} bytes, over the limit of "
                                f"{limits.max_object_bytes}", "object_too_large")
    images = len(dataset.files) - (1 if dataset.has_manifest else 0)
    if images > limits.max_images:
        return ConceptError(_uri(bucket, INCOMING + dataset.concept + "/"), f"holds {images} images, over the "
                            f"limit of {limits.max_images}", "too_many_images")
    return None


def settle_seconds() -> float:
    """``CNS_SETTLE_SECONDS`` or :data:`SETTLE_SECONDS`."""
    text = os.environ.get("CNS_SETTLE_SECONDS", "").strip()
    if not text:
        return SETTLE_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ConceptError("CNS_SETTLE_SECONDS", f"{text!r} is not a number of seconds >= 0", "config_invalid")
    return value


def _settles_in(dataset: Dataset, now: datetime, settle: float) -> float:
    """Seconds until the newest object is ``settle`` old (<= 0: settled)."""
    if not settle or not any(o.last_modified for o in dataset.objects):
        return 0.0
    return settle - (now - max(_modified(o) for o in dataset.objects)).total_seconds()


def _modified(obj: S3Object) -> datetime:
    return datetime.fromisoformat(obj.last_modified.replace("Z", "+00:00")) if obj.last_modified \
        else datetime.min.replace(tzinfo=timezone.utc)


def files_claim(sizes: dict[str, int]) -> str:
    """The ``cns-files`` metadata value for a folder of images {name: bytes} (manifest excluded)."""
    lines = "".join(f"{name}\t{size}\n" for name, size in sorted(sizes.items()))
    return f"{len(sizes)}:{hashlib.sha256(lines.encode()).hexdigest()[:32]}"


def _vouched(s3, bucket: str, dataset: Dataset) -> bool:
    """The manifest came after every image, and its ``cns-files`` metadata names exactly the images
    listed (one HEAD). The order matters: an old vouching manifest does not vouch for images
    replaced after it by others of the same size (a re-upload that keeps the manifest)."""
    files = [o for o in dataset.files if _name(dataset, o) != MANIFEST]
    manifest = next(o for o in dataset.files if _name(dataset, o) == MANIFEST)
    if any(_modified(o) > _modified(manifest) for o in files):
        return False
    images = {_name(dataset, o): o.size for o in files}
    try:
        head = s3.head_object(Bucket=bucket, Key=f"{INCOMING}{dataset.concept}/{MANIFEST}")
    except client_errors():
        return False  # replaced or removed since the listing: the next scan looks again
    return head.get("Metadata", {}).get(FILES_METADATA) == files_claim(images)


def rejected_keys(s3, bucket: str, concept: str | None = None) -> set[tuple[str, str]]:
    """(record folder, hash) of every ``rejected/<concept>/<hash>/error.json`` (of one concept)."""
    found = set()
    for obj in list_objects(s3, bucket, REJECTED + (record_folder(concept) + "/" if concept else "")):
        parts = obj.key[len(REJECTED):].split("/")
        if len(parts) == 3 and parts[2] == ERROR_FILE:
            found.add((parts[0], parts[1]))
    return found


def record_folder(concept: str) -> str:
    """The concept's folder under ``rejected/`` (quoted, so an odd concept name stays one segment)."""
    folder = quote(concept, safe="-_.~@+=,")
    return folder.replace(".", "%2E") if folder in (".", "..") else folder


def error_key(concept: str, digest: str) -> str:
    return f"{REJECTED}{record_folder(concept)}/{digest}/{ERROR_FILE}"


class HashCache:
    """``{listing signature: content hash}`` in a local JSON file (None = no cache)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, str] = {}
        self.dirty = False
        if self.path and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text()).get("hashes", {})
            except (ValueError, AttributeError):
                log.warning("%s: unreadable hash cache, starting a new one", self.path)

    def get(self, signature: str) -> str | None:
        return self.entries.get(signature)

    def put(self, signature: str, digest: str) -> None:
        self.entries[signature] = digest
        self.dirty = True

    def save(self, keep: set[str]) -> None:
        """Write the entries still in the bucket (atomically); forget the rest."""
        if not self.path or not (self.dirty or set(self.entries) - keep):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"hashes": {k: v for k, v in self.entries.items() if k in keep}}))
        os.replace(tmp, self.path)


def default_cache_path(s3, bucket: str) -> Path:
    """``$CNS_STACK_DIR/cache/bucket-<id>.json`` (else ``$XDG_CACHE_HOME/cns-pipeline/``, default
    ``~/.cache``), one file per endpoint and bucket: never in the workspace or the current directory."""
    ident = hashlib.sha256(f"{s3.meta.endpoint_url}|{bucket}".encode()).hexdigest()[:12]
    if os.environ.get("CNS_STACK_DIR"):
        return Path(os.environ["CNS_STACK_DIR"]) / "cache" / f"bucket-{ident}.json"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "cns-pipeline" / f"bucket-{ident}.json"


def scan(s3, bucket: str, *, limits: LimitsConfig, lineage: Lineage | None,
         cache: HashCache | None = None, concept: str | None = None) -> list[Dataset]:
    """Every dataset under ``incoming/`` (or only ``incoming/<concept>/``) with its hash and state,
    sorted by concept.

    Costs: one paginated listing of ``incoming/`` and one of ``rejected/``, one HEAD of the manifest
    of each dataset younger than the settle time; object reads only for
    ready datasets whose listing signature is not in the cache.
    """
    cache = cache or HashCache(None)
    datasets: dict[str, Dataset] = {}
    server: dict = {}
    for obj in list_objects(s3, bucket, INCOMING + (concept + "/" if concept else ""), server):
        # ``folder``, not ``concept``: the parameter decides below whether rejected/ is read whole.
        folder, sep, _ = obj.key[len(INCOMING):].partition("/")
        if not sep:
            log.debug("%s: not inside a concept folder, ignored", _uri(bucket, obj.key))
            continue
        datasets.setdefault(folder, Dataset(folder)).objects.append(obj)
    rejected = rejected_keys(s3, bucket, concept)
    learned = lineage.dataset_hashes if lineage else set()
    now, settle = server.get("date") or datetime.now(timezone.utc), settle_seconds()
    for dataset in datasets.values():
        wait = _settles_in(dataset, now, settle)
        dataset.settled = wait <= 0 or (dataset.has_manifest and _vouched(s3, bucket, dataset))
        if dataset.has_manifest and not dataset.settled:
            dataset.state, dataset.settles_in = "settling", wait
    ready = [d for d in datasets.values() if d.ready]
    signatures = {d.concept: d.signature for d in ready}
    learned_names = {c.name for c in lineage.concepts} if lineage else set()
    unknown = []
    for dataset in ready:
        dataset.problem = listing_problem(dataset, bucket, limits)
        # A learned dataset may break limits tightened since (too many images, an object over
        # the size limit): its content hash, not the listing rules, says whether it is learned.
        maybe_learned = dataset.concept in learned_names and dataset.problem is not None \
            and dataset.problem.code != "key_invalid"
        if dataset.problem and not maybe_learned:
            dataset.hash, dataset.hash_kind = signatures[dataset.concept], "listing"
        else:
            dataset.hash = cache.get(signatures[dataset.concept])
            if dataset.hash is None:
                unknown.append(dataset)
    with ThreadPoolExecutor(HASH_THREADS) as pool:  # reading new datasets is I/O: overlap it
        for dataset, digest in zip(unknown, pool.map(lambda d: _try_content_hash(s3, bucket, d), unknown)):
            dataset.hash = digest
            if digest is not None:
                cache.put(signatures[dataset.concept], digest)
    for dataset in ready:
        if dataset.hash is None:
            continue  # changed while being hashed: still "incomplete", the next scan reads it again
        if dataset.hash in learned:
            dataset.state, dataset.problem = "learned", None
        elif (record_folder(dataset.concept), dataset.hash) in rejected:
            dataset.state = "rejected"
        else:
            dataset.state = "pending"
    if concept is None:  # a full scan knows which entries are gone
        cache.save({signatures[d.concept] for d in ready if d.hash_kind == "content"})
    else:
        cache.save(set(cache.entries))
    return [datasets[c] for c in sorted(datasets)]


# ---- reading -----------------------------------------------------------------------------------

def _read_object(s3, bucket: str, obj: S3Object, sink) -> str:
    """Stream one object into ``sink`` (None: hash only); returns its sha256. The ETag must still
    be the listed one (If-Match), so a dataset changed since the listing is noticed."""
    try:
        resp = s3.get_object(Bucket=bucket, Key=obj.key, IfMatch=f'"{obj.etag}"')
    except client_errors() as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "412", "NoSuchKey", "404"):
            raise ConceptError(_uri(bucket, obj.key), "changed or removed while the dataset was being read "
                               f"({code}); it will be read again once the upload settles",
                               "dataset_changed") from None
        raise describe_error(exc, _uri(bucket, obj.key)) from None
    digest, size = hashlib.sha256(), 0
    for chunk in resp["Body"].iter_chunks(CHUNK):
        size += len(chunk)
        if size > obj.size:
            raise ConceptError(_uri(bucket, obj.key), f"grew past its listed size of {obj.size} bytes while "
                               "being read", "dataset_changed")
        digest.update(chunk)
        if sink is not None:
            sink.write(chunk)
    return digest.hexdigest()


def content_hash(s3, bucket: str, dataset: Dataset) -> str:
    return dataset_hash({_name(dataset, o): _read_object(s3, bucket, o, None) for o in dataset.files})


def _try_content_hash(s3, bucket: str, dataset: Dataset) -> str | None:
    try:
        return content_hash(s3, bucket, dataset)
    except ConceptError as exc:
        if exc.code != "dataset_changed":
            raise
        log.info("%s", exc)
        return None


def download(s3, bucket: str, dataset: Dataset, dest: Path) -> Path:
    """Copy the dataset's files into ``dest/<concept>/``; raises dataset_changed when the bytes or
    the listing differ from what was listed."""
    local = dest / dataset.concept
    if _segment_problem(dataset.concept) or "/" in dataset.concept:
        raise ConceptError(_uri(bucket, f"{INCOMING}{dataset.concept}/"), "concept folder name is not one plain "
                           "name", "key_invalid")
    for obj in dataset.objects:  # the listing rules already refuse these; never write outside ``local``
        name = _name(dataset, obj)
        if name and ("/" in name or _segment_problem(name)):
            raise ConceptError(_uri(bucket, obj.key), "key is not one plain file name directly under "
                               f"incoming/{dataset.concept}/", "key_invalid")
    local.mkdir(parents=True)
    digests = {}
    for obj in dataset.files:
        with open(local / _name(dataset, obj), "wb") as sink:
            digests[_name(dataset, obj)] = _read_object(s3, bucket, obj, sink)
    where = _uri(bucket, f"{INCOMING}{dataset.concept}/")
    if dataset.hash_kind == "content" and dataset.hash and dataset_hash(digests) != dataset.hash:
        raise ConceptError(where, "content differs from the hash it was listed with", "dataset_changed")
    now = Dataset(dataset.concept, list(list_objects(s3, bucket, f"{INCOMING}{dataset.concept}/")))
    if now.signature != dataset.signature:
        raise ConceptError(where, "objects were added, removed or replaced while the dataset was being read; "
                           "it will be read again once the upload settles", "dataset_changed")
    return local


# ---- validation --------------------------------------------------------------------------------

def validate(s3, bucket: str, dataset: Dataset, workdir: Path, *, limits: LimitsConfig,
             lineage: Lineage | None) -> Concept:
    """Check a listed dataset before any training: the bucket's rules, then the library's rules
    (:func:`cns.concept.load_concept` on a downloaded copy in ``workdir``), then the lineage.
    Raises a ConceptError whose path is the offending ``s3://`` object."""
    if not dataset.has_manifest:
        raise ConceptError(_uri(bucket, f"{INCOMING}{dataset.concept}/{MANIFEST}"), "missing: the dataset is not "
                           "ready until concept.yaml is uploaded (last)", "manifest_missing")
    if dataset.problem:
        raise dataset.problem
    local = download(s3, bucket, dataset, Path(workdir))
    prefix = _uri(bucket, f"{INCOMING}{dataset.concept}")
    try:
        concept = load_concept(local, limits)
        if concept.name != dataset.concept:
            # The folder is where the dataset's state, rejections and re-drops live: one name.
            raise ConceptError(f"{prefix}/{MANIFEST}", f"name {concept.name!r} differs from its folder "
                               f"incoming/{dataset.concept}/; drop it under incoming/{concept.name}/ or remove "
                               "'name'", "manifest_invalid")
        check_against_lineage(concept, lineage, f"{prefix}/{MANIFEST}")
    except ConceptError as exc:
        path = exc.path.replace(str(local), prefix, 1) if exc.path.startswith(str(local)) else exc.path
        # Messages name bucket objects, never the local copy.
        raise ConceptError(path, exc.message.replace(str(local), prefix), exc.code) from None
    return concept


def reject(s3, bucket: str, dataset: Dataset, error: ConceptError) -> str:
    """Write ``rejected/<concept>/<hash>/error.json``; nothing under ``incoming/`` is touched.

    A ``dataset_changed`` error is written as ``changed.json`` instead: a record of what
    happened, not a rejection, so the dataset stays pending and is read again once it settles."""
    key = error_key(dataset.concept, dataset.hash or dataset.signature)
    if error.code == "dataset_changed":
        key = key[: -len(ERROR_FILE)] + CHANGED_FILE
    record = {"code": error.code, "message": str(error), "object": error.path, "concept": dataset.concept,
              "dataset_hash": dataset.hash, "hash_kind": dataset.hash_kind,
              "rejected_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "objects": [{"key": o.key, "etag": o.etag, "size": o.size} for o in dataset.objects],
              "next_step": "fix the dataset and drop it again (cns drop DIR); a changed dataset gets a new "
                           "hash and is picked up as pending"}
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(record, indent=2).encode(),
                      ContentType="application/json")
    except client_errors() as exc:
        raise describe_error(exc, _uri(bucket, key)) from None
    if error.code == "dataset_changed":
        log.info("%s changed while being read; it is read again once it settles: %s",
                 _uri(bucket, f"{INCOMING}{dataset.concept}/"), error)
    else:
        log.warning("rejected %s: %s", _uri(bucket, f"{INCOMING}{dataset.concept}/"), error)
    return key


def validate_or_reject(s3, bucket: str, dataset: Dataset, *, limits: LimitsConfig,
                       lineage: Lineage | None) -> tuple[Concept | None, str | None]:
    """(concept, None) for a good dataset, or (None, error.json key) after recording the rejection.

    The concept's images live in a temporary copy that is removed on return; callers that train
    use :func:`validate` with their own working directory instead.
    """
    with tempfile.TemporaryDirectory(prefix="cns-validate-") as tmp:
        try:
            return validate(s3, bucket, dataset, Path(tmp), limits=limits, lineage=lineage), None
        except ConceptError as exc:
            return None, reject(s3, bucket, dataset, exc)


def read_error(s3, bucket: str, dataset: Dataset) -> dict:
    """The rejection record of a dataset in state ``rejected``."""
    key = error_key(dataset.concept, dataset.hash)
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except client_errors() as exc:
        raise describe_error(exc, _uri(bucket, key)) from None


# ---- dropping ----------------------------------------------------------------------------------

def drop(s3, bucket: str, directory: str | Path, *, limits: LimitsConfig | None = None,
         check: bool = True) -> tuple[str, str]:
    """Upload a local concept directory to ``incoming/<name>/``: images first, ``concept.yaml``
    last. A previous drop of the same concept is replaced (its manifest is removed first, so the
    dataset is never ready with a mix of old and new files). Returns (name, content hash)."""
    from cns.concept import hash_concept_dir

    directory = Path(directory)
    manifest = directory / MANIFEST
    if check:
        name = load_concept(directory, limits).name
    elif manifest.is_file():
        name = parse_manifest(read_manifest_text(manifest), manifest, directory.name)["name"]
    else:
        name = directory.name
    if not manifest.is_file():
        raise ConceptError(manifest, "missing: a dataset becomes ready when its concept.yaml arrives",
                           "manifest_missing")
    files = sorted(p for p in directory.iterdir() if p.is_file() and _counts(p.name) and p.name != MANIFEST)
    prefix = f"{INCOMING}{name}/"
    old = {o.key for o in list_objects(s3, bucket, prefix)}
    try:
        if prefix + MANIFEST in old:
            s3.delete_object(Bucket=bucket, Key=prefix + MANIFEST)
        for path in files:
            s3.upload_file(str(path), bucket, prefix + path.name)
        for key in sorted(old - {prefix + p.name for p in files} - {prefix + MANIFEST}):
            s3.delete_object(Bucket=bucket, Key=key)
        # vouches for the folder: ready at once, no settle time (FILES_METADATA)
        claim = files_claim({p.name: p.stat().st_size for p in files})
        s3.upload_file(str(manifest), bucket, prefix + MANIFEST, ExtraArgs={"Metadata": {FILES_METADATA: claim}})
    except client_errors() as exc:
        raise describe_error(exc, _uri(bucket, prefix)) from None
    return name, hash_concept_dir(directory)


# ---- removal requests ---------------------------------------------------------------------------

FORGET = "forget/"


def removal_requests(s3, bucket: str) -> list[tuple[str, str]]:
    """(concept name, key) of every removal request ``forget/<concept>`` (an object of any
    content), oldest first. Keys deeper than ``forget/<concept>`` are not requests and are ignored."""
    requests = []
    for obj in sorted(list_objects(s3, bucket, FORGET), key=lambda o: (o.last_modified, o.key)):
        name = obj.key[len(FORGET):]
        if not name or "/" in name:
            log.debug("%s: not a removal request (forget/<concept>), ignored", _uri(bucket, obj.key))
            continue
        requests.append((name, obj.key))
    return requests


def close_removal_request(s3, bucket: str, key: str) -> None:
    """Delete a handled request: done once the removal is a version (or the name is unknown)."""
    try:
        s3.delete_object(Bucket=bucket, Key=key)
    except client_errors() as exc:
        raise describe_error(exc, _uri(bucket, key)) from None
