"""Counted FLOPs of a generation: what dynamic activation saves, for the bench and Model info.

Counted, not estimated: the decode runs once with plain linears under
`torch.utils.flop_counter.FlopCounterMode`, which sees every product of the transformer (FLOPs =
2 x multiply-adds per image, CFG rows, routers and gates included, the tokenizer excluded). The
MKL-packed, oneDNN and int8 kernels are ops the counter does not know, hence the plain runner; the
CPU flash-attention op is registered here with its two products. The counting runner is installed
for the count only and the model's own runner put back after it: both give the same tokens, so a
generation that overlaps a count (in this process) only runs slower meanwhile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from ear.activate import Activation
from ear.engine import configure, runner_for
from ear.model import EAR
from ear.routed import RoutedFFN
from ear.sampler import sample

SAVING_KEYS = ("flops_dense", "flops_active", "ffn_active")  # what `activation_saving` measures


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    batch, heads, queries, dim = query_shape
    return 2 * batch * heads * queries * key_shape[2] * (dim + value_shape[3])


@contextlib.contextmanager
def counting_runner(model: EAR, every_row: bool) -> Iterator[None]:
    """The model decodes with plain linears and no CUDA graphs (what the counter sees) inside;
    `every_row`: the engine as before its free savings (every row through the last layer, every
    mask query projected on its own).
    It runs on one PyTorch thread: the counter's per-op dispatch is the cost, and on a busy
    2-core CPU two OpenMP threads made the bundled model's count 155 s instead of 8 s."""
    previous, threads = runner_for(model), torch.get_num_threads()
    runner = configure(model, linear="plain", graphs=False)
    runner.content_outputs = every_row or previous.content_outputs
    runner.share_mask_projection = not every_row and previous.share_mask_projection
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        previous.install()


def flops_per_image(model: EAR, classes: Sequence[int], *, activation: RoutedFFN | None = None,
                    every_row: bool = False, seed: int = 0, **sampling: Any) -> tuple[float, float]:
    """(FLOPs per image, FFN share run) of one generation of `classes` (labels) with `sampling`
    (ear.sampler.sample's values), activated by `activation` or dense; `every_row` counts the
    engine without its free savings (the content-token skip, the shared mask projection)."""
    with counting_runner(model, every_row), FlopCounterMode(display=False) as counter:
        state = None
        for state in sample(model, list(classes), seed=seed, activation=activation, **sampling):  # noqa: B007
            pass
    assert state is not None
    return counter.get_total_flops() / len(classes), state.ffn_active


def activation_saving(model: EAR, activation: Activation, classes: Sequence[int], tau: float | None = None,
                      **sampling: Any) -> dict[str, float]:
    """What Model info shows of an activation: total FLOPs per image of the engine before the
    free savings ("dense", as bench/bench_activate.py counts it) and activated at its tau
    (the free savings included) at `tau` (default: the activation's own), and the share of the dense
    FFN's multiply-adds it ran. The grouped form is counted (the products that shrink), on any
    device: CUDA's masked form runs the dense product, only to keep static shapes."""
    grouped = RoutedFFN(activation, tau, mode="grouped")
    dense, _ = flops_per_image(model, classes, every_row=True, **sampling)
    active, share = flops_per_image(model, classes, activation=grouped, **sampling)
    return dict(zip(SAVING_KEYS, (dense, active, share), strict=True))
