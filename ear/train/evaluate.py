"""Metrics for a trained asset folder, the default-setting sweep, samples.png and growth.gif.

    python -m ear.train.evaluate --asset assets/ear-emoji --out runs/eval [--sweep] [--media]

What is measured and why:
- tokenizer: held-out PSNR and codebook usage (fraction used, perplexity of code frequencies);
- EAR: held-out cross-entropy (nats/token) next to the unigram baseline (the entropy a model that
  ignores all context would reach), so the number says how much context the model uses;
- a small emoji classifier trained here on real images (no pretrained nets can be downloaded):
  its held-out accuracy says how hard the class set is; its accuracy on generated images says
  whether the class conditioning works, next to the same images scored against shuffled labels;
- "emoji FID": Fréchet distance between real and generated images in the classifier's feature
  space; per class (matched) and against shuffled classes, where features are first reduced by
  PCA so the small per-class samples give usable covariances;
- speed: seconds per image at batch 1 (all 31 steps + decode) with the default settings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ear.pipeline import EARPipeline
from ear.train.common import augment, to_float, update_asset
from ear.train.data import ImageDataset, load_dataset
from ear.train.stage_ear import heldout_loss, tokenize
from ear.train.stage_tokenizer import reconstruction_stats

SWEEP = [  # (cfg_scale, temperature, top_k, top_p)
    (1.0, 1.0, 0, 1.0), (2.0, 1.0, 0, 1.0), (3.0, 1.0, 0, 1.0), (5.0, 1.0, 0, 1.0),
    (3.0, 0.9, 0, 1.0), (3.0, 1.0, 64, 1.0), (3.0, 1.0, 0, 0.9), (5.0, 0.9, 0, 0.95),
]

SHOWCASE = ("Smileys & Emotion (other)", "country-flag", "person-role", "time", "face-concerned",
            "transport-ground", "heart", "sky & weather")


class EmojiClassifier(nn.Module):
    """Four conv stages and global pooling; the pooled 96-d vector is the FID feature."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (16, 32, 64, 96)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(widths):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(data: ImageDataset, epochs: int, seed: int, batch: int = 64) -> EmojiClassifier:
    train = data.split(heldout=False)
    images, labels = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    torch.manual_seed(seed)
    model = EmojiClassifier(len(data.class_names))
    steps = epochs * (len(labels) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (batch,), generator=gen)
        loss = F.cross_entropy(model(augment(to_float(images[idx]), gen)), labels[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def classify(model: EmojiClassifier, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, S, S, 3) -> (predicted labels (N,), features (N, D))."""
    preds, feats = [], []
    for i in range(0, len(images), batch):
        f = model.features(to_float(torch.from_numpy(images[i:i + batch])))
        feats.append(f)
        preds.append(model.head(f).argmax(1))
    return torch.cat(preds).numpy(), torch.cat(feats).double().numpy()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (symmetric square roots via
    eigendecompositions, stable for rank-deficient covariances)."""
    mu = a.mean(0) - b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    cross = np.linalg.eigvalsh(root1 @ s2 @ root1).clip(min=0)
    return float(mu @ mu + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(cross).sum())


def pca(reference: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    mean = reference.mean(0)
    _, _, vt = np.linalg.svd(reference - mean, full_matrices=False)
    return mean, vt[:dims].T


def generate_images(pipe: EARPipeline, class_ids: list[int], settings: dict[str, Any], seed: int,
                    batch: int = 64) -> np.ndarray:
    """uint8 (N, S, S, 3) at the tokenizer's native resolution."""
    size = pipe.tokenizer.image_size
    out = []
    for i in range(0, len(class_ids), batch):
        images = pipe.generate(class_ids[i:i + batch], seed=seed + i, display_size=size, **settings)
        out += [np.asarray(im.convert("RGB")) for im in images]
    return np.stack(out)


def sample_metrics(classifier: EmojiClassifier, real: ImageDataset, fake: np.ndarray, fake_labels: np.ndarray,
                   seed: int, pca_dims: int = 16) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    pred, feats = classify(classifier, fake)
    _, real_feats = classify(classifier, real.images)
    shuffled = rng.permutation(fake_labels)
    metrics: dict[str, Any] = {
        "accuracy": float((pred == fake_labels).mean()),
        "accuracy_shuffled_labels": float((pred == shuffled).mean()),
        "fid": frechet(real_feats, feats),
    }
    mean, proj = pca(real_feats, pca_dims)
    r, g = (real_feats - mean) @ proj, (feats - mean) @ proj
    classes = [c for c in np.unique(fake_labels) if (real.labels == c).sum() >= 4]
    perm = {c: classes[(i + 1 + rng.integers(len(classes) - 1)) % len(classes)]
            for i, c in enumerate(classes)} if len(classes) > 1 else {}
    matched = [frechet(r[real.labels == c], g[fake_labels == c]) for c in classes]
    crossed = [frechet(r[real.labels == perm[c]], g[fake_labels == c]) for c in perm]
    metrics["class_fid_pca"] = float(np.mean(matched))
    metrics["class_fid_pca_shuffled"] = float(np.mean(crossed)) if crossed else float("nan")
    metrics["per_class_accuracy"] = {int(c): float((pred[fake_labels == c] == c).mean())
                                     for c in np.unique(fake_labels)}
    return metrics


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
    """Lowest FID among settings whose accuracy is within 90 % of the best: class fidelity first,
    then realism."""
    best_acc = max(s["accuracy"] for s in sweep)
    eligible = [s for s in sweep if s["accuracy"] >= 0.9 * best_acc]
    return min(eligible, key=lambda s: s["fid"])["settings"]


def write_media(pipe: EARPipeline, folder: Path, settings: dict[str, Any], classes: list[int],
                seed: int, per_row: int = 6, size: int = 96) -> None:
    """samples.png (one labelled row per class) and growth.gif (four classes growing step by step)."""
    from PIL import Image, ImageDraw

    from ear.preview import make_grid, save_animation

    gap, label_h = 4, 16
    row_h = label_h + size + gap
    sheet = Image.new("RGB", (per_row * (size + gap) + gap, len(classes) * row_h + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for r, c in enumerate(classes):
        y = gap + r * row_h
        draw.text((gap, y + 2), pipe.class_names[c], fill=(40, 40, 40))
        for i, image in enumerate(pipe.generate([c] * per_row, seed=seed + c, display_size=size, **settings)):
            sheet.paste(image.convert("RGB"), (gap + i * (size + gap), y + label_h))
    sheet.save(folder / "samples.png")
    frames = [make_grid(f.images, gap=4) for f in
              pipe.stream(classes[:4], seed=seed, display_size=128, **settings)]
    save_animation(frames, folder / "growth.gif", fps=6, hold_last=2.0)
    for name in ("samples.png", "growth.gif"):
        (folder / name).chmod(0o644)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m ear.train.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--asset", default="assets/ear-emoji")
    p.add_argument("--data", default="emoji")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--min-class-size", type=int, default=20)
    p.add_argument("--out", default="runs/eval", help="metrics.json and the cached classifier")
    p.add_argument("--samples-per-class", type=int, default=12)
    p.add_argument("--sweep", action="store_true", help="pick the default preset and store it")
    p.add_argument("--sweep-per-class", type=int, default=3)
    p.add_argument("--classifier-epochs", type=int, default=6)
    p.add_argument("--media", action="store_true", help="write samples.png and growth.gif")
    p.add_argument("--media-classes", nargs="+", default=list(SHOWCASE),
                   help="class names for samples.png (the first four also grow in growth.gif)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    asset, out = Path(args.asset), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.data, args.cache_dir, min_class_size=args.min_class_size)
    train, held = data.split(heldout=False), data.split(heldout=True)
    pipe = EARPipeline.from_pretrained(str(asset), device="cpu")
    metrics: dict[str, Any] = {"classes": len(data.class_names), "train_images": len(train),
                               "heldout_images": len(held),
                               "ear_parameters": pipe.model.num_params(),
                               "tokenizer_parameters": sum(q.numel() for q in pipe.tokenizer.parameters())}
    t0 = time.perf_counter()

    metrics["tokenizer"] = reconstruction_stats(pipe.tokenizer, torch.from_numpy(held.images))
    held_tokens = tokenize(pipe.tokenizer, torch.from_numpy(held.images), 1, args.seed)[0]
    rng = np.random.default_rng(args.seed)
    some = np.sort(rng.choice(len(train), min(len(train), 1500), replace=False))
    train_tokens = tokenize(pipe.tokenizer, torch.from_numpy(train.images[some]), 1, args.seed)[0]
    counts = torch.bincount(train_tokens.flatten().long(), minlength=pipe.tokenizer.codebook_size)
    counts = counts.double() + 1  # add-one smoothing: unseen codes must not cost infinity
    logp = (counts / counts.sum()).log()
    metrics["ear_heldout_nats_per_token"] = heldout_loss(pipe.model.float(), held_tokens,
                                                         torch.from_numpy(held.labels))
    metrics["unigram_heldout_nats_per_token"] = float(-logp[held_tokens.flatten().long()].mean())

    clf_path = out / "classifier.pt"
    if clf_path.is_file():
        classifier = EmojiClassifier(len(data.class_names))
        classifier.load_state_dict(torch.load(clf_path))
        classifier.eval()
    else:
        classifier = train_classifier(data, args.classifier_epochs, args.seed)
        torch.save(classifier.state_dict(), clf_path)
    held_pred, _ = classify(classifier, held.images)
    metrics["classifier_heldout_accuracy"] = float((held_pred == held.labels).mean())
    _, train_f = classify(classifier, train.images)
    _, held_f = classify(classifier, held.images)
    metrics["fid_real_train_vs_heldout"] = frechet(train_f, held_f)

    config = json.loads((asset / "config.json").read_text())
    if args.sweep:
        labels = np.repeat(np.arange(len(data.class_names)), args.sweep_per_class)
        results = []
        for cfg, temp, k, top_p in SWEEP:
            settings = {"cfg_scale": cfg, "temperature": temp, "top_k": k, "top_p": top_p}
            fake = generate_images(pipe, labels.tolist(), settings, args.seed + 1)
            m = sample_metrics(classifier, data, fake, labels, args.seed)
            results.append({"settings": settings, "accuracy": m["accuracy"], "fid": m["fid"]})
            print(json.dumps(results[-1]), flush=True)
        metrics["sweep"] = results
        config["presets"]["default"] = choose_default(results)
        update_asset(asset, {}, {"presets": config["presets"]})
    default = dict(config["presets"]["default"])
    metrics["default_settings"] = default

    labels = np.repeat(np.arange(len(data.class_names)), args.samples_per_class)
    fake = generate_images(pipe, labels.tolist(), default, args.seed + 2)
    metrics["samples"] = sample_metrics(classifier, data, fake, labels, args.seed)
    metrics["samples"]["per_class_accuracy"] = {data.class_names[c]: a for c, a in
                                                metrics["samples"]["per_class_accuracy"].items()}
    metrics["seconds_per_image_batch1"] = speed(pipe, default)
    if args.media:
        shown = [pipe.class_id(c) for c in args.media_classes if c in data.class_names]
        write_media(pipe, asset, default, shown or list(range(min(8, len(data.class_names)))), args.seed)
    metrics["eval_seconds"] = time.perf_counter() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("sweep", "samples")}, indent=2))
    return metrics


if __name__ == "__main__":
    main()
