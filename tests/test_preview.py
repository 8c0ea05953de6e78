"""ear.preview: frames per step, grids, GIF/MP4 files and the GIF fallback."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import imageio.v2 as imageio_v2
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

import ear.preview as preview
from ear.growth import FULL, SKETCH, GrowthAnimation, PreviewPacer
from ear.pipeline import EARPipeline
from ear.preview import (
    CANVAS_RGB,
    CORRECTED_RGB,
    OUTLINE_RGB,
    PENDING_RGB,
    PreviewRenderer,
    make_grid,
    neutral_token,
    render_frame,
    save_animation,
)
from ear.sampler import sample
from tests.helpers import PaletteTokenizer, tiny_ear, write_tiny_model

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


def test_cells_the_correction_redrew_get_their_own_outline_per_row(states) -> None:
    """Nested refinement's `corrected` cells: outlined in CORRECTED_RGB exactly on their edge, in
    their own row only, beside the step's new cells (OUTLINE_RGB); none without refinement or on
    the finished picture."""
    tokenizer, all_states = states
    state = all_states[6]
    old = (state.known & ~state.new).nonzero().tolist()  # cells drawn before this step
    corrected = torch.zeros_like(state.tokens, dtype=torch.bool)
    for row, col in (old[0], old[1], old[-1]):
        corrected[0, row, col] = True
    renderer = PreviewRenderer(tokenizer, display_size=64)
    frames = [np.asarray(f) for f in renderer.render(dataclasses.replace(state, corrected=corrected))]
    wanted = renderer.cells.outline(corrected[0])
    assert wanted.any() and np.array_equal(np.all(frames[0] == CORRECTED_RGB, axis=-1), wanted)
    assert not np.all(frames[1] == CORRECTED_RGB, axis=-1).any()  # row 1 had nothing corrected
    new = np.all(frames[0] == OUTLINE_RGB, axis=-1)
    assert np.array_equal(new, renderer.cells.outline(state.new))  # the step's outline as before
    for plain in (state, dataclasses.replace(state, corrected=torch.zeros_like(corrected))):
        assert not np.all(np.asarray(renderer.render(plain)[0]) == CORRECTED_RGB, axis=-1).any()
    done = dataclasses.replace(all_states[-1], corrected=torch.ones_like(corrected))
    assert not np.all(np.asarray(renderer.render(done)[0]) == CORRECTED_RGB, axis=-1).any()
    assert preview.correction_note(state, True) == ""
    assert preview.correction_note(dataclasses.replace(state, corrected=corrected), True) == \
        f" · 3 corrected ({preview.CORRECTED_COLOUR})"
    assert preview.correction_note(done, True) == f" · {corrected.numel()} corrected"  # no outline there


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


def test_a_sketch_never_decodes(states) -> None:
    tokenizer, all_states = states
    renderer = PreviewRenderer(tokenizer, display_size=64, outline=False)
    blank = np.asarray(renderer.render(all_states[3], decode=False)[1])
    assert renderer.decode_calls == 0
    known = renderer.cell_mask(all_states[3].known)
    assert set(map(tuple, blank[known].reshape(-1, 3))) <= set(PENDING_RGB)  # nothing decoded yet
    decoded = np.asarray(renderer.render(all_states[5], decode=True)[1])
    later = np.asarray(renderer.render(all_states[9], decode=False)[1])
    assert renderer.decode_calls == 1
    shown = renderer.cell_mask(all_states[5].known)
    assert np.array_equal(later[shown], decoded[shown])  # the last decoded pixels, newer cells pending
    since = renderer.cell_mask(all_states[9].known & ~all_states[5].known)
    assert set(map(tuple, later[since].reshape(-1, 3))) <= set(PENDING_RGB)


def test_a_sketch_of_nothing_decoded_has_a_key_for_sharing_it(states) -> None:
    tokenizer, all_states = states
    one, other = (PreviewRenderer(tokenizer, display_size=64) for _ in range(2))
    key = one.sketch_key(all_states[0])
    assert key is not None and key == other.sketch_key(all_states[0])  # any stream's opening alike
    assert one.sketch_key(all_states[1]) != key  # other cells, another picture
    assert np.array_equal(np.asarray(one.render(all_states[0], decode=False)[0]),
                          np.asarray(other.render(all_states[0], decode=False)[0]))
    one.render(all_states[2], decode=True)
    assert one.sketch_key(all_states[3]) is None  # its sketches now show its own pixels
    assert one.sketch_key(all_states[-1]) is None  # nor is a finished step a sketch


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_pacer_shows_every_step_while_canvases_are_cheap() -> None:
    clock = FakeClock()
    pacer = PreviewPacer(share=0.2, max_gap=0.2, clock=clock)
    kinds = []
    for _ in range(20):
        clock.now += 0.05  # a step
        kinds.append(pacer.due())
        with pacer.showing(kinds[-1]):
            clock.now += 0.005  # a canvas costing a tenth of a step
    assert kinds == [FULL] * 20


def test_pacer_skips_expensive_canvases_but_keeps_first_last_and_a_pulse() -> None:
    clock = FakeClock()
    pacer = PreviewPacer(share=0.1, max_gap=0.2, first=SKETCH, clock=clock)
    shown = []
    for step in range(1, 101):
        clock.now += 0.01  # a 10 ms step; a full canvas costs 30 ms, a sketch 5 ms
        kind = pacer.due(last=step == 100)
        if kind:
            shown.append((step, kind, clock.now))
            with pacer.showing(kind):
                clock.now += 0.03 if kind == FULL else 0.005
    assert shown[0][:2] == (1, SKETCH) and shown[-1][:2] == (100, FULL)
    gaps = [b[2] - a[2] for a, b in itertools.pairwise(shown)]
    assert max(gaps) <= 0.2 + 0.03 + 0.01  # never longer than max_gap (plus one canvas and step)
    assert 5 < len(shown) < 40 and {kind for _, kind, _ in shown} == {FULL, SKETCH}
    assert pacer.spent <= 0.1 * (clock.now - pacer.spent) + 0.03 + 0.005 * len(shown)


def test_pacers_of_a_crowd_share_one_budget() -> None:
    """Eight streams served at once: each gets an eighth of the canvas time and waits sqrt(8) times
    longer between canvases, so together they cost about what one stream's canvases cost."""
    def run(sharing: int) -> tuple[float, list[float]]:
        clock = FakeClock()
        pacer = PreviewPacer(share=0.2, max_gap=0.2, first=SKETCH, clock=clock)
        times = []
        for step in range(1, 101):
            clock.now += 0.01
            kind = pacer.due(last=step == 100, sharing=sharing)
            if kind:
                times.append(clock.now)
                with pacer.showing(kind):
                    clock.now += 0.01 if kind == FULL else 0.004
        return pacer.spent, times

    alone, crowd = run(1), run(8)
    assert crowd[0] * 8 < alone[0] * 2 and len(crowd[1]) < len(alone[1]) / 2
    assert max(b - a for a, b in itertools.pairwise(crowd[1])) <= 0.2 * 8**0.5 + 0.02


def test_pacer_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="share"):
        PreviewPacer(share=-1)
    with pytest.raises(ValueError, match="first"):
        PreviewPacer(first="maybe")


def _growth(all_states, tokenizer, display: int = 64) -> tuple[GrowthAnimation, list[np.ndarray]]:
    """A GrowthAnimation of a stream, and what each of its frames must show."""
    renderer = PreviewRenderer(tokenizer, display_size=display, fill_token=0)
    finished = [np.asarray(i) for i in renderer.final(all_states[-1].tokens)]
    growth = GrowthAnimation()
    expected = []
    for state in all_states:
        pictures = [Image.fromarray(f) for f in finished] if state.done else None
        growth.add(state, pictures)
        if state.done:
            expected.append(np.asarray(make_grid(pictures)))
            continue
        known, outline = renderer.cell_mask(state.known), renderer.cells.outline(state.new)
        frames = [np.where(known[..., None], f, renderer.canvas) for f in finished]
        for f in frames:
            f[outline] = OUTLINE_RGB
        expected.append(np.asarray(make_grid([Image.fromarray(f) for f in frames])))
    return growth, expected


def test_growth_animation_holds_every_step_painted_from_the_finished_pictures(states, tmp_path) -> None:
    tokenizer, all_states = states
    growth, expected = _growth(all_states, tokenizer)
    assert growth.frame_count == len(all_states)
    path = growth.save(tmp_path / "growth.gif", fps=10, hold_last=1.0)
    with Image.open(path) as gif:
        assert gif.n_frames == len(all_states)
        for i, want in enumerate(expected):
            gif.seek(i)
            got = np.asarray(gif.convert("RGB")).astype(int)
            assert got.shape == want.shape
            # the palette keeps the canvas colours exact and the pictures' colours close
            assert np.abs(got - want).mean() < 3, i
        assert gif.info["duration"] == pytest.approx(1100, abs=10)  # the last frame, held
    assert [p.name for p in tmp_path.iterdir()] == ["growth.gif"]


def test_growth_animation_outlines_corrected_cells_as_the_canvas_does(states, tmp_path) -> None:
    tokenizer, all_states = states
    step = all_states[6]
    corrected = torch.zeros_like(step.tokens, dtype=torch.bool)
    corrected[1][(step.known & ~step.new)] = True  # row 1: every cell drawn before this step
    marked = [dataclasses.replace(s, corrected=corrected if s is step else torch.zeros_like(corrected))
              for s in all_states]
    growth, _ = _growth(marked, tokenizer)
    with Image.open(growth.save(tmp_path / "growth.gif")) as gif:
        for i in range(gif.n_frames):
            gif.seek(i)
            shown = np.all(np.asarray(gif.convert("RGB")) == CORRECTED_RGB, axis=-1)
            live = np.asarray(make_grid(PreviewRenderer(tokenizer, 64, fill_token=0).render(marked[i])))
            assert np.array_equal(shown, np.all(live == CORRECTED_RGB, axis=-1)), i  # where the canvas has it
            assert shown.any() == (i == 6)


def test_growth_animation_as_mp4(states, tmp_path) -> None:
    if preview.ffmpeg_exe() is None:
        pytest.skip("no ffmpeg binary (imageio-ffmpeg) here")
    tokenizer, all_states = states
    growth, _ = _growth(all_states, tokenizer)
    path = growth.save(tmp_path / "growth.mp4", fps=8, hold_last=0.5)
    with imageio_v2.get_reader(path, format="FFMPEG") as reader:
        assert len(list(reader.iter_data())) == len(all_states) + 4


def test_growth_animation_of_a_zoom_out_keeps_each_rounds_colours(states, tmp_path) -> None:
    _, all_states = states
    growth = GrowthAnimation()
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    for state in all_states:
        growth.add(state, [red, red] if state.done else None)
    growth.add(all_states[-1], [blue, blue])  # a bridge frame: a finished frame, kept as it is
    for state in all_states:
        growth.add(state, [blue, blue] if state.done else None)
    with Image.open(growth.save(tmp_path / "zoom.gif")) as gif:
        assert gif.n_frames == 2 * len(all_states) + 1
        colours = []
        for i in (len(all_states) - 1, len(all_states), 2 * len(all_states)):
            gif.seek(i)
            colours.append(tuple(np.asarray(gif.convert("RGB"))[32, 32]))
    assert colours == [(255, 0, 0), (0, 0, 255), (0, 0, 255)]


def test_growth_animation_needs_finished_pictures(states, tmp_path) -> None:
    _, all_states = states
    growth = GrowthAnimation()
    growth.add(all_states[0])
    with pytest.raises(ValueError, match="no finished frames"):
        growth.save(tmp_path / "a.gif")
    with pytest.raises(ValueError, match="needs its pictures"):
        growth.add(all_states[-1])


def test_frames_are_drawn_only_when_asked_for(tmp_path) -> None:
    pipe = EARPipeline.from_pretrained(str(write_tiny_model(tmp_path / "tiny")))
    frames = list(pipe.stream([0, 1], seed=0))
    renderer = frames[0]._renderer
    assert renderer.decode_calls == 0  # streaming itself decodes nothing
    frames[3].sketch()
    assert renderer.decode_calls == 0
    assert frames[-1].images[0].size == (256, 256) and renderer.decode_calls == 1
    assert frames[-1].with_caption("x").images is frames[-1].images
