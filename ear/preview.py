"""Partial canvases for every EAR step, grids of them, and GIF/MP4 files.

A frame shows the tokens known so far, decoded to pixels; cells not generated yet show a dim
checkerboard of token cells, and the cells a step added can be outlined. Cost matters because a
frame is drawn after every step: `PreviewRenderer` decodes the whole batch in one tokenizer call
per step, with unknown cells filled by a *neutral* token (the code a flat mid-grey image encodes
to, found once) and then masked in pixel space, so no decode is ever spent on cells that are not
shown. Everything that does not change between steps (the background, the pixel -> cell maps) is
built once per renderer. Large tokenizers on slow devices (XQGAN's ViT decoder takes seconds on a
CPU) would still dominate, so a renderer also keeps a decode budget: once decoding has taken more
than `decode_share` of the other work's time (after `decode_slack` free seconds, which small
models never exceed), a frame reuses the last decoded pixels and shows the cells known since as
"pending" tiles, until the budget allows the next decode. The final frame is always decoded.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import time
import warnings
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ear.images import atomic_output, to_uint8
from ear.sampler import UNKNOWN, StepState
from ear.tokenizer import Tokenizer

CANVAS_RGB = ((34, 36, 42), (44, 46, 54))  # dim checkerboard for cells not generated yet
PENDING_RGB = ((92, 96, 110), (108, 112, 126))  # generated, not decoded yet (decode budget)
DECODE_SHARE = 0.5  # previews may take at most half as long as everything else ...
DECODE_SLACK = 1.0  # ... after this many seconds of decoding, which small models never use up
OUTLINE_RGB = (255, 176, 32)  # the cells the step added
CORRECTED_RGB, CORRECTED_COLOUR = (0, 200, 255), "cyan"  # cells nested refinement redrew (captions name it)
ANIMATION_SUFFIXES = (".gif", ".mp4")
DISPLAY_SIZES = (16, 4096)  # the smallest and largest display size in pixels
MAX_FPS = 60


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's tensors live (parameters, or buffers for parameter-free modules)."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def neutral_token(tokenizer: Tokenizer) -> int:
    """The code a flat mid-grey image encodes to (its most frequent cell): decoding it next to
    known cells disturbs them least, whatever the tokenizer."""
    grey = torch.zeros(1, 3, tokenizer.image_size, tokenizer.image_size, device=module_device(tokenizer))
    with torch.no_grad():
        codes = tokenizer.encode(grey).flatten().cpu()
    return int(codes.mode().values)


class PreviewRenderer:
    """Draws display-size frames for a stream of StepStates of one tokenizer.

    `decode_seconds` / `decode_calls` accumulate the time spent in the tokenizer, which is what
    the benchmark compares with the sampling time."""

    def __init__(self, tokenizer: Tokenizer, display_size: int = 256, outline: bool = True,
                 fill_token: int | None = None, decode_share: float | None = DECODE_SHARE,
                 decode_slack: float = DECODE_SLACK) -> None:
        lo, hi = DISPLAY_SIZES
        if not lo <= display_size <= hi:
            raise ValueError(f"display_size must lie in [{lo}, {hi}], got {display_size}")
        self.tokenizer, self.display_size, self.outline = tokenizer, display_size, outline
        self.decode_share, self.decode_slack = decode_share, decode_slack
        self.fill_token = neutral_token(tokenizer) if fill_token is None else fill_token
        d, s = display_size, tokenizer.image_size
        self.cells, self.canvas, self.pending = _backdrop(tokenizer.grid_size, d)
        # Small tokenizers (e.g. 64 px) look right as crisp pixel art; others get a smooth resize.
        self._resample = (Image.Resampling.NEAREST if d > s and d % s == 0
                          else Image.Resampling.LANCZOS)
        self.decode_seconds, self.decode_calls = 0.0, 0
        self._started: float | None = None
        self._pixels: np.ndarray | None = None  # the last decoded frame and the cells it showed
        self._drawn: torch.Tensor | None = None
        self._last_step = 0

    def decode(self, tokens: torch.Tensor) -> np.ndarray:
        """(B, g, g) ids with UNKNOWN holes -> (B, D, D, 3) uint8 at display size."""
        filled = torch.where(tokens == UNKNOWN, self.fill_token, tokens)
        device = module_device(self.tokenizer)
        started = time.perf_counter()
        with torch.no_grad():
            pixels = to_uint8(self.tokenizer.decode(filled.to(device)))
        self.decode_seconds += time.perf_counter() - started
        self.decode_calls += 1
        if pixels.shape[1] == self.display_size:
            return pixels
        size = (self.display_size, self.display_size)
        return np.stack([np.asarray(Image.fromarray(p).resize(size, self._resample)) for p in pixels])

    def cell_mask(self, cells: torch.Tensor) -> np.ndarray:
        """(g, g) bool cells -> (D, D) bool display pixels."""
        return self.cells.mask(cells)

    def render(self, state: StepState, decode: bool | None = None) -> list[Image.Image]:
        """One frame per batch item: known cells decoded (or pending), the rest dim, this step's
        cells outlined and the row's cells nested refinement redrew so far outlined in
        CORRECTED_RGB (except on the last step: the finished picture). `decode=None` decodes
        within the decode budget; False never decodes (the pixels last decoded in this stream,
        newer cells as pending tiles: a sketch costing no tokenizer call); True always does.
        The last step is always decoded."""
        if state.step <= self._last_step:  # a new stream (the next zoom-out round, a restart)
            self._pixels, self._drawn = None, None
        self._last_step = state.step
        if state.done:  # whatever comes next is a new stream
            self._pixels, self._drawn, self._last_step = None, None, 0
            pixels = state.decoded(self.decode, (self.tokenizer, self.display_size))
            return [Image.fromarray(p) for p in pixels]
        if decode is None:
            decode = self._pixels is None or self._affordable()
        if decode:
            self._pixels, self._drawn = self.decode(state.tokens), state.known.clone()
        pixels = self.canvas[None] if self._pixels is None else self._pixels
        drawn = torch.zeros_like(state.known) if self._drawn is None else self._drawn
        shown = self.cell_mask(drawn)[None, :, :, None]
        pending = self.cell_mask(state.known & ~drawn)[None, :, :, None]
        frames = np.where(shown, pixels, np.where(pending, self.pending[None], self.canvas[None]))
        frames = np.broadcast_to(frames, (state.tokens.shape[0], *frames.shape[1:])).copy()
        if self.outline:
            rows = [] if state.corrected is None else state.corrected.numpy()
            for frame, corrected in zip(frames, rows, strict=False):  # (none without refinement)
                if corrected.any():
                    frame[self.cells.outline(corrected)] = CORRECTED_RGB
            frames[:, self.cells.outline(state.new)] = OUTLINE_RGB
        return [Image.fromarray(f) for f in frames]

    def sketch_key(self, state: StepState) -> Hashable | None:
        """While nothing of this stream has been decoded, `render(state, decode=False)` depends
        only on the cells, the size and the rows (the opening canvas of every generation alike):
        a key saying so, for drawing it once for many requests. None once pixels exist."""
        fresh = self._pixels is None or state.step <= self._last_step
        if state.done or not fresh:
            return None
        corrected = None if state.corrected is None else state.corrected.numpy().tobytes()
        return (self.display_size, self.outline, state.tokens.shape, state.known.numpy().tobytes(),
                state.new.numpy().tobytes(), corrected)

    def _affordable(self) -> bool:
        """Whether decoding this frame keeps previews within the decode budget."""
        now = time.perf_counter()
        if self._started is None:
            self._started = now
        if self.decode_share is None:
            return True
        other_work = now - self._started - self.decode_seconds
        return self.decode_seconds <= self.decode_share * other_work + self.decode_slack

    def final(self, tokens: torch.Tensor) -> list[Image.Image]:
        """Finished pictures (every cell known) at display size."""
        return [Image.fromarray(f) for f in self.decode(tokens)]

    def shrink(self, image: Image.Image, box: tuple[int, int, int, int], count: int) -> list[Image.Image]:
        """`count` frames moving `image` from the full canvas into `box` (left, top, right, bottom
        in grid cells) on the dim background, with geometric easing so the zoom speed feels
        constant: the bridge between two rounds of a zoom-out."""
        d, g = self.display_size, self.tokenizer.grid_size
        target = [c * d / g for c in box]
        scale = (target[2] - target[0]) / d
        frames = []
        for i in range(1, count + 1):
            t = i / count
            s = scale ** t  # geometric: each frame shrinks by the same factor
            w = max(1, round(d * s))
            # the box's centre moves from the canvas centre to the target centre as the size shrinks
            u = (1 - s) / (1 - scale) if scale < 1 else t
            cx = d / 2 + u * ((target[0] + target[2]) / 2 - d / 2)
            cy = d / 2 + u * ((target[1] + target[3]) / 2 - d / 2)
            frame = Image.fromarray(self.canvas)
            corner = (round(cx - w / 2), round(cy - w / 2))
            frame.paste(image.resize((w, w), Image.Resampling.LANCZOS), corner)
            frames.append(frame)
        return frames


def step_facts(state: StepState, seconds: float) -> list[str]:
    """What every caption of a step says: step, tokens known, seconds, and under dynamic
    activation the FFN's active share (Generate's captions and Compare's arms alike)."""
    facts = [f"step {state.step} / {state.num_steps}", f"{state.num_known} / {state.known.numel()} tokens",
             f"{seconds:.2f} s"]
    if state.ffn_active < 1:
        facts.append(f"FFN {state.ffn_active * 100:.0f} % active")  # as the docs write it
    return facts


def correction_note(state: StepState, outlined: bool) -> str:
    """The caption's count of redrawn cells under refinement (naming their outline's colour where
    it is drawn: not on the finished picture); '' without refinement."""
    if state.corrected is None:
        return ""
    colour = f" ({CORRECTED_COLOUR})" if outlined and not state.done else ""
    return f" · {int(state.corrected.sum())} corrected{colour}"


@functools.lru_cache(maxsize=8)
def _backdrop(grid: int, display: int) -> tuple[CellGrid, np.ndarray, np.ndarray]:
    """The cell geometry and the dim and "pending" checkerboards of a grid at a display size, made
    once: every stream needs them, and making them costs about what a small model's step does."""
    cells = CellGrid(grid, display)
    canvas, pending = (np.asarray(rgb, dtype=np.uint8)[cells.checker] for rgb in (CANVAS_RGB, PENDING_RGB))
    canvas.flags.writeable = pending.flags.writeable = False  # shared by every renderer
    return cells, canvas, pending


class CellGrid:
    """Where the g x g token cells lie on a D x D display image: masks, outlines, checkerboard."""

    def __init__(self, grid: int, display: int) -> None:
        self.grid, self.display = grid, display
        self._cell = (np.arange(display) * grid) // display  # grid row/col of each display row/col
        self.checker = (self._cell[:, None] + self._cell[None, :]) % 2  # (D, D) 0/1 per cell
        self.thickness = max(1, display // 128)

    def mask(self, cells: torch.Tensor | np.ndarray) -> np.ndarray:
        """(g, g) bool cells -> (D, D) bool display pixels."""
        cells = cells.numpy() if isinstance(cells, torch.Tensor) else cells
        return cells[self._cell][:, self._cell]  # rows, then columns: 6x faster than one 2-D index

    def outline(self, cells: torch.Tensor | np.ndarray) -> np.ndarray:
        """(D, D) bool: the display pixels within the outline thickness of the cells' edge."""
        mask = self.mask(cells)
        inner = mask
        for _ in range(self.thickness):
            p = np.pad(inner, 1)
            inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        return mask & ~inner


def render_frame(state: StepState, tokenizer: Tokenizer, *, display_size: int = 256,
                 outline: bool = True, fill_token: int | None = None) -> list[Image.Image]:
    """One-off frame for a single StepState; loops should keep a PreviewRenderer instead."""
    return PreviewRenderer(tokenizer, display_size, outline, fill_token).render(state)


GRID_RGB = (229, 231, 235)  # the gaps between the images of a batch
PREVIEW_SIDE = 512  # live canvases and animations larger than this are shrunk by an integer factor


def make_grid(images: Sequence[Image.Image], gap: int = 4, background: tuple[int, int, int] = GRID_RGB
              ) -> Image.Image:
    """Batch -> one near-square image (a single image comes back unchanged)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    if len(images) == 1:
        return images[0]
    size, corners = grid_layout(len(images), images[0].size, gap)
    grid = Image.new("RGB", size, background)
    for image, corner in zip(images, corners, strict=True):
        grid.paste(image.convert("RGB"), corner)
    return grid


def tile(arrays: Sequence[np.ndarray], gap: int = 4, fill: Any = GRID_RGB) -> np.ndarray:
    """Equal-size (H, W, ...) arrays laid out as `make_grid` lays out images, gaps set to `fill`;
    one array comes back as it is. Works for pixels, palette indices and masks alike."""
    if len(arrays) == 1:
        return arrays[0]
    h, w = arrays[0].shape[:2]
    (width, height), corners = grid_layout(len(arrays), (w, h), gap)
    out = np.empty((height, width, *arrays[0].shape[2:]), arrays[0].dtype)
    out[:] = fill
    for array, (left, top) in zip(arrays, corners, strict=True):
        out[top:top + h, left:left + w] = array
    return out


def grid_layout(count: int, size: tuple[int, int], gap: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """(width, height) of a near-square grid of `count` tiles of `size`, and each tile's corner."""
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    w, h = size
    corners = [((i % cols) * (w + gap), (i // cols) * (h + gap)) for i in range(count)]
    return (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), corners


def preview_factor(width: int, height: int) -> int:
    """By how much a live canvas or an animation of this size is shrunk: the smallest integer
    factor that fits PREVIEW_SIDE. The browser shows a grid of eight 256 px images at about half
    size anyway, and the bundled model's 256 px pictures are 64 px ones enlarged 4x, so halving
    loses nothing but time (the finished pictures themselves are always full size)."""
    return max(1, math.ceil(max(width, height) / PREVIEW_SIDE))


def ffmpeg_exe() -> str | None:
    """Path of the MP4 encoder (imageio-ffmpeg's bundled binary or IMAGEIO_FFMPEG_EXE), if any."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError, OSError):
        return None


def save_animation(frames: Sequence[Image.Image], path: str | os.PathLike, fps: float = 8,
                   hold_last: float = 1.5) -> Path:
    """Write frames as .gif or .mp4, holding the last frame `hold_last` seconds longer. Without an
    MP4 encoder the animation is written as .gif next to the requested path, with a warning.
    Returns the path actually written; the file appears only once complete."""
    if not frames:
        raise ValueError("There are no frames to save.")
    path = animation_target(path, fps, hold_last)
    arrays = same_size([np.asarray(f.convert("RGB")) for f in frames])
    if path.suffix.lower() == ".mp4":
        return write_mp4(arrays, path, fps, hold_last)
    return _write_gif(arrays, path, fps, hold_last)


def animation_target(path: str | os.PathLike, fps: float, hold_last: float) -> Path:
    """The file an animation asked for as `path` is written to, after checking the suffix and the
    timing: an .mp4 becomes a .gif (with a warning) when there is no MP4 encoder."""
    path = Path(path)
    if path.suffix.lower() not in ANIMATION_SUFFIXES:
        raise ValueError(f"Animations can be saved as {' or '.join(ANIMATION_SUFFIXES)}, "
                         f"not '{path.suffix or path.name}'.")
    if not 0 < fps <= MAX_FPS or hold_last < 0:
        raise ValueError(f"fps must lie in (0, {MAX_FPS}] and hold_last be >= 0, got {fps} and {hold_last}")
    if path.suffix.lower() == ".mp4" and ffmpeg_exe() is None:
        path = path.with_suffix(".gif")
        warnings.warn(f"No MP4 encoder found (install imageio-ffmpeg or set IMAGEIO_FFMPEG_EXE); "
                      f"wrote a GIF instead: {path}", RuntimeWarning, stacklevel=3)
    return path


def same_size(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Pad every frame to the largest one (centred, dim background) so encoders accept them."""
    h = max(a.shape[0] for a in arrays)
    w = max(a.shape[1] for a in arrays)
    h, w = h + h % 2, w + w % 2  # yuv420p needs even sizes
    out = []
    for a in arrays:
        if a.shape[:2] != (h, w):
            canvas = np.empty((h, w, 3), np.uint8)
            canvas[:] = CANVAS_RGB[0]
            top, left = (h - a.shape[0]) // 2, (w - a.shape[1]) // 2
            canvas[top:top + a.shape[0], left:left + a.shape[1]] = a
            a = canvas
        out.append(a)
    return out


def _write_gif(arrays: list[np.ndarray], path: Path, fps: float, hold_last: float) -> Path:
    import imageio.v3 as iio

    durations = [1000.0 / fps] * len(arrays)
    durations[-1] += 1000.0 * hold_last
    with atomic_output(path) as tmp:
        iio.imwrite(tmp, np.stack(arrays), extension=".gif", duration=durations, loop=0)
    return path


def write_mp4(arrays: list[np.ndarray], path: Path, fps: float, hold_last: float) -> Path:
    """H.264 (yuv420p) of equal, even-sized frames, the last one held `hold_last` seconds longer."""
    import imageio.v2 as imageio

    extra = round(hold_last * fps)
    with atomic_output(path) as tmp:
        writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                    pixelformat="yuv420p", quality=8, macro_block_size=2,
                                    ffmpeg_log_level="error")
        try:
            for a in [*arrays, *[arrays[-1]] * extra]:
                writer.append_data(a)
        finally:
            writer.close()
    return path
