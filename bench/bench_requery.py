"""The training-free variant of refinement (issue 21, item 6), measured before it is offered: for a
model without the correction head, keep the most confident `keep` share of each step's parallel
draws and re-query the rest in one extra pass that sees the kept ones (MaskGIT-style: the kept
draws fed as content of their own part, the rest as mask queries).

    python bench/bench_requery.py --json bench/requery_results.json   # ear-emoji, about 4 minutes

The re-query is off-distribution for EAR models: in training a mask query never sees a token of
its own part. This is a slow reference loop (an uncached forward per pass, `EAR.forward_positions`);
keep 1 is plain sampling and gives the engine's retrieval and FID. Quality at --temperature:
retrieval top-1 and emoji-FID (`ear.train.evaluate.Ruler`) of one image per emoji, the same seed
for every keep, and the share of drawn tokens the re-query changed.
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

from ear.images import to_uint8
from ear.model import EAR, _Layout
from ear.order import Schedule
from ear.pipeline import EARPipeline


def _draw(logits: torch.Tensor, temperature: float,
          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, m), each token's probability): a draw at `temperature` (0: the argmax)."""
    if temperature == 0:
        probs = torch.softmax(logits, -1)
        tokens = probs.argmax(-1)
    else:
        probs = torch.softmax(logits / temperature, -1)
        tokens = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(probs.shape[:2])
    return tokens, probs.gather(-1, tokens[..., None])[..., 0]


def _part_logits(model: EAR, layout: _Layout, cond: torch.Tensor, before: torch.Tensor,
                 part: torch.Tensor) -> torch.Tensor:
    """A step's logits, uncached: the class and earlier parts' tokens `before`, then its own part's
    inputs `part` (mask queries, or kept draws among them)."""
    x = torch.cat([before, part], 1)
    return model.forward_positions(x, cond, 0, layout, None)[:, before.shape[1]:].float()


@torch.no_grad()
def requery_decode(model: EAR, labels: torch.Tensor, schedule: Schedule, temperature: float, keep: float,
                   seed: int = 0) -> tuple[torch.Tensor, float]:
    """((B, g, g) raster tokens, share of drawn tokens the re-query changed) of a generation whose
    steps re-query their least confident (1 - keep) share, seeing the kept draws (keep 1: none)."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep is the share of a step's draws kept, in (0, 1], got {keep!r}")
    layout, generator = model.layout(schedule), torch.Generator().manual_seed(seed)
    cond, batch = model._cond(labels), labels.shape[0]
    ordered = torch.zeros(batch, schedule.num_tokens, dtype=torch.long)
    mask = model.mask_token.weight
    changed = 0
    for lo, hi in zip(schedule.boundaries, schedule.boundaries[1:], strict=False):
        before = torch.cat([cond, model.tok_embeddings(ordered[:, :lo])], 1)

        queries = _part_logits(model, layout, cond, before, mask.expand(batch, hi - lo, -1))
        drawn, confidence = _draw(queries, temperature, generator)
        kept = max(1, round(keep * (hi - lo)))
        if kept < hi - lo:
            requery = torch.ones_like(drawn, dtype=torch.bool)
            requery.scatter_(1, confidence.argsort(-1, descending=True)[:, :kept], False)
            part = torch.where(requery[..., None], mask, model.tok_embeddings(drawn))
            redrawn, _ = _draw(_part_logits(model, layout, cond, before, part), temperature, generator)
            final = torch.where(requery, redrawn, drawn)
            changed += int((final != drawn).sum())
            drawn = final
        ordered[:, lo:hi] = drawn
    grid = torch.empty_like(ordered)
    grid[:, torch.tensor(schedule.order)] = ordered
    g = model.config.grid_size
    return grid.view(batch, g, g), changed / ordered.numel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ear-emoji", help="a model without the correction head")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--keeps", default="1,0.75,0.5", help="comma-separated shares of each step kept")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, metavar="FILE")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from ear.train.data import asset_sets, load_dataset
    from ear.train.evaluate import Ruler

    pipe = EARPipeline.from_pretrained(args.model)
    config = json.loads((Path(pipe.info()["source"]) / "config.json").read_text())
    data = load_dataset("emoji", class_set="familiar", sets=asset_sets(config))
    ruler = Ruler(pipe.tokenizer, data, 64)
    emoji = np.arange(len(pipe.class_names))
    labels = torch.tensor(pipe.labels(emoji.tolist(), None, seed=0))
    result: dict[str, object] = {"model": args.model, "schedule": pipe.model.schedule.name,
                                 "temperature": args.temperature, "images": len(emoji), "keeps": []}
    for keep in [float(k) for k in args.keeps.split(",")]:
        started = time.perf_counter()
        grid, changed = requery_decode(pipe.model, labels, pipe.model.schedule, args.temperature, keep)
        with torch.no_grad():
            scores = ruler.score(np.concatenate([to_uint8(pipe.tokenizer.decode(grid[i:i + 64]))
                                                 for i in range(0, len(grid), 64)]), emoji)
        row = {"keep": keep, "retrieval_top1": scores["top1"], "fid": scores["fid"], "changed_share": changed}
        result["keeps"].append(row)
        print(f"keep {keep}: retrieval {row['retrieval_top1']:.3f}, emoji-FID {row['fid']:.2f}, "
              f"{changed:.1%} of tokens changed ({time.perf_counter() - started:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
