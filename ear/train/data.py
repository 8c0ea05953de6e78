"""Training data for the embedded model: open-licence emoji sets, or any labelled image folder.

Sources
- npm packages `emoji-datasource-twitter` (Twemoji, CC-BY 4.0) and `emoji-datasource-google`
  (Noto Emoji, Apache-2.0), fetched with `npm pack` (the registry is reachable, GitHub is not) or
  given as already unpacked folders. The Apple and Facebook sets are never read: their images are
  not openly licensed.
- npm package `fluentui-emoji` 1.3.0 (Microsoft's Fluent Emoji, MIT), opt-in with
  `sets` (`--sets twitter,google,fluent-flat,fluent-color`): its "flat" and "modern" (colour)
  SVGs, rasterised offline with PyPI `cairosvg`, matched to an emoji by its CLDR name ("cat face"
  -> cat-face.svg, skin tones -> thumbs-up-light.svg ...). Fluent draws no flags. Its
  high-contrast (monochrome) drawings are not used.
- A generic folder `root/<class>/*.png|jpg|...` (one sub-folder per class).

- npm package `emojibase-data` (MIT; names from Unicode CLDR) for each emoji's CLDR short name
  ("red heart", "cat face", "flag: Japan").

Class sets (emoji), `class_set`:
- "familiar" (default): one class per emoji, named by its CLDR short name, for the emoji listed
  in familiar_emoji.txt (228 emoji most people can name, from every category). Per-emoji
  classes are what makes samples recognisable: a class that mixes 20 fruits is learnt as a blob.
- "all": one class per emoji for every emoji both sets draw (about 1,870 classes; a GPU run).
- a path to a text file of CLDR names (one per line, "#" comments): those emoji only.
- "subcategory": the older broad classes, one per Unicode subcategory holding at least
  `min_class_size` distinct emoji; smaller subcategories merge into "<Category> (other)", and a
  merged class still too small is dropped.
"Component" (bare skin-tone swatches) is always dropped. Skin tones: every emoji's default drawing
plus its uniform-tone variants (one tone for all people in it, at most 5) belong to the emoji's
class; the mixed-tone combinations (up to 25 per couple/family emoji) would otherwise swamp the
data with near-duplicates.

Held-out split: decided by a hash of the emoji's base code point sequence (or of the file's path in
a folder), so the Twemoji and Noto drawings and all skin tones of one emoji land on the same side:
held-out numbers measure generalisation to unseen emoji, not to another artist's copy. With
per-emoji classes a held-out emoji is a whole class, so only the tokenizer holds it out (the EAR
stage must see every class it is asked to draw; see stage_ear.ear_split).

The prepared dataset is cached as one compressed uint8 .npz so later runs load in about a second.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ALLOWED_SETS = ("twitter", "google")  # never "apple" / "facebook" (not openly licensed)
FLUENT_SETS = {"fluent-flat": "flat", "fluent-color": "modern"}  # set -> folder in FLUENT_PACKAGE
# Earlier releases of the Twemoji and Noto sets: the same artist's other drawings of an emoji, so
# the same style with more than one picture (see drawing_dataset); set -> its artist's current set
VERSION_SETS = {"twitter-2014": "twitter", "twitter-2017": "twitter", "google-2016": "google"}
VERSION_PACKAGES = {"twitter-2014": "twemoji@1.4.1", "twitter-2017": "twemoji@2.5.1",
                    "google-2016": "@iconify-json/noto-v1@1.2.5"}
EMOJI_SETS = (*ALLOWED_SETS, *FLUENT_SETS, *VERSION_SETS)  # style order: older models' styles keep theirs
DISTINCT = 10 / 255  # mean absolute difference (pixels in [0, 1]) above which two pictures differ
DRAWING_SHIFTS = ((2, 0), (-2, 0), (0, 2), (0, -2))  # (dx, dy) px that fill a style's spare drawing slots
STYLE_NAMES = {"twitter": "Twemoji", "google": "Noto", "fluent-flat": "Fluent Flat",
               "fluent-color": "Fluent Color"}  # what the page calls each set's drawings
NPM_PACKAGES = {s: f"emoji-datasource-{s}" for s in ALLOWED_SETS}
NAMES_PACKAGE = "emojibase-data"
FLUENT_PACKAGE = "fluentui-emoji@1.3.0"
FLUENT_TONES = ("default", "light", "medium-light", "medium", "medium-dark", "dark")
FAMILIAR_LIST = Path(__file__).with_name("familiar_emoji.txt")
CLASS_SETS = ("familiar", "all", "subcategory")

# The 16 familiar emoji of the model card's sample sheet (their order is the sheet's); the
# evaluation picks the page's default class among them (ear.train.evaluate --media).
SHOWCASE = ("red heart", "grinning face", "face with tears of joy", "flag: Japan", "thumbs up",
            "smiling face with heart-eyes", "loudly crying face", "fire", "party popper", "cat face",
            "dog face", "pizza", "red apple", "sun", "rainbow", "automobile")

# Names that still find a class: the broad classes of the earlier ear-emoji (where one emoji
# stands for the whole group) and everyday words. Exported where the target is in the class set.
CLASS_ALIASES = {
    "heart": "red heart", "country-flag": "flag: Japan", "face-concerned": "worried face",
    "food-fruit": "red apple", "food-prepared": "pizza", "animal-mammal": "dog face", "animal-bird": "bird",
    "sky & weather": "sun behind cloud", "transport-ground": "automobile", "drink": "hot beverage",
    "sport": "soccer ball", "game": "video game", "clothing": "t-shirt", "event": "party popper",
    "place-building": "house",
    "smiley": "grinning face", "laughing": "face with tears of joy", "crying": "loudly crying face",
    "cat": "cat face", "dog": "dog face", "tiger": "tiger face", "pig": "pig face", "rabbit": "rabbit face",
    "monkey": "monkey face", "apple": "red apple", "car": "automobile", "cake": "birthday cake",
    "coffee": "hot beverage", "football": "soccer ball", "gift": "wrapped gift", "moon": "crescent moon",
    "phone": "mobile phone", "poo": "pile of poo", "100": "hundred points", "like": "thumbs up",
    "usa": "flag: United States", "uk": "flag: United Kingdom",
}
DEFAULT_CACHE = Path.home() / ".cache" / "ear-studio" / "emoji"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
DROPPED_CATEGORIES = ("Component",)

LICENCES = {
    "twitter": ("Twemoji graphics Copyright 2019 Twitter, Inc (X Corp.) and other contributors, "
                "maintained at https://github.com/jdecked/twemoji, licensed under CC-BY 4.0 "
                "(https://creativecommons.org/licenses/by/4.0/)."),
    "google": ("Noto Emoji graphics Copyright Google LLC, https://github.com/googlefonts/noto-emoji, "
               "licensed under the Apache License 2.0 (https://www.apache.org/licenses/LICENSE-2.0)."),
    "twitter-2014": ("Twemoji 1.4 graphics (2014) Copyright 2014 Twitter, Inc and other contributors, "
                     "as packaged on npm in twemoji 1.4.1, licensed under CC-BY 4.0 "
                     "(https://creativecommons.org/licenses/by/4.0/)."),
    "twitter-2017": ("Twemoji 2.5 graphics (2017) Copyright Twitter, Inc and other contributors, as packaged "
                     "on npm in twemoji 2.5.1, licensed under CC-BY 4.0 "
                     "(https://creativecommons.org/licenses/by/4.0/)."),
    "google-2016": ("Noto Emoji v1 graphics Copyright Google Inc., "
                    "https://github.com/googlefonts/noto-emoji, as packaged on npm in @iconify-json/noto-v1 "
                    "1.2.5, licensed under the Apache License 2.0 (https://www.apache.org/licenses/LICENSE-2.0)."),
    "fluent": ("Fluent Emoji graphics Copyright (c) Microsoft Corporation, "
               "https://github.com/microsoft/fluentui-emoji, MIT License; as packaged on npm in "
               "fluentui-emoji 1.3.0, Copyright (c) 2022 Mohammad Abu Mattar, MIT License."),
}
METADATA_LICENCE = ("Emoji metadata (code points, categories) from emoji-datasource by Cal Henderson "
                    "(https://github.com/iamcal/emoji-data), MIT License; emoji names (Unicode CLDR short "
                    "names) from emojibase-data by Miles Johnson (https://github.com/milesj/emojibase), "
                    "MIT License, CLDR data under the Unicode License v3.")


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


def style_labels(data: ImageDataset) -> tuple[np.ndarray, list[str]]:
    """Model labels when every (class, image set) pair gets its own class embedding: label =
    style * num_classes + class, styles in the order of EMOJI_SETS. Why: one class drawn by two
    artists is two pictures, and a model that predicts several tokens per step in parallel mixes
    them into one blotchy picture; told which artist to follow, each step's tokens agree (see
    ear.pipeline.EARPipeline.labels). A data set from one image set (a folder) has no styles: its
    labels come back unchanged with an empty list."""
    present = [s for s in (*EMOJI_SETS, "folder") if (data.sources == s).any()]
    if len(present) < 2:
        return data.labels, []
    style = np.array([present.index(s) for s in data.sources.tolist()], dtype=np.int64)
    return style * len(data.class_names) + data.labels, [STYLE_NAMES.get(s, s) for s in present]


def drawing_dataset(data: ImageDataset, drawings: int) -> tuple[ImageDataset, list[str]]:
    """Every (class, style) gets `drawings` class embeddings, one per picture; a seed picks one
    (ear.pipeline.EARPipeline.labels). Label = (style x drawings + slot) x num_classes + class, a
    style being an artist (an earlier release joins its current set, VERSION_SETS).

    Why: one class embedding for several pictures makes a step's parallel draws mix them (a
    thumbs up of six skin tones in patches), and one picture per embedding makes every seed draw
    the same. A style's pictures fill its slots in this order: the current drawing, the earlier
    releases', the skin tones; one within DISTINCT of an earlier one is left out; the first
    `drawings` are kept. A style with fewer pictures fills its spare slots with them shifted by
    DRAWING_SHIFTS (small shifts are real variety too, and stay nearest their own picture), so
    every slot is a picture of its own. Returns the slot-labelled set and the style names."""
    if drawings < 1:
        raise ValueError(f"drawings must be at least 1, got {drawings}")
    family = np.array([VERSION_SETS.get(s, s) for s in data.sources.tolist()])
    present = [s for s in EMOJI_SETS if (family == s).any()]
    if len(present) < 2:
        raise ValueError("drawings per style need an emoji data set of at least two artists' sets")
    pairs = list(zip(data.labels.tolist(), data.sources.tolist(), strict=True))
    first: dict[tuple[int, str], int] = {}  # (class, set) -> its default (first) drawing
    for i, key in enumerate(pairs):
        first.setdefault(key, i)
    # 0: a current set's default drawing, 1: an earlier release's, 2: a current set's skin tones
    rank = [1 if s not in present else 0 if first[(c, s)] == i else 2 for i, (c, s) in enumerate(pairs)]
    n = len(data.class_names)
    images, labels, picked = [], [], []
    for style, name in enumerate(present):
        for c in range(n):
            members = sorted(np.flatnonzero((data.labels == c) & (family == name)),
                             key=lambda i: (rank[i], i))
            if not members:
                continue
            apart = mean_abs_diff(data.images[members], data.images[members]) > DISTINCT
            kept_at: list[int] = []  # positions in `members`
            for k in range(len(members)):
                if apart[k, kept_at].all():
                    kept_at.append(k)
            kept = [int(members[k]) for k in kept_at[:drawings]]
            for slot in range(drawings):
                i = kept[slot % len(kept)]
                shift = slot // len(kept)
                images.append(data.images[i] if shift == 0 else
                              shifted(data.images[i], *DRAWING_SHIFTS[(shift - 1) % len(DRAWING_SHIFTS)]))
                labels.append((style * drawings + slot) * n + c)
                picked.append(i)
    idx = np.array(picked, dtype=np.int64)
    return ImageDataset(np.stack(images), np.array(labels, dtype=np.int64), data.class_names,
                        data.sources[idx], data.keys[idx], data.heldout[idx]), \
        [STYLE_NAMES.get(s, s) for s in present]


def mean_abs_diff(a: np.ndarray, b: np.ndarray, chunk: int = 256) -> np.ndarray:
    """(N, M) mean absolute difference between uint8 images a (N, ...) and b (M, ...), in [0, 1]."""
    x = torch.from_numpy(a.reshape(len(a), -1)).float() / 255
    y = torch.from_numpy(b.reshape(len(b), -1)).float() / 255
    out = [torch.cdist(x[i:i + chunk], y, p=1) / x.shape[1] for i in range(0, len(x), chunk)]
    return torch.cat(out).numpy() if out else np.zeros((0, len(b)))


def shifted(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """uint8 (S, S, 3) moved by whole pixels (right and down positive), white where it uncovers."""
    out = np.full_like(image, 255)
    h, w = image.shape[:2]
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic across machines and Python runs (unlike hash())."""
    return (zlib.crc32(key.encode()) % 10_000) < fraction * 10_000


def load_rgb(path: Path, size: int) -> np.ndarray:
    """Any mode (or an SVG, rasterised at `size`) -> RGB uint8 (size, size, 3) with transparency
    composited on white."""
    with _open_image(path, size) as im:
        im = im.convert("RGBA")
        canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
        canvas.alpha_composite(im)
        rgb = canvas.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


def _open_image(path: Path, size: int) -> Image.Image:
    if path.suffix.lower() != ".svg":
        return Image.open(path)
    try:
        import cairosvg
    except (ImportError, OSError) as err:  # cairosvg needs the system's libcairo too
        raise RuntimeError(f"SVG emoji sets need PyPI cairosvg ({err}): pip install cairosvg") from None
    png = cairosvg.svg2png(url=str(path), output_width=size, output_height=size)
    return Image.open(io.BytesIO(png))


# what to unpack from each package: (file proving it is unpacked, path prefixes to keep)
_IMAGE_FILES = ("emoji.json",
                ("package/emoji.json", "package/LICENSE", "package/package.json", "package/img/"))
_NAME_FILES = ("en/data.json", ("package/en/data.json", "package/LICENSE", "package/package.json"))
_FLUENT_FILES = ("LICENSE", ("package/LICENSE", "package/package.json", "package/README.md",
                             *(f"package/icons/{f}/" for f in FLUENT_SETS.values())))
_TWEMOJI_SVG = {"twitter-2014": "svg", "twitter-2017": "2/svg"}  # where each release keeps its SVGs
_PACKAGE_FILES = {
    NAMES_PACKAGE: _NAME_FILES, FLUENT_PACKAGE: _FLUENT_FILES,
    **{VERSION_PACKAGES[s]: ("LICENSE-GRAPHICS", ("package/package.json", "package/LICENSE",
                                                  "package/LICENSE-GRAPHICS", f"package/{folder}/"))
       for s, folder in _TWEMOJI_SVG.items()},
    VERSION_PACKAGES["google-2016"]: ("icons.json", ("package/icons.json", "package/info.json",
                                                     "package/package.json")),
}


def fetch_npm_package(name: str, cache_dir: Path) -> Path:
    """`npm pack` the package into cache_dir once and unpack what we need; returns the package dir."""
    marker, wanted = _PACKAGE_FILES.get(name, _IMAGE_FILES)
    cache_dir.mkdir(parents=True, exist_ok=True)
    bare, _, version = name.removeprefix("@").partition("@")
    flat = bare.replace("/", "-")  # npm names a scoped package's tarball "scope-name-version.tgz"
    target = cache_dir / (f"{flat}-{version}" if version else flat)  # one folder per pinned version
    if (target / marker).is_file():
        return target
    tarballs = sorted(cache_dir.glob(f"{flat}-{version or '[0-9]'}*.tgz"))
    if not tarballs:
        try:
            result = subprocess.run(["npm", "pack", name, "--json", "--pack-destination", str(cache_dir)],
                                    check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise RuntimeError(f"could not fetch {name} with npm pack: {e}") from e
        tarballs = [cache_dir / json.loads(result.stdout)[0]["filename"]]
    tmp = cache_dir / f".{target.name}.partial"
    with tarfile.open(tarballs[-1]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(wanted)
                   and ("/img/" not in m.name or "/64/" in m.name)]
        tar.extractall(tmp, members=members, filter="data")
    (tmp / "package").replace(target)
    tmp.rmdir()
    return target


def bare_code(code: str) -> str:
    """Code points without variation selector FE0F, upper case: emoji-datasource's "unified" and
    emojibase's "hexcode" disagree on FE0F ("2764-FE0F" vs "2764" for red heart)."""
    return "-".join(p for p in code.upper().split("-") if p != "FE0F")


def cldr_names(names_dir: Path) -> dict[str, str]:
    """bare code points -> CLDR short name, from an unpacked emojibase-data package."""
    entries = json.loads((names_dir / "en" / "data.json").read_text())
    return {bare_code(e["hexcode"]): e["label"] for e in entries}


def read_name_list(path: Path) -> list[str]:
    """One CLDR name per line; blank lines and "#" comments skipped; duplicates kept once."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return list(dict.fromkeys(line for line in lines if line))


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


def fluent_slug(name: str) -> str:
    """A CLDR name as fluentui-emoji names its files: "smiling face with heart-eyes" ->
    smiling-face-with-heart-eyes, "woman’s hat" -> womans-hat."""
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"[’']", "", name.lower())).strip("-")


def fluent_records(package_dir: Path, sets: tuple[str, ...], base: list[Record], names: dict[str, str]
                   ) -> list[Record]:
    """Records of the Fluent sets for every emoji of `base` (emoji-datasource records, which give
    category, subcategory and key) that Fluent draws: its default drawing, or its default and the
    five uniform skin tones where Fluent has them (as for the other sets)."""
    info = {}
    for r in base:
        name = names.get(bare_code(r[3]))
        if name:
            info.setdefault(name, r[1:4])
    records = []
    for s in (s for s in FLUENT_SETS if s in sets):
        folder = package_dir / "icons" / FLUENT_SETS[s]
        for name, (category, subcategory, key) in info.items():
            slug = fluent_slug(name)
            paths = [folder / f"{slug}.svg"] if (folder / f"{slug}.svg").is_file() else \
                [p for p in (folder / f"{slug}-{t}.svg" for t in FLUENT_TONES) if p.is_file()]
            records += [(s, category, subcategory, key, p) for p in paths]
    return records


def version_records(package_dir: Path, set_name: str, base: list[Record], names: dict[str, str]
                    ) -> list[Record]:
    """Records of an earlier release (VERSION_SETS) for every emoji of `base` (its artist's current
    set; category, subcategory and key taken from there) that the release also draws, its default
    drawing only:
    Twemoji files are named by code points, Noto v1's Iconify icons by CLDR name."""
    family = VERSION_SETS[set_name]
    if set_name in _TWEMOJI_SVG:
        folder = package_dir / _TWEMOJI_SVG[set_name]

        def path_of(key: str) -> Path | None:
            lowered = key.lower()
            names_tried = (lowered, "-".join(p for p in lowered.split("-") if p != "fe0f"))
            return next((folder / f"{n}.svg" for n in names_tried if (folder / f"{n}.svg").is_file()), None)
    else:
        folder = iconify_svgs(package_dir)

        def path_of(key: str) -> Path | None:
            name = names.get(bare_code(key))
            path = folder / f"{fluent_slug(name)}.svg" if name else None
            return path if path is not None and path.is_file() else None
    defaults = {r[3]: r for r in reversed(base) if r[0] == family}  # skin tones share the key
    found = ((r, path_of(key)) for key, r in reversed(defaults.items()))
    return [(set_name, *r[1:4], path) for r, path in found if path is not None]


def iconify_svgs(package_dir: Path) -> Path:
    """An Iconify JSON set (icons.json: shared size, per-icon SVG bodies, aliases) written out once
    as one SVG file per icon name (aliases that only rename included), for load_rgb."""
    folder = package_dir / "svg"
    if (folder / ".complete").is_file():
        return folder
    data = json.loads((package_dir / "icons.json").read_text())
    icons, aliases = data["icons"], data.get("aliases", {})
    names = {n: n for n in icons}
    for alias, spec in aliases.items():
        target = alias
        while target in aliases and set(aliases[target]) == {"parent"}:
            target = aliases[target]["parent"]
        if target in icons and set(spec) == {"parent"}:
            names[alias] = target
    folder.mkdir(exist_ok=True)
    for name, source in names.items():
        icon = icons[source]
        left, top = icon.get("left", data.get("left", 0)), icon.get("top", data.get("top", 0))
        width, height = icon.get("width", data.get("width", 16)), icon.get("height", data.get("height", 16))
        (folder / f"{name}.svg").write_text(
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="{left} {top} {width} {height}">{icon["body"]}</svg>', encoding="utf-8")
    (folder / ".complete").touch()
    return folder


def choose_classes(records: list[Record], min_class_size: int) -> dict[tuple[str, str], str]:
    """(category, subcategory) -> class name, following the merge rule in the module docstring."""
    sub_counts = Counter((cat, sub) for cat, sub, _ in {(r[1], r[2], r[3]) for r in records})
    mapping = {k: k[1] if n >= min_class_size else f"{k[0]} (other)" for k, n in sub_counts.items()}
    class_counts = Counter()
    for k, n in sub_counts.items():
        class_counts[mapping[k]] += n
    return {k: name for k, name in mapping.items() if class_counts[name] >= min_class_size}


def per_emoji_classes(records: list[Record], names: dict[str, str], wanted: list[str] | None
                      ) -> tuple[list[str], list[str | None]]:
    """Class names (list order, or first appearance for all emoji) and each record's class (None:
    not in the set). Every wanted name must have images: a typo must not silently drop a class."""
    record_names = [names.get(bare_code(r[3])) for r in records]
    if wanted is None:
        return list(dict.fromkeys(n for n in record_names if n)), record_names
    missing = sorted(set(wanted) - set(record_names))
    if missing:
        raise ValueError(f"no images for {len(missing)} listed emoji name(s): {', '.join(missing[:8])}")
    chosen = set(wanted)
    return wanted, [n if n in chosen else None for n in record_names]


def subcategory_classes(records: list[Record], min_class_size: int) -> tuple[list[str], list[str | None]]:
    mapping = choose_classes(records, min_class_size)
    return sorted(set(mapping.values())), [mapping.get((r[1], r[2])) for r in records]


def build_emoji_dataset(package_dirs: list[Path], image_size: int = 64, min_class_size: int = 20,
                        heldout_fraction: float = 0.05, class_set: str = "familiar",
                        names_dir: Path | None = None, sets: tuple[str, ...] = ALLOWED_SETS,
                        fluent_dir: Path | None = None, version_dirs: dict[str, Path] | None = None
                        ) -> ImageDataset:
    """class_set: see the module docstring; per-emoji sets need names_dir (emojibase-data), the
    Fluent sets also fluent_dir (an unpacked fluentui-emoji) and names_dir, the earlier releases
    version_dirs (VERSION_SETS name -> its unpacked package) and names_dir."""
    records = [r for d in package_dirs for r in emoji_records(d) if r[0] in sets]
    if not records:
        raise ValueError(f"no twitter/google emoji images found under {package_dirs}")
    if any(s in FLUENT_SETS for s in sets):
        if fluent_dir is None or names_dir is None:
            raise ValueError("the Fluent sets need an unpacked fluentui-emoji package and emojibase-data")
        records += fluent_records(fluent_dir, sets, records, cldr_names(names_dir))
    if version_dirs:
        if names_dir is None:
            raise ValueError("the earlier releases need emojibase-data (Noto v1 names icons by CLDR name)")
        names = cldr_names(names_dir)
        records += [r for s, d in version_dirs.items() for r in version_records(d, s, records, names)]
    if class_set == "subcategory":
        class_names, record_classes = subcategory_classes(records, min_class_size)
    else:
        if names_dir is None:
            raise ValueError(f"class set {class_set!r} names classes by CLDR short name: give an unpacked "
                             f"{NAMES_PACKAGE} package too")
        wanted = None if class_set == "all" else read_name_list(
            FAMILIAR_LIST if class_set == "familiar" else Path(class_set))
        class_names, record_classes = per_emoji_classes(records, cldr_names(names_dir), wanted)
    kept = [(r, c) for r, c in zip(records, record_classes, strict=True) if c is not None]
    index = {c: i for i, c in enumerate(class_names)}
    return ImageDataset(
        images=np.stack([load_rgb(r[4], image_size) for r, _ in kept]),
        labels=np.array([index[c] for _, c in kept], dtype=np.int64),
        class_names=class_names,
        sources=np.array([r[0] for r, _ in kept]),
        keys=np.array([r[3] for r, _ in kept]),
        heldout=np.array([is_heldout(r[3], heldout_fraction) for r, _ in kept]),
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


def asset_sets(config: dict[str, Any]) -> tuple[str, ...]:
    """The emoji image sets an asset's config.json says it was trained on ("image_sets"; an older
    asset without the key: Twemoji and Noto)."""
    return parse_sets(tuple(config.get("image_sets") or ALLOWED_SETS))


def parse_sets(text: str | tuple[str, ...]) -> tuple[str, ...]:
    """"twitter,google,fluent-flat" -> the sets in EMOJI_SETS order (their style order)."""
    wanted = {s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()}
    unknown = sorted(wanted - set(EMOJI_SETS))
    if unknown or not wanted & set(ALLOWED_SETS):
        raise ValueError(f"emoji sets must be some of {', '.join(EMOJI_SETS)}, including twitter or "
                         f"google, got {','.join(sorted(wanted)) or 'none'}")
    orphans = sorted(s for s in wanted & set(VERSION_SETS) if VERSION_SETS[s] not in wanted)
    if orphans:
        raise ValueError(f"an earlier release joins its artist's current set: {', '.join(orphans)} needs "
                         f"{', '.join(sorted({VERSION_SETS[s] for s in orphans}))} in the sets too")
    return tuple(s for s in EMOJI_SETS if s in wanted)


def load_dataset(source: str | Path = "emoji", cache_dir: Path | None = None, image_size: int = 64,
                 min_class_size: int = 20, heldout_fraction: float = 0.05,
                 class_set: str = "familiar", sets: str | tuple[str, ...] = ALLOWED_SETS) -> ImageDataset:
    """source: "emoji" (fetch both npm image sets and emojibase-data), a prepared .npz, an image
    folder `root/<class>/...`, or unpacked emoji-datasource packages (folders holding emoji.json)
    plus an unpacked emojibase-data (a folder holding en/data.json) and, for the earlier releases,
    unpacked twemoji / @iconify-json/noto-v1 packages, joined with os.pathsep.
    class_set and sets (image sets, EMOJI_SETS) apply to emoji sources (see the module docstring).
    Builds are cached as .npz."""
    sets = parse_sets(sets)
    text = str(source)
    if text.endswith(".npz"):
        return ImageDataset.load(Path(text))
    if text == "photos":
        return _photo_dataset(Path(cache_dir) if cache_dir else None, image_size)
    cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    if class_set not in CLASS_SETS and not Path(class_set).is_file():
        raise ValueError(f"class set must be one of {', '.join(CLASS_SETS)} or a file of emoji names, "
                         f"got {class_set!r}")
    if text == "emoji":
        package_dirs = [fetch_npm_package(NPM_PACKAGES[s], cache_dir) for s in ALLOWED_SETS if s in sets]
        fluent = any(s in FLUENT_SETS for s in sets)
        names_dir = None if class_set == "subcategory" and not fluent else \
            fetch_npm_package(NAMES_PACKAGE, cache_dir)
        fluent_dir = fetch_npm_package(FLUENT_PACKAGE, cache_dir) if fluent else None
        version_dirs = {s: fetch_npm_package(VERSION_PACKAGES[s], cache_dir)
                        for s in sets if s in VERSION_SETS}
        tag = "emoji"
    else:
        parts = [Path(p) for p in text.split(os.pathsep)]
        package_dirs = [p for p in parts if (p / "emoji.json").is_file()]
        names_dir = next((p for p in parts if (p / "en" / "data.json").is_file()), None)
        fluent_dir = next((p for p in parts if (p / "icons" / "flat").is_dir()), None)
        version_dirs = {s: d for s in sets if s in VERSION_SETS
                        for d in [next((p for p in parts if _holds_release(p, s)), None)] if d is not None}
        tag = f"{parts[0].name}-{_fingerprint(parts):08x}"
    classes = class_set
    if class_set not in ("all", "subcategory"):  # a name list: the cache follows its content
        names_file = FAMILIAR_LIST if class_set == "familiar" else Path(class_set)
        classes = f"list{zlib.crc32(names_file.read_bytes()):08x}"
    if sets != ALLOWED_SETS:  # the two original sets keep their old cache name
        tag += "-" + "+".join(sets)
    cached = cache_dir / f"{tag}-{image_size}px-{classes}-min{min_class_size}-h{heldout_fraction}.npz"
    if cached.is_file():
        return ImageDataset.load(cached)
    if package_dirs:
        data = build_emoji_dataset(package_dirs, image_size, min_class_size, heldout_fraction, class_set,
                                   names_dir, sets, fluent_dir, version_dirs)
    else:
        data = build_folder_dataset(Path(text), image_size, heldout_fraction)
    data.save(cached)
    return data


def _holds_release(folder: Path, set_name: str) -> bool:
    """Whether an unpacked package folder is the earlier release `set_name` (VERSION_SETS)."""
    if set_name in _TWEMOJI_SVG:
        return (folder / "LICENSE-GRAPHICS").is_file() and (folder / _TWEMOJI_SVG[set_name]).is_dir() \
            and (set_name != "twitter-2014" or not (folder / "2").is_dir())
    return (folder / "icons.json").is_file()


def _photo_dataset(cache_dir: Path | None, image_size: int) -> ImageDataset:
    """The photo model's crops (ear.train.photos), cached under the photo cache; the cache name
    follows the source list's content, so an edited list is rebuilt."""
    from ear.train import photos  # photos builds on ImageDataset, defined here

    cache_dir = cache_dir or photos.DEFAULT_PHOTO_CACHE
    cached = cache_dir / f"photos-{image_size}px-{zlib.crc32(photos.SOURCES_FILE.read_bytes()):08x}.npz"
    if cached.is_file():
        return ImageDataset.load(cached)
    data = photos.build_photo_dataset(cache_dir, image_size)
    data.save(cached)
    return data


def dataset_from_args(args: Any) -> ImageDataset:
    """The data set the CLI flags (--data, --cache-dir, --classes, --min-class-size, --sets) describe."""
    return load_dataset(args.data, args.cache_dir, min_class_size=args.min_class_size,
                        class_set=args.class_set, sets=getattr(args, "sets", ALLOWED_SETS))


def _fingerprint(paths: list[Path]) -> int:
    """Changes when a folder or its class sub-folders gain or lose files, so the cache goes stale."""
    stamps = [f"{p.resolve()}:{p.stat().st_mtime_ns}" for p in paths]
    stamps += [f"{d}:{d.stat().st_mtime_ns}" for p in paths for d in sorted(p.iterdir()) if d.is_dir()]
    return zlib.crc32("\n".join(stamps).encode())


def attribution_text(sources: set[str]) -> str:
    """The notices that must travel with anything trained on these images."""
    lines = [LICENCES[s] for s in (*ALLOWED_SETS, *VERSION_SETS) if s in sources]
    if any(s in FLUENT_SETS for s in sources):
        lines.append(LICENCES["fluent"])
    if lines:
        lines.append(METADATA_LICENCE)
    if "photo" in sources:
        from ear.train.photos import photo_attribution

        lines.append(photo_attribution())
    return " ".join(lines)
