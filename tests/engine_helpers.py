"""Small EAR models with loud random weights, so that tests can tell positions and steps apart
(the default init zeroes the output head, which would make every logit equal)."""

from __future__ import annotations

import torch

from ear.model import EAR, EARConfig


def noisy_model(seed: int = 0, **overrides) -> EAR:
    config = EARConfig(**{"dim": 64, "n_layer": 2, "n_head": 4, "vocab_size": 64, "num_classes": 10,
                          "grid_size": 8, **overrides})
    model = EAR(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()
