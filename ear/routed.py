"""The engine's path for an activated model: each FFN runs only the experts its router picks, for
the tokens its gate lets through (an `ear.engine.FFN`, handed to the decode runner per generation).

`ear.activate` trains the experts' routers and the token gates and computes the masked FFN densely
(the reference); here the products themselves shrink. Three forms, the same tokens up to float
round-off:

* "grouped" (CPU): the rows routed to each expert gathered and run through that expert's slice
  of w1/w3 and w2, one product per expert, the results added back in place; a token whose gate is
  shut runs no product at all (the residual carries it);
* "masked" (CUDA graphs need static shapes): the dense product with the unrouted hidden neurons
  zeroed, the reference's own arithmetic; it saves no time, only shows what routing chose;
* "capacity" (static shapes that do save work): each expert runs a fixed `capacity` share of the
  rows, its most strongly routed ones; a routed row beyond that is dropped for that expert.

Expert slices come from the runner's prepared weights (the norm gain already folded in where the
model has no adaLN), or from the activation's tuned experts prepared the same way, so they follow
its dtype and device; every expert on (tau 1) always runs the dense weights. Every call adds its
multiply-adds (experts, router and gate; those of the dense FFN beside them) to the slot's work
counter.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from ear.activate import Activation, check_lead
from ear.engine import _LayerWeights, _Linear

MODES = ("auto", "grouped", "masked", "capacity")
ROW_BUCKET = 64  # pre-packed expert products: at least this many rows, padded to a multiple of it


def check_tau(tau: object) -> float:
    """The budget knob: dynamic-k's tau in [0, 1] (0: only the largest expert; 1: every expert, the
    dense model's products)."""
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 <= float(tau) <= 1:
        raise ValueError(f"activation must be a number in [0, 1] (dynamic-k's tau: 1 runs every "
                         f"expert, lower runs fewer), got {tau!r}")
    return float(tau)


class _Layer:
    """One layer's router, gate and expert slices in the compute dtype and device."""

    def __init__(self, activation: Activation, i: int, layer: _LayerWeights, like: torch.Tensor,
                 tuned: bool) -> None:
        to = {"dtype": like.dtype, "device": like.device}
        net, gate = activation.routers[i].net, activation.gates[i]
        # the router's first linear and the gate read the same input: one product (gate last)
        self.first = (torch.cat([net[0].weight, gate.weight]).detach().to(**to),
                      torch.cat([net[0].bias, gate.bias]).detach().to(**to))
        self.second = (net[2].weight.detach().to(**to), net[2].bias.detach().to(**to))
        # Without adaLN the FFN norm's gain is folded into w13: the router and gate saw it applied.
        self.gain = layer.gains[1].to(**to) if layer.ada is None else None
        w13, w2 = layer.w13.weight, layer.w2.weight
        if tuned:  # the experts' own weights, prepared as the runner prepares the dense ones
            assert activation.tuned is not None
            own = activation.tuned[i]
            w13 = torch.cat([own.w1.weight, own.w3.weight]).detach().to(**to)
            w13 = w13 if self.gain is None else w13 * self.gain
            w2 = own.w2.weight.detach().to(**to)
        self.full = (w13, w2) if tuned else None  # the masked form's products, when not the runner's
        hidden = w2.shape[1]
        groups = activation.groups[i].to(like.device)
        # The runner's pre-packed kernel where it chose one (oneDNN is about 3x F.linear on some
        # CPUs); int8 stays float, so the slices compute what the reference's masked FFN does.
        kernel = layer.w13.mode if layer.w13.mode in ("packed", "onednn") else "plain"
        self.w13 = [_Linear(torch.cat([w13[g], w13[hidden + g]]).contiguous(), kernel) for g in groups]
        self.w2 = [_Linear(w2[:, g].contiguous(), kernel) for g in groups]
        # A pre-packed kernel prepares itself per row count: rows padded to a multiple of
        # ROW_BUCKET keep the shapes it sees few (the padding's outputs are dropped), and fewer
        # rows than that run F.linear, faster there (the bundled model on a 2-core AMD EPYC, per
        # routed FFN call: at 8-60 rows F.linear takes 0.4x oneDNN's time, at 60-400 rows
        # oneDNN takes 0.78x F.linear's).
        self.bucket = ROW_BUCKET if kernel != "plain" else 1
        self.owner = torch.empty(hidden, dtype=torch.long, device=like.device)
        for expert, g in enumerate(groups):
            self.owner[g] = expert
        self.dim, self.hidden, self.size = w2.shape[0], hidden, groups.shape[1]
        hidden_r = net[0].out_features
        self.routing_macs = self.dim * hidden_r + hidden_r * net[2].out_features + self.dim  # router, gate

    def choose(self, rows: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """((N, E) bool: expert e runs for row n, (N, E) the router's predicted norms): dynamic-k
        as `ActivatedFFN.gates`, and nothing for a row whose gate is shut."""
        x = rows if self.gain is None else rows * self.gain
        first = F.linear(x, *self.first)
        norms = torch.expm1(F.linear(F.silu(first[:, :-1]), *self.second)).clamp(min=0)
        if tau >= 1:
            return torch.ones_like(norms, dtype=torch.bool), norms
        chosen = norms >= (1 - tau) * norms.max(-1, keepdim=True).values
        return chosen & (first[:, -1:] >= 0), norms


class RoutedFFN:
    """An activated model's FFNs at one tau, for `ear.engine.DecodeRunner.decode(ffn=...)`: made by
    `RoutedFFN(activation, tau)`, other taus by `at(tau)` (sharing the expert slices). The steps
    before the dense lead (`lead`, default the activation's `dense_lead`) keep the dense FFN."""

    def __init__(self, activation: Activation, tau: float | None = None, mode: str = "auto",
                 capacity: float = 0.5, lead: float | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0 < capacity <= 1:
            raise ValueError(f"capacity is the share of rows each expert runs, in (0, 1], got {capacity!r}")
        self.activation = activation
        self.tau = check_tau(min(activation.config.tau, 1.0) if tau is None else tau)
        self.lead = check_lead(activation.config.dense_lead if lead is None else lead)
        self.tuned = activation.tuned is not None and self.tau < 1  # every expert on: the dense weights
        self.mode, self.capacity = mode, capacity
        self._layers: dict[tuple[int, bool], tuple[_LayerWeights, _Layer]] = {}  # shared with `at`'s siblings

    def at(self, tau: float) -> RoutedFFN:
        sibling = RoutedFFN(self.activation, tau, self.mode, self.capacity, self.lead)
        sibling._layers = self._layers
        return sibling

    def starts_at(self, num_tokens: int) -> int:
        return math.ceil(self.lead * num_tokens)

    def _layer(self, i: int, layer: _LayerWeights, like: torch.Tensor) -> _Layer:
        kept = self._layers.get((i, self.tuned))
        if kept is None or kept[0] is not layer:  # new prepared weights: slice them again
            kept = self._layers[i, self.tuned] = (layer, _Layer(self.activation, i, layer, like, self.tuned))
        return kept[1]

    def __call__(self, i: int, layer: _LayerWeights, h: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
        part = self._layer(i, layer, h)
        rows = h.reshape(-1, h.shape[-1])
        chosen, norms = part.choose(rows, self.tau)
        mode = self.mode if self.mode != "auto" else "masked" if h.is_cuda else "grouped"
        if mode == "masked":
            a, b = (layer.w13(rows) if part.full is None else F.linear(rows, part.full[0])).chunk(2, dim=-1)
            kept = F.silu(a) * b * chosen.to(h.dtype)[:, part.owner]
            out = layer.w2(kept) if part.full is None else F.linear(kept, part.full[1])
            pairs = chosen.sum()  # what routing chose; the dense product ran
        elif mode == "grouped":
            out, pairs = _grouped(part, rows, chosen), chosen.sum()
        else:
            out, pairs = _capacity(part, rows, chosen, norms, self.capacity)
        work[0] += pairs * (3 * part.dim * part.size) + rows.shape[0] * part.routing_macs
        work[1] += rows.shape[0] * 3 * part.dim * part.hidden
        return out.view_as(h)


def _grouped(part: _Layer, rows: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """One product per expert on the rows routed to it (host-side shapes: CPU, or CUDA eager)."""
    out = torch.zeros_like(rows)
    for e, (w13, w2) in enumerate(zip(part.w13, part.w2, strict=True)):
        idx = chosen[:, e].nonzero().squeeze(1)
        n = idx.numel()
        if not n:
            continue
        packed = n >= part.bucket  # else a pre-packed kernel's set-up outweighs the product
        x = rows.index_select(0, F.pad(idx, (0, -n % part.bucket)) if packed else idx)  # pad: row 0 again
        a, b = (w13(x) if packed else F.linear(x, w13.weight)).chunk(2, dim=-1)
        h = F.silu(a) * b
        out.index_add_(0, idx, (w2(h) if packed else F.linear(h, w2.weight))[:n])  # padding dropped
    return out


def _capacity(part: _Layer, rows: torch.Tensor, chosen: torch.Tensor, norms: torch.Tensor,
              capacity: float) -> tuple[torch.Tensor, int]:
    """Each expert on its ceil(capacity x N) most strongly routed rows (static shapes), rows it
    was not routed to weighted 0. Returns the output and the number of (row, expert) products."""
    n = rows.shape[0]
    take = min(n, math.ceil(capacity * n))
    score = chosen.to(norms.dtype) * (1 + norms)  # routed rows first, the largest predicted first
    idx = score.topk(take, dim=0).indices  # (take, E)
    ran = torch.zeros_like(chosen).scatter_(0, idx, True) & chosen
    out = torch.zeros_like(rows)
    for e, (w13, w2) in enumerate(zip(part.w13, part.w2, strict=True)):
        a, b = w13(rows.index_select(0, idx[:, e])).chunk(2, dim=-1)
        weight = ran[idx[:, e], e].to(rows.dtype)[:, None]
        out.index_add_(0, idx[:, e], w2(F.silu(a) * b) * weight)
    return out, take * len(part.w13)
