"""What nested refinement (ear/refine.py) costs in the decode loop, against EAR's own order.

Times the decode loop only (token grids; the tokenizer's decode excluded) of the bundled model's
weights in three arms, in one run and interleaved: its own `arms` order (31 steps), the `radar`
rings (13 steps) without refinement, and with it. The bundled model has no correction training,
so it is loaded with `correction` switched on for timing only (the same weights: the head is
shared): refinement's work per step does not depend on what it corrects (static shapes), so its
cost is measured here; its quality needs a model trained with `--correction`.

    python bench/bench_refine.py                      # bundled model, batches 1 and 16
    python bench/bench_refine.py --model FOLDER --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ear import hub
from ear.model import EAR
from ear.order import make_schedule
from ear.sampler import generate

ARMS = {"ear": ("arms", False), "radar_norefine": ("radar", False), "radar": ("radar", True)}


def timed(model: EAR, batch: int, schedule: str, refine: bool, seed: int) -> float:
    started = time.perf_counter()
    generate(model, [i % model.config.num_classes for i in range(batch)], seed=seed, temperature=1.0,
             schedule=make_schedule(schedule, model.config.grid_size), refine=refine)
    return (time.perf_counter() - started) / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=hub.DEFAULT_MODEL)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median counts")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = hub.load(args.model).model
    model = EAR(replace(loaded.config, correction=True)).eval()
    model.load_weights(loaded.state_dict())
    out: dict[str, dict] = {name: {"steps": make_schedule(s, model.config.grid_size).num_steps}
                            for name, (s, _) in ARMS.items()}
    for batch in args.batches:
        for schedule, refine in ARMS.values():  # warm-up: plans, prepared weights, kernels
            timed(model, batch, schedule, refine, 0)
        times: dict[str, list[float]] = {name: [] for name in ARMS}
        for r in range(args.rounds):
            for name, (schedule, refine) in ARMS.items():
                times[name].append(timed(model, batch, schedule, refine, r + 1))
        for name in ARMS:
            out[name][f"s_per_image_b{batch}"] = statistics.median(times[name])
        base = out["ear"][f"s_per_image_b{batch}"]
        print(f"batch {batch}: " + ", ".join(
            f"{name} ({out[name]['steps']} steps) {out[name][f's_per_image_b{batch}'] * 1e3:.1f} ms/image, "
            f"{base / out[name][f's_per_image_b{batch}']:.2f}x" for name in ARMS), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
