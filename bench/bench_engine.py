"""Decode engine benchmark: today's reference path (`engine="reference"`: EAR.forward_positions step
by step with a KV cache) against the decode runner (`ear/engine.py`, the default), in one run, for
the bundled model and the released B/L/XL shapes (random weights). Machines here are noisy, so every
speed-up is a ratio against the reference measured in the same run.

    python bench/bench_engine.py                          # CPU: bundled model and B, batch 1, float32
    python bench/bench_engine.py --models emoji,B,L,XL --device cuda   # GPU: bfloat16, 1/16/128/512

Columns: ms per image at batch 1 and time to the first step (median of --repeats), images/s at the
larger batches, raster-vs-EAR (raster next-token decoding of the same weights, runner, batch 1 and
16), peak memory (CUDA), CUDA-graph capture time, compute ops per layer per step (aten ops that are
not views, as ../shared/tools/opcount.py counts them), and token agreement with the reference
(greedy, float32: whole grids; the other CPU variants of --linears, int8 and bfloat16: top-1 with
the same context). "kernels" counts the float32 kernels the default runner's timing chose for its
linears on this machine. Writes a markdown table to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ear import hub
from ear.engine import configure
from ear.model import EAR, EARConfig
from ear.order import make_schedule
from ear.sampler import UNKNOWN, decode, generate, sample
from tests.helpers import noisy_weights

VIEWS = frozenset({"view", "_unsafe_view", "transpose", "expand", "slice", "select", "unsqueeze", "squeeze",
                   "t", "split", "split_with_sizes", "detach", "alias", "permute", "unflatten", "as_strided",
                   "chunk", "reshape", "flatten", "unbind", "_reshape_alias", "lift_fresh", "empty",
                   "empty_like", "empty_strided"})


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ not in VIEWS
        return func(*args, **(kwargs or {}))


def build(name: str, device: torch.device, dtype: torch.dtype) -> tuple[EAR, float]:
    """The bundled model as shipped, or a released shape with loud random weights (std 0.02
    everywhere, seeded, so the logits are not all equal), and its default CFG scale."""
    if name == "emoji":
        loaded = hub.load("ear-emoji")
        return loaded.model.to(device=device, dtype=dtype).eval(), loaded.presets["default"]["cfg_scale"]
    with torch.device(device):  # built where it runs: XL is 4.4 GB in float32
        model = EAR(EARConfig.official(name))
    return noisy_weights(model, 0.02).to(device=device, dtype=dtype).eval(), 1.5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(model: EAR, batch: int, cfg: float, repeats: int, warm_up: bool = True,
          **kwargs) -> tuple[float, float]:
    """Median (seconds per generate call, seconds to the first step) over `repeats` calls, after
    one untimed call unless `warm_up` is False."""
    device = model.output.weight.device
    ids = torch.arange(batch) % model.config.num_classes
    totals, firsts = [], []
    for i in range(int(not warm_up), repeats + 1):  # call 0 warms up (and captures graphs)
        _sync(device)
        start = time.perf_counter()
        stream = sample(model, ids, cfg_scale=cfg, seed=i, **kwargs)
        next(stream)
        first = time.perf_counter() - start
        for _ in stream:
            pass
        _sync(device)
        if i:
            totals.append(time.perf_counter() - start)
            firsts.append(first)
    return statistics.median(totals), statistics.median(firsts)


def ops_per_layer_step(model: EAR, cfg: float, **kwargs) -> float:
    generate(model, [0], cfg_scale=cfg, seed=0, **kwargs)
    with _Ops() as ops:
        generate(model, [0], cfg_scale=cfg, seed=0, **kwargs)
    return ops.count / model.schedule.num_steps / model.config.n_layer


def greedy_agreement(model: EAR, cfg: float, classes: int) -> float:
    ids = list(range(classes))
    ref = generate(model, ids, greedy=True, cfg_scale=cfg, engine="reference")
    return (generate(model, ids, greedy=True, cfg_scale=cfg) == ref).float().mean().item()


def teacher_forced(model: EAR, cfg: float, ids: list[int],
                   reference: EAR | None = None) -> tuple[float, float, float]:
    """Given the same context (the greedy tokens of `reference`, by default the model's own
    reference path): `model`'s top-1 agreement with those tokens, and its largest absolute and
    relative logits error. Free-running grids part ways after their first differing token, so
    this is the fair comparison for int8 or bfloat16."""
    engine = "reference" if reference is None else "runner"
    reference = reference or model
    target = generate(reference, ids, greedy=True, cfg_scale=cfg, engine=engine).flatten(1)
    sched = reference.schedule
    b, target = sched.boundaries, target[:, list(sched.order)]

    def teacher(k: int, logits: torch.Tensor) -> torch.Tensor:
        return target[:, b[k]:b[k + 1]].to(logits.device)

    class_ids = torch.tensor(ids)
    agree, err, scale = [], 0.0, 0.0
    for (k, ref, _), (_, got, _) in zip(decode(reference, class_ids, teacher, cfg_scale=cfg, engine=engine),
                                        decode(model, class_ids, teacher, cfg_scale=cfg), strict=True):
        ref, got = ref.float().cpu(), got.float().cpu()
        agree.append((got.argmax(-1) == teacher(k, got)).flatten())
        err, scale = max(err, (got - ref).abs().max().item()), max(scale, ref.abs().max().item())
    return torch.cat(agree).float().mean().item(), err, err / max(scale, 1e-12)


VARIANTS = ("auto", "plain", "packed", "onednn", "int8", "bf16")  # CPU runner variants


def _variants(model: EAR, device: torch.device, dtype: torch.dtype, linears: list[str],
              known: bool = False) -> list[tuple[str, EAR, str, dict]]:
    """(label, model, linear mode, sample kwargs): the reference, the default runner, with `known`
    the runner given an all-UNKNOWN grid (plain generation) and one known cell (the select runs),
    and, on a float32 CPU, the runner with each kernel of `linears` (bf16: a bfloat16 copy)."""
    out = [("reference", model, "auto", {"engine": "reference"}), ("runner", model, "auto", {})]
    if known:
        g = model.config.grid_size
        empty = torch.full((g, g), UNKNOWN)
        one = empty.clone().flatten()
        one[model.schedule.order[-1]] = 0
        out += [("runner empty mask", model, "auto", {"known": empty}),
                ("runner 1 known cell", model, "auto", {"known": one.view(g, g)})]
    if device.type == "cpu" and dtype == torch.float32:
        for linear in linears:
            if linear == "bf16":
                out.append(("runner bf16", copy.deepcopy(model).to(torch.bfloat16), "auto", {}))
            elif linear != "auto":
                out.append((f"runner {linear}", model, linear, {}))
    return out


def bench_model(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Batch-1 timings interleave the paths (reference, runner, int8, reference, ...) so that a
    change in the machine's load hits them all alike; the rest runs path by path."""
    model, cfg = build(name, device, dtype)
    repeats = args.repeats if name == "emoji" else max(1, args.repeats // 2)
    variants = _variants(model, device, dtype, args.linears, args.known)
    runners = {label: configure(m, linear=linear) for label, m, linear, _ in variants}
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label, *_ in variants}
    for i in range(repeats + 1):  # round 0 warms every path up (and captures graphs)
        for label, m, _, kwargs in variants:
            runners[label].install()
            timing = timed(m, 1, cfg, 1, warm_up=False, **kwargs)
            if i:
                samples[label].append(timing)
    rows, base = [], None
    ids = list(range(args.agreement_classes))
    for label, m, _linear, kwargs in variants:
        runner = runners[label].install()
        seconds = statistics.median(t for t, _ in samples[label])
        first = statistics.median(f for _, f in samples[label])
        row = {"model": name, "path": label, "ms/img b1": seconds * 1e3, "first step ms": first * 1e3,
               "capture s": runner.capture_seconds if label != "reference" else None}
        base = base or seconds
        row["speed-up b1"] = base / seconds
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for batch in args.batches:
            total, _ = timed(m, batch, cfg, 1, **kwargs)
            row[f"img/s b{batch}"] = batch / total
        if device.type == "cuda":
            row["peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
        if label in ("reference", "runner") and (device.type == "cpu" or args.count_ops):
            row["ops/layer/step"] = ops_per_layer_step(m, cfg, **kwargs)
        if label == "runner":
            row["greedy agreement"] = greedy_agreement(m, cfg, args.agreement_classes)
            raster = make_schedule("raster", m.config.grid_size)
            for batch in args.raster_batches:
                ear_s, _ = timed(m, batch, cfg, 1)
                raster_s, _ = timed(m, batch, cfg, 1, schedule=raster)
                row[f"raster/EAR b{batch}"] = raster_s / ear_s
        elif label != "reference":  # top-1 given the same context (float32 reference path)
            row["greedy agreement"] = teacher_forced(m, cfg, ids, None if m is model else model)[0]
        if getattr(runner, "mode", None) == "timed":
            row["kernels"] = _kernel_summary(runner)
        rows.append(row)
        print(json.dumps(row), flush=True)
        runner.release()
    configure(model)
    return rows


def _kernel_summary(runner) -> str:
    """How many of the prepared linears use each kernel, e.g. "onednn 49, packed 12"."""
    w = runner.weights
    linears = [x for layer in w.layers for x in (layer.wqkv, layer.wo, layer.w13, layer.w2)] + [w.head]
    modes = [x.mode for x in linears]
    return ", ".join(f"{k} {modes.count(k)}" for k in sorted(set(modes), key=lambda k: -modes.count(k)))


def _number(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"


def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append("—" if v is None else _number(v) if isinstance(v, float) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default=None, help="comma-separated: emoji,B,L,XL")
    parser.add_argument("--batches", default=None, help="throughput batches (default: 16,128,512 on CUDA)")
    parser.add_argument("--raster-batches", default=None, help="default: 1 on CPU, 1,16 on CUDA")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--linears", default="auto,int8",
                        help=f"CPU float32 runner variants beside the default, from {','.join(VARIANTS)}")
    parser.add_argument("--agreement-classes", type=int, default=None,
                        help="images in the agreement checks (default 8 on CUDA, 2 on a CPU)")
    parser.add_argument("--count-ops", action="store_true", help="count ops on CUDA too")
    parser.add_argument("--known", action="store_true", help="also time the runner with an empty "
                        "known mask and with one known cell (edits), interleaved with the others")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="bench/engine_results.md")
    args = parser.parse_args()
    args.linears = [v for v in args.linears.split(",") if v]
    if set(args.linears) - set(VARIANTS):
        parser.error(f"--linears takes {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    names = (args.models or ("emoji,B,L,XL" if cuda else "emoji,B")).split(",")
    args.batches = [int(b) for b in (args.batches or ("16,128,512" if cuda else "")).split(",") if b]
    args.raster_batches = [int(b) for b in (args.raster_batches or ("1,16" if cuda else "1")).split(",") if b]
    args.agreement_classes = args.agreement_classes or (8 if cuda else 2)
    machine = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {machine}, {dtype}, torch {torch.__version__}", flush=True)
    rows = [row for name in names for row in bench_model(name, args, device, dtype)]
    table = f"Machine: {machine}; {dtype}; `{' '.join(sys.argv)}`\n\n" + markdown(rows) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table, encoding="utf-8")
    print("\n" + table)
    print(f"wrote {args.out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
