"""Training data and both training stages on tiny synthetic data (no network, CPU, seconds)."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ear.train.__main__ import main
from ear.train.common import augment, batch_indices, warm_start
from ear.train.data import (
    ImageDataset,
    asset_sets,
    attribution_text,
    bare_code,
    build_folder_dataset,
    drawing_dataset,
    fetch_npm_package,
    fluent_slug,
    is_heldout,
    load_dataset,
    parse_sets,
    read_name_list,
    shifted,
    style_labels,
)
from ear.train.evaluate import distinct_count, novelty
from ear.train.stage_ear import class_balanced, ear_split, split_class_table, tile_class_table

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
            code = f"{0x1F600 + k:X}" + ("-FE0F" if k == 1 else "")  # FE0F as emoji-datasource writes it
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


def make_fake_names(root: Path, package: Path) -> Path:
    """The emojibase-data layout: en/data.json with a CLDR-style label per emoji (hexcode without
    FE0F, as emojibase writes it) and one entry the images lack."""
    entries = json.loads((package / "emoji.json").read_text())
    labels = [{"hexcode": bare_code(e["unified"]), "label": f"emoji {i}"} for i, e in enumerate(entries)]
    labels.append({"hexcode": "1FAFF", "label": "not drawn"})
    (root / "en").mkdir(parents=True)
    (root / "en" / "data.json").write_text(json.dumps(labels))
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
    data = load_dataset(str(pkg), cache_dir=tmp_path / "cache", min_class_size=3, heldout_fraction=0.3,
                        class_set="subcategory")
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


def test_per_emoji_classes_named_by_cldr(tmp_path: Path) -> None:
    pkg = make_fake_package(tmp_path / "pkg")
    source = os.pathsep.join([str(pkg), str(make_fake_names(tmp_path / "names", pkg))])
    everything = load_dataset(source, cache_dir=tmp_path / "cache", class_set="all")
    # one class per drawn emoji (Component dropped), in emoji.json order; skin tones join their emoji
    assert everything.class_names == [f"emoji {i}" for i in range(13) if i not in (7, 8, 9)]
    toned = everything.labels[everything.keys == "1F600"]
    assert len(toned) == 3 and len(set(toned.tolist())) == 1  # default + tone in Twemoji, tone in Noto
    assert everything.class_names[everything.labels[everything.keys == "1F601-FE0F"][0]] == "emoji 1"

    wanted = tmp_path / "wanted.txt"
    wanted.write_text("# a comment\nemoji 3\n\nemoji 1  # the FE0F one\nemoji 3\n")
    assert read_name_list(wanted) == ["emoji 3", "emoji 1"]
    chosen = load_dataset(source, cache_dir=tmp_path / "cache", class_set=str(wanted))
    assert chosen.class_names == ["emoji 3", "emoji 1"]  # list order
    assert sorted(chosen.keys.tolist()) == ["1F601-FE0F", "1F601-FE0F", "1F603", "1F603"]

    wanted.write_text("emoji 3\nnot drawn\n")  # a name without images is an error, not a silent drop
    with pytest.raises(ValueError, match="not drawn"):
        load_dataset(source, cache_dir=tmp_path / "cache", class_set=str(wanted))
    with pytest.raises(ValueError, match="CLDR"):  # per-emoji names need emojibase-data
        load_dataset(str(pkg), cache_dir=tmp_path / "cache", class_set="all")
    with pytest.raises(ValueError, match="class set"):
        load_dataset(str(pkg), cache_dir=tmp_path / "cache", class_set="no-such-set")


def test_ear_split_keeps_every_class_trainable() -> None:
    """Held-out emoji that are whole classes train the EAR; held-out images of seen classes stay out."""
    n = 6
    data = ImageDataset(np.zeros((n, 4, 4, 3), np.uint8), np.array([0, 0, 1, 1, 2, 2]), ["a", "b", "c"],
                        np.array(["twitter"] * n), np.array(list("aabbcc")),
                        np.array([False, True, True, True, False, False]))
    train, held = ear_split(data)
    assert sorted(train.labels.tolist()) == [0, 1, 1, 2, 2] and held.labels.tolist() == [0]


def test_class_balanced_pool_evens_out_classes() -> None:
    labels = torch.tensor([0] * 12 + [1] * 2 + [2] * 3)
    drawn = torch.bincount(labels[class_balanced(labels)])
    assert drawn.tolist() == [12, 12, 12]  # 12 x 1, 2 x 6, 3 x 4


def test_warm_start_copies_matching_tensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from ear.model import EAR, EARConfig

    old = EAR(EARConfig(dim=32, n_layer=1, n_head=2, vocab_size=16, num_classes=3, grid_size=4))
    new = EAR(EARConfig(dim=32, n_layer=1, n_head=2, vocab_size=16, num_classes=5, grid_size=4))
    save_file({k: v.half() for k, v in old.state_dict().items()}, str(tmp_path / "ear.safetensors"))
    fresh = warm_start(new, tmp_path / "ear.safetensors")
    assert fresh == ["cls_embedding.embedding_table.weight"]  # the class table changed size
    w = "layers.0.attention.wqkv.weight"
    assert torch.allclose(new.state_dict()[w], old.state_dict()[w].half().float())


def test_style_classes_label_each_image_set_and_start_from_the_class_row(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from ear.model import EAR, EARConfig

    data = ImageDataset(np.zeros((4, 4, 4, 3), np.uint8), np.array([0, 1, 1, 2]), ["a", "b", "c"],
                        np.array(["google", "twitter", "google", "twitter"]), np.array(list("abbc")),
                        np.zeros(4, bool))
    labels, styles = style_labels(data)
    assert styles == ["Twemoji", "Noto"] and labels.tolist() == [3, 1, 4, 2]
    one_set = data.subset(data.sources == "twitter")
    assert style_labels(one_set)[1] == [] and style_labels(one_set)[0].tolist() == [1, 2]

    old = EAR(EARConfig(dim=32, n_layer=1, n_head=2, vocab_size=16, num_classes=3, grid_size=4))
    new = EAR(EARConfig(dim=32, n_layer=1, n_head=2, vocab_size=16, num_classes=6, grid_size=4))
    save_file({k: v.half() for k, v in old.state_dict().items()}, str(tmp_path / "ear.safetensors"))
    assert tile_class_table(new, tmp_path / "ear.safetensors", 3)
    table = new.cls_embedding.embedding_table.weight
    before = old.cls_embedding.embedding_table.weight.half().float()
    assert torch.equal(table[:3], before[:3]) and torch.equal(table[3:6], before[:3])
    assert torch.equal(table[6], before[3])  # the null class row
    assert not tile_class_table(new, tmp_path / "ear.safetensors", 2)  # 3 + 1 rows are not 2 x k + 1
    # two styles -> two styles x two drawings: each style's drawings start from that style's row
    save_file({k: v.half() for k, v in new.state_dict().items()}, str(tmp_path / "styled.safetensors"))
    drawn = EAR(EARConfig(dim=32, n_layer=1, n_head=2, vocab_size=16, num_classes=12, grid_size=4))
    assert tile_class_table(drawn, tmp_path / "styled.safetensors", 3)
    rows, styled = drawn.cls_embedding.embedding_table.weight, table.half().float()
    for block, style in enumerate((0, 0, 1, 1)):
        assert torch.equal(rows[3 * block:3 * block + 3], styled[3 * style:3 * style + 3])
    assert torch.equal(rows[12], styled[6])


def test_drawings_give_each_picture_of_a_style_its_own_label() -> None:
    """Class a: Twemoji now + its 2014 drawing + a copy of it (dropped: not distinct), Noto one
    drawing; class b: Twemoji one drawing. Three slots: spare ones hold 2 px shifts."""
    def square(value: int, at: int = 16) -> np.ndarray:
        im = np.full((64, 64, 3), 255, np.uint8)
        im[at:at + 32, at:at + 32] = value
        return im

    images = np.stack([square(0), square(0, 20), square(0, 20), square(100), square(200)])
    data = ImageDataset(images, np.array([0, 0, 0, 0, 1]), ["a", "b"],
                        np.array(["twitter", "twitter-2014", "twitter-2017", "google", "twitter"]),
                        np.array(list("aaaab")), np.zeros(5, bool))
    drawn, styles = drawing_dataset(data, 3)
    assert styles == ["Twemoji", "Noto"]  # the 2014 release is Twemoji's, not a style of its own
    slot = {int(label): i for i, label in enumerate(drawn.labels)}  # (style x 3 + slot) x 2 + class
    assert sorted(slot) == [0, 1, 2, 3, 4, 5, 6, 8, 10]  # Noto has no drawing of b
    assert np.array_equal(drawn.images[slot[0]], images[0])
    assert np.array_equal(drawn.images[slot[2]], images[1])
    assert np.array_equal(drawn.images[slot[4]], shifted(images[0], 2, 0))  # spare slot: a shift
    assert np.array_equal(drawn.images[slot[3]], shifted(images[4], 2, 0))
    assert np.array_equal(drawn.images[slot[5]], shifted(images[4], -2, 0))
    assert np.array_equal(drawn.images[slot[10]], shifted(images[3], -2, 0))
    assert drawn.sources[slot[2]] == "twitter-2014" and drawn.keys[slot[5]] == "b"
    assert (shifted(images[0], 2, 0)[:, :2] == 255).all()  # white where the picture moved away
    with pytest.raises(ValueError, match="at least 1"):
        drawing_dataset(data, 0)
    with pytest.raises(ValueError, match="two artists"):
        drawing_dataset(data.subset(data.sources != "google"), 2)


def test_shared_style_table_starts_from_a_styled_table(tmp_path: Path) -> None:
    """Split warm start: class row = mean of its styles' rows, style row = the mean offset; a table
    that is exactly class + style comes back exactly, a third (new) style starts at zero."""
    from safetensors.torch import save_file

    from ear.model import EAR, EARConfig

    small = {"dim": 32, "n_layer": 1, "n_head": 2, "vocab_size": 16, "grid_size": 4}
    old = EAR(EARConfig(num_classes=6, **small))  # 3 classes x 2 styles + null
    classes, styles = torch.randn(3, 32), torch.randn(2, 32)
    styles -= styles.mean(0)
    with torch.no_grad():
        old.cls_embedding.embedding_table.weight[:6] = (styles[:, None] + classes).reshape(6, 32)
    save_file(old.state_dict(), str(tmp_path / "ear.safetensors"))
    new = EAR(EARConfig(num_classes=3, num_styles=3, **small))
    assert split_class_table(new, tmp_path / "ear.safetensors")
    emb = new.cls_embedding
    assert torch.allclose(emb.table()[:6], old.cls_embedding.embedding_table.weight[:6], atol=1e-5)
    assert torch.equal(emb.style_table.weight[2], torch.zeros(32))
    assert torch.equal(emb.table()[-1], old.cls_embedding.embedding_table.weight[6])  # null row
    for classes, count in ((4, 3), (2, 2)):  # 6 rows are not 4 classes x k styles, nor 2 x <= 2
        assert not split_class_table(EAR(EARConfig(num_classes=classes, num_styles=count, **small)),
                                     tmp_path / "ear.safetensors")


def test_fluent_sets_are_opt_in_and_named_by_cldr() -> None:
    assert parse_sets("fluent-color, twitter") == ("twitter", "fluent-color")  # style order
    with pytest.raises(ValueError, match="emoji sets"):
        parse_sets("apple")
    with pytest.raises(ValueError, match="including twitter or google"):
        parse_sets("fluent-flat")
    assert fluent_slug("smiling face with heart-eyes") == "smiling-face-with-heart-eyes"
    assert fluent_slug("woman’s hat") == "womans-hat" and fluent_slug("flag: Japan") == "flag-japan"
    assert parse_sets("twitter-2014,google,twitter") == ("twitter", "google", "twitter-2014")
    with pytest.raises(ValueError, match="google-2016 needs google"):
        parse_sets("twitter,google-2016")


def test_earlier_releases_join_their_artist_s_set(tmp_path: Path) -> None:
    """Twemoji 1.4 (svg/<code points>.svg, FE0F dropped) and Noto v1 (an Iconify icons.json named
    by CLDR name, aliases included) read from fake unpacked packages; each drawing keeps the
    current set's key and class, and only emoji the release draws appear."""
    pkg = make_fake_package(tmp_path / "pkg")
    names = make_fake_names(tmp_path / "names", pkg)
    square = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 8 8"><rect x="2" y="2" width="4" '
              'height="4" fill="#00c000"/></svg>')
    old = tmp_path / "twemoji" / "svg"
    old.mkdir(parents=True)
    (old.parent / "LICENSE-GRAPHICS").write_text("CC-BY 4.0")
    for code in ("1f600", "1f601"):  # 1F601-FE0F in emoji-datasource: its file drops FE0F
        (old / f"{code}.svg").write_text(square)
    noto = tmp_path / "noto-v1"
    noto.mkdir()
    body = '<rect x="0" y="0" width="16" height="8" fill="#c00000"/>'
    (noto / "icons.json").write_text(json.dumps({"prefix": "noto-v1", "width": 16, "height": 16,
                                                 "icons": {"emoji-2": {"body": body}},
                                                 "aliases": {"emoji-3": {"parent": "emoji-2"}}}))
    source = os.pathsep.join(str(p) for p in (pkg, names, old.parent, noto))
    data = load_dataset(source, cache_dir=tmp_path / "cache", class_set="all", heldout_fraction=0.0,
                        sets="twitter,google,twitter-2014,google-2016")
    releases = data.sources != np.where(np.isin(data.sources, ["twitter", "google"]), data.sources, "")
    assert sorted(data.keys[data.sources == "twitter-2014"].tolist()) == ["1F600", "1F601-FE0F"]
    assert sorted(data.keys[data.sources == "google-2016"].tolist()) == ["1F602", "1F603"]
    for i in np.flatnonzero(releases):  # the same class as the current drawing of that emoji
        current = (data.keys == data.keys[i]) & (data.sources == "twitter")
        assert data.labels[i] == data.labels[current][0]
    green = data.images[data.sources == "twitter-2014"][0]
    assert tuple(green[32, 32]) == (0, 192, 0) and tuple(green[2, 2]) == (255, 255, 255)
    red = data.images[data.sources == "google-2016"][0]  # the icon's viewBox is kept: top half red
    assert tuple(red[16, 32]) == (192, 0, 0) and tuple(red[48, 32]) == (255, 255, 255)
    assert "Twemoji 1.4" in attribution_text(set(data.sources.tolist()))


def test_variety_counts_distinct_pictures_greedily() -> None:
    white = np.full((8, 8, 3), 255, np.uint8)
    near = white - 5  # 5/255 from white: the same picture
    far = white - 11  # 11/255 from white, 6/255 from near: differs from white but not from near
    black = np.zeros_like(white)
    assert distinct_count(np.stack([white] * 8)) == 1
    assert distinct_count(np.stack([white, near, black, white, black])) == 2
    assert distinct_count(np.stack([white, far])) == 2
    assert distinct_count(np.stack([white, near, far])) == 1  # far is within 10/255 of near
    assert distinct_count(np.stack([white, black, white - 128])) == 3


def test_novelty_compares_samples_with_the_training_set_s_own_spacing() -> None:
    train = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (0, 51, 102, 204)])  # gaps 0.2, 0.2, 0.4
    copies = novelty(train[[0, 1]] + 1, train)
    assert copies["copies"] == 1.0 and copies["sample_to_train_median"] == pytest.approx(1 / 255)
    assert copies["train_to_train_median"] == pytest.approx(0.2)
    new = novelty(np.full((2, 4, 4, 3), 153, np.uint8), train)
    assert new["copies"] == 0.0 and new["ratio"] == pytest.approx(1.0)


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
    # a scoped, pinned package: npm names its tarball scope-name-version.tgz
    icons = tmp_path / "src2" / "package"
    icons.mkdir(parents=True)
    (icons / "icons.json").write_text("{}")
    with tarfile.open(cache / "iconify-json-noto-v1-1.2.5.tgz", "w:gz") as tar:
        tar.add(icons, arcname="package")
    out = fetch_npm_package("@iconify-json/noto-v1@1.2.5", cache)
    assert out == cache / "iconify-json-noto-v1-1.2.5" and (out / "icons.json").is_file()


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
    data.sources = np.array(["twitter", "google"] * (len(data) // 2) + ["twitter"] * (len(data) % 2))
    npz = data.save(tmp_path / "tiny.npz")  # two "artists", for --style-classes
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
                "--aug-copies", "2", "--warmup", "1", "--style-classes", "--export", str(asset),
                "--correction", "--schedule", "radar"]  # both losses, RadAR's rings
    main([*ear_args, "--steps", "2"])
    main([*ear_args, "--steps", "3", "--resume"])
    stats = json.loads((ear_run / "ear_stats.json").read_text())
    assert stats["steps"] == 3 and np.isfinite(stats["heldout_loss"])
    assert 0 <= stats["heldout_corrected_accuracy"] <= 1

    config = json.loads((asset / "config.json").read_text())
    assert config["format"] == "ear-studio/1"
    assert config["tokenizer"]["type"] == "conv_vq" and config["model"]["vocab_size"] == 16
    assert config["class_names"] == ["class0", "class1"] and config["styles"] == ["Twemoji", "Noto"]
    assert config["model"]["num_classes"] == 4  # one class embedding per (class, style)
    assert set(config["presets"]["default"]) == {"cfg_scale", "temperature", "top_k", "top_p"}

    from ear.pipeline import EARPipeline

    pipe = EARPipeline.from_pretrained(str(asset))
    assert pipe.can_refine and pipe.model.schedule.name == "radar"  # refined by default
    images = pipe.generate([0, 1], seed=0, display_size=64, style="Noto")
    assert len(images) == 2 and images[0].size == (64, 64)


def test_gpu_recipe_and_evaluation_run_tiny_on_cpu(tmp_path: Path) -> None:
    """The GPU recipe's exact stage flags, shrunk by the appended extras, then the evaluation."""
    torch.manual_seed(0)
    npz, run, asset = tmp_path / "prepared.npz", tmp_path / "run", tmp_path / "asset"
    main(["prepare", "--data", str(make_folder(tmp_path / "imgs")), "--cache-dir", str(tmp_path / "cache"),
          "--out", str(npz)])
    data = ImageDataset.load(npz)  # two "artists", for the recipe's styles and drawings
    data.sources = np.array(["twitter", "google"] * (len(data) // 2) + ["twitter"] * (len(data) % 2))
    data.save(npz)
    tiny = "--steps 2 --batch 4 --warmup 1 --save-every 2"
    main(["recipe", "gpu", "--data", str(npz), "--run-dir", str(run), "--export", str(asset),
          f"--tokenizer-extra={tiny} --channels 8 16 16 --codebook-size 16 --codebook-dim 4 --crop 32",
          f"--ear-extra={tiny} --dim 32 --n-layer 1 --n-head 2 --aug-copies 1"])
    stats = json.loads((run / "ear" / "ear_stats.json").read_text())
    assert stats["steps"] == 2 and np.isfinite(stats["train_loss"])
    config = json.loads((asset / "config.json").read_text())
    assert config["class_names"] == ["class0", "class1"] and config["default_class"] == "class0"
    assert config["class_aliases"] == {}  # no alias target among these classes
    assert config["drawings"] == 3 and config["model"]["num_classes"] == 2 * 2 * 3  # class x style x drawing

    from ear.train.evaluate import main as evaluate

    metrics = evaluate(["--asset", str(asset), "--data", str(npz), "--out", str(tmp_path / "eval"),
                        "--samples-per-class", "2", "--fid-dims", "4", "--media",
                        "--media-classes", "class1", "class0"])
    assert 0 <= metrics["samples"]["top1"] <= 1 and metrics["samples"]["chance"] == pytest.approx(0.5)
    assert np.isfinite(metrics["samples"]["fid"]) and 0 < metrics["tokenizer"]["all"]["psnr"] < 60
    assert (asset / "samples.png").is_file() and (asset / "growth.gif").is_file()
    assert json.loads((asset / "config.json").read_text())["default_class"] in ("class0", "class1")


def test_asset_config_names_its_image_sets_and_drawings() -> None:
    from ear.model import EAR, EARConfig
    from ear.train.stage_ear import ear_asset_config

    model = EAR(EARConfig(dim=32, n_layer=1, n_head=2, vocab_size=16, num_classes=12, grid_size=4))
    config = ear_asset_config(model, ["a", "b"], "m", {"google-2016", "twitter", "google"},
                              ["Twemoji", "Noto"], 3)
    assert config["image_sets"] == ["twitter", "google", "google-2016"] and config["drawings"] == 3
    assert asset_sets(config) == ("twitter", "google", "google-2016")
    assert asset_sets({}) == ("twitter", "google")  # an asset from before the key
    plain = ear_asset_config(model, ["a"], "m", {"folder"}, [])
    assert "image_sets" not in plain and "drawings" not in plain
