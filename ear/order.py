"""Generation orders and per-step schedules on a square token grid.

A `Schedule` is the single description of "which cells does step k add": the model derives its
block-causal attention mask from it and the sampler walks it, so a new order is one function here,
not a new model. Cells are raster indices (`row * n + col`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, cached_property
from itertools import pairwise

MIN_GRID, MAX_GRID = 2, 64
SPIRAL_SCHEDULES = ("arms", "rings")
SCHEDULES = ("arms", "rings", "raster", "radial")  # the orders Compare shows side by side
RADAR_SCHEDULES = ("radar", "radar-square")  # RadAR's rings around the centre token (two metrics)
ORDERS = (*SCHEDULES, *RADAR_SCHEDULES)  # every order a model may be trained on


def _check_grid(n: int) -> None:
    if not isinstance(n, int) or not MIN_GRID <= n <= MAX_GRID:
        raise ValueError(f"grid size must be an integer in [{MIN_GRID}, {MAX_GRID}], got {n!r}")


@cache
def spiral_order(n: int) -> tuple[int, ...]:
    """The official EAR spiral: start at row = col = (n-1)//2 (for even n the upper-left cell of the
    central 2x2), then legs of length 1, 1, 2, 2, 3, 3, ... turning right, down, left, up; the last
    leg is cut once every cell is visited."""
    _check_grid(n)
    row = col = (n - 1) // 2
    cells = [row * n + col]
    moves = ((0, 1), (1, 0), (0, -1), (-1, 0))
    leg, turn = 1, 0
    while len(cells) < n * n:
        for _ in range(2):  # two legs share a length
            d_row, d_col = moves[turn % 4]
            for _ in range(leg):
                row, col = row + d_row, col + d_col
                cells.append(row * n + col)
                if len(cells) == n * n:
                    return tuple(cells)
            turn += 1
        leg += 1
    return tuple(cells)


@dataclass(frozen=True)
class Schedule:
    """Which raster cells each step adds, in generation order (one group per step)."""

    name: str
    grid: int
    groups: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        order = [c for g in self.groups for c in g]
        if sorted(order) != list(range(self.grid * self.grid)) or any(not g for g in self.groups):
            raise ValueError(f"schedule {self.name!r} must cover every cell of the "
                             f"{self.grid}x{self.grid} grid exactly once in non-empty steps")

    @cached_property
    def order(self) -> tuple[int, ...]:
        return tuple(c for g in self.groups for c in g)

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(g) for g in self.groups)

    @property
    def num_steps(self) -> int:
        return len(self.groups)

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @cached_property
    def boundaries(self) -> tuple[int, ...]:
        """Cumulative token counts: the first `boundaries[k]` tokens are known after k steps."""
        out = [0]
        for size in self.sizes:
            out.append(out[-1] + size)
        return tuple(out)

    def prefix_len(self, steps: int) -> int:
        if not 0 <= steps <= self.num_steps:
            raise ValueError(f"steps must lie in [0, {self.num_steps}], got {steps}")
        return self.boundaries[steps]

    def steps_for_prefix(self, length: int) -> int:
        """How many whole steps a prefix of `length` tokens covers (ValueError if not whole)."""
        if length not in self.boundaries:
            shown = ", ".join(map(str, self.boundaries[:12]))
            raise ValueError(f"a prefix must end on a step boundary of the {self.name!r} schedule "
                             f"({shown}, ...), got {length} tokens")
        return self.boundaries.index(length)

    def square_steps(self) -> dict[int, int]:
        """k -> steps after which the known cells are exactly the central k x k square."""
        out: dict[int, int] = {}
        for steps in range(1, self.num_steps + 1):
            cells = self.order[: self.boundaries[steps]]
            rows = {c // self.grid for c in cells}
            cols = {c % self.grid for c in cells}
            k = len(rows)
            if (len(cols) == k and k * k == len(cells) and max(rows) - min(rows) == k - 1
                    and max(cols) - min(cols) == k - 1 and _is_central(min(rows), k, self.grid)
                    and _is_central(min(cols), k, self.grid)):
                out[k] = steps
        return out


def _is_central(lo: int, k: int, n: int) -> bool:
    """A span of k cells starting at lo is as centred as the grid allows."""
    return lo in {(n - k) // 2, (n - k + 1) // 2}


def _cut(order: tuple[int, ...], counts: list[int]) -> tuple[tuple[int, ...], ...]:
    """Split `order` at the cumulative `counts`."""
    bounds = [0, *counts]
    return tuple(order[a:b] for a, b in pairwise(bounds))


def arms(n: int) -> tuple[tuple[int, ...], ...]:
    """The released models' 2n-1 steps: each adds one full side to the known rectangle
    (1x1, 1x2, 2x2, 2x3, ...), cut at i*i and i*(i+1) along the spiral, not at the spiral's legs."""
    counts = [c for i in range(1, n + 1) for c in (i * i, i * (i + 1)) if c <= n * n]
    return _cut(spiral_order(n), counts)


def rings(n: int) -> tuple[tuple[int, ...], ...]:
    """The plain variant's n steps: step k completes the (k+1)x(k+1) square (an L-shaped band)."""
    return _cut(spiral_order(n), [k * k for k in range(1, n + 1)])


def raster(n: int) -> tuple[tuple[int, ...], ...]:
    """Classic next-token order, one cell per step: the baseline EAR is compared with."""
    return tuple((c,) for c in range(n * n))


def radial(n: int) -> tuple[tuple[int, ...], ...]:
    """RadAR-style rings: cells grouped by Euclidean distance from the grid's centre in bands one
    cell wide, each band ordered clockwise from the right."""
    mid = (n - 1) / 2

    def polar(c: int) -> tuple[float, float]:
        dr, dc = c // n - mid, c % n - mid
        return math.hypot(dr, dc), math.atan2(dr, dc) % (2 * math.pi)

    nearest = min(polar(c)[0] for c in range(n * n))
    bands: dict[int, list[int]] = {}
    for c in sorted(range(n * n), key=lambda c: polar(c)[::-1]):
        bands.setdefault(int(polar(c)[0] - nearest + 1e-9), []).append(c)
    return tuple(tuple(bands[b]) for b in sorted(bands))


def _centre_rings(n: int, ring: Callable[[int, int], int]) -> tuple[tuple[int, ...], ...]:
    """Cells grouped by `ring(d_row, d_col)` around the spiral's centre token ((n-1)//2 in both
    axes, where EAR starts), rings in increasing order, each clockwise from the right."""
    mid = (n - 1) // 2
    rings_: dict[int, list[tuple[float, int]]] = {}
    for c in range(n * n):
        dr, dc = c // n - mid, c % n - mid
        rings_.setdefault(ring(dr, dc), []).append((math.atan2(dr, dc) % (2 * math.pi), c))
    return tuple(tuple(c for _, c in sorted(rings_[k])) for k in sorted(rings_))


def radar(n: int) -> tuple[tuple[int, ...], ...]:
    """RadAR's rings (arXiv 2512.24639), one per step, read as the ceiling of the Euclidean
    distance from the centre token: 13 steps on 16x16 (1, 4, 8, 16, 20, 32, 32, 36, 46, 36, 20,
    4, 1). The paper does not say its metric; `radar_square` is the other reading."""
    return _centre_rings(n, lambda dr, dc: math.ceil(math.hypot(dr, dc) - 1e-9))


def radar_square(n: int) -> tuple[tuple[int, ...], ...]:
    """RadAR's rings as Chebyshev squares around the centre token: 9 steps on 16x16 (1, 8, 16,
    ..., 56, and the last row and column's 31)."""
    return _centre_rings(n, lambda dr, dc: max(abs(dr), abs(dc)))


_BUILDERS: dict[str, Callable[[int], tuple[tuple[int, ...], ...]]] = {
    "arms": arms, "rings": rings, "raster": raster, "radial": radial,
    "radar": radar, "radar-square": radar_square,
}


@cache
def make_schedule(name: str, grid: int) -> Schedule:
    if name not in _BUILDERS:
        raise ValueError(f"schedule must be one of {', '.join(ORDERS)}; got {name!r}")
    _check_grid(grid)
    return Schedule(name=name, grid=grid, groups=_BUILDERS[name](grid))
