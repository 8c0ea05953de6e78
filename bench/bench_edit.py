"""Edit benchmark: blank a region of pictures the model never saw, redraw it with the rest known,
and measure how close the redrawn cells come to the original, against drawing the same cells
with no known cell (plain generation, same seed) and against refinement rounds.

    python bench/bench_edit.py --quick --json edit.json      # < 8 minutes on 2 cores
    python bench/bench_edit.py --images 256 --refine 4

With the bundled photo model (`--model ear-photo`, the default where it is bundled) the pictures
are crops, at several scales, of its held-out photographs (`ear.train.photos`: LGPL / GPL
wallpapers it never trained on). With `--model ear-emoji` they are Twemoji (npm
`emoji-datasource-twitter`, fetched once with `npm pack` into ~/.cache/ear-studio/emoji by
`ear.train.data`) whose CLDR names are not among the bundled `ear-emoji` model's classes, drawn
with the null class: a model that memorised its training pictures cannot redraw these from a
class. Regions (True = blanked), on the 16x16
grid: `border` (all but the central 8x8: the extension case), `left` and `top` halves, `blob` (two
random discs per picture, minus the central 4x4 cells) and `centre` (the central 6x6, reported
only: in a centre-out order it is drawn before any known cell). Metrics over the blanked cells'
pixels only, at the tokenizer's 64 px: PSNR (dB, mean over pictures) and colour-histogram
intersection (8 bins per channel, 1 = same colours), for the redraw with known cells (`known`),
plain generation (`free`), the best of 1 + --refine draws by the known cells' likelihood
(`refined`), and the tokenizer's own reconstruction of the original (`recon`, the ceiling).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ear import hub
from ear.images import to_uint8
from ear.pipeline import EARPipeline
from ear.sampler import UNKNOWN, generate, known_log_likelihood
from ear.train.data import (
    DEFAULT_CACHE,
    NAMES_PACKAGE,
    NPM_PACKAGES,
    cldr_names,
    emoji_records,
    fetch_npm_package,
    load_dataset,
    load_rgb,
    per_emoji_classes,
)
from ear.train.evaluate import region_scores
from ear.train.photos import picture_title

KINDS = ("border", "left", "top", "blob", "centre")
SKIN_TONES = ("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF")


def held_out_emoji(pipe: EARPipeline, count: int, size: int) -> tuple[np.ndarray, list[str]]:
    """`count` Twemoji spread evenly over the set, none named like a class of the model."""
    package = fetch_npm_package(NPM_PACKAGES["twitter"], DEFAULT_CACHE)
    records = [r for r in emoji_records(package) if not any(t in r[3] for t in SKIN_TONES)]
    _, names = per_emoji_classes(records, cldr_names(fetch_npm_package(NAMES_PACKAGE, DEFAULT_CACHE)), None)
    taken = {c.lower() for c in pipe.class_names}
    outside = [(r, n) for r, n in zip(records, names, strict=True) if n and n.lower() not in taken]
    picked = [outside[i] for i in np.linspace(0, len(outside) - 1, min(count, len(outside))).astype(int)]
    return np.stack([load_rgb(r[4], size) for r, _ in picked]), [n for _, n in picked]


def held_out_photos(count: int, size: int) -> tuple[np.ndarray, list[str]]:
    """`count` crops (several scales) of the photo model's held-out photographs, spread evenly
    over them; names are the photographs' titles."""
    held = load_dataset("photos").split(heldout=True)
    picked = np.linspace(0, len(held) - 1, min(count, len(held))).astype(int)
    if held.images.shape[1] != size:
        raise SystemExit(f"the photo crops are {held.images.shape[1]} px, the model's tokenizer {size} px")
    return held.images[picked], [picture_title(str(k)) for k in held.keys[picked]]


def region(kind: str, g: int, rng: np.random.Generator) -> np.ndarray:
    """(g, g) bool: the cells blanked for one picture."""
    r, c = np.mgrid[:g, :g]
    mid = g // 2
    if kind == "border":
        return ~((abs(r - mid + 0.5) < g // 4) & (abs(c - mid + 0.5) < g // 4))
    if kind == "left":
        return c < mid
    if kind == "top":
        return r < mid
    if kind == "centre":
        return (abs(r - mid + 0.5) < 3) & (abs(c - mid + 0.5) < 3)
    blob = np.zeros((g, g), dtype=bool)
    while True:
        for _ in range(2):
            cy, cx = rng.uniform(0, g, 2)
            blob |= (r - cy) ** 2 + (c - cx) ** 2 <= rng.uniform(2.0, 3.5) ** 2
        blob &= ~((abs(r - mid + 0.5) < 2) & (abs(c - mid + 0.5) < 2))
        if blob.any() and not blob.all():
            return blob


def best_of(draws: list[torch.Tensor], fits: torch.Tensor, rounds: int) -> torch.Tensor:
    """Per picture, the draw among the first 1 + `rounds` whose known cells are likeliest."""
    pick = fits[:rounds + 1].argmax(0)
    return torch.stack([draws[int(j)][i] for i, j in enumerate(pick)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="48 pictures")
    parser.add_argument("--images", type=int, default=None, help="pictures (default 192; quick 48)")
    parser.add_argument("--refine", type=int, default=None,
                        help="refinement rounds (default 8: the Edit tab's)")
    parser.add_argument("--model", default=None,
                        help="ear-photo on its held-out photographs (the default where it is bundled) or "
                             "ear-emoji on Twemoji outside its classes")
    parser.add_argument("--temperature", type=float, default=None,
                        help="default: the model's \"edit\" preset (the Edit tab's), else its default")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="regions to measure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    count = args.images or (48 if args.quick else 192)
    rounds = 8 if args.refine is None else args.refine  # the Edit tab's default
    started = time.perf_counter()
    status = {m.name: m.status for m in hub.list_models()}
    name = args.model or (hub.PHOTO_MODEL if status.get(hub.PHOTO_MODEL) == "bundled" else hub.DEFAULT_MODEL)
    pipe = EARPipeline.from_pretrained(name, device="cpu")
    model, g, size = pipe.model, pipe.grid, pipe.tokenizer.image_size
    if name == hub.PHOTO_MODEL:
        images, names = held_out_photos(count, size)
        data = "crops of ear-photo's held-out photographs (never trained on), null class"
    else:
        images, names = held_out_emoji(pipe, count, size)
        data = "Twemoji outside the model's class set, null class"
    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        tokens = pipe.tokenizer.encode(pixels).cpu().long()
        recon = to_uint8(pipe.tokenizer.decode(tokens))
    n = len(images)
    labels = [model.null_class] * n
    preset = pipe.presets.get("edit", pipe.default_settings)  # what the Edit tab opens on
    settings = {**vars(preset), "cfg_scale": 1.0}
    if args.temperature is not None:
        settings["temperature"] = args.temperature
    rows = {"seed": [args.seed] * n, "row_ids": list(range(n))}

    def draw(known: torch.Tensor | None, round_: int = 0) -> torch.Tensor:
        return generate(model, labels, **settings, **{**rows, "seed": [args.seed + round_] * n}, known=known)

    def decoded(grid: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return to_uint8(pipe.tokenizer.decode(grid))

    free = decoded(draw(None))
    rng = np.random.default_rng(args.seed)
    result: dict = {"model": pipe.name, "refine_rounds": rounds, "images": n,
                    "data": data, "seed": args.seed,
                    "settings": settings}
    for kind in KINDS:
        cells = np.stack([region(kind, g, rng) for _ in range(n)])  # every kind draws (same blobs)
        if kind not in args.kinds:
            continue
        known = torch.where(torch.from_numpy(cells), UNKNOWN, tokens)
        draws = [draw(known, r) for r in range(rounds + 1)]
        fits = torch.stack([known_log_likelihood(model, labels, d, known) for d in draws])
        entry = {"cells": float(cells.sum(axis=(1, 2)).mean())}
        for label, shown in (("known", decoded(draws[0])), ("free", free),
                             ("refined", decoded(best_of(draws, fits, rounds))), ("recon", recon)):
            entry[f"psnr_{label}"], entry[f"hist_{label}"] = region_scores(shown, images, cells)
        for r in range(1, rounds):  # what fewer rounds would have given (the first r + 1 draws)
            entry[f"psnr_refined_{r}"] = region_scores(decoded(best_of(draws, fits, r)), images, cells)[0]
        assert torch.equal(draws[0][~torch.from_numpy(cells)], tokens[~torch.from_numpy(cells)])
        result[kind] = {k: round(v, 3) for k, v in entry.items()}
        print(kind, json.dumps(result[kind]), flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["threads"] = torch.get_num_threads()
    result["examples"] = names[:8]
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
