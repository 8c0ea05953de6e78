"""EARPipeline: one loaded model + tokenizer, and every way of using them (docs/api.md).

The pipeline is the only place that knows how the pieces fit: it validates user arguments
up front (every bad value is a ValueError naming the allowed range, raised before any work),
turns sampler StepStates into display frames, and implements image extension (a user's picture
becomes the first steps of the spiral) and the zoom-out built on it. Loading happens once, in
`from_pretrained`; every call after that reuses the same modules.
"""

from __future__ import annotations

import difflib
import random
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ear import hub
from ear.activate import ACTIVATION_FILE, Activation
from ear.flops import SAVING_KEYS, activation_saving
from ear.images import ImageSource, center_crop_resize, load_image, load_mask, to_tensor
from ear.model import EAR
from ear.order import Schedule, make_schedule
from ear.preview import PreviewRenderer, correction_note, module_device, neutral_token, step_facts
from ear.refine import refinement
from ear.routed import RoutedFFN, check_tau
from ear.sampler import UNKNOWN, SamplingParams, StepState, known_log_likelihood, sample, state_count
from ear.serving import ServedState
from ear.tokenizer import Tokenizer

MAX_BATCH = 64
MAX_ZOOM_ROUNDS = 32
ZOOM_TRANSITION = 8  # bridge frames between zoom-out rounds
MAX_REFINE = 8
# Where extension puts the picture: a keep x keep square (centre, corners) or a band keep cells
# deep along one side, spanning the canvas (the side the picture sits on; it grows the other way).
PLACES = ("centre", "left", "right", "top", "bottom", "top left", "top right", "bottom left", "bottom right")


class Frame:
    """One streamed EAR step (or one bridge frame of a zoom-out).

    `images` (display-size previews, one per batch item) are drawn on first access and kept, so
    a consumer that shows only some steps (the app, under its preview time budget) pays for the
    decode of those steps only; `sketch()` draws a step without any decode."""

    def __init__(self, state: StepState, images: list[Image.Image] | None, caption: str,
                 renderer: PreviewRenderer | None = None) -> None:
        if images is None and renderer is None:
            raise ValueError("a Frame needs its images or a renderer to draw them")
        self.state, self.caption = state, caption
        self._images, self._renderer = images, renderer

    @property
    def images(self) -> list[Image.Image]:
        if self._images is None:
            assert self._renderer is not None
            self._images = self._renderer.render(self.state)  # within the renderer's decode budget
        return self._images

    @property
    def sharing(self) -> int:
        """Requests whose steps the server computes at this moment (1 unless batched by
        `ear.serving`): what a live view's share of the server's time is divided by."""
        return max(1, self.state.requests_in_flight) if isinstance(self.state, ServedState) else 1

    def decoded(self) -> list[Image.Image]:
        """The step with every known cell decoded, whatever the decode budget: what a stopped run
        shows (once) instead of the pending tiles of its latest sketch."""
        if self._renderer is None or self.state.done:
            return self.images
        return self._renderer.render(self.state, decode=True)

    def sketch(self) -> list[Image.Image]:
        """The step drawn without a tokenizer call: the pixels last decoded in this stream, the
        cells known since then as "pending" tiles (the images themselves once drawn, and the
        finished pictures on the last step, which are always decoded)."""
        if self._images is not None or self._renderer is None or self.state.done:
            return self.images
        return self._renderer.render(self.state, decode=False)

    def sketch_key(self) -> Hashable | None:
        """What `sketch()` depends on when that is only the cells, size and rows (nothing of the
        stream decoded yet; see `PreviewRenderer.sketch_key`), else None."""
        if self._images is not None or self._renderer is None:
            return None
        return self._renderer.sketch_key(self.state)

    def with_caption(self, caption: str) -> Frame:
        """The same step (its images still undrawn if they were) under another caption."""
        return Frame(self.state, self._images, caption, self._renderer)


class EARPipeline:
    def __init__(self, loaded: hub.LoadedModel, device: torch.device, dtype: torch.dtype) -> None:
        self.name = loaded.name
        self.device, self.dtype = device, dtype
        self.model: EAR = loaded.model.to(device=device, dtype=dtype).eval()
        # The tokenizer stays float32: one decode per step is cheap and half precision costs colour.
        self.tokenizer: Tokenizer = loaded.tokenizer.to(device).eval()
        self.class_names = loaded.class_names
        self.default_class = loaded.default_class or loaded.class_names[0]
        self._aliases = {k.strip().lower(): v for k, v in loaded.class_aliases.items()}
        self.styles = list(loaded.styles)
        self.drawings = loaded.drawings
        self.presets = {k: SamplingParams(**v) for k, v in loaded.presets.items()}
        self.default_settings = self.presets[loaded.default_preset]
        self._loaded = loaded
        self._fill_token: int | None = None
        # Every generation goes through this (`ear.sampler.sample`'s signature); a server sets it to
        # `ear.serving.Scheduler.sample` so that concurrent requests share batched forwards.
        self.sampler: Callable[..., Iterator[StepState]] = sample
        folder = Path(loaded.source)
        self._activation_file: Path | None = folder / ACTIVATION_FILE if folder.is_dir() else None
        self._activation: Activation | None = None
        self._routed: dict[float, RoutedFFN] = {}
        self._counting = threading.Lock()  # one FLOPs count at a time (info() of several visitors)

    @classmethod
    def from_pretrained(cls, name_or_path: str = hub.DEFAULT_MODEL, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, **hub_overrides: str | None) -> EARPipeline:
        """Load once: CUDA -> bfloat16 on the GPU, CPU -> float32 (unless told otherwise)."""
        dev = _device(device)
        dt = _dtype(dtype, dev)  # both checked before the (possibly long) load
        return cls(hub.load(name_or_path, **hub_overrides), dev, dt)

    # ---- facts ---------------------------------------------------------------------------------

    @property
    def grid(self) -> int:
        return self.model.config.grid_size

    def info(self) -> dict[str, Any]:
        loaded = self._loaded
        files = loaded.hub_files
        return {
            "name": self.name, "source": loaded.source, "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."), "parameters": self.model.num_params(),
            "tokenizer_parameters": sum(p.numel() for p in self.tokenizer.parameters()),
            "licence": loaded.licence, "attribution": loaded.attribution,
            "schedule": self.model.schedule.name, "steps": self.model.schedule.num_steps,
            "grid": self.grid, "image_size": self.tokenizer.image_size, "classes": len(self.class_names),
            "styles": self.styles, "drawings": self.drawings, "refinement": self.can_refine,
            "presets": {k: asdict(v) for k, v in self.presets.items()},
            "cached": all(hub.cached_path(f) for f in files) if files else None,
            "activation": self._activation_info(),
        }

    @property
    def can_refine(self) -> bool:
        """The model was trained with the correction objective: nested refinement (`ear.refine`)
        is available, and on by default."""
        return self.model.config.correction

    # ---- dynamic activation --------------------------------------------------------------------

    @property
    def has_activation(self) -> bool:
        """Whether the model ships experts, routers and gates (`activation=` works)."""
        return self._activation is not None or (self._activation_file is not None
                                                and self._activation_file.is_file())

    @property
    def activation_tau(self) -> float | None:
        """The tau the shipped activation was made for (None without one): read from its config,
        so a page or a request does not go through `info()`, whose first call may count FLOPs."""
        return self._own_activation().config.tau if self.has_activation else None

    def load_activation(self, folder: str | Path) -> Activation:
        """Use the activation in `folder` (what `python -m ear activate --out folder` wrote);
        strict: a file that does not fit this model is refused whole."""
        path = Path(folder) / ACTIVATION_FILE
        if not path.is_file():
            raise ValueError(f"'{folder}' holds no {ACTIVATION_FILE} (write one with `python -m ear "
                             f"activate --model {self.name} --out {folder}`)")
        self._activation, self._routed = Activation.load(folder, self.model), {}
        return self._activation

    def routed(self, tau: float) -> RoutedFFN:
        """The activated FFNs at `tau` (the budget knob: 1 runs every expert, lower fewer)."""
        tau = check_tau(tau)
        activation = self._own_activation()
        if tau not in self._routed:  # one per tau: CUDA graphs are captured per FFN
            first = next(iter(self._routed.values()), None)
            self._routed[tau] = first.at(tau) if first else RoutedFFN(activation, tau)
        return self._routed[tau]

    def _own_activation(self) -> Activation:
        """The activation in use, loaded from beside the model's files on first use."""
        if self._activation is None:
            if not self.has_activation:
                raise ValueError(f"{self.name} ships no dynamic activation ({ACTIVATION_FILE}): make "
                                 f"one with `python -m ear activate`, or leave activation off")
            assert self._activation_file is not None
            self.load_activation(self._activation_file.parent)
        assert self._activation is not None
        return self._activation

    def activation_saving(self, activation: Activation | None = None) -> dict[str, float]:
        """Counted total FLOPs per image, dense (the engine before the content-token skip) and
        activated at the activation's tau, and the FFN share run (`ear.flops.activation_saving`):
        one image of the default class, seed 0, the default preset."""
        if activation is None:
            activation = self._own_activation()
        labels = self.labels([self.class_id(self.default_class)], seed=0)
        return activation_saving(self.model, activation, labels, seed=0, **asdict(self.default_settings))

    def _activation_info(self) -> dict[str, Any] | None:
        """The activation's config and report; a report without FLOPs (a file written before
        `ear activate` counted them) has them counted here once, on first use (seconds)."""
        if not self.has_activation:
            return None
        with self._counting:
            activation = self._own_activation()
            if not set(SAVING_KEYS) <= activation.report.keys():
                activation.report.update(self.activation_saving(activation))
        return {**asdict(activation.config), **activation.report}

    def class_id(self, name_or_id: str | int) -> int:
        """A class index from an index or a (case-insensitive) name or synonym."""
        n = len(self.class_names)
        if isinstance(name_or_id, str) and name_or_id.strip().lstrip("-").isdigit():
            name_or_id = int(name_or_id.strip())
        if isinstance(name_or_id, int | np.integer) and not isinstance(name_or_id, bool):
            if not 0 <= name_or_id < n:
                raise ValueError(f"class id must lie in [0, {n - 1}] for {self.name}, got {name_or_id}")
            return int(name_or_id)
        if not isinstance(name_or_id, str):
            raise ValueError(f"a class is an index in [0, {n - 1}] or a name, got {name_or_id!r}")
        wanted = name_or_id.strip().lower()
        lowered = [c.lower() for c in self.class_names]
        wanted = self._aliases.get(wanted, wanted).lower()  # an older or familiar name
        if wanted in lowered:
            return lowered.index(wanted)
        for i, name in enumerate(lowered):  # synonyms: "tench, Tinca tinca"
            if wanted in (s.strip() for s in name.split(",")):
                return i
        close = difflib.get_close_matches(wanted, lowered, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(self.class_names[lowered.index(c)]) for c in close)}?" \
            if close else ""
        raise ValueError(f"Unknown class {name_or_id!r} for {self.name}: give an index in [0, {n - 1}] "
                         f"or one of its class names.{hint}")

    def labels(self, class_ids: Sequence[int], style: str | int | None = None, seed: int | None = None,
               first_row: int = 0) -> list[int]:
        """The model's class labels for class indices. A model with styles (one class embedding per
        class and image set) draws every row in `style` or, with None, row r in style
        (seed + first_row + r) mod #styles, so that a request for several images shows each style.
        A model with several drawings per style (`drawings`) draws row r's in turn: drawing
        (seed + first_row + r) mod #drawings in a fixed style, and with None the next drawing once
        every style had its turn. The null class (unconditional) stays itself."""
        if not self.styles:
            if style is not None:
                raise ValueError(f"{self.name} has no styles; leave the style unset.")
            return list(class_ids)
        n, styles = len(self.class_names), len(self.styles)
        base = (random.randrange(styles * self.drawings) if seed is None else seed) + first_row
        turns = [base + r for r in range(len(class_ids))]
        if style is None:
            picked = [(t % styles, t // styles % self.drawings) for t in turns]
        else:
            fixed = self.style_index(style)
            picked = [(fixed, t % self.drawings) for t in turns]
        null = self.model.null_class
        return [c if c == null else (s * self.drawings + d) * n + c
                for c, (s, d) in zip(class_ids, picked, strict=True)]

    def style_index(self, style: str | int) -> int:
        """A style's index from its index or (case-insensitive) name."""
        lowered = [s.lower() for s in self.styles]
        if isinstance(style, str) and style.strip().lower() in lowered:
            return lowered.index(style.strip().lower())
        if isinstance(style, int | np.integer) and not isinstance(style, bool) and 0 <= style < len(lowered):
            return int(style)
        raise ValueError(f"Unknown style {style!r} for {self.name}: choose one of {', '.join(self.styles)}"
                         f" or leave it unset." if self.styles else f"{self.name} has no styles.")

    def keep_sizes(self) -> list[int]:
        """Centre sizes k (k x k tokens) that extension can keep: the spiral must pass through
        exactly that square, and something must be left to generate."""
        return sorted(k for k in self.model.schedule.square_steps() if k < self.grid)

    def frame_count(self, keep: int | None = None, times: int = 1, transition: int = ZOOM_TRANSITION,
                    place: str = "centre") -> int:
        """Frames that stream (keep=None), extend (times=1) or zoom_out yield: for progress bars."""
        if keep is None:
            per_round = self.model.schedule.num_steps
        else:
            left, top, right, bottom = self.place_box(place, keep)
            known = torch.full((1, self.grid, self.grid), UNKNOWN)
            known[:, top:bottom, left:right] = 0
            per_round = state_count(known.flatten(1), self.model.schedule)
        return times * per_round + (times - 1) * transition

    # ---- generation ----------------------------------------------------------------------------

    def stream(self, class_ids: int | str | Sequence[int | str], *, seed: int | None = None,
               cfg_scale: float | None = None, temperature: float | None = None, top_k: int | None = None,
               top_p: float | None = None, schedule: str | Schedule | None = None,
               style: str | int | None = None, refine: bool | None = None,
               refine_threshold: float | None = None, outline: bool = True, display_size: int = 256,
               activation: float | None = None, alone: bool = False) -> Iterator[Frame]:
        """A Frame after every step. Arguments are checked now, before the first frame.
        `activation=tau` runs the model's FFNs activated (see `routed`); the caption says how much.
        `alone`: sampled here, step by step, never by a server's scheduler, so that each step's
        time is its own (Compare times its arms; the tokens are the same either way)."""
        states = self.states(class_ids, seed=seed, cfg_scale=cfg_scale, temperature=temperature,
                             top_k=top_k, top_p=top_p, schedule=schedule, style=style, refine=refine,
                             refine_threshold=refine_threshold, activation=activation, alone=alone)
        return self._frames(states, self.renderer(display_size, outline))

    def states(self, class_ids: int | str | Sequence[int | str], **sampling: Any) -> Iterator[StepState]:
        """Bare StepStates, nothing decoded (progress bars, token-level uses); same arguments as
        `stream` without the display ones."""
        return self._states(self._class_list(class_ids), **sampling)

    def generate(self, class_ids: int | str | Sequence[int | str], *, display_size: int = 256,
                 outline: bool = True, **sampling: Any) -> list[Image.Image]:
        """Final images only: nothing is decoded until the last step. (`outline` is accepted so
        stream and generate share arguments; finished pictures are never outlined.)"""
        renderer = self.renderer(display_size, outline)
        return renderer.final(_last(self.states(class_ids, **sampling)).tokens)

    def extend(self, image: ImageSource, keep: int, class_id: int | str | None = None, *,
               place: str = "centre", display_size: int = 256, outline: bool = True,
               **sampling: Any) -> Iterator[Frame]:
        """Grow a picture outward from `image`: it is cropped into the region `place_box(place,
        keep)` (the central keep x keep square by default, whose tokens are the spiral's first
        steps), encoded, and the rest of the canvas is drawn around it. `class_id=None` samples
        unconditionally (the null class, no guidance)."""
        box = self.place_box(place, keep)
        ids, sampling = self._conditioning(class_id, sampling, "extend")
        known = self.encode_region(load_image(image), box)
        states = self._states(ids, known=known, **sampling)
        return self._frames(states, self.renderer(display_size, outline))

    def edit(self, image: ImageSource, mask: Any, class_id: int | str | None = None, *,
             refine: int = 0, display_size: int = 256, outline: bool = True,
             **sampling: Any) -> Iterator[Frame]:
        """Redraw the painted part of a picture, the rest kept token for token. `mask` is a (g, g)
        bool array of cells or a picture of the image's size (painted where opaque, or white where
        it has no transparency); every cell with a painted pixel is redrawn, in the model's order,
        each seeing the known cells that come before it. `refine=r` draws the region r more times
        (seeds seed+1...) and keeps the draw under which the known cells are likeliest (so cells
        later in the order count too: the only context a centre hole can have); its frames play
        each round, the last frame is the one kept. `class_id=None`: the null class, no guidance."""
        if isinstance(refine, bool) or not isinstance(refine, int | np.integer) \
                or not 0 <= refine <= MAX_REFINE:
            raise ValueError(f"refine must be an integer in [0, {MAX_REFINE}] rounds, got {refine!r}")
        picture = load_image(image)
        redraw = self.mask_cells(mask, picture.size)
        ids, sampling = self._conditioning(class_id, sampling, "edit")
        known = self.encode_region(picture, (0, 0, self.grid, self.grid))
        known[redraw] = UNKNOWN
        renderer = self.renderer(display_size, outline)
        if not refine:
            return self._frames(self._states(ids, known=known, **sampling), renderer)
        seed = sampling.pop("seed", None)
        self._states(ids, known=known, seed=seed, **sampling)  # checks every argument now
        return self._refined(ids, known, int(refine), random.randrange(2**62) if seed is None else seed,
                             sampling, renderer)

    def _refined(self, ids: list[int], known: torch.Tensor, refine: int, seed: int,
                 sampling: dict[str, Any], renderer: PreviewRenderer) -> Iterator[Frame]:
        """Round r draws the region with seed + r; the draw whose known cells are likeliest wins.
        Every round keeps the style round 0 would have (styles alternate with the seed); a model
        with several drawings per style tries them in turn."""
        if sampling.get("style") is None and self.styles:
            sampling = {**sampling, "style": seed % len(self.styles)}
        best: tuple[float, int, StepState] | None = None
        for r in range(refine + 1):
            labels, last = self.labels(ids, sampling.get("style"), seed + r), None
            for frame in self._frames(self._states(ids, known=known, seed=seed + r, **sampling), renderer):
                last = frame.with_caption(f"round {r + 1} / {refine + 1} · {frame.caption}")
                yield last
            assert last is not None
            fit = float(known_log_likelihood(self.model, labels, last.state.tokens, known,
                                             schedule=self._schedule(sampling.get("schedule")))[0])
            if best is None or fit > best[0]:
                best = (fit, r, last.state)
        assert best is not None
        fit, r, state = best
        yield Frame(state, None, f"kept round {r + 1} of {refine + 1}: the draw that fits the rest of the "
                    f"picture best ({fit:.1f} nats)", renderer)

    def zoom_out(self, image: ImageSource, times: int, keep: int, class_id: int | str | None = None, *,
                 seed: int | None = None, transition: int = ZOOM_TRANSITION, display_size: int = 256,
                 outline: bool = True, **sampling: Any) -> Iterator[Frame]:
        """`times` rounds of "shrink the last picture into the centre, extend again", with
        `transition` bridge frames between rounds that shrink the finished picture into the
        centre square, so the frames play as one continuous zoom-out."""
        if not isinstance(times, int) or not 1 <= times <= MAX_ZOOM_ROUNDS:
            raise ValueError(f"times must be an integer in [1, {MAX_ZOOM_ROUNDS}], got {times!r}")
        if not isinstance(transition, int) or not 0 <= transition <= 60:
            raise ValueError(f"transition must be an integer in [0, 60] frames, got {transition!r}")
        first = self.extend(image, keep, class_id, seed=seed, display_size=display_size, outline=outline,
                            **sampling)  # checks every argument before the first frame
        return self._zoom(first, times, keep, class_id, seed, transition, display_size, outline, sampling)

    def _zoom(self, first: Iterator[Frame], times: int, keep: int, class_id: int | str | None,
              seed: int | None, transition: int, display_size: int, outline: bool,
              sampling: dict[str, Any]) -> Iterator[Frame]:
        box = self.centre_box(keep)
        renderer = self.renderer(display_size, outline)
        rounds = first
        for t in range(times):
            last = None
            for frame in rounds:
                last = frame.with_caption(f"zoom {t + 1} / {times} · {frame.caption}")
                yield last
            assert last is not None
            if t == times - 1:
                return
            picture = last.images[0]
            for i, img in enumerate(renderer.shrink(picture, box, transition), 1):
                yield Frame(last.state, [img], f"zoom {t + 1} / {times} · zooming out {i} / {transition}")
            rounds = self.extend(picture, keep, class_id, seed=None if seed is None else seed + t + 1,
                                 display_size=display_size, outline=outline, **sampling)

    # ---- pieces ---------------------------------------------------------------------------------

    def renderer(self, display_size: int = 256, outline: bool = True) -> PreviewRenderer:
        """A frame renderer; the neutral fill token is found once per pipeline and reused."""
        if self._fill_token is None:
            self._fill_token = neutral_token(self.tokenizer)
        return PreviewRenderer(self.tokenizer, display_size, outline, self._fill_token)

    def place_box(self, place: str, keep: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in grid cells of the region extension keeps the picture in:
        the central keep x keep square (a size the spiral passes through), a corner's, or a band
        keep cells deep along a side."""
        if place not in PLACES:
            raise ValueError(f"place must be one of {', '.join(PLACES)}; got {place!r}")
        if place == "centre":
            return self.centre_box(keep)
        g = self.grid
        if isinstance(keep, bool) or not isinstance(keep, int | np.integer) or not 1 <= keep < g:
            raise ValueError(f"keep must be an integer in [1, {g - 1}] cells for {self.name}, got {keep!r}")
        keep = int(keep)
        left = g - keep if "right" in place else 0
        top = g - keep if "bottom" in place else 0
        if place in ("left", "right"):
            return left, 0, left + keep, g
        if place in ("top", "bottom"):
            return 0, top, g, top + keep
        return left, top, left + keep, top + keep

    def mask_cells(self, mask: Any, size: tuple[int, int]) -> torch.Tensor:
        """(g, g) bool cells to redraw from a mask of cells or of the picture's pixels (`size`,
        width x height): the mask is cropped as the picture is, and a cell with any painted pixel
        is redrawn. An empty mask or one covering every cell is refused in one sentence."""
        g = self.grid
        if isinstance(mask, np.ndarray | torch.Tensor) and tuple(mask.shape) == (g, g) and mask.dtype in (
                np.bool_, torch.bool):
            cells = torch.as_tensor(np.asarray(mask)).bool()
        else:
            s = self.tokenizer.image_size
            # the picture's crop; a box filter keeps every painted pixel's trace, however small
            fitted = ImageOps.fit(Image.fromarray(load_mask(mask, size)), (s, s), Image.Resampling.BOX)
            cells = torch.from_numpy(np.asarray(fitted).reshape(g, s // g, g, s // g).any(axis=(1, 3)))
        if not cells.any():
            raise ValueError("The mask paints no cell: paint over the part of the picture to redraw.")
        if cells.all():
            raise ValueError("The mask covers the whole picture: leave some of it unpainted to keep "
                             "(Generate draws a picture from nothing).")
        return cells

    def centre_box(self, keep: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in grid cells of the keep x keep square the spiral fills first."""
        cells = self.model.schedule.order[: self.model.schedule.prefix_len(self._keep_steps(keep))]
        rows = [c // self.grid for c in cells]
        cols = [c % self.grid for c in cells]
        return min(cols), min(rows), max(cols) + 1, max(rows) + 1

    def encode_centre(self, image: Image.Image, keep: int) -> torch.Tensor:
        """The generation-order prefix that shows `image` in the central keep x keep square."""
        box = self.centre_box(keep)
        order = torch.tensor(self.model.schedule.order[: (box[2] - box[0]) * (box[3] - box[1])])
        return self.encode_region(image, box).flatten()[order]

    def encode_region(self, image: Image.Image, box: tuple[int, int, int, int]) -> torch.Tensor:
        """(g, g) tokens showing `image` in `box` (left, top, right, bottom cells), UNKNOWN around.

        The picture is cropped and resized to exactly that region's pixels; the rest of the
        tokenizer's canvas is filled by mirroring it, so encoders with a wide receptive field see
        natural surroundings rather than a hard border."""
        left, top, right, bottom = box
        size, cell = self.tokenizer.image_size, self.tokenizer.image_size // self.grid
        region = np.asarray(center_crop_resize(image, ((right - left) * cell, (bottom - top) * cell)))
        pads = ((top * cell, size - bottom * cell), (left * cell, size - right * cell), (0, 0))
        canvas = Image.fromarray(np.pad(region, pads, mode="symmetric"))
        device = module_device(self.tokenizer)
        with torch.no_grad():
            grid = self.tokenizer.encode(to_tensor(canvas)[None].to(device))[0].cpu().long()
        out = torch.full_like(grid, UNKNOWN)
        out[top:bottom, left:right] = grid[top:bottom, left:right]
        return out

    def _conditioning(self, class_id: int | str | None, sampling: dict[str, Any],
                      what: str) -> tuple[list[int], dict[str, Any]]:
        """The class row and sampling values: `None` is the null class without guidance."""
        if class_id is not None:
            return [self.class_id(class_id)], sampling
        if not self.model.cls_embedding.has_null:
            raise ValueError(f"{self.name} has no unconditional class: pass a class to {what} with.")
        return [self.model.null_class], {**sampling, "cfg_scale": 1.0}

    def _keep_steps(self, keep: int) -> int:
        sizes = self.keep_sizes()
        if isinstance(keep, bool) or not isinstance(keep, int | np.integer) or keep not in sizes:
            raise ValueError(f"keep must be one of {sizes} for {self.name} (the centre squares its "
                             f"spiral passes through), got {keep!r}")
        return self.model.schedule.square_steps()[int(keep)]

    def _class_list(self, class_ids: int | str | Sequence[int | str]) -> list[int]:
        items = [class_ids] if isinstance(class_ids, int | str | np.integer) else list(class_ids)
        if not 1 <= len(items) <= MAX_BATCH:
            raise ValueError(f"give between 1 and {MAX_BATCH} classes, got {len(items)}")
        return [self.class_id(c) for c in items]

    def _schedule(self, schedule: str | Schedule | None) -> Schedule | None:
        if schedule is None or isinstance(schedule, Schedule):
            return schedule
        return make_schedule(schedule, self.grid)

    def _states(self, ids: list[int], *, seed: int | None = None, cfg_scale: float | None = None,
                temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                schedule: str | Schedule | None = None, style: str | int | None = None,
                known: torch.Tensor | None = None, refine: bool | None = None,
                refine_threshold: float | None = None, activation: float | None = None,
                alone: bool = False) -> Iterator[StepState]:
        """Checked arguments -> the sampler's generator (which itself starts work lazily).
        `refine` None: nested refinement where the model has the correction head. `alone` rows
        run on their own (`ear.sampler.sample`), outside a server's shared batches."""
        settings = self.default_settings.merged(cfg_scale=cfg_scale, temperature=temperature,
                                                top_k=top_k, top_p=top_p)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int | np.integer)
                                 or not 0 <= seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        seed = None if seed is None else int(seed)  # numpy integers too
        labels, order = self.labels(ids, style, seed), self._schedule(schedule)
        on = self.can_refine if refine is None else refine
        refined = refinement(self.model, on, refine_threshold) is not None
        sampler = sample if alone else self.sampler
        return sampler(self.model, labels, **asdict(settings), seed=seed, known=known, schedule=order,
                       refine=refined, refine_threshold=refine_threshold,
                       activation=None if activation is None else self.routed(activation))

    def _frames(self, states: Iterator[StepState], renderer: PreviewRenderer) -> Iterator[Frame]:
        for state in states:
            caption = " · ".join(step_facts(state, state.elapsed)) + correction_note(state, renderer.outline)
            others = state.requests_in_flight - 1 if isinstance(state, ServedState) else 0
            if others > 0:  # a batch shared with other visitors: why it may take longer
                caption += f" · shared with {others} other visitor{'s' * (others != 1)}"
            yield Frame(state, None, caption, renderer)


def _last(states: Iterator[StepState]) -> StepState:
    state = None
    for state in states:  # noqa: B007
        pass
    assert state is not None
    return state


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r} (use cpu, cuda or cuda:N): {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but no CUDA GPU is available; use cpu")
    return dev


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]
