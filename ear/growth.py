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
from PIL import Image, ImageDraw, ImageFont

from ear.images import atomic_output
from ear.preview import (
    CANVAS_RGB,
    CORRECTED_RGB,
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
PLAYBACK_STEP_S = 0.08  # the page's playback: 31 steps in 2.5 s, a pace a person can follow
PLAYBACK_HOLD_S = 1.0  # the last frame's own time (it stays on screen afterwards anyway)
STRIP_RGB, TEXT_RGB = (17, 19, 24), (236, 238, 242)  # the playback's step counter under the pictures
# GIF palette: the finished pictures' colours, then one slot meaning "as in the previous frame"
# (GIF transparency: unchanged pixels cost almost nothing to encode), then the canvas colours.
RESERVED = (*CANVAS_RGB, GRID_RGB, OUTLINE_RGB, STRIP_RGB, TEXT_RGB, CORRECTED_RGB)
UNCHANGED_SLOT = 255 - len(RESERVED)
SLOTS = np.asarray([UNCHANGED_SLOT + 1, UNCHANGED_SLOT + 2], np.uint8)  # the checkerboard's colours
GRID_SLOT, OUTLINE_SLOT, STRIP_SLOT, TEXT_SLOT, CORRECTED_SLOT = (UNCHANGED_SLOT + i for i in range(3, 8))


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
class _Step:
    """One unfinished step, kept as the cells known and the cells it added, its counter, and
    under nested refinement each row's cells corrected so far ((B, g, g), else None)."""

    known: np.ndarray
    new: np.ndarray
    label: str
    corrected: np.ndarray | None = None


@dataclass
class _Segment:
    """One stream's finished pictures and its unfinished steps, in order; `label` counts the
    finished frame ("step 31 / 31", "zooming out 2 / 8", "stopped at step 9 / 31")."""

    pictures: list[Image.Image]
    steps: list[_Step] = field(default_factory=list)
    label: str = ""


class GrowthAnimation:
    """Every frame of a stream (or of several, as in a zoom-out), kept for an animation file.

    An unfinished step is kept as two (g, g) masks, the cells known and the cells it added; when
    its stream's finished step arrives with its pictures, each such step becomes those pictures
    shown up to that step, the other cells the dim checkerboard and the step's own cells
    outlined, as the live canvas draws them. Finished frames (the last step, zoom-out bridges)
    are kept as they are. Two files come of it: `save` (the download: loops, 8 fps) and
    `playback` (the page: plays once at a human pace, a step counter under the pictures)."""

    def __init__(self) -> None:
        self._segments: list[_Segment] = []
        self._open: list[_Step] = []

    def add(self, state: StepState, pictures: Sequence[Image.Image] | None = None, label: str = "") -> None:
        """Record one frame; `pictures` are required (only) for finished steps. `label` is the
        frame's counter in the playback (by default "step k / n")."""
        label = label or f"step {state.step} / {state.num_steps}"
        if not state.done:
            corrected = None if state.corrected is None else state.corrected.numpy().copy()
            self._open.append(_Step(state.known.numpy().copy(), state.new.numpy().copy(), label, corrected))
            return
        if not pictures:
            raise ValueError("a finished step needs its pictures")
        self._segments.append(_Segment(list(pictures), self._open, label))
        self._open = []

    def stop(self, pictures: Sequence[Image.Image], label: str) -> None:
        """A stopped stream: its latest step, drawn as `pictures` (cells not made yet dim), ends
        the open segment in place of the finished pictures it will never have."""
        if not self._open:
            raise ValueError("there is no unfinished step to stop at")
        self._segments.append(_Segment(list(pictures), self._open[:-1], label))
        self._open = []

    @property
    def frame_count(self) -> int:
        """Frames the file will hold (steps not yet followed by their finished step excluded)."""
        return sum(len(s.steps) + 1 for s in self._segments)

    def save(self, path: str | Path, fps: float = 8, hold_last: float = 1.5) -> Path:
        """Write a .gif or .mp4 (a .gif next to it, with a warning, if there is no MP4 encoder) at
        the live canvas's size (`preview_factor`); atomic, returns the path written. It loops."""
        path = animation_target(path, fps, hold_last)
        segments, gap = self._shown()
        if path.suffix.lower() == ".mp4":
            frames = [f for s in segments for f in _reveal(s, _grid(s.pictures, gap), CANVAS, GRID_RGB,
                                                           (OUTLINE_RGB, CORRECTED_RGB), gap)]
            return write_mp4(same_size(frames), path, fps, hold_last)
        frames = [(frame, palette) for s in segments for frame, palette, _ in _palette_frames(s, gap)]
        durations = [1000.0 / fps] * len(frames)
        durations[-1] += 1000.0 * hold_last
        return _write_gif(frames, durations, path, loop=True)

    def playback(self, path: str | Path, step_s: float = PLAYBACK_STEP_S, fast_after: int | None = None,
                 speedup: int = 1) -> Path:
        """Write the play-once GIF the page shows: every frame `step_s` seconds, a counter strip
        under the pictures; past frame `fast_after`, only every `speedup`-th frame is kept (the
        counter says "x8"), so a long order keeps up with short ones. The last frame stays."""
        if not step_s > 0 or speedup < 1:
            raise ValueError(f"step_s must be > 0 and speedup >= 1, got {step_s} and {speedup}")
        segments, gap = self._shown()
        frames = [(f, p, label) for s in segments for f, p, label in _palette_frames(s, gap)]
        kept = frames if fast_after is None or speedup == 1 else _sped_up(frames, fast_after, speedup)
        strips = _CounterStrips(kept[0][0].shape[1])
        frames = [(np.concatenate([f, strips.draw(label)]), p) for f, p, label in kept]
        durations = [1000.0 * step_s] * len(frames)
        durations[-1] += 1000.0 * PLAYBACK_HOLD_S
        return _write_gif(frames, durations, Path(path), loop=False)

    def _shown(self) -> tuple[list[_Segment], int]:
        """The segments at the size they are shown (`preview_factor`) and the gap between images."""
        if not self._segments:
            raise ValueError("There are no finished frames to save.")
        first = self._segments[0].pictures
        factor = preview_factor(*grid_layout(len(first), first[0].size, GAP)[0])
        if factor == 1:
            return self._segments, GAP
        return [_Segment([p.reduce(factor) for p in s.pictures], s.steps, s.label)
                for s in self._segments], max(1, round(GAP / factor))


def _sped_up(frames: list[tuple[np.ndarray, list[int], str]], after: int, speedup: int
             ) -> list[tuple[np.ndarray, list[int], str]]:
    """The first `after` frames, then every `speedup`-th one (labelled "x<speedup>"), and the last."""
    last = len(frames) - 1
    return [(f, p, label if i < after or i == last else f"{label} · x{speedup}")
            for i, (f, p, label) in enumerate(frames) if i < after or (i - after) % speedup == 0 or i == last]


def _write_gif(frames: Sequence[tuple[np.ndarray, list[int]]], durations: Sequence[float], path: Path,
               loop: bool) -> Path:
    """Palette frames as a GIF; a pixel equal to the previous frame's (same palette) becomes the
    transparent "unchanged" slot, which costs almost nothing to encode. Without a loop count the
    GIF has no NETSCAPE block, so browsers play it once and keep its last frame. Atomic."""
    images = []
    previous, previous_palette = None, None
    for frame, palette in frames:
        same = previous is not None and previous.shape == frame.shape and palette is previous_palette
        shown = np.where(frame == previous, UNCHANGED_SLOT, frame).astype(np.uint8) if same else frame
        image = Image.fromarray(shown, "P")
        image.putpalette(palette)
        images.append(image)
        previous, previous_palette = frame, palette
    loop_count = {"loop": 0} if loop else {}
    with atomic_output(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=list(durations),
                       optimize=False, transparency=UNCHANGED_SLOT, disposal=1, **loop_count)
    return path


class _CounterStrips:
    """The playback's counter strip (light text on a dark band) as palette indices, per label."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.height = max(12, round(width * 0.075))
        self.font = ImageFont.load_default(size=round(self.height * 0.72))
        self._drawn: dict[str, np.ndarray] = {}

    def draw(self, label: str) -> np.ndarray:
        if label not in self._drawn:
            text = Image.new("L", (self.width, self.height), 0)
            ImageDraw.Draw(text).text((self.width // 2, self.height // 2), label, fill=255, font=self.font,
                                      anchor="mm")
            self._drawn[label] = np.where(np.asarray(text) > 127, TEXT_SLOT, STRIP_SLOT).astype(np.uint8)
        return self._drawn[label]


def _grid(pictures: Sequence[Image.Image], gap: int) -> np.ndarray:
    return tile([np.asarray(p.convert("RGB")) for p in pictures], gap, GRID_RGB)


def _palette_frames(segment: _Segment, gap: int) -> Iterator[tuple[np.ndarray, list[int], str]]:
    """GIF frames of one segment as palette indices, their palette and their counter label: the
    finished pictures quantised once (the unfinished steps show a subset of their pixels), then
    the reserved slots."""
    quantized = Image.fromarray(_grid(segment.pictures, gap)).quantize(
        UNCHANGED_SLOT, Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    colours = (quantized.getpalette() or [])[:3 * UNCHANGED_SLOT]
    palette = colours + [0] * (3 * (UNCHANGED_SLOT + 1) - len(colours)) + [c for rgb in RESERVED for c in rgb]
    labels = [step.label for step in segment.steps] + [segment.label]
    frames = _reveal(segment, np.asarray(quantized), SLOTS, GRID_SLOT, (OUTLINE_SLOT, CORRECTED_SLOT), gap)
    for frame, label in zip(frames, labels, strict=True):
        yield frame, palette, label


def _reveal(segment: _Segment, finished: np.ndarray, canvas: np.ndarray, gap_fill: object,
            outlines: tuple[object, object], gap: int) -> Iterator[np.ndarray]:
    """The segment's frames from its finished grid (RGB pixels or palette indices): per
    unfinished step the known cells' pixels, `canvas[checkerboard]` elsewhere, the step's own cells
    outlined in `outlines[0]` and each row's corrected cells in `outlines[1]`, as the live canvas
    draws them; then the finished grid itself."""
    outline, corrected = outlines
    if segment.steps:
        n, size = len(segment.pictures), segment.pictures[0].size[0]
        cells = CellGrid(segment.steps[0].known.shape[0], size)
        background = tile([canvas[cells.checker]] * n, gap, gap_fill)
        extra = (1,) * (finished.ndim - 2)  # broadcast (H, W) masks over RGB channels
        for step in segment.steps:
            shown = tile([cells.mask(step.known)] * n, gap, False)
            frame = np.where(shown.reshape(shown.shape + extra), finished, background)
            if step.corrected is not None:
                frame[tile([cells.outline(rows) for rows in step.corrected], gap, False)] = corrected
            frame[tile([cells.outline(step.new)] * n, gap, False)] = outline
            yield frame
    yield finished
