"""A concept directory: images (jpg, png, webp) and ``concept.yaml`` (name, token, class noun,
optional prompts, optional per-image captions). Everything is validated before any training, and every problem is a
:class:`ConceptError` whose ``code`` is machine-readable and whose message names the file."""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageOps, UnidentifiedImageError

from cns.config import LimitsConfig
from cns.errors import CNSError

MANIFEST = "concept.yaml"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MANIFEST_KEYS = {"name", "token", "class_noun", "prompts", "captions"}
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
TOKEN_RE = re.compile(r"^<[A-Za-z0-9_-]{1,32}>$")
# MPO: the multi-picture JPEG many phones write (a JPEG with extra frames); its first frame is used.
IMAGE_FORMATS = {"JPEG", "MPO", "PNG", "WEBP"}
# Training resizes the short side to the resolution (cns.diffusion.preprocess) before the centre
# crop, so an 8x4000 sliver at 512 would become a 512x256,000 image (hundreds of MB per image,
# tens of GB for a file near the pixel limit). 10:1 keeps any photo or panorama a camera makes.
MAX_ASPECT_RATIO = 10
# Manifest bounds: prompts and captions are stored in the lineage, and every later concept
# re-encodes the earlier concepts' prompts (L_reg's output term), so an unbounded manifest costs
# every learn after it (150,000 prompts once took the next learn to 23 GB). CLIP reads 77 tokens,
# about 300 characters of English: longer text is cut, possibly before the token.
MAX_MANIFEST_BYTES = 65_536
MAX_PROMPTS = 64
MAX_TEXT_CHARS = 300  # one prompt or one caption
MAX_CLASS_NOUN_CHARS = 64
# The limits a dataset that is already learned is read back under (evaluation): limits tightened
# later apply to new datasets only, never to what the model already holds (issue 10, item 2).
NO_INTAKE_LIMITS = LimitsConfig(min_images=1, max_images=10**6, max_image_pixels=10**12, max_object_bytes=2**62)


class ConceptError(CNSError):
    code = "concept_invalid"


@dataclass(frozen=True)
class Concept:
    name: str
    token: str
    class_noun: str
    image_paths: tuple[Path, ...]
    prompts: tuple[str, ...] = field(default=())
    directory: Path | None = None
    # image file name -> its caption (each holds the token); trains each image with its own caption.
    captions: dict[str, str] = field(default_factory=dict)

    def captions_for(self, paths: tuple[Path, ...]) -> list[str] | None:
        """Each image's caption, in order; None when the manifest gives no captions."""
        return [self.captions[p.name] for p in paths] if self.captions else None

    def training_prompts(self, template: str) -> list[str]:
        """The manifest's prompts, or the template filled with this concept's token and class."""
        if self.prompts:
            return list(self.prompts)
        return [template.format(token=self.token, class_noun=self.class_noun)]

    def load_images(self, paths: tuple[Path, ...] | None = None) -> list[Image.Image]:
        return [_open_rgb(p) for p in (self.image_paths if paths is None else paths)]

    def split(self, holdout: int, min_train: int) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
        """(training images, held-out images): the last ``holdout`` by file name are held out,
        none when that would leave fewer than ``min_train`` to train on."""
        n = holdout if len(self.image_paths) - holdout >= max(1, min_train) else 0
        cut = len(self.image_paths) - n
        return self.image_paths[:cut], self.image_paths[cut:]


def _too_large(source: str | Path, what: str, size: int, limit: int, unit: str = "characters") -> ConceptError:
    return ConceptError(source, f"{what} is {size} {unit}, over the limit of {limit}", "manifest_too_large")


def parse_manifest(text: str, source: str | Path, default_name: str) -> dict:
    """Parse and check ``concept.yaml`` text; returns name, token, class_noun, prompts."""
    if len(text.encode()) > MAX_MANIFEST_BYTES:
        raise _too_large(source, "the manifest", len(text.encode()), MAX_MANIFEST_BYTES, "bytes")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConceptError(source, f"not valid YAML ({str(exc).splitlines()[0]})", "manifest_invalid") from None
    if not isinstance(data, dict):
        raise ConceptError(source, "must be a mapping with token and class_noun", "manifest_invalid")
    unknown = sorted(set(data) - MANIFEST_KEYS)
    if unknown:
        raise ConceptError(source, f"unknown key '{unknown[0]}' (allowed: {', '.join(sorted(MANIFEST_KEYS))})",
                           "manifest_unknown_key")
    for key in ("token", "class_noun"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ConceptError(source, f"'{key}' is missing or not a string", "manifest_invalid")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConceptError(source, f"name {name!r} must match {NAME_RE.pattern} (lower case, digits, - and _)",
                           "manifest_invalid")
    token = data["token"].strip()
    if not TOKEN_RE.match(token):
        raise ConceptError(source, f"token {token!r} must look like <name1>: '<', 1-32 letters, digits, - or _, '>'",
                           "token_invalid")
    if len(data["class_noun"].strip()) > MAX_CLASS_NOUN_CHARS:
        raise _too_large(source, "class_noun", len(data["class_noun"].strip()), MAX_CLASS_NOUN_CHARS)
    if token in data["class_noun"]:
        # The token would initialise itself and appear twice in every prompt.
        raise ConceptError(source, f"class_noun {data['class_noun'].strip()!r} contains the token {token}; the "
                           "class noun is the plain word for what the concept is (e.g. dog)", "manifest_invalid")
    prompts = data.get("prompts") or []
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ConceptError(source, "'prompts' must be a list of strings", "manifest_invalid")
    if len(prompts) > MAX_PROMPTS:
        raise ConceptError(source, f"holds {len(prompts)} prompts, over the limit of {MAX_PROMPTS}",
                           "manifest_too_large")
    for i, prompt in enumerate(prompts, 1):
        if len(prompt) > MAX_TEXT_CHARS:
            raise _too_large(source, f"prompt {i}", len(prompt), MAX_TEXT_CHARS)
        if token not in prompt:
            raise ConceptError(source, f"prompt {prompt!r} does not contain the token {token}", "manifest_invalid")
    captions = data.get("captions") or {}
    if not isinstance(captions, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in captions.items()):
        raise ConceptError(source, "'captions' must map image file names to caption strings", "manifest_invalid")
    for image, caption in captions.items():
        if len(caption) > MAX_TEXT_CHARS:
            raise _too_large(source, f"the caption of {image}", len(caption), MAX_TEXT_CHARS)
        if token not in caption:
            raise ConceptError(source, f"caption of {image} ({caption!r}) does not contain the token {token}",
                               "manifest_invalid")
    return {"name": name, "token": token, "class_noun": data["class_noun"].strip(), "prompts": tuple(prompts),
            "captions": dict(captions)}


def check_image(path: Path, limits: LimitsConfig) -> tuple[int, int]:
    """Fully decode an image file; returns its size or raises a ConceptError naming it."""
    if path.stat().st_size > limits.max_object_bytes:
        raise ConceptError(path, f"file is {path.stat().st_size} bytes, over the limit of {limits.max_object_bytes}",
                           "image_too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.format not in IMAGE_FORMATS:
                    raise ConceptError(path, f"is {im.format}, not JPEG, PNG or WebP", "image_unreadable")
                im.seek(0)  # the frame that trains (multi-picture JPEG, animated PNG/WebP)
                width, height = im.size
                if width * height > limits.max_image_pixels:
                    raise ConceptError(path, f"image is {width}x{height} = {width * height} pixels, over the limit "
                                             f"of {limits.max_image_pixels}", "image_too_large")
                if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                    raise ConceptError(path, f"image is {width}x{height}, more than {MAX_ASPECT_RATIO}:1; crop it "
                                       "closer to square", "image_aspect_ratio")
                im.load()  # decodes every byte: truncated files fail here, not during training
    except ConceptError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ConceptError(path, f"image is too large ({exc})", "image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow's text may hold the file's full path; the error's path names it already.
        reason = str(exc).replace(str(path), path.name).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConceptError(path, f"not a readable image ({reason})", "image_unreadable") from None
    if min(width, height) < 8:
        raise ConceptError(path, f"image is {width}x{height}, too small to train on", "image_unreadable")
    return width, height


def load_concept(directory: str | Path, limits: LimitsConfig | None = None) -> Concept:
    """Read and validate a concept directory (manifest and every image, fully decoded)."""
    limits = limits or LimitsConfig()
    directory = Path(directory)
    if not directory.is_dir():
        raise ConceptError(directory, "is not a directory", "concept_missing")
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise ConceptError(manifest, "missing: a concept directory needs concept.yaml (token, class_noun)",
                           "manifest_missing")
    fields = parse_manifest(read_manifest_text(manifest), manifest, directory.name)
    images = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ConceptError(directory, "holds no images (jpg, png or webp)", "no_images")
    if len(images) > limits.max_images:
        raise ConceptError(directory, f"holds {len(images)} images, over the limit of {limits.max_images}",
                           "too_many_images")
    if len(images) < limits.min_images:
        raise ConceptError(directory, f"holds {len(images)} images, fewer than the minimum of {limits.min_images}",
                           "too_few_images")
    for path in images:
        check_image(path, limits)
    if fields["captions"]:
        names = {p.name for p in images}
        missing = sorted(names - set(fields["captions"]))
        extra = sorted(set(fields["captions"]) - names)
        if missing or extra:
            problem = f"no caption for image {missing[0]}" if missing else f"caption for a missing image {extra[0]}"
            raise ConceptError(manifest, f"{problem}: 'captions' must name every image exactly", "manifest_invalid")
    return Concept(image_paths=tuple(images), directory=directory, **fields)


def read_manifest_text(path: Path) -> str:
    """The manifest as text: UTF-8 (a byte-order mark is allowed), anything else is an error
    rather than text with replacement characters in the token or class noun."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConceptError(path, f"is not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                           "save it as UTF-8", "manifest_invalid") from None


def _open_rgb(path: Path) -> Image.Image:
    """The image as a viewer shows it, in 8-bit RGB: first frame, EXIF orientation applied,
    16-bit samples scaled (not clipped), transparency composited on white."""
    with Image.open(path) as im:
        im.seek(0)
        return to_rgb(ImageOps.exif_transpose(im))


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I"):  # 16-bit grey PNG ("I;16", "I"): 0..65535 -> 0..255
        scaled = np.asarray(im, dtype=np.float64) * (255 / 65535)
        im = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB")
    return im.convert("RGB")


def dataset_hash(file_digests: dict[str, str]) -> str:
    """Content hash of a dataset from {file name: sha256 hex of its bytes} (manifest and images).

    The same bytes under the same names give the same hash wherever they live (a local directory
    or ``incoming/<concept>/`` in the bucket); a changed byte or a renamed file gives a new one.
    """
    lines = "".join(f"{name}\0{digest}\n" for name, digest in sorted(file_digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def hash_concept_dir(directory: str | Path) -> str:
    """:func:`dataset_hash` of a local concept directory (its manifest and image files)."""
    directory = Path(directory)
    digests = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and (path.name == MANIFEST or path.suffix.lower() in IMAGE_SUFFIXES):
            digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return dataset_hash(digests)
