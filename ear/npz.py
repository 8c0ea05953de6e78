"""The npz files of evaluation: what `np.savez(path, images, labels)` writes and the ImageNet
evaluator (openai/guided-diffusion evaluations/evaluator.py) streams: arr_0 uint8 N x H x W x 3,
arr_1 the labels, stored uncompressed. Fifty thousand 256 x 256 images are about 10 GB, so they
are written chunk by chunk and read back memory-mapped, never held in memory at once.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ear.images import atomic_output


def write_npz(path: Path, chunks: Iterable[np.ndarray], shape: tuple[int, ...], labels: np.ndarray) -> Path:
    """Stream the images into `path` as arr_0 (uint8 N x H x W x 3) plus arr_1 (int64 labels),
    the layout `np.savez(path, images, labels)` gives and the ImageNet evaluator reads, without
    holding all N images in memory; checked for count and shape before it takes the final name."""
    with atomic_output(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                        "shape": shape})
                for images in chunks:
                    f.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
            with zf.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(f, labels)
        check_npz(tmp, shape, labels)
    return path


def check_npz(path: Path, shape: tuple[int, ...], labels: np.ndarray) -> None:
    """The file holds exactly `shape` uint8 images and these labels (the images are mapped, not
    read, so checking 50,000 of them costs nothing)."""
    try:
        images, got_labels = npz_array(path, "arr_0"), npz_array(path, "arr_1")
        if images.shape != shape or images.dtype != np.uint8 or not np.array_equal(got_labels, labels):
            raise ValueError(f"it has {images.shape} {images.dtype} images and {len(got_labels)} labels")
    except ValueError as err:
        raise ValueError(f"the assembled npz does not hold the planned {shape} uint8 images and "
                         f"{len(labels)} labels ({err}); nothing was written.") from None


def npz_array(path: Path, name: str) -> np.ndarray:
    """One array of an npz without reading it all: memory-mapped when the member is stored
    uncompressed (np.savez and write_npz do that; a 50,000-image file is ~10 GB), else loaded."""
    fmt = np.lib.format
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(f"{name}.npy")
            if info.compress_type != zipfile.ZIP_STORED:
                with np.load(path) as data:
                    return data[name]
        with open(path, "rb") as f:  # the member's data follow its 30-byte local header, name and extra
            f.seek(info.header_offset)
            local = f.read(30)
            start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") \
                + int.from_bytes(local[28:30], "little")
            f.seek(start)
            read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
            shape, fortran, dtype = read_header[fmt.read_magic(f)](f)
            offset = f.tell()
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"'{path}' is not an npz holding {name} ({err}).") from None
    if offset - start + math.prod(shape) * dtype.itemsize != info.file_size:
        raise ValueError(f"{name} in '{path}' is truncated or padded: its size does not match {shape}.")
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype, "r", offset, shape, order="F" if fortran else "C")
