"""Training data for the bundled photo model: licence-clean photographs and wallpapers from
Debian's packages, cut into many random crops at several scales.

Why crops: a photo model is asked how the world continues past a picture's edge (sky, water,
foliage, walls, ground), not to redraw a handful of wallpapers. Forty wallpapers give thousands
of 64 px views from a whole scene down to a patch of grass a twelfth of the picture wide, so the
model sees each kind of surface at every scale an upload may have.

Sources: `photo_sources.tsv` beside this file lists every picture with its Debian package, version,
licence, author and scene kind. Packages come from the Debian registry (`apt-get download`, which
this workplace reaches) and are unpacked with `dpkg-deb -x`; nothing is read from a hub.
- role "train": CC0, CC-BY and CC-BY-SA pictures only, so the weights can be shared under
  CC-BY-SA 4.0 with the credits of `photo_attribution`.
- role "heldout": LGPL/GPL photographs the model never trains on. They are what Extend and Edit
  are measured on (`heldout_photos`); their crops are the tokenizer's and the EAR's held-out split.
Classes are the scene kinds (`SCENES`); the model's null class (classifier-free guidance) is the
unconditional "any scene" that uploads are extended with by default.
"""

from __future__ import annotations

import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ear.train.data import ImageDataset

SOURCES_FILE = Path(__file__).with_name("photo_sources.tsv")
DEFAULT_PHOTO_CACHE = Path.home() / ".cache" / "ear-studio" / "photos"
TRAIN_LICENCES = ("CC0-1.0", "CC-BY-4.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0")
WEIGHTS_LICENCE_PHOTO = ("CC-BY-SA-4.0 for the weights (trained on CC0, CC-BY and CC-BY-SA "
                         "photographs and wallpapers from Debian packages; see ATTRIBUTION.md); code MIT")
WORKING_SIDE = 1024  # pictures are shrunk to this short side first: finer detail is below 64 px crops
MIN_CROP_FRACTION = 1 / 12  # the smallest crop, as a share of the short side
CROPS = {"photo": 320, "abstract": 96, "heldout": 16}  # crops per picture


@dataclass(frozen=True)
class PhotoSource:
    package: str
    version: str
    path: str
    licence: str
    author: str
    scene: str
    role: str  # "train" or "heldout"

    @property
    def key(self) -> str:
        return f"{self.package}/{self.path}"

    @property
    def title(self) -> str:
        return picture_title(self.path)


def picture_title(path: str) -> str:
    """A readable name for a listed picture (or its key): the wallpaper's folder (Plasma's
    <name>/contents/images/<size>.jpg) or the file's stem."""
    parts = Path(path).parts
    return parts[-4] if "contents" in parts else Path(path).stem


def read_sources(path: Path = SOURCES_FILE) -> list[PhotoSource]:
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]
    sources = [PhotoSource(*(field.strip() for field in row)) for row in rows]
    bad = [s.key for s in sources if s.role == "train" and s.licence not in TRAIN_LICENCES]
    if bad:
        raise ValueError(f"training pictures must be {', '.join(TRAIN_LICENCES)}; not: {', '.join(bad)}")
    return sources


SCENES = tuple(sorted({s.scene for s in read_sources()}))
SCENE_SHOWCASE = ("landscape", "water", "plants", "indoors", "abstract")  # sheet order; first = default


def fetch_deb(package: str, version: str, cache_dir: Path) -> Path:
    """The unpacked package folder, downloaded once from Debian's registry."""
    root = cache_dir / f"{package}_{version.replace(':', '%3a')}"
    if (root / ".unpacked").is_file():
        return root
    debs = cache_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=debs, check=True,
                       capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        raise RuntimeError(f"could not download Debian package {package}={version} ({str(detail).strip()}); "
                           f"the photo data needs Debian's apt-get and its package registry") from None
    deb = next(debs.glob(f"{package}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    (root / ".unpacked").touch()
    return root


def open_working(path: Path) -> Image.Image:
    """RGB at WORKING_SIDE on its short side (never enlarged)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    scale = WORKING_SIDE / min(im.size)
    if scale < 1:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
    return im


def random_crops(image: Image.Image, count: int, size: int, seed: int) -> np.ndarray:
    """(count, size, size, 3) uint8: square crops whose side is log-uniform between
    MIN_CROP_FRACTION and the whole short side, anywhere in the picture, half of them mirrored."""
    rng = np.random.default_rng(seed)
    short = min(image.size)
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        side = int(short * np.exp(rng.uniform(np.log(MIN_CROP_FRACTION), 0.0)))
        side = max(side, size)
        x = int(rng.integers(0, image.width - side + 1))
        y = int(rng.integers(0, image.height - side + 1))
        crop = image.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.LANCZOS)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(crop)
    return out


def source_paths(cache_dir: Path | None = None, role: str | None = None) -> list[tuple[PhotoSource, Path]]:
    cache_dir = Path(cache_dir) if cache_dir else DEFAULT_PHOTO_CACHE
    chosen = [s for s in read_sources() if role is None or s.role == role]
    return [(s, fetch_deb(s.package, s.version, cache_dir) / s.path) for s in chosen]


def build_photo_dataset(cache_dir: Path | None = None, image_size: int = 64) -> ImageDataset:
    """Crops of every listed picture; the held-out photographs' crops are the held-out split."""
    images, labels, keys, heldout = [], [], [], []
    for source, path in source_paths(cache_dir):
        kind = "heldout" if source.role == "heldout" else \
            "abstract" if source.scene == "abstract" else "photo"
        crops = random_crops(open_working(path), CROPS[kind], image_size, zlib.crc32(source.key.encode()))
        images.append(crops)
        labels += [SCENES.index(source.scene)] * len(crops)
        keys += [source.key] * len(crops)
        heldout += [source.role == "heldout"] * len(crops)
    return ImageDataset(images=np.concatenate(images), labels=np.array(labels, dtype=np.int64),
                        class_names=list(SCENES), sources=np.array(["photo"] * len(labels)),
                        keys=np.array(keys), heldout=np.array(heldout))


def heldout_photos(cache_dir: Path | None = None, size: int = 64) -> list[tuple[str, np.ndarray]]:
    """(title, centred square at `size` px) of each held-out photograph: what Extend and Edit
    are measured on, pictures the photo model never saw."""
    out = []
    for source, path in source_paths(cache_dir, role="heldout"):
        im = open_working(path)
        short = min(im.size)
        x, y = (im.width - short) // 2, (im.height - short) // 2
        square = im.crop((x, y, x + short, y + short)).resize((size, size), Image.Resampling.LANCZOS)
        out.append((source.title, np.asarray(square)))
    return out


def photo_attribution() -> str:
    """Credits for every picture the weights were trained on (CC-BY and CC-BY-SA ask for them)."""
    by_licence: dict[str, list[str]] = {}
    for s in read_sources():
        if s.role == "train":
            by_licence.setdefault(s.licence, []).append(f'"{s.title}" by {s.author} (Debian {s.package})')
    parts = [f"{licence}: {'; '.join(items)}." for licence, items in sorted(by_licence.items())]
    return "Trained on photographs and wallpapers from Debian packages. " + " ".join(parts)


def attribution_markdown() -> str:
    """ATTRIBUTION.md for weights trained on these pictures (written by the EAR stage's export)."""
    lines = ["# Attribution", "",
             "These weights were trained on the photographs and wallpapers below, all from Debian",
             "bookworm packages, and are shared under CC-BY-SA 4.0 (CC-BY-SA 3.0 pictures adapted under",
             "4.0, as CC-BY-SA 3.0 allows). Changes made: random square crops of each picture, resized",
             "to 64 x 64 pixels and half of them mirrored, were used to train the model.",
             "", "| picture | author | licence | Debian package |", "|---|---|---|---|"]
    lines += [f"| {s.title} | {s.author} | {s.licence} | {s.package} {s.version} |"
              for s in read_sources() if s.role == "train"]
    lines += ["", "Measured on, never trained on (held out): "
              + "; ".join(f"{s.title} by {s.author} ({s.licence}, {s.package})"
                          for s in read_sources() if s.role == "heldout") + ".", ""]
    return "\n".join(lines)
