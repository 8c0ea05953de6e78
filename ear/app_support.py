"""What app.py needs that is not UI: checking requests, choosing models, animation files, timing.

The app is reachable through its HTTP API, so every value a handler receives is checked here
again, whatever the sliders allow; the sliders are built from the same `Range`s, so the page and
the server agree. Failures are `InputError`s (ValueErrors) carrying a sentence meant for the
person in front of the page; app.py shows them with `gr.Error`. Nothing here imports Gradio.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from ear import hub
from ear.growth import GrowthAnimation
from ear.images import atomic_output, load_image, load_mask
from ear.order import RADAR_SCHEDULES, SCHEDULES, make_schedule
from ear.preview import preview_factor, step_facts

T = TypeVar("T")
LOG = logging.getLogger("ear.app")

UNCONDITIONAL = "(none: unconditional)"
ANY_STYLE = "Any"  # a model with styles alternates them over a request's images
ANIMATION_FORMATS = ("gif", "mp4")
SHARED_CANVASES = 64  # canvases many requests show alike (opening sketches), kept at once
MAX_UPLOAD_BYTES = 20 * 1024 * 1024


class InputError(ValueError):
    """A request the app refuses; the message is shown to the user as is."""


@dataclass(frozen=True)
class Range:
    """An inclusive numeric range for one request field, labelled as the page labels it."""

    label: str
    lo: float
    hi: float
    integer: bool = False

    def check(self, value: Any, hi: float | None = None) -> Any:
        """The value as int (integer ranges) or float, or InputError if it is not a number in range."""
        hi = self.hi if hi is None else hi
        if isinstance(value, bool) or is_blank(value):
            raise InputError(f"{self.label} must be a number, got {value!r}.")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InputError(f"{self.label} must be a number, got {str(value)[:40]!r}.") from None
        if not math.isfinite(number):
            raise InputError(f"{self.label} must be a finite number, got {value!r}.")
        if self.integer and number != int(number):
            raise InputError(f"{self.label} must be a whole number, got {value!r}.")
        if not self.lo <= number <= hi:
            lo_text, hi_text = (f"{int(b)}" if self.integer else f"{b:g}" for b in (self.lo, hi))
            raise InputError(f"{self.label} must be between {lo_text} and {hi_text}, got {value!r}.")
        return int(number) if self.integer else number


SEED = Range("Seed", 0, 2**31 - 1, integer=True)
CFG = Range("CFG scale", 0.0, 10.0)
TEMPERATURE = Range("Temperature", 0.05, 3.0)
TOP_K = Range("Top-k", 0, 1 << 16, integer=True)  # checked against the model's codebook size
TOP_P = Range("Top-p", 0.05, 1.0)
NUM_IMAGES = Range("Number of images", 1, 8, integer=True)
ZOOM_ROUNDS = Range("Zoom-out rounds", 0, 6, integer=True)
REFINE_ROUNDS = Range("Refinement rounds", 0, 8, integer=True)  # pipeline.MAX_REFINE
ACTIVATION_TAU = Range("Activation tau", 0.05, 1.0)  # dynamic-k's budget knob (ear.routed)


def is_blank(value: Any) -> bool:
    """No value at all: what a cleared number box sends."""
    return value is None or (isinstance(value, str) and not value.strip())


def check_seed(value: Any) -> int:
    """The seed asked for; a blank one means a random seed (`seed_note` then says which)."""
    return secrets.randbelow(int(SEED.hi) + 1) if is_blank(value) else SEED.check(value)


def seed_note(asked: Any, seed: int) -> str:
    """The caption's mention of a seed the visitor did not choose, so the picture can be made again."""
    return f" · random seed {seed}" if is_blank(asked) else ""


def sampling_kwargs(pipeline: Any, seed: Any, cfg_scale: Any, temperature: Any, top_k: Any,
                    top_p: Any) -> dict[str, Any]:
    """Checked keyword arguments for `EARPipeline.stream/extend/zoom_out` (a blank seed: random)."""
    return {
        "seed": check_seed(seed),
        "cfg_scale": CFG.check(cfg_scale),
        "temperature": TEMPERATURE.check(temperature),
        "top_k": TOP_K.check(top_k, hi=pipeline.tokenizer.codebook_size),
        "top_p": TOP_P.check(top_p),
    }


def speedup_kwargs(pipeline: Any, refine: Any, activation: Any, tau: Any) -> dict[str, Any]:
    """Checked `refine` / `activation` keywords for `EARPipeline.stream`: refine None leaves
    nested refinement to the model (on where it has the correction head; asked of one without,
    the pipeline refuses it); activation on runs the FFNs at `tau` (blank: the shipped tau)."""
    for label, value in (("Refine (RadAR)", refine), ("Dynamic activation (ActVAR)", activation)):
        if value is not None and not isinstance(value, bool):
            raise InputError(f"{label} must be true or false, got {str(value)[:40]!r}.")
    kwargs: dict[str, Any] = {"refine": refine}
    if activation:
        shipped = shipped_tau(pipeline)
        if shipped is None:
            raise InputError(f"{pipeline.name} has no dynamic activation (no routers ship with it): "
                             f"turn it off.")
        kwargs["activation"] = shipped if is_blank(tau) else ACTIVATION_TAU.check(tau)
    return kwargs


def shipped_tau(pipeline: Any) -> float | None:
    """The tau the model's activation was made for, within the page's range (the slider's
    default); None for a model without one."""
    tau = pipeline.activation_tau
    return None if tau is None else min(max(float(tau), ACTIVATION_TAU.lo), ACTIVATION_TAU.hi)


def check_format(value: Any) -> str:
    """The animation container, 'gif' or 'mp4' (any case, dot optional)."""
    fmt = str(value or "").strip().lower().lstrip(".")
    if fmt not in ANIMATION_FORMATS:
        raise InputError(f"Animation format must be one of {', '.join(ANIMATION_FORMATS)}, "
                         f"got {str(value)[:40]!r}.")
    return fmt


def resolve_class(pipeline: Any, value: Any, *, required: bool) -> int | None:
    """Class id for a class name (or index); None (unconditional) is allowed unless `required`."""
    if value is None or (isinstance(value, str) and value.strip() in ("", UNCONDITIONAL)):
        if required:
            raise InputError("Pick a class first (type in the class box to search).")
        return None
    if isinstance(value, str) and len(value) > 200:
        raise InputError("That class name is too long to be one of the model's classes.")
    return pipeline.class_id(value)  # its ValueError names the class and suggests close ones


def check_style(pipeline: Any, value: Any) -> str | None:
    """A style name of the model, or None for "Any" (images alternate styles)."""
    if value is None or (isinstance(value, str) and value.strip() in ("", ANY_STYLE)):
        return None
    if not isinstance(value, str) or len(value) > 100:
        raise InputError("Style must be one of the model's style names.")
    pipeline.style_index(value)  # its ValueError lists the model's styles
    return value


def check_keep(pipeline: Any, value: Any) -> int:
    """A centre size the model can extend from (one of `pipeline.keep_sizes()`)."""
    sizes = pipeline.keep_sizes()
    keep = Range("Kept centre", min(sizes), max(sizes), integer=True).check(value)
    if keep not in sizes:
        raise InputError(f"Kept centre must be one of {', '.join(map(str, sizes))} tokens, got {value!r}.")
    return keep


def keep_choices(pipeline: Any) -> list[tuple[str, int]]:
    """(label, size) pairs for the keep picker: how much of the final canvas the upload covers."""
    g = pipeline.grid
    return [(f"{k} x {k} tokens · {round(100 * k / g)} % wide", k) for k in pipeline.keep_sizes()]


def default_keep(pipeline: Any) -> int:
    """Half the canvas width where possible: enough picture to steer, enough border to watch grow."""
    sizes = pipeline.keep_sizes()
    return min(sizes, key=lambda k: abs(k - pipeline.grid / 2))


def check_place(value: Any) -> str:
    """Where Extend puts the picture: one of `ear.pipeline.PLACES`."""
    from ear.pipeline import PLACES

    if not isinstance(value, str) or value.strip().lower() not in PLACES:
        raise InputError(f"Placement must be one of {', '.join(PLACES)}, got {str(value)[:40]!r}.")
    return value.strip().lower()


EDITOR_CANVAS = (800, 800)  # the Edit tab's empty canvas (white), what the editor sends without a picture
EDITOR_MAX_SIDE = 1024  # an upload is shrunk to this to paint on (`editor_picture`)
NO_PICTURE = "Upload a picture first (or send the last generated one), then paint over the part to redraw."


def edit_upload(value: Any) -> tuple[Image.Image, Any]:
    """The image editor's picture (its background) and mask (everything painted on its layers,
    as `ear.images.load_mask` reads it), or InputError saying what is missing. The editor's own
    empty canvas (flat white, EDITOR_CANVAS) is no picture: paint on it is not a picture to edit."""
    background = value.get("background") if isinstance(value, Mapping) else None
    if background is None:
        raise InputError(NO_PICTURE)
    picture = load_image(background) if isinstance(background, Image.Image) else load_upload(background)
    if picture.size == EDITOR_CANVAS and all(lo == hi for lo, hi in picture.getextrema()):
        raise InputError(NO_PICTURE)
    painted = np.zeros((picture.height, picture.width), dtype=np.uint8)
    for layer in value.get("layers") or []:  # a brush layer paints wherever it is not transparent
        alpha = np.asarray(load_layer(layer).convert("RGBA"))[..., 3]
        painted |= load_mask(np.where(alpha > 0, 255, 0).astype(np.uint8), picture.size)
    return picture, painted


def editor_picture(payload: Any) -> tuple[Image.Image, str]:
    """A picture uploaded for the Edit tab's editor (`load_upload`'s checks), at most
    EDITOR_MAX_SIDE px on a side, and a note on what will be used of it. The upload goes to the
    server as a file and the editor gets the smaller copy: the editor's own upload keeps the
    picture at full size, and the browser encodes it and every painted layer again on each
    Redraw (a 4000 x 3000 px photo: 14 s per Redraw in Chromium here; the model works at a few
    hundred pixels, so the result is the same)."""
    picture = load_upload(payload)
    w, h = picture.size
    note = upload_note(picture)
    if max(w, h) <= EDITOR_MAX_SIDE:
        return picture, note
    picture.thumbnail((EDITOR_MAX_SIDE, EDITOR_MAX_SIDE), Image.Resampling.LANCZOS)
    shown = f"Shown at {picture.width} x {picture.height} px (from {w} x {h}) to paint on."
    return picture, f"{shown} {note}".strip()


def load_layer(layer: Any) -> Image.Image:
    """One editor layer (a picture, or a file Gradio saved) with its transparency."""
    if isinstance(layer, Image.Image):
        return layer
    path = layer.get("path") if isinstance(layer, Mapping) else layer
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (OSError, TypeError, ValueError):
        raise InputError("A painted layer could not be read; please paint it again.") from None


def load_upload(payload: Any) -> Image.Image:
    """The uploaded picture as RGB, or InputError saying why it cannot be used. The bytes are
    read here so that messages speak of "the uploaded image", never of server paths."""
    path = _upload_path(payload)
    if not path:
        raise InputError("Upload an image first (PNG, JPEG, WebP, GIF, ...) or pick an example.")
    try:
        file = Path(path)
        if file.stat().st_size > MAX_UPLOAD_BYTES:
            raise InputError(f"The uploaded file is larger than {MAX_UPLOAD_BYTES // 2**20} MB.")
        data = file.read_bytes()
    except (OSError, TypeError):
        raise InputError("The uploaded file could not be read; please upload it again.") from None
    return load_image(data)  # ValueErrors with a sentence for the user


BROWSER_FORMATS = {"PNG", "JPEG", "GIF", "WEBP", "BMP"}  # what every browser shows in an <img>
SMALL_UPLOAD_PX = 32  # a picture this small is enlarged many times over


def upload_preview(payload: Any, files: OutputFiles) -> tuple[str | None, str]:
    """Check an upload as it arrives: a PNG to show instead (None: the upload shows as it is;
    a TIFF or a float image would be a broken picture in the browser) and a note on what will
    be used of it ("" when all of it). InputError when it cannot be used at all."""
    image = load_upload(payload)
    preview = None if _browser_shows(_upload_path(payload)) else str(
        _fast_png(image, files.new_path("upload", "png")))
    return preview, upload_note(image)


def _upload_path(payload: Any) -> Any:
    """Gradio passes uploads as a dict (or object) with a server-side `path`."""
    return payload.get("path") if isinstance(payload, dict) else getattr(payload, "path", payload)


def _browser_shows(path: Any) -> bool:
    try:
        with Image.open(path) as original:
            return original.format in BROWSER_FORMATS
    except (OSError, ValueError, TypeError):
        return False


def upload_note(image: Image.Image) -> str:
    """What Extend and Edit will make of a picture's size: the centred square, enlarged if tiny."""
    w, h = image.size
    notes = []
    if max(w, h) > 2 * min(w, h):
        notes.append(f"Only the centred {min(w, h)} x {min(w, h)} px square of this {w} x {h} px picture "
                     f"is kept.")
    if min(w, h) < SMALL_UPLOAD_PX:
        notes.append(f"At {w} x {h} px it is enlarged a lot, so it will look blocky.")
    return " ".join(notes)


def model_choices(extra: str | None = None) -> list[tuple[str, str]]:
    """(label, name) for the model picker, the default first: an optional extra model (a local
    folder or a Hub repo id), then the registry with what is available offline, so users see
    what will load."""
    registry = [(f"{s.name} · {s.status}", s.name) for s in hub.list_models()]
    if not extra:
        return registry
    if extra in hub.REGISTRY:
        return sorted(registry, key=lambda choice: choice[1] != extra)
    kind = "Hub" if hub.is_repo_id(extra) else "local folder"
    return [(f"{Path(extra).name} · {kind}", extra), *registry]


def extend_model(page_model: str, choices: list[tuple[str, str]]) -> str:
    """The model the Extend tab opens on: uploads are mostly photographs, so the bundled photo
    model where the page runs a bundled model (a CPU start) and the photo model is there;
    otherwise the page's own model (a GPU start's released ImageNet model continues photos well)."""
    status = {s.name: s.status for s in hub.list_models()}
    names = {name for _, name in choices}
    if status.get(page_model) == "bundled" and status.get(hub.PHOTO_MODEL) == "bundled" \
            and hub.PHOTO_MODEL in names:
        return hub.PHOTO_MODEL
    return page_model


def unavailable_message(name: str) -> str:
    """Why a model cannot be used, for a visitor: what it means and what the host can do (the
    loader's own message names flags and environment variables; it goes to the log)."""
    status = {s.name: s.status for s in hub.list_models()}.get(name)
    if status in ("not downloaded", "partly cached"):
        return (f"Model '{name}' is not downloaded on this server, and it cannot be fetched from the "
                f"Hugging Face Hub right now. The host can download it ahead of time by running "
                f"python -m ear download {name} (details are in the server log).")
    return (f"Model '{name}' cannot be loaded on this server: its files are missing or damaged. "
            f"The host will find the details in the server log.")


class ModelRegistry:
    """Loads pipelines by name on first use and keeps the most recent few in memory.

    Only the listed names are accepted, so the API cannot be used to load arbitrary paths.
    `preloaded` holds pipelines loaded already (the one start-up prepared)."""

    def __init__(self, names: Sequence[str], loader: Callable[[str], Any], capacity: int = 2,
                 preloaded: Mapping[str, Any] | None = None) -> None:
        self.names = list(dict.fromkeys(names))
        self.default = self.names[0]
        self._loader = loader
        self._capacity = capacity
        self._loaded: OrderedDict[str, Any] = OrderedDict(
            (name, pipe) for name, pipe in (preloaded or {}).items() if name in self.names)
        self._lock = threading.Lock()

    def get(self, name: Any = None) -> Any:
        """The pipeline for `name` (the default for empty), or InputError if it cannot be loaded."""
        name = str(name).strip() if name else self.default
        if name not in self.names:
            raise InputError(f"Unknown model {name[:80]!r}; choose one of: {', '.join(self.names)}.")
        with self._lock:  # one load at a time: two at once would double peak memory
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            try:
                pipeline = self._loader(name)
            except (ValueError, OSError, RuntimeError) as err:
                LOG.warning("Model %r cannot be loaded: %s", name, err)  # the long form, for the host
                raise InputError(unavailable_message(name)) from None
            self._loaded[name] = pipeline
            while len(self._loaded) > self._capacity:
                self._loaded.popitem(last=False)
            return pipeline


class OutputFiles:
    """Files the page shows or offers for download, each under a unique name in one folder.

    app.py registers the folder as a Gradio static path, so Gradio serves these files where they
    are instead of hashing and copying each one into its own temp folder (one copy per streamed
    canvas used to pile up there). This class therefore bounds what it keeps itself: a request's
    canvases are deleted seconds after newer ones replaced them (`Canvases`), leaving one per run,
    and everything older than `max_age_s` is pruned after finished requests. Unique
    names also mean no file is ever rewritten while a browser may be reading it."""

    def __init__(self, root: Path | None = None, max_age_s: float = 3600.0, linger_s: float = 10.0,
                 max_defer_s: float = 1.0) -> None:
        self.root = root or Path(tempfile.gettempdir()) / "ear-studio"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_age_s, self.linger_s = max_age_s, linger_s
        self._pruned = 0.0  # when prune() last looked (it lists the whole folder)
        # Animations are encoded one at a time, and only once no final pictures are on their way:
        # when a batch of visitors finishes together, the first one's encoding would otherwise take
        # the cores from the others' pictures, which are what everyone is waiting for.
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ear-animation")
        self._quiet = threading.Condition()
        self._delivering = 0  # requests whose final pictures are being drawn or sent
        self.max_defer_s = max_defer_s
        self._shared: OrderedDict[Hashable, Path] = OrderedDict()
        self._shared_lock = threading.Lock()

    def new_path(self, stem: str, suffix: str) -> Path:
        path = self.root / f"{stem}-{uuid.uuid4().hex[:12]}.{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def image(self, image: Image.Image, stem: str) -> str:
        """A finished picture: lossless PNG (fast to write, somewhat larger)."""
        return str(_fast_png(image, self.new_path(stem, "png")))

    def canvases(self, stem: str) -> Canvases:
        return Canvases(self, stem, self.linger_s)

    def shared_canvas(self, key: Hashable, draw: Callable[[], Image.Image]) -> str:
        """A canvas that is the same for many requests, drawn and written once: a generation's
        opening sketch shows only which cells come first, and a crowd arriving together would
        otherwise draw that one picture once each, on the cores its generation is using. The
        latest `SHARED_CANVASES` are kept (`prune` leaves them alone; those of earlier runs go)."""
        with self._shared_lock:
            path = self._shared.pop(key, None)
            if path is None or not path.exists():
                path = _canvas_png(draw(), self.new_path("shared/canvas", "png"))
            self._shared[key] = path  # the most recently used last
            while len(self._shared) > SHARED_CANVASES:  # deleted later: a browser may still ask
                _delete_later(self._shared.popitem(last=False)[1], self.linger_s)
        return str(path)

    @contextlib.contextmanager
    def delivering(self) -> Iterator[None]:
        """Around drawing and sending a request's final pictures: animations wait meanwhile."""
        with self._quiet:
            self._delivering += 1
        try:
            yield
        finally:
            with self._quiet:
                self._delivering -= 1
                self._quiet.notify_all()

    def animation(self, growth: GrowthAnimation, stem: str, fmt: str, fps: float = 8) -> str:
        """Write `growth` as `fmt` and return the path written (GIF if no MP4 encoder exists), once
        no final pictures are being delivered (or `max_defer_s` has passed: under a steady stream
        of finishing requests, animations still come). Old files are pruned here (see `prune`)."""
        self.prune()
        deadline = time.monotonic() + self.max_defer_s  # from now, not from its turn in the queue
        written = self._encoder.submit(self._when_quiet, deadline, growth.save, self.new_path(stem, fmt), fps)
        return str(written.result())

    def _when_quiet(self, deadline: float, save: Callable[..., Path], path: Path, fps: float) -> Path:
        with self._quiet:
            self._quiet.wait_for(lambda: self._delivering == 0, timeout=max(0.0, deadline - time.monotonic()))
        return save(path, fps=fps)

    def prune(self) -> None:
        """Delete files older than `max_age_s`; at most one look per hundredth of that age."""
        now = time.time()
        if now - self._pruned < self.max_age_s / 100:
            return
        self._pruned, cutoff = now, now - self.max_age_s
        with self._shared_lock:
            in_use = set(self._shared.values())  # shared canvases stay while kept, however old
        shared = self.root / "shared"
        for path in [*self.root.iterdir(), *(shared.iterdir() if shared.is_dir() else ())]:
            try:
                if path.is_file() and path not in in_use and path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:  # a concurrent request pruned it first
                pass


@dataclass
class _Held:
    """One run's growth: what is needed to write its playbacks, and the files written so far."""

    stem: str
    growths: list[GrowthAnimation | None]
    options: list[dict[str, Any]]
    kept_at: float
    written: list[Path | None] | None = None


class Playbacks:
    """The latest runs' growth, kept a while so the page can play it on the canvas, and again.

    A run is kept in memory as `GrowthAnimation`s (cell masks and the finished pictures: tens of
    kilobytes), so a run nobody watches costs no file. `play` writes its play-once GIFs the first
    time and, each time after, links them under a fresh name: a browser shows a GIF it has
    already played at its last frame, so only a new URL starts it again. The latest `capacity`
    runs are kept, each for `ttl_s` seconds."""

    def __init__(self, files: OutputFiles, capacity: int = 256, ttl_s: float = 900.0) -> None:
        self.files, self.capacity, self.ttl_s = files, capacity, ttl_s
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, stem: str, growths: Sequence[GrowthAnimation | None],
             options: Sequence[Mapping[str, Any]] | None = None) -> str:
        """Hold a run's growths (one per canvas, None for a canvas that shows nothing: a Compare
        arm that did not run; `options` are `GrowthAnimation.playback`'s arguments for each) and
        return the key that plays them."""
        options = [dict(o) for o in options] if options is not None else [{} for _ in growths]
        if len(options) != len(growths):
            raise ValueError(f"{len(growths)} growths but {len(options)} sets of options")
        key = uuid.uuid4().hex
        with self._lock:
            self._held[key] = _Held(stem, list(growths), options, time.monotonic())
            self._expire()
        return key

    def play(self, key: Any) -> list[str | None]:
        """The run's playback files, one per growth (None for None), under names no browser has
        shown yet."""
        with self._lock:
            self._expire()
            held = self._held.get(key) if isinstance(key, str) else None
        if held is None:
            raise InputError("There is no recent run to replay here: run it again to watch it grow.")
        if held.written is None:
            held.written = [None if growth is None else
                            growth.playback(self.files.new_path(f"{held.stem}-playback", "gif"), **options)
                            for growth, options in zip(held.growths, held.options, strict=True)]
            return [None if path is None else str(path) for path in held.written]
        stem = f"{held.stem}-replay"
        return [None if path is None else str(_linked(path, self.files.new_path(stem, "gif")))
                for path in held.written]

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl_s
        while self._held and (len(self._held) > self.capacity
                              or next(iter(self._held.values())).kept_at < cutoff):
            self._held.popitem(last=False)


def _linked(source: Path, target: Path) -> Path:
    """`source` under the name `target`: a hard link where the file system allows (no bytes
    written again), else a copy; a source pruned meanwhile is said in one sentence."""
    try:
        os.link(source, target)
    except FileNotFoundError:
        raise InputError("That run's playback has been cleared from the server: run it again.") from None
    except OSError:
        shutil.copyfile(source, target)
    return target


class Canvases:
    """One request's live canvases: fast PNGs, large grids shrunk (`preview_factor`).

    A canvas is deleted once it is `linger_s` seconds old and two newer ones exist; when the
    run ends (finished or stopped) all but the last, the one left on screen, go `linger_s` later.
    Not at once: the browser fetches a canvas only after its update arrives, and when a run is
    stopped, updates the server had already made are dropped, so the canvas the page shows last
    may be older than the newest written."""

    def __init__(self, files: OutputFiles, stem: str, linger_s: float = 10.0) -> None:
        self.files, self.stem, self.linger_s = files, stem, linger_s
        self._written: list[tuple[float, Path]] = []

    def show(self, image: Image.Image) -> str:
        """Write a canvas, shrunk as `preview_factor` says, and drop those long out of sight."""
        path = _canvas_png(image, self.files.new_path(self.stem, "png"))
        self._written.append((time.monotonic(), path))
        self._drop(keep=2, older_than=time.monotonic() - self.linger_s)
        return str(path)

    def close(self) -> None:
        """The run is over: in `linger_s` seconds, drop every canvas but the last."""
        timer = threading.Timer(self.linger_s, self._drop, kwargs={"keep": 1, "older_than": math.inf})
        timer.daemon = True
        timer.start()

    def _drop(self, keep: int, older_than: float) -> None:
        kept = self._written[-keep:]
        for written, path in self._written[:-keep]:
            if written < older_than:
                path.unlink(missing_ok=True)
            else:
                kept.insert(0, (written, path))
        self._written = sorted(kept)


def _delete_later(path: Path, seconds: float) -> None:
    timer = threading.Timer(seconds, path.unlink, kwargs={"missing_ok": True})
    timer.daemon = True
    timer.start()


def _canvas_png(image: Image.Image, path: Path) -> Path:
    """A live canvas: shrunk as `preview_factor` says, written as a fast PNG."""
    factor = preview_factor(*image.size)
    return _fast_png(image.reduce(factor) if factor > 1 else image, path)


def _fast_png(image: Image.Image, path: Path) -> Path:
    """Lossless PNG at the lowest compression (a few times faster than the default); atomic."""
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG", compress_level=1)
    return path


STEP_CAPTION = re.compile(r"step (\d+ / \d+ · \d+ / \d+ tokens).*$")


def stopped_caption(caption: str) -> str:
    """The caption a run left behind, as it reads once the run has ended: one that was still
    going ("step 10 / 31 · 120 / 256 tokens · 0.41 s", in Compare after the order's name) says
    "stopped at step 10 / 31 · 120 / 256 tokens"; finished ones, messages, blanks and those that
    say so already stay."""
    if not caption or caption.endswith("· done") or caption.startswith("⚠") or "stopped" in caption:
        return caption
    if "writing the animation" in caption:
        return caption.replace("writing the animation…", "stopped before the animation was written")
    return STEP_CAPTION.sub(r"stopped at step \1", caption)


def timed(items: Iterator[T]) -> Iterator[tuple[T, float]]:
    """Each item with the seconds spent producing it: interleaved streams are timed fairly."""
    while True:
        start = time.perf_counter()
        try:
            item = next(items)
        except StopIteration:
            return
        yield item, time.perf_counter() - start


# ---- Compare ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arm:
    """One picture of the Compare tab: which model, in which order, with which options, or why it
    does not run for this page's model (`absent`, said where its caption goes)."""

    key: str  # names its canvas and caption on the page: cmp-<key>-canvas, cmp-<key>-caption
    label: str
    model: str | None = None  # a registry name; None: the page's model
    schedule: str | None = None  # None: the model's trained order
    refine: bool | None = None  # None: the model's default (refined where it has the head)
    activation: float | None = None  # the FFN budget tau; None: dense
    absent: str = ""


def compare_arms(page: Any, offered: Sequence[str]) -> tuple[Arm, ...]:
    """Compare's arms for the page's model `page`, always these keys in this order: the page model
    on every order of SCHEDULES; RadAR's rings with and without refinement on the RadAR model, in
    the rings it was trained on (the page model itself if it has the correction head and was
    trained on a RadAR order, else `hub.RADAR_MODEL` where the server `offered` it); the page
    model at its shipped activation."""
    if page.can_refine and page.model.config.schedule in RADAR_SCHEDULES:
        radar, no_radar = None, ""
    elif hub.RADAR_MODEL in offered:
        radar, no_radar = hub.RADAR_MODEL, ""
    else:
        radar, no_radar = None, "no RadAR model on this server"
    tau = page.activation_tau
    return (*(Arm(order, order, schedule=order) for order in SCHEDULES),
            Arm("radar-refined", "radar · refined", radar, refine=True, absent=no_radar),
            Arm("radar-plain", "radar · no refinement", radar, refine=False, absent=no_radar),
            Arm("activated", "activated", activation=tau,
                absent="" if page.has_activation else "this model ships no dynamic activation"))


def compare_steps(grid: int, trained: str) -> int:
    """The steps of all of Compare's arms for a page model of `grid` trained on `trained`, as if
    every arm ran (ZeroGPU's duration estimate, made without loading a model): SCHEDULES, the
    RadAR rings twice (the longer of the RadAR orders: the RadAR model may be another one), the
    refined arm's extra content-only pass, the trained order activated."""
    rings = max(make_schedule(order, grid).num_steps for order in RADAR_SCHEDULES)
    return sum(make_schedule(order, grid).num_steps for order in (*SCHEDULES, trained)) + 2 * rings + 1


def arm_frames(arm: Arm, page: Any, load: Callable[[str], Any], class_id: int, seed: int
               ) -> tuple[str, Iterator[Any] | None]:
    """One arm's heading (its label, model and order; or why it does not run, one line) and its
    frames (None when it does not run): every arm's stream comes from here. Another model than
    the page's is `load`ed by name and given the page's class by name."""
    heading = f"**{arm.label}**"
    if arm.absent:
        return f"{heading} · {arm.absent}", None
    try:
        pipe = page if arm.model is None else load(arm.model)
    except ValueError:  # the registry has logged why
        return f"{heading} · model {arm.model} cannot be loaded on this server", None
    klass: int | None = class_id
    where = ""
    if pipe is not page:
        name = page.class_names[class_id]
        klass = next((i for i, known in enumerate(pipe.class_names) if known == name), None)
        if klass is None:
            return f"{heading} · {pipe.name} has no class {name!r}", None
        where = f"{pipe.name}, "
    try:
        frames = pipe.stream(klass, seed=seed, schedule=arm.schedule, refine=arm.refine,
                             activation=arm.activation, alone=True)  # (each step timed as its own)
    except ValueError as err:
        return f"{heading} · {err}", None
    trained = pipe.model.config.schedule
    kind = ("trained order" if (arm.schedule or trained) == trained
            else f"off-distribution (model trained on {trained})")
    tau = "" if arm.activation is None else f", tau {arm.activation:g}"
    return f"{heading} · {where}{kind}{tau}", frames


def arm_caption(heading: str, state: Any, seconds: float) -> str:
    """An arm's caption at a step: its heading, then step, tokens and its own compute time, the
    cells the correction replaced so far (refined arms) and the FFN's active share (activated)."""
    facts = step_facts(state, seconds)
    if state.corrected is not None:
        count = int(state.corrected.sum())
        facts.append(f"{count} corrected")  # as Generate's caption says it
    if state.done:
        facts.append("done")
    return f"{heading}  \n{' · '.join(facts)}"


def available_cpus() -> int:
    """Cores this process may really use: its CPU affinity, capped by a cgroup v2 quota (in
    containers such as Spaces, affinity alone can report the host's cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


def threads_per_request(concurrency: int, spare: int = 0) -> int | None:
    """PyTorch intra-op threads for each of `concurrency` simultaneous requests, so together they
    use the cores without oversubscribing them: with more busy threads than cores, OpenMP's
    waiting makes small models ten times slower or worse. `spare` cores are left to other work
    (the serving scheduler leaves one to the web server and the requests' drawing: on 2 cores the
    bundled model's batch of 8 takes 137 ms on one thread and 162 ms on two passive OpenMP threads
    that share their cores with Gradio). None when OMP_NUM_THREADS is set (the host's choice wins)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, (available_cpus() - spare) // max(1, concurrency))


@contextlib.contextmanager
def examples_cache(pipeline: Any) -> Iterator[Path]:
    """While Gradio examples are created, point their result cache at a folder named after the
    model's files: Gradio keys the cache by component id only, so a retrained model would keep
    showing the old model's results."""
    source = Path(str(pipeline.info()["source"]))
    files = sorted(source.iterdir()) if source.is_dir() else []
    stamp = repr([pipeline.name, *[(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]])
    base = os.environ.get("GRADIO_EXAMPLES_CACHE")
    folder = Path(base or ".gradio/cached_examples") / hashlib.sha256(stamp.encode()).hexdigest()[:12]
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(folder)
    try:
        yield folder
    finally:
        if base is None:
            del os.environ["GRADIO_EXAMPLES_CACHE"]
        else:
            os.environ["GRADIO_EXAMPLES_CACHE"] = base


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def public_source(source: str) -> str:
    """Where a model came from, without the server's paths: "bundled with the app", a Hub file
    or repo id, or the name of a local folder or file (the host's paths are nobody else's business)."""
    parts = []
    for part in str(source).split(" + "):
        path = Path(part)
        if part.startswith("hf://"):
            parts.append(f"Hugging Face Hub: {part.removeprefix('hf://')}")
        elif not path.is_absolute():
            parts.append(f"Hugging Face Hub: {part}")
        elif path.resolve().is_relative_to(hub.ASSETS.resolve()):
            parts.append("bundled with the app")
        else:
            parts.append(f"local {'folder' if path.is_dir() else 'file'} '{path.name}'")
    return " + ".join(parts)


def public_info(info: dict[str, Any]) -> dict[str, Any]:
    """`EARPipeline.info()` as the page may show it (see `public_source`)."""
    return {**info, "source": public_source(info["source"])}


def activation_summary(activation: dict[str, Any] | None) -> str:
    """Model info's line on dynamic activation: experts (tuned or the dense weights), tau, the
    dense lead, the FFN share run and the counted saving of total FLOPs per image against the
    dense engine (`EARPipeline.info`)."""
    if activation is None:
        return "no (no routers ship with the model)"
    change = (activation["flops_active"] / activation["flops_dense"] - 1) * 100
    tuned = " (tuned)" if activation.get("tuned") else ""
    lead = activation.get("dense_lead", 0.0)
    led = f", the first {lead * 100:.0f} % of the order dense" if lead else ""
    return (f"{activation['experts']} experts{tuned}, tau {activation['tau']:g}{led}, FFN "
            f"{activation['ffn_active'] * 100:.0f} % active, total FLOPs "
            f"{'−' if change < 0 else '+'}{abs(change):.1f} % (counted)")


def styles_summary(info: dict[str, Any]) -> str:
    """"Twemoji, Noto (3 drawings each: a seed picks one)", or "none"."""
    if not info.get("styles"):
        return "none"
    drawings = info.get("drawings", 1)
    each = f" ({drawings} drawings each: a seed picks one)" if drawings > 1 else ""
    return ", ".join(info["styles"]) + each


def info_markdown(info: dict[str, Any]) -> str:
    """`public_info(...)` as a Markdown table for the Model info panel, headed by the model's name."""
    cached = {True: "yes", False: "no (downloads on first use)", None: "n/a (bundled or local)"}
    rows = [
        ("Source", info["source"]),
        ("Device / dtype", f"{info['device']} / {info['dtype']}"),
        ("Parameters", f"{_count(info['parameters'])} (+ tokenizer {_count(info['tokenizer_parameters'])})"),
        ("Trained order", f"{info['schedule']}, {info['steps']} steps"),
        ("Tokens / image", f"{info['grid']} x {info['grid']} tokens, {info['image_size']} px"),
        ("Classes", str(info["classes"])), ("Styles", styles_summary(info)),
        ("Licence", info["licence"] or "not stated"),
        ("Attribution", info["attribution"] or "not stated"),
        ("Cached from the Hub", cached.get(info.get("cached"), str(info.get("cached")))),
        ("Refinement (RadAR)", "yes, on by default (the model has the correction head)" if info["refinement"]
         else "no (the model has no correction head)"),
        ("Dynamic activation (ActVAR)", activation_summary(info["activation"])),
    ]
    body = "\n".join(f"| {key} | {str(value).replace('|', '/')} |" for key, value in rows)
    return f"| Model | {info['name']} |\n|---|---|\n{body}"
