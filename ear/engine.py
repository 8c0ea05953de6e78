"""The decode runner: EAR's sampling loop with static shapes, the fast path behind `ear.sampler`.

`ear/model.py` is the readable reference; this module computes the same numbers with less work
per step:

* weights prepared once per set of weights (rebuilt when they change): RMSNorm gains folded into
  the next linear where there is no adaLN, the two FFN inputs fused, the mask token appended to
  the token table; on a CPU each float32 linear uses the kernel (plain, MKL-packed, oneDNN) that a
  short timing found fastest for its shape on this machine, or is quantised to int8;
* adaLN modulation computed once per generation (the class never changes), with the norm gain
  folded into the scale;
* per schedule step, precomputed: fed and written positions, the block-causal mask, the rotary
  table as complex numbers (one multiply rotates q and k, and writes q, k, v into the cache);
* a KV cache per batch bucket allocated once and reused (a pool, so concurrent streams never share
  one), the output head on the query rows only, and the draw (`ear.draw`) on the device;
* the content-token skip: content rows only give keys and values, so the last layer's attention
  output and FFN run on the mask-query rows alone (exact; `content_outputs` turns it off);
* the shared mask projection: a step's mask queries enter the first layer as one and the same
  vector per image (the mask token, modulated by the image's class; positions enter only through
  the rotation after the projection), so its q, k, v are projected once per image and step
  (exact; `share_mask_projection` turns it off);
* an optional FFN in place of the dense one per generation (`ear.routed`: dynamic activation);
* on CUDA, every step after the first replayed as a CUDA graph (captured on first use per step
  and bucket, one memory pool), and each step's tokens copied to pinned memory while the next step
  already runs; refined steps (`ear.refine`) too, in their static form: the re-fed part fed again
  for every row and the doubtful cells corrected by a select, so no step asks the device anything.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ear import refine
from ear.draw import RowSettings, cell_streams, draw, guide, vocab_codes
from ear.model import EAR, EARConfig, _Layout
from ear.order import Schedule
from ear.refine import Refinement, Span

Picker = Callable[[int, torch.Tensor], torch.Tensor]
LINEAR_MODES = ("auto", "plain", "packed", "onednn", "int8")
MAX_IDLE_SLOTS = 4  # caches kept for reuse once their stream ended
TIMING_ROWS = 32  # rows of a batch-1 guided step (about 2 x (8 fed + 8 queried)): what "auto" times
TIMING_ROUNDS = 5
KERNEL_MARGIN = 0.9  # a pre-packed kernel is chosen over plain only when at least 10 % faster


def _has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as info:
            return "vnni" in info.read()
    except OSError:
        return False


# Without VNNI, int8 products of full-range activations can saturate in FBGEMM: use 7 bits there.
_REDUCE_RANGE = not _has_vnni()


class _Linear:
    """y = x W^T in one of the forms this device and dtype allow: "plain" (F.linear), "packed"
    (MKL's pre-packed sgemm), "onednn" (oneDNN's pre-packed float32 linear), "int8" (dynamic)."""

    def __init__(self, weight: torch.Tensor, mode: str) -> None:
        self.weight, self.mode = weight, mode
        if mode == "packed":
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, 64)
        elif mode == "onednn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, TIMING_ROWS)
        elif mode == "int8":
            scales = (weight.abs().amax(1).clamp_min(1e-8) / 127).double()
            zeros = torch.zeros(weight.shape[0], dtype=torch.long)
            with warnings.catch_warnings():  # the quantised-tensor constructors warn of their future
                warnings.simplefilter("ignore")
                q = torch.quantize_per_channel(weight.float(), scales, zeros, 0, torch.qint8)
                self.packed = torch.ops.quantized.linear_prepack(q, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "packed":
            return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, None, 64)
        if self.mode == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        if self.mode == "int8":
            return torch.ops.quantized.linear_dynamic(x, self.packed, _REDUCE_RANGE)
        return F.linear(x, self.weight)


def float32_kernels() -> tuple[str, ...]:
    """The exact float32 linear kernels this torch build has on a CPU."""
    mkl = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    return ("plain", *(("packed",) if mkl else ()), *(("onednn",) if onednn else ()))


KernelTimer = Callable[[_Linear, torch.Tensor], float]  # seconds of one call on that input


def _time_call(linear: _Linear, x: torch.Tensor) -> float:
    began = time.perf_counter()
    linear(x)
    return time.perf_counter() - began


_CHOSEN: dict[tuple, str] = {}  # (weight shape, threads) -> kernel, for the process


def float32_kernel(weight: torch.Tensor, timer: KernelTimer | None = None) -> str:
    """The fastest float32 kernel for this weight's shape on this machine and thread count, timed
    on first use and kept for the process: which one wins depends on the CPU (MKL's packed sgemm
    is the fastest on some Intel parts and slower than plain on AMD) and on the shape. Each kernel
    runs once untimed, then TIMING_ROUNDS interleaved rounds on TIMING_ROWS rows; the best call
    of each counts. A pre-packed kernel must beat plain by KERNEL_MARGIN (packing holds a second
    copy of the weight, and a few percent is within a busy machine's noise)."""
    key = (tuple(weight.shape), torch.get_num_threads())
    if key not in _CHOSEN:
        timer = timer or _time_call
        x = torch.randn(TIMING_ROWS, weight.shape[1], generator=torch.Generator().manual_seed(0))
        linears = {k: _Linear(weight, k) for k in float32_kernels()}
        for linear in linears.values():
            linear(x)
        best = dict.fromkeys(linears, float("inf"))
        for _ in range(TIMING_ROUNDS):
            for kernel, linear in linears.items():
                best[kernel] = min(best[kernel], timer(linear, x))
        best["plain"] *= KERNEL_MARGIN
        _CHOSEN[key] = min(linears, key=best.__getitem__)  # ties: the earlier, plain first
    return _CHOSEN[key]


def chosen_kernels() -> dict[tuple, str]:
    """What `float32_kernel` chose so far in this process: (weight shape, threads) -> kernel."""
    return dict(_CHOSEN)


def _linear_mode(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The mode the prepared weights are built with; "timed" picks a float32 kernel per shape."""
    if requested not in LINEAR_MODES:
        raise ValueError(f"linear mode must be one of {LINEAR_MODES}, got {requested!r}")
    cpu_f32 = device.type == "cpu" and dtype == torch.float32
    if requested in ("packed", "onednn", "int8") and not cpu_f32:
        raise ValueError(f"{requested!r} linears need a float32 model on the CPU")
    if requested == "packed" and "packed" not in float32_kernels():
        raise ValueError("'packed' linears need MKL, which this torch build lacks")
    if requested == "onednn" and "onednn" not in float32_kernels():
        raise ValueError("'onednn' linears need oneDNN, which this torch build lacks")
    if requested == "auto":
        return "timed" if cpu_f32 else "plain"
    return requested


def _prepared(weight: torch.Tensor, mode: str) -> _Linear:
    return _Linear(weight, float32_kernel(weight) if mode == "timed" else mode)


@dataclass
class _LayerWeights:
    wqkv: _Linear
    wo: _Linear
    w13: _Linear  # w1 and w3 stacked: one product, then split
    w2: _Linear
    ada: tuple[torch.Tensor, torch.Tensor] | None  # adaLN linear (weight, bias)
    gains: tuple[torch.Tensor, torch.Tensor]  # attention / ffn RMSNorm gains (folded if no adaLN)


class _Weights:
    def __init__(self, model: EAR, mode: str) -> None:
        dim = model.config.dim
        self.embed = torch.cat([model.tok_embeddings.weight, model.mask_token.weight]).detach()
        self.layers = []
        for block in model.layers:
            a, f = block.attention, block.feed_forward
            g1, g2 = block.attention_norm.weight.detach(), block.ffn_norm.weight.detach()
            adaln = block.ada_lin is not None
            wqkv = a.wqkv.weight.detach() if adaln else a.wqkv.weight.detach() * g1
            w13 = torch.cat([f.w1.weight, f.w3.weight]).detach()
            self.layers.append(_LayerWeights(
                wqkv=_prepared(wqkv.contiguous(), mode), wo=_prepared(a.wo.weight.detach(), mode),
                w13=_prepared(w13 if adaln else w13 * g2, mode), w2=_prepared(f.w2.weight.detach(), mode),
                ada=(block.ada_lin[1].weight.detach(), block.ada_lin[1].bias.detach()) if adaln else None,
                gains=(g1, g2)))
        self.head = _prepared((model.output.weight * model.norm.weight).detach(), mode)
        self.classes = model.cls_embedding.table().detach()  # every label's vector, styles added
        self.dim, self.eps = dim, model.config.norm_eps


class FFN(Protocol):
    """An FFN run in place of the dense one (`ear.routed`)."""

    def starts_at(self, num_tokens: int) -> int:
        """The first generation-order position whose step it runs: earlier steps, which lay the
        picture out, keep the dense FFN."""
        ...

    def __call__(self, i: int, layer: _LayerWeights, h: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
        """(layer index, its prepared weights, the FFN input (rows, L, dim), the slot's work
        counter) -> the FFN output; it adds [multiply-adds run, multiply-adds of the dense FFN]
        to the counter with tensor ops (CUDA graphs replay them)."""
        ...


@dataclass(frozen=True)
class _Plan(Span):
    """One forward (a `Span`) made concrete: positions start..end-1 are fed (class token and/or
    content tokens, then mask queries), with their mask and rotary table."""

    start: int
    end: int
    mask: torch.Tensor  # (L, end) bool, [query, slot]
    rope: torch.Tensor  # (L, 3, 1, head_dim/2) complex64; the v plane is 1


def _plan(layout: _Layout, span: Span) -> _Plan:
    start = 0 if span.with_class else span.fed.start + 1
    end = max(span.fed.stop, span.out.stop) + 1
    cos, sin = layout.rope[start:end].unbind(-1)
    qk = torch.complex(cos, sin)[:, None, :]
    rope = torch.stack([qk, qk, torch.ones_like(qk)], dim=1)
    return _Plan(span.k, span.fed, span.out, span.checked, span.with_class, start=start, end=end,
                 mask=layout.infer_mask[start:end, :end], rope=rope)


@dataclass(eq=False)  # identity: slots are found in the idle pool by who they are
class _Slot:
    """Everything one generation writes, for one (schedule, bucket, guidance): reused, never shared."""

    epoch: int  # the prepared weights it was made for
    rows: int  # model rows: bucket, doubled under guidance
    bucket: int
    caches: list[torch.Tensor]  # per layer (rows, slots, planes, heads, head_dim)
    complex_caches: list[torch.Tensor] | None  # float32: complex views the rotation writes into
    tokens: torch.Tensor  # (bucket, n) generation order
    streams: torch.Tensor  # (bucket, n) noise stream per row and generation-order cell
    cond: torch.Tensor  # (rows, 1, dim) class embeddings
    mods: list[torch.Tensor]  # per layer (6, rows, 1, dim): gamma1, gamma2, scale1, scale2, shift1, shift2
    weights: _Weights  # what its steps (and graphs) read, kept even if the runner rebuilds
    codes: torch.Tensor
    known: torch.Tensor  # (bucket, n) bool generation order: cells that take `given`, never drawn
    given: torch.Tensor  # (bucket, n) their tokens
    masked: bool = False  # some known cell lies after the prefix (else the select is skipped)
    settings: RowSettings | None = None
    host: torch.Tensor | None = None  # pinned copy of `tokens` (CUDA)
    # graphed steps: per key the graph, the plan whose tensors it reads (kept alive with it) and
    # what the step returns (views of buffers outside the pool)
    graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, _Plan, Any]] = field(default_factory=dict)
    # where graphs leave their logits: outside the graph pool, two so that step k's logits stay
    # valid while step k+1 already runs (tokens arrive one step behind)
    logits: list[torch.Tensor] = field(default_factory=list)
    # refinement's own: the redraws' noise streams and the known cells' tokens (UNKNOWN elsewhere),
    # written per generation into the same tensors; and, graphed, where its steps leave their
    # logits (checked cells, then queries; two by step parity) and the checked cells' corrections
    redraws: torch.Tensor | None = None
    refined_given: torch.Tensor | None = None
    refined_logits: list[torch.Tensor] = field(default_factory=list)
    corrected: torch.Tensor | None = None
    mask_ids: dict[int, torch.Tensor] = field(default_factory=dict)
    ffn: FFN | None = None  # this generation's FFN in place of the dense one
    ffn_from: int = 0  # ... from this generation-order position on (`FFN.starts_at`)
    work: torch.Tensor | None = None  # (2,) float64: FFN multiply-adds [run, dense] so far


def _cache_planes(dtype: torch.dtype) -> int:
    """float32 keeps the rotated queries beside keys and values (one complex write does all three)."""
    return 3 if dtype == torch.float32 else 2


def kv_cache_bytes_per_row(config: EARConfig, dtype: torch.dtype) -> int:
    """Bytes of decode cache one model row holds (a guided image is two rows): every layer's
    grid² + 1 slots of keys and values, in float32 with the queries beside them. Start-up's GPU
    budget and bulk sampling's batch size both count with this."""
    return config.n_layer * (config.grid_size ** 2 + 1) * _cache_planes(dtype) * config.dim * dtype.itemsize


def _bucket(batch: int, device: torch.device) -> int:
    """CUDA graphs are captured per batch size, so CUDA rounds up to a power of two; a CPU computes
    exactly the rows asked for."""
    return 1 << (batch - 1).bit_length() if device.type == "cuda" else batch


def _graphs_default(device: torch.device) -> bool:
    """Graphs on CUDA, except under ZeroGPU (a fresh GPU worker per call: capture would cost more
    than it saves) or when EAR_CUDA_GRAPHS=0."""
    if device.type != "cuda" or os.environ.get("EAR_CUDA_GRAPHS", "1") == "0":
        return False
    return not os.environ.get("SPACES_ZERO_GPU")


class DecodeRunner:
    """The fast decode loop for one model. Get it with `runner_for(model)`."""

    def __init__(self, model: EAR, linear: str = "auto", graphs: bool | None = None) -> None:
        self._model = weakref.ref(model)
        self.linear_request = linear
        self.graphs_request = graphs
        self._lock = threading.Lock()
        self._fingerprint: tuple | None = None
        self._free: dict[tuple, list[_Slot]] = {}
        self._idle_order: list[tuple[tuple, _Slot]] = []
        self._epoch = 0
        self.capture_seconds = 0.0
        # The last layer runs only the mask-query rows; a head that reads the content rows' outputs
        # (a correction head) sets this to run every row.
        self.content_outputs = False
        self.share_mask_projection = True
        # Refined steps in the form a CUDA graph can hold (re-feed every row, correct by a select);
        # None: where graphs are on. Eagerly a CPU re-feeds only the rows a correction changed.
        self.static_refinement: bool | None = None

    # ---- weights, buckets, slots ---------------------------------------------------------------

    @property
    def model(self) -> EAR:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this runner no longer exists")
        return model

    def _refresh(self) -> None:
        """(Re)build the prepared weights when the model's weights, dtype or device changed."""
        model = self.model
        fingerprint = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())
        with self._lock:
            if fingerprint != self._fingerprint:
                self._rebuild(model, fingerprint)

    def _rebuild(self, model: EAR, fingerprint: tuple) -> None:
        weight = model.output.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.mode = _linear_mode(self.linear_request, self.device, self.dtype)
        with torch.inference_mode():
            self.weights = _Weights(model, self.mode)
            self.codes = vocab_codes(model.config.vocab_size, self.device)
        self.use_graphs = _graphs_default(self.device) if self.graphs_request is None else self.graphs_request
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a model on a CUDA device")
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._capture_stream = torch.cuda.Stream(self.device) if self.use_graphs else None
        self._free.clear()
        self._idle_order.clear()
        self._plans: dict[tuple[str, tuple[int, ...]], _Plan] = {}
        self._fingerprint = fingerprint
        self._epoch += 1  # slots still in flight are dropped when they come back

    def install(self) -> DecodeRunner:
        """Make this the runner that sampling uses for its model (keeps its prepared weights)."""
        with _RUNNERS_LOCK:
            _RUNNERS[self.model] = self
        return self

    def release(self) -> None:
        """Drop every idle cache and graph (they are made again on the next generation)."""
        with self._lock:
            self._free.clear()
            self._idle_order.clear()

    def cached_slots(self) -> int:
        return sum(len(v) for v in self._free.values())

    def _new_slot(self, schedule: Schedule, bucket: int, guided: bool) -> _Slot:
        c, dev = self.model.config, self.device
        rows, n = bucket * (2 if guided else 1), schedule.num_tokens
        complex_cache = self.dtype == torch.float32
        planes = _cache_planes(self.dtype)
        caches = [torch.zeros(rows, n + 1, planes, c.n_head, c.head_dim, dtype=self.dtype, device=dev)
                  for _ in range(c.n_layer)]
        slot = _Slot(epoch=self._epoch, rows=rows, bucket=bucket, caches=caches,
                     complex_caches=_complex_views(caches) if complex_cache else None,
                     weights=self.weights, codes=self.codes,
                     tokens=torch.zeros(bucket, n, dtype=torch.long, device=dev),
                     streams=torch.zeros(bucket, n, dtype=torch.long, device=dev),
                     known=torch.zeros(bucket, n, dtype=torch.bool, device=dev),
                     given=torch.zeros(bucket, n, dtype=torch.long, device=dev),
                     cond=torch.zeros(rows, 1, c.dim, dtype=self.dtype, device=dev),
                     mods=[torch.zeros(6, rows, 1, c.dim, dtype=self.dtype, device=dev)
                           for _ in range(c.n_layer)] if c.adaln else [])
        if dev.type == "cuda":
            slot.host = torch.zeros(bucket, n, dtype=torch.long, pin_memory=True)
        if self.use_graphs:
            widest = max(schedule.sizes)
            slot.logits = [torch.empty(bucket, widest, c.vocab_size, device=dev) for _ in range(2)]
        return slot

    def _acquire(self, key: tuple, schedule: Schedule, bucket: int, guided: bool) -> _Slot:
        with self._lock:
            free = self._free.get(key)
            if free:
                slot = free.pop()
                self._idle_order.remove((key, slot))
                return slot
        return self._new_slot(schedule, bucket, guided)

    def _give_back(self, key: tuple, slot: _Slot) -> None:
        """Keep the slot for the next stream of its shape; beyond MAX_IDLE_SLOTS idle ones, the
        longest-idle goes (a CPU has a bucket per batch size, which would otherwise pile up)."""
        with self._lock:
            if slot.epoch != self._epoch:
                return
            self._free.setdefault(key, []).append(slot)
            self._idle_order.append((key, slot))
            while len(self._idle_order) > MAX_IDLE_SLOTS:
                old_key, old = self._idle_order.pop(0)
                self._free[old_key].remove(old)

    def _step_plan(self, layout: _Layout, span: Span) -> _Plan:
        key = (layout.schedule.name, span.key)
        if key not in self._plans:
            self._plans[key] = _plan(layout, span)
        return self._plans[key]

    # ---- one generation ------------------------------------------------------------------------

    def _start(self, slot: _Slot, class_ids: torch.Tensor, rows: RowSettings, prefix: torch.Tensor,
               known: torch.Tensor | None, order: torch.Tensor, ffn: FFN | None) -> None:
        """Write this generation's classes, modulation, settings, prefix, known cells and noise
        streams (into the slot's own tensors: captured graphs read them)."""
        w, batch = slot.weights, class_ids.shape[0]
        pad = slot.bucket - batch
        ids = torch.cat([class_ids, class_ids[:1].expand(pad)]) if pad else class_ids
        if slot.rows != slot.bucket:
            ids = torch.cat([ids, torch.full_like(ids, self.model.null_class)])
        cond = F.embedding(ids.to(self.device), w.classes)[:, None]
        slot.cond.copy_(cond)
        for layer, mods in zip(w.layers, slot.mods, strict=False):
            ada = F.linear(F.silu(cond), *layer.ada)
            gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.chunk(6, dim=-1)
            g1, g2 = layer.gains
            mods.copy_(torch.stack([gamma1, gamma2, g1 * (1 + scale1), g2 * (1 + scale2), shift1, shift2]))
        settings = _padded(rows, pad).to(self.device)
        if slot.settings is None:
            slot.settings = settings
        else:  # same tensors (captured graphs read them), new values; the host-side flags follow
            for name in RowSettings.TENSORS:
                getattr(slot.settings, name).copy_(getattr(settings, name))
            slot.settings.guided, slot.settings.filtered = settings.guided, settings.filtered
            slot.settings.greedy = settings.greedy
        if prefix.shape[1]:
            slot.tokens[:batch, : prefix.shape[1]].copy_(prefix)
        slot.masked = known is not None and bool((known[:, prefix.shape[1]:] >= 0).any())
        if slot.masked:
            assert known is not None
            slot.known.zero_()
            slot.known[:batch].copy_(known >= 0)
            slot.given[:batch].copy_(known.clamp_min(0))
        slot.streams.copy_(cell_streams(slot.settings.keys, order.numel())[:, order.to(self.device)])
        slot.ffn = ffn
        if ffn is not None:
            slot.ffn_from = ffn.starts_at(order.numel())
            if slot.work is None:
                slot.work = torch.zeros(2, dtype=torch.float64, device=self.device)
            slot.work.zero_()

    def _inputs(self, slot: _Slot, plan: _Plan) -> torch.Tensor:
        fed = slot.tokens[:, plan.fed]
        if slot.rows != slot.bucket:
            fed = fed.repeat(2, 1)
        m = plan.num_queries
        if m not in slot.mask_ids:
            mask_id = self.model.config.vocab_size  # the row appended to the token table
            slot.mask_ids[m] = torch.full((slot.rows, m), mask_id, device=self.device)
        x = F.embedding(torch.cat([fed, slot.mask_ids[m]], dim=1), slot.weights.embed)
        return torch.cat([slot.cond, x], dim=1) if plan.with_class else x

    def _attend(self, layer: _LayerWeights, h: torch.Tensor, i: int, slot: _Slot,
                plan: _Plan, queries: int | None = None) -> torch.Tensor | None:
        """qkv projection, rotation written straight into the cache, attention over slots < end;
        with `queries`, every row still writes its keys and values but only the last `queries`
        rows attend and come out (none: nothing comes out)."""
        rows, length, dim = h.shape
        heads = self.model.config.n_head
        m = plan.num_queries
        if i == 0 and m > 1 and self.share_mask_projection:  # the mask rows are one row repeated
            head = layer.wqkv(h[:, : length - m + 1])
            qkv = torch.cat([head, head[:, -1:].expand(-1, m - 1, -1)], dim=1)
        else:
            qkv = layer.wqkv(h)
        qkv = qkv.view(rows, length, 3, heads, -1, 2)
        cache = slot.caches[i]
        if slot.complex_caches is not None:
            written = slot.complex_caches[i][:, plan.start:plan.end]
            torch.mul(torch.view_as_complex(qkv), plan.rope, out=written)
            q = cache[:, plan.start:plan.end, 0]
            k, v = cache[:, : plan.end, 1], cache[:, : plan.end, 2]
        else:  # rotate in float32, as the reference does, then store in the compute dtype
            rotated = torch.view_as_real(torch.view_as_complex(qkv.float()) * plan.rope).flatten(-2)
            cache[:, plan.start:plan.end].copy_(rotated[:, :, 1:])
            q = rotated[:, :, 0].to(self.dtype)
            k, v = cache[:, : plan.end, 0], cache[:, : plan.end, 1]
        if queries == 0:  # a re-feed pass's last layer: its keys and values are all that is read
            return None
        mask = plan.mask
        if queries is not None:
            q, mask, length = q[:, -queries:], mask[-queries:], queries
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask)
        return layer.wo(y.transpose(1, 2).reshape(rows, length, dim))

    def _forward(self, slot: _Slot, plan: _Plan) -> torch.Tensor | None:
        """Guided float32 logits (bucket, c + m, V) of this step's checked cells (refinement
        only) and queries; None for a re-feed pass, which only writes the cache."""
        w = slot.weights
        x = self._inputs(slot, plan)
        shape = (w.dim,)
        last = len(w.layers) - 1
        read = plan.num_checked + plan.num_queries  # the rows whose outputs are read, at the end
        position = plan.out.start if plan.num_queries else plan.fed.start
        routed = slot.ffn is not None and position >= slot.ffn_from
        for i, layer in enumerate(w.layers):
            # Content rows only give keys and values: after the last layer's attention nothing
            # reads them but the checked cells (refinement's correction) and the queries (a
            # re-feed pass reads none), unless `content_outputs` asks for every row.
            queries = None if i < last or self.content_outputs else read
            ada = layer.ada is not None
            gamma1, gamma2, scale1, scale2, shift1, shift2 = slot.mods[i] if ada else (None,) * 6
            h = F.rms_norm(x, shape, None, w.eps)
            y = self._attend(layer, torch.addcmul(shift1, h, scale1) if ada else h, i, slot, plan, queries)
            if y is None:
                return None
            x = x if queries is None else x[:, -queries:]
            x = torch.addcmul(x, gamma1, y) if ada else x + y
            h = F.rms_norm(x, shape, None, w.eps)
            y = self._ffn(i, layer, torch.addcmul(shift2, h, scale2) if ada else h, slot, routed)
            x = torch.addcmul(x, gamma2, y) if ada else x + y
        logits = w.head(F.rms_norm(x[:, x.shape[1] - read:], shape, None, w.eps)).float()
        return guide(logits, slot.settings) if slot.rows != slot.bucket else logits

    @staticmethod
    def _ffn(i: int, layer: _LayerWeights, h: torch.Tensor, slot: _Slot, routed: bool) -> torch.Tensor:
        if routed:
            assert slot.ffn is not None and slot.work is not None
            return slot.ffn(i, layer, h, slot.work)
        if slot.work is not None and slot.ffn is not None:  # an activated generation's dense step
            slot.work += h.numel() * 3 * layer.w2.weight.shape[1]
        a, b = layer.w13(h).chunk(2, dim=-1)
        return layer.w2(F.silu(a) * b)

    def _step(self, slot: _Slot, plan: _Plan) -> torch.Tensor:
        logits = self._forward(slot, plan)
        slot.tokens[:, plan.out] = _kept(slot, plan, draw(logits, slot.settings, slot.streams[:, plan.out],
                                                          slot.codes))
        return logits

    def _graphed_step(self, slot: _Slot, plan: _Plan) -> torch.Tensor:
        out = slot.logits[plan.k % 2][:, : plan.num_queries]
        out.copy_(self._step(slot, plan))
        return out

    def _replay(self, slot: _Slot, key: tuple, plan: _Plan, step: Callable[[], Any]) -> Any:
        """Run `step` (which reads `plan`) as a CUDA graph, captured on first use under `key` (see
        docs/cuda-graphs.md for the rules this follows). Returns what `step` returned at capture:
        views of the slot's own buffers, which each replay rewrites."""
        s = slot.settings
        key = (*key, s.filtered, s.greedy, slot.masked, slot.ffn)
        if key not in slot.graphs:
            with _CAPTURE_LOCK:  # one capture at a time in a process
                started = time.perf_counter()
                counted = None if slot.work is None else slot.work.clone()  # the warm-up adds to it
                tokens = slot.tokens.clone()  # a refined step corrects tokens it reads: undo the
                stream = self._capture_stream  # warm-up's writes, so the replay starts where it did
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # warm-up on the capture's stream (lazy handles,
                    step()  # workspaces)
                    slot.tokens.copy_(tokens)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                # thread_local: a consumer thread's device work (a preview decode) may go on
                with torch.cuda.graph(graph, pool=self._pool, stream=stream,
                                      capture_error_mode="thread_local"):
                    out = step()
                slot.graphs[key] = (graph, plan, out)
                torch.cuda.synchronize()
                if counted is not None:
                    slot.work.copy_(counted)
                self.capture_seconds += time.perf_counter() - started
        graph, _plan, out = slot.graphs[key]
        graph.replay()
        return out

    def decode(self, class_ids: torch.Tensor, rows: RowSettings, *, prefix: torch.Tensor,
               known: torch.Tensor | None = None, schedule: Schedule | None = None,
               pick: Picker | None = None, refinement: Refinement | None = None,
               last: int | None = None, ffn: FFN | None = None,
               work: torch.Tensor | None = None) -> Iterator[tuple]:
        """Yield (step k, guided logits (B, m, V), tokens (B, m)) for every step after the prefix.
        `known` (B, n) in generation order, UNKNOWN (-1) where drawn: those cells take their token.
        Logits stay valid until the next step is asked for; tokens are the consumer's to keep.
        `pick(k, logits)` replaces the draw (teacher forcing); otherwise tokens are drawn on the
        device and, on CUDA, arrive through pinned memory one step behind the device.
        With `refinement` (`ear.refine`, eager, up to step `last`), each item also carries the
        fixes of earlier parts: (k, logits, tokens, [(part, final tokens, corrected)]). `ffn` runs
        in place of every dense FFN; `work` (2,), when given, holds its multiply-adds [run, dense]
        so far at each yield (on CUDA, possibly with the step already running)."""
        self._refresh()
        layout = self.model.layout(schedule)
        sched, batch = layout.schedule, class_ids.shape[0]
        first = sched.steps_for_prefix(prefix.shape[1])
        bucket = _bucket(batch, self.device)
        key = (sched.name, bucket, rows.guided)
        with torch.inference_mode():
            slot = self._acquire(key, sched, bucket, rows.guided)
        stop = sched.num_steps - 1 if last is None else last
        steps = self._run(slot, layout, first, batch, pick) if refinement is None else \
            refine.grouped(self._run_refined(slot, layout, first, stop, batch, refinement), stop)
        try:
            with torch.inference_mode():
                self._start(slot, class_ids, rows, prefix.to(self.device),
                            None if known is None else known.to(self.device), layout.order, ffn)
            for step in steps:
                if work is not None and slot.ffn is not None:
                    work.copy_(slot.work)
                yield step
        finally:  # also when the consumer stops early: the slot goes back for the next stream
            steps.close()
            self._give_back(key, slot)

    def _run(self, slot: _Slot, layout: _Layout, first: int, batch: int,
             pick: Picker | None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        pending = None
        for k in range(first, layout.schedule.num_steps):
            plan = self._step_plan(layout, refine.plain_span(layout.schedule, k, first))
            if pick is not None:  # eager; the picker runs outside inference mode, as user code (and
                # comes with a prefix only: `ear.sampler.decode`)
                assert not slot.masked, "teacher forcing takes a prefix, not known cells"
                with torch.inference_mode():
                    logits = self._forward(slot, plan)[:batch]
                tokens = pick(k, logits).to(device=self.device, dtype=torch.long)
                with torch.inference_mode():
                    slot.tokens[:batch, plan.out] = tokens
                yield k, logits, tokens
                continue
            with torch.inference_mode():
                if self.use_graphs and not plan.with_class:
                    step = partial(self._graphed_step, slot, plan)
                    logits = self._replay(slot, (plan.k, plan.start), plan, step)
                else:
                    logits = self._step(slot, plan)
                if slot.host is None:
                    tokens = slot.tokens[:batch, plan.out].clone()
                else:
                    slot.host[:, plan.out].copy_(slot.tokens[:, plan.out], non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record()
            if slot.host is None:
                yield k, logits[:batch], tokens
                continue
            if pending is not None:  # the device already runs step k while step k-1 is consumed
                yield _arrived(*pending, slot, batch)
            pending = (k, logits, ready, plan)
        if pending is not None:
            yield _arrived(*pending, slot, batch)

    def _run_refined(self, slot: _Slot, layout: _Layout, first: int, last: int, batch: int,
                     refinement: Refinement) -> Iterator[refine.Forward]:
        """The refined forwards (`ear.refine.spans`), synchronous on every device: eager, or in
        their static form (`static_refinement`) replayed as CUDA graphs where graphs are on."""
        static = self.use_graphs if self.static_refinement is None else self.static_refinement
        with torch.inference_mode():
            noise = self._refinement_buffers(slot, layout.schedule)
        changed = None  # (bucket,) bool: the rows whose last checked part was corrected (eager)
        for span in refine.spans(layout.schedule, first, last):
            with torch.inference_mode():
                if not static:
                    span = self._refeed(slot, layout, span, changed)
                plan = self._step_plan(layout, span)
                if not span.num_checked and not span.num_queries:  # a re-feed pass: nothing to read
                    if not span.empty:
                        self._forward(slot, plan)
                    continue
                if self.use_graphs and static and not span.with_class:  # (the eager form syncs)
                    key = ("refined", *span.key, refinement.threshold)
                    logits, corrected = self._replay(slot, key, plan, partial(
                        self._graphed_refined_step, slot, plan, span, noise, refinement.threshold))
                else:
                    logits, corrected = self._refined_step(slot, plan, span, noise, refinement.threshold,
                                                           static)
                changed = None if corrected is None or static else corrected.any(1)
                fix = None if corrected is None else \
                    (span.k - 1, slot.tokens[:batch, span.checked].clone(), corrected[:batch].clone())
                tokens = slot.tokens[:batch, span.out].clone()
            yield span, logits[:batch, span.num_checked:], tokens, fix

    def _refinement_buffers(self, slot: _Slot, schedule: Schedule) -> refine.Noise:
        """This generation's redraw streams and known tokens, in the slot's own tensors (graphs
        read them); with graphs, the buffers refined steps leave their results in (made once)."""
        if slot.redraws is None:
            slot.redraws, slot.refined_given = torch.empty_like(slot.streams), torch.empty_like(slot.given)
        if self.use_graphs and not slot.refined_logits:  # a step checks one part and queries the next
            rows, vocab = 2 * max(schedule.sizes), self.model.config.vocab_size
            slot.refined_logits = [torch.empty(slot.bucket, rows, vocab, device=self.device)
                                   for _ in range(2)]
            slot.corrected = torch.zeros(slot.bucket, rows, dtype=torch.bool, device=self.device)
        slot.redraws.copy_(refine.redraw_streams(slot.streams))
        if slot.masked:
            slot.refined_given.copy_(slot.given.masked_fill(~slot.known, -1))
        given = slot.refined_given if slot.masked else None
        return refine.Noise(slot.streams, slot.redraws, given, slot.codes)

    def _refined_step(self, slot: _Slot, plan: _Plan, span: Span, noise: refine.Noise, threshold: float,
                      static: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One refined forward: (logits of the checked cells and queries, the checked cells'
        corrections or None), the queries drawn and the checked part corrected in the slot's tokens."""
        logits = self._forward(slot, plan)
        return logits, refine.advance(span, logits, slot.tokens, slot.settings, noise, threshold, static)

    def _graphed_refined_step(self, slot: _Slot, plan: _Plan, span: Span, noise: refine.Noise,
                              threshold: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, corrected = self._refined_step(slot, plan, span, noise, threshold, static=True)
        assert slot.corrected is not None
        out = slot.refined_logits[plan.k % 2][:, : logits.shape[1]]
        out.copy_(logits)
        if corrected is None:
            return out, None
        flags = slot.corrected[:, : corrected.shape[1]]
        flags.copy_(corrected)
        return out, flags

    def _refeed(self, slot: _Slot, layout: _Layout, span: Span, changed: torch.Tensor | None) -> Span:
        """Re-feed the span's re-fed part only where it changed: when every row's did, the span
        stays whole (one forward); otherwise the rows that changed are re-fed on their own and
        the span goes on without the part (a row whose part kept its tokens has its keys and
        values right already). Returns what the step still feeds."""
        if span.refed.stop == span.refed.start:
            return span
        rows = changed.nonzero()[:, 0]
        if rows.numel() == slot.bucket:
            return span
        if rows.numel():
            self._forward_rows(slot, self._step_plan(layout, span.refeed_only()), rows)
        return span.without_refeed()

    def _forward_rows(self, slot: _Slot, plan: _Plan, rows: torch.Tensor) -> None:
        """A re-feed pass for some of the slot's rows (index tensor): their cache rows up to the
        plan's end are gathered, fed, and the slots it wrote are put back."""
        model_rows = rows if slot.rows == slot.bucket else torch.cat([rows, rows + slot.bucket])
        caches = [cache[model_rows, : plan.end] for cache in slot.caches]
        part = replace(slot, rows=model_rows.numel(), bucket=rows.numel(), caches=caches,
                       complex_caches=None if slot.complex_caches is None else _complex_views(caches),
                       tokens=slot.tokens[rows], cond=slot.cond[model_rows],
                       mods=[mods[:, model_rows] for mods in slot.mods], mask_ids={}, graphs={}, logits=[])
        self._forward(part, plan)
        for cache, written in zip(slot.caches, caches, strict=True):
            cache[model_rows, plan.start:plan.end] = written[:, plan.start:plan.end]


def _complex_views(caches: list[torch.Tensor]) -> list[torch.Tensor]:
    """float32 caches seen as complex numbers: the rotation multiplies q, k (and v by 1) into them."""
    return [torch.view_as_complex(t.unflatten(-1, (-1, 2))) for t in caches]


def _kept(slot: _Slot, plan: _Plan, drawn: torch.Tensor) -> torch.Tensor:
    """This step's tokens: the known cells' own where the slot has any (a select, same shapes)."""
    if not slot.masked:
        return drawn
    return torch.where(slot.known[:, plan.out], slot.given[:, plan.out], drawn)


def _arrived(k: int, logits: torch.Tensor, ready: torch.cuda.Event, plan: _Plan, slot: _Slot,
             batch: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    ready.synchronize()  # a copy: the pinned buffer is written again when the slot is reused
    return k, logits[:batch], slot.host[:batch, plan.out].clone()


def _padded(rows: RowSettings, pad: int) -> RowSettings:
    """Bucket padding rows repeat row 0's settings, so the host-side flags stay those of real rows."""
    return rows.map(lambda t: torch.cat([t, t[:1].expand(pad, *t.shape[1:])])) if pad else rows


_RUNNERS: weakref.WeakKeyDictionary[EAR, DecodeRunner] = weakref.WeakKeyDictionary()
_RUNNERS_LOCK = threading.Lock()
_CAPTURE_LOCK = threading.Lock()


def runner_for(model: EAR) -> DecodeRunner:
    """The model's runner, made on first use (prepared weights are rebuilt if the weights change).
    EAR_LINEAR (auto/plain/packed/onednn/int8) and EAR_CUDA_GRAPHS=0 choose its defaults."""
    with _RUNNERS_LOCK:
        runner = _RUNNERS.get(model)
        if runner is None:
            runner = _RUNNERS[model] = DecodeRunner(model, linear=os.environ.get("EAR_LINEAR", "auto"))
        return runner


def configure(model: EAR, *, linear: str = "auto", graphs: bool | None = None) -> DecodeRunner:
    """Give the model a runner with these choices: linear "auto" (on a CPU in float32, per weight
    shape the fastest of the float32 kernels by a short timing on first use; elsewhere plain),
    "plain", "packed" (MKL), "onednn" or "int8" (dynamic int8 on a CPU: faster, slightly different
    tokens); graphs None = CUDA graphs on CUDA outside ZeroGPU."""
    if linear not in LINEAR_MODES:
        raise ValueError(f"linear mode must be one of {LINEAR_MODES}, got {linear!r}")
    return DecodeRunner(model, linear=linear, graphs=graphs).install()
