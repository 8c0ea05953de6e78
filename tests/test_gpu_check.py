"""bench/gpu_check.py runs to its end on a CPU in --quick mode: every check that needs no CUDA
passes, the CUDA-only ones say why they skip, and the report is one well-formed table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_quick_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    command = [sys.executable, "bench/gpu_check.py", "--quick", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    statuses = [row[1] for row in rows]
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert statuses and set(statuses) <= {"pass", "skip"}, rows
    assert statuses.count("pass") >= 10, rows
    skipped = [row[3] for row in rows if row[1] == "skip"]
    assert all(reason.strip(" |") for reason in skipped), "every skip gives its reason"
    assert out.read_text().rstrip().endswith("s.")  # the summary line: the run reached its end
