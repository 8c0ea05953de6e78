"""ear.hub: loading through a real Hugging Face cache layout (offline), overrides, bad files."""

from __future__ import annotations

import argparse
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch

from ear import hub
from ear.hub import HubFile, ModelEntry
from ear.model import EAR, EARConfig
from ear.pipeline import EARPipeline
from tests.helpers import add_to_hub_cache, write_tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _own_files(folder: Path) -> dict[str, Path]:
    return {name: folder / name for name in hub.OWN_FILES.values()}


def test_own_format_repo_loads_through_hf_hub_download(hub_cache: Path, tiny_dir: Path) -> None:
    add_to_hub_cache(hub_cache, "someone/tiny-ear", _own_files(tiny_dir))
    pipe = EARPipeline.from_pretrained("someone/tiny-ear")
    info = pipe.info()
    assert info["source"] == "hf://someone/tiny-ear" and info["cached"] is True
    assert len(pipe.generate(0, seed=0, display_size=32)) == 1


def test_pinned_revision(hub_cache: Path, tiny_dir: Path) -> None:
    add_to_hub_cache(hub_cache, "someone/pinned", _own_files(tiny_dir), revision="v1")
    assert hub.load("someone/pinned", model_revision="v1").name == "tiny-test"
    with pytest.raises(ValueError, match=r"revision main\).*HF_HUB_OFFLINE is set"):
        hub.load("someone/pinned")


# ---- the official format: .pt training checkpoints + XQGAN tokenizer ----------------------------

TINY_EAR = EARConfig(dim=32, n_layer=1, n_head=2, vocab_size=32, num_classes=5, grid_size=4)


def _tiny_xqgan_config():
    from ear.tokenizer.xqgan import XQGANConfig

    return XQGANConfig(image_size=16, patch_size=4, dim=16, depth=1, num_heads=2, codebook_size=32,
                       codebook_dim=4)


def _official_files(folder: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """Checkpoints saved like the official training scripts: weights under "model" next to
    optimizer state and an argparse.Namespace (which weights-only loading refuses)."""
    from ear.tokenizer.xqgan import XQGAN

    torch.manual_seed(0)
    model_sd = EAR(TINY_EAR).state_dict()
    ear_pt, tok_pt = folder / "ear-tiny.pt", folder / "xqgan-tiny.pt"
    torch.save({"model": model_sd, "optimizer": {"state": {}}, "steps": 3,
                "args": argparse.Namespace(lr=1e-4)}, ear_pt)
    tok_sd = XQGAN(_tiny_xqgan_config()).state_dict()
    torch.save({"model": {**tok_sd, "semantic_model.blocks.0.weight": torch.zeros(2)}, "ema": tok_sd,
                "args": argparse.Namespace(ema=True)}, tok_pt)
    return ear_pt, tok_pt, model_sd


@pytest.fixture
def tiny_official(hub_cache: Path, tmp_path: Path, monkeypatch) -> dict[str, torch.Tensor]:
    """A registry entry shaped like EAR-adaLN-B but tiny, its files in the Hub cache; the
    tokenizer only under the repo's other spelling (qiuk6/RobusTok)."""
    pytest.importorskip("ear.tokenizer.xqgan")
    ear_pt, tok_pt, model_sd = _official_files(tmp_path)
    add_to_hub_cache(hub_cache, "FoodBamboo/EAR", {"EAR-adaLN-T.pt": ear_pt})
    add_to_hub_cache(hub_cache, "qiuk6/RobusTok", {"XQGAN-8192.pt": tok_pt})
    entry = ModelEntry(name="EAR-adaLN-T", description="tiny",
                       model=HubFile("FoodBamboo/EAR", "EAR-adaLN-T.pt"), tokenizer=hub.XQGAN_FILE,
                       ear_config=lambda: TINY_EAR, tokenizer_config=_tiny_xqgan_config,
                       presets=hub.official_presets("L"))
    monkeypatch.setitem(hub.REGISTRY, entry.name, entry)
    return model_sd


def test_official_checkpoints_load_from_the_hub_cache(tiny_official) -> None:
    pipe = EARPipeline.from_pretrained("EAR-adaLN-T")
    for key, value in tiny_official.items():
        assert torch.equal(pipe.model.state_dict()[key], value)
    assert pipe.default_settings.cfg_scale == 1.45 and pipe.default_settings.top_k == 100
    assert pipe.presets["fid"].cfg_scale == 1.45 and pipe.presets["fid"].top_k == 0
    assert pipe.info()["cached"] is True
    assert pipe.generate([0, 4], seed=0, display_size=16)[1].size == (16, 16)
    status = {row.name: row.status for row in hub.list_models()}
    assert status["EAR-adaLN-T"] == "cached"
    assert status["EAR-adaLN-B"] == "partly cached"  # it shares the cached tokenizer, not the model


def test_official_local_file_override(tiny_official, tmp_path: Path) -> None:
    ear_pt = tmp_path / "ear-tiny.pt"
    loaded = hub.load("EAR-adaLN-T", model_file=str(ear_pt))
    assert loaded.source.startswith(str(ear_pt))


def test_overrides_come_from_keywords_then_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EAR_TOKENIZER_REPO", "me/tok-fork")
    monkeypatch.setenv("EAR_TOKENIZER_REVISION", "abc123")
    monkeypatch.setenv("EAR_MODEL_FILE", "EAR-adaLN-B-ema.pt")
    overrides = hub.overrides_from({"tokenizer_repo": "me/explicit", "model_revision": None})
    tok = hub.apply_overrides(hub.XQGAN_FILE, "tokenizer", overrides)
    assert tok == HubFile("me/explicit", "XQGAN-8192.pt", "abc123")  # no alternates once overridden
    model = hub.apply_overrides(hub.REGISTRY["EAR-adaLN-B"].model, "model", overrides)
    assert model == HubFile("FoodBamboo/EAR", "EAR-adaLN-B-ema.pt", None)
    local = tmp_path / "weights.pt"
    local.write_bytes(b"x")
    assert hub.apply_overrides(hub.XQGAN_FILE, "tokenizer", {"tokenizer_file": str(local)}) == local
    with pytest.raises(ValueError, match="allowed: model_repo"):
        hub.overrides_from({"model_branch": "x"})


def test_offline_and_not_cached_is_one_clear_sentence(hub_cache: Path) -> None:
    with pytest.raises(ValueError) as info:
        EARPipeline.from_pretrained("EAR-adaLN-B")
    message = str(info.value)
    assert message.startswith("EAR-adaLN-B is not downloaded yet (model FoodBamboo/EAR/EAR-adaLN-B.pt")
    assert "HF_HUB_OFFLINE is set" in message and "--model-file" in message
    assert "python -m ear download EAR-adaLN-B" in message and "\n" not in message
    with pytest.raises(ValueError, match="not downloaded yet"):
        hub.download("EAR-adaLN-B")


def test_unresolvable_hub_answers_at_once_and_still_uses_the_cache(hub_cache: Path, tiny_dir: Path,
                                                                    monkeypatch) -> None:
    """Online mode on a machine without DNS: no waiting on huggingface_hub's retries."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_dns(*args, **kwargs):
        raise socket.gaierror("Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(ValueError, match="the Hugging Face Hub cannot be reached"):
        hub.load("EAR-adaLN-B")
    add_to_hub_cache(hub_cache, "someone/tiny-ear", _own_files(tiny_dir))
    assert hub.load("someone/tiny-ear").name == "tiny-test"


def test_download_returns_cached_paths(hub_cache: Path, tiny_dir: Path) -> None:
    add_to_hub_cache(hub_cache, "someone/tiny-ear", _own_files(tiny_dir))
    paths = hub.download("someone/tiny-ear")
    assert sorted(p.name for p in paths) == sorted(hub.OWN_FILES.values())
    assert hub.download("ear-emoji") == []
    with pytest.raises(ValueError, match="Nothing to download"):
        hub.download("not-a-model")


def test_unknown_model_lists_the_registry(hub_cache: Path) -> None:
    listed = r"Unknown model 'ear-emoj'.*ear-emoji, ear-photo, radar-emoji, EAR-adaLN-B"
    with pytest.raises(ValueError, match=listed):
        hub.load("ear-emoj")


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize(
    ("damage", "phrase"),
    [
        (lambda d: (d / "ear.safetensors").write_bytes((d / "ear.safetensors").read_bytes()[:500]),
         "Cannot read the EAR checkpoint"),
        (lambda d: (d / "tokenizer.safetensors").write_bytes(b"\0" * 64), "Cannot read the tokenizer"),
        (lambda d: (d / "config.json").write_text("{not json"), "is not valid"),
        (lambda d: (d / "config.json").write_text('{"format": "other"}'), "is not valid"),
        (lambda d: (d / "tokenizer.safetensors").unlink(), "lacks tokenizer.safetensors"),
    ],
)
def test_damaged_model_folders(tmp_path: Path, tiny_dir: Path, damage, phrase: str) -> None:
    folder = _copy_model(tiny_dir, tmp_path / "m")
    damage(folder)
    with pytest.raises(ValueError, match=phrase) as info:
        hub.load(str(folder))
    assert "\n" not in str(info.value)


def test_mismatched_weights_are_named(tmp_path: Path, tiny_dir: Path) -> None:
    other = write_tiny_model(tmp_path / "other", codebook=16)
    folder = _copy_model(tiny_dir, tmp_path / "m")
    (folder / "ear.safetensors").write_bytes((other / "ear.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"does not fit the expected model.*tok_embeddings.weight"):
        hub.load(str(folder))
    folder = _copy_model(tiny_dir, tmp_path / "m2")
    (folder / "tokenizer.safetensors").write_bytes((other / "tokenizer.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not fit the expected tokenizer"):
        hub.load(str(folder))


def test_truncated_and_malicious_official_files(hub_cache: Path, tmp_path: Path) -> None:
    torch.save({"model": EAR(TINY_EAR).state_dict()}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="Cannot read the EAR checkpoint"):
        hub.load(str(tmp_path / "cut.pt"))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": Evil()}, f, protocol=2)
    with pytest.raises(ValueError, match="Cannot read the EAR checkpoint"):
        hub.load(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "pwned").exists()


def test_not_an_official_size(hub_cache: Path, tmp_path: Path) -> None:
    torch.save({"model": EAR(TINY_EAR).state_dict()}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="not a released EAR-adaLN checkpoint"):
        hub.load(str(tmp_path / "odd.pt"))


def test_bundled_model_status() -> None:
    row = next(r for r in hub.list_models() if r.name == hub.DEFAULT_MODEL)
    complete = all((hub.ASSETS / "ear-emoji" / f).is_file() for f in hub.OWN_FILES.values())
    assert row.status == ("bundled" if complete else "missing")


def test_imagenet_class_names() -> None:
    names = hub.imagenet_class_names(1000)
    assert len(names) == 1000 and len(set(names)) > 990
    assert names[0] == "tench, Tinca tinca" and names[207] == "golden retriever"
    assert hub.imagenet_class_names(10) == [f"class {i}" for i in range(10)]
