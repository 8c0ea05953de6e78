"""The decode runner (ear/engine.py) against the readable reference path, per-row randomness
(ear/draw.py), cache pooling and weight changes. CUDA-only checks skip without a GPU."""

from __future__ import annotations

import pytest
import torch

from bench.bench_engine import ops_per_layer_step, teacher_forced
from ear import engine
from ear.draw import RowSettings, draw, gumbel_noise, row_keys, vocab_codes
from ear.engine import MAX_IDLE_SLOTS, configure, float32_kernels, kv_cache_bytes_per_row, runner_for
from ear.order import make_schedule
from ear.sampler import generate, sample
from tests.helpers import noisy_model, tiny_ear

pytestmark = pytest.mark.usefixtures("torch_single_thread")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (graphs, bfloat16)")


def _both(model, class_ids, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return (generate(model, class_ids, **kwargs),
            generate(model, class_ids, engine="reference", **kwargs))


@pytest.mark.parametrize("adaln", [True, False])
@pytest.mark.parametrize("schedule", ["arms", "rings", "raster"])
def test_runner_matches_the_reference_at_greedy(adaln: bool, schedule: str) -> None:
    model = noisy_model(adaln=adaln, schedule="arms")
    fast, ref = _both(model, [1, 4, 9], greedy=True, cfg_scale=2.0, schedule=make_schedule(schedule, 8))
    assert torch.equal(fast, ref)


def test_runner_draws_the_same_tokens_as_the_reference_when_sampling() -> None:
    """Both paths hand equal float32 logits to the same draw, so sampled images agree too."""
    model = noisy_model()
    for kwargs in ({"cfg_scale": 1.5, "temperature": 1.0}, {"cfg_scale": 3.0, "top_k": 5, "top_p": 0.9},
                   {"cfg_scale": 1.0, "temperature": 0.7}):
        fast, ref = _both(model, [2, 3], seed=11, **kwargs)
        assert torch.equal(fast, ref), kwargs


def test_runner_continues_a_prefix_like_the_reference() -> None:
    model = noisy_model()
    sched = model.schedule
    full = generate(model, [5], greedy=True).flatten(1)[:, list(sched.order)]
    prefix = full[:, : sched.boundaries[6]]
    fast, ref = _both(model, [5], greedy=True, prefix=prefix)
    assert torch.equal(fast, ref) and torch.equal(fast.flatten(1)[:, list(sched.order)], full)


def test_an_image_depends_only_on_its_own_seed_row_and_settings() -> None:
    model = noisy_model()
    crowd = generate(model, [1, 2, 3, 1], seed=[7, 7, 9, 4], row_ids=[0, 1, 0, 2],
                     cfg_scale=[1.5, 2.0, 1.0, 3.0], temperature=[1.0, 0.8, 1.0, 0.0],
                     top_k=[0, 8, 0, 0], top_p=[1.0, 1.0, 0.8, 1.0])
    alone = [generate(model, [1], seed=7, cfg_scale=1.5),
             generate(model, [2], seed=7, row_ids=[1], cfg_scale=2.0, temperature=0.8, top_k=8),
             generate(model, [3], seed=9, top_p=0.8),
             generate(model, [1], greedy=True, cfg_scale=3.0)]
    for i, image in enumerate(alone):
        assert torch.equal(crowd[i], image[0]), i
    # a request of n images is rows 0..n-1 of its seed, wherever they sit
    assert torch.equal(generate(model, [1, 2], seed=7, cfg_scale=1.5)[0], crowd[0])


def test_seeds_reproduce_and_differ() -> None:
    model = noisy_model()
    a, b, c = (generate(model, [4, 4], seed=s, cfg_scale=1.5) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # rows of one request differ


def test_gumbel_draws_follow_the_softmax() -> None:
    """Over many independent rows the draw's frequencies are the temperature-scaled softmax."""
    vocab, n = 6, 20000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    for temperature in (1.0, 0.5):
        rows = RowSettings.build(n, vocab, cfg_scale=1.0, temperature=temperature, top_k=0, top_p=1.0,
                                 greedy=False, keys=row_keys(123, None, n))
        streams = torch.arange(n)[:, None] * 2654435761 % (1 << 32)
        tokens = draw(logits.expand(n, 1, vocab), rows, streams, vocab_codes(vocab, torch.device("cpu")))
        freq = torch.bincount(tokens.flatten(), minlength=vocab).float() / n
        assert (freq - (logits / temperature).softmax(-1)).abs().max() < 0.015, temperature


def test_noise_is_uniform_and_decorrelated() -> None:
    streams = torch.arange(64)[:, None] * 40503 + torch.arange(16)[None, :]
    g = gumbel_noise(streams % (1 << 32), vocab_codes(512, torch.device("cpu")))
    u = torch.exp(-torch.exp(-g))  # back to uniforms
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    flat = u.flatten(0, 1)
    corr = torch.corrcoef(flat[:, :64].T)  # neighbouring vocabulary entries
    assert (corr - torch.eye(64)).abs().max() < 0.12


def test_temperature_zero_is_greedy() -> None:
    model = noisy_model()
    assert torch.equal(generate(model, [3], temperature=0.0, seed=1, cfg_scale=2.0),
                       generate(model, [3], greedy=True, cfg_scale=2.0))


def test_bad_seeds_and_row_ids() -> None:
    model = noisy_model()
    for kwargs, phrase in (({"seed": -1}, "seed must be an integer >= 0"),
                           ({"seed": [1, 2, 3]}, "one value per row"),
                           ({"row_ids": [0, -1]}, "row ids"),
                           ({"cfg_scale": [1.0]}, "cfg_scale must be one value or one per row")):
        with pytest.raises(ValueError, match=phrase):
            next(sample(model, [1, 2], **kwargs))


def test_a_stopped_stream_hands_its_cache_back() -> None:
    model = noisy_model()
    runner = runner_for(model)
    runner.release()
    stream = sample(model, [1, 2], seed=0, cfg_scale=1.5)
    next(stream), next(stream)
    assert runner.cached_slots() == 0  # in use
    stream.close()
    assert runner.cached_slots() == 1
    generate(model, [3, 4], seed=1, cfg_scale=1.5)
    assert runner.cached_slots() == 1  # reused, not grown


def test_idle_caches_are_bounded() -> None:
    model = noisy_model()
    runner = runner_for(model)
    for batch in range(1, MAX_IDLE_SLOTS + 3):  # a CPU has one bucket per batch size
        generate(model, list(range(batch)), seed=0)
    assert runner.cached_slots() == MAX_IDLE_SLOTS
    runner.release()
    assert runner.cached_slots() == 0


def test_interleaved_streams_use_separate_caches() -> None:
    model = noisy_model()
    a, b = sample(model, [1], seed=5, cfg_scale=1.5), sample(model, [2], seed=6, cfg_scale=1.5)
    last_a = last_b = None
    for state_a, state_b in zip(a, b, strict=True):
        last_a, last_b = state_a, state_b
    assert torch.equal(last_a.tokens, generate(model, [1], seed=5, cfg_scale=1.5))
    assert torch.equal(last_b.tokens, generate(model, [2], seed=6, cfg_scale=1.5))


def test_prepared_weights_follow_the_model() -> None:
    model = noisy_model(seed=0)
    before = generate(model, [1, 2], greedy=True, cfg_scale=1.5)
    model.load_state_dict(noisy_model(seed=1).state_dict())
    after = generate(model, [1, 2], greedy=True, cfg_scale=1.5)
    assert not torch.equal(before, after)
    assert torch.equal(after, generate(model, [1, 2], greedy=True, cfg_scale=1.5, engine="reference"))
    half = model.to(torch.bfloat16)  # dtype change: caches and weights rebuilt in bfloat16
    assert generate(half, [1], greedy=True).shape == (1, 8, 8)


@pytest.mark.parametrize("linear", ["plain", "packed", "onednn", "int8"])
def test_linear_modes_agree_with_float32(linear: str) -> None:
    if linear in ("packed", "onednn") and linear not in float32_kernels():
        pytest.skip(f"this torch build has no {linear} linears")
    model = noisy_model(dim=128)
    configure(model, linear=linear)
    try:
        agreement = teacher_forced(model, 1.5, list(range(10)))[0]
    finally:
        configure(model)
    assert agreement >= (0.8 if linear == "int8" else 1.0), agreement


def test_bad_linear_mode() -> None:
    with pytest.raises(ValueError, match="linear mode"):
        configure(noisy_model(), linear="fp4")


def test_ops_per_layer_per_step_for_the_b_depth() -> None:
    """EAR-adaLN-B's 12 layers with small widths: the count per layer per step does not depend
    on the width. The reference path needs about 53; the runner at most 20."""
    model = tiny_ear(512, 16, num_classes=10, dim=64, n_layer=12, n_head=4)
    counted = {engine: ops_per_layer_step(model, 1.5, engine=engine) for engine in ("runner", "reference")}
    assert counted["runner"] <= 20 < counted["reference"], counted


@CUDA
def test_cuda_graphs_match_eager_and_bfloat16_tracks_float32() -> None:
    model = noisy_model(grid_size=16).cuda()
    eager = configure(model, graphs=False)
    ref = generate(model, [1, 2, 3], seed=4, cfg_scale=1.5)
    graphed = configure(model, graphs=True)
    assert torch.equal(generate(model, [1, 2, 3], seed=4, cfg_scale=1.5), ref)
    assert torch.equal(generate(model, [1, 2, 3], seed=4, cfg_scale=1.5), ref)  # replayed
    assert graphed.capture_seconds > 0 and eager.capture_seconds == 0
    greedy = generate(model, list(range(10)), greedy=True, cfg_scale=1.5)
    half = generate(model.to(torch.bfloat16), list(range(10)), greedy=True, cfg_scale=1.5)
    assert (half == greedy).float().mean().item() >= 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_per_row_is_what_a_slot_holds(dtype: torch.dtype) -> None:
    model = noisy_model().to(dtype)
    runner = runner_for(model)
    runner.release()
    generate(model, [1, 2, 3], seed=0, cfg_scale=1.5)  # guided: 6 model rows
    (slot,) = [s for slots in runner._free.values() for s in slots]
    held = sum(c.numel() * c.element_size() for c in slot.caches)
    assert slot.rows == 6 and held == slot.rows * kv_cache_bytes_per_row(model.config, dtype)


def test_start_up_and_bulk_budget_the_kv_cache_with_the_engines_count(monkeypatch) -> None:
    """One per-row computation: start-up's GPU budget and bulk's default batch both call it."""
    from ear import bulk, startup

    callers: list[str] = []

    def counted(name: str):
        def kv(config, dtype):
            callers.append(name)
            return kv_cache_bytes_per_row(config, dtype)
        return kv

    monkeypatch.setattr(startup, "kv_cache_bytes_per_row", counted("startup"))
    monkeypatch.setattr(bulk, "kv_cache_bytes_per_row", counted("bulk"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _device=None: (2**30, 2**31))
    startup.gpu_bytes_needed("B")
    model = noisy_model().to(torch.bfloat16)
    batch = bulk.fitting_batch(model, True, torch.device("cuda"))
    assert callers == ["startup", "bulk"]
    widest = max(model.schedule.sizes) * model.config.vocab_size * 4
    per_image = 2 * (kv_cache_bytes_per_row(model.config, torch.bfloat16) + 4 * widest) + 2 * widest
    fits = int(0.8 * 2**30) // per_image
    assert batch == min(bulk.MAX_BATCH, 1 << (fits.bit_length() - 1))


def _fake_timer(times: dict[str, float]):
    """A timer that says each kernel takes `times[kernel]` seconds, and counts its calls."""
    calls: list[str] = []

    def timer(linear, _x) -> float:
        calls.append(linear.mode)
        return times[linear.mode]
    timer.calls = calls
    return timer


def test_the_float32_kernel_is_chosen_by_timing_and_kept(monkeypatch) -> None:
    monkeypatch.setattr(engine, "_CHOSEN", {})
    monkeypatch.setattr(engine, "float32_kernels", lambda: ("plain", "packed", "onednn"))
    weight = torch.randn(48, 32)
    timer = _fake_timer({"plain": 3.0, "packed": 2.0, "onednn": 5.0})
    assert engine.float32_kernel(weight, timer) == "packed"
    assert len(timer.calls) == 3 * engine.TIMING_ROUNDS
    again = _fake_timer({"plain": 1.0, "packed": 9.0, "onednn": 9.0})
    assert engine.float32_kernel(weight, again) == "packed" and not again.calls  # kept for the process
    close = _fake_timer({"plain": 1.0, "packed": 0.95, "onednn": 1.0})  # another shape: timed anew
    assert engine.float32_kernel(torch.randn(16, 32), close) == "plain" and close.calls  # within the margin
    assert engine.chosen_kernels() == {((48, 32), torch.get_num_threads()): "packed",
                                       ((16, 32), torch.get_num_threads()): "plain"}


@pytest.mark.parametrize("fastest", float32_kernels())
def test_whichever_float32_kernel_wins_the_tokens_are_the_references(monkeypatch, fastest: str) -> None:
    monkeypatch.setattr(engine, "_CHOSEN", {})
    times = {k: 1.0 for k in float32_kernels()} | {fastest: 0.5}
    monkeypatch.setattr(engine, "_time_call", _fake_timer(times))
    model = noisy_model(dim=128)
    runner = configure(model)
    try:
        fast, ref = _both(model, [1, 4, 9], greedy=True, cfg_scale=2.0)
        sampled, sampled_ref = _both(model, [2, 3], seed=5, cfg_scale=1.5, top_k=8)
    finally:
        configure(model)
    assert runner.mode == "timed" and set(engine.chosen_kernels().values()) == {fastest}
    assert {layer.wqkv.mode for layer in runner.weights.layers} == {fastest}
    assert torch.equal(fast, ref) and torch.equal(sampled, sampled_ref)
