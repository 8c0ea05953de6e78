"""Sampler speed: EAR with a KV cache vs EAR recomputing the whole prefix every step vs classic
raster next-token decoding (same transformer, with a cache). All rows come from one run, and the
ratios are against EAR-with-cache measured in that same run, because machines here are noisy.

    python bench/bench_sampler.py                       # CPU, small config
    python bench/bench_sampler.py --device cuda          # released B/L/XL shapes, bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ear.model import EAR, EARConfig
from ear.order import make_schedule
from ear.sampler import generate

VARIANTS = (("EAR arms + KV cache", "arms", True), ("EAR arms, no cache", "arms", False),
            ("raster next-token + KV cache", "raster", True))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variant(model: EAR, batch: int, schedule_name: str, use_cache: bool, cfg: float,
                 repeats: int) -> float:
    """Median seconds for one generate() call of `batch` images."""
    device = model.output.weight.device
    schedule = make_schedule(schedule_name, model.config.grid_size)
    ids = torch.arange(batch) % model.config.num_classes
    run = lambda: generate(model, ids, cfg_scale=cfg, schedule=schedule, use_cache=use_cache, seed=0)  # noqa: E731
    run()  # warm-up: allocator, kernels, layout tables
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(model: EAR, label: str, batches: list[int], cfg: float, repeats: int) -> None:
    print(f"\n## {label}: {model.num_params() / 1e6:.1f}M parameters, "
          f"{model.output.weight.dtype}, {model.output.weight.device}, cfg {cfg}")
    print("| variant | batch | forwards/image | s/image | images/s | x slower than EAR+cache |")
    print("|---|---|---|---|---|---|")
    for batch in batches:
        base = None
        for name, schedule_name, use_cache in VARIANTS:
            seconds = time_variant(model, batch, schedule_name, use_cache, cfg, repeats)
            base = base or seconds
            steps = make_schedule(schedule_name, model.config.grid_size).num_steps
            print(f"| {name} | {batch} | {steps} | {seconds / batch:.4f} | {batch / seconds:.2f} | "
                  f"{seconds / base:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--cfg", type=float, default=1.5, help="guidance scale (doubles the batch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="B,L,XL", help="released shapes to time with --device cuda")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    if args.device == "cpu":
        config = EARConfig(dim=256, n_layer=6, n_head=8, vocab_size=1024, num_classes=64)
        bench(EAR(config).eval(), "small CPU config (dim 256, 6 layers, 1024 codes)", batches,
              args.cfg, args.repeats)
        return
    if not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch sees no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    for size in args.sizes.split(","):
        model = EAR(EARConfig.official(size)).to("cuda", torch.bfloat16).eval()
        for p in model.parameters():  # random weights: the zero-initialised head would make ties
            p.data.normal_(0, 0.02)
        bench(model, f"EAR-adaLN-{size} shapes, random weights", batches, args.cfg, args.repeats)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
