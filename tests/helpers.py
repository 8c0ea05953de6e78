"""Tiny models for pipeline/preview/hub/CLI tests: random weights, real on-disk layouts.

`write_tiny_model` writes a folder in our own format (docs/api.md: config.json, ear.safetensors,
tokenizer.safetensors) so that loading is exercised exactly as for the bundled model.
`PaletteTokenizer` is a deterministic tokenizer whose decode(encode(x)) is a blocky version of x,
so tests can check that extension really keeps the user's picture.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ear.model import EAR, EARConfig
from ear.tokenizer import Tokenizer
from ear.tokenizer.conv_vq import ConvVQ, ConvVQConfig

CLASS_NAMES = ["cat", "dog", "fish, goldfish"]


def tiny_ear(vocab: int, grid: int = 8, num_classes: int = len(CLASS_NAMES), seed: int = 0,
             std: float = 0.3, **config: object) -> EAR:
    """A 2-layer EAR with loud random weights (the default init zeroes the output head, which
    would make every logit equal and hide position or step mix-ups)."""
    fields = {"dim": 32, "n_layer": 2, "n_head": 2, **config}
    model = EAR(EARConfig(vocab_size=vocab, num_classes=num_classes, grid_size=grid, **fields))
    return noisy_weights(model, std, seed).eval()


def noisy_weights(model: EAR, std: float, seed: int = 0) -> EAR:
    """Every parameter drawn from N(0, std²), seeded, on the model's own device (XL is 4.4 GB in
    float32: no CPU round trip). `EAR()` zero-initialises the head and adaLN, so its logits are all
    0 and every comparison of two decode paths would pass trivially."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=device) * std)
    return model


def same_picture(a: object, b: object) -> bool:
    """Pixels equal within rounding: a decode in another batch shape (or on another x86 CPU) may
    differ by ~1e-6 before quantisation, so a pixel may land one level apart, never more."""
    x, y = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    return x.shape == y.shape and int(np.abs(x - y).max(initial=0)) <= 1


def is_skip(value: object) -> bool:
    """Whether a handler's output is `gr.skip()` (leave that component as it is)."""
    return isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1


def noisy_model(seed: int = 0, grid_size: int = 8, **config: object) -> EAR:
    """The engine tests' model: 64 codes, 10 classes (id 10 is the null class), 4 heads."""
    return tiny_ear(64, grid_size, num_classes=10, seed=seed, std=0.2,
                    **{"dim": 64, "n_head": 4, **config})


def tiny_conv_vq(grid: int = 8, codebook: int = 32, seed: int = 0) -> ConvVQ:
    torch.manual_seed(seed)
    config = ConvVQConfig(image_size=grid * 4, grid_size=grid, codebook_size=codebook, codebook_dim=4,
                          channels=(8, 16, 16), enc_blocks=1, dec_blocks=1)
    return ConvVQ(config).eval()


def write_tiny_model(folder: Path, grid: int = 8, codebook: int = 32, seed: int = 0,
                     styles: list[str] | None = None, shared: bool = False, model: EAR | None = None,
                     drawings: int = 1) -> Path:
    """A complete random model folder in our format; returns the folder. With `styles`, one class
    embedding per (class, style) (`drawings` of them), or with `shared` one per class plus one per
    style. `model` replaces the random EAR."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_conv_vq(grid, codebook, seed)
    count = len(styles or [])
    labels = len(CLASS_NAMES) * (1 if shared else max(1, count) * drawings)
    model = model or tiny_ear(codebook, grid, seed=seed, num_classes=labels,
                              num_styles=count if shared else 0)
    config = {
        "name": "tiny-test", "format": "ear-studio/1", "model": model.config.to_dict(),
        "tokenizer": {"type": "conv_vq", **tokenizer.config.to_dict()}, "class_names": CLASS_NAMES,
        "presets": {"default": {"cfg_scale": 1.5, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
                    "greedyish": {"cfg_scale": 1.0, "temperature": 0.5, "top_k": 4, "top_p": 0.9}},
        "licence": "MIT (test)", "attribution": "random weights",
        "default_class": CLASS_NAMES[1], "class_aliases": {"puppy": CLASS_NAMES[1]},
        **({"styles": styles} if styles else {}),
        **({"drawings": drawings} if drawings > 1 else {}),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.half() for k, v in model.state_dict().items()}, folder / "ear.safetensors")
    save_file(tokenizer.state_dict(), folder / "tokenizer.safetensors")
    return folder


def add_to_hub_cache(cache: Path, repo_id: str, files: dict[str, Path], revision: str = "main") -> str:
    """Place files in a Hugging Face Hub cache exactly as huggingface_hub lays it out
    (models--org--name/{blobs,snapshots/<commit>,refs/<revision>}); returns the commit hash."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for sub in (repo / "blobs", snapshot, repo / "refs"):
        sub.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs" / revision).write_text(commit)
    return commit


def offline_hub_cache(monkeypatch, root: Path) -> Path:
    """Point huggingface_hub at an empty cache under `root`, offline, with no EAR_* overrides.
    huggingface_hub reads HF_HOME/HF_HUB_CACHE/HF_HUB_OFFLINE once at import, so its module
    constants are patched as well as the environment (which subprocesses inherit)."""
    from huggingface_hub import constants

    cache = root / "hf" / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for key in [k for k in os.environ if k.startswith("EAR_")]:
        monkeypatch.delenv(key)
    return cache


class PaletteTokenizer(Tokenizer):
    """Token = nearest of levels^3 flat colours to a patch's mean; decode paints flat patches."""

    def __init__(self, grid: int = 8, patch: int = 4, levels: int = 4) -> None:
        super().__init__()
        self.grid_size, self.image_size, self.codebook_size = grid, grid * patch, levels ** 3
        axis = torch.linspace(-1, 1, levels)
        palette = torch.cartesian_prod(axis, axis, axis)
        self.register_buffer("palette", palette)
        self.patch = patch

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        means = F.avg_pool2d(images.float(), self.patch).permute(0, 2, 3, 1)  # (B, g, g, 3)
        return torch.cdist(means.flatten(1, 2), self.palette[None]).argmin(-1).view(-1, self.grid_size,
                                                                                   self.grid_size)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        self.check_tokens(tokens)
        colours = self.palette[tokens].permute(0, 3, 1, 2)
        return colours.repeat_interleave(self.patch, 2).repeat_interleave(self.patch, 3)
