"""`python -m ear sample` in one process against the same command under torchrun with N
processes (the baseline is the one-process run, measured in the same run): wall time from the
command to the finished npz (start-up, model load, sampling, assembly) and the sampling rate the
command reports. The npz files are compared too: they must be identical.

    python bench/bench_bulk.py --per-class 4 --batch 16 [--processes 2] [--repeats 3]   # README table
    python bench/bench_bulk.py --model EAR-adaLN-B --preset fid --per-class 2 --processes 8    # GPUs
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RATE = re.compile(r"sampled (\d+) images in ([\d.]+) s")


def run_once(launcher: list[str], flags: list[str], out: Path) -> tuple[float, float]:
    """(wall seconds, sampled images per second) of one command."""
    started = time.perf_counter()
    done = subprocess.run([*launcher, "-m", "ear", "sample", *flags, "--out", str(out), "--quiet"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"failed: {done.stderr.strip().splitlines()[-1]}")
    images, seconds = RATE.search(done.stderr).groups()
    return wall, int(images) / float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--model", default="ear-emoji")
    parser.add_argument("--preset")
    parser.add_argument("--classes", help="default: every class")
    parser.add_argument("--per-class", default="4")
    parser.add_argument("--batch", help="per process (default: the command's, the largest that fits)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    flags = ["--model", args.model, "--per-class", args.per_class, "--seed", "0"]
    flags += ["--batch", args.batch] if args.batch else []
    flags += ["--preset", args.preset] if args.preset else []
    flags += ["--classes", args.classes] if args.classes else []
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={args.processes}"]
    launchers = {"1 process (python -m ear)": [sys.executable],
                 f"{args.processes} processes (torchrun)": torchrun}
    print(f"{args.model}, {args.per_class} per class, batch {args.batch or 'default'} per process, "
          f"{os.cpu_count()} CPUs, medians of {args.repeats}")
    print("| launch | wall s | sampling images/s | wall vs 1 process | rate vs 1 process |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        outputs = []
        for i, (name, launcher) in enumerate(launchers.items()):
            runs = [run_once(launcher, flags, Path(tmp) / f"{i}.npz") for _ in range(args.repeats)]
            wall, rate = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            base = base or (wall, rate)
            outputs.append((Path(tmp) / f"{i}.npz").read_bytes())
            print(f"| {name} | {wall:.2f} | {rate:.1f} | {wall / base[0]:.2f} | {rate / base[1]:.2f} |")
        print("identical npz files:", all(o == outputs[0] for o in outputs))


if __name__ == "__main__":
    main()
