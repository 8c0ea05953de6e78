"""Training data for the embedded model: open-licence emoji sets, or any labelled image folder.

Sources
- npm packages `emoji-datasource-twitter` (Twemoji, CC-BY 4.0) and `emoji-datasource-google`
  (Noto Emoji, Apache-2.0), fetched with `npm pack` (the registry is reachable, GitHub is not) or
  given as already unpacked folders. The Apple and Facebook sets are never read: their images are
  not openly licensed.
- A generic folder `root/<class>/*.png|jpg|...` (one sub-folder per class).

Class set (emoji): one class per Unicode subcategory holding at least `min_class_size` distinct
emoji; smaller subcategories are merged into "<Category> (other)", and a merged class that is still
too small is dropped. Counting distinct emoji (not images) keeps skin-tone variants from deciding
the class set. "Component" (bare skin-tone swatches) is always dropped. Skin tones: every emoji's
default drawing plus its uniform-tone variants (one tone for all people in it, at most 5); the
mixed-tone combinations (up to 25 per couple/family emoji) would otherwise swamp the data with
near-duplicates.

Held-out split: decided by a hash of the emoji's base code point sequence (or of the file's path in
a folder), so the Twemoji and Noto drawings and all skin tones of one emoji land on the same side:
held-out numbers measure generalisation to unseen emoji, not to another artist's copy.

The prepared dataset is cached as one compressed uint8 .npz so later runs load in about a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ALLOWED_SETS = ("twitter", "google")  # never "apple" / "facebook" (not openly licensed)
NPM_PACKAGES = {s: f"emoji-datasource-{s}" for s in ALLOWED_SETS}
DEFAULT_CACHE = Path.home() / ".cache" / "ear-studio" / "emoji"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
DROPPED_CATEGORIES = ("Component",)

LICENCES = {
    "twitter": ("Twemoji graphics Copyright 2019 Twitter, Inc (X Corp.) and other contributors, "
                "maintained at https://github.com/jdecked/twemoji, licensed under CC-BY 4.0 "
                "(https://creativecommons.org/licenses/by/4.0/)."),
    "google": ("Noto Emoji graphics Copyright Google LLC, https://github.com/googlefonts/noto-emoji, "
               "licensed under the Apache License 2.0 (https://www.apache.org/licenses/LICENSE-2.0)."),
}
METADATA_LICENCE = ("Emoji metadata (names, categories) from emoji-datasource by Cal Henderson "
                    "(https://github.com/iamcal/emoji-data), MIT License.")


@dataclass
class ImageDataset:
    """Class-labelled 64x64 RGB images held in memory as uint8."""

    images: np.ndarray  # (N, S, S, 3) uint8, composited on white
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    sources: np.ndarray  # (N,) str: "twitter", "google" or "folder"
    keys: np.ndarray  # (N,) str: what the image depicts (shared by the sets' drawings of it)
    heldout: np.ndarray  # (N,) bool

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask: np.ndarray) -> ImageDataset:
        return ImageDataset(self.images[mask], self.labels[mask], self.class_names, self.sources[mask],
                            self.keys[mask], self.heldout[mask])

    def split(self, heldout: bool) -> ImageDataset:
        """The training (False) or held-out (True) part."""
        return self.subset(self.heldout == heldout)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, images=self.images, labels=self.labels,
                            class_names=np.array(self.class_names), sources=self.sources, keys=self.keys,
                            heldout=self.heldout)
        tmp.replace(path)  # atomic: a crashed run never leaves a half-written cache
        return path

    @classmethod
    def load(cls, path: Path) -> ImageDataset:
        with np.load(path) as z:
            return cls(z["images"], z["labels"].astype(np.int64), [str(c) for c in z["class_names"]],
                       z["sources"], z["keys"], z["heldout"].astype(bool))


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic across machines and Python runs (unlike hash())."""
    return (zlib.crc32(key.encode()) % 10_000) < fraction * 10_000


def load_rgb(path: Path, size: int) -> np.ndarray:
    """Any mode -> RGB uint8 (size, size, 3) with transparency composited on white."""
    with Image.open(path) as im:
        im = im.convert("RGBA")
        canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
        canvas.alpha_composite(im)
        rgb = canvas.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


def fetch_npm_package(name: str, cache_dir: Path) -> Path:
    """`npm pack` the package into cache_dir once and unpack what we need; returns the package dir."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / name
    if (target / "emoji.json").is_file():
        return target
    tarballs = sorted(cache_dir.glob(f"{name}-*.tgz"))
    if not tarballs:
        try:
            result = subprocess.run(["npm", "pack", name, "--json", "--pack-destination", str(cache_dir)],
                                    check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise RuntimeError(f"could not fetch {name} with npm pack: {e}") from e
        tarballs = [cache_dir / json.loads(result.stdout)[0]["filename"]]
    wanted = ("package/emoji.json", "package/LICENSE", "package/package.json", "package/img/")
    tmp = cache_dir / f".{name}.partial"
    with tarfile.open(tarballs[-1]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(wanted)
                   and ("/img/" not in m.name or "/64/" in m.name)]
        tar.extractall(tmp, members=members, filter="data")
    (tmp / "package").replace(target)
    tmp.rmdir()
    return target


Record = tuple[str, str, str, str, Path]  # set, category, subcategory, key, image path


def emoji_records(package_dir: Path) -> list[Record]:
    """(set, category, subcategory, key, image path) for every image of an allowed set present."""
    entries = json.loads((package_dir / "emoji.json").read_text())
    img_root = package_dir / "img"
    sets = [s for s in ALLOWED_SETS if (img_root / s / "64").is_dir()]
    records = []
    for s in sets:
        folder = img_root / s / "64"
        for e in entries:
            if e["category"] in DROPPED_CATEGORIES:
                continue
            tones = e.get("skin_variations", {})
            variants = [e, *(v for t, v in tones.items() if len(set(t.split("-"))) == 1)]
            for v in variants:
                path = folder / v["image"]
                if v.get(f"has_img_{s}", True) and path.is_file():
                    records.append((s, e["category"], e["subcategory"], e["unified"], path))
    return records


def choose_classes(records: list[Record], min_class_size: int) -> dict[tuple[str, str], str]:
    """(category, subcategory) -> class name, following the merge rule in the module docstring."""
    sub_counts = Counter((cat, sub) for cat, sub, _ in {(r[1], r[2], r[3]) for r in records})
    mapping = {k: k[1] if n >= min_class_size else f"{k[0]} (other)" for k, n in sub_counts.items()}
    class_counts = Counter()
    for k, n in sub_counts.items():
        class_counts[mapping[k]] += n
    return {k: name for k, name in mapping.items() if class_counts[name] >= min_class_size}


def build_emoji_dataset(package_dirs: list[Path], image_size: int = 64, min_class_size: int = 20,
                        heldout_fraction: float = 0.05) -> ImageDataset:
    records = [r for d in package_dirs for r in emoji_records(d)]
    if not records:
        raise ValueError(f"no twitter/google emoji images found under {package_dirs}")
    mapping = choose_classes(records, min_class_size)
    records = [r for r in records if (r[1], r[2]) in mapping]
    class_names = sorted(set(mapping.values()))
    index = {c: i for i, c in enumerate(class_names)}
    return ImageDataset(
        images=np.stack([load_rgb(r[4], image_size) for r in records]),
        labels=np.array([index[mapping[(r[1], r[2])]] for r in records], dtype=np.int64),
        class_names=class_names,
        sources=np.array([r[0] for r in records]),
        keys=np.array([r[3] for r in records]),
        heldout=np.array([is_heldout(r[3], heldout_fraction) for r in records]),
    )


def build_folder_dataset(root: Path, image_size: int = 64, heldout_fraction: float = 0.05) -> ImageDataset:
    """root/<class>/<image>: class names are the sorted sub-folder names."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    files = [(i, f) for i, d in enumerate(class_dirs) for f in sorted(d.iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"no images found in class sub-folders of {root}")
    keys = [f.relative_to(root).as_posix() for _, f in files]
    return ImageDataset(
        images=np.stack([load_rgb(f, image_size) for _, f in files]),
        labels=np.array([i for i, _ in files], dtype=np.int64),
        class_names=[d.name for d in class_dirs],
        sources=np.array(["folder"] * len(files)),
        keys=np.array(keys),
        heldout=np.array([is_heldout(k, heldout_fraction) for k in keys]),
    )


def load_dataset(source: str | Path = "emoji", cache_dir: Path | None = None, image_size: int = 64,
                 min_class_size: int = 20, heldout_fraction: float = 0.05) -> ImageDataset:
    """source: "emoji" (fetch both npm sets), a prepared .npz, an image folder `root/<class>/...`,
    or an unpacked emoji-datasource package (a folder holding emoji.json); several unpacked packages
    can be given joined with os.pathsep. Builds are cached as .npz in cache_dir."""
    cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    text = str(source)
    if text.endswith(".npz"):
        return ImageDataset.load(Path(text))
    if text == "emoji":
        package_dirs = [fetch_npm_package(NPM_PACKAGES[s], cache_dir) for s in ALLOWED_SETS]
        tag = "emoji"
    else:
        parts = [Path(p) for p in text.split(os.pathsep)]
        package_dirs = [p for p in parts if (p / "emoji.json").is_file()]
        tag = f"{parts[0].name}-{_fingerprint(parts):08x}"
    cached = cache_dir / f"{tag}-{image_size}px-min{min_class_size}-h{heldout_fraction}.npz"
    if cached.is_file():
        return ImageDataset.load(cached)
    if package_dirs:
        data = build_emoji_dataset(package_dirs, image_size, min_class_size, heldout_fraction)
    else:
        data = build_folder_dataset(Path(text), image_size, heldout_fraction)
    data.save(cached)
    return data


def _fingerprint(paths: list[Path]) -> int:
    """Changes when a folder or its class sub-folders gain or lose files, so the cache goes stale."""
    stamps = [f"{p.resolve()}:{p.stat().st_mtime_ns}" for p in paths]
    stamps += [f"{d}:{d.stat().st_mtime_ns}" for p in paths for d in sorted(p.iterdir()) if d.is_dir()]
    return zlib.crc32("\n".join(stamps).encode())


def attribution_text(sources: set[str]) -> str:
    """The notices that must travel with anything trained on these images."""
    lines = [LICENCES[s] for s in ALLOWED_SETS if s in sources]
    if lines:
        lines.append(METADATA_LICENCE)
    return " ".join(lines)
