"""Extend benchmark: photographs no bundled model trained on, their centre half kept and the rest
grown by each model, compared with the photo's real surroundings.

    python bench/bench_extend.py --quick --json extend.json
    python bench/bench_extend.py --sheet assets/ear-photo/extend_sheet.png

The photographs are the held-out pictures of `ear.train.photos` (LGPL and GPL wallpapers from
Debian's packages, fetched once with apt-get into ~/.cache/ear-studio/photos; the photo model is
trained on other, CC-licensed pictures only). Each is cut to its centred square at the tokenizer's
64 px; the central 8 x 8 of its 16 x 16 cells is kept exactly as the Extend tab keeps an upload
(`EARPipeline.encode_region`: the picture resized into the kept square), and the border is drawn
with the null class (no class, as the page extends uploads by default). Per model, over every
photo and seed, on the border cells' pixels only:
- `hist`: colour-histogram intersection with the photo's real border (8 bins per channel, 1 =
  the same colours) and `psnr`, as in bench/bench_edit.py;
- `seam`: mean absolute difference (of 255) between the pixel rings just inside and just
  outside the kept square's edge, minus the same for the real photo: about 0 means the border
  continues the kept picture as smoothly as the photo itself does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ear.images import to_uint8
from ear.pipeline import EARPipeline
from ear.sampler import generate
from ear.train.evaluate import region_scores
from ear.train.photos import heldout_photos

KEEP = 8  # cells: the centre half of a 16-cell side


def edge_gap(images: np.ndarray, box: tuple[int, int, int, int], cell: int) -> np.ndarray:
    """Per image: mean |inside - outside| of the one-pixel rings on each side of the box's edge."""
    left, top, right, bottom = (v * cell for v in box)
    x = images.astype(np.float64)
    gaps = [x[:, top:bottom, left] - x[:, top:bottom, left - 1],
            x[:, top:bottom, right - 1] - x[:, top:bottom, right],
            x[:, top, left:right] - x[:, top - 1, left:right],
            x[:, bottom - 1, left:right] - x[:, bottom, left:right]]
    return np.concatenate([np.abs(g).reshape(len(x), -1) for g in gaps], axis=1).mean(1)


def extend_all(pipe: EARPipeline, photos: np.ndarray, seeds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(photos x seeds extended pictures at the tokenizer's size, the border cells)."""
    box = pipe.centre_box(KEEP)
    left, top, right, bottom = box
    cell = pipe.tokenizer.image_size // pipe.grid
    kept = [Image.fromarray(p[top * cell:bottom * cell, left * cell:right * cell]) for p in photos]
    known = torch.stack([pipe.encode_region(k, box) for k in kept])
    known = known.repeat_interleave(seeds, 0)
    n = len(known)
    settings = {**vars(pipe.default_settings), "cfg_scale": 1.0}
    grids = generate(pipe.model, [pipe.model.null_class] * n, **settings, known=known,
                     seed=[seed + i % seeds for i in range(n)], row_ids=list(range(n)))
    with torch.no_grad():
        drawn = to_uint8(pipe.tokenizer.decode(grids))
    border = np.ones((pipe.grid, pipe.grid), dtype=bool)
    border[top:bottom, left:right] = False
    return drawn, np.broadcast_to(border, (n, *border.shape))


def write_sheet(path: Path, titles: list[str], photos: np.ndarray, results: dict[str, np.ndarray],
                seeds: int, box: tuple[int, int, int, int], cell: int, scale: int = 2) -> None:
    """One row per photo: the photo (kept square outlined), what the model is given, then each
    model's extension (seed 0)."""
    side, pad, label = photos.shape[1] * scale, 4, 14
    columns = ["photo", "kept", *results]
    sheet = Image.new("RGB", (len(columns) * (side + pad) + pad, label + len(photos) * (side + pad) + pad),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(columns):
        draw.text((pad + j * (side + pad), 1), name, fill="black")
    left, top, right, bottom = (v * cell * scale for v in box)
    for i, photo in enumerate(photos):
        kept = np.full_like(photo, 235)
        kept[top // scale:bottom // scale, left // scale:right // scale] = \
            photo[top // scale:bottom // scale, left // scale:right // scale]
        row = [photo, kept, *(r[i * seeds] for r in results.values())]
        for j, picture in enumerate(row):
            x, y = pad + j * (side + pad), label + pad + i * (side + pad)
            sheet.paste(Image.fromarray(picture).resize((side, side), Image.Resampling.NEAREST), (x, y))
            if j == 0:
                draw.rectangle((x + left, y + top, x + right - 1, y + bottom - 1), outline=(255, 0, 0))
        draw.text((pad + 2, label + pad + i * (side + pad) + side - 12), titles[i][:14], fill="white")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["ear-emoji", "ear-photo"])
    parser.add_argument("--quick", action="store_true", help="2 seeds per photo (default 8)")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--sheet", type=Path, default=None, help="write a picture sheet here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = args.seeds or (2 if args.quick else 8)
    started = time.perf_counter()
    titles, pictures = zip(*heldout_photos(), strict=True)
    photos = np.stack(pictures)
    real = photos.repeat(seeds, 0)
    result: dict = {"photos": list(titles), "seeds": seeds, "keep": KEEP,
                    "data": "held-out photographs of ear.train.photos (never trained on), null class"}
    drawn: dict[str, np.ndarray] = {}
    for name in args.models:
        pipe = EARPipeline.from_pretrained(name, device="cpu")
        if pipe.tokenizer.image_size != photos.shape[1] or pipe.grid != 16:
            raise SystemExit(f"{name}: this bench compares 64 px, 16 x 16 models")
        box, cell = pipe.centre_box(KEEP), pipe.tokenizer.image_size // pipe.grid
        drawn[name], border = extend_all(pipe, photos, seeds, args.seed)
        psnr, hist = region_scores(drawn[name], real, border)
        seam = float((edge_gap(drawn[name], box, cell) - edge_gap(real, box, cell)).mean())
        result[name] = {"hist": round(hist, 3), "psnr": round(psnr, 2), "seam": round(seam, 2)}
        print(name, json.dumps(result[name]), flush=True)
    if len(args.models) == 2:
        a, b = args.models
        result["hist_gain"] = round(result[b]["hist"] - result[a]["hist"], 3)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if args.sheet is not None:
        write_sheet(args.sheet, list(titles), photos, drawn, seeds, box, cell)
        print(f"wrote {args.sheet}")


if __name__ == "__main__":
    main()
