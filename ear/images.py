"""Turning whatever a user hands us into a plain RGB picture, and pictures into files safely.

Uploads come from browsers, phones and scanners: rotated JPEGs, transparent PNGs, palette GIFs,
16-bit greyscale, CMYK, truncated downloads, and the occasional decompression bomb. Everything
below `load_image` either returns a fully decoded RGB image or raises a ValueError whose message
is one sentence a user can act on.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000  # far above any photo we need, far below what would exhaust memory
ImageSource = str | os.PathLike | bytes | bytearray | Image.Image


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode `source` (a path, raw file bytes or a PIL image) into a loaded RGB image."""
    return _load(source, max_pixels, _to_rgb)


def _load(source: ImageSource, max_pixels: int, finish: Callable[[Image.Image], Any]) -> Any:
    """Decode `source` safely and hand the loaded, upright first frame to `finish`."""
    if isinstance(source, Image.Image):
        return _normalise(source, "the image", max_pixels, finish)
    if isinstance(source, bytes | bytearray):
        if not source:
            raise ValueError("The uploaded image is empty (0 bytes).")
        return _decode(io.BytesIO(source), "the uploaded image", max_pixels, finish)
    path = Path(source)
    label = f"'{path}'"
    if path.is_dir():
        raise ValueError(f"{label} is a folder, not an image file.")
    if not path.is_file():
        raise ValueError(f"No image file at {label}.")
    if path.stat().st_size == 0:
        raise ValueError(f"The image file {label} is empty (0 bytes).")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"The image file {label} cannot be read ({err.strerror}).") from None
    return _decode(io.BytesIO(data), f"the image file {label}", max_pixels, finish)


def _sentence(label: str) -> str:
    """Capitalise the first letter only: str.capitalize() would lowercase the file's name."""
    return label[:1].upper() + label[1:]


def _decode(stream: io.BytesIO, label: str, max_pixels: int, finish: Callable[[Image.Image], Any]) -> Any:
    """Open (header only), check the pixel budget, then decode the first frame."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(stream)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError(f"{_sentence(label)} is too large to open safely "
                             f"(limit {max_pixels / 1e6:.0f} megapixels).") from None
        except UnidentifiedImageError:
            raise ValueError(f"{_sentence(label)} is not an image format we can read "
                             "(try PNG, JPEG, WebP or GIF).") from None
        except OSError as err:
            raise ValueError(f"{_sentence(label)} cannot be read ({err}).") from None
        with img:
            return _normalise(img, label, max_pixels, finish)


def _normalise(img: Image.Image, label: str, max_pixels: int, finish: Callable[[Image.Image], Any]) -> Any:
    """Size checks before decoding, then first frame, EXIF rotation and `finish` (to RGB)."""
    width, height = img.size
    if width == 0 or height == 0:
        raise ValueError(f"{_sentence(label)} has no pixels ({width}x{height}).")
    if width * height > max_pixels:
        raise ValueError(f"{_sentence(label)} is too large ({width}x{height} = "
                         f"{width * height / 1e6:.0f} megapixels; the limit is "
                         f"{max_pixels / 1e6:.0f}).")
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        return finish(img)
    except (OSError, SyntaxError, ValueError, EOFError, KeyError, TypeError, struct.error) as err:
        # Pillow reports damaged data through many exception types (struct.error from headers).
        raise ValueError(f"{_sentence(label)} is truncated or corrupt ({err}).") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on white, deep greys scaled to 8 bits."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _deep_grey_to_l(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img.copy()


def _deep_grey_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit, keeping the full tonal range."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0
    elif img.mode == "F" and arr.size and arr.max() <= 1.0:
        arr = arr * 255.0
    elif arr.size and arr.max() > 255:  # mode "I" holding 16-bit data (how Pillow opens some PNGs)
        arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def load_mask(source: ImageSource | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A mask painted on a picture of `size` (width, height) -> (height, width) uint8, 255 where
    painted: where it is opaque if it has transparency (a brush layer), else where it is light.
    A mask of another size is refused: it would not line up with the picture."""
    if not isinstance(source, np.ndarray):
        return _sized(_load(source, MAX_PIXELS, _painted), size)
    array = source
    if array.ndim == 3 and array.shape[2] in (3, 4):
        alpha = array[..., 3] if array.shape[2] == 4 else None
        array = alpha if alpha is not None and (alpha < alpha.max(initial=0)).any() else array[..., :3].max(2)
    if array.ndim != 2:
        raise ValueError(f"A mask is a picture or a 2-D array, got an array of shape {array.shape}.")
    light = array > 0 if array.dtype == np.bool_ else array > (0.5 if array.dtype.kind == "f" else 127)
    return _sized(np.where(light, 255, 0).astype(np.uint8), size)


def _painted(img: Image.Image) -> np.ndarray:
    """Opaque pixels of a picture with transparency, else light ones: 255 where painted."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        alpha = np.asarray(img.convert("RGBA"))[..., 3]
        if (alpha < 255).any():
            return np.where(alpha > 0, 255, 0).astype(np.uint8)
    grey = np.asarray(_to_rgb(img).convert("L"))
    return np.where(grey > 127, 255, 0).astype(np.uint8)


def _sized(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = mask.shape
    if (width, height) != tuple(size):
        raise ValueError(f"The mask is {width}x{height} pixels but the picture is {size[0]}x{size[1]}: "
                         "paint the mask on the picture itself.")
    return mask


def center_crop_resize(img: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Largest centred crop with the target's aspect ratio, resized with Lanczos (no distortion)."""
    target = (size, size) if isinstance(size, int) else size
    if min(target) < 1:
        raise ValueError(f"target size must be positive, got {target}")
    return ImageOps.fit(img, target, Image.Resampling.LANCZOS)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1], the tokenizers' input range."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, on the CPU."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def _file_mode() -> int:
    """What a plain `open(path, "w")` would give a new file here (0o666 under the umask): the
    temporary file `atomic_output` renames into place is created 0o600, readable only by us."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()  # read once, at import: the umask is process-wide and rarely changes


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` with the same suffix; rename it into place only when
    the block succeeds, so a crash or bad input never leaves a half-written file behind. The file
    gets the permissions a plain write would (`FILE_MODE`)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"Cannot write '{path}': the folder '{path.parent}' does not exist.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(FILE_MODE)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def save_image(img: Image.Image, path: str | os.PathLike) -> Path:
    """Write one image atomically; the format follows the suffix (.png, .jpg, .webp ...)."""
    path = Path(path)
    with atomic_output(path) as tmp:
        try:
            img.save(tmp)
        except (ValueError, KeyError) as err:
            raise ValueError(f"Cannot save an image as '{path.name}': unknown or unsupported "
                             f"file extension ({err}).") from None
    return path
