"""Stage 2: train the EAR transformer on token grids from a trained tokenizer.

Images are tokenized once up front (copy 0 plain, further copies shifted/zoomed) and cached in the
run folder, keyed by the tokenizer's weights: on a CPU the tokenizer's encoder would otherwise cost
as much as the transformer step itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ear.model import EAR, EARConfig
from ear.refine import repair_accuracy
from ear.tokenizer.conv_vq import ConvVQ
from ear.train.common import (
    EMA,
    Progress,
    augment,
    batch_indices,
    half_state_dict,
    make_accelerator,
    prepare_training,
    to_float,
    train_loop,
    update_asset,
    warm_start,
)
from ear.train.data import (
    CLASS_ALIASES,
    EMOJI_SETS,
    FLUENT_SETS,
    SHOWCASE,
    ImageDataset,
    attribution_text,
    dataset_from_args,
    drawing_dataset,
    style_labels,
)
from ear.train.photos import SCENE_SHOWCASE, WEIGHTS_LICENCE_PHOTO, attribution_markdown
from ear.train.stage_tokenizer import load_tokenizer, tokenizer_asset_config

# until `python -m ear.train.evaluate --sweep` picks one: per-emoji classes are hurt by guidance
DEFAULT_PRESET = {"cfg_scale": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
WEIGHTS_LICENCE = ("CC-BY-4.0 for the weights (trained on Twemoji, CC-BY 4.0, and Noto Emoji, "
                   "Apache-2.0; see ATTRIBUTION.md); code MIT")
WEIGHTS_LICENCE_FLUENT = ("CC-BY-4.0 for the weights (trained on Twemoji, CC-BY 4.0, Noto Emoji, "
                          "Apache-2.0, and Microsoft's Fluent Emoji, MIT; see ATTRIBUTION.md); code MIT")


class LossOnly(nn.Module):
    """Routes the training losses through forward(), the only entry point DDP synchronises
    gradients for: (generation loss, correction loss or None without the correction objective)."""

    def __init__(self, model: EAR, corruption: float = 0.3, noise_share: float = 0.2) -> None:
        super().__init__()
        self.model = model
        self.corruption, self.noise_share = corruption, noise_share

    def forward(self, tokens: torch.Tensor,
                class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model.training_losses(tokens, class_ids, self.corruption, self.noise_share)


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def tokenize(tokenizer: ConvVQ, images: torch.Tensor, copies: int, seed: int,
             batch: int = 256) -> torch.Tensor:
    """uint8 images (N, S, S, 3) -> int16 tokens (copies, N, g*g), raster layout."""
    out = []
    for c in range(copies):
        gen = torch.Generator().manual_seed(seed * 7919 + c)
        chunks = []
        for i in range(0, len(images), batch):
            x = to_float(images[i:i + batch])
            if c:
                x = augment(x, gen)
            chunks.append(tokenizer.encode(x).flatten(1).to(torch.int16))
        empty = torch.zeros(0, tokenizer.grid_size**2, dtype=torch.int16)
        out.append(torch.cat(chunks) if chunks else empty)
    return torch.stack(out)


def cached_tokens(run_dir: Path, tokenizer: ConvVQ, images: torch.Tensor, copies: int, seed: int,
                  tag: str) -> torch.Tensor:
    key = f"{tag}-{weights_digest(tokenizer)}-{len(images)}-{copies}-{seed}"
    path = run_dir / f"tokens-{tag}.pt"
    if path.is_file():
        saved = torch.load(path)
        if saved["key"] == key:
            return saved["tokens"]
    tokens = tokenize(tokenizer, images, copies, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "tokens": tokens}, path)
    return tokens


@torch.no_grad()
def token_loss(model: EAR, tokens: torch.Tensor, labels: torch.Tensor, batch: int = 64) -> float:
    """Mean cross-entropy (nats/token) with true labels, eval mode (no label dropout); NaN when
    there is nothing to score (every held-out emoji is a class of its own)."""
    if not len(labels):
        return float("nan")
    model.eval()
    total = 0.0
    for i in range(0, len(labels), batch):
        t, y = tokens[i:i + batch].long(), labels[i:i + batch]
        total += float(model.loss(t, y)) * len(y)
    return total / len(labels)


def class_balanced(labels: torch.Tensor) -> torch.Tensor:
    """Indices into `labels` that repeat each sequence so every class comes up about equally
    often. Why: an emoji with skin tones has 12 images where most have 2, and would otherwise take
    a sixfold share of a short training run."""
    counts = torch.bincount(labels)
    repeats = (counts.max() / counts[labels]).round().clamp_min(1).long()
    return torch.repeat_interleave(torch.arange(len(labels)), repeats)


def ear_split(data: ImageDataset) -> tuple[ImageDataset, ImageDataset]:
    """(training, held-out) for the EAR: held-out images whose class has no training image join the
    training set. With per-emoji classes a held-out emoji is a whole class, and a class-conditional
    model cannot draw a class it never saw; the tokenizer still holds those emoji out."""
    seen = np.unique(data.labels[~data.heldout])
    held = data.heldout & np.isin(data.labels, seen)
    return data.subset(~held), data.subset(held)


def tile_class_table(model: EAR, weights: Path, num_classes: int) -> bool:
    """Start the class table from `weights`' table for the same classes with fewer label blocks
    (a block: num_classes rows, one per class): a model without styles, or with styles but one
    drawing each (ear.train.data.drawing_dataset). New block b starts from old block
    b // (new blocks / old blocks), so every style's drawings start from that style's row; the
    null row stays the null row. True if the table was tiled."""
    from safetensors.torch import load_file

    key = "cls_embedding.embedding_table.weight"
    old, table = load_file(str(weights)).get(key), model.cls_embedding.embedding_table.weight
    blocks = (table.shape[0] - 1) // num_classes
    if old is None or old.shape[1] != table.shape[1] or (old.shape[0] - 1) % num_classes:
        return False
    known = (old.shape[0] - 1) // num_classes
    if blocks == known or known == 0 or blocks % known:
        return False
    rows = old[:-1].view(known, num_classes, -1).repeat_interleave(blocks // known, dim=0)
    with torch.no_grad():
        table.copy_(torch.cat([rows.reshape(-1, old.shape[1]), old[-1:]]).to(table))
    return True


def split_class_table(model: EAR, weights: Path) -> bool:
    """Start a shared class + style embedding from `weights`' one-row-per-(class, style) table (the
    old styled layout, same class order, its styles first in the new order): class row c = the mean
    of c's old rows, style row s = the mean over classes of (old row - class row), new styles at 0.
    So every old label's vector is kept up to what the two parts cannot express. True if split."""
    from safetensors.torch import load_file

    emb = model.cls_embedding
    old = load_file(str(weights)).get("cls_embedding.embedding_table.weight")
    n, styles = model.config.num_classes, model.config.num_styles
    null = int(emb.has_null)
    if emb.style_table is None or old is None or (old.shape[0] - null) % n \
            or old.shape[1] != model.config.dim:
        return False
    known = (old.shape[0] - null) // n
    if not 1 < known <= styles:
        return False
    rows = old[:known * n].float().view(known, n, -1)
    classes = rows.mean(0)
    with torch.no_grad():
        emb.embedding_table.weight.copy_(torch.cat([classes, old[known * n:].float()]))
        emb.style_table.weight.zero_()
        emb.style_table.weight[:known] = (rows - classes).mean(1)
    return True


def weights_licence(sources: set[str]) -> str:
    if "photo" in sources:
        return WEIGHTS_LICENCE_PHOTO
    return WEIGHTS_LICENCE_FLUENT if sources & set(FLUENT_SETS) else WEIGHTS_LICENCE


def ear_asset_config(model: EAR, class_names: list[str], name: str, sources: set[str],
                     styles: list[str], drawings: int = 1) -> dict:
    """The model's part of config.json. default_class and class_aliases are always rewritten so a
    re-export with another class set never leaves a stale name behind (evaluate --media then picks
    the best-drawn showcase class as the default)."""
    shown = [c for c in (*SHOWCASE, *SCENE_SHOWCASE) if c in class_names]
    return {"name": name, "model": model.config.to_dict(), "class_names": class_names, "styles": styles,
            **({"drawings": drawings} if drawings > 1 else {}),
            **({"image_sets": [s for s in EMOJI_SETS if s in sources]} if sources <= set(EMOJI_SETS) else {}),
            "default_class": shown[0] if shown else class_names[0],
            "class_aliases": {k: v for k, v in CLASS_ALIASES.items() if v in class_names},
            "presets": {"default": dict(DEFAULT_PRESET)},
            "licence": weights_licence(sources),
            "attribution": attribution_text(sources)}


def train(args: argparse.Namespace) -> dict[str, float]:
    if not (0 <= args.corruption <= 1 and 0 <= args.corruption_noise <= 1):
        raise ValueError(f"--corruption and --corruption-noise must lie in [0, 1], got {args.corruption} "
                         f"and {args.corruption_noise}")
    accelerator = make_accelerator(args.mixed_precision, args.seed)
    run_dir = Path(args.run_dir)
    data = dataset_from_args(args)
    styles: list[str] = []
    if args.drawings > 1:
        if not args.style_classes:
            raise ValueError("--drawings gives each style's pictures their own class embeddings: "
                             "use it with --style-classes")
        data, styles = drawing_dataset(data, args.drawings)
    elif args.style_classes or args.shared_styles:
        labels, styles = style_labels(data)
        data = replace(data, labels=labels)
    train_set, heldout_set = ear_split(data)
    tokenizer = load_tokenizer(Path(args.tokenizer))
    # every process tokenizes (cheap relative to training, and no file race on shared disks)
    tokens = cached_tokens(run_dir, tokenizer, torch.from_numpy(train_set.images), args.aug_copies,
                           args.seed, f"train-r{accelerator.process_index}")
    copies, n, length = tokens.shape
    tokens = tokens.reshape(copies * n, length)
    labels = torch.from_numpy(train_set.labels).repeat(copies)
    pool = class_balanced(labels) if args.balance_classes else torch.arange(len(labels))
    held_tokens = tokenize(tokenizer, torch.from_numpy(heldout_set.images), 1, args.seed)[0]
    held_labels = torch.from_numpy(heldout_set.labels)

    shared = len(styles) if args.shared_styles else 0
    blocks = max(1, len(styles)) * args.drawings  # label blocks of one row per class
    config = EARConfig(dim=args.dim, n_layer=args.n_layer, n_head=args.n_head,
                       vocab_size=tokenizer.codebook_size,
                       num_classes=len(data.class_names) * (1 if shared else blocks),
                       num_styles=shared,
                       grid_size=tokenizer.grid_size, schedule=args.schedule, adaln=args.adaln,
                       class_dropout_prob=args.class_dropout, dropout=args.dropout, rope=args.rope,
                       multiple_of=args.multiple_of, correction=args.correction)
    model = EAR(config)
    if args.init_from:
        weights = Path(args.init_from) / "ear.safetensors"
        fresh = warm_start(model, weights)
        if shared:
            if split_class_table(model, weights):
                fresh = [k for k in fresh if not k.startswith("cls_embedding.")]
        elif tile_class_table(model, weights, len(data.class_names)):
            fresh.remove("cls_embedding.embedding_table.weight")
        accelerator.print(f"warm start from {args.init_from}; fresh: {fresh or 'none'}")
    accelerator.print(f"EAR parameters: {model.num_params() / 1e6:.2f} M, training sequences: {len(labels)}")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    progress = Progress()
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    ema = EMA(model, args.ema)
    losses = LossOnly(model, args.corruption, args.corruption_noise)
    wrapped, optimizer, scheduler = prepare_training(accelerator, losses, optimizer, ema, progress, args,
                                                     run_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    smooth: dict[str, float] = {}

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, str]]:
        idx = pool[batch_indices(len(pool), args.batch, step, args.seed, rank, world)]
        loss, fix = wrapped(tokens[idx].long().to(accelerator.device), labels[idx].to(accelerator.device))
        for name, value in (("loss", loss), ("fix", fix)):
            if value is not None:
                old = smooth.get(name, value.item())
                smooth[name] = 0.95 * old + 0.05 * value.item()
        return loss if fix is None else loss + fix, {k: f"{v:.3f}" for k, v in smooth.items()}

    train_loop(accelerator, wrapped, optimizer, scheduler, ema,
               lambda: accelerator.unwrap_model(wrapped).model, progress, args, run_dir, desc="ear",
               step_loss=step_loss,
               on_save=lambda: export(run_dir, ema.model, tokenizer, data, args.name, styles, args.drawings))

    plain = torch.arange(min(n, 512))  # copy 0 (unaugmented) of the first training images
    stats = {"heldout_loss": token_loss(ema.model.cpu(), held_tokens, held_labels),
             "train_loss": token_loss(ema.model, tokens[plain], labels[plain]),
             "train_seconds": progress.seconds, "steps": progress.step,
             "parameters": ema.model.num_params()}
    if config.correction and len(held_labels):  # how well it repairs its own parallel draws
        stats["heldout_corrupted_accuracy"], stats["heldout_corrected_accuracy"] = repair_accuracy(
            ema.model, held_tokens[:512], held_labels[:512], args.corruption, args.corruption_noise)
    if accelerator.is_main_process:
        (run_dir / "ear_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        if args.export:
            export(Path(args.export), ema.model, tokenizer, data, args.name, styles, args.drawings)
        accelerator.print(json.dumps(stats))
    return stats


def export(folder: Path, model: EAR, tokenizer: ConvVQ, data: ImageDataset, name: str,
           styles: list[str], drawings: int = 1) -> None:
    """EAR + the exact tokenizer it was trained on, so the asset folder is always consistent."""
    sources = set(data.sources.tolist())
    config = {**tokenizer_asset_config(tokenizer, data),
              **ear_asset_config(model, data.class_names, name, sources, styles, drawings)}
    update_asset(folder, {"ear": half_state_dict(model), "tokenizer": half_state_dict(tokenizer)}, config)
    if "photo" in sources:  # the credits CC-BY and CC-BY-SA ask for travel with the weights
        (folder / "ATTRIBUTION.md").write_text(attribution_markdown(), encoding="utf-8")
