"""XQGAN-8192: the ViT VQ tokenizer that the released EAR models generate tokens for.

Reference semantics: /work/shared/conformance/xqgan/README.md (the official ``VQ_16`` of the EAR
repository, DINOv2-style ViT encoder and decoder with 256 latent tokens and a 8192 x 32 codebook).
State-dict names and shapes equal the official ones, so a released checkpoint loads strictly.

The ViT blocks follow timm's pre-norm ``Block`` (LayerScale on, exact GELU, LayerNorm eps 1e-6)
with the same parameter names, written here rather than imported: timm drags in torchvision,
whose only wheels for this stack are CUDA builds that fail to import beside a CPU torch, and the
official constructor's ``create_model`` would download DINOv2 weights. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ear.checkpoint import DEFAULT_PREFER, load_checkpoint, unwrap_state_dict
from ear.tokenizer.base import Tokenizer

log = logging.getLogger(__name__)

# Entries of official checkpoints that inference does not use: the frozen DINOv2 that gave the
# training-time semantic loss, the GAN discriminator, and the codebook-usage statistics.
IGNORED_PREFIXES = ("semantic_model.", "discriminator.")
IGNORED_KEYS = ("quantize.ema_vocab_hit_SV",)


@dataclass(frozen=True)
class XQGANConfig:
    """Sizes of an XQGAN (VQ-16) tokenizer; defaults are the released XQGAN-8192."""

    image_size: int = 256
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    codebook_size: int = 8192
    codebook_dim: int = 32
    layer_scale_init: float = 1e-5  # DINOv2's LayerScale init; trained weights overwrite it

    def __post_init__(self) -> None:
        # The official model sizes its level ids from patch_size**2 + 1 and uses one latent per
        # patch, so it is only self-consistent when the patch grid is patch_size x patch_size.
        if self.image_size != self.patch_size ** 2:
            raise ValueError(f"XQGAN needs image_size == patch_size**2, got image_size="
                             f"{self.image_size}, patch_size={self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size ** 2

    @classmethod
    def official(cls) -> XQGANConfig:
        """The released XQGAN-8192 (``VQ_16(codebook_size=8192, codebook_embed_dim=32)``)."""
        return cls()

    @classmethod
    def tiny(cls, json_path: str | Path) -> XQGANConfig:
        """The tiny conformance instance described by ``xqgan_tiny.json``."""
        spec = json.loads(Path(json_path).read_text())
        vit, fixed, cfg = spec["vit_overrides"], spec["vit_fixed_kwargs"], spec["config"]
        config = cls(image_size=fixed["img_size"], patch_size=fixed["patch_size"], dim=vit["embed_dim"],
                     depth=vit["depth"], num_heads=vit["num_heads"], codebook_size=cfg["codebook_size"],
                     codebook_dim=cfg["codebook_embed_dim"])
        if cfg["num_latent_tokens"] != config.num_tokens:
            raise ValueError(f"{json_path}: {cfg['num_latent_tokens']} latent tokens, expected one per "
                             f"patch ({config.num_tokens})")
        return config


# --- transformer block ----------------------------------------------------------------------------

class _LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    """timm's pre-norm ViT block with LayerScale, same parameter names, no timm dependency."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, init_values: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads)
        self.ls1 = _LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = _LayerScale(dim, init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def _make_block(config: XQGANConfig) -> nn.Module:
    return _Block(config.dim, config.num_heads, config.mlp_ratio, config.layer_scale_init)


# --- encoder / decoder ----------------------------------------------------------------------------

class _ViT(nn.Module):
    """The timm ViT parts the official model uses: class token, 257-row position table
    (class + grid, added after the class token is prepended), blocks and final norm."""

    def __init__(self, config: XQGANConfig, patch_embed: bool) -> None:
        super().__init__()
        d = config.dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, config.num_tokens + 1, d) * 0.02)
        if patch_embed:  # named as in the checkpoint: encoder.model.patch_embed.proj.*
            self.patch_embed = nn.ModuleDict(
                {"proj": nn.Conv2d(3, d, config.patch_size, stride=config.patch_size)})
        self.blocks = nn.ModuleList(_make_block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def with_class_token(self, grid_tokens: torch.Tensor) -> torch.Tensor:
        """(B, g*g, D) -> (B, g*g + 1, D): prepend the class token, add the position table."""
        cls = self.cls_token.expand(grid_tokens.shape[0], -1, -1)
        return torch.cat([cls, grid_tokens], dim=1) + self.pos_embed

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def _level_ids(first: int, second: int) -> torch.Tensor:
    return torch.cat([torch.zeros(1, first, dtype=torch.long), torch.ones(1, second, dtype=torch.long)], 1)


class _Encoder(nn.Module):
    def __init__(self, config: XQGANConfig) -> None:
        super().__init__()
        n = config.num_tokens
        self.model = _ViT(config, patch_embed=True)
        self.latent_tokens = nn.Parameter(torch.randn(1, n, config.dim) * 0.02)
        self.lvl_embed = nn.Embedding(2, config.dim)
        # patch_size**2 + 1 image-side positions (level 0), then the latents (level 1).
        self.register_buffer("lvl1LC", _level_ids(config.patch_size ** 2 + 1, n))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, D, g, g) latent features."""
        patches = self.model.patch_embed["proj"](images)
        b, d, g, _ = patches.shape
        image_side = self.model.with_class_token(patches.flatten(2).transpose(1, 2))
        # The latents get the ViT's class-token/position treatment with the class slot dropped.
        latents = (self.latent_tokens + self.model.pos_embed[:, 1:]).expand(b, -1, -1)
        x = torch.cat([image_side, latents], dim=1) + self.lvl_embed(self.lvl1LC)
        x = self.model.transform(x)[:, -latents.shape[1]:]
        return x.transpose(1, 2).reshape(b, d, g, g)


class _Decoder(nn.Module):
    def __init__(self, config: XQGANConfig) -> None:
        super().__init__()
        n, p = config.num_tokens, config.patch_size
        self.patch_size = p
        self.model = _ViT(config, patch_embed=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.lvl_embed = nn.Embedding(2, config.dim)
        self.to_pixel = nn.ModuleDict({"model": nn.Linear(config.dim, 3 * p * p)})
        self.register_buffer("lvl1LC", _level_ids(p ** 2 + 1, n + 1))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, D, g, g) -> (B, 3, g*p, g*p), not clamped."""
        b, _, g, _ = latents.shape
        n, p = g * g, self.patch_size
        masks = self.model.with_class_token(self.mask_token.expand(1, n, -1)).expand(b, -1, -1)
        latents = self.model.with_class_token(latents.flatten(2).transpose(1, 2))  # class slot kept
        x = torch.cat([masks, latents], dim=1) + self.lvl_embed(self.lvl1LC)
        x = self.to_pixel["model"](self.model.transform(x)[:, 1:n + 1])  # the mask-token positions
        # Token t = (row, col) of the patch grid holds its pixels as (row-in-patch, col-in-patch, rgb).
        return x.view(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, g * p, g * p)


class _Codebook(nn.Module):
    def __init__(self, config: XQGANConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_dim)
        # Training-time usage statistics; kept so state-dict keys match the official model.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(config.codebook_size))

    def nearest(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, g, g) features -> (B, g, g) ids of the nearest L2-normalised codebook rows.

        On unit vectors the smallest Euclidean distance is the largest dot product; argmax breaks
        ties towards the lowest id, as the official argmin does. The codebook is normalised per
        call: 8192 x 32 is noise next to the transformer, and a cache could go stale on reload.
        """
        z = F.normalize(features.permute(0, 2, 3, 1), dim=-1)
        return (z @ F.normalize(self.embedding.weight, dim=-1).T).argmax(dim=-1)

    def rows(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, g, g) ids -> (B, C, g, g) raw (not normalised) rows, as the EAR samplers decode."""
        return self.embedding(codes).permute(0, 3, 1, 2)


class XQGAN(Tokenizer):
    """Image <-> 16x16 token grid with the tokenizer of the released EAR checkpoints."""

    def __init__(self, config: XQGANConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or XQGANConfig.official()
        self.codebook_size = config.codebook_size
        self.grid_size = config.grid_size
        self.image_size = config.image_size
        self.ignored_keys: tuple[str, ...] = ()
        self.encoder = _Encoder(config)
        self.quant_conv = nn.Conv2d(config.dim, config.codebook_dim, 1)
        self.quantize = _Codebook(config)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.dim, 1)
        self.decoder = _Decoder(config)

    # --- pixels -> tokens

    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, codebook_dim, g, g) pre-quantisation features."""
        self.check_images(images)
        weight = self.quant_conv.weight
        return self.quant_conv(self.encoder(images.to(device=weight.device, dtype=weight.dtype)))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantize.nearest(self.encode_features(images))

    # --- tokens -> pixels

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, codebook_dim, g, g) codebook vectors -> (B, 3, S, S), unclamped."""
        return self.decoder(self.post_quant_conv(latents))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """(B, g, g) ids -> (B, 3, S, S); clamped to [-1, 1] unless ``clamp=False``."""
        self.check_tokens(tokens)
        images = self.decode_latents(self.quantize.rows(tokens.to(self.quantize.embedding.weight.device)))
        return images.clamp(-1.0, 1.0) if clamp else images

    # --- loading

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any], config: XQGANConfig | None = None) -> XQGAN:
        """Build a tokenizer from an official state dict or checkpoint dict (``{"model": ...}``).

        Training-only entries (``IGNORED_PREFIXES``/``IGNORED_KEYS``, sibling checkpoint entries
        such as ``optimizer``) are ignored, listed in ``ignored_keys`` and logged; everything
        else must match exactly. Parameters are allocated once, without a random init.
        """
        sd, dropped = unwrap_state_dict(state_dict, DEFAULT_PREFER)
        ignored = [k for k in sd if k.startswith(IGNORED_PREFIXES) or k in IGNORED_KEYS]
        for key in ignored:
            del sd[key]
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device="cpu")
        model.quantize.ema_vocab_hit_SV.zero_()  # usage statistics are not loaded
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise ValueError(f"XQGAN state dict does not fit {model.config}: {exc}") from exc
        missing = [k for k in missing if k not in IGNORED_KEYS]
        if missing or unexpected:
            raise ValueError(f"XQGAN state dict does not match the model: missing {_summary(missing)}, "
                             f"unexpected {_summary(unexpected)}")
        model.ignored_keys = tuple(dropped + ignored)
        if model.ignored_keys:
            log.info("XQGAN: loaded %d tensors, ignored %s", len(sd), _summary(model.ignored_keys))
        return model.eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: XQGANConfig | None = None) -> XQGAN:
        """Load a released file such as ``XQGAN-8192.pt`` (see ``ear.checkpoint`` for safety)."""
        checkpoint = load_checkpoint(path)  # its errors already name the file
        try:
            model = cls.from_state_dict(checkpoint, config)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        norms = model.quantize.embedding.weight.norm(dim=1)
        log.info("XQGAN %s: codebook row norms min %.3f / mean %.3f / max %.3f", Path(path).name,
                 norms.min(), norms.mean(), norms.max())
        return model


def _summary(keys: Iterable[str]) -> str:
    """Group keys by their first component so 174 semantic_model.* keys read as one item."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.split(".", 1)[0], []).append(key)
    return ", ".join(f"{head}.* ({len(ks)})" if len(ks) > 1 else ks[0]
                     for head, ks in groups.items()) or "none"
