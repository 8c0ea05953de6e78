"""Dynamic activation benchmark (issue 22): the bundled model dense, with the engine's free savings
only, and activated (those plus routed experts and token gates, `ear.routed`), in one run.

    python bench/bench_activate.py --quick --json bench/activate_results.json   # < 8 min, 2 cores
    python bench/bench_activate.py --taus 0.2,0.4,0.6,0.8,1.0 --plot sweep.png  # the budget sweep

"dense" is the engine as it was (every row through every layer, each mask query projected on its
own), "skip" the engine with its free savings (exact: the content-token skip and the shared mask
projection, `ear.engine`; the JSON's `flops_content_skip_alone` counts the first alone), "active"
the activated path at the shipped tau and dense lead (or --tau, --lead). FLOPs are
counted, not estimated (`ear.flops`): every variant runs once more with plain linears under
`torch.utils.flop_counter.FlopCounterMode` (2 x multiply-adds of the transformer per image, CFG
rows included, routers and gates included, the tokenizer excluded). Seconds per image at batch
1 and 16 use the default runner (timed kernels), the variants interleaved per round, medians.
Quality against dense at --temperature (samples vary there): teacher-forced top-1 agreement on 128
images (both paths given the dense path's own sampled tokens) and, on one image per class with the
same seeds, retrieval top-1 and emoji-FID (`ear.train.evaluate`, the tokenizer's feature space).
Ratios are against dense measured in the same run.
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

from ear.activate import Activation
from ear.engine import configure, runner_for
from ear.flops import flops_per_image
from ear.images import to_uint8
from ear.model import EAR
from ear.pipeline import EARPipeline
from ear.routed import RoutedFFN
from ear.sampler import decode, generate

VARIANTS = ("dense", "skip", "active")
AGREEMENT_IMAGES = 128  # teacher-forced images the agreement is measured on


def spread(num_classes: int, count: int) -> list[int]:
    """`count` labels spread evenly over the model's labels."""
    return list(range(0, num_classes, max(1, num_classes // count)))[:count]


def _variant(model: EAR, name: str, routed: RoutedFFN) -> RoutedFFN | None:
    """Set the runner up for one variant; returns the FFN to hand to the sampler."""
    runner = runner_for(model)
    runner.content_outputs, runner.share_mask_projection = name == "dense", name != "dense"
    return routed if name == "active" else None


def count_flops(model: EAR, name: str, routed: RoutedFFN, classes: list[int], cfg: float,
                temperature: float) -> float:
    """FLOPs per image of one variant (`ear.flops`: counted on the plain-linear runner)."""
    flops, _ = flops_per_image(model, classes, activation=routed if name == "active" else None,
                               every_row=name == "dense", cfg_scale=cfg, temperature=temperature)
    return flops


def seconds_per_image(model: EAR, routed: RoutedFFN, batch: int, rounds: int, cfg: float,
                      temperature: float) -> dict[str, float]:
    """Median seconds per image of each variant, interleaved (a load change hits them alike)."""
    configure(model)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    classes = [i % model.config.num_classes for i in range(batch)]
    for r in range(rounds + 1):  # round 0 warms up (kernel timing, caches)
        for name in VARIANTS:
            ffn = _variant(model, name, routed)
            started = time.perf_counter()
            generate(model, classes, seed=r, cfg_scale=cfg, temperature=temperature, activation=ffn)
            if r:
                times[name].append((time.perf_counter() - started) / batch)
    return {name: statistics.median(t) for name, t in times.items()}


def agreement(model: EAR, routed: RoutedFFN, classes: list[int], cfg: float, temperature: float) -> float:
    """Top-1 agreement of the activated path with the dense path, both given the dense path's
    own samples (teacher-forced): a free-running grid parts ways after its first differing token."""
    configure(model)
    tokens = generate(model, classes, seed=1, cfg_scale=cfg, temperature=temperature).flatten(1)
    sched = model.schedule
    b, tokens = sched.boundaries, tokens[:, list(sched.order)]

    def teacher(k: int, logits: torch.Tensor) -> torch.Tensor:
        return tokens[:, b[k]:b[k + 1]]

    ids = torch.tensor(classes)
    dense = decode(model, ids, teacher, cfg_scale=cfg)
    active = decode(model, ids, teacher, cfg_scale=cfg, activation=routed)
    agree = [(got.argmax(-1) == ref.argmax(-1)).flatten()
             for (_, ref, _), (_, got, _) in zip(dense, active, strict=True)]
    return torch.cat(agree).float().mean().item()


class Quality:
    """Retrieval top-1 and emoji-FID of one image per class label (the first `classes`; --quick: a
    quarter, so its FID is higher than a full run's; a full run draws every emoji in every
    style), the same seeds for every variant scored."""

    def __init__(self, pipe: EARPipeline, classes: int, cfg: float, temperature: float) -> None:
        from ear.train.data import asset_sets, load_dataset
        from ear.train.evaluate import Ruler

        configure(pipe.model)
        config = json.loads((Path(pipe.info()["source"]) / "config.json").read_text())
        data = load_dataset("emoji", class_set="familiar", sets=asset_sets(config))
        self.pipe, self.ruler, self.num_emoji = pipe, Ruler(pipe.tokenizer, data, 64), len(data.class_names)
        self.ids, self.cfg, self.temperature = list(range(classes)), cfg, temperature

    def __call__(self, ffn: RoutedFFN | None) -> tuple[float, float]:
        """(retrieval top-1, emoji-FID) of the model with `ffn` (None: dense)."""
        images = []
        for i in range(0, len(self.ids), 16):
            tokens = generate(self.pipe.model, self.ids[i:i + 16], seed=i, cfg_scale=self.cfg,
                              temperature=self.temperature, activation=ffn)
            with torch.no_grad():
                images.append(to_uint8(self.pipe.tokenizer.decode(tokens)))
        # a per-(emoji, style) label is style x emoji count + emoji: score the emoji it draws
        scores = self.ruler.score(np.concatenate(images), np.array(self.ids) % self.num_emoji)
        return scores["top1"], scores["fid"]


def sweep_panels(result: dict[str, Any]) -> list[Any]:
    """The budget sweep as three panels against the FLOPs saved: agreement, retrieval, FID, with
    dense (0 %) and the free savings as points of their own and the targets dashed."""
    from bench.chart import Panel

    def saved(ratio: float) -> float:
        return 100 * (1 - ratio)

    sweep = result["sweep"]
    skip = saved(result["flops_ratio_skip"])
    dense = {"agreement": 1.0, "retrieval": result["retrieval_dense"], "fid": result["fid_dense"]}
    targets = {"agreement": 0.97, "retrieval": dense["retrieval"] - 0.01, "fid": 1.1 * dense["fid"]}
    titles = {"agreement": "teacher-forced top-1 agreement", "retrieval": "retrieval top-1",
              "fid": "emoji-FID (lower is better)"}
    return [Panel(title, {"activated": [(saved(r["flops_ratio"]), r[key]) for r in sweep],
                          "dense / free savings": [(0.0, dense[key]), (skip, dense[key])]},
                  target_x=20.0, target_y=targets[key],
                  labels={(saved(r["flops_ratio"]), r[key]): f"tau {r['tau']:g}" for r in sweep})
            for key, title in titles.items()]


def plot_sweep(result: dict[str, Any], path: Path) -> Path:
    """Draw `sweep_panels` into a PNG."""
    from bench.chart import line_chart

    return line_chart(sweep_panels(result), "total FLOPs saved against dense (%); dashed: the targets", path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ear-emoji")
    p.add_argument("--activation", type=Path, default=None,
                   help="folder holding activation.safetensors (default: the model's own folder)")
    p.add_argument("--tau", type=float, default=None, help="the budget knob (default: the shipped tau)")
    p.add_argument("--lead", type=float, default=None,
                   help="the share of the order drawn dense first (default: the shipped dense lead)")
    p.add_argument("--taus", default="", help="comma-separated taus for a budget sweep (FLOPs, agreement)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--cfg", type=float, default=None, help="default: the model's default preset")
    p.add_argument("--quick", action="store_true", help="fewer rounds and images (under 8 minutes)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; on a "
                   "busy shared machine 1 is faster, OpenMP's second thread mostly waits)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG", help="with --taus: draw the sweep")
    args = p.parse_args()
    if args.plot and not args.taus:
        p.error("--plot draws the budget sweep: give the taus to sweep with --taus")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    began = time.perf_counter()
    pipe = EARPipeline.from_pretrained(args.model)
    model = pipe.model
    folder = args.activation or Path(pipe.info()["source"])
    activation = Activation.load(folder, model)
    routed = RoutedFFN(activation, args.tau, lead=args.lead)
    cfg = pipe.default_settings.cfg_scale if args.cfg is None else args.cfg
    t = args.temperature
    count = 8 if args.quick else 32
    classes = spread(model.config.num_classes, count)
    # Agreement on more images than the FLOPs count (it is cheap): tokens of one image agree or
    # part together, so 8 images' 2,048 tokens said 96.9 % where 128 images said 96.0 %.
    judged = spread(model.config.num_classes, AGREEMENT_IMAGES)
    result: dict[str, object] = {"model": args.model, "tau": routed.tau, "dense_lead": routed.lead,
                                 "cfg_scale": cfg, "temperature": t, "threads": torch.get_num_threads(),
                                 "agreement_images": len(judged)}
    flops = {name: count_flops(model, name, routed, classes, cfg, t) for name in VARIANTS}
    runner_for(model).share_mask_projection = False
    result["flops_content_skip_alone"] = count_flops(model, "skip", routed, classes, cfg, t)
    runner_for(model).share_mask_projection = True
    result.update(flops_dense=flops["dense"], flops_free_skip_only=flops["skip"],
                  flops_active=flops["active"],
                  flops_ratio_active=flops["active"] / flops["dense"],
                  flops_ratio_skip=flops["skip"] / flops["dense"])
    print(f"FLOPs/image: dense {flops['dense']:.4g}, skip {flops['skip']:.4g}, active {flops['active']:.4g} "
          f"({1 - result['flops_ratio_active']:.1%} fewer)", flush=True)
    result["agreement"] = agreement(model, routed, judged, cfg, t)
    print(f"agreement {result['agreement']:.4f}", flush=True)
    for batch, rounds in ((1, 6 if args.quick else 12), (16, 3 if args.quick else 6)):
        secs = seconds_per_image(model, routed, batch, rounds, cfg, t)
        for name, value in secs.items():
            result[f"s_per_image_b{batch}_{name}"] = value
        result[f"speed_b{batch}_active_vs_dense"] = secs["dense"] / secs["active"]
        result[f"speed_b{batch}_skip_vs_dense"] = secs["dense"] / secs["skip"]
        shown = ", ".join(f"{k} {v * 1000:.1f} ms/img" for k, v in secs.items())
        print(f"batch {batch}: {shown}", flush=True)
    scorer = Quality(pipe, model.config.num_classes // (4 if args.quick else 1), cfg, t)
    result["retrieval_dense"], result["fid_dense"] = scorer(None)
    result["retrieval_active"], result["fid_active"] = scorer(routed)
    print(f"retrieval {result['retrieval_dense']:.3f} -> {result['retrieval_active']:.3f}, "
          f"emoji-FID {result['fid_dense']:.2f} -> {result['fid_active']:.2f}", flush=True)
    sweep = []
    for tau in [float(x) for x in args.taus.split(",") if x]:
        at = routed.at(tau)
        retrieval, fid = scorer(at)
        sweep.append({"tau": tau, "flops_ratio": count_flops(model, "active", at, classes, cfg, t)
                      / flops["dense"], "agreement": agreement(model, at, judged, cfg, t),
                      "retrieval": retrieval, "fid": fid})
        print(f"tau {tau}: FLOPs x{sweep[-1]['flops_ratio']:.3f}, agreement {sweep[-1]['agreement']:.4f}, "
              f"retrieval {retrieval:.3f}, emoji-FID {fid:.2f}", flush=True)
    if sweep:
        result["sweep"] = sweep
        if args.plot:
            print(f"plot: {plot_sweep(result, args.plot)}")
    result["seconds"] = time.perf_counter() - began
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
