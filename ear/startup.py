"""Which model the page opens on, and getting it ready before the first visitor arrives.

On a CPU the page opens on the bundled `ear-emoji`, as always. With a CUDA GPU it opens on the
largest released EAR model whose working set fits the GPU's memory and whose files can be had
(cached, or the Hub reachable). `EAR_STUDIO_MODEL` (a registry name, a Hub repo id or a folder)
overrides the choice. On dedicated GPU hardware `start` downloads the model (progress in the
log), loads it and runs one short generation before the page is built, so the first visitor pays
neither for the download nor for warm-up; that generation's picture must not be one flat colour,
since the released weights have never been run end to end here. Any failure falls back to
`ear-emoji` with one log line saying why. Under ZeroGPU there is no GPU outside requests: the model
is downloaded and put on `cuda` at import (ZeroGPU's convention) and warm-up is left to the first
request, and `zero_gpu` gives `spaces.GPU` a duration that follows each request's work.

Hardware and Hub access are plain values (`Hardware`, `HubAccess`) so that tests describe a
machine instead of patching torch.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ear import hub
from ear.app_support import NUM_IMAGES, ZOOM_ROUNDS
from ear.engine import kv_cache_bytes_per_row
from ear.model import EAR, EARConfig
from ear.order import SCHEDULES, make_schedule
from ear.pipeline import ZOOM_TRANSITION, EARPipeline

log = logging.getLogger(__name__)

RELEASED = ("EAR-adaLN-XL", "EAR-adaLN-L", "EAR-adaLN-B")  # largest first
CONCURRENT_REQUESTS = 2  # app.py's CONCURRENCY_LIMIT: generations that share the GPU at once
BF16, FP32 = 2, 4  # bytes per value: the EAR runs in bfloat16 on CUDA, the tokenizer in float32
DECODE_BYTES_PER_IMAGE = 64 * 2**20  # tokenizer decode activations per image (generous)
RESERVED_BYTES = 3 * 2**29  # 1.5 GiB: CUDA context, cuBLAS workspace, allocator fragmentation
FLAT_STD = 2.0  # a warm-up picture whose every channel varies less than this (of 255) is flat


@dataclass(frozen=True)
class Hardware:
    """What start-up needs to know about the machine."""

    cuda: bool
    gpu_name: str = ""
    gpu_bytes: int = 0
    zero_gpu: bool = False

    @classmethod
    def detect(cls, env: Mapping[str, str] = os.environ) -> Hardware:
        """This machine. Under ZeroGPU, `spaces` makes torch report the GPU slice every request
        gets (it must be imported first, as app.py does)."""
        zero = (env.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")
                and importlib.util.find_spec("spaces") is not None)
        if not torch.cuda.is_available():
            return cls(cuda=False, zero_gpu=zero)
        props = torch.cuda.get_device_properties(0)
        return cls(cuda=True, gpu_name=props.name, gpu_bytes=props.total_memory, zero_gpu=zero)

    def __str__(self) -> str:
        if not self.cuda:
            return "no CUDA GPU"
        zero = " (ZeroGPU)" if self.zero_gpu else ""
        return f"{self.gpu_name or 'CUDA GPU'}, {self.gpu_bytes / 1e9:.1f} GB{zero}"


@dataclass(frozen=True)
class HubAccess:
    """Whether the Hub can be asked for files, and which registry models are fully cached."""

    online: bool
    cached: frozenset[str] = frozenset()

    @classmethod
    def detect(cls) -> HubAccess:
        return cls(hub.hub_online(), frozenset(s.name for s in hub.list_models() if s.status == "cached"))

    def obtainable(self, name: str) -> bool:
        return self.online or name in self.cached


@dataclass(frozen=True)
class Choice:
    name: str
    reason: str


def _count_params(factory: Callable[[], torch.nn.Module]) -> int:
    """Parameters of the module `factory` builds, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        module = factory()
    return sum(p.numel() for p in module.parameters())


@cache
def _released_params(size: str | None) -> int:
    """Parameters of EAR-adaLN-`size`, or of the XQGAN-8192 tokenizer for None."""
    from ear.tokenizer.xqgan import XQGAN, XQGANConfig

    if size is None:
        return _count_params(partial(XQGAN, XQGANConfig()))
    return _count_params(partial(EAR, EARConfig.official(size)))


def kv_cache_rows(images: int, concurrent: int = CONCURRENT_REQUESTS, orders: int = len(SCHEDULES)) -> int:
    """KV-cache rows the decode runner (ear.engine) may keep at once. It pools one cache per
    order, batch bucket (powers of two) and guided-or-not for every request in flight: up to
    `images` images that is buckets 1 + 2 + ... + B unguided and twice that guided (CFG doubles
    the rows), plus one guided image for each other order of the Compare tab."""
    if images < 1:
        return 0
    buckets = 2 * (1 << (images - 1).bit_length()) - 1
    return concurrent * (3 * buckets + 2 * (orders - 1))


def gpu_bytes_needed(size: str, images: int = int(NUM_IMAGES.hi),
                     concurrent: int = CONCURRENT_REQUESTS) -> int:
    """GPU memory a released model needs when `concurrent` requests of up to `images` images
    have run: bfloat16 weights, the float32 tokenizer, the pooled KV caches (keys and values,
    grid² + 1 slots per layer and row), tokenizer decode activations and a fixed reserve.
    At 8 images x 2: XL 2.2 + 0.7 + 4.8 + 1.1 + 1.6 = 10.4 GB, L 6.9 GB, B 4.6 GB."""
    row = kv_cache_bytes_per_row(EARConfig.official(size), torch.bfloat16)
    return (_released_params(size) * BF16 + _released_params(None) * FP32
            + kv_cache_rows(images, concurrent) * row
            + concurrent * images * DECODE_BYTES_PER_IMAGE + RESERVED_BYTES)


def choose(hardware: Hardware, access: Callable[[], HubAccess], override: str | None = None) -> Choice:
    """The model the page opens on. `access` is only called when it matters (it may take a DNS
    lookup): with a GPU and no override."""
    if override:
        return Choice(override, "EAR_STUDIO_MODEL")
    if not hardware.cuda:
        return Choice(hub.DEFAULT_MODEL, "the bundled model, made for CPUs")
    fits = [n for n in RELEASED if gpu_bytes_needed(n.rsplit("-", 1)[1]) <= hardware.gpu_bytes]
    if not fits:
        return Choice(hub.DEFAULT_MODEL, f"the GPU is too small for {RELEASED[-1]} "
                                         f"({gpu_bytes_needed('B') / 1e9:.1f} GB needed)")
    hub_access = access()
    for name in fits:
        if hub_access.obtainable(name):
            how = "Hub reachable" if hub_access.online else "cached"
            return Choice(name, f"the largest released model that fits the GPU; {how}")
    return Choice(hub.DEFAULT_MODEL, f"the Hub cannot be reached and none of {', '.join(fits)} is cached")


class LoggedProgress(tqdm):
    """A tqdm for `hf_hub_download` that logs a line every 10 % instead of redrawing a bar:
    Space logs keep every carriage-return redraw as a line of its own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("name", None)
        super().__init__(*args, **{**kwargs, "disable": False, "file": open(os.devnull, "w")})  # noqa: SIM115
        self._logged = -1

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        if self.total:
            tenth = min(10, int(10 * self.n / self.total))
            if tenth > self._logged:
                self._logged = tenth
                log.info("download %s: %.2f / %.2f GB (%d %%)", self.desc, self.n / 1e9, self.total / 1e9,
                         10 * tenth)
        return shown

    def close(self) -> None:
        file = self.fp
        super().close()
        file.close()


def check_sample(image: Any) -> None:
    """ValueError if the warm-up picture is one flat colour (broken weights or decoder)."""
    pixels = np.asarray(image, dtype=np.float32).reshape(-1, 3)
    if not np.isfinite(pixels).all() or pixels.std(axis=0).max() < FLAT_STD:
        raise ValueError("its warm-up sample is one flat colour")


def warm_up(pipe: EARPipeline, check: bool = True) -> None:
    """One short generation through the path visitors use (previews every step, which also
    finds the preview fill token); with a fast engine, its first run triggers graph capture.
    `check`: ValueError if the picture is one flat colour."""
    last = None
    for last in pipe.stream(pipe.default_class, seed=0):  # noqa: B007
        pass
    assert last is not None
    if check:
        check_sample(last.images[0])


@dataclass
class Started:
    name: str
    pipeline: EARPipeline
    reason: str
    seconds: float


Loader = Callable[[str], EARPipeline]


def _ensure_log_output() -> None:
    """Start-up lines must reach a Space's log even when nobody configured logging."""
    if not log.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("ear-studio: %(message)s"))
        log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)


def start(hardware: Hardware | None = None, access: Callable[[], HubAccess] = HubAccess.detect,
          env: Mapping[str, str] = os.environ, load: Loader = EARPipeline.from_pretrained,
          download: Callable[..., list[Path]] = hub.download) -> Started:
    """Choose, download, load and (on dedicated GPUs) warm up the page's first model; on any
    failure log one line and return `ear-emoji` instead. EAR_STUDIO_WARMUP=0 skips warm-up."""
    _ensure_log_output()
    began = time.perf_counter()
    hardware = hardware or Hardware.detect(env)
    choice = choose(hardware, access, env.get("EAR_STUDIO_MODEL") or None)
    log.info("start-up: %s; opening on %s (%s)", hardware, choice.name, choice.reason)
    warm = hardware.cuda and not hardware.zero_gpu and env.get("EAR_STUDIO_WARMUP", "1") != "0"
    pipe, failure = None, ""
    try:
        pipe = _prepare(choice.name, load, download, warm)
    except Exception as err:  # anything at all: the page must still open
        if choice.name == hub.DEFAULT_MODEL:
            raise
        failure = _why(err)  # leaving this clause drops the traceback and the failed model with it
    if pipe is None:
        log.warning("start-up: %s could not be used (%s); the page opens on %s instead.",
                    choice.name, failure, hub.DEFAULT_MODEL)
        _release_gpu_memory()
        choice = Choice(hub.DEFAULT_MODEL, f"fallback: {choice.name} could not be used")
        pipe = load(choice.name)
    seconds = time.perf_counter() - began
    log.info("start-up: ready on %s after %.1f s", choice.name, seconds)
    return Started(choice.name, pipe, choice.reason, seconds)


def _prepare(name: str, load: Loader, download: Callable[..., list[Path]], warm: bool) -> EARPipeline:
    entry = hub.REGISTRY.get(name)
    if (entry is not None and not entry.bundled) or hub.is_repo_id(name):
        began = time.perf_counter()
        download(name, progress=LoggedProgress)
        log.info("start-up: %s files ready in %.1f s", name, time.perf_counter() - began)
    began = time.perf_counter()
    pipe = load(name)
    log.info("start-up: %s loaded on %s in %.1f s", name, pipe.device, time.perf_counter() - began)
    if warm:  # the bundled model is known to draw pictures; anything else is checked
        began = time.perf_counter()
        warm_up(pipe, check=name != hub.DEFAULT_MODEL)
        log.info("start-up: warm-up generation in %.1f s", time.perf_counter() - began)
    return pipe


def _why(err: BaseException) -> str:
    text = " ".join(str(err).split())[:300]
    return text if isinstance(err, ValueError) and text else f"{type(err).__name__}: {text}"


def _release_gpu_memory() -> None:
    """The failed model's tensors are garbage by now; hand their cached blocks back."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# ---- ZeroGPU: how long each request may hold the GPU ---------------------------------------------
# Estimates (no GPU was lent while this was written; bench/bench_startup.py measures the real
# times): each EAR step costs a fixed 20 ms of launches and sampling plus 30 ms per billion
# parameters, each image 30 ms per step for its preview decode and PNG frame, and each request
# 10 s for ZeroGPU attaching the GPU, moving the weights and writing the animation.

REQUEST_S = 10.0
STEP_S = 0.02
STEP_S_PER_BILLION = 0.03
IMAGE_STEP_S = 0.03
MAX_GPU_S = 120  # a longer reservation would only push this Space's visitors down the queue


def gpu_seconds(params: int, steps: int, images: int = 1, extra_frames: int = 0) -> int:
    """Seconds to ask ZeroGPU for: `steps` EAR steps of a `params`-parameter model on `images`
    images, plus `extra_frames` frames drawn without the model (zoom-out transitions)."""
    per_step = STEP_S + STEP_S_PER_BILLION * params / 1e9 + images * IMAGE_STEP_S
    seconds = REQUEST_S + steps * per_step + extra_frames * images * IMAGE_STEP_S
    return min(MAX_GPU_S, math.ceil(seconds))


@lru_cache(maxsize=16)
def _model_facts(name: str | None, offered: str | None) -> tuple[int, int, str]:
    """(parameters, grid size, trained schedule) of a model the page offers, read without loading
    it: a registry entry, or the `offered` EAR_STUDIO_MODEL folder or repo (never a path a client
    made up). Anything else is budgeted as the largest released model; its handler refuses it."""
    entry = hub.REGISTRY.get(name or "")
    config = EARConfig.official(RELEASED[0].rsplit("-", 1)[1])
    try:
        if entry is not None and entry.ear_config is not None:
            config = entry.ear_config()
        elif entry is not None or (name and name == offered):
            if entry is not None and entry.bundled:
                config_file: Path | None = hub.ASSETS / entry.bundled / hub.OWN_FILES["config"]
            elif hub.is_repo_id(str(name)):
                config_file = hub.cached_path(hub.HubFile(str(name), hub.OWN_FILES["config"]))
            else:
                config_file = Path(str(name)) / hub.OWN_FILES["config"]
            config = EARConfig.from_dict(json.loads(config_file.read_text(encoding="utf-8"))["model"])
    except (AttributeError, OSError, KeyError, TypeError, ValueError):  # no path, missing, bad JSON
        pass
    return _count_params(partial(EAR, config)), config.grid_size, config.schedule


def _count(value: Any, lo: float, hi: float, missing: int) -> int:
    """A request's count as the handler will see it, clamped; what the handler will refuse
    anyway gets `missing`, since that request ends at once."""
    if value is None:
        return missing
    try:
        return int(min(hi, max(lo, float(value))))
    except (TypeError, ValueError, OverflowError):
        return missing


def request_duration(handler: Callable[..., Any], total_steps: Callable[[int, str], int] | None = None
                     ) -> Callable[..., int]:
    """A `spaces.GPU(duration=...)` callable for `handler`: it receives the handler's arguments
    and reads `model`, `num_images` and `zoom_rounds` by name. `total_steps`: the handler runs one
    image in several ways (the Compare tab), `total_steps(grid, trained order)` steps in all."""
    signature = inspect.signature(handler)

    def duration(*args: Any, **kwargs: Any) -> int:
        try:
            request = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            request = {}
        name = str(request.get("model") or "") or None
        params, grid, trained = _model_facts(name, os.environ.get("EAR_STUDIO_MODEL"))
        if total_steps is not None:
            return gpu_seconds(params, total_steps(grid, trained))
        images = _count(request.get("num_images"), NUM_IMAGES.lo, NUM_IMAGES.hi, 1)
        rounds = max(1, _count(request.get("zoom_rounds"), ZOOM_ROUNDS.lo, ZOOM_ROUNDS.hi, 1))
        steps = make_schedule(trained, grid).num_steps
        return gpu_seconds(params, rounds * steps, images, (rounds - 1) * ZOOM_TRANSITION)

    return duration


def zero_gpu(spaces_module: Any | None) -> Callable[..., Any]:
    """app.py's `@gpu` / `@gpu(total_steps=...)`: `spaces.GPU` with a duration that follows the
    request (a no-op off ZeroGPU, where `spaces.GPU` returns the handler itself); the plain
    handler when `spaces` is not installed."""

    def gpu(handler: Callable[..., Any] | None = None, *,
            total_steps: Callable[[int, str], int] | None = None) -> Any:
        if handler is None:
            return partial(gpu, total_steps=total_steps)
        if spaces_module is None:
            return handler
        return spaces_module.GPU(handler, duration=request_duration(handler, total_steps))

    return gpu
