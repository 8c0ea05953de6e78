"""Per-row token draws on the device: guided logits -> tokens, with no host sync.

Every row (image) carries its own settings (CFG scale, temperature, top-k, top-p) and its own
randomness. The randomness is counter-based: the noise for (row key, cell, vocabulary entry) is a
hash, turned into Gumbel noise for the Gumbel-max trick. So an image depends only on its own seed,
row id and settings, never on its batch-mates, the batch size or the order of the work; the serving
scheduler and bulk sampling rely on that.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

MASK32 = 0xFFFFFFFF
_CELL_SALT, _VOCAB_SALT = 0x5BD1E995, 0x1B873593


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply, constants below 2**31 so that int64 products of
    values below 2**32 never overflow) on an int64 tensor of values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & MASK32
    return x ^ (x >> 15)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def row_keys(seed: int | Sequence[int] | None, row_ids: Sequence[int] | torch.Tensor | None,
             batch: int) -> torch.Tensor:
    """(batch,) int64 keys, one per row, from (seed_i, row_id_i). `seed` may be one int for all rows
    or one per row; None draws a fresh random seed. Row ids default to 0..batch-1."""
    if seed is None:
        seed = secrets.randbits(63)
    seeds = [seed] * batch if isinstance(seed, int) else list(seed)
    ids = list(range(batch)) if row_ids is None else [int(i) for i in torch.as_tensor(row_ids).reshape(-1)]
    if len(seeds) != batch or len(ids) != batch:
        raise ValueError(f"seed and row_ids must give one value per row ({batch}), got "
                         f"{len(seeds)} seeds and {len(ids)} row ids")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"seed must be an integer >= 0, got {s!r}")
    if any(i < 0 for i in ids):
        raise ValueError(f"row ids must be integers >= 0, got {ids}")
    keys = [_splitmix64(_splitmix64(s) ^ i) >> 1 for s, i in zip(seeds, ids, strict=True)]
    return torch.tensor(keys, dtype=torch.int64)


def cell_streams(keys: torch.Tensor, num_cells: int) -> torch.Tensor:
    """(B, num_cells) int64: one 32-bit stream id per (row, raster cell), hashed from both key halves."""
    cells = _mix32(torch.arange(num_cells, device=keys.device) + _CELL_SALT)
    lo, hi = keys & MASK32, keys >> 32
    return _mix32(_mix32(lo[:, None] ^ cells[None, :]) ^ hi[:, None])


def vocab_codes(vocab: int, device: torch.device) -> torch.Tensor:
    return _mix32(torch.arange(vocab, device=device) + _VOCAB_SALT)


def gumbel_noise(streams: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(B, m) stream ids x (V,) vocabulary codes -> (B, m, V) float32 standard Gumbel noise."""
    bits = _mix32(streams[..., None] ^ codes) >> 8  # 24 uniform bits
    log_u = torch.log((bits.float() + 0.5) * (1.0 / (1 << 24)))  # strictly inside (0, 1)
    return -torch.log(-log_u)


@dataclass
class RowSettings:
    """One row's sampling values each, as (B, 1, 1) tensors ready to broadcast over (B, m, V), plus
    the host-side facts that choose which work a step needs at all (known before sampling starts,
    so no step ever asks the device)."""

    cfg_scale: torch.Tensor
    temperature: torch.Tensor  # 0 = greedy (argmax)
    inv_temperature: torch.Tensor  # for top-p's probabilities; 1 where greedy
    top_k: torch.Tensor  # int64, vocab size where off
    top_p: torch.Tensor  # +inf where off
    keys: torch.Tensor  # (B,) int64
    guided: bool
    filtered: bool
    greedy: bool  # every row greedy: no noise at all

    @classmethod
    def build(cls, batch: int, vocab: int, *, cfg_scale: float | Sequence[float],
              temperature: float | Sequence[float], top_k: int | Sequence[int],
              top_p: float | Sequence[float],
              greedy: bool | Sequence[bool], keys: torch.Tensor) -> RowSettings:
        """Scalars apply to every row, sequences give one value per row (each checked)."""
        def per_row(name: str, value) -> list:
            values = [value] * batch if not isinstance(value, Sequence | torch.Tensor) else list(value)
            if len(values) != batch:
                raise ValueError(f"{name} must be one value or one per row ({batch}), got {len(values)}")
            return values

        cfg = [float(c) for c in per_row("cfg_scale", cfg_scale)]
        temp = [float(t) for t in per_row("temperature", temperature)]
        ks, gs = per_row("top_k", top_k), per_row("greedy", greedy)
        ps = [float(p) for p in per_row("top_p", top_p)]
        for c, t, k, p in zip(cfg, temp, ks, ps, strict=True):
            check_values(c, t, k, p)
        temp = [0.0 if g else t for t, g in zip(temp, gs, strict=True)]

        def col(values, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).view(batch, 1, 1)

        k_eff = [int(k) if 0 < int(k) < vocab else vocab for k in ks]
        p_eff = [p if p < 1.0 else float("inf") for p in ps]
        sampled = [t > 0 for t in temp]
        return cls(cfg_scale=col(cfg), temperature=col(temp),
                   inv_temperature=col([1.0 / max(t, 1e-5) if t > 0 else 1.0 for t in temp]),
                   top_k=col(k_eff, torch.int64), top_p=col(p_eff), keys=keys.to(torch.int64),
                   guided=any(c != 1.0 for c in cfg),
                   filtered=any(s and (k < vocab or p < float("inf"))
                                for s, k, p in zip(sampled, k_eff, p_eff, strict=True)),
                   greedy=not any(sampled))

    TENSORS: ClassVar[tuple[str, ...]] = ("cfg_scale", "temperature", "inv_temperature", "top_k", "top_p",
                                          "keys")

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> RowSettings:
        """The same settings with `fn` applied to every per-row tensor (flags unchanged)."""
        return RowSettings(**{name: fn(getattr(self, name)) for name in self.TENSORS},
                           guided=self.guided, filtered=self.filtered, greedy=self.greedy)

    def to(self, device: torch.device) -> RowSettings:
        return self.map(lambda t: t.to(device))


def check_values(cfg_scale: float, temperature: float, top_k: int, top_p: float) -> None:
    if not 0 <= cfg_scale < math.inf:
        raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale}")
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = no limit), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")


def guide(logits: torch.Tensor, rows: RowSettings) -> torch.Tensor:
    """(2B, m, V) conditional-then-null logits -> (B, m, V) guided logits (the official formula)."""
    cond, uncond = logits.chunk(2)
    return torch.addcmul(uncond, cond - uncond, rows.cfg_scale)


def filter_rows(logits: torch.Tensor, rows: RowSettings) -> torch.Tensor:
    """Per-row top-k (ties at the k-th value kept), then top-p on the temperature-scaled
    probabilities of what top-k kept; the rest become -inf. One sort, no host sync."""
    ranked = logits.sort(dim=-1, descending=True).values
    rank = torch.arange(logits.shape[-1], device=logits.device)
    in_top_k = rank < rows.top_k
    probs = (ranked.masked_fill(~in_top_k, float("-inf")) * rows.inv_temperature).softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    kept = ((mass_before <= rows.top_p) & in_top_k).sum(-1, keepdim=True)
    threshold = ranked.gather(-1, kept - 1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def draw(logits: torch.Tensor, rows: RowSettings, streams: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(B, m, V) guided logits -> (B, m) int64 tokens. Gumbel-max with the noise scaled by the
    temperature: argmax(l/T + g) = argmax(l + T*g), and T = 0 is exactly greedy."""
    if rows.filtered:
        logits = filter_rows(logits, rows)
    if rows.greedy:
        return logits.argmax(-1)
    return torch.addcmul(logits, gumbel_noise(streams, codes), rows.temperature).argmax(-1)
