"""What a person waits for in the app: time to the first canvas, to the final images and to the
animation, through the real Generate handler, against the bare pipeline (`EARPipeline.generate`,
no previews, no files) measured in the same run as the baseline. Targets (issue 11): final / bare
<= 1.3 and the animation <= 0.3 s after the final images; "canvases sent" shows how many steps
the preview pacer drew live (each run also writes an animation holding every step).

    python bench/bench_app.py [--batches 1,4,8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import app  # imports ear first, which sets the OpenMP wait policy


def handler_times(batch: int, seed: int) -> tuple[float, float, float, int]:
    """Seconds from the request to the first canvas, the final images and the animation, and the
    number of canvases the handler sent."""
    pipe = app.MODELS.get(None)
    p = pipe.default_settings
    started = time.perf_counter()
    first = final = None
    canvases = 0
    for canvas, _caption, finals, animation, _playback in app.generate(
            pipe.default_class, batch, seed, p.cfg_scale, p.temperature, p.top_k, p.top_p,
            app.MODELS.default, "gif"):
        now = time.perf_counter() - started
        first = first if first is not None else now
        if final is None and isinstance(finals, list):
            final = now
        if isinstance(animation, str):  # the last update: the whole result again, and the animation
            return first, final or now, now, canvases
        canvases += isinstance(canvas, str)
    raise RuntimeError("the handler never produced an animation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    pipe = app.MODELS.get(None)
    print(f"model {pipe.name} on {pipe.device} ({pipe.info()['parameters']:,} parameters), "
          f"{pipe.model.schedule.num_steps} steps, medians of {args.repeats}")
    print("| batch | bare generate (s) | first canvas (s) | final images (s) | animation (s) | "
          "final / bare | animation after final (s) | canvases sent |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = [pipe.class_id(pipe.default_class)] * batch
        pipe.generate(ids, seed=0)
        handler_times(batch, 0)  # warm-up
        bare, first, final, anim, sent = [], [], [], [], []
        for r in range(args.repeats):
            started = time.perf_counter()
            pipe.generate(ids, seed=r)
            bare.append(time.perf_counter() - started)
            times = handler_times(batch, r)
            first.append(times[0])
            final.append(times[1])
            anim.append(times[2])
            sent.append(times[3])
        b, f, a = statistics.median(bare), statistics.median(final), statistics.median(anim)
        after = statistics.median(x - y for x, y in zip(anim, final, strict=True))
        print(f"| {batch} | {b:.3f} | {statistics.median(first):.3f} | {f:.3f} | {a:.3f} | {f / b:.2f} | "
              f"{after:.3f} | {statistics.median(sent):.0f} |", flush=True)


if __name__ == "__main__":
    main()
