"""The shipped default model (assets/ear-emoji) loads, reconstructs and generates real pictures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ear.pipeline import EARPipeline

ASSET = Path(__file__).resolve().parents[1] / "assets" / "ear-emoji"


@pytest.fixture(scope="module")
def pipe() -> EARPipeline:
    return EARPipeline.from_pretrained(str(ASSET), device="cpu")


def test_asset_files_and_config() -> None:
    config = json.loads((ASSET / "config.json").read_text())
    assert config["format"] == "ear-studio/1" and config["tokenizer"]["type"] == "conv_vq"
    assert config["model"]["schedule"] == "arms" and config["model"]["adaln"]
    # one class embedding per emoji, style and drawing: a sample follows one drawing of one artist
    assert config["styles"] == ["Twemoji", "Noto"] and config["drawings"] == 3
    assert len(config["class_names"]) * 2 * 3 == config["model"]["num_classes"]
    assert {"twitter", "google", "twitter-2014", "google-2016"} <= set(config["image_sets"])
    # one class per emoji, named by its CLDR short name; old and everyday names still find one
    assert {"red heart", "grinning face", "flag: Japan"} <= set(config["class_names"])
    assert config["default_class"] in config["class_names"]
    assert config["class_aliases"]["heart"] == "red heart"
    assert set(config["class_aliases"].values()) <= set(config["class_names"])
    assert set(config["presets"]["default"]) == {"cfg_scale", "temperature", "top_k", "top_p"}
    assert all(name in config["attribution"] for name in ("Twemoji", "Noto", "twemoji 1.4.1", "noto-v1"))
    assert (ASSET / "ATTRIBUTION.md").is_file()
    weights = sum((ASSET / f).stat().st_size for f in ("ear.safetensors", "tokenizer.safetensors"))
    assert weights <= 50 * 2**20


def test_tokenizer_reconstructs_a_simple_emoji(pipe: EARPipeline) -> None:
    """A yellow disc on white, the most emoji-like picture one can draw without data files."""
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disc = ((yy - 31.5) ** 2 + (xx - 31.5) ** 2 < 24**2).float()
    image = torch.ones(1, 3, 64, 64)
    image[0, 2] -= 1.8 * disc  # yellow: red and green stay at 1, blue drops to -0.8
    recon = pipe.tokenizer.decode(pipe.tokenizer.encode(image))
    psnr = 10 * torch.log10(4 / (recon - image).pow(2).mean())
    assert psnr > 18  # an untrained tokenizer gives about 10 dB


def _generate(pipe: EARPipeline, class_id: int, seed: int) -> np.ndarray:
    image = pipe.generate([class_id], seed=seed, display_size=64)[0]
    return np.asarray(image.convert("RGB")).astype(np.float32)


def test_generation_is_not_degenerate(pipe: EARPipeline) -> None:
    first = pipe.class_id(pipe.default_class)
    other = (first + len(pipe.class_names) // 2) % len(pipe.class_names)
    a, b, c = _generate(pipe, first, 0), _generate(pipe, first, 1), _generate(pipe, other, 0)
    for image in (a, b, c):
        assert image.std() > 10, "a generated image is (nearly) a single colour"
    assert np.abs(a - b).mean() > 2, "different seeds gave the same picture"
    assert np.abs(a - c).mean() > 2, "different classes gave the same picture"
    assert np.array_equal(a, _generate(pipe, first, 0)), "the same seed must give the same picture"


def test_colour_follows_the_class(pipe: EARPipeline) -> None:
    """Hearts of different colours: the centre of each sample leans to its own colour."""
    assert pipe.class_id("heart") == pipe.class_id("red heart") == pipe.class_id("Red Heart")
    def centre(name: str, seed: int) -> np.ndarray:
        return _generate(pipe, pipe.class_id(name), seed)[16:48, 16:48].reshape(-1, 3).mean(0)

    for seed in range(2):
        red, green, blue = (centre(f"{c} heart", seed) for c in ("red", "green", "blue"))
        assert red[0] > red[1] + 40 and green[1] > green[0] + 20 and blue[2] > blue[0] + 40, seed


def test_each_style_is_its_own_drawing(pipe: EARPipeline) -> None:
    """Seeds of one style take its drawings in turn (3 here: today's, an earlier release's or a
    skin tone, a 2 px shift): the same drawing again gives (nearly) the same picture, another
    drawing a clearly different one, and the two styles differ: a sample follows one drawing, not
    a mix of several."""
    def picture(style: str, seed: int) -> np.ndarray:
        image = pipe.generate("grinning face", seed=seed, style=style, display_size=64)[0]
        return np.asarray(image.convert("RGB")).astype(np.float32)

    assert pipe.drawings == 3
    for style in ("Twemoji", "Noto"):
        first, other, again = picture(style, 0), picture(style, 1), picture(style, 3)  # drawings 0, 1, 0
        same, apart = np.abs(first - again).mean(), np.abs(first - other).mean()
        assert apart > 10 and apart > 3 * same, (style, apart, same)
    assert np.abs(picture("Twemoji", 0) - picture("Noto", 0)).mean() > 10
