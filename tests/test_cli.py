"""`python -m ear`: end to end in subprocesses, and every bad input as exit code 2 + one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest
from PIL import Image

from ear.__main__ import main
from tests.helpers import add_to_hub_cache, offline_hub_cache, write_tiny_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture
def offline(tmp_path: Path, monkeypatch) -> Path:
    return offline_hub_cache(monkeypatch, tmp_path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "ear", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_generate_end_to_end_from_the_hub_cache(offline: Path, model_dir: Path, tmp_path: Path) -> None:
    add_to_hub_cache(offline, "someone/tiny-ear", {f.name: f for f in model_dir.iterdir()})
    out, anim = tmp_path / "cat.png", tmp_path / "cat.gif"
    run = _cli("generate", "--model", "someone/tiny-ear", "--class", "cat", "--batch", "2", "--seed", "1",
               "--size", "64", "--out", str(out), "--animation", str(anim))
    assert run.returncode == 0, run.stderr
    assert Image.open(out).size == (64 * 2 + 4, 64)  # two images side by side
    assert iio.imread(anim, index=None).shape[0] == 15  # one frame per step
    assert "15/15" in run.stderr  # the progress bar


def test_extend_with_zoom_out_end_to_end(model_dir: Path, tmp_path: Path) -> None:
    picture = tmp_path / "in.jpg"
    Image.new("RGB", (90, 60), (200, 30, 30)).save(picture)
    out, anim = tmp_path / "grown.png", tmp_path / "grown.mp4"
    run = _cli("extend", "--model", str(model_dir), "--image", str(picture), "--keep", "4", "--zoom-out", "2",
               "--class-id", "1", "--cfg", "2", "--seed", "0", "--size", "32", "--out", str(out),
               "--animation", str(anim), "--quiet")
    assert run.returncode == 0, run.stderr
    assert Image.open(out).size == (32, 32)
    written = anim if anim.exists() else anim.with_suffix(".gif")  # GIF when no MP4 encoder
    assert written.stat().st_size > 0 and f"wrote {written}" in run.stdout


def test_bad_input_in_a_subprocess_is_one_line_without_traceback(model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    out = tmp_path / "x.png"
    run = _cli("extend", "--model", str(model_dir), "--image", str(bad), "--keep", "4", "--out", str(out))
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1
    assert "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.png"]


@pytest.mark.parametrize("argv", [["generate", "--class", "cat", "--seed", "abc", "--out", "a.png"],
                                  ["extend", "--image", "a.png", "--place", "middle", "--out", "b.png"],
                                  ["generate", "--out", "a.png"], ["nosuch"]])
def test_bad_flags_are_one_error_line_too(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "--help`" in err


@pytest.mark.parametrize("command", ["models", "download", "generate", "extend", "edit", "activate"])
def test_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--tokenizer-revision" in text and "EAR_TOKENIZER_REPO" in text


def _bad_runs(model_dir: Path, tmp_path: Path) -> list[tuple[list[str], str]]:
    picture = tmp_path / "ok.png"
    Image.new("RGB", (20, 20)).save(picture)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in model_dir.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "ear.safetensors").write_bytes(b"garbage")
    out = str(tmp_path / "out.png")
    m = ["--model", str(model_dir)]
    return [
        (["generate", "--model", "no-such-model", "--class-id", "0", "--out", out], "Unknown model"),
        (["generate", "--model", "EAR-adaLN-B", "--class-id", "0", "--out", out], "not downloaded yet"),
        (["generate", "--model", str(corrupt), "--class-id", "0", "--out", out], "Cannot read the EAR"),
        (["generate", *m, "--class", "unicorn", "--out", out], "Unknown class"),
        (["generate", *m, "--class-id", "0", "--batch", "0", "--out", out], "--batch"),
        (["generate", *m, "--class-id", "0", "--cfg", "-1", "--out", out], "cfg_scale must be a finite"),
        (["generate", *m, "--class-id", "0", "--temperature", "inf", "--out", out],
         "temperature must be a finite"),
        (["generate", *m, "--class-id", "0", "--size", "0", "--out", out], "--size must lie in [16, 4096]"),
        (["generate", *m, "--class-id", "0", "--out", out, "--animation", str(tmp_path / "a.gif"),
          "--fps", "0"], "--fps must lie in (0, 60]"),
        (["generate", *m, "--class-id", "0", "--preset", "nope", "--out", out], "Unknown preset"),
        (["generate", *m, "--class-id", "0", "--style", "Noto", "--out", out], "has no styles"),
        (["generate", *m, "--class-id", "0", "--out", str(tmp_path / "out.txt")], "--out must end"),
        (["generate", *m, "--class-id", "0", "--out", str(tmp_path / "no" / "a.png")], "does not exist"),
        (["generate", *m, "--class-id", "0", "--out", out, "--animation", str(tmp_path / "a.avi")],
         "--animation must end"),
        (["extend", *m, "--image", str(tmp_path / "missing.png"), "--keep", "4", "--out", out],
         "No image file"),
        (["extend", *m, "--image", str(picture), "--keep", "8", "--out", out], "keep must be one of"),
        (["extend", *m, "--image", str(picture), "--keep", "4", "--zoom-out", "-2", "--out", out],
         "--zoom-out"),
        (["extend", *m, "--image", str(picture), "--keep", "4", "--zoom-out", "1000", "--out", out],
         "--zoom-out must be 0 (no zoom) or a number of rounds up to 32"),
        (["activate", *m, "--tau", "2", "--out", str(tmp_path / "act")], "--tau must lie in [0, 1)"),
        (["download", "EAR-adaLN-L"], "not downloaded yet"),
    ]


def test_every_bad_input_exits_2_with_one_line(offline: Path, model_dir: Path, tmp_path: Path,
                                               capsys) -> None:
    work = tmp_path / "work"
    work.mkdir()
    for argv, phrase in _bad_runs(model_dir, work):
        code = main([*argv, "--quiet"] if argv[0] != "download" else argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and phrase in err and err.count("\n") == 1, (argv, err)
    assert not (work / "out.png").exists() and not list(work.glob(".out*"))


def test_models_lists_the_registry_and_the_cache(offline: Path, capsys) -> None:
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert "EAR-adaLN-XL" in text and "not downloaded" in text and str(offline) in text
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= {"ear-emoji", "EAR-adaLN-B", "EAR-adaLN-L", "EAR-adaLN-XL"}


def test_style_flag_draws_every_image_in_that_style(tmp_path: Path, capsys) -> None:
    """--style picks the class embedding: the same as the library call with that style."""
    from ear.pipeline import EARPipeline

    folder = write_tiny_model(tmp_path / "styled", styles=["Flat", "Shaded"])
    out = tmp_path / "cat.png"
    argv = ["generate", "--model", str(folder), "--class", "cat", "--seed", "2", "--size", "32", "--quiet"]
    assert main([*argv, "--style", "shaded", "--out", str(out)]) == 0
    want = EARPipeline.from_pretrained(str(folder)).generate("cat", seed=2, style="Shaded", display_size=32)
    assert Image.open(out).convert("RGB").tobytes() == want[0].convert("RGB").tobytes()
    assert main([*argv, "--style", "Noto", "--out", str(out)]) == 2
    assert "Unknown style 'Noto'" in capsys.readouterr().err
