"""The cached step sampler: equivalence with the training-mask forward, determinism, prefixes,
early stops and input validation."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from ear.draw import RowSettings, filter_rows
from ear.order import ORDERS, make_schedule
from ear.sampler import UNKNOWN, decode, generate, sample
from tests.helpers import noisy_model


@pytest.mark.parametrize("adaln", [True, False])
@pytest.mark.parametrize("rope", ["sequence", "true2d"])
@pytest.mark.parametrize("name", ORDERS)
def test_cached_decode_matches_training_forward(name, rope, adaln):
    model = noisy_model(rope=rope, adaln=adaln, grid_size=6)
    schedule = make_schedule(name, 6)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (2, 36), generator=gen)
    cond = torch.tensor([3, 10])  # a class and the null class
    full = model(tokens, cond, schedule=schedule)
    targets = tokens[:, list(schedule.order)]
    bounds = schedule.boundaries
    for use_cache in (True, False):
        steps = list(decode(model, cond, lambda k, _l: targets[:, bounds[k]:bounds[k + 1]],
                            schedule=schedule, use_cache=use_cache))
        assert len(steps) == schedule.num_steps
        for k, logits, _ in steps:
            torch.testing.assert_close(logits, full[:, bounds[k]:bounds[k + 1]], atol=2e-5, rtol=0)


def test_states_carry_grid_masks_and_progress():
    model = noisy_model()
    states = list(sample(model, [1, 2, 3], seed=0))
    assert [s.step for s in states] == list(range(1, 16))
    assert all(s.num_steps == 15 for s in states)
    for prev, cur in pairwise(states):
        assert torch.equal(cur.known, prev.known | cur.new) and not (prev.known & cur.new).any()
        assert cur.elapsed >= prev.elapsed
    for s in states:
        assert s.tokens.shape == (3, 8, 8)
        assert torch.equal(s.tokens[0] != UNKNOWN, s.known)
    assert states[-1].done and states[-1].num_known == 64


def test_same_seed_same_image_other_seed_other_image():
    model = noisy_model()
    kwargs = {"cfg_scale": 1.5, "temperature": 1.0, "top_k": 20, "top_p": 0.9}
    a = generate(model, [4, 5], seed=7, **kwargs)
    b = generate(model, [4, 5], seed=7, **kwargs)
    c = generate(model, [4, 5], seed=8, **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_greedy_is_the_same_with_and_without_cache():
    model = noisy_model()
    assert torch.equal(generate(model, [0, 9], greedy=True, cfg_scale=2.0),
                       generate(model, [0, 9], greedy=True, cfg_scale=2.0, use_cache=False))


def test_prefix_is_kept_and_continued_consistently():
    model = noisy_model()
    schedule = model.schedule
    full = generate(model, [2], greedy=True).flatten(1)
    length = schedule.prefix_len(schedule.square_steps()[4])
    prefix = torch.randint(0, 64, (length,), generator=torch.Generator().manual_seed(3))
    states = list(sample(model, [2, 6], prefix=prefix, seed=1))
    first, last = states[0], states[-1]
    assert first.step == schedule.square_steps()[4] and first.num_known == 16
    order = torch.tensor(schedule.order)
    for row in last.tokens.flatten(1):
        assert torch.equal(row[order[:length]], prefix)
    # Feeding the greedy run's own first tokens as a prefix continues it exactly.
    resumed = generate(model, [2], greedy=True, prefix=full[:, order[:length]])
    assert torch.equal(resumed.flatten(1), full)


def test_stopping_midway_leaves_the_model_reusable():
    model = noisy_model()
    fresh = generate(model, [1], seed=5)
    stream = sample(model, [1], seed=5)
    for state in stream:
        if state.step == 4:
            break
    stream.close()
    assert torch.equal(generate(model, [1], seed=5), fresh)
    assert not any("cache" in key for key in model.state_dict())


def test_off_distribution_schedule_runs():
    model = noisy_model()
    states = list(sample(model, [1], schedule=make_schedule("raster", 8), seed=0))
    assert len(states) == 64 and states[-1].done


def _rows(vocab: int, top_k, top_p, temperature=1.0) -> RowSettings:
    batch = len(top_k) if isinstance(top_k, list) else 1
    return RowSettings.build(batch, vocab, cfg_scale=1.0, temperature=temperature, top_k=top_k, top_p=top_p,
                             greedy=False, keys=torch.zeros(batch, dtype=torch.long))


def test_filter_top_k_and_top_p():
    logits = torch.tensor([[[3.0, 2.0, 2.0, 1.0, 0.0]]])
    kept = filter_rows(logits, _rows(5, 2, 1.0)).isfinite()
    assert kept.tolist() == [[[True, True, True, False, False]]]  # tie at the k-th value kept
    probs = torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]).log()
    assert filter_rows(probs, _rows(4, 0, 0.7)).isfinite().tolist() == [[[True, True, False, False]]]
    assert filter_rows(probs, _rows(4, 0, 0.4)).isfinite().tolist() == [[[True, False, False, False]]]
    # top-p sees the temperature-scaled probabilities of what top-k kept
    assert filter_rows(probs, _rows(4, 3, 0.7)).isfinite().tolist() == [[[True, True, False, False]]]
    assert filter_rows(probs, _rows(4, 0, 0.6)).isfinite().sum().item() == 2
    assert filter_rows(probs, _rows(4, 0, 0.6, temperature=0.5)).isfinite().sum().item() == 1


def test_filter_is_per_row():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(3, 1, 4)
    rows = _rows(4, [1, 0, 3], [1.0, 0.7, 1.0])
    assert filter_rows(logits, rows).isfinite().sum(-1).flatten().tolist() == [1, 2, 3]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"cfg_scale": -1.0}, "cfg_scale must be a finite number >= 0"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"top_p": 0.0}, r"top_p must lie in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must lie in \(0, 1\]"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
    ({"cfg_scale": float("inf")}, "cfg_scale must be a finite number >= 0"),
    ({"prefix": torch.zeros(3, dtype=torch.long)}, "step boundary"),
    ({"prefix": torch.full((4,), 99)}, r"token ids must lie in \[0, 64\)"),
    ({"prefix": torch.zeros(64, dtype=torch.long)}, "at least one step"),
])
def test_bad_sampling_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        next(sample(noisy_model(), [1], **kwargs))


@pytest.mark.parametrize("class_ids", [[11], [-1], [], 2.5])
def test_bad_class_ids(class_ids):
    with pytest.raises(ValueError, match="class"):
        next(sample(noisy_model(), class_ids))


def test_bad_training_inputs():
    model = noisy_model()
    with pytest.raises(ValueError, match=r"shape \(batch, 64\)"):
        model(torch.zeros(2, 10, dtype=torch.long), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 64\)"):
        model(torch.full((1, 64), 64), torch.tensor([1]))
    with pytest.raises(ValueError, match="eval"):
        next(sample(model.train(), [1]))


def test_bfloat16_path_tracks_float32():
    """The GPU path runs the model in bfloat16 (rotary tables and logits stay float32)."""
    model = noisy_model()
    tokens = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([1, 2])
    reference = model(tokens, cond)
    half = noisy_model().to(torch.bfloat16)
    logits = half(tokens, cond)
    assert logits.dtype == torch.float32
    assert (logits - reference).abs().max() < 0.1
    assert generate(half, [1, 2], seed=0, cfg_scale=1.5).shape == (2, 8, 8)
