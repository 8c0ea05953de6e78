"""Whole training runs as one command: both stages with the flags a machine calls for.

    python -m ear.train prepare --classes all --out runs/emoji-all.npz        # CPU, once
    accelerate launch --num_processes 1 --mixed_precision bf16 -m ear.train recipe gpu \\
        --data runs/emoji-all.npz --run-dir runs/gpu --export runs/gpu/asset  # one H200, < 10 min

Why presets: the CPU recipe is what the shipped ear-emoji used (warm starts from the previous
release, the 228-emoji "familiar" class set, budgets that fit a shared 2-core machine); the GPU
recipe trains from scratch on every emoji with wider networks, and its time budgets (3 + 6 min of
training, plus tokenizing and export) keep it within 10 minutes of device time, because the data
set is prepared on the CPU first and carried over as one .npz.

Each stage writes its run folder (checkpoints every `--save-every` steps), so a recipe that is
stopped can be re-run with `--resume` appended to both stages' flags and continues exactly.
"""

from __future__ import annotations

import shlex
from pathlib import Path

RECIPES: dict[str, dict[str, list[str]]] = {
    "cpu": {
        "tokenizer": ["--time-budget", "16", "--steps", "20000", "--batch", "24", "--lr", "1e-3",
                      "--warmup", "50", "--ema", "0.998", "--save-every", "100"],
        "ear": ["--time-budget", "70", "--steps", "100000", "--batch", "24", "--lr", "2e-3",
                "--warmup", "50", "--aug-copies", "2", "--save-every", "200"],
    },
    "gpu": {
        "tokenizer": ["--time-budget", "3", "--steps", "4000", "--batch", "256", "--lr", "2e-3",
                      "--warmup", "100", "--channels", "64", "128", "256", "--save-every", "500"],
        "ear": ["--time-budget", "6", "--steps", "20000", "--batch", "256", "--lr", "1e-3",
                "--warmup", "200", "--dim", "256", "--n-layer", "8", "--n-head", "8",
                "--aug-copies", "4", "--save-every", "1000"],
    },
}


def stage_argv(recipe: str, data: str, run_dir: Path, export: str | None, init_from: str | None = None,
               extra: dict[str, str] | None = None) -> list[list[str]]:
    """The two `python -m ear.train` argument lists of a recipe. `extra` per stage is appended last
    (argparse keeps the last value), so a test can shrink a recipe without rewriting it."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    extra = extra or {}
    tok_dir, ear_dir = run_dir / "tokenizer", run_dir / "ear"
    common = ["--data", data, *(["--init-from", init_from] if init_from else [])]
    tok = ["tokenizer", *common, "--run-dir", str(tok_dir), *RECIPES[recipe]["tokenizer"]]
    ear = ["ear", *common, "--tokenizer", str(tok_dir), "--run-dir", str(ear_dir),
           *RECIPES[recipe]["ear"], *(["--export", export] if export else [])]
    return [tok + shlex.split(extra.get("tokenizer", "")), ear + shlex.split(extra.get("ear", ""))]
