"""Stage 1: train the ConvVQ tokenizer (pixel L1 + L2 + commitment; the codebook follows by EMA)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ear.tokenizer.conv_vq import ConvVQ, ConvVQConfig
from ear.train.common import (
    EMA,
    Progress,
    augment,
    batch_indices,
    half_state_dict,
    make_accelerator,
    prepare_training,
    step_generator,
    to_float,
    train_loop,
    update_asset,
    warm_start,
)
from ear.train.data import ImageDataset, attribution_text, dataset_from_args


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4 / mse)


@torch.no_grad()
def reconstruction_stats(model: ConvVQ, images: torch.Tensor, batch: int = 128) -> dict[str, float]:
    """Mean PSNR and codebook usage (fraction of codes used, perplexity of code frequencies); NaN
    for no images (a tiny data set may hold nothing out)."""
    if not len(images):
        return {"psnr": float("nan"), "codebook_used": float("nan"), "perplexity": float("nan")}
    model.eval()
    scores, counts = [], torch.zeros(model.codebook_size)
    for i in range(0, len(images), batch):
        x = to_float(images[i:i + batch])
        ids = model.encode(x)
        scores.append(psnr(model.decode(ids), x))
        counts += torch.bincount(ids.flatten(), minlength=model.codebook_size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"psnr": float(torch.cat(scores).mean()), "codebook_used": float((counts > 0).float().mean()),
            "perplexity": float(entropy.exp())}


def random_crop(images: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One random crop per batch on the token grid (multiples of 4 px). The tokenizer is fully
    local (no spatial normalisation), so crops train it for whole images at a quarter of the cost."""
    s = images.shape[-1]
    if size >= s:
        return images
    y, x = (torch.randint(0, (s - size) // 4 + 1, (2,), generator=gen) * 4).tolist()
    return images[..., y:y + size, x:x + size]


def load_tokenizer(folder: Path) -> ConvVQ:
    """A ConvVQ from an asset or run folder (config.json["tokenizer"] + tokenizer.safetensors)."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())["tokenizer"]
    model = ConvVQ(ConvVQConfig.from_dict(config))
    state = {k: v.float() for k, v in load_file(str(folder / "tokenizer.safetensors")).items()}
    model.load_state_dict(state)
    return model.eval()


def tokenizer_asset_config(model: ConvVQ, data: ImageDataset) -> dict:
    return {"tokenizer": {"type": "conv_vq", **model.config.to_dict()},
            "attribution": attribution_text(set(data.sources.tolist()))}


def train(args: argparse.Namespace) -> dict[str, float]:
    accelerator = make_accelerator(args.mixed_precision, args.seed)
    run_dir = Path(args.run_dir)
    data = dataset_from_args(args)
    train_images = torch.from_numpy(data.split(heldout=False).images)
    heldout_images = torch.from_numpy(data.split(heldout=True).images)
    config = ConvVQConfig(codebook_size=args.codebook_size, codebook_dim=args.codebook_dim,
                          channels=tuple(args.channels))
    model = ConvVQ(config)
    if args.init_from:
        fresh = warm_start(model, Path(args.init_from) / "tokenizer.safetensors")
        accelerator.print(f"warm start from {args.init_from}; fresh: {fresh or 'none'}")
    progress = Progress()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=1e-4)
    ema = EMA(model, args.ema)
    model, optimizer, scheduler = prepare_training(accelerator, model, optimizer, ema, progress, args,
                                                   run_dir)
    rank, world = accelerator.process_index, accelerator.num_processes

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, str] | None]:
        idx = batch_indices(len(train_images), args.batch, step, args.seed, rank, world)
        gen = step_generator(args.seed, step, rank)
        x = random_crop(augment(to_float(train_images[idx]), gen), args.crop, gen).to(accelerator.device)
        out = model(x, frozen_codes=args.decoder_only)
        if step % 10:
            return out["loss"], None
        quality = float(psnr(out["recon"].detach().clamp(-1, 1), x).mean())
        return out["loss"], {"loss": f"{out['loss'].item():.4f}", "l1": f"{out['l1'].item():.4f}",
                             "psnr": f"{quality:.1f}"}

    def on_save() -> None:  # usable weights at every checkpoint
        update_asset(run_dir, {"tokenizer": half_state_dict(ema.model)},
                     tokenizer_asset_config(ema.model, data))

    train_loop(accelerator, model, optimizer, scheduler, ema, lambda: accelerator.unwrap_model(model),
               progress, args, run_dir, desc="tokenizer", step_loss=step_loss, on_save=on_save)

    stats = reconstruction_stats(ema.model.cpu(), heldout_images)
    stats.update(train_psnr=reconstruction_stats(ema.model, train_images)["psnr"],
                 train_seconds=progress.seconds, steps=progress.step)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        asset = tokenizer_asset_config(ema.model, data)
        (run_dir / "tokenizer_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        if args.export:
            update_asset(Path(args.export), {"tokenizer": half_state_dict(ema.model)}, asset)
        accelerator.print(json.dumps(stats))
    return stats
