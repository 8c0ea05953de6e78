"""RadAR against EAR (issue 21): the EAR model on its 31-step `arms` order, and the RadAR model on
its own rings (the bundled one's: 9 squares) with nested refinement (`ear/refine.py`) and without,
side by side in one run.

    python bench/bench_refine.py --quick --json bench/refine_results.json   # < 8 min, 2 cores
    python bench/bench_refine.py --samples-per-class 4 --threshold 0.2      # full run, another threshold

Speed is the decode loop only (`EARPipeline.states` run to the end: token grids, the tokenizer's
decode excluded), per image at batch 1 and 16, the three arms interleaved per round, medians; the
ratios against `ear` are measured in the same run. Quality at --temperature, where a ring's
parallel draws disagree more than EAR's few tokens per step: retrieval top-1 and emoji-FID
(`ear.train.evaluate.Ruler`, the tokenizer's feature space) of `samples_per_class` images of every
class, same seeds for every arm. `corrected_share` is the share of the refined arm's drawn tokens
that the correction replaced. Both models must share their classes (the bundled data); `--radar`
must have the correction head (`EARConfig.correction`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ear.images import to_uint8
from ear.pipeline import EARPipeline
from ear.refine import DEFAULT_THRESHOLD

# arm -> (which model, refine); each model runs its own trained order
ARMS = {"ear": ("ear", False), "radar": ("radar", True), "radar_norefine": ("radar", False)}


def last_state(pipe: EARPipeline, ids: list[int], seed: int, settings: dict[str, Any], refine: bool) -> Any:
    extra = {"refine_threshold": settings["refine_threshold"]} if refine else {}
    plain = {k: v for k, v in settings.items() if k != "refine_threshold"}
    *_, state = pipe.states(ids, seed=seed, refine=refine, **plain, **extra)
    return state


def seconds_per_image(pipes: dict[str, EARPipeline], settings: dict[str, dict[str, Any]], batch: int,
                      rounds: int) -> dict[str, float]:
    """Median seconds per image of each arm's decode loop, the arms interleaved per round (so a
    change in the machine's load hits them alike), after one warm-up each."""
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for r in range(rounds + 1):
        for arm, (which, refine) in ARMS.items():
            pipe = pipes[which]
            ids = [(r * batch + i) % len(pipe.class_names) for i in range(batch)]
            started = time.perf_counter()
            last_state(pipe, ids, r, settings[which], refine)
            if r:  # round 0 warms up plans, prepared weights and kernels
                times[arm].append((time.perf_counter() - started) / batch)
    return {arm: statistics.median(t) for arm, t in times.items()}


def quality(pipes: dict[str, EARPipeline], settings: dict[str, dict[str, Any]], per_class: int,
            batch: int = 64) -> tuple[dict[str, dict[str, float]], float]:
    """Retrieval top-1 and emoji-FID per arm, and the refined arm's share of corrected tokens."""
    from ear.train.data import asset_sets, load_dataset
    from ear.train.evaluate import Ruler

    pipe = pipes["ear"]
    # every drawing either model trained on: a sample of an earlier release is still its emoji
    learnt = {s for p in pipes.values()
              for s in asset_sets(json.loads((Path(p.info()["source"]) / "config.json").read_text()))}
    data = load_dataset("emoji", class_set="familiar", sets=tuple(learnt))  # put in set order there
    if pipe.class_names != data.class_names or pipes["radar"].class_names != data.class_names:
        raise ValueError("both models must be trained on the bundled emoji classes")
    ruler = Ruler(pipe.tokenizer, data, 64)
    labels = np.repeat(np.arange(len(data.class_names)), per_class)
    out: dict[str, dict[str, float]] = {}
    corrected = drawn = 0
    for arm, (which, refine) in ARMS.items():
        model_pipe, images = pipes[which], []
        for i in range(0, len(labels), batch):
            state = last_state(model_pipe, labels[i:i + batch].tolist(), i, settings[which], refine)
            if state.corrected is not None:
                corrected += int(state.corrected.sum())
                drawn += state.tokens.numel()
            with torch.no_grad():
                images.append(to_uint8(model_pipe.tokenizer.decode(state.tokens)))
        scores = ruler.score(np.concatenate(images), labels)
        out[arm] = {"retrieval_top1": scores["top1"], "fid": scores["fid"]}
        print(f"{arm}: retrieval {scores['top1']:.3f}, emoji-FID {scores['fid']:.2f}", flush=True)
    return out, corrected / max(1, drawn)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ear", default="ear-emoji", help="the EAR model (registry name or folder)")
    p.add_argument("--radar", default="radar-emoji", help="the RadAR model, with the correction head")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threshold", type=float, default=None,
                   help="refinement threshold (default: ear.refine's 0.05)")
    p.add_argument("--samples-per-class", type=int, default=None, help="default 4, --quick 1")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 6, --quick 3)")
    p.add_argument("--quick", action="store_true", help="fewer images and rounds (under 8 minutes)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    per_class = args.samples_per_class or (1 if args.quick else 4)
    rounds = args.rounds or (3 if args.quick else 6)
    began = time.perf_counter()
    pipes = {"ear": EARPipeline.from_pretrained(args.ear), "radar": EARPipeline.from_pretrained(args.radar)}
    if not pipes["radar"].can_refine:
        raise SystemExit(f"{args.radar} has no correction head (train it with --correction)")
    settings = {k: {"cfg_scale": pipe.default_settings.cfg_scale, "temperature": args.temperature,
                    "refine_threshold": args.threshold} for k, pipe in pipes.items()}
    result: dict[str, Any] = {"temperature": args.temperature, "samples_per_class": per_class}
    print(f"refinement threshold {args.threshold or DEFAULT_THRESHOLD}", flush=True)
    for arm, (which, _) in ARMS.items():
        result[arm] = {"steps": pipes[which].model.schedule.num_steps}
    for batch in (1, 16):
        secs = seconds_per_image(pipes, settings, batch, rounds)
        for arm, value in secs.items():
            result[arm][f"s_per_image_b{batch}"] = value
        print(f"batch {batch}: " + ", ".join(
            f"{arm} ({result[arm]['steps']} steps) {value * 1e3:.1f} ms/image, {secs['ear'] / value:.2f}x"
            for arm, value in secs.items()), flush=True)
    scores, result["corrected_share"] = quality(pipes, settings, per_class)
    for arm, values in scores.items():
        result[arm].update(values)
    print(f"corrected share {result['corrected_share']:.4f}; {time.perf_counter() - began:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
