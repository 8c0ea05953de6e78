"""A small line chart drawn with Pillow, for the README's budget sweeps (no plotting library in
the stack): one panel per quantity, the same x axis, a dashed line where a target lies."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PANEL_W, PANEL_H, MARGIN = 360, 260, 56
COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))
GRID, TARGET, INK = (225, 228, 232), (120, 120, 120), (30, 30, 30)


@dataclass
class Panel:
    """One quantity against the shared x: named series of (x, y) points, optional target lines
    (`target_x` / `target_y`: dashed), and the points to label with their own text."""

    title: str
    series: dict[str, list[tuple[float, float]]]
    target_x: float | None = None
    target_y: float | None = None
    labels: dict[tuple[float, float], str] = field(default_factory=dict)


def _nice_bounds(values: list[float], count: int = 5) -> tuple[float, float, float]:
    """(low, high, step): the values' range padded a little and widened to round ticks (a step of
    1, 2 or 5 times a power of ten, about `count` of them)."""
    lo, hi = min(values), max(values)
    span = (hi - lo) or abs(hi) * 0.1 or 1.0
    lo, hi = (0.0 if lo >= 0 > lo - span * 0.06 else lo - span * 0.06), hi + span * 0.06
    raw = (hi - lo) / (count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return math.floor(lo / step) * step, math.ceil(hi / step) * step, step


def _ticks(lo: float, hi: float, step: float) -> list[float]:
    return [lo + i * step for i in range(round((hi - lo) / step) + 1)]


def _dashed(draw: ImageDraw.ImageDraw, a: tuple[float, float], b: tuple[float, float]) -> None:
    (x0, y0), (x1, y1) = a, b
    length = max(abs(x1 - x0), abs(y1 - y0))
    for start in range(0, int(length), 8):
        t0, t1 = start / length, min(start + 4, length) / length
        draw.line([(x0 + (x1 - x0) * t0, y0 + (y1 - y0) * t0), (x0 + (x1 - x0) * t1, y0 + (y1 - y0) * t1)],
                  fill=TARGET, width=1)


@dataclass(frozen=True)
class _Frame:
    """A panel's pixel box and data bounds: maps a data point to its pixel."""

    left: int
    top: int
    x: tuple[float, float, float]  # low, high, tick step
    y: tuple[float, float, float]

    def at(self, x: float, y: float) -> tuple[float, float]:
        (x_lo, x_hi, _), (y_lo, y_hi, _) = self.x, self.y
        return (self.left + (x - x_lo) / (x_hi - x_lo) * PANEL_W,
                self.top + PANEL_H - (y - y_lo) / (y_hi - y_lo) * PANEL_H)


def panel_frame(panel: Panel, n: int) -> _Frame:
    """The frame of the `n`-th panel of a chart: where `line_chart` draws its points."""
    points = [p for pts in panel.series.values() for p in pts]
    xs = [x for x, _ in points] + ([] if panel.target_x is None else [panel.target_x])
    ys = [y for _, y in points] + ([] if panel.target_y is None else [panel.target_y])
    return _Frame(MARGIN + n * (PANEL_W + MARGIN), MARGIN, _nice_bounds(xs), _nice_bounds(ys))


def line_chart(panels: list[Panel], x_label: str, path: str | Path) -> Path:
    """Draw the panels side by side into a PNG at `path` (returned)."""
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=11)
    width = len(panels) * (PANEL_W + MARGIN) + MARGIN
    image = Image.new("RGB", (width, PANEL_H + 2 * MARGIN + 34), "white")
    draw = ImageDraw.Draw(image)
    legend: dict[str, tuple[int, int, int]] = {}
    for n, panel in enumerate(panels):
        f = panel_frame(panel, n)
        (x_lo, x_hi, x_step), (y_lo, y_hi, y_step) = f.x, f.y
        for x in _ticks(x_lo, x_hi, x_step):
            draw.line([f.at(x, y_lo), f.at(x, y_hi)], fill=GRID)
            draw.text((f.at(x, y_lo)[0], f.top + PANEL_H + 4), f"{round(x, 6):g}", fill=INK, font=small,
                      anchor="ma")
        for y in _ticks(y_lo, y_hi, y_step):
            draw.line([f.at(x_lo, y), f.at(x_hi, y)], fill=GRID)
            draw.text((f.left - 4, f.at(x_lo, y)[1]), f"{round(y, 6):g}", fill=INK, font=small, anchor="rm")
        draw.rectangle([f.left, f.top, f.left + PANEL_W, f.top + PANEL_H], outline=INK)
        if panel.target_x is not None:
            _dashed(draw, f.at(panel.target_x, y_lo), f.at(panel.target_x, y_hi))
        if panel.target_y is not None:
            _dashed(draw, f.at(x_lo, panel.target_y), f.at(x_hi, panel.target_y))
        for i, (name, pts) in enumerate(panel.series.items()):
            colour = COLOURS[i % len(COLOURS)]
            xy = [f.at(x, y) for x, y in sorted(pts)]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for px, py in xy:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
            legend[name] = colour
        placed: list[tuple[float, float]] = []
        for (x, y), text in sorted(panel.labels.items()):
            px, py = f.at(x, y)
            if all(abs(px - qx) > 34 or abs(py - qy) > 13 for qx, qy in placed):  # no crowding
                draw.text((px + 5, py - 5), text, fill=INK, font=small, anchor="ld")
                placed.append((px, py))
        middle = f.left + PANEL_W / 2
        draw.text((middle, f.top - 10), panel.title, fill=INK, font=font, anchor="md")
        draw.text((middle, f.top + PANEL_H + 22), x_label, fill=INK, font=small, anchor="ma")
    x = MARGIN
    for name, colour in legend.items():
        draw.line([(x, image.height - 14), (x + 20, image.height - 14)], fill=colour, width=3)
        draw.text((x + 26, image.height - 14), name, fill=INK, font=small, anchor="lm")
        x += 40 + round(draw.textlength(name, font=small))
    path = Path(path)
    image.save(path)
    return path
