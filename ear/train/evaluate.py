"""Metrics for a trained asset folder, the default-setting sweep, samples.png and growth.gif.

    python -m ear.train.evaluate --asset assets/ear-emoji --out runs/eval [--sweep] [--media]

What is measured and why:
- tokenizer: PSNR on every image of the class set (what the model has to draw) and on the emoji
  the tokenizer held out (generalisation), codebook usage (fraction used, perplexity);
- EAR: cross-entropy (nats/token) on its training grids and, where classes have held-out images,
  on those; next to the unigram baseline (what a model that ignores all context reaches);
- feature space: the tokenizer encoder's L2-normalised 16x16x8 latent, flattened. No pretrained
  network can be downloaded here, and this space is fixed before any sample is drawn, so generated
  and real images are measured with the same ruler;
- retrieval top-1: the share of generated images whose nearest real image (over every real
  rendering, skin tones included) belongs to the class asked for; chance is the share of
  real images in that class, averaged over the classes asked for;
- "emoji FID": Fréchet distance, in the feature space reduced by PCA to `--fid-dims` (fitted on
  the real renderings), between one generated image per class and the default Twemoji and Noto
  renderings; its real-vs-real baseline is Twemoji against Noto (the gap between two artists);
- variety: per class, how many of 8 seeds (one image each, as the page's Random button gives)
  draw distinct pictures, a greedy count: a sample is new if its mean absolute difference from
  every earlier sample exceeds 10/255 at the model's resolution; the mean over classes, for style
  "Any" (the default, which alternates styles over seeds) and within each fixed style (variety
  that is not only a change of artist);
- novelty: each "Any" sample's mean absolute difference to its nearest training image (with a
  model of several drawings per style, their shifted copies are training images too), against
  the training images' own nearest-neighbour distances (each to its nearest other one); samples
  within 10/255 of a training image count as copies. A memorising model has sample distances far
  below the training set's own and a copy share near 1;
- speed: seconds per image at batch 1 (all steps + decode) with the default settings.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ear.pipeline import EARPipeline
from ear.tokenizer.conv_vq import ConvVQ
from ear.train.common import to_float, update_asset
from ear.train.data import (
    DISTINCT,
    SHOWCASE,
    ImageDataset,
    asset_sets,
    dataset_from_args,
    drawing_dataset,
    mean_abs_diff,
    style_labels,
)
from ear.train.stage_ear import ear_split, token_loss, tokenize
from ear.train.stage_tokenizer import reconstruction_stats

SWEEP = [  # (cfg_scale, temperature, top_k, top_p): per-emoji classes are sharpest at low guidance
    (1.0, 1.0, 0, 1.0), (1.0, 0.8, 0, 1.0), (1.0, 0.6, 0, 1.0), (1.0, 0.4, 0, 1.0), (1.0, 0.2, 0, 1.0),
    (1.0, 0.8, 8, 1.0), (1.0, 1.0, 0, 0.8), (1.5, 0.6, 0, 1.0), (2.0, 1.0, 0, 1.0),
]


@torch.no_grad()
def features(tokenizer: ConvVQ, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """uint8 (N, S, S, 3) -> (N, g*g*d): the encoder latent, normalised per position (as the
    quantiser sees it) and flattened. Every vector has norm g, so the largest dot product is the
    nearest neighbour by cosine and by Euclidean distance alike."""
    out = []
    for i in range(0, len(images), batch):
        z = tokenizer.encoder(to_float(torch.from_numpy(images[i:i + batch])))
        out.append(F.normalize(z, dim=1).flatten(1))
    return torch.cat(out).double().numpy() if out else np.zeros((0, 0))


def retrieval(fake: np.ndarray, fake_labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray
              ) -> dict[str, Any]:
    """Top-1 nearest real image per generated image; chance as in the module docstring."""
    nearest = real_labels[(fake @ real.T).argmax(1)]
    hit = nearest == fake_labels
    share = np.bincount(real_labels, minlength=int(fake_labels.max()) + 1) / len(real_labels)
    per_class = {int(c): float(hit[fake_labels == c].mean()) for c in np.unique(fake_labels)}
    return {"top1": float(hit.mean()), "chance": float(share[fake_labels].mean()), "per_class": per_class}


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (symmetric square roots via
    eigendecompositions, stable for rank-deficient covariances)."""
    mu = a.mean(0) - b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    cross = np.linalg.eigvalsh(root1 @ s2 @ root1).clip(min=0)
    return float(mu @ mu + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(cross).sum())


class Ruler:
    """The real renderings in feature space, and the PCA used for FID, fitted once per evaluation."""

    def __init__(self, tokenizer: ConvVQ, data: ImageDataset, fid_dims: int) -> None:
        self.tokenizer = tokenizer
        self.feats, self.labels = features(tokenizer, data.images), data.labels
        # one default rendering per emoji and set: each class weighs the same in the FID
        first = {}
        for i, key in enumerate(zip(data.sources.tolist(), data.keys.tolist(), strict=True)):
            first.setdefault(key, i)
        self.default = np.array(sorted(first.values()))
        ref = self.feats[self.default]
        self.mean = ref.mean(0)
        self.proj = np.linalg.svd(ref - self.mean, full_matrices=False)[2][:fid_dims].T
        self.sources = data.sources[self.default]

    def reduce(self, feats: np.ndarray) -> np.ndarray:
        return (feats - self.mean) @ self.proj

    def real_vs_real(self) -> float:
        """Twemoji against Noto (NaN for data without both sets, e.g. an image folder)."""
        ref = self.reduce(self.feats[self.default])
        twemoji, noto = ref[self.sources == "twitter"], ref[self.sources == "google"]
        return frechet(twemoji, noto) if min(len(twemoji), len(noto)) > 1 else float("nan")

    def score(self, fake: np.ndarray, fake_labels: np.ndarray) -> dict[str, Any]:
        """Retrieval over all generated images; FID on one generated image per class (class c's
        samples are consecutive; its (c mod n)-th of n is taken, so that when a request's images
        alternate styles, half the classes show each style, as the real renderings do), against
        both sets' renderings and (a stricter, one-style reference) each set alone."""
        f = features(self.tokenizer, fake)
        metrics = retrieval(f, fake_labels, self.feats, self.labels)
        classes, first, counts = np.unique(fake_labels, return_index=True, return_counts=True)
        ref, gen = self.reduce(self.feats[self.default]), self.reduce(f[first + classes % counts])
        metrics["fid"] = frechet(ref, gen)
        for name, source in (("fid_vs_twemoji", "twitter"), ("fid_vs_noto", "google")):
            one = ref[self.sources == source]
            metrics[name] = frechet(one, gen) if len(one) > 1 else float("nan")
        return metrics


def generate_images(pipe: EARPipeline, class_ids: list[int], settings: dict[str, Any], seed: int,
                    batch: int = 64) -> np.ndarray:
    """uint8 (N, S, S, 3) at the tokenizer's native resolution."""
    size = pipe.tokenizer.image_size
    out = []
    for i in range(0, len(class_ids), batch):
        images = pipe.generate(class_ids[i:i + batch], seed=seed + i, display_size=size, **settings)
        out += [np.asarray(im.convert("RGB")) for im in images]
    return np.stack(out)


VARIETY_SEEDS = 8


def distinct_count(images: np.ndarray, threshold: float = DISTINCT) -> int:
    """Greedy count over images in order: one is new if it differs (mean absolute difference >
    threshold) from every earlier image."""
    d = mean_abs_diff(images, images)
    return sum(1 for i in range(len(images)) if (d[i, :i] > threshold).all())


def seed_images(pipe: EARPipeline, class_ids: list[int], settings: dict[str, Any], style: str | None,
                seeds: int = VARIETY_SEEDS, batch: int = 64) -> np.ndarray:
    """uint8 (C, seeds, S, S, 3): for each class the single image that seeds 0..seeds-1 give (what
    `pipe.generate([c], seed=s, style=style)` draws), batched with per-row seeds."""
    size, renderer = pipe.tokenizer.image_size, pipe.renderer(pipe.tokenizer.image_size)
    rows = [(c, s) for c in class_ids for s in range(seeds)]
    out = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        labels = [pipe.labels([c], style, seed=s)[0] for c, s in chunk]
        states = pipe.sampler(pipe.model, labels, **settings, seed=[s for _, s in chunk],
                              row_ids=[0] * len(chunk))
        out += [np.asarray(im.convert("RGB")) for im in renderer.final(deque(states, maxlen=1)[0].tokens)]
    return np.stack(out).reshape(len(class_ids), seeds, size, size, 3)


def variety(pipe: EARPipeline, class_ids: list[int], settings: dict[str, Any], seeds: int = VARIETY_SEEDS
            ) -> tuple[dict[str, Any], np.ndarray]:
    """Mean distinct pictures per class among `seeds` seeds for style "Any" and each fixed style,
    and the "Any" samples (C, seeds, S, S, 3) for the novelty measure."""
    any_style = seed_images(pipe, class_ids, settings, None, seeds)
    result: dict[str, Any] = {"seeds": seeds, "threshold": DISTINCT,
                              "any": float(np.mean([distinct_count(s) for s in any_style]))}
    fixed = {name: float(np.mean([distinct_count(s) for s in seed_images(pipe, class_ids, settings, name,
                                                                           seeds)]))
             for name in pipe.styles}
    if fixed:
        result["fixed_style"] = fixed
        result["fixed_style_mean"] = float(np.mean(list(fixed.values())))
    return result, any_style


def region_scores(drawn: np.ndarray, original: np.ndarray, cells: np.ndarray) -> tuple[float, float]:
    """Mean PSNR (dB) and colour-histogram intersection (8 bins per channel, 1 = the same colours)
    over the pixels of the given (N, g, g) cells only: how close a redrawn or extended region
    comes to the real one (bench/bench_edit.py, bench/bench_extend.py)."""
    psnrs, hists = [], []
    for d, o, m in zip(drawn, original, cells, strict=True):
        scale = d.shape[0] // m.shape[0]
        pixels = np.repeat(np.repeat(m, scale, 0), scale, 1)
        a, b = d[pixels].astype(np.float64), o[pixels].astype(np.float64)
        mse = max(float(np.mean((a - b) ** 2)), 1e-10)
        psnrs.append(10 * np.log10(255.0 ** 2 / mse))
        ha, hb = (np.histogramdd(x, bins=8, range=[(0, 256)] * 3)[0].ravel() / len(x) for x in (a, b))
        hists.append(float(np.minimum(ha, hb).sum()))
    return float(np.mean(psnrs)), float(np.mean(hists))


def novelty(samples: np.ndarray, train: np.ndarray, threshold: float = DISTINCT,
            reference: int = 1000) -> dict[str, float]:
    """Samples' distance (mean absolute difference) to their nearest training image against the
    training images' distance to their nearest other training image (medians), and the share of
    samples within `threshold` of a training image (copies). The training images' own median is
    taken over at most `reference` of them (a fixed, evenly spread subset), each against the whole
    set: all pairs of the photo model's 7,520 crops would take a quarter of an hour."""
    to_train = mean_abs_diff(samples, train).min(1)
    picked = np.linspace(0, len(train) - 1, min(reference, len(train))).astype(int)
    own = mean_abs_diff(train[picked], train)
    own[np.arange(len(picked)), picked] = np.inf
    train_nn = own.min(1)
    return {"sample_to_train_median": float(np.median(to_train)),
            "train_to_train_median": float(np.median(train_nn)),
            "ratio": float(np.median(to_train) / max(np.median(train_nn), 1e-12)),
            "copies": float((to_train <= threshold).mean())}


def speed(pipe: EARPipeline, settings: dict[str, Any], repeats: int = 5) -> float:
    """Median seconds per image at batch 1, all steps plus the final decode."""
    pipe.generate([0], seed=0, display_size=pipe.tokenizer.image_size, **settings)  # warm-up
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        pipe.generate([r % len(pipe.class_names)], seed=r, display_size=pipe.tokenizer.image_size, **settings)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def choose_default(sweep: list[dict[str, Any]]) -> dict[str, Any]:
    """Lowest FID among settings whose retrieval is within 90 % of the best: the right emoji first,
    then realism."""
    best = max(s["top1"] for s in sweep)
    eligible = [s for s in sweep if s["top1"] >= 0.9 * best]
    return min(eligible, key=lambda s: s["fid"])["settings"]


def tokenizer_metrics(tokenizer: ConvVQ, data: ImageDataset) -> dict[str, Any]:
    return {"all": reconstruction_stats(tokenizer, torch.from_numpy(data.images)),
            "heldout": reconstruction_stats(tokenizer, torch.from_numpy(data.split(heldout=True).images))
            if data.heldout.any() else None}


def as_trained(pipe: EARPipeline, data: ImageDataset) -> ImageDataset:
    """The images and labels the model was trained on: one label per (emoji, image set), or per
    (emoji, style, drawing) with the drawings' shifted copies (ear.train.data.drawing_dataset)."""
    if pipe.drawings > 1:
        return drawing_dataset(data, pipe.drawings)[0]
    return replace(data, labels=style_labels(data)[0]) if pipe.styles else data


def ear_metrics(pipe: EARPipeline, trained: ImageDataset, seed: int) -> dict[str, float]:
    """Nats/token on (up to 1,500) training grids and held-out grids, and the unigram baseline;
    `trained`: the data as the model was trained on it (`as_trained`)."""
    train, held = ear_split(trained)
    rng = np.random.default_rng(seed)
    some = np.sort(rng.choice(len(train), min(len(train), 1500), replace=False))
    train_tokens = tokenize(pipe.tokenizer, torch.from_numpy(train.images[some]), 1, seed)[0]
    counts = torch.bincount(train_tokens.flatten().long(), minlength=pipe.tokenizer.codebook_size)
    logp = ((counts.double() + 1) / (counts.sum() + len(counts))).log()  # add-one: no infinite costs
    held_tokens = tokenize(pipe.tokenizer, torch.from_numpy(held.images), 1, seed)[0]
    model = pipe.model.float()
    return {"train_nats_per_token": token_loss(model, train_tokens, torch.from_numpy(train.labels[some])),
            "heldout_nats_per_token": token_loss(model, held_tokens, torch.from_numpy(held.labels)),
            "unigram_train_nats_per_token": float(-logp[train_tokens.flatten().long()].mean())}


def sheet(pipe: EARPipeline, data: ImageDataset, classes: list[int], settings: dict[str, Any],
          per_row: int = VARIETY_SEEDS, size: int = 80, columns: int = 1) -> Any:
    """Per emoji: its name, one rendering per image set (left of the bar), then what seeds
    0..per_row-1 give (one image each, style "Any": the page's Generate by seed); emoji laid out
    in `columns` blocks."""
    from PIL import Image, ImageDraw

    gap, label_h, bar = 4, 14, 8
    sets = list(dict.fromkeys(data.sources.tolist()))
    block_w = (len(sets) + per_row) * (size + gap) + bar
    rows = -(-len(classes) // columns)
    row_h = label_h + size + gap
    page = Image.new("RGB", (columns * block_w + gap * (columns + 1), rows * row_h + gap), "white")
    draw = ImageDraw.Draw(page)
    for n, c in enumerate(classes):
        x0, y = gap + (n // rows) * (block_w + gap), gap + (n % rows) * row_h
        draw.text((x0, y), pipe.class_names[c], fill=(30, 30, 30))
        # one column per set, left blank where a set has no drawing of this emoji (an older release)
        real = [next(iter(data.images[(data.labels == c) & (data.sources == s)]), None) for s in sets]
        fakes = seed_images(pipe, [c], settings, None, per_row)[0]
        for i, picture in enumerate([*real, *fakes]):
            if picture is None:
                continue
            tile = Image.fromarray(picture).resize((size, size), Image.Resampling.LANCZOS)
            x = x0 + i * (size + gap) + (bar if i >= len(real) else 0)
            page.paste(tile.convert("RGB"), (x, y + label_h))
        bx = x0 + len(real) * (size + gap) + bar // 2 - 2
        draw.rectangle((bx - 1, y + label_h, bx + 1, y + label_h + size), fill=(150, 150, 150))
    return page


def write_media(pipe: EARPipeline, data: ImageDataset, folder: Path, settings: dict[str, Any],
                classes: list[int], seed: int) -> None:
    """samples.png (real renderings next to generated ones) and growth.gif (four classes growing)."""
    from ear.preview import make_grid, save_animation

    page = sheet(pipe, data, classes, settings)
    tmp = folder / "samples.tmp.png"
    page.save(tmp)
    tmp.replace(folder / "samples.png")
    frames = [make_grid(f.images, gap=4) for f in
              pipe.stream(classes[:4], seed=seed, display_size=128, **settings)]
    save_animation(frames, folder / "growth.gif", fps=6, hold_last=2.0)
    for name in ("samples.png", "growth.gif"):
        (folder / name).chmod(0o644)


def sweep_settings(pipe: EARPipeline, ruler: Ruler, num_classes: int, per_class: int, seed: int
                   ) -> list[dict[str, Any]]:
    labels = np.repeat(np.arange(num_classes), per_class)
    results = []
    for cfg, temp, k, top_p in SWEEP:
        settings = {"cfg_scale": cfg, "temperature": temp, "top_k": k, "top_p": top_p}
        m = ruler.score(generate_images(pipe, labels.tolist(), settings, seed), labels)
        results.append({"settings": settings, "top1": m["top1"], "fid": m["fid"]})
        print(json.dumps(results[-1]), flush=True)
    return results


def best_drawn(per_class: dict[int, float], candidates: list[int]) -> int:
    """The showcase class with the highest retrieval rate (first in showcase order on ties)."""
    return max(candidates, key=lambda c: per_class.get(c, 0.0))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ear.train.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--asset", default="assets/ear-emoji")
    p.add_argument("--data", default="emoji")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--classes", default="familiar", dest="class_set")
    p.add_argument("--min-class-size", type=int, default=20)
    p.add_argument("--sets", default=None, help="emoji image sets (as for training; default: those the "
                                                "asset's config.json names, else twitter,google)")
    p.add_argument("--out", default="runs/eval", help="where metrics.json goes")
    p.add_argument("--samples-per-class", type=int, default=4)
    p.add_argument("--fid-dims", type=int, default=64)
    p.add_argument("--sweep", action="store_true", help="pick the default preset and store it")
    p.add_argument("--sweep-per-class", type=int, default=1)
    p.add_argument("--media", action="store_true",
                   help="write samples.png and growth.gif, and store the best-drawn showcase class as "
                        "the config's default_class")
    p.add_argument("--media-classes", nargs="+", default=list(SHOWCASE),
                   help="class names for samples.png (the first four also grow in growth.gif)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    asset, out = Path(args.asset), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((asset / "config.json").read_text())
    if args.sets is None:
        args.sets = asset_sets(config)
    data = dataset_from_args(args)
    pipe = EARPipeline.from_pretrained(str(asset), device="cpu")
    if pipe.class_names != data.class_names:
        raise ValueError(f"{asset} was trained on other classes than --data/--classes give")
    trained = as_trained(pipe, data)
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {"classes": len(data.class_names), "images": len(data),
                               "ear_parameters": pipe.model.num_params(),
                               "tokenizer_parameters": sum(q.numel() for q in pipe.tokenizer.parameters()),
                               "tokenizer": tokenizer_metrics(pipe.tokenizer, data),
                               "ear": ear_metrics(pipe, trained, args.seed)}
    ruler = Ruler(pipe.tokenizer, data, args.fid_dims)
    metrics["fid_twemoji_vs_noto"] = ruler.real_vs_real()

    updates: dict[str, Any] = {}
    if args.sweep:
        metrics["sweep"] = sweep_settings(pipe, ruler, len(data.class_names), args.sweep_per_class,
                                          args.seed + 1)
        updates["presets"] = {**config.get("presets", {}), "default": choose_default(metrics["sweep"])}
    default = dict((updates.get("presets") or config["presets"])["default"])
    metrics["default_settings"] = default

    labels = np.repeat(np.arange(len(data.class_names)), args.samples_per_class)
    scored = ruler.score(generate_images(pipe, labels.tolist(), default, args.seed + 2), labels)
    per_class = scored.pop("per_class")
    metrics["samples"] = scored
    metrics["per_class_top1"] = {data.class_names[c]: a for c, a in per_class.items()}
    classes = list(range(len(data.class_names)))
    metrics["variety"], any_style = variety(pipe, classes, default)
    metrics["novelty"] = novelty(any_style.reshape(-1, *any_style.shape[2:]),
                                 ear_split(trained)[0].images)
    metrics["seconds_per_image_batch1"] = speed(pipe, default)
    if args.media:
        shown = [pipe.class_id(c) for c in args.media_classes if c in data.class_names]
        shown = shown or list(range(min(16, len(data.class_names))))
        write_media(pipe, data, asset, default, shown, args.seed)
        updates["default_class"] = data.class_names[best_drawn(per_class, shown)]
        metrics["showcase_top1"] = {data.class_names[c]: per_class[c] for c in shown}
    if updates:
        update_asset(asset, {}, updates)
    metrics["eval_seconds"] = time.perf_counter() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("sweep", "per_class_top1")}, indent=2))
    return metrics


if __name__ == "__main__":
    main()
