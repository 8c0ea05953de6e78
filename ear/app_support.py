"""What app.py needs that is not UI: checking requests, choosing models, animation files, timing.

The app is reachable through its HTTP API, so every value a handler receives is checked here
again, whatever the sliders allow; the sliders are built from the same `Range`s, so the page and
the server agree. Failures are `InputError`s (ValueErrors) carrying a sentence meant for the
person in front of the page; app.py shows them with `gr.Error`. Nothing here imports Gradio.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from ear import hub
from ear.images import load_image, save_image
from ear.preview import save_animation

T = TypeVar("T")

UNCONDITIONAL = "(none: unconditional)"
ANIMATION_FORMATS = ("gif", "mp4")
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
        if isinstance(value, bool) or value is None or (isinstance(value, str) and not value.strip()):
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


def sampling_kwargs(pipeline: Any, seed: Any, cfg_scale: Any, temperature: Any, top_k: Any,
                    top_p: Any) -> dict[str, Any]:
    """Checked keyword arguments for `EARPipeline.stream/extend/zoom_out`."""
    return {
        "seed": SEED.check(seed),
        "cfg_scale": CFG.check(cfg_scale),
        "temperature": TEMPERATURE.check(temperature),
        "top_k": TOP_K.check(top_k, hi=pipeline.tokenizer.codebook_size),
        "top_p": TOP_P.check(top_p),
    }


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
    return [(f"{k} x {k} tokens ({round(100 * k / g)} % of the width)", k) for k in pipeline.keep_sizes()]


def default_keep(pipeline: Any) -> int:
    """Half the canvas width where possible: enough picture to steer, enough border to watch grow."""
    sizes = pipeline.keep_sizes()
    return min(sizes, key=lambda k: abs(k - pipeline.grid / 2))


def load_upload(payload: Any) -> Image.Image:
    """The uploaded picture as RGB, or InputError saying why it cannot be used.

    Gradio passes uploads as a dict (or object) with a server-side `path`; the bytes are read
    here so that messages speak of "the uploaded image", never of server paths."""
    path = payload.get("path") if isinstance(payload, dict) else getattr(payload, "path", payload)
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
                raise InputError(f"Model {name!r} cannot be loaded: {err}") from None
            self._loaded[name] = pipeline
            while len(self._loaded) > self._capacity:
                self._loaded.popitem(last=False)
            return pipeline


class OutputFiles:
    """Files the page shows or offers for download, each under a unique name in one temp folder.

    Handlers hand Gradio paths rather than PIL images: Gradio then copies each file into its cache
    atomically and never rewrites an existing copy, whereas a PIL image is re-encoded into a
    content-named file that is overwritten in place, so identical frames (the same class and
    seed from two users, or a final image equal to the last canvas) could be served half-written.
    """

    def __init__(self, root: Path | None = None, max_age_s: float = 3600.0) -> None:
        self.root = root or Path(tempfile.gettempdir()) / "ear-studio"
        self.max_age_s = max_age_s

    def _path(self, stem: str, suffix: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / f"{stem}-{uuid.uuid4().hex[:12]}.{suffix}"

    def image(self, image: Image.Image, stem: str) -> str:
        return str(save_image(image, self._path(stem, "png")))

    def animation(self, frames: Sequence[Image.Image], stem: str, fmt: str, fps: float = 8) -> str:
        """Write `frames` as `fmt` and return the path written (GIF if no MP4 encoder exists).
        Old files are pruned here, once per request."""
        self.prune()
        return str(save_animation(frames, self._path(stem, fmt), fps=fps))

    def prune(self) -> None:
        cutoff = time.time() - self.max_age_s
        for path in self.root.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:  # a concurrent request pruned it first
                pass


def timed(items: Iterator[T]) -> Iterator[tuple[T, float]]:
    """Each item with the seconds spent producing it: interleaved streams are timed fairly."""
    while True:
        start = time.perf_counter()
        try:
            item = next(items)
        except StopIteration:
            return
        yield item, time.perf_counter() - start


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


def threads_per_request(concurrency: int) -> int | None:
    """PyTorch intra-op threads for each of `concurrency` simultaneous requests, so together they
    use the cores without oversubscribing them: with more busy threads than cores, OpenMP's
    waiting makes small models ten times slower or worse. None when OMP_NUM_THREADS is set (the
    host's choice wins)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, available_cpus() // max(1, concurrency))


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


def info_markdown(info: dict[str, Any]) -> str:
    """`EARPipeline.info()` as a two-column Markdown table for the Model info panel."""
    cached = {True: "yes", False: "no (downloads on first use)", None: "n/a (bundled or local)"}
    rows = [
        ("Model", info["name"]), ("Source", f"`{info['source']}`"),
        ("Device / dtype", f"{info['device']} / {info['dtype']}"),
        ("Parameters", f"{_count(info['parameters'])} (+ tokenizer {_count(info['tokenizer_parameters'])})"),
        ("Trained order", f"{info['schedule']}, {info['steps']} steps"),
        ("Tokens / image", f"{info['grid']} x {info['grid']} tokens, {info['image_size']} px"),
        ("Classes", str(info["classes"])), ("Licence", info["licence"] or "not stated"),
        ("Attribution", info["attribution"] or "not stated"),
        ("Cached from the Hub", cached.get(info.get("cached"), str(info.get("cached")))),
    ]
    body = "\n".join(f"| {key} | {str(value).replace('|', '/')} |" for key, value in rows)
    return f"| | |\n|---|---|\n{body}"
