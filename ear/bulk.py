"""Bulk sampling for evaluation: N images per class, spread over processes, resumable, one npz.

Image j of a run has class `labels[j]` and its randomness from (seed, j) alone (the sampler's
per-row keys), so how the indices are split over processes does not change any picture. The
work is cut into chunks of `chunk` consecutive indices, one forward batch each; a chunk is
written to the run's folder (atomically) the moment it is finished, so an interrupted run that
is started again skips every finished chunk. Chunk i goes to rank i mod world among the chunks
still to do; with the same chunk size every forward batch is the same on 1 or N processes, so
the files are identical bit for bit. At the end the first rank checks that the chunks cover every
index with the planned labels and shape and writes the npz the ImageNet evaluator reads.

The run's folder must be one that every process sees (on several machines: a shared filesystem);
this is checked before any sampling.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from tqdm import tqdm

from ear.app_support import threads_per_request
from ear.engine import kv_cache_bytes_per_row
from ear.images import atomic_output, save_image
from ear.model import EAR
from ear.npz import write_npz
from ear.pipeline import EARPipeline
from ear.sampler import SamplingParams, generate

PLAN_FILE = "plan.json"
SEEN_FILE = ".seen"  # proof that every process sees the folder
PLAN_FORMAT = "ear-studio/bulk-1"
CHUNK_NAME = re.compile(r"chunk-(\d+)-(\d+)\.npz")
# Pixel decoders hold ~100x more activation per image than the sampler: decode in slices.
DECODE_SLICE = 64
CPU_BATCH = 32  # past ~32 rows a CPU forward no longer gets cheaper per image
MAX_BATCH = 1024  # a GPU is saturated long before; larger only delays the first chunk


@dataclass(frozen=True)
class Plan:
    """Everything that decides the pictures; two runs with equal plans write equal files."""

    model: str
    dtype: str
    schedule: str
    classes: tuple[int, ...]
    per_class: int
    seed: int
    settings: SamplingParams
    image_size: int
    style: str | None = None  # a model with styles: all images in it, or None: they alternate

    @property
    def total(self) -> int:
        return len(self.classes) * self.per_class

    @property
    def labels(self) -> np.ndarray:
        """Class of every global index: each class's images are consecutive."""
        return np.repeat(np.asarray(self.classes, dtype=np.int64), self.per_class)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    @classmethod
    def of(cls, pipe: EARPipeline, classes: tuple[int, ...], per_class: int, seed: int,
           settings: SamplingParams, style: str | None = None) -> Plan:
        return cls(pipe.name, str(pipe.dtype).removeprefix("torch."), pipe.model.schedule.name, classes,
                   per_class, seed, settings, pipe.tokenizer.image_size, style)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "classes": list(self.classes), "format": PLAN_FORMAT}


def chunk_ranges(total: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(total, a + chunk)) for a in range(0, total, chunk)]


def parse_classes(spec: str | None, pipe: EARPipeline) -> tuple[int, ...]:
    """'0,1,2', '0-9,20' or class names without commas -> class ids (None: every class)."""
    if spec is None:
        return tuple(range(len(pipe.class_names)))
    ids: list[int] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            raise ValueError(f"--classes has an empty item in {spec!r}; separate classes by single commas.")
        bounds = re.fullmatch(r"(\d+)-(\d+)", item)
        if bounds:
            first, last = pipe.class_id(int(bounds[1])), pipe.class_id(int(bounds[2]))
            if last < first:
                raise ValueError(f"--classes range {item!r} runs backwards; write it as {last}-{first}.")
            ids.extend(range(first, last + 1))
        else:
            ids.append(pipe.class_id(item))
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"--classes names class {repeated[0]} more than once; each class is sampled "
                         f"--per-class times already.")
    return tuple(ids)


def image_bytes(model: EAR, guided: bool) -> int:
    """What one image holds on the GPU at the peak: its rows' KV cache for every layer and the
    float32 logits of the largest step with their softmax/sort copies, plus the two logits buffers
    its CUDA graphs write; a refined step's logits also cover the part it checks, and its graphs
    write two buffers of their own (bulk sampling refines wherever the model can, as the pipeline
    does)."""
    cfg = model.config
    rows = 2 if guided else 1
    kv = kv_cache_bytes_per_row(cfg, model.output.weight.dtype)
    widest_logits = max(model.schedule.sizes) * cfg.vocab_size * 4
    step_logits = 2 * widest_logits if cfg.correction else widest_logits
    graphed = 2 * widest_logits + (2 * step_logits if cfg.correction else 0)
    return rows * (kv + 4 * step_logits) + graphed


def fitting_batch(model: EAR, guided: bool, device: torch.device) -> int:
    """The largest per-process batch worth running. On CUDA: free memory after loading over
    `image_bytes`, with a fifth kept free for the decoder and the allocator, rounded down to a
    power of two; on the CPU a fixed size (no faster beyond it)."""
    if device.type != "cuda":
        return CPU_BATCH
    per_image = image_bytes(model, guided)
    free, _total = torch.cuda.mem_get_info(device)
    fits = max(1, min(MAX_BATCH, int(0.8 * free) // per_image))
    return 1 << (fits.bit_length() - 1)  # the engine pads CUDA batches up to a power of two


class ChunkStore:
    """The run's folder: plan.json plus one `chunk-A-B.npz` (images A..B-1) per finished chunk."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, a: int, b: int) -> Path:
        return self.folder / f"chunk-{a:07d}-{b:07d}.npz"

    def done(self) -> set[tuple[int, int]]:
        if not self.folder.is_dir():
            return set()
        found = (CHUNK_NAME.fullmatch(p.name) for p in self.folder.iterdir())
        return {(int(m[1]), int(m[2])) for m in found if m}

    def write(self, a: int, b: int, images: np.ndarray, labels: np.ndarray) -> None:
        with atomic_output(self.path(a, b)) as tmp:
            np.savez(tmp, images=images, labels=labels)

    def read(self, a: int, b: int, plan: Plan) -> np.ndarray:
        """A finished chunk's images, checked against the plan."""
        path = self.path(a, b)
        try:
            with np.load(path) as data:
                images, labels = data["images"], data["labels"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path} is damaged ({err}); delete it and run again to redo it.") from None
        if images.shape != (b - a, *plan.image_shape) or images.dtype != np.uint8 \
                or not np.array_equal(labels, plan.labels[a:b]):
            raise ValueError(f"{path} does not hold images {a}..{b - 1} of this run (shape "
                             f"{images.shape}); delete it and run again to redo it.")
        return images

    def open(self, plan: Plan, chunk: int) -> int:
        """Start or resume: write plan.json, or check that the folder holds this same plan.
        Returns the chunk size in force (the first run's, so that resumed chunks line up)."""
        planned = plan.to_json()
        file = self.folder / PLAN_FILE
        if file.is_file():
            stored = json.loads(file.read_text())
            differs = [k for k in planned if stored.get(k) != planned[k]]
            if differs:
                key = differs[0]
                raise ValueError(f"{self.folder} holds another run ({key} {stored.get(key)!r}, now "
                                 f"{planned[key]!r}): give another --work-dir or delete that folder.")
            return int(stored["chunk"])
        if self.folder.exists() and any(self.folder.iterdir()):
            raise ValueError(f"{self.folder} is not empty and holds no {PLAN_FILE}: give another --work-dir.")
        self.folder.mkdir(exist_ok=True)
        with atomic_output(file) as tmp:
            tmp.write_text(json.dumps({**planned, "chunk": chunk}, indent=1))
        return chunk

    def remove(self) -> None:
        """Delete the chunks, the plan and stale temporaries (ours only), then the folder."""
        for p in self.folder.iterdir():
            if CHUNK_NAME.fullmatch(p.name) or p.name in (PLAN_FILE, SEEN_FILE) \
                    or p.name.startswith((".chunk-", ".plan.")):
                p.unlink()
        if not any(self.folder.iterdir()):
            self.folder.rmdir()


def _decode(pipe: EARPipeline, tokens: torch.Tensor) -> np.ndarray:
    renderer = pipe.renderer(pipe.tokenizer.image_size, outline=False)
    return np.concatenate([renderer.decode(tokens[i:i + DECODE_SLICE])
                           for i in range(0, tokens.shape[0], DECODE_SLICE)])


def sample_range(pipe: EARPipeline, plan: Plan, a: int, b: int, batch: int) -> np.ndarray:
    """Images a..b-1 of the plan as (b-a, H, W, 3) uint8, in forward batches of at most `batch`."""
    parts = []
    for start in range(a, b, batch):
        stop = min(b, start + batch)
        labels = pipe.labels(plan.labels[start:stop].tolist(), plan.style, plan.seed, first_row=start)
        with torch.inference_mode():
            tokens = generate(pipe.model, labels, seed=plan.seed, row_ids=torch.arange(start, stop),
                              refine=pipe.can_refine, **asdict(plan.settings))  # as the pipeline does
            parts.append(_decode(pipe, tokens))
    return np.concatenate(parts)


def write_pngs(folder: Path, chunks: Iterable[tuple[int, np.ndarray]], labels: np.ndarray) -> None:
    """One PNG per image, `{index:06d}-{class}.png`, each written atomically."""
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for start, images in chunks:
        for j, pixels in enumerate(images, start):
            save_image(Image.fromarray(pixels), folder / f"{j:06d}-{labels[j]}.png")


@dataclass
class Outputs:
    npz: Path | None
    png_dir: Path | None
    work_dir: Path


def _distributed_open(state: PartialState, store: ChunkStore, plan: Plan, batch: int
                      ) -> tuple[int, list[tuple[int, int]]]:
    """Rank 0 opens the folder and lists what is left; every rank gets the same answer (or the
    same error, so that no rank waits forever for one that gave up) and proves it sees the folder."""
    answer: list[Any] = [None]
    if state.is_main_process:
        try:
            chunk = store.open(plan, batch)
            done = store.done()
            todo = [r for r in chunk_ranges(plan.total, chunk) if r not in done]
            answer = [(chunk, todo, uuid.uuid4().hex)]
            (store.folder / SEEN_FILE).write_text(answer[0][2])
        except (ValueError, OSError) as err:
            answer = [str(err)]
    if state.num_processes > 1:
        broadcast_object_list(answer)
    if isinstance(answer[0], str):
        raise ValueError(answer[0])
    chunk, todo, token = answer[0]
    seen = store.folder / SEEN_FILE
    sees = seen.is_file() and seen.read_text() == token
    if not all(gather_object([sees]) if state.num_processes > 1 else [sees]):
        raise ValueError(f"not every process sees {store.folder}: on several machines --work-dir must be "
                         f"on a filesystem they all share.")
    state.wait_for_everyone()
    if state.is_main_process:
        seen.unlink()
    return chunk, todo


def _progress(state: PartialState, store: ChunkStore, total: int, quiet: bool) -> tqdm:
    done = sum(b - a for a, b in store.done())
    return tqdm(total=total, initial=done, unit="image", disable=quiet or not state.is_main_process,
                file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def _update(bar: tqdm, store: ChunkStore) -> None:
    """Every rank's finished chunks, as seen on disk: the bar counts the whole run's images."""
    if not bar.disable:
        bar.update(sum(b - a for a, b in store.done()) - bar.n)


def run(pipe: EARPipeline, plan: Plan, outputs: Outputs, batch: int, state: PartialState,
        quiet: bool = False) -> bool:
    """Sample this process's share of the plan, then (on the first rank) assemble the outputs.
    Returns True on the process that wrote them."""
    store = ChunkStore(outputs.work_dir)
    chunk, todo = _distributed_open(state, store, plan, batch)
    mine = todo[state.process_index::state.num_processes]
    started = time.perf_counter()
    already = plan.total - sum(b - a for a, b in todo)
    if state.is_main_process and already:
        print(f"resuming: {already} of {plan.total} images already done in {store.folder}", file=sys.stderr)
    with _progress(state, store, plan.total, quiet) as bar:
        labels = plan.labels
        for a, b in mine:
            store.write(a, b, sample_range(pipe, plan, a, b, min(batch, chunk)), labels[a:b])
            _update(bar, store)
        while not bar.disable and bar.n < plan.total:  # the other ranks' last chunks
            time.sleep(0.2)
            _update(bar, store)
    state.wait_for_everyone()
    state.destroy_process_group()  # assembly needs no collectives; NCCL warns at exit otherwise
    if not state.is_main_process:
        return False
    seconds = time.perf_counter() - started
    sampled = sum(b - a for a, b in todo)
    print(f"sampled {sampled} images in {seconds:.1f} s ({sampled / max(seconds, 1e-9):.2f} images/s on "
          f"{state.num_processes} process{'es' if state.num_processes > 1 else ''})", file=sys.stderr)
    assemble(plan, store, chunk, outputs)
    return True


def assemble(plan: Plan, store: ChunkStore, chunk: int, outputs: Outputs) -> None:
    """Check that the chunks cover 0..N-1 exactly, write the npz and/or PNGs, remove the chunks."""
    ranges = chunk_ranges(plan.total, chunk)
    missing = sorted(set(ranges) - store.done())
    if missing:
        raise ValueError(f"{store.folder} lacks {len(missing)} of the run's {len(ranges)} chunks (the first: "
                         f"images {missing[0][0]}..{missing[0][1] - 1}); run again to finish them.")

    def chunks() -> Iterator[tuple[int, np.ndarray]]:
        for a, b in ranges:
            yield a, store.read(a, b, plan)

    labels = plan.labels
    if outputs.npz is not None:
        write_npz(outputs.npz, (images for _a, images in chunks()), (plan.total, *plan.image_shape), labels)
        print(f"wrote {outputs.npz}")
    if outputs.png_dir is not None:
        write_pngs(outputs.png_dir, chunks(), labels)
        print(f"wrote {plan.total} PNGs to {outputs.png_dir}")
    store.remove()


def default_work_dir(npz: Path | None, png_dir: Path | None) -> Path:
    """Next to the output: samples.npz -> samples.parts/."""
    if npz is not None:
        return npz.with_suffix(".parts")
    assert png_dir is not None
    return png_dir.with_name(png_dir.name + ".parts")


def check_writable(folder: Path, what: str) -> None:
    """Fail now, not after hours of sampling, if nothing can be created in `folder`."""
    if not folder.is_dir():
        raise ValueError(f"Cannot write {what}: the folder '{folder}' does not exist.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ear-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"Cannot write {what} in '{folder}': {err.strerror or err}.") from None


def start(device: str | None) -> tuple[PartialState, str | torch.device]:
    """Join the run's process group through accelerate (gloo on the CPU, nccl on GPUs; a plain
    `python -m ear sample` is a group of one) and pick this process's device and thread count:
    the machine's cores shared equally by its processes, unless OMP_NUM_THREADS says otherwise."""
    cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    threads = threads_per_request(int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes)))
    if threads:
        torch.set_num_threads(threads)
    if cpu:
        return state, "cpu"
    return state, state.device if device in (None, "cuda") else device
