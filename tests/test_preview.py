"""ear.preview: frames per step, grids, GIF/MP4 files and the GIF fallback."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio_v2
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

import ear.preview as preview
from ear.preview import (
    CANVAS_RGB,
    OUTLINE_RGB,
    PENDING_RGB,
    PreviewRenderer,
    make_grid,
    neutral_token,
    render_frame,
    save_animation,
)
from ear.sampler import sample
from tests.helpers import PaletteTokenizer, tiny_ear

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def states():
    tokenizer = PaletteTokenizer(grid=8, patch=4)
    model = tiny_ear(tokenizer.codebook_size, grid=8)
    return tokenizer, list(sample(model, [0, 1], seed=0))


def test_frames_show_known_cells_and_a_dim_canvas_elsewhere(states) -> None:
    tokenizer, all_states = states
    renderer = PreviewRenderer(tokenizer, display_size=64, outline=False)
    final = np.stack([np.asarray(i) for i in renderer.final(all_states[-1].tokens)])
    state = all_states[5]
    frames = renderer.render(state)
    assert len(frames) == 2 and frames[0].size == (64, 64)
    known = renderer.cell_mask(state.known)
    arr = np.asarray(frames[1])
    # The palette tokenizer decodes each cell on its own, so known cells equal the final picture.
    assert np.array_equal(arr[known], final[1][known])
    assert set(map(tuple, arr[~known].reshape(-1, 3))) <= set(CANVAS_RGB)
    assert renderer.decode_calls == 2  # one batched decode per call, never one per image


def test_decode_budget_shows_pending_cells_until_a_decode_is_affordable(states) -> None:
    tokenizer, all_states = states
    generous = PreviewRenderer(tokenizer, display_size=64, outline=False)
    for state in all_states:
        generous.render(state)
    assert generous.decode_calls == len(all_states)  # small models: every step decoded
    strict = PreviewRenderer(tokenizer, display_size=64, outline=False, decode_share=0.0, decode_slack=0.0)
    first = strict.render(all_states[0])  # the first frame is always decoded
    later = np.asarray(strict.render(all_states[4])[0])
    assert strict.decode_calls == 1
    since = strict.cell_mask(all_states[4].known & ~all_states[0].known)
    assert set(map(tuple, later[since].reshape(-1, 3))) <= set(PENDING_RGB)
    shown = strict.cell_mask(all_states[0].known)
    assert np.array_equal(later[shown], np.asarray(first[0])[shown])
    final = strict.render(all_states[-1])  # the finished picture is always decoded
    assert strict.decode_calls == 2 and np.array_equal(np.asarray(final[0]), np.asarray(
        generous.final(all_states[-1].tokens)[0]))
    strict.render(all_states[0])  # a new stream never shows the previous one's pixels
    assert strict.decode_calls == 3


def test_outline_marks_the_new_cells_only_while_growing(states) -> None:
    tokenizer, all_states = states
    state = all_states[6]
    outlined = np.asarray(render_frame(state, tokenizer, display_size=64)[0])
    border = np.all(outlined == OUTLINE_RGB, axis=-1)
    new = PreviewRenderer(tokenizer, 64, fill_token=0).cell_mask(state.new)
    assert border.any() and not (border & ~new).any()
    plain = np.asarray(render_frame(state, tokenizer, display_size=64, outline=False)[0])
    assert not np.all(plain == OUTLINE_RGB, axis=-1).any()
    done = np.asarray(render_frame(all_states[-1], tokenizer, display_size=64)[0])
    assert not np.all(done == OUTLINE_RGB, axis=-1).all(axis=-1).any()


def test_small_tokenizers_are_upscaled_crisply(states) -> None:
    tokenizer, all_states = states
    big = np.asarray(PreviewRenderer(tokenizer, display_size=128).final(all_states[-1].tokens)[0])
    small = np.asarray(PreviewRenderer(tokenizer, display_size=32).final(all_states[-1].tokens)[0])
    assert np.array_equal(big[::4, ::4], small)  # nearest-neighbour: exact 4x blocks


def test_neutral_token_is_the_code_of_mid_grey() -> None:
    tokenizer = PaletteTokenizer(levels=3)  # palette values -1, 0, 1: grey is exactly a code
    token = neutral_token(tokenizer)
    assert torch.equal(tokenizer.palette[token], torch.zeros(3))


def test_renderer_rejects_silly_display_sizes() -> None:
    with pytest.raises(ValueError, match="display_size"):
        PreviewRenderer(PaletteTokenizer(), display_size=4)


def test_shrink_ends_inside_the_box() -> None:
    tokenizer = PaletteTokenizer(grid=8)
    renderer = PreviewRenderer(tokenizer, display_size=64, fill_token=0)
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    frames = renderer.shrink(red, (2, 2, 6, 6), 5)
    assert len(frames) == 5
    last = np.asarray(frames[-1])
    assert (last[16:48, 16:48] == (255, 0, 0)).all()
    assert not (last[:14, :] == (255, 0, 0)).all(axis=-1).any()
    sizes = [int((np.asarray(f) == (255, 0, 0)).all(-1).sum()) for f in frames]
    assert sizes == sorted(sizes, reverse=True)


def test_make_grid() -> None:
    imgs = [Image.new("RGB", (10, 10), (i * 40, 0, 0)) for i in range(5)]
    grid = make_grid(imgs, gap=2)
    assert grid.size == (3 * 10 + 2 * 2, 2 * 10 + 2)
    assert make_grid(imgs[:1]) is imgs[0]
    with pytest.raises(ValueError):
        make_grid([])


def _frames(n: int = 4, size: int = 32) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), (60 * i, 255 - 60 * i, 0)) for i in range(n)]


def test_gif_holds_the_last_frame(tmp_path: Path) -> None:
    path = save_animation(_frames(), tmp_path / "a.gif", fps=10, hold_last=1.0)
    assert path == tmp_path / "a.gif"
    frames = iio.imread(path, index=None)
    assert frames.shape[0] == 4
    durations = [iio.immeta(path, index=i)["duration"] for i in range(4)]
    assert durations[0] == pytest.approx(100, abs=10) and durations[-1] == pytest.approx(1100, abs=10)
    assert [p.name for p in tmp_path.iterdir()] == ["a.gif"]  # no temporary files left


def test_mp4_is_readable_and_holds_the_last_frame(tmp_path: Path) -> None:
    if preview.ffmpeg_exe() is None:
        pytest.skip("no ffmpeg binary (imageio-ffmpeg) here")
    path = save_animation(_frames(size=33), tmp_path / "a.mp4", fps=8, hold_last=0.5)  # odd size: padded
    assert path.suffix == ".mp4"
    with imageio_v2.get_reader(path, format="FFMPEG") as reader:
        frames = list(reader.iter_data())
    assert len(frames) == 4 + 4
    assert frames[0].shape == (34, 34, 3)


def test_mp4_falls_back_to_gif_with_a_warning(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(preview, "ffmpeg_exe", lambda: None)
    with pytest.warns(RuntimeWarning, match="No MP4 encoder"):
        path = save_animation(_frames(), tmp_path / "a.mp4")
    assert path == tmp_path / "a.gif" and path.is_file()
    assert not (tmp_path / "a.mp4").exists()
    assert iio.imread(path, index=None).shape[0] == 4


@pytest.mark.parametrize(
    ("frames", "name", "kwargs", "phrase"),
    [
        (_frames(), "a.avi", {}, "gif or .mp4"),
        ([], "a.gif", {}, "no frames"),
        (_frames(), "a.gif", {"fps": 0}, "fps"),
        (_frames(), "missing/a.gif", {}, "does not exist"),
    ],
)
def test_bad_animation_requests(tmp_path: Path, frames, name: str, kwargs, phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        save_animation(frames, tmp_path / name, **kwargs)


def test_frames_of_different_sizes_are_padded(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (20, 10), (255, 0, 0)), Image.new("RGB", (10, 20), (0, 255, 0))]
    path = save_animation(frames, tmp_path / "a.gif")
    assert iio.imread(path, index=None).shape[1:3] == (20, 20)
