"""Pieces both training stages share: accelerator setup, weight EMA, deterministic batching,
emoji-safe augmentation, checkpoints and asset export.

Batches are a pure function of (seed, step): a fresh permutation of the training set per epoch,
split across processes by rank. Resuming therefore continues the exact same stream without
pickling a data loader, and the same command gives the same run on 1 CPU or N GPUs (per process
batch = global batch / N).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

ASSET_FORMAT = "ear-studio/1"


def make_accelerator(mixed_precision: str, seed: int) -> Accelerator:
    """mixed_precision "auto": bf16 where a GPU is present, full precision on CPU (CPU bf16 is
    slower than fp32 without AMX and buys nothing here)."""
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=mixed_precision)
    torch.manual_seed(seed + accelerator.process_index)
    return accelerator


class EMA:
    """Exponential moving average of a model's float parameters; buffers are copied as they are
    (the VQ codebook is already an average). Warm-up keeps early steps from being frozen in."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


class Progress:
    """The global step, checkpointed with everything else."""

    def __init__(self) -> None:
        self.step = 0
        self.seconds = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.seconds = int(state["step"]), float(state["seconds"])


def batch_indices(n: int, batch: int, step: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """Indices of this process's share of global batch `step` (an epoch = one permutation)."""
    per_epoch = max(1, n // batch)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    if n < batch:  # tiny data sets (tests): sample with repetition to fill the batch
        perm = perm.repeat(math.ceil(batch / n))
    chunk = perm[i * batch:(i + 1) * batch] if n >= batch else perm[:batch]
    return chunk[rank::world]


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + rank)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1)


def augment(images: torch.Tensor, gen: torch.Generator, max_shift: float = 4.0,
            scale_range: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """Small random zoom and shift with white fill, float (B, 3, S, S) in [-1, 1].

    No horizontal flips: mirrored emoji are wrong emoji (text in keycaps and signs, flags, arrows,
    clock hands, left/right-handed gestures), and the model would learn to draw them."""
    b, _, s, _ = images.shape
    scale = torch.empty(b).uniform_(*scale_range, generator=gen)
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * (2 * max_shift / s)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # sample (x - 1) with zero padding and add 1 back: out-of-image pixels become white (+1)
    out = F.grid_sample(images - 1, grid.to(images), mode="bilinear", padding_mode="zeros",
                        align_corners=False) + 1
    return out.clamp(-1, 1)


def save_checkpoint(accelerator: Accelerator, run_dir: Path) -> None:
    """Model, optimiser, scheduler, RNG and registered objects (EMA, progress)."""
    accelerator.save_state(str(run_dir / "checkpoint"))


def load_checkpoint(accelerator: Accelerator, run_dir: Path) -> bool:
    path = run_dir / "checkpoint"
    if not path.is_dir():
        return False
    accelerator.load_state(str(path))
    return True


def half_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """float16 copy for shipping (halves the size; loaders upcast to float32)."""
    return {k: (v.half() if v.is_floating_point() else v).contiguous().cpu()
            for k, v in model.state_dict().items()}


def update_asset(folder: Path, weights: dict[str, dict[str, torch.Tensor]], config: dict[str, Any]) -> None:
    """Write `<name>.safetensors` files and merge `config` into folder/config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, state in weights.items():
        save_file(state, str(folder / f"{name}.safetensors"))
    path = folder / "config.json"
    current = json.loads(path.read_text()) if path.is_file() else {}
    current.update(config)
    current.setdefault("format", ASSET_FORMAT)
    path.write_text(json.dumps(current, indent=2) + "\n")


class Timer:
    """Wall-clock seconds that survive resumes (added to Progress.seconds)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.last = time.perf_counter()

    def tick(self) -> None:
        now = time.perf_counter()
        self.progress.seconds += now - self.last
        self.last = now


def lr_factor(step: int, warmup: int, done: float) -> float:
    """Multiplier for LambdaLR: linear warm-up, then cosine to 10 % as `done` goes 0 -> 1."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def fraction_done(progress: Progress, steps: int, budget_minutes: float | None) -> float:
    """Training ends at `steps` or when the wall-clock budget is spent, whichever comes first; on a
    shared CPU the budget is the binding limit and the schedule follows it."""
    done = progress.step / steps
    if budget_minutes:
        done = max(done, progress.seconds / (60 * budget_minutes))
    return done


def all_agree(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process if it is true on any: wall-clock stops must not split the ranks."""
    t = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum") > 0)


def warm_start(module: nn.Module, weights: Path) -> list[str]:
    """Copy every tensor of a .safetensors file whose name and shape match `module`'s; returns the
    names left at their fresh initialisation. Why: on a CPU budget a new class set or a fine-tuned
    tokenizer starts from the shipped weights (a new class table, the same drawing skills)."""
    from safetensors.torch import load_file

    own = module.state_dict()
    loaded = {k: v.to(own[k].dtype) for k, v in load_file(str(weights)).items()
              if k in own and own[k].shape == v.shape}
    module.load_state_dict(loaded, strict=False)
    return sorted(set(own) - set(loaded))


def prepare_training(accelerator: Accelerator, module: nn.Module, optimizer: torch.optim.Optimizer,
                     ema: EMA, progress: Progress, args: Any, run_dir: Path
                     ) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Both stages' set-up: warm-up + cosine schedule over steps or the time budget, accelerate's
    wrapping, EMA and progress in the checkpoint, and `--resume` from the run folder (which wins
    over the `--init-from` warm start the caller applied before building the EMA)."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, args.warmup, fraction_done(progress, args.steps, args.time_budget)))
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    accelerator.register_for_checkpointing(ema, progress)
    if args.resume and load_checkpoint(accelerator, run_dir):
        accelerator.print(f"resumed from step {progress.step}")
    ema.model.to(accelerator.device)
    return module, optimizer, scheduler


def train_loop(accelerator: Accelerator, module: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, ema: EMA, ema_source: Callable[[], nn.Module],
               progress: Progress, args: Any, run_dir: Path, *, desc: str,
               step_loss: Callable[[int], tuple[torch.Tensor, dict[str, str] | None]],
               on_save: Callable[[], None]) -> None:
    """The loop both stages share: one clipped optimiser step per batch, EMA of the weights, a stop
    every process agrees on (steps or time budget), a checkpoint every `save_every` steps and at the
    end, after which `on_save` writes usable weights. `step_loss(step)` returns the batch's loss and
    optional progress-bar fields."""
    timer = Timer(progress)
    bar = tqdm(range(progress.step, args.steps), initial=progress.step, total=args.steps,
               disable=not accelerator.is_main_process, desc=desc, dynamic_ncols=True)
    module.train()
    for step in bar:
        loss, postfix = step_loss(step)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(ema_source())
        progress.step = step + 1
        timer.tick()
        finished = all_agree(accelerator, fraction_done(progress, args.steps, args.time_budget) >= 1)
        if postfix:
            bar.set_postfix(**postfix)
        if progress.step % args.save_every == 0 or finished:
            save_checkpoint(accelerator, run_dir)
            if accelerator.is_main_process:
                on_save()
        if finished:
            break
    bar.close()
