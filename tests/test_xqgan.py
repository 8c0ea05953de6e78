"""XQGAN tokenizer: official reference vectors, official key layout, loading, no downloads."""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ear.tokenizer import Tokenizer
from ear.tokenizer.xqgan import XQGAN, XQGANConfig

# A 4x4-patch model that runs in milliseconds, for behaviour that does not need reference data.
SMALL = XQGANConfig(image_size=16, patch_size=4, dim=16, depth=1, num_heads=2, codebook_size=32,
                    codebook_dim=4)


@pytest.fixture(scope="module")
def small() -> XQGAN:
    torch.manual_seed(0)
    return XQGAN(SMALL).eval()


@pytest.fixture(scope="module")
def reference(conformance_dir: Path) -> tuple[XQGAN, dict[str, torch.Tensor], dict]:
    folder = conformance_dir / "xqgan"
    model = XQGAN.from_state_dict(load_file(folder / "xqgan_tiny.safetensors"),
                                  XQGANConfig.tiny(folder / "xqgan_tiny.json"))
    spec = json.loads((folder / "xqgan_tiny.json").read_text())
    return model, load_file(folder / "xqgan_tiny_vectors.safetensors"), spec


@pytest.fixture(scope="module")
def raw_decoded(reference) -> torch.Tensor:
    model, vectors, _ = reference
    return model.decode(vectors["codes"], clamp=False)  # official sampler: raw codebook rows, no clamp


def test_conformance_state_dict_layout(reference):
    model, _, spec = reference
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == spec["state_dict_keys"]
    assert model.ignored_keys == ("quantize.ema_vocab_hit_SV",)


def test_conformance_decode(reference, raw_decoded):
    model, vectors, _ = reference
    assert (raw_decoded - vectors["decoded"]).abs().max() < 2e-6
    clamped = model.decode(vectors["codes"])
    assert (clamped - vectors["decoded_clamped"]).abs().max() < 2e-6
    assert clamped.min() >= -1 and clamped.max() <= 1


def test_conformance_encode(reference):
    model, vectors, _ = reference
    with torch.no_grad():
        features = model.encode_features(vectors["image"])
    assert (features - vectors["encoded_features"]).abs().max() < 2e-6
    codes = model.encode(vectors["image"])
    assert codes.dtype == torch.int64 and codes.shape == (2, 16, 16)
    decisive = vectors["encoded_margin"] > 1e-4  # 511 of 512 cells
    assert torch.equal(codes[decisive], vectors["encoded_codes"][decisive])


def test_conformance_batch_items_are_independent(reference, raw_decoded):
    model, vectors, _ = reference
    alone = model.decode(vectors["codes"][1:], clamp=False)[0]
    assert (alone - raw_decoded[1]).abs().max() < 1e-5


def test_conformance_full_size_matches_official_manifest(conformance_dir):
    """Shapes only: built on the meta device, so the 172M parameters are never allocated."""
    manifest = json.loads((conformance_dir / "xqgan" / "xqgan_vq16_keys.json").read_text())
    with torch.device("meta"):
        model = XQGAN(XQGANConfig.official())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected: dict[str, list[int]] = {}
    for name, group in manifest["groups"].items():
        if {"encode", "decode"} & set(group["role"]):
            expected.update(group["keys"])
            assert sum(torch.Size(s).numel() for k, s in ours.items() if k.startswith(name + ".")) \
                == group["num_params"], name
        else:
            assert not any(k.startswith(name + ".") for k in ours), f"{name} is training-only"
    assert ours == expected
    assert (model.grid_size, model.image_size, model.codebook_size) == (16, 256, 8192)


def test_interface_and_validation(small):
    assert isinstance(small, Tokenizer)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    codes = small.encode(images)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < SMALL.codebook_size
    decoded = small.decode(codes)
    assert decoded.shape == (3, 3, 16, 16) and decoded.abs().max() <= 1
    assert not decoded.requires_grad
    with pytest.raises(ValueError, match="shape"):
        small.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="token ids"):
        small.decode(torch.full((1, 4, 4), SMALL.codebook_size))
    with pytest.raises(ValueError, match="patch_size"):
        XQGANConfig(image_size=256, patch_size=8)


def test_official_checkpoint_layout_loads_and_reports_ignored(small, tmp_path):
    """A training checkpoint as the tokenizer's script saves it, with the frozen semantic ViT."""
    sd = dict(small.state_dict())
    sd["quantize.ema_vocab_hit_SV"] = torch.rand(SMALL.codebook_size)
    semantic = {f"semantic_model.{k}": v for k, v in small.encoder.model.state_dict().items()}
    model_entry = {f"module.{k}": v for k, v in {**sd, **semantic}.items()}  # saved from DDP
    checkpoint = {"model": model_entry, "ema": model_entry, "optimizer": {"state": {}, "param_groups": []},
                  "discriminator": {"conv.weight": torch.zeros(1)}, "optimizer_disc": {}, "steps": 10,
                  "args": argparse.Namespace(vq_model="VQ-16")}
    path = tmp_path / "XQGAN-8192.pt"
    torch.save(checkpoint, path)
    loaded = XQGAN.from_checkpoint(path, SMALL)
    assert set(loaded.ignored_keys) == {"ema", "optimizer", "discriminator", "optimizer_disc", "steps",
                                        "args", "quantize.ema_vocab_hit_SV", *semantic}
    codes = torch.randint(0, SMALL.codebook_size, (2, 4, 4))
    assert torch.equal(loaded.decode(codes), small.decode(codes))
    assert not loaded.training


def test_loading_is_strict_for_inference_weights(small):
    sd = dict(small.state_dict())
    with pytest.raises(ValueError, match=r"missing decoder\.mask_token"):
        XQGAN.from_state_dict({k: v for k, v in sd.items() if k != "decoder.mask_token"}, SMALL)
    with pytest.raises(ValueError, match=r"unexpected encoder\.extra"):
        XQGAN.from_state_dict({**sd, "encoder.extra": torch.zeros(1)}, SMALL)
    with pytest.raises(ValueError, match="quant_conv"):
        XQGAN.from_state_dict({**sd, "quant_conv.bias": torch.zeros(5)}, SMALL)
    without_usage = {k: v for k, v in sd.items() if k != "quantize.ema_vocab_hit_SV"}
    assert XQGAN.from_state_dict(without_usage, SMALL).ignored_keys == ()


def test_building_downloads_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var))

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    model = XQGAN.from_state_dict(XQGAN(SMALL).state_dict(), SMALL)
    model.decode(model.encode(torch.zeros(1, 3, 16, 16)))
    with torch.device("meta"):
        XQGAN()
    assert not any(tmp_path.iterdir())
