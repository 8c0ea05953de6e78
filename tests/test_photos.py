"""The photo model's data: the source list's licences, crops at several scales, the held-out
photographs kept out of training, credits, and which model the Extend tab opens on.

Debian's packages are not downloaded here: `fetch_deb` is replaced by a folder of generated
pictures at the listed paths (the real download is `apt-get download`, used by the training run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ear import hub
from ear.app_support import extend_model
from ear.train import data as data_module
from ear.train import photos


@pytest.fixture
def fake_debs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every listed picture as a small gradient of its own colour, under a fake package root."""
    rng = np.random.default_rng(0)
    for s in photos.read_sources():
        path = tmp_path / s.package / s.path
        path.parent.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, 3)
        ramp = np.linspace(0, 60, 160)[None, :, None]
        picture = np.clip(base + ramp + np.zeros((120, 160, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(picture).save(path)
    monkeypatch.setattr(photos, "fetch_deb", lambda package, version, cache_dir: tmp_path / package)
    monkeypatch.setattr(photos, "CROPS", {"photo": 3, "abstract": 2, "heldout": 2})
    return tmp_path


def test_training_pictures_are_cc_licensed_and_heldout_ones_never_train() -> None:
    sources = photos.read_sources()
    train = [s for s in sources if s.role == "train"]
    held = [s for s in sources if s.role == "heldout"]
    assert len(train) >= 40 and len(held) == 8
    assert {s.licence for s in train} <= set(photos.TRAIN_LICENCES)
    assert not {s.key for s in train} & {s.key for s in held}
    assert set(photos.SCENE_SHOWCASE) == set(photos.SCENES)


def test_a_listed_picture_under_another_licence_is_refused(tmp_path: Path) -> None:
    listing = tmp_path / "sources.tsv"
    listing.write_text("pkg\t1\ta.jpg\tGPL-2.0-or-later\tSomeone\tplants\ttrain\n", encoding="utf-8")
    with pytest.raises(ValueError, match="training pictures must be"):
        photos.read_sources(listing)


def test_crops_cover_several_scales_deterministically() -> None:
    ramp = np.tile((np.arange(600) * 255 // 599).astype(np.uint8)[None, :, None], (400, 1, 3))
    picture = Image.fromarray(ramp)
    a, b = (photos.random_crops(picture, 40, 64, seed=7) for _ in range(2))
    assert a.shape == (40, 64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    # a crop's horizontal colour range grows with its side: small and large crops both occur
    spans = a[..., 0].astype(int).max(axis=(1, 2)) - a[..., 0].astype(int).min(axis=(1, 2))
    assert spans.min() < 60 < spans.max()


def test_dataset_holds_out_the_heldout_photographs(fake_debs: Path, tmp_path: Path) -> None:
    data = data_module.load_dataset("photos", cache_dir=tmp_path / "cache")
    assert data.class_names == list(photos.SCENES) and data.images.shape[1:] == (64, 64, 3)
    held_keys = {s.key for s in photos.read_sources() if s.role == "heldout"}
    assert set(data.keys[data.heldout].tolist()) == held_keys
    assert not set(data.keys[~data.heldout].tolist()) & held_keys
    assert set(data.sources.tolist()) == {"photo"}
    again = data_module.load_dataset("photos", cache_dir=tmp_path / "cache")  # from the cache
    assert np.array_equal(again.images, data.images)
    squares = photos.heldout_photos(tmp_path, size=32)
    assert len(squares) == len(held_keys) and squares[0][1].shape == (32, 32, 3)


def test_weights_carry_every_training_credit() -> None:
    text = data_module.attribution_text({"photo"})
    sources = photos.read_sources()
    assert all(s.author in text and s.licence in text for s in sources if s.role == "train")
    assert not any(s.author in text for s in sources if s.role == "heldout")
    assert "CC-BY-SA-4.0" in photos.WEIGHTS_LICENCE_PHOTO
    table = photos.attribution_markdown()
    assert all(f"| {s.title} | {s.author} | {s.licence} |" in table for s in sources if s.role == "train")


def test_extend_opens_on_the_photo_model_only_where_the_page_runs_a_bundled_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    statuses = {hub.DEFAULT_MODEL: "bundled", hub.PHOTO_MODEL: "bundled", "EAR-adaLN-L": "cached"}
    monkeypatch.setattr(hub, "list_models", lambda: [hub.ModelStatus(n, "", "", s, 0)
                                                     for n, s in statuses.items()])
    choices = [(n, n) for n in statuses]
    assert extend_model(hub.DEFAULT_MODEL, choices) == hub.PHOTO_MODEL
    assert extend_model("EAR-adaLN-L", choices) == "EAR-adaLN-L"
    statuses[hub.PHOTO_MODEL] = "missing"
    assert extend_model(hub.DEFAULT_MODEL, choices) == hub.DEFAULT_MODEL
