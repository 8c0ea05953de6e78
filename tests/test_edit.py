"""Edit anywhere: known cells of any shape in the sampler, the engine and the scheduler (tokens
exact), and the pipeline's edit and placed extension built on them."""

from __future__ import annotations

import pytest
import torch

from ear.order import SCHEDULES, make_schedule
from ear.sampler import UNKNOWN, generate, sample
from ear.serving import Scheduler
from tests.helpers import noisy_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")
G = 8


@pytest.fixture(scope="module")
def model():
    return noisy_model()


def masks() -> dict[str, torch.Tensor]:
    """(G, G) bool: True where the cell is known."""
    r, c = torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij")
    return {"border": (r == 0) | (c == 0) | (r == G - 1) | (c == G - 1), "left": c < G // 2,
            "top": r < G // 2, "blob": ~(((r - 5) ** 2 + (c - 1) ** 2) <= 3),
            "centre": ~((r >= 2) & (r < 6) & (c >= 2) & (c < 6))}


def known_grid(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, tokens, torch.full_like(tokens, UNKNOWN))


@pytest.fixture(scope="module")
def picture(model) -> torch.Tensor:
    return generate(model, [7], seed=99)[0]  # (G, G): the "original" whose cells are kept


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("engine", ["runner", "reference"])
def test_known_cells_keep_their_tokens_in_every_order(model, picture, schedule, engine) -> None:
    sched = make_schedule(schedule, G)
    for name, mask in masks().items():
        states = list(sample(model, [3], seed=5, cfg_scale=1.5, known=known_grid(picture, mask),
                             schedule=sched, engine=engine))
        final = states[-1].tokens[0]
        assert torch.equal(final[mask], picture[mask]), name
        assert (final >= 0).all() and states[-1].done
        assert torch.equal(states[0].known, mask | states[0].known) and states[0].known[mask].all()
        for state in states:  # known cells are in every state; drawn ones appear step by step
            assert torch.equal(state.tokens[0][mask], picture[mask])


def test_runner_and_reference_draw_the_same_cells(model, picture) -> None:
    for mask in masks().values():
        kwargs = {"seed": 2, "cfg_scale": 2.0, "top_k": 8, "known": known_grid(picture, mask)}
        assert torch.equal(generate(model, [4], **kwargs), generate(model, [4], engine="reference", **kwargs))


def test_a_prefix_is_the_known_mask_of_the_first_steps(model, picture) -> None:
    sched = model.schedule
    order = torch.tensor(sched.order)
    for steps in (1, 4, 9):
        length = sched.boundaries[steps]
        prefix = picture.flatten()[order[:length]]
        mask = torch.zeros(G * G, dtype=torch.bool)
        mask[order[:length]] = True
        by_prefix = list(sample(model, [2, 6], seed=1, prefix=prefix))
        by_mask = list(sample(model, [2, 6], seed=1, known=known_grid(picture, mask.view(G, G))))
        assert len(by_prefix) == len(by_mask) == sched.num_steps - steps + 1
        for a, b in zip(by_prefix, by_mask, strict=True):
            assert (a.step, a.num_steps) == (b.step, b.num_steps)
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.known, b.known)
            assert torch.equal(a.new, b.new)


def test_a_batch_may_mix_masks_and_each_row_is_as_if_alone(model, picture) -> None:
    rows = [masks()["blob"], masks()["border"], torch.zeros(G, G, dtype=torch.bool), masks()["top"]]
    known = torch.stack([known_grid(picture, m) for m in rows])
    seeds, classes = [3, 4, 3, 8], [1, 2, 1, 5]
    mixed = generate(model, classes, seed=seeds, row_ids=[0] * 4, cfg_scale=1.5, known=known)
    for i, mask in enumerate(rows):
        alone = generate(model, [classes[i]], seed=seeds[i], cfg_scale=1.5,
                         known=known_grid(picture, mask) if mask.any() else None)
        assert torch.equal(mixed[i], alone[0]), i


def test_an_empty_mask_is_plain_generation(model) -> None:
    empty = torch.full((G, G), UNKNOWN)
    plain = list(sample(model, [1, 2], seed=3, cfg_scale=1.5))
    masked = list(sample(model, [1, 2], seed=3, cfg_scale=1.5, known=empty))
    assert len(plain) == len(masked) == model.schedule.num_steps
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(plain, masked, strict=True))


def test_the_scheduler_serves_known_cells_as_sample_alone(model, picture) -> None:
    scheduler = Scheduler(max_rows=8)
    try:
        for mask in (masks()["blob"], masks()["left"]):
            known = known_grid(picture, mask)
            served = list(scheduler.sample(model, [2], seed=6, cfg_scale=1.5, known=known))
            alone = list(sample(model, [2], seed=6, cfg_scale=1.5, known=known))
            assert [s.step for s in served] == [s.step for s in alone]
            assert torch.equal(served[-1].tokens, alone[-1].tokens)
    finally:
        scheduler.close()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"known": torch.zeros(G, G, dtype=torch.long)}, "every cell"),
    ({"known": torch.zeros(3, 3, dtype=torch.long)}, "must have shape"),
    ({"known": torch.full((G, G), 99)}, r"token ids must lie in \[0, 64\)"),
    ({"known": torch.full((G, G), -5)}, "UNKNOWN"),
    ({"known": torch.ones(G, G, dtype=torch.bool)}, "integer token ids"),
    ({"known": torch.full((G, G), UNKNOWN), "prefix": torch.zeros(1, dtype=torch.long)}, "not both"),
])
def test_bad_known_cells_are_one_sentence(model, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        next(sample(model, [1], **kwargs))
