"""Whole training runs as one command: the stages with the flags a machine calls for.

    python -m ear.train prepare --classes all --sets twitter,google,twitter-2014,twitter-2017,google-2016 \\
        --out runs/emoji-all.npz                                               # CPU, once
    accelerate launch --num_processes 1 --mixed_precision bf16 -m ear.train recipe gpu \\
        --data runs/emoji-all.npz --run-dir runs/gpu --export runs/gpu/asset  # one H200, < 10 min
    python -m ear.train recipe cpu --init-from <previous asset> --run-dir runs/cpu --export ...
    python -m ear.train recipe photo-cpu --data photos --init-from assets/ear-emoji \
        --run-dir runs/photo --export assets/ear-photo                         # the bundled ear-photo

Why presets: the CPU recipe is how the shipped ear-emoji was made (warm starts from the previous
release, the 228-emoji "familiar" class set, wall-clock budgets that fit a shared 2-core machine,
a decoder-only pass that sharpens pictures without changing a single token, then the EAR with one
class embedding per emoji, style and drawing, on plain token copies of each artist's current and
earlier drawings; the current release re-ran only that last stage on the previous tokenizer, see
its model card); the GPU recipe
trains from scratch on every emoji with wider networks, and its budgets (2.5 + 6 min of training,
plus tokenizing and export) keep it within 10 minutes of device time, because the data set is
prepared on the CPU first and carried over as one .npz.

Each stage has its own run folder under --run-dir (checkpoints every `--save-every` steps), so a
stopped recipe re-run with `--resume` in the extras continues exactly where it stopped.
"""

from __future__ import annotations

import shlex
from pathlib import Path

# every emoji image set the bundled model draws from: each artist's current and earlier releases
DRAWING_SETS = "twitter,google,twitter-2014,twitter-2017,google-2016"

# recipe -> stages: (run sub-folder, stage, flags); "{run}" is the recipe's --run-dir
RECIPES: dict[str, list[tuple[str, str, str]]] = {
    "cpu": [
        ("tokenizer", "tokenizer", "--time-budget 16 --steps 20000 --batch 24 --lr 1e-3 --warmup 50 "
                                   "--ema 0.998 --save-every 100"),
        ("decoder", "tokenizer", "--init-from {run}/tokenizer --decoder-only --time-budget 25 --steps 20000 "
                                 "--batch 24 --lr 1e-3 --warmup 20 --ema 0.998 --save-every 100"),
        ("ear", "ear", f"--tokenizer {{run}}/decoder --sets {DRAWING_SETS} --time-budget 85 --steps 100000 "
                       "--batch 16 --lr 4e-4 --warmup 100 --aug-copies 1 --style-classes --drawings 3 "
                       "--save-every 300"),
    ],
    "gpu": [
        ("tokenizer", "tokenizer", "--time-budget 2.5 --steps 4000 --batch 256 --lr 2e-3 --warmup 100 "
                                   "--channels 64 128 256 --save-every 500"),
        ("ear", "ear", "--tokenizer {run}/tokenizer --time-budget 6 --steps 20000 --batch 256 --lr 1e-3 "
                       "--warmup 200 --dim 256 --n-layer 8 --n-head 8 --aug-copies 1 --style-classes "
                       "--drawings 3 --save-every 1000"),
    ],
    # the bundled ear-photo (--data photos, --init-from assets/ear-emoji): crops of Debian's
    # wallpapers, scene classes, no styles; the null class (15 % of labels dropped) extends uploads
    "photo-cpu": [
        ("tokenizer", "tokenizer", "--time-budget 22 --steps 1200"),
        ("ear", "ear", "--tokenizer {run}/tokenizer --time-budget 45 --steps 100000 --batch 32 --lr 1e-3 "
                       "--warmup 200 --aug-copies 1 --class-dropout 0.15 --name ear-photo --save-every 500"),
    ],
    "photo-gpu": [
        ("tokenizer", "tokenizer", "--time-budget 3 --steps 4000 --batch 256 --lr 2e-3 --warmup 100 "
                                   "--channels 64 128 256 --save-every 500"),
        ("ear", "ear", "--tokenizer {run}/tokenizer --time-budget 8 --steps 20000 --batch 256 --lr 1e-3 "
                       "--warmup 200 --dim 256 --n-layer 8 --n-head 8 --aug-copies 1 --class-dropout 0.15 "
                       "--name ear-photo --save-every 1000"),
    ],
}


def stage_argv(recipe: str, data: str, run_dir: Path, export: str | None, init_from: str | None = None,
               extra: dict[str, str] | None = None) -> list[list[str]]:
    """The `python -m ear.train` argument lists of a recipe, in order. `init_from` warm-starts every
    stage (a stage's own --init-from wins); `extra[stage]` is appended last (argparse keeps the last
    value), so a test can shrink a recipe without rewriting it. The last stage exports."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    extra = extra or {}
    stages = []
    for i, (folder, stage, flags) in enumerate(RECIPES[recipe]):
        argv = [stage, "--data", data, "--run-dir", str(run_dir / folder),
                *(["--init-from", init_from] if init_from else []),
                *shlex.split(flags.replace("{run}", str(run_dir))),
                *(["--export", export] if export and i == len(RECIPES[recipe]) - 1 else []),
                *shlex.split(extra.get(stage, ""))]
        stages.append(argv)
    return stages
