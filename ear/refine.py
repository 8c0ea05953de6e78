"""Nested refinement (RadAR, arXiv 2512.24639) on EAR's cached decoding.

At step k+1 the tokens drawn for part k are fed as content; they attend to each other and to
earlier parts, never to part k+1's mask queries. A model trained with the correction objective
(`EARConfig.correction`) reads those content outputs as a second opinion on part k: a drawn token
whose probability under it is below the threshold is redrawn from it, from a noise stream of its
own (keyed per row and cell like every draw, so an image still depends only on its own seed).
Part k+1 was drawn in the same forward from the uncorrected part k (the new ring never waits);
its own correction comes one step later, and the last part's from one extra content-only pass.

A corrected part changes the keys and values of every token of that part, so under refinement
each step re-feeds the part before the one it checks, whole: the cache then always equals a
teacher-forced forward of the grid as it stands (part sizes are known per step). The runner
re-feeds only the rows whose part changed (`Span.refed`, `Span.without_refeed`, `Span.refeed_only`):
for the others the re-fed keys and values would equal the cached ones, so a step where no row
corrected anything costs what an unrefined step costs, plus the check. Under CUDA graphs the
runner takes the static form instead: every row re-fed, every checked cell redrawn and selected
(`correct(static=True)`), the same tokens with shapes fixed per step and no host sync. This
module says which positions each step feeds (`spans`), how a step draws and corrects
(`advance`), and how the engines' per-forward results become per-step ones (`grouped`).
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterator
from dataclasses import dataclass

import torch

from ear.draw import RowSettings, _mix32, draw
from ear.model import EAR, corrupt
from ear.order import Schedule

DEFAULT_THRESHOLD = 0.05
_REDRAW_SALT = 0x3C6EF372


@dataclass(frozen=True)
class Refinement:
    """Refinement on, with the probability under the correction below which a draw is replaced."""

    threshold: float = DEFAULT_THRESHOLD


def refinement(model: EAR, refine: bool, threshold: float | None = None) -> Refinement | None:
    """Checked sampling options -> a Refinement, or None when refinement is off."""
    if not isinstance(refine, bool):
        raise ValueError(f"refine must be true or false, got {refine!r}")
    value = DEFAULT_THRESHOLD if threshold is None else threshold
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError(f"the refinement threshold must be a probability in (0, 1), got {threshold!r}")
    if not refine:
        return None
    if not model.config.correction:
        raise ValueError("refinement needs a model trained with the correction objective "
                         "(config correction: true); this one has none, so turn refinement off")
    return Refinement(float(value))


@dataclass(frozen=True)
class Span:
    """What one forward feeds, as generation-order slices: `fed` content tokens (after the class
    token when `with_class`), mask queries for the `out` cells (drawn), and the `checked` cells
    (the tail of `fed`) whose correction logits it returns. Logits rows: checked, then out."""

    k: int
    fed: slice
    out: slice
    checked: slice
    with_class: bool

    @property
    def key(self) -> tuple[int, ...]:
        """Hashable (slices are not before Python 3.12): what a cached step plan is found by."""
        return (self.k, self.fed.start, self.fed.stop, self.out.start, self.out.stop,
                self.checked.start, self.checked.stop, int(self.with_class))

    @property
    def num_checked(self) -> int:
        return self.checked.stop - self.checked.start

    @property
    def num_queries(self) -> int:
        return self.out.stop - self.out.start

    @property
    def refed(self) -> slice:
        """The head of `fed` fed again: the part checked one forward earlier (empty if none)."""
        if self.with_class:
            return slice(self.fed.start, self.fed.start)
        return slice(self.fed.start, self.checked.start if self.num_checked else self.fed.stop)

    def without_refeed(self) -> Span:
        """This forward without its re-fed part (for rows whose checked part did not change)."""
        return Span(self.k, slice(self.refed.stop, self.fed.stop), self.out, self.checked, self.with_class)

    def refeed_only(self) -> Span:
        """A content-only forward of the re-fed part alone (for the rows whose part changed)."""
        end = slice(self.refed.stop, self.refed.stop)
        return Span(self.k, self.refed, end, end, False)

    @property
    def empty(self) -> bool:
        return self.fed.stop == self.fed.start and not self.num_queries and not self.with_class


def plain_span(schedule: Schedule, k: int, first: int) -> Span:
    """Step k without refinement: the previous part (or the class and prefix) and part k's queries."""
    b = schedule.boundaries
    fed = slice(0, b[k]) if k == first else slice(b[k - 1], b[k])
    return Span(k, fed, slice(b[k], b[k + 1]), slice(b[k], b[k]), k == first)


def spans(schedule: Schedule, first: int, last: int) -> list[Span]:
    """The forwards of a refined decode from step `first` to `last` (the last one drawn): step k
    re-feeds part k-2 (corrected at step k-1), feeds part k-1 (checked now) and queries part k;
    then a content-only pass checks part `last` and one more re-feeds it, so the cache ends as a
    teacher-forced forward of the final grid. Prefix parts (before `first`) are never checked."""
    b, out = schedule.boundaries, []
    for k in range(first, last + 3):
        lo, hi = max(first, k - 2), min(k - 1, last)
        fed = slice(0, b[first]) if k == first else slice(b[lo], b[hi + 1])
        queried = slice(b[k], b[k + 1]) if k <= last else slice(b[last + 1], b[last + 1])
        checked = slice(b[k - 1], b[k]) if first <= k - 1 <= last else slice(fed.stop, fed.stop)
        out.append(Span(k, fed, queried, checked, k == first))
    return out


def redraw_streams(streams: torch.Tensor) -> torch.Tensor:
    """The corrections' noise streams: a hash of each (row, cell) stream, so a redraw is not
    correlated with the first draw of the same cell, and still depends only on the row's key."""
    return _mix32(streams ^ _REDRAW_SALT)


def correct(logits: torch.Tensor, drawn: torch.Tensor, rows: RowSettings, streams: torch.Tensor,
            codes: torch.Tensor, threshold: float, fixed: torch.Tensor | None = None,
            static: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, corrected) for a drawn part (B, m) given its guided correction logits (B, m, V):
    a token whose probability under the correction (temperature 1) is below `threshold` is
    replaced by a draw from the correction with the row's own settings; `fixed` (B, m) bool cells
    (known ones) never change. `corrected` marks the cells whose token changed. `static` (default:
    on CUDA) redraws every cell and selects, with no host sync; otherwise only the doubtful cells
    are drawn (a CPU pays nothing for the sync, and the draw is a large share of a small model's
    step). Both give the same tokens: a cell's noise depends only on its stream."""
    logp = logits.gather(-1, drawn[..., None])[..., 0].float() - logits.float().logsumexp(-1)
    doubtful = logp < math.log(threshold)
    if fixed is not None:
        doubtful &= ~fixed
    if logits.device.type == "cuda" if static is None else static:
        tokens = torch.where(doubtful, draw(logits, rows, streams, codes), drawn)
    else:
        row, cell = doubtful.nonzero(as_tuple=True)
        tokens = drawn.clone()
        if row.numel():
            picked = rows.map(lambda t: t[row])
            tokens[row, cell] = draw(logits[row, cell][:, None], picked, streams[row, cell][:, None],
                                     codes)[:, 0]
    return tokens, tokens != drawn


@dataclass
class Noise:
    """One generation's randomness, all (B, n) in generation order: the draws' streams, the
    redraws' and the known cells' tokens (UNKNOWN = -1 where drawn; None when nothing is known)."""

    streams: torch.Tensor
    redraws: torch.Tensor
    given: torch.Tensor | None
    codes: torch.Tensor


def advance(span: Span, logits: torch.Tensor, tokens: torch.Tensor, rows: RowSettings, noise: Noise,
            threshold: float, static: bool | None = None) -> torch.Tensor | None:
    """Apply one forward's guided logits (checked rows, then queries) to the generation-order
    token buffer `tokens` (B, n), in place: draw the queried cells, correct the checked ones
    (`static` as in `correct`). Returns the checked part's `corrected` mask (B, m), or None when
    it checks nothing."""
    c = span.num_checked
    if span.num_queries:
        drawn = draw(logits[:, c:], rows, noise.streams[:, span.out], noise.codes)
        if noise.given is not None:  # known cells take their token, whatever was drawn
            given = noise.given[:, span.out]
            drawn = torch.where(given >= 0, given, drawn)
        tokens[:, span.out] = drawn
    if not c:
        return None
    part = span.checked
    fixed = None if noise.given is None else noise.given[:, part] >= 0
    tokens[:, part], corrected = correct(logits[:, :c], tokens[:, part], rows, noise.redraws[:, part],
                                         noise.codes, threshold, fixed, static)
    return corrected


Fix = tuple[int, torch.Tensor, torch.Tensor]  # (part k, its final tokens (B, m), corrected (B, m))
Forward = tuple[Span, torch.Tensor, torch.Tensor, Fix | None]  # span, query logits, drawn tokens, fix


Step = tuple[int, torch.Tensor, torch.Tensor, list[Fix]]  # k, query logits, drawn tokens, fixes


def grouped(forwards: Generator[Forward, None, None], last: int) -> Iterator[Step]:
    """Per-forward results -> per step (k, query logits, drawn tokens, fixes of earlier parts):
    step `last` waits for the content-only passes after it, so it also carries its own part's fix."""
    pending = None
    try:
        for span, logits, tokens, fix in forwards:
            fixes = [] if fix is None else [fix]
            if span.k < last:
                yield span.k, logits, tokens, fixes
            elif pending is None:
                pending = (span.k, logits, tokens, fixes)
            else:
                pending[3].extend(fixes)
        if pending is not None:
            yield pending
    finally:
        forwards.close()


@torch.no_grad()
def repair_accuracy(model: EAR, tokens: torch.Tensor, class_ids: torch.Tensor, share: float = 0.3,
                    noise_share: float = 0.2, seed: int = 0) -> tuple[float, float]:
    """(accuracy of the corrupted tokens, accuracy of the correction's argmax on them) against the
    clean raster `tokens` (B, n), corrupted as in training (`ear.model.corrupt`): how well a model
    trained with the correction objective repairs its own parallel draws. Eval mode, true labels."""
    layout = model.layout()
    ordered = tokens.long()[:, layout.order]
    cond = model.cls_embedding.lookup(class_ids).unsqueeze(1)
    logits = model(tokens.long(), class_ids)
    gen = torch.Generator(device=tokens.device).manual_seed(seed)
    corrupted = corrupt(ordered, logits, share, noise_share, gen)
    repaired = model.correction_logits(corrupted, cond, layout).argmax(-1)
    return float((corrupted == ordered).float().mean()), float((repaired == ordered).float().mean())
