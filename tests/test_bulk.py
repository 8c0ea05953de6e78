"""`python -m ear sample` with the bundled model: 1 and 2 processes agree, resuming agrees, and
every bad flag is one `error:` line, exit status 2 and nothing on disk."""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from ear import bulk, fid
from ear.__main__ import main
from ear.npz import npz_array, write_npz
from tests.helpers import same_picture

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--classes", "0,1,2", "--per-class", "2", "--batch", "2", "--seed", "3", "--quiet"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch) -> None:
    """In-process runs must not change the test process's thread count (bulk.start honours this)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The small run in one process, uninterrupted."""
    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    assert main(["sample", *SMALL, "--out", str(out)]) == 0
    return out


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_npz_is_what_the_evaluator_reads(reference: Path) -> None:
    with np.load(reference) as data:
        assert data.files == ["arr_0", "arr_1"]
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (6, 64, 64, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert len({im.tobytes() for im in images}) == 6  # every index has its own randomness
    assert _leftovers(reference.parent) == ["ref.npz"]  # chunks and plan removed


def _torchrun(*flags: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m ear sample ...` on the CPU (gloo), one thread per process."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run([*torchrun, "-m", "ear", "sample", *flags], cwd=REPO,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "on 2 processes" in run.stderr
    return run


def _stop_after(monkeypatch, chunks: int) -> None:
    """Interrupt (as Ctrl-C would) when `chunks` chunks have been written."""
    written = []
    original = bulk.ChunkStore.write

    def write_then_stop(self, a, b, images, labels):
        if len(written) == chunks:
            raise KeyboardInterrupt
        written.append((a, b))
        original(self, a, b, images, labels)

    monkeypatch.setattr(bulk.ChunkStore, "write", write_then_stop)


@pytest.mark.slow
def test_two_processes_write_the_same_file_as_one(reference: Path, tmp_path: Path) -> None:
    out, pngs = tmp_path / "two.npz", tmp_path / "pngs"
    _torchrun(*SMALL, "--out", str(out), "--png-dir", str(pngs))
    assert out.read_bytes() == reference.read_bytes()
    with np.load(out) as data:
        first = data["arr_0"][0]
    names = sorted(p.name for p in pngs.iterdir())
    assert names == ["000000-0.png", "000001-0.png", "000002-1.png", "000003-1.png", "000004-2.png",
                     "000005-2.png"]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(pngs / names[0])), first)
    assert _leftovers(tmp_path) == ["pngs", "two.npz"]


@pytest.mark.slow
def test_a_run_stopped_on_one_process_finishes_on_two(reference: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "moved.npz"
    _stop_after(monkeypatch, 1)
    assert main(["sample", *SMALL, "--out", str(out)]) == 130
    run = _torchrun(*SMALL, "--out", str(out))
    assert "resuming: 2 of 6 images already done" in run.stderr
    assert out.read_bytes() == reference.read_bytes()
    assert _leftovers(tmp_path) == ["moved.npz"]


def test_another_batch_gives_the_same_images(reference: Path, tmp_path: Path) -> None:
    """Per-row keys: one forward of all six rows samples what three forwards of two did."""
    out = tmp_path / "one-batch.npz"
    assert main(["sample", *SMALL, "--batch", "6", "--out", str(out)]) == 0
    with np.load(out) as a, np.load(reference) as b:
        assert same_picture(a["arr_0"], b["arr_0"])  # decoded 6 at once vs 2 at a time


def test_interrupted_run_resumes_to_the_same_file(reference: Path, tmp_path: Path, monkeypatch, capsys
                                                  ) -> None:
    out, work = tmp_path / "resumed.npz", tmp_path / "resumed.parts"
    original = bulk.ChunkStore.write
    _stop_after(monkeypatch, 2)
    assert main(["sample", *SMALL, "--out", str(out)]) == 130
    assert not out.exists()
    (work / ".chunk-0000004-0000006.abc.npz").write_bytes(b"half a chunk")  # a write killed mid-way
    assert _leftovers(work) == [".chunk-0000004-0000006.abc.npz", "chunk-0000000-0000002.npz",
                                "chunk-0000002-0000004.npz", "plan.json"]

    monkeypatch.setattr(bulk.ChunkStore, "write", original)
    sampled = []
    sample_range = bulk.sample_range
    monkeypatch.setattr(bulk, "sample_range", lambda *a: sampled.append(a[2:4]) or sample_range(*a))
    capsys.readouterr()
    assert main(["sample", *SMALL[:-1], "--out", str(out)]) == 0  # with the progress bar this time
    assert "resuming: 4 of 6 images already done" in capsys.readouterr().err
    assert sampled == [(4, 6)]
    assert out.read_bytes() == reference.read_bytes()
    assert _leftovers(tmp_path) == ["resumed.npz"]


def test_a_different_run_in_the_same_folder_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    work = tmp_path / "w"
    _stop_after(monkeypatch, 0)
    flags = ["--out", str(tmp_path / "a.npz"), "--work-dir", str(work)]
    assert main(["sample", *SMALL, *flags]) == 130
    capsys.readouterr()
    assert main(["sample", *SMALL, "--seed", "4", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "holds another run (seed 3, now 4)" in err and "\n" not in err


@pytest.mark.parametrize(("flags", "message"), [
    (["--classes", "0,nonsense-class"], "Unknown class 'nonsense-class'"),
    (["--classes", "0,999"], "class id must lie in [0, 227]"),
    (["--classes", "1,0-2"], "more than once"),
    (["--per-class", "0"], "--per-class must be at least 1"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--out", "{tmp}/missing/samples.npz"], "does not exist"),
    (["--out", "{tmp}"], "is a folder"),
    (["--out", "{tmp}/samples.png"], "must end in .npz"),
    (["--png-dir", "{tmp}/samples.npz"], "is not a folder"),
    (["--fid", "{tmp}/nowhere.npz"], "does not exist"),
    (["--fid", "{tmp}/text.npz"], "is not an npz holding arr_0"),
    (["--fid", "{tmp}/samples.npz"], "pip install torch-fidelity"),
])
def test_bad_flags_are_one_error_line_and_nothing_written(flags: list[str], message: str, tmp_path: Path,
                                                          monkeypatch, capsys) -> None:
    monkeypatch.setattr(fid, "weights_path", lambda: tmp_path / "no-weights.pth")
    np.savez(tmp_path / "samples.npz", np.zeros((2, 8, 8, 3), np.uint8))  # doubles as a reference batch
    (tmp_path / "text.npz").write_text("not a zip file")
    before = _leftovers(tmp_path)
    base = ["sample", "--classes", "0", "--per-class", "1", "--quiet", "--out", str(tmp_path / "out.npz")]
    status = main([*base, *(f.format(tmp=tmp_path) for f in flags)])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert _leftovers(tmp_path) == before


def test_fid_hands_both_batches_to_torch_fidelity(reference: Path, tmp_path: Path, monkeypatch, capsys
                                                   ) -> None:
    """The glue only (torch-fidelity and its weights are not installed here): both npz files reach
    it as uint8 3 x H x W images with the weights file, and its numbers are printed as JSON."""
    seen = {}

    def calculate_metrics(**kwargs):
        seen.update(kwargs)
        first = kwargs["input1"][0]
        return {"frechet_inception_distance": float(len(kwargs["input1"])),
                "inception_score_mean": float(first.float().mean()), "inception_score_std": 0.0}

    module = types.ModuleType("torch_fidelity")
    module.__spec__ = importlib.machinery.ModuleSpec("torch_fidelity", None)
    module.calculate_metrics = calculate_metrics
    monkeypatch.setitem(sys.modules, "torch_fidelity", module)
    weights = tmp_path / fid.WEIGHTS_FILE
    weights.write_bytes(b"weights")
    monkeypatch.setattr(fid, "weights_path", lambda: weights)
    ref = tmp_path / "ref-batch.npz"
    np.savez(ref, np.full((3, 32, 32, 3), 7, np.uint8))

    out = tmp_path / "scored.npz"
    assert main(["sample", *SMALL, "--out", str(out), "--fid", str(ref)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with np.load(reference) as data:
        # the stand-in averages in float32, numpy in float64: equal up to rounding
        assert printed == {"fid": 6.0, "inception_score": pytest.approx(float(data["arr_0"][0].mean())),
                           "inception_score_std": 0.0}
    assert seen["input2"][2].shape == (3, 32, 32) and seen["input2"][2].dtype.is_floating_point is False
    assert seen["feature_extractor_weights_path"] == str(weights) and seen["fid"] and seen["isc"]


def test_npz_array_maps_stored_members_and_reads_compressed_ones(tmp_path: Path) -> None:
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.savez(tmp_path / "s.npz", images, np.array([5, 6]))
    np.savez_compressed(tmp_path / "c.npz", images)
    stored = npz_array(tmp_path / "s.npz", "arr_0")
    assert isinstance(stored, np.memmap) and np.array_equal(stored, images)
    assert np.array_equal(npz_array(tmp_path / "c.npz", "arr_0"), images)
    assert npz_array(tmp_path / "s.npz", "arr_1").tolist() == [5, 6]
    with pytest.raises(ValueError, match="not an npz holding arr_1"):
        npz_array(tmp_path / "c.npz", "arr_1")
    (tmp_path / "t.npz").write_bytes((tmp_path / "s.npz").read_bytes()[:100])
    with pytest.raises(ValueError, match="not an npz"):
        npz_array(tmp_path / "t.npz", "arr_0")


def test_write_npz_streams_chunks_into_one_checked_file(tmp_path: Path) -> None:
    chunks = [np.full((2, 4, 4, 3), i, np.uint8) for i in range(3)]
    labels = np.array([0, 0, 1, 1, 2, 2])
    path = write_npz(tmp_path / "s.npz", chunks, (6, 4, 4, 3), labels)
    with np.load(path) as data:
        assert np.array_equal(data["arr_0"], np.concatenate(chunks)) and np.array_equal(data["arr_1"], labels)
    with pytest.raises(ValueError, match="planned"):  # one chunk short: refused, nothing left behind
        write_npz(tmp_path / "short.npz", chunks[:2], (6, 4, 4, 3), labels)
    assert _leftovers(tmp_path) == ["s.npz"]


def test_batch_that_fits_follows_free_gpu_memory(monkeypatch) -> None:
    import torch

    from tests.helpers import noisy_model

    model = noisy_model()
    cuda = torch.device("cuda")
    assert bulk.fitting_batch(model, True, torch.device("cpu")) == bulk.CPU_BATCH
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _d: (2**24, 2**31))
    one_gib = bulk.fitting_batch(model, False, cuda)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _d: (2**23, 2**31))
    assert 1 < bulk.fitting_batch(model, False, cuda) < one_gib
    assert bulk.fitting_batch(model, True, cuda) < bulk.fitting_batch(model, False, cuda)
    refined = noisy_model(correction=True)  # a refined step's logits cover two parts
    assert bulk.image_bytes(refined, False) > bulk.image_bytes(model, False)
    assert bulk.fitting_batch(refined, False, cuda) <= bulk.fitting_batch(model, False, cuda)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _d: (2**40, 2**41))
    assert bulk.fitting_batch(model, False, cuda) == bulk.MAX_BATCH
