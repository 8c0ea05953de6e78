"""What a live view of a growing image costs: which steps get a canvas, and the growth animation.

Drawing a canvas costs a tokenizer decode (two or three sampling steps for the bundled model, far
more for a large tokenizer on a CPU) plus an image file, so drawing every step would make the
person wait two or three times as long as the generation itself, and a faster engine would only
make that ratio worse. `PreviewPacer` therefore gives canvases a share of the wall-clock time:
every step while that is cheap, otherwise the first, the last and at least one every `max_gap`
seconds, decoded when the share allows and otherwise sketched (the last decoded pixels, newer
cells as "pending" tiles, no tokenizer call). `GrowthAnimation` still holds every step: it keeps
only each step's cell masks while streaming and paints them from the finished pictures at the
end, so no step is decoded twice and the GIF is written from palette frames (one palette per
stream) in milliseconds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ear.images import atomic_output
from ear.preview import (
    CANVAS_RGB,
    GRID_RGB,
    OUTLINE_RGB,
    CellGrid,
    animation_target,
    grid_layout,
    preview_factor,
    same_size,
    tile,
    write_mp4,
)
from ear.sampler import StepState

PREVIEW_SHARE = 0.1  # canvases may take this share of the time the generation itself takes ...
MAX_GAP_S = 0.2  # ... but a person never waits longer than this for the next one
DECODE_STEPS = 3  # until measured, a decode is taken to cost this many sampling steps (bench_preview)
FULL, SKETCH = "full", "sketch"  # a decoded canvas, or one drawn without a tokenizer call
GAP = 4  # pixels between the images of a batch, as in make_grid
CANVAS = np.asarray(CANVAS_RGB, np.uint8)
# GIF palette: the finished pictures' colours, then one slot meaning "as in the previous frame"
# (GIF transparency: unchanged pixels cost almost nothing to encode), then the canvas colours.
RESERVED = (*CANVAS_RGB, GRID_RGB, OUTLINE_RGB)
UNCHANGED_SLOT = 255 - len(RESERVED)
SLOTS = np.asarray([UNCHANGED_SLOT + 1, UNCHANGED_SLOT + 2], np.uint8)  # the checkerboard's colours
GRID_SLOT, OUTLINE_SLOT = UNCHANGED_SLOT + 3, UNCHANGED_SLOT + 4


class PreviewPacer:
    """Decides, from measured time only, which steps of a stream get a live canvas and whether
    that canvas is decoded ("full") or a sketch (no tokenizer call: the last decoded pixels, newer
    cells as pending tiles).

    `due()` answers for each step; the caller draws and sends the canvas inside `showing(kind)`,
    which measures what that cost (drawing, file, and the consumer's handling of the update).
    The first step is always shown (as `first` says), the last always in full. Otherwise a full
    canvas is due when the canvases so far plus one more full one stay within `share` of the time
    spent generating (a full canvas not measured yet is taken to cost `DECODE_STEPS` steps more
    than a sketch); failing that, a sketch when it fits the share or when `max_gap` seconds have
    passed since the last canvas."""

    def __init__(self, share: float = PREVIEW_SHARE, max_gap: float = MAX_GAP_S, first: str = FULL,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if not (share >= 0 and max_gap > 0 and first in (FULL, SKETCH)):
            raise ValueError(f"share must be >= 0, max_gap > 0 and first {FULL!r} or {SKETCH!r}, got "
                             f"{share}, {max_gap} and {first!r}")
        self.share, self.max_gap, self.first, self.clock = share, max_gap, first, clock
        self.spent = 0.0  # seconds spent showing canvases
        self.shown: dict[str, int] = {FULL: 0, SKETCH: 0}
        self._cost: dict[str, float | None] = {FULL: None, SKETCH: None}  # the latest of each kind
        self._steps = 0
        self._started: float | None = None
        self._last_shown: float | None = None

    def due(self, last: bool = False, sharing: int = 1) -> str | None:
        """FULL, SKETCH or None (no canvas for this step). `sharing` streams served at once share
        one budget: each gets `share / sharing` of its generation time and waits up to
        `max_gap * sqrt(sharing)`, so a crowd's canvases do not slow the generation they show."""
        now = self.clock()
        if self._started is None:
            self._started = now
        self._steps += 1
        if last:
            return FULL
        if self._last_shown is None:
            return self.first
        generating = now - self._started - self.spent
        sketch = self._cost[SKETCH] or 0.0
        full = self._cost[FULL]
        if full is None:  # not measured yet: the sketch's work plus a decode of a few steps' time
            full = sketch + DECODE_STEPS * generating / self._steps
        allowed = self.share * generating / sharing
        if self.spent + full <= allowed:
            return FULL
        if self.spent + sketch <= allowed or now - self._last_shown >= self.max_gap * sharing**0.5:
            return SKETCH
        return None

    @contextlib.contextmanager
    def showing(self, kind: str) -> Iterator[None]:
        started = self.clock()
        try:
            yield
        finally:
            end = self.clock()
            self._cost[kind] = end - started
            self.spent += end - started
            self.shown[kind] += 1
            self._last_shown = end


@dataclass
class _Segment:
    """One stream's finished pictures and the masks of its unfinished steps, in order."""

    pictures: list[Image.Image]
    steps: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (known, new) cells


class GrowthAnimation:
    """Every frame of a stream (or of several, as in a zoom-out), kept for an animation file.

    An unfinished step is kept as two (g, g) masks, the cells known and the cells it added; when
    its stream's finished step arrives with its pictures, each such step becomes those pictures
    shown up to that step, the other cells the dim checkerboard and the step's own cells
    outlined, as the live canvas draws them. Finished frames (the last step, zoom-out bridges)
    are kept as they are."""

    def __init__(self) -> None:
        self._segments: list[_Segment] = []
        self._open: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, state: StepState, pictures: Sequence[Image.Image] | None = None) -> None:
        """Record one frame; `pictures` are required (only) for finished steps."""
        if not state.done:
            self._open.append((state.known.numpy().copy(), state.new.numpy().copy()))
            return
        if not pictures:
            raise ValueError("a finished step needs its pictures")
        self._segments.append(_Segment(list(pictures), self._open))
        self._open = []

    @property
    def frame_count(self) -> int:
        """Frames the file will hold (steps not yet followed by their finished step excluded)."""
        return sum(len(s.steps) + 1 for s in self._segments)

    def save(self, path: str | Path, fps: float = 8, hold_last: float = 1.5) -> Path:
        """Write a .gif or .mp4 (a .gif next to it, with a warning, if there is no MP4 encoder) at
        the live canvas's size (`preview_factor`); atomic, returns the path written."""
        if not self._segments:
            raise ValueError("There are no finished frames to save.")
        path = animation_target(path, fps, hold_last)
        first = self._segments[0].pictures
        factor = preview_factor(*grid_layout(len(first), first[0].size, GAP)[0])
        gap = max(1, round(GAP / factor))
        segments = [_Segment([p.reduce(factor) for p in s.pictures] if factor > 1 else s.pictures, s.steps)
                    for s in self._segments]
        if path.suffix.lower() == ".mp4":
            frames = [f for s in segments for f in _reveal(s, _grid(s.pictures, gap), CANVAS, GRID_RGB,
                                                           OUTLINE_RGB, gap)]
            return write_mp4(same_size(frames), path, fps, hold_last)
        images = []
        for segment in segments:
            previous = None  # a new palette: indices of the last segment mean other colours
            for frame, palette in _palette_frames(segment, gap):
                shown = frame if previous is None or previous.shape != frame.shape else \
                    np.where(frame == previous, UNCHANGED_SLOT, frame).astype(np.uint8)
                image = Image.fromarray(shown, "P")
                image.putpalette(palette)
                images.append(image)
                previous = frame
        durations = [1000.0 / fps] * len(images)
        durations[-1] += 1000.0 * hold_last
        with atomic_output(path) as tmp:
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations,
                           loop=0, optimize=False, transparency=UNCHANGED_SLOT, disposal=1)
        return path


def _grid(pictures: Sequence[Image.Image], gap: int) -> np.ndarray:
    return tile([np.asarray(p.convert("RGB")) for p in pictures], gap, GRID_RGB)


def _palette_frames(segment: _Segment, gap: int) -> Iterator[tuple[np.ndarray, list[int]]]:
    """GIF frames of one segment as palette indices, and their palette: the finished pictures
    quantised once (the unfinished steps show a subset of their pixels), then reserved slots."""
    quantized = Image.fromarray(_grid(segment.pictures, gap)).quantize(
        UNCHANGED_SLOT, Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    colours = (quantized.getpalette() or [])[:3 * UNCHANGED_SLOT]
    palette = colours + [0] * (3 * (UNCHANGED_SLOT + 1) - len(colours)) + [c for rgb in RESERVED for c in rgb]
    for frame in _reveal(segment, np.asarray(quantized), SLOTS, GRID_SLOT, OUTLINE_SLOT, gap):
        yield frame, palette


def _reveal(segment: _Segment, finished: np.ndarray, canvas: np.ndarray, gap_fill: object,
            outline: object, gap: int) -> Iterator[np.ndarray]:
    """The segment's frames from its finished grid (RGB pixels or palette indices): per
    unfinished step the known cells' pixels, `canvas[checkerboard]` elsewhere, the step's own cells
    outlined; then the finished grid itself."""
    if segment.steps:
        n, size = len(segment.pictures), segment.pictures[0].size[0]
        cells = CellGrid(segment.steps[0][0].shape[0], size)
        background = tile([canvas[cells.checker]] * n, gap, gap_fill)
        extra = (1,) * (finished.ndim - 2)  # broadcast (H, W) masks over RGB channels
        for known, new in segment.steps:
            shown = tile([cells.mask(known)] * n, gap, False)
            frame = np.where(shown.reshape(shown.shape + extra), finished, background)
            frame[tile([cells.outline(new)] * n, gap, False)] = outline
            yield frame
    yield finished
