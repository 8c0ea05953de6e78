"""Training data and both training stages on tiny synthetic data (no network, CPU, seconds)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ear.train.__main__ import main
from ear.train.common import augment, batch_indices
from ear.train.data import (
    ImageDataset,
    build_folder_dataset,
    fetch_npm_package,
    is_heldout,
    load_dataset,
)

# (category, subcategory, number of distinct emoji)
FAKE_SUBCATEGORIES = [("Smileys & Emotion", "face-smiling", 4), ("Smileys & Emotion", "face-hat", 1),
                      ("Smileys & Emotion", "face-tongue", 1), ("Flags", "flag", 1),
                      ("Component", "skin-tone", 3), ("Animals & Nature", "animal-bird", 3)]


def _png(path: Path, colour: tuple[int, int, int], alpha: int = 255, size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))  # transparent background
    im.paste(Image.new("RGBA", (size // 2, size // 2), (*colour, alpha)), (size // 4, size // 4))
    im.save(path)


def make_fake_package(root: Path) -> Path:
    """The emoji-datasource layout: emoji.json + img/<set>/64/<file>, with an Apple set that must
    be ignored and one skin-tone family (uniform and mixed tones)."""
    entries, k = [], 0
    for category, sub, count in FAKE_SUBCATEGORIES:
        for _ in range(count):
            code = f"{0x1F600 + k:X}"
            entry = {"unified": code, "image": f"{code.lower()}.png", "category": category,
                     "subcategory": sub, "has_img_twitter": True, "has_img_google": k % 5 != 0,
                     "has_img_apple": True}
            if sub == "face-smiling" and k == 0:
                entry["skin_variations"] = {
                    "1F3FB": {"image": f"{code.lower()}-1f3fb.png", "has_img_twitter": True,
                              "has_img_google": True},
                    "1F3FB-1F3FC": {"image": f"{code.lower()}-mixed.png", "has_img_twitter": True,
                                    "has_img_google": True},
                }
            entries.append(entry)
            k += 1
    (root / "img").mkdir(parents=True)
    (root / "emoji.json").write_text(json.dumps(entries))
    for s, (r, g, b) in {"twitter": (200, 30, 30), "google": (30, 30, 200), "apple": (0, 255, 0)}.items():
        for e in entries:
            variants = [e, *e.get("skin_variations", {}).values()]
            for i, v in enumerate(variants):
                _png(root / "img" / s / "64" / v["image"], (r, g + 10 * i, b), alpha=128)
    return root


def make_folder(root: Path, classes: int = 2, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            colour = tuple(int(x) for x in rng.integers(0, 255, 3))
            _png(root / f"class{c}" / f"{i}.png", colour, size=48)  # resized to 64 on load
    return root


def test_emoji_package_dataset(tmp_path: Path) -> None:
    pkg = make_fake_package(tmp_path / "pkg")
    data = load_dataset(str(pkg), cache_dir=tmp_path / "cache", min_class_size=3, heldout_fraction=0.3)
    # face-smiling (4) and animal-bird (3) stay; face-hat + face-tongue merge into a class of 2 ->
    # dropped; Flags (1) dropped; Component always dropped
    assert data.class_names == ["animal-bird", "face-smiling"]
    assert set(data.sources.tolist()) == {"twitter", "google"}  # never apple
    assert data.images.shape[1:] == (64, 64, 3) and data.images.dtype == np.uint8
    # twitter: 7 kept emoji + 1 uniform tone; google lacks k = 0 and k = 10 (has_img_google false)
    # but has k = 0's tone variant; mixed-tone variants never appear
    assert len(data) == 8 + 6
    assert not any("mixed" in k for k in data.keys)
    # transparency composited on white: corners white, half-transparent red centre is pink
    assert (data.images[:, 0, 0] == 255).all()
    red = data.images[data.sources == "twitter"][0, 32, 32]
    assert red[0] > 200 and 100 < red[1] < 160
    # held-out split follows the emoji, not the drawing
    for key in set(data.keys.tolist()):
        assert len(set(data.heldout[data.keys == key].tolist())) == 1
        assert bool(data.heldout[data.keys == key][0]) == is_heldout(key, 0.3)
    # the cache is used on the second call and round-trips exactly
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1
    again = ImageDataset.load(cached[0])
    assert np.array_equal(again.images, data.images) and again.class_names == data.class_names


def test_fetch_unpacks_an_npm_tarball_without_network(tmp_path: Path) -> None:
    pkg = make_fake_package(tmp_path / "src" / "package")
    cache = tmp_path / "cache"
    cache.mkdir()
    with tarfile.open(cache / "emoji-datasource-twitter-16.0.0.tgz", "w:gz") as tar:
        tar.add(pkg, arcname="package")
    out = fetch_npm_package("emoji-datasource-twitter", cache)
    assert (out / "emoji.json").is_file()
    assert (out / "img" / "twitter" / "64").is_dir()
    assert fetch_npm_package("emoji-datasource-twitter", cache) == out  # second call: no work


def test_folder_dataset(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", classes=3, per_class=4)
    (root / "class0" / "notes.txt").write_text("not an image")
    data = build_folder_dataset(root, heldout_fraction=0.5)
    assert data.class_names == ["class0", "class1", "class2"]
    assert len(data) == 12 and data.images.shape == (12, 64, 64, 3)
    assert data.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert data.split(True).heldout.all() and not data.split(False).heldout.any()
    with pytest.raises(ValueError):
        build_folder_dataset(tmp_path / "imgs" / "class0")  # no class sub-folders


def test_batches_are_deterministic_and_sharded() -> None:
    a = batch_indices(100, 8, 5, seed=1, rank=0, world=1)
    assert torch.equal(a, batch_indices(100, 8, 5, seed=1, rank=0, world=1))
    shards = [batch_indices(100, 8, 5, seed=1, rank=r, world=2) for r in range(2)]
    assert sorted(torch.cat(shards).tolist()) == sorted(a.tolist())
    assert len(batch_indices(3, 8, 0, seed=0, rank=0, world=1)) == 8  # tiny sets repeat


def test_augment_fills_white_and_keeps_range() -> None:
    images = -torch.ones(4, 3, 64, 64)  # black
    out = augment(images, torch.Generator().manual_seed(0), max_shift=8, scale_range=(0.8, 0.8))
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    assert float(out[:, :, 0, 0].min()) == 1.0  # zooming out exposes white, not black


def test_training_smoke_both_stages_with_resume(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = build_folder_dataset(make_folder(tmp_path / "imgs"), heldout_fraction=0.3)
    npz = data.save(tmp_path / "tiny.npz")
    tok_run, ear_run, asset = tmp_path / "tok", tmp_path / "ear", tmp_path / "asset"
    tok_args = ["tokenizer", "--data", str(npz), "--run-dir", str(tok_run), "--batch", "4",
                "--save-every", "2", "--codebook-size", "16", "--codebook-dim", "4",
                "--channels", "8", "16", "16", "--warmup", "1", "--crop", "32"]
    main([*tok_args, "--steps", "2"])
    assert (tok_run / "checkpoint").is_dir() and (tok_run / "tokenizer.safetensors").is_file()
    main([*tok_args, "--steps", "3", "--resume"])
    stats = json.loads((tok_run / "tokenizer_stats.json").read_text())
    assert stats["steps"] == 3 and np.isfinite(stats["psnr"]) and 0 < stats["codebook_used"] <= 1

    ear_args = ["ear", "--data", str(npz), "--tokenizer", str(tok_run), "--run-dir", str(ear_run),
                "--batch", "4", "--save-every", "2", "--dim", "32", "--n-layer", "1", "--n-head", "2",
                "--aug-copies", "2", "--warmup", "1", "--export", str(asset)]
    main([*ear_args, "--steps", "2"])
    main([*ear_args, "--steps", "3", "--resume"])
    stats = json.loads((ear_run / "ear_stats.json").read_text())
    assert stats["steps"] == 3 and np.isfinite(stats["heldout_loss"])

    config = json.loads((asset / "config.json").read_text())
    assert config["format"] == "ear-studio/1"
    assert config["tokenizer"]["type"] == "conv_vq" and config["model"]["vocab_size"] == 16
    assert config["class_names"] == ["class0", "class1"]
    assert set(config["presets"]["default"]) == {"cfg_scale", "temperature", "top_k", "top_p"}

    from ear.pipeline import EARPipeline

    pipe = EARPipeline.from_pretrained(str(asset))
    images = pipe.generate([0, 1], seed=0, display_size=64)
    assert len(images) == 2 and images[0].size == (64, 64)
