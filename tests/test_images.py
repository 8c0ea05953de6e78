"""ear.images: every kind of upload either becomes a loaded RGB image or a one-sentence ValueError."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ear.images import atomic_output, center_crop_resize, load_image, save_image, to_tensor, to_uint8


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _header_only_png(width: int, height: int) -> bytes:
    """A valid PNG header announcing a huge picture, with almost no data: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_sources_path_bytes_and_pil_agree(tmp_path: Path) -> None:
    img = Image.new("RGB", (7, 5), (10, 200, 30))
    path = tmp_path / "a.png"
    img.save(path)
    for source in (path, str(path), path.read_bytes(), img):
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (7, 5)
        assert out.getpixel((3, 2)) == (10, 200, 30)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_on_white(mode: str) -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 0, 255))
    out = load_image(_png_bytes(rgba.convert(mode)))
    assert out.getpixel((3, 3)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 0, 0)


def test_palette_with_transparency_index_is_composited_on_white() -> None:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.info["transparency"] = 1
    out = load_image(_png_bytes(img))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_grey_cmyk_and_16_bit() -> None:
    assert load_image(Image.new("L", (3, 3), 77)).getpixel((0, 0)) == (77, 77, 77)
    cmyk = load_image(Image.new("CMYK", (3, 3), (0, 255, 255, 0)))
    assert cmyk.getpixel((1, 1)) == (255, 0, 0)
    deep = Image.fromarray(np.full((3, 4), 65535 // 2, dtype=np.uint16))
    out = load_image(_png_bytes(deep))
    assert out.size == (4, 3)
    assert abs(out.getpixel((0, 0))[0] - 127) <= 1  # mid-grey, not clipped to white


def test_exif_orientation_is_honoured() -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (20, 40)


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    out = load_image(buf.getvalue())
    r, g, b = out.getpixel((4, 4))
    assert r > 200 and g < 50 and b < 50


def _truncated_png() -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = _png_bytes(Image.fromarray(noise))
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (lambda tmp: tmp / "missing.png", "No image file"),
        (lambda tmp: tmp, "is a folder"),
        (lambda tmp: b"", "empty"),
        (lambda tmp: b"this is not an image", "not an image format"),
        (lambda tmp: _truncated_png(), "truncated or corrupt"),
        (lambda tmp: Image.new("RGB", (0, 5)), "no pixels"),
        (lambda tmp: _header_only_png(7000, 7000), "too large"),  # 49 MP: our own limit
        (lambda tmp: _header_only_png(10000, 10000), "too large"),  # Pillow's bomb warning
        (lambda tmp: _header_only_png(20000, 20000), "too large"),  # Pillow's bomb error
    ],
)
def test_bad_inputs_are_one_sentence_value_errors(tmp_path: Path, make, phrase: str) -> None:
    source = make(tmp_path)
    with pytest.raises(ValueError, match=phrase) as info:
        load_image(source)
    assert "\n" not in str(info.value)


def test_empty_file_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_image(path)


def test_center_crop_resize_keeps_the_centre() -> None:
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 0, 0), (100, 0, 200, 100))  # the central square is red
    out = center_crop_resize(img, 32)
    assert out.size == (32, 32)
    assert np.asarray(out)[:, :, 0].min() > 200


def test_tensor_round_trip() -> None:
    img = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    t = to_tensor(img)
    assert t.shape == (3, 4, 4) and float(t.min()) >= -1 and float(t.max()) <= 1
    assert np.array_equal(to_uint8(t[None])[0], np.asarray(img))


def test_a_written_file_gets_the_permissions_a_plain_write_would(tmp_path: Path) -> None:
    plain = tmp_path / "plain.png"
    plain.write_bytes(b"")
    written = save_image(Image.new("RGB", (4, 4)), tmp_path / "out.png")
    assert written.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_atomic_output_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    save_image(Image.new("RGB", (2, 2)), target)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    with pytest.raises(ValueError, match="does not exist"):
        save_image(Image.new("RGB", (2, 2)), tmp_path / "nope" / "x.png")
    with pytest.raises(ValueError, match="extension"):
        save_image(Image.new("RGB", (2, 2)), tmp_path / "x.unknownext")
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
