"""The EAR transformer: a LLaMA-style decoder that fills a token grid one schedule step at a time.

Numerically this follows the official EAR code (see ../shared/conformance/README.md): RMSNorm,
SwiGLU, fused-qkv attention with 2D rotary embeddings, optional adaLN modulation from the class
embedding, and a two-stream training sequence [class, real tokens, class, mask tokens] whose mask
tokens predict each step's cells from all earlier steps. Its state-dict keys equal the official ones,
so the released checkpoints load unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ear.order import Schedule, make_schedule

ROPE_MODES = ("sequence", "true2d")


@dataclass
class EARConfig:
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    vocab_size: int = 8192
    num_classes: int = 1000
    # 0: one class embedding per label (the official layout; a styled asset then has one label per
    # (class, style)). n > 0: one embedding per class shared by n styles plus a style embedding
    # added to it, label = style * num_classes + class, so what a class looks like is learnt from
    # every style's drawings and each style is learnt from every class.
    num_styles: int = 0
    grid_size: int = 16
    schedule: str = "arms"
    adaln: bool = True
    class_dropout_prob: float = 0.1
    dropout: float = 0.0  # residual and FFN dropout
    attn_dropout: float = 0.0
    token_dropout: float = 0.0
    # "sequence": the official quirk, rotary rows follow the generation index laid out on a raster
    # grid and the class row is zero. "true2d": each token is rotated by its real cell (opt-in).
    rope: str = "sequence"
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    multiple_of: int = 256
    # Trained with the correction objective (`EAR.training_losses`): the content-stream outputs
    # also predict each cell's clean token from a part whose draws were partly corrupted, which is
    # what RadAR-style nested refinement (`ear.refine`) reads. No new weights (the output head is
    # shared), so the flag only says what the model learnt; off for every released checkpoint.
    correction: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.n_head or (self.dim // self.n_head) % 4:
            raise ValueError(f"dim / n_head must be a whole multiple of 4, got dim={self.dim}, "
                             f"n_head={self.n_head}")
        if self.rope not in ROPE_MODES:
            raise ValueError(f"rope must be one of {ROPE_MODES}, got {self.rope!r}")
        if min(self.dim, self.n_layer, self.vocab_size, self.num_classes) < 1:
            raise ValueError("dim, n_layer, vocab_size and num_classes must be positive")
        if isinstance(self.num_styles, bool) or not isinstance(self.num_styles, int) or self.num_styles < 0:
            raise ValueError(f"num_styles must be a whole number >= 0 (0: no shared style embedding), "
                             f"got {self.num_styles!r}")
        if not isinstance(self.correction, bool):
            raise ValueError(f"correction must be true or false (trained with the correction objective), "
                             f"got {self.correction!r}")
        make_schedule(self.schedule, self.grid_size)  # validates both

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def num_labels(self) -> int:
        """Class labels the model is conditioned on (the null class is the next one)."""
        return self.num_classes * max(1, self.num_styles)

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        return -(-hidden // self.multiple_of) * self.multiple_of

    @classmethod
    def official(cls, size: str) -> EARConfig:
        """Shapes of the released EAR-adaLN-{B,L,XL} checkpoints (ImageNet 256, XQGAN-8192)."""
        shapes = {"B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1280, 36, 20)}
        if size not in shapes:
            raise ValueError(f"size must be one of {', '.join(shapes)}, got {size!r}")
        dim, n_layer, n_head = shapes[size]
        return cls(dim=dim, n_layer=n_layer, n_head=n_head)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EARConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown EAR config fields: {', '.join(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def corrupt(targets: torch.Tensor, logits: torch.Tensor, share: float, noise_share: float,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """`targets` (B, n) with a `share` of the cells replaced: by a draw from `logits` (B, n, V) at
    temperature 1, or for a `noise_share` of them by a uniformly random code."""
    if not (0 <= share <= 1 and 0 <= noise_share <= 1):
        raise ValueError(f"corruption and noise shares must lie in [0, 1], got {share} and {noise_share}")
    with torch.no_grad():
        gen = {"generator": generator, "device": targets.device}
        draws = torch.multinomial(logits.float().flatten(0, 1).softmax(-1), 1, generator=generator)
        noise = torch.randint(0, logits.shape[-1], targets.shape, **gen)
        picked = torch.rand(targets.shape, **gen) < share
        noisy = torch.rand(targets.shape, **gen) < noise_share
        return torch.where(picked, torch.where(noisy, noise, draws.view_as(targets)), targets)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, cast back before the gain: bfloat16 stays stable and matches.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, config: EARConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden, config.dim, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache:
    """Per-layer keys/values, one slot per sequence position. A plain object, not buffers, so that
    caching never changes the model's state dict."""

    def __init__(self, batch: int, n_head: int, slots: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (batch, n_head, slots, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v at slots start.. (overwriting the frontier's mask-token entries), return every
        slot up to the end of the write: later slots are masked anyway."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, L, H, D) by table (L, D/2, 2) = (cos, sin)."""
    xf = x.float().unflatten(-1, (-1, 2))
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    a, b = xf[..., 0], xf[..., 1]
    return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: EARConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.wqkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.attn_dropout = config.attn_dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = (t.view(batch, length, self.n_head, self.head_dim) for t in self.wqkv(x).split(dim, -1))
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(start, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(batch, length, dim)))


class Block(nn.Module):
    def __init__(self, config: EARConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        # Key name "ada_lin.1" is the official one: a Sequential of SiLU then Linear.
        self.ada_lin = (nn.Sequential(nn.SiLU(), nn.Linear(config.dim, 6 * config.dim))
                        if config.adaln else None)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        if self.ada_lin is None:
            x = x + self.attention(self.attention_norm(x), rope, mask, cache, start)
            return x + self.feed_forward(self.ffn_norm(x))
        # Official chunk order; gates are used as they are, scales as 1 + scale.
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond).chunk(6, dim=-1)
        h = self.attention_norm(x) * (1 + scale1) + shift1
        x = x + gamma1 * self.attention(h, rope, mask, cache, start)
        return x + gamma2 * self.feed_forward(self.ffn_norm(x) * (1 + scale2) + shift2)


class ClassEmbedding(nn.Module):
    """Class table with one extra row, the null class used for classifier-free guidance. With
    styles (config.num_styles > 0) a label s * num_classes + c is class row c plus style row s;
    the null label (num_labels) is the null row alone."""

    def __init__(self, config: EARConfig) -> None:
        super().__init__()
        self.num_classes, self.dropout_prob = config.num_classes, config.class_dropout_prob
        self.num_labels = config.num_labels
        self.embedding_table = nn.Embedding(config.num_classes + int(self.dropout_prob > 0), config.dim)
        self.style_table = nn.Embedding(config.num_styles, config.dim) if config.num_styles else None

    @property
    def has_null(self) -> bool:
        return self.embedding_table.num_embeddings > self.num_classes

    def forward(self, class_ids: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(class_ids.shape, device=class_ids.device) < self.dropout_prob
            class_ids = torch.where(drop, self.num_labels, class_ids)
        return self.lookup(class_ids)

    def lookup(self, class_ids: torch.Tensor) -> torch.Tensor:
        """The conditioning vector of each label, no label dropout."""
        if self.style_table is None:
            return self.embedding_table(class_ids)
        null = class_ids == self.num_labels
        rows = torch.where(null, self.num_classes, class_ids % self.num_classes)
        styles = torch.where(null, 0, class_ids // self.num_classes)
        return self.embedding_table(rows) + self.style_table(styles) * (~null)[..., None]

    def table(self) -> torch.Tensor:
        """(num_labels [+ 1 null], dim): every label's vector, what a fast path indexes."""
        ids = torch.arange(self.num_labels + int(self.has_null), device=self.embedding_table.weight.device)
        return self.lookup(ids)


class _Layout:
    """Everything derived from a schedule for one device: the order, part ids per sequence position,
    the block-causal masks and the rotary table. Position 0 is the class token, position p >= 1
    holds the (p-1)-th generated token."""

    def __init__(self, config: EARConfig, schedule: Schedule, device: torch.device) -> None:
        n, seq = config.grid_size, schedule.num_tokens + 1
        self.schedule = schedule
        self.order = torch.tensor(schedule.order, device=device)
        part = torch.tensor([0] + [k + 1 for k, size in enumerate(schedule.sizes) for _ in range(size)],
                            device=device)
        self.part = part
        self.infer_mask = part[None, :] <= part[:, None]  # [query, key]
        two = torch.cat([part, part + seq])  # stream-2 part ids are offset by the sequence length
        a, b = two[:, None], two[None, :]
        self.train_mask = (a - seq > b) | (a == b) | ((b <= a) & (a < seq))
        cells = (torch.arange(schedule.num_tokens) if config.rope == "sequence"
                 else torch.tensor(schedule.order))
        self.rope = _rope_table(config, cells // n, cells % n).to(device)


def _shorten(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def _rope_table(config: EARConfig, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(1 + len(rows), head_dim/2, 2) cos/sin. Pairs [0, q) rotate by the row, [q, 2q) by the col.
    Row 0 (class token) is all zeros in the official mode (its q and k vanish), identity in true2d."""
    quarter = config.head_dim // 4
    freqs = config.rope_base ** (-torch.arange(0, config.head_dim // 2, 2)[:quarter].float()
                                 / (config.head_dim // 2))
    angles = torch.cat([torch.outer(rows.float(), freqs), torch.outer(cols.float(), freqs)], dim=-1)
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    first = torch.zeros(1, 2 * quarter, 2)
    if config.rope == "true2d":
        first[..., 0] = 1.0
    return torch.cat([first, table])


class EAR(nn.Module):
    def __init__(self, config: EARConfig) -> None:
        super().__init__()
        self.config = config
        self.schedule = make_schedule(config.schedule, config.grid_size)
        self.mask_token = nn.Embedding(1, config.dim)
        self.cls_embedding = ClassEmbedding(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.token_dropout = nn.Dropout(config.token_dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._layouts: dict[tuple[str, torch.device], _Layout] = {}
        self.reset_parameters()

    # ---- set-up -------------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Fresh-training init: small normals, zero output head, zero adaLN (blocks start as the
        identity, DiT's adaLN-zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.zeros_(self.output.weight)
        for block in self.layers:
            if block.ada_lin is not None:
                nn.init.zeros_(block.ada_lin[1].weight)
                nn.init.zeros_(block.ada_lin[1].bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def null_class(self) -> int:
        return self.config.num_labels

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Strict load that names every missing, unexpected or mis-shaped key."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        shapes = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(state_dict[k].shape)}"
                  for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
        if missing or unexpected or shapes:
            parts = [f"{what} keys: {_shorten(keys)}" for what, keys in
                     (("missing", missing), ("unexpected", unexpected)) if keys]
            raise ValueError("state dict does not match the EAR config: " + "; ".join(parts + shapes[:8]))
        self.load_state_dict(state_dict, strict=True)

    def layout(self, schedule: Schedule | None = None) -> _Layout:
        schedule = schedule or self.schedule
        if schedule.grid != self.config.grid_size:
            raise ValueError(f"schedule grid {schedule.grid} does not match the model's grid "
                             f"{self.config.grid_size}")
        device = self.output.weight.device
        key = (schedule.name, device)
        if key not in self._layouts:
            self._layouts[key] = _Layout(self.config, schedule, device)
        return self._layouts[key]

    # ---- checks -------------------------------------------------------------------------------

    def check_class_ids(self, class_ids: torch.Tensor, allow_null: bool = False) -> None:
        top = self.config.num_labels + int(allow_null) - 1
        if class_ids.ndim != 1:
            raise ValueError(f"class_ids must be 1-D (batch,), got shape {tuple(class_ids.shape)}")
        if class_ids.numel() and (int(class_ids.min()) < 0 or int(class_ids.max()) > top):
            raise ValueError(f"class ids must lie in [0, {top}], got {class_ids.tolist()}")

    def check_tokens(self, tokens: torch.Tensor, length: int | None = None) -> None:
        wrong_length = length is not None and tokens.ndim == 2 and tokens.shape[1] != length
        if tokens.dtype.is_floating_point or tokens.ndim != 2 or wrong_length:
            raise ValueError(f"tokens must be an integer tensor of shape (batch, {length or 'n'}), "
                             f"got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), "
                             f"got [{int(tokens.min())}, {int(tokens.max())}]")

    # ---- training path ------------------------------------------------------------------------

    def _cond(self, class_ids: torch.Tensor) -> torch.Tensor:
        return self.cls_embedding(class_ids).unsqueeze(1)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(x)).float()

    def _embed_and_run(self, tokens: torch.Tensor, cond: torch.Tensor, layout: _Layout) -> torch.Tensor:
        batch, n = tokens.shape
        real = self.tok_embeddings(tokens[:, layout.order])
        masks = self.mask_token.weight.expand(batch, n, -1)
        x = self.token_dropout(torch.cat([cond, real, cond, masks], dim=1).to(real.dtype))
        rope = torch.cat([layout.rope, layout.rope])
        for block in self.layers:
            x = block(x, cond, rope, layout.train_mask)
        return self._head(x[:, n + 2:])

    def forward(self, tokens: torch.Tensor, class_ids: torch.Tensor,
                schedule: Schedule | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, n, vocab) for raster tokens (B, n); row s predicts the s-th
        token in generation order. Class ids are used as given (num_classes = the null class)."""
        layout = self.layout(schedule)
        self.check_tokens(tokens, layout.schedule.num_tokens)
        self.check_class_ids(class_ids, allow_null=True)
        return self._embed_and_run(tokens, self._cond(class_ids), layout)

    def loss(self, tokens: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (nats/token). In train mode labels drop to the null class with
        `class_dropout_prob`, which is what makes classifier-free guidance possible."""
        logits = self(tokens, class_ids)
        targets = tokens[:, self.layout().order]
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def training_losses(self, tokens: torch.Tensor, class_ids: torch.Tensor, corruption: float = 0.3,
                        noise_share: float = 0.2) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(generation loss, correction loss or None without `config.correction`), nats/token.
        The generation loss is `loss`'s, teacher-forced on clean tokens. The correction loss: a
        `corruption` share of the cells take the model's own parallel draws from those same logits
        (what a decode step draws, at no extra forward) or, for a `noise_share` of them, a random
        code; one content-only forward under the inference mask (each part sees itself and earlier
        parts, never a later one) then predicts every cell's clean token at its own position."""
        layout = self.layout()
        self.check_tokens(tokens, layout.schedule.num_tokens)
        self.check_class_ids(class_ids, allow_null=True)
        cond = self._cond(class_ids)  # one label drop for both losses
        logits = self._embed_and_run(tokens, cond, layout)
        targets = tokens[:, layout.order]
        main = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        if not self.config.correction:
            return main, None
        corrupted = corrupt(targets, logits.detach(), corruption, noise_share)
        fixed = self.correction_logits(corrupted, cond, layout)
        return main, F.cross_entropy(fixed.flatten(0, 1), targets.flatten())

    def correction_logits(self, ordered: torch.Tensor, cond: torch.Tensor,
                          layout: _Layout | None = None) -> torch.Tensor:
        """(B, n, V): the content stream's outputs for tokens (B, n) in generation order, row s the
        correction of the s-th token: exactly what a cached decode computes for a fed part."""
        x = torch.cat([cond, self.tok_embeddings(ordered)], dim=1)
        return self.forward_positions(x, cond, 0, layout or self.layout(), None)[:, 1:]

    # ---- incremental decoding -----------------------------------------------------------------

    def new_cache(self, batch: int) -> list[KVCache]:
        weight = self.output.weight
        slots = self.config.grid_size ** 2 + 1
        return [KVCache(batch, self.config.n_head, slots, self.config.head_dim, weight.dtype, weight.device)
                for _ in self.layers]

    def forward_positions(self, x: torch.Tensor, cond: torch.Tensor, start: int, layout: _Layout,
                          cache: list[KVCache] | None) -> torch.Tensor:
        """Run embedded inputs x (B, L, dim) that sit at sequence positions start..start+L-1 under
        the block-causal inference mask. With a cache, their K/V are written to those slots and
        attention sees every earlier slot; without one, x must start at position 0."""
        if cache is None and start != 0:
            raise ValueError("an uncached forward must start at position 0")
        end = start + x.shape[1]
        mask, rope = layout.infer_mask[start:end, :end], layout.rope[start:end]
        for i, block in enumerate(self.layers):
            x = block(x, cond, rope, mask, cache[i] if cache is not None else None, start)
        return self._head(x)

    def embed_inputs(self, tokens: torch.Tensor, cond: torch.Tensor, num_masks: int,
                     with_class: bool) -> torch.Tensor:
        """Inputs of one decode step: [class token if at position 0, real tokens, mask queries]."""
        parts = [cond] if with_class else []
        if tokens.shape[1]:
            parts.append(self.tok_embeddings(tokens))
        parts.append(self.mask_token.weight.expand(cond.shape[0], num_masks, -1))
        return torch.cat(parts, dim=1)
