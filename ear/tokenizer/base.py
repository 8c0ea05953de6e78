"""The one interface every image tokenizer offers: pixels <-> a square grid of codebook ids."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class Tokenizer(nn.Module, ABC):
    """Images are float tensors (B, 3, image_size, image_size) in [-1, 1]; token grids are int64
    tensors (B, grid_size, grid_size) in raster layout with ids in [0, codebook_size)."""

    codebook_size: int
    grid_size: int
    image_size: int

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, g, g) int64 codes."""

    @abstractmethod
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, g, g) int64 codes -> (B, 3, H, W) float, clamped to [-1, 1]."""

    def check_images(self, images: torch.Tensor) -> None:
        want = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"images must have shape (B, {want[0]}, {want[1]}, {want[2]}), "
                             f"got {tuple(images.shape)}")

    def check_tokens(self, tokens: torch.Tensor) -> None:
        g = self.grid_size
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (g, g):
            raise ValueError(f"tokens must have shape (B, {g}, {g}), got {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point:
            raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.codebook_size):
            raise ValueError(f"token ids must lie in [0, {self.codebook_size}), "
                             f"got [{int(tokens.min())}, {int(tokens.max())}]")
