"""A small convolutional VQ tokenizer for the embedded model (64x64 images <-> 16x16 token grids).

Why this design:
- Factorised, L2-normalised codes (lookup in a low-dimensional unit sphere, as in ViT-VQGAN/
  Improved VQGAN) make nearest-neighbour search well conditioned and keep most codes alive.
- The codebook is updated by exponential moving averages (k-means style) rather than by gradients,
  and codes that stop being chosen are restarted on random encoder outputs, so a short CPU training
  run still ends with high codebook usage.
- Normalisation is per pixel (across channels only), never across space, so the network is fully
  local: it can be trained on crops and applied to whole images with identical statistics.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ear.tokenizer.base import Tokenizer


@dataclass
class ConvVQConfig:
    """Shape and quantiser hyper-parameters; every field is stored in config.json["tokenizer"]."""

    image_size: int = 64
    grid_size: int = 16
    codebook_size: int = 512
    codebook_dim: int = 8
    channels: tuple[int, ...] = (32, 64, 128)  # widths at full, 1/2, 1/4 ... resolution
    enc_blocks: int = 1  # residual blocks per resolution below full size in the encoder
    dec_blocks: int = 2  # same in the decoder (decoding carries most of the detail)
    ema_decay: float = 0.95
    commitment: float = 0.25
    dead_threshold: float = 0.03  # EMA assignments per batch under which a code is restarted

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        factor = self.image_size // self.grid_size
        if factor * self.grid_size != self.image_size or factor & (factor - 1):
            raise ValueError(f"image_size/grid_size must be a power of two, got "
                             f"{self.image_size}/{self.grid_size}")
        if len(self.channels) != factor.bit_length():
            raise ValueError(f"need {factor.bit_length()} channel widths for a downsampling factor "
                             f"of {factor}, got {self.channels}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ConvVQConfig:
        """Build from a config.json section, ignoring keys like "type" that are not fields."""
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in d.items() if k in names})


class PixelNorm(nn.Module):
    """LayerNorm over channels at each pixel: spatially local, so crops and full images agree."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResBlock(nn.Module):
    """Pre-norm residual block; the last conv starts at zero so each block starts as identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            PixelNorm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            PixelNorm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Encoder(nn.Module):
    """Full resolution has a single conv (cheap on CPU); capacity sits at the coarser levels."""

    def __init__(self, cfg: ConvVQConfig) -> None:
        super().__init__()
        ch = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(3, ch[0], 3, padding=1)]
        for c_in, c_out in itertools.pairwise(ch):
            layers.append(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1))
            layers.extend(ResBlock(c_out) for _ in range(cfg.enc_blocks))
        layers += [PixelNorm(ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], cfg.codebook_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """Mirror of the encoder with nearest-neighbour upsampling (no checkerboard artefacts)."""

    def __init__(self, cfg: ConvVQConfig) -> None:
        super().__init__()
        ch = cfg.channels[::-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.codebook_dim, ch[0], 3, padding=1)]
        layers.extend(ResBlock(ch[0]) for _ in range(cfg.dec_blocks))
        for level, (c_in, c_out) in enumerate(itertools.pairwise(ch), start=1):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1)]
            if level < len(ch) - 1:  # full resolution gets no blocks: too costly on CPU
                layers.extend(ResBlock(c_out) for _ in range(cfg.dec_blocks))
        layers += [PixelNorm(ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class EMAQuantizer(nn.Module):
    """Nearest L2-normalised code with an EMA-updated codebook and dead-code restarts."""

    def __init__(self, size: int, dim: int, decay: float, dead_threshold: float) -> None:
        super().__init__()
        self.size, self.dim, self.decay, self.dead_threshold = size, dim, decay, dead_threshold
        embed = F.normalize(torch.randn(size, dim), dim=1)
        self.register_buffer("embed", embed)
        self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("cluster_size", torch.ones(size))

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed)

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """flat: (N, dim) unit vectors -> (N,) ids. On the sphere, max dot product = min L2."""
        return (flat @ self.embed.t()).argmax(dim=1)

    @torch.no_grad()
    def update(self, flat: torch.Tensor, ids: torch.Tensor) -> None:
        """One k-means-like EMA step; statistics are summed over processes when distributed."""
        onehot = F.one_hot(ids, self.size).to(flat.dtype)
        counts = onehot.sum(0)
        sums = onehot.t() @ flat
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self.embed.copy_(F.normalize(self.embed_sum, dim=1))
        dead = self.cluster_size < self.dead_threshold
        n_dead = int(dead.sum())
        if n_dead:
            picks = flat[torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)]
            if distributed:  # every process must restart dead codes with the same vectors
                torch.distributed.broadcast(picks, 0)
            self.embed[dead] = picks
            self.embed_sum[dead] = picks
            self.cluster_size[dead] = 1.0

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z: (B, dim, g, g) -> (straight-through quantised z, ids (B, g, g), commitment loss)."""
        b, d, h, w = z.shape
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d).float(), dim=1)
        ids = self.nearest(flat)
        if self.training:
            self.update(flat, ids)
        q = self.codes(ids)
        commit = F.mse_loss(flat, q.detach())
        q = flat + (q - flat).detach()
        q = q.view(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)
        return q, ids.view(b, h, w), commit


class ConvVQ(Tokenizer):
    """64x64 RGB <-> 16x16 grid of ids in [0, codebook_size)."""

    def __init__(self, config: ConvVQConfig | None = None) -> None:
        super().__init__()
        self.config = config or ConvVQConfig()
        c = self.config
        self.codebook_size, self.grid_size, self.image_size = c.codebook_size, c.grid_size, c.image_size
        self.encoder = Encoder(c)
        self.quantizer = EMAQuantizer(c.codebook_size, c.codebook_dim, c.ema_decay, c.dead_threshold)
        self.decoder = Decoder(c)

    def forward(self, images: torch.Tensor, frozen_codes: bool = False) -> dict[str, torch.Tensor]:
        """Training pass -> {"loss", "l1", "l2", "commit" (scalars), "recon" (unclamped, so the pixel
        loss keeps its gradient near the range ends), "ids"}. A plain dict so DDP can handle it.

        frozen_codes: encoder and codebook stay exactly as they are (no gradient, no EMA update), so
        only the decoder learns. Why: token grids an EAR was trained on stay valid while the
        pictures it decodes get sharper."""
        if frozen_codes:
            with torch.no_grad():
                ids = self.encode(images)
            q = self.quantizer.codes(ids).permute(0, 3, 1, 2).to(images.dtype)
            commit = torch.zeros((), device=images.device)
        else:
            q, ids, commit = self.quantizer(self.encoder(images))
        recon = self.decoder(q).float()
        l1 = (recon - images).abs().mean()
        l2 = F.mse_loss(recon, images)
        loss = l1 + l2 + self.config.commitment * commit
        return {"loss": loss, "l1": l1, "l2": l2, "commit": commit, "recon": recon, "ids": ids}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        z = self.encoder(images.to(self.quantizer.embed.dtype))
        d = z.shape[1]
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d).float(), dim=1)
        g = self.grid_size
        return self.quantizer.nearest(flat.to(self.quantizer.embed.dtype)).view(-1, g, g)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        self.check_tokens(tokens)
        q = self.quantizer.codes(tokens.to(self.quantizer.embed.device)).permute(0, 3, 1, 2)
        return self.decoder(q).clamp(-1, 1)
