"""Orders and schedules: permutations, centre starts, growth that always touches what is known."""

from __future__ import annotations

import pytest

from ear.order import ORDERS, RADAR_SCHEDULES, SPIRAL_SCHEDULES, make_schedule, spiral_order


def _neighbours(cell: int, n: int) -> set[int]:
    r, c = divmod(cell, n)
    return {rr * n + cc for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1))
            if 0 <= rr < n and 0 <= cc < n}


@pytest.mark.parametrize("n", range(2, 65))
def test_every_schedule_is_a_permutation(n):
    for name in ORDERS:
        schedule = make_schedule(name, n)
        assert sorted(schedule.order) == list(range(n * n))
        assert schedule.boundaries[-1] == n * n


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 15, 16, 31, 32, 64])
def test_spiral_schedules_start_centred_and_grow_from_known_cells(n):
    centre = {(n - 1) // 2, n // 2}
    for name in (*SPIRAL_SCHEDULES, *RADAR_SCHEDULES):
        schedule = make_schedule(name, n)
        first = schedule.order[0]
        assert first // n in centre and first % n in centre
        known = set(schedule.groups[0])
        for group in schedule.groups[1:]:
            assert any(_neighbours(c, n) & known for c in group)
            known |= set(group)


def test_step_counts_for_16x16():
    assert make_schedule("arms", 16).num_steps == 31
    assert make_schedule("rings", 16).num_steps == 16
    assert make_schedule("raster", 16).num_steps == 256
    assert make_schedule("arms", 16).sizes[:6] == (1, 1, 2, 2, 3, 3)
    assert make_schedule("rings", 16).sizes[:4] == (1, 3, 5, 7)


@pytest.mark.parametrize("n", [4, 7, 16])
def test_arms_known_region_is_always_a_rectangle(n):
    schedule = make_schedule("arms", n)
    for steps in range(1, schedule.num_steps + 1):
        cells = schedule.order[: schedule.boundaries[steps]]
        rows = {c // n for c in cells}
        cols = {c % n for c in cells}
        assert len(rows) * len(cols) == len(cells)
        assert max(rows) - min(rows) + 1 == len(rows) and max(cols) - min(cols) + 1 == len(cols)


def test_square_steps_cover_the_central_square():
    schedule = make_schedule("arms", 16)
    squares = schedule.square_steps()
    assert set(squares) == set(range(1, 17))
    cells = schedule.order[: schedule.prefix_len(squares[8])]
    assert sorted({c // 16 for c in cells}) == list(range(4, 12))
    assert sorted({c % 16 for c in cells}) == list(range(4, 12))


def test_radial_groups_by_distance():
    schedule = make_schedule("radial", 16)
    assert set(schedule.groups[0]) >= {119, 120, 135, 136}  # the central 2x2 is in the first band
    assert schedule.num_steps < 16


def test_radar_rings_around_the_centre_token():
    """RadAR's 13 steps (ceil-Euclidean) and 9 (Chebyshev) on 16x16, centred where EAR starts."""
    radar, square = make_schedule("radar", 16), make_schedule("radar-square", 16)
    assert radar.sizes == (1, 4, 8, 16, 20, 32, 32, 36, 46, 36, 20, 4, 1)
    assert square.sizes == (1, 8, 16, 24, 32, 40, 48, 56, 31)
    assert radar.order[0] == square.order[0] == make_schedule("arms", 16).order[0] == 7 * 16 + 7
    for k, ring in enumerate(square.groups):  # a Chebyshev ring is the border of a square
        assert {max(abs(c // 16 - 7), abs(c % 16 - 7)) for c in ring} == {k}
    assert set(square.square_steps()) == {1, 3, 5, 7, 9, 11, 13, 15, 16}  # Extend keeps odd squares
    assert radar.groups[1] == (7 * 16 + 8, 8 * 16 + 7, 7 * 16 + 6, 6 * 16 + 7)  # clockwise from the right


def test_bad_arguments_name_the_allowed_range():
    with pytest.raises(ValueError, match=r"\[2, 64\]"):
        spiral_order(1)
    with pytest.raises(ValueError, match="arms, rings, raster, radial, radar, radar-square"):
        make_schedule("zigzag", 16)
    with pytest.raises(ValueError, match="step boundary"):
        make_schedule("arms", 16).steps_for_prefix(3)
