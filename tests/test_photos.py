"""Real photos are accepted and normalised the way a viewer shows them (issue 10, item 9):
multi-picture JPEGs (first frame), EXIF orientation, 16-bit PNGs, alpha on white; a manifest
that is not UTF-8 is a one-line error naming it."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cns.concept import ConceptError, load_concept


def concept_dir(tmp_path: Path, special: str, save) -> Path:
    """Two plain PNGs, one special image written by ``save(path)``, and a manifest."""
    directory = tmp_path / "photos"
    directory.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (10 * i, 20, 30)).save(directory / f"0{i}.png")
    save(directory / special)
    (directory / "concept.yaml").write_text(yaml.safe_dump({"token": "<ph1>", "class_noun": "dog"}))
    return directory


def load_special(directory: Path, special: str) -> Image.Image:
    concept = load_concept(directory)
    (path,) = [p for p in concept.image_paths if p.name == special]
    (image,) = concept.load_images((path,))
    assert image.mode == "RGB"
    return image


def png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG (grey: (h, w); RGB: (h, w, 3)), written by hand: Pillow cannot write 16-bit RGB."""
    colour = 2 if pixels.ndim == 3 else 0
    h, w = pixels.shape[:2]
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_a_multi_picture_jpeg_is_accepted_as_its_first_frame(tmp_path):
    def save(path):
        first, second = Image.new("RGB", (40, 30), (250, 0, 0)), Image.new("RGB", (40, 30), (0, 0, 250))
        first.save(path, "MPO", save_all=True, append_images=[second])

    directory = concept_dir(tmp_path, "02.jpg", save)
    with Image.open(directory / "02.jpg") as im:
        assert im.format == "MPO"  # what phones write: the test file is really one
    red, green, blue = load_special(directory, "02.jpg").getpixel((20, 15))
    assert red > 200 and blue < 50


def test_exif_orientation_is_applied(tmp_path):
    def save(path):
        stored = Image.new("RGB", (40, 20), (0, 0, 250))
        stored.paste((250, 0, 0), (0, 0, 20, 20))  # left half red as stored
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to display", as a phone held upright writes
        stored.save(path, "JPEG", exif=exif, quality=95)

    image = load_special(concept_dir(tmp_path, "02.jpg", save), "02.jpg")
    assert image.size == (20, 40)
    assert image.getpixel((10, 5))[0] > 200  # the stored left half is on top once displayed upright
    assert image.getpixel((10, 35))[2] > 200


def test_a_16_bit_grey_png_is_scaled_not_clipped_to_white(tmp_path):
    directory = concept_dir(tmp_path, "02.png", lambda p: png16(p, np.full((32, 32), 32768, dtype=np.uint16)))
    with Image.open(directory / "02.png") as im:
        assert im.mode.startswith("I")
    assert load_special(directory, "02.png").getpixel((5, 5)) == (128, 128, 128)


def test_a_16_bit_rgb_png_keeps_its_colour(tmp_path):
    pixels = np.zeros((32, 32, 3), dtype=np.uint16)
    pixels[..., 0], pixels[..., 2] = 65535, 16384
    image = load_special(concept_dir(tmp_path, "02.png", lambda p: png16(p, pixels)), "02.png")
    assert image.getpixel((5, 5)) == (255, 0, 64)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_composited_on_white(tmp_path, mode):
    def save(path):
        rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent black ...
        rgba.paste((0, 0, 0, 255), (0, 0, 16, 32))  # ... beside opaque black
        rgba.convert(mode).save(path) if mode != "P" else rgba.quantize(2).save(path, transparency=0)

    directory = concept_dir(tmp_path, "02.png", save)
    image = load_special(directory, "02.png")
    assert image.getpixel((24, 16)) == (255, 255, 255)
    assert image.getpixel((4, 16)) == (0, 0, 0)


def test_half_transparent_pixels_blend_with_white(tmp_path):
    image = load_special(concept_dir(tmp_path, "02.png", lambda p: Image.new("RGBA", (32, 32), (0, 0, 0, 128))
                                     .save(p)), "02.png")
    assert all(abs(v - 127) <= 1 for v in image.getpixel((3, 3)))


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_a_manifest_that_is_not_utf8_is_a_one_line_error_naming_it(tmp_path, encoding):
    directory = concept_dir(tmp_path, "02.png", lambda p: Image.new("RGB", (32, 32)).save(p))
    (directory / "concept.yaml").write_bytes("token: <ph1>\nclass_noun: café\n".encode(encoding))
    with pytest.raises(ConceptError) as caught:
        load_concept(directory)
    assert caught.value.code == "manifest_invalid"
    assert caught.value.path == str(directory / "concept.yaml")
    assert "UTF-8" in caught.value.message and "\n" not in str(caught.value)


def test_a_utf8_manifest_with_a_byte_order_mark_is_read(tmp_path):
    directory = concept_dir(tmp_path, "02.png", lambda p: Image.new("RGB", (32, 32)).save(p))
    (directory / "concept.yaml").write_bytes("token: <ph1>\nclass_noun: café\n".encode("utf-8-sig"))
    assert load_concept(directory).class_noun == "café"


def test_an_unreadable_image_error_holds_no_local_path(tmp_path):
    directory = concept_dir(tmp_path, "02.png", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n not a png"))
    with pytest.raises(ConceptError) as caught:
        load_concept(directory)
    assert caught.value.code == "image_unreadable"
    assert caught.value.path == str(directory / "02.png")
    assert str(tmp_path) not in caught.value.message
