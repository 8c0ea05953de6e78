"""Edit anywhere: known cells of any shape in the sampler, the engine and the scheduler (tokens
exact), and the pipeline's edit and placed extension built on them."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from ear import hub
from ear.__main__ import main
from ear.images import to_tensor
from ear.order import SCHEDULES, make_schedule
from ear.pipeline import PLACES, EARPipeline
from ear.sampler import UNKNOWN, _as_known, generate, last_drawn_step, sample, state_count
from ear.serving import Scheduler
from tests.helpers import (
    CLASS_NAMES,
    PaletteTokenizer,
    is_skip,
    noisy_model,
    same_picture,
    tiny_ear,
    write_tiny_model,
)
from tests.test_cli import _cli

pytestmark = pytest.mark.usefixtures("torch_single_thread")
G = 8


@pytest.fixture(scope="module")
def model():
    return noisy_model()


def masks() -> dict[str, torch.Tensor]:
    """(G, G) bool: True where the cell is known."""
    r, c = torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij")
    return {"border": (r == 0) | (c == 0) | (r == G - 1) | (c == G - 1), "left": c < G // 2,
            "top": r < G // 2, "blob": ~(((r - 5) ** 2 + (c - 1) ** 2) <= 3),
            "centre": ~((r >= 2) & (r < 6) & (c >= 2) & (c < 6))}


def known_grid(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, tokens, torch.full_like(tokens, UNKNOWN))


@pytest.fixture(scope="module")
def picture(model) -> torch.Tensor:
    return generate(model, [7], seed=99)[0]  # (G, G): the "original" whose cells are kept


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("engine", ["runner", "reference"])
def test_known_cells_keep_their_tokens_in_every_order(model, picture, schedule, engine) -> None:
    sched = make_schedule(schedule, G)
    for name, mask in masks().items():
        states = list(sample(model, [3], seed=5, cfg_scale=1.5, known=known_grid(picture, mask),
                             schedule=sched, engine=engine))
        final = states[-1].tokens[0]
        assert torch.equal(final[mask], picture[mask]), name
        assert (final >= 0).all() and states[-1].done
        assert torch.equal(states[0].known, mask)
        for state in states:  # known cells are in every state; drawn ones appear step by step
            assert torch.equal(state.tokens[0][mask], picture[mask])


def test_runner_and_reference_draw_the_same_cells(model, picture) -> None:
    for mask in masks().values():
        kwargs = {"seed": 2, "cfg_scale": 2.0, "top_k": 8, "known": known_grid(picture, mask)}
        assert torch.equal(generate(model, [4], **kwargs), generate(model, [4], engine="reference", **kwargs))


def test_a_prefix_is_the_known_mask_of_the_first_steps(model, picture) -> None:
    sched = model.schedule
    order = torch.tensor(sched.order)
    for steps in (1, 4, 9):
        length = sched.boundaries[steps]
        prefix = picture.flatten()[order[:length]]
        mask = torch.zeros(G * G, dtype=torch.bool)
        mask[order[:length]] = True
        by_prefix = list(sample(model, [2, 6], seed=1, prefix=prefix))
        by_mask = list(sample(model, [2, 6], seed=1, known=known_grid(picture, mask.view(G, G))))
        assert len(by_prefix) == len(by_mask) == sched.num_steps - steps + 1
        for a, b in zip(by_prefix, by_mask, strict=True):
            assert (a.step, a.num_steps) == (b.step, b.num_steps)
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.known, b.known)
            assert torch.equal(a.new, b.new)


def test_a_batch_may_mix_masks_and_each_row_is_as_if_alone(model, picture) -> None:
    rows = [masks()["blob"], masks()["border"], torch.zeros(G, G, dtype=torch.bool), masks()["top"]]
    known = torch.stack([known_grid(picture, m) for m in rows])
    seeds, classes = [3, 4, 3, 8], [1, 2, 1, 5]
    mixed = generate(model, classes, seed=seeds, row_ids=[0] * 4, cfg_scale=1.5, known=known)
    for i, mask in enumerate(rows):
        alone = generate(model, [classes[i]], seed=seeds[i], cfg_scale=1.5,
                         known=known_grid(picture, mask) if mask.any() else None)
        assert torch.equal(mixed[i], alone[0]), i


def test_an_empty_mask_is_plain_generation(model) -> None:
    empty = torch.full((G, G), UNKNOWN)
    plain = list(sample(model, [1, 2], seed=3, cfg_scale=1.5))
    masked = list(sample(model, [1, 2], seed=3, cfg_scale=1.5, known=empty))
    assert len(plain) == len(masked) == model.schedule.num_steps
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(plain, masked, strict=True))


def test_the_scheduler_serves_known_cells_as_sample_alone(model, picture) -> None:
    scheduler = Scheduler(max_rows=8)
    try:
        for mask in (masks()["blob"], masks()["left"]):
            known = known_grid(picture, mask)
            served = list(scheduler.sample(model, [2], seed=6, cfg_scale=1.5, known=known))
            alone = list(sample(model, [2], seed=6, cfg_scale=1.5, known=known))
            assert [s.step for s in served] == [s.step for s in alone]
            assert torch.equal(served[-1].tokens, alone[-1].tokens)
    finally:
        scheduler.close()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"known": torch.zeros(G, G, dtype=torch.long)}, "every cell"),
    ({"known": torch.zeros(3, 3, dtype=torch.long)}, "must have shape"),
    ({"known": torch.full((G, G), 99)}, r"token ids must lie in \[0, 64\)"),
    ({"known": torch.full((G, G), -5)}, "UNKNOWN"),
    ({"known": torch.ones(G, G, dtype=torch.bool)}, "integer token ids"),
    ({"known": torch.full((G, G), UNKNOWN), "prefix": torch.zeros(1, dtype=torch.long)}, "not both"),
])
def test_bad_known_cells_are_one_sentence(model, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        next(sample(model, [1], **kwargs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (graphs)")
def test_cuda_graphs_read_the_known_cells_from_the_slot(picture) -> None:
    """Graphs captured for one mask replay with another (the slot's buffers are rewritten), and a
    slot that had a mask serves plain generation again (graphs are keyed by it)."""
    from ear.engine import configure

    model = noisy_model().cuda()
    configure(model, graphs=False)
    cases = [known_grid(picture, masks()[k]) for k in ("blob", "left")] + [None]
    eager = [generate(model, [1, 2, 3], seed=4, cfg_scale=1.5, known=k) for k in cases]
    configure(model, graphs=True)
    for _ in range(2):  # captured, then replayed
        for k, want in zip(cases, eager, strict=True):
            assert torch.equal(generate(model, [1, 2, 3], seed=4, cfg_scale=1.5, known=k), want)


def test_sampling_stops_after_the_last_cell_to_draw(model, picture) -> None:
    """A centre hole is drawn in the first steps: the states jump to the end from there, with
    exactly the tokens a full run gives, and `state_count` says how many states come."""
    mask = masks()["centre"]
    known = known_grid(picture, mask)
    states = list(sample(model, [1], seed=4, known=known))
    last = last_drawn_step(_as_known(model, known, None, 1, model.schedule), model.schedule)
    assert last < model.schedule.num_steps - 1
    assert [s.step for s in states] == [0, *range(1, last + 2), model.schedule.num_steps]
    assert len(states) == state_count(_as_known(model, known, None, 1, model.schedule), model.schedule)
    assert states[-1].known.all() and torch.equal(states[-1].new, ~states[-2].known)
    assert torch.equal(states[-1].tokens, generate(model, [1], seed=4, known=known, engine="reference"))


# ---- the pipeline ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(torch_single_thread) -> EARPipeline:
    """A faithful (blocky) tokenizer: kept cells show the user's own colours."""
    tokenizer = PaletteTokenizer(grid=G, patch=4, levels=4)
    loaded = hub.LoadedModel(name="palette", source="test", model=tiny_ear(tokenizer.codebook_size, grid=G),
                             tokenizer=tokenizer, class_names=list(CLASS_NAMES),
                             presets={"default": {"cfg_scale": 2.0}}, default_preset="default")
    return EARPipeline(loaded, torch.device("cpu"), torch.float32)


def stripes(size: int = 32) -> Image.Image:
    """Eight flat colour stripes: every cell of the 8x8 grid knows where it is."""
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255],
                        [255, 0, 255], [255, 255, 255], [0, 0, 0]], dtype=np.uint8)
    return Image.fromarray(np.repeat(colours, size // 8, axis=0)[:, None].repeat(size, 1))


def test_edit_redraws_only_the_painted_cells(pipe: EARPipeline) -> None:
    picture = stripes()
    original = pipe.tokenizer.encode(to_tensor(picture)[None])[0]
    paint = np.zeros((32, 32, 4), dtype=np.uint8)  # a brush layer: transparent but for one stroke
    paint[9:18, 5:14, 3] = 255  # touches cells rows 2..4, columns 1..3
    frames = list(pipe.edit(picture, Image.fromarray(paint, "RGBA"), "cat", seed=2, display_size=32))
    redraw = torch.zeros(G, G, dtype=torch.bool)
    redraw[2:5, 1:4] = True
    first, last = frames[0].state, frames[-1].state
    assert torch.equal(first.known, ~redraw) and last.done
    assert torch.equal(last.tokens[0][~redraw], original[~redraw])  # token for token
    shown = np.asarray(frames[-1].images[0]).astype(int)
    kept = np.repeat(np.repeat(~redraw.numpy(), 4, 0), 4, 1)
    assert np.abs(shown[kept] - np.asarray(picture).astype(int)[kept]).max() == 0  # flat: exact


def test_a_cell_mask_and_a_light_mask_mean_the_same(pipe: EARPipeline, tmp_path) -> None:
    cells = np.zeros((G, G), dtype=bool)
    cells[5:, 5:] = True
    white = Image.fromarray(np.where(np.repeat(np.repeat(cells, 4, 0), 4, 1), 255, 0).astype(np.uint8))
    white.save(tmp_path / "mask.png")
    by_cells = [f.state.tokens for f in pipe.edit(stripes(), cells, None, seed=5)]
    by_file = [f.state.tokens for f in pipe.edit(stripes(), tmp_path / "mask.png", None, seed=5)]
    assert all(torch.equal(a, b) for a, b in zip(by_cells, by_file, strict=True))


def test_a_mask_is_cropped_like_its_picture(pipe: EARPipeline) -> None:
    """A wide picture is centre-cropped; its mask too, so the painted cells stay under the paint."""
    mask = np.zeros((32, 64), dtype=np.uint8)
    mask[:, 16:24] = 255  # the left quarter of the square crop (columns 16..48)
    cells = pipe.mask_cells(mask, (64, 32))
    assert cells[:, :2].all() and not cells[:, 2:].any()


@pytest.mark.parametrize(("mask", "message"), [
    (np.zeros((32, 32), dtype=np.uint8), "paints no cell"),
    (np.full((32, 32), 255, dtype=np.uint8), "covers the whole picture"),
    (np.full((20, 30), 255, dtype=np.uint8), "30x20 pixels but the picture is 32x32"),
    (b"not an image", "not an image format"),
])
def test_bad_masks_are_one_sentence(pipe: EARPipeline, mask, message) -> None:
    with pytest.raises(ValueError, match=message):
        pipe.edit(stripes(), mask)


def test_refinement_keeps_the_likeliest_round(pipe: EARPipeline) -> None:
    cells = np.zeros((G, G), dtype=bool)
    cells[3:5, 3:5] = True  # a centre hole: drawn before any known cell in the spiral
    frames = list(pipe.edit(stripes(), cells, "dog", seed=1, refine=2))
    rounds = [f for f in frames if f.caption.startswith("round")]
    finals = [f.state for f in rounds if f.state.done]
    assert len(finals) == 3 and frames[-1].caption.startswith("kept round")
    kept = frames[-1].state.tokens
    assert any(torch.equal(kept, s.tokens) for s in finals)
    assert torch.equal(finals[0].tokens, list(pipe.edit(stripes(), cells, "dog", seed=1))[-1].state.tokens)
    with pytest.raises(ValueError, match="refine must be an integer"):
        pipe.edit(stripes(), cells, refine=99)


@pytest.mark.parametrize("place", PLACES)
def test_extension_places_the_picture_anywhere(pipe: EARPipeline, place: str) -> None:
    keep = 4
    box = pipe.place_box(place, keep)
    frames = list(pipe.extend(stripes(), keep, "cat", place=place, seed=3))
    assert len(frames) == pipe.frame_count(keep, place=place)
    left, top, right, bottom = box
    region = torch.zeros(G, G, dtype=torch.bool)
    region[top:bottom, left:right] = True
    assert torch.equal(frames[0].state.known, region)
    given = pipe.encode_region(stripes(), box)
    assert torch.equal(frames[-1].state.tokens[0][region], given[region])
    assert (given[~region] == UNKNOWN).all()


def test_centred_extension_is_the_old_prefix_run(pipe: EARPipeline) -> None:
    prefix = pipe.encode_centre(stripes(), 4)
    old = list(sample(pipe.model, [1], seed=4, cfg_scale=2.0, prefix=prefix))
    new = [f.state for f in pipe.extend(stripes(), 4, "dog", seed=4)]
    assert [s.step for s in old] == [s.step for s in new]
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(old, new, strict=True))


def test_places_and_keeps_are_checked(pipe: EARPipeline) -> None:
    assert pipe.place_box("left", 3) == (0, 0, 3, G) and pipe.place_box("bottom right", 2) == (6, 6, 8, 8)
    with pytest.raises(ValueError, match="place must be one of"):
        pipe.extend(stripes(), 4, place="middle")
    with pytest.raises(ValueError, match=r"keep must be an integer in \[1, 7\]"):
        pipe.extend(stripes(), 8, place="left")


def test_a_picture_file_with_transparency_paints_where_opaque(tmp_path) -> None:
    from ear.images import load_mask

    layer = np.zeros((10, 12, 4), dtype=np.uint8)
    layer[2:4, 3:6] = (200, 10, 10, 255)
    buf = io.BytesIO()
    Image.fromarray(layer, "RGBA").save(buf, format="PNG")
    painted = load_mask(buf.getvalue(), (12, 10))
    assert painted.shape == (10, 12) and (painted[2:4, 3:6] == 255).all() and painted.sum() == 6 * 255


# ---- the command line --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("edit-cli") / "tiny")


def test_cli_edit_end_to_end(model_dir: Path, tmp_path: Path) -> None:
    picture, mask = tmp_path / "in.png", tmp_path / "mask.png"
    stripes(40).save(picture)
    paint = np.zeros((40, 40, 4), dtype=np.uint8)
    paint[5:15, 20:35, 3] = 255
    Image.fromarray(paint, "RGBA").save(mask)
    out, anim = tmp_path / "out.png", tmp_path / "out.gif"
    run = _cli("edit", "--model", str(model_dir), "--image", str(picture), "--mask", str(mask), "--class",
               "dog", "--seed", "1", "--size", "32", "--out", str(out), "--animation", str(anim), "--quiet")
    assert run.returncode == 0, run.stderr
    assert Image.open(out).size == (32, 32) and anim.stat().st_size > 0
    pipe = EARPipeline.from_pretrained(str(model_dir))
    want = list(pipe.edit(picture, mask, "dog", seed=1, display_size=32))[-1].images[0]
    assert same_picture(Image.open(out).convert("RGB"), want)


def test_cli_extend_places_the_picture(model_dir: Path, tmp_path: Path, capsys) -> None:
    picture, out = tmp_path / "in.png", tmp_path / "out.png"
    stripes(40).save(picture)
    assert main(["extend", "--model", str(model_dir), "--image", str(picture), "--keep", "3", "--place",
                 "left", "--seed", "2", "--size", "32", "--out", str(out), "--quiet"]) == 0
    pipe = EARPipeline.from_pretrained(str(model_dir))
    want = list(pipe.extend(picture, 3, place="left", seed=2, display_size=32))[-1].images[0]
    assert same_picture(Image.open(out).convert("RGB"), want)


def test_cli_bad_edits_exit_2_with_one_line(model_dir: Path, tmp_path: Path, capsys) -> None:
    picture, out = tmp_path / "in.png", tmp_path / "out.png"
    stripes(40).save(picture)
    for name, array in (("empty", np.zeros((40, 40), np.uint8)), ("full", np.full((40, 40), 255, np.uint8)),
                        ("small", np.full((20, 40), 255, np.uint8)),
                        ("half", np.tile(np.array([0, 255], np.uint8).repeat(20), (40, 1)))):
        Image.fromarray(array).save(tmp_path / f"{name}.png")
    m = ["edit", "--model", str(model_dir), "--image", str(picture), "--out", str(out), "--quiet"]
    for argv, phrase in [([*m, "--mask", str(tmp_path / "empty.png")], "paints no cell"),
                         ([*m, "--mask", str(tmp_path / "full.png")], "covers the whole picture"),
                         ([*m, "--mask", str(tmp_path / "small.png")], "picture is 40x40"),
                         ([*m, "--mask", str(tmp_path / "missing.png")], "No image file"),
                         ([*m, "--mask", str(tmp_path / "half.png"), "--refine", "-1"], "refine must be"),
                         (["extend", *m[1:5], "--keep", "3", "--place", "left", "--zoom-out", "2", "--out",
                           str(out)], "--zoom-out shrinks")]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and phrase in err and err.count("\n") == 1, (argv, err)
    assert not out.exists()


def test_the_serving_process_takes_known_cells_too(model, picture) -> None:
    from ear.serving import ProcessScheduler

    scheduler = ProcessScheduler(max_rows=8)
    try:
        known = known_grid(picture, masks()["blob"])
        served = list(scheduler.sample(model, [2, 3], seed=6, cfg_scale=1.5, known=known))
        alone = list(sample(model, [2, 3], seed=6, cfg_scale=1.5, known=known))
        assert [s.step for s in served] == [s.step for s in alone]
        assert torch.equal(served[-1].tokens, alone[-1].tokens)
    finally:
        scheduler.close()


# ---- the page ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def page(model_dir: Path):
    """app.py loaded on its own (the page's module is shared by test_app.py), on the tiny model."""
    import importlib.util
    import os
    from unittest import mock

    spec = importlib.util.spec_from_file_location("app_for_edit", Path(__file__).parents[1] / "app.py")
    module = importlib.util.module_from_spec(spec)
    env = {"EAR_STUDIO_MODEL": str(model_dir), "EAR_BATCHING": "0", "GRADIO_ANALYTICS_ENABLED": "False"}
    with mock.patch.dict(os.environ, env):
        spec.loader.exec_module(module)
    return module


def run_edit(page, value, class_name="cat", refine=0, seed=3) -> list[list]:
    return list(page.edit(value, class_name, refine, seed, 1.5, 1.0, 0, 1.0, page.MODELS.default, "gif"))


def brush(size: int, box: tuple[int, int, int, int]) -> Image.Image:
    """A transparent brush layer with one opaque stroke (left, top, right, bottom in pixels)."""
    layer = np.zeros((size, size, 4), dtype=np.uint8)
    left, top, right, bottom = box
    layer[top:bottom, left:right] = (255, 0, 255, 255)
    return Image.fromarray(layer, "RGBA")


def test_the_edit_tab_regrows_the_painted_region(page) -> None:
    picture = stripes(64)
    updates = run_edit(page, {"background": picture, "layers": [brush(64, (10, 10, 30, 30))]})
    _, caption, result, animation, _ = updates[-1]
    assert caption.endswith("· done") and result and animation
    pipe = page.MODELS.get(None)
    want = list(pipe.edit(picture, brush(64, (10, 10, 30, 30)), "cat", seed=3, cfg_scale=1.5,
                          temperature=1.0, top_k=0, top_p=1.0))[-1].images[0]
    assert same_picture(Image.open(result).convert("RGB"), want)


def test_the_edit_endpoint_takes_files_as_an_api_client_sends_them(page, tmp_path: Path) -> None:
    """Unprocessed (HEAVY): the editor component reads the files into pictures first."""
    stripes(64).save(tmp_path / "pic.png")
    brush(64, (0, 0, 20, 64)).save(tmp_path / "paint.png")
    fields = {"meta": {"_type": "gradio.FileData"}}
    value = {"background": {"path": str(tmp_path / "pic.png"), **fields},
             "layers": [{"path": str(tmp_path / "paint.png"), **fields}], "composite": None, "id": None}
    fn = next(f for f in page.demo.fns.values() if f.api_name == "edit")
    editor = fn.inputs[0]
    handler = page._with_editor(editor, page.edit)
    updates = list(handler(value, "cat", 0, 3, 1.5, 1.0, 0, 1.0, page.MODELS.default, "gif"))
    assert updates[-1][1].endswith("· done")
    (tmp_path / "notes.png").write_text("not a picture")
    for part in ("background", "layers"):  # a file that is no picture is said to be one
        bad = {**value, part: {"path": str(tmp_path / "notes.png"), **fields}}
        if part == "layers":
            bad[part] = [bad[part]]
        with pytest.raises(gr.Error):
            list(handler(bad, "cat", 0, 3, 1.5, 1.0, 0, 1.0, page.MODELS.default, "gif"))
        caption = next(iter(handler(bad, "cat", 0, 3, 1.5, 1.0, 0, 1.0, page.MODELS.default, "gif")))[1]
        assert ("not an image format" if part == "background" else "layer could not be read") in caption


@pytest.mark.parametrize(("value", "fragment"), [
    (None, "Upload a picture first"),
    ({"background": None, "layers": []}, "Upload a picture first"),
    # the editor's own empty canvas (what it sends when nothing was uploaded), painted on
    ({"background": Image.new("RGBA", (800, 800), "white"), "layers": [brush(800, (300, 300, 400, 400))]},
     "Upload a picture first"),
    ({"background": stripes(64), "layers": []}, "paints no cell"),
    ({"background": stripes(64), "layers": [brush(64, (0, 0, 64, 64))]}, "covers the whole picture"),
    ({"background": stripes(64), "layers": [brush(32, (0, 0, 8, 8))]}, "32x32 pixels but the picture"),
])
def test_the_edit_tab_refuses_in_one_sentence(page, value, fragment) -> None:
    updates = []
    with pytest.raises(gr.Error):
        for update in page.edit(value, "cat", 0, 3, 1.5, 1.0, 0, 1.0, page.MODELS.default, "gif"):
            updates.append(update)
    assert len(updates) == 1 and fragment in updates[0][1]


def test_an_upload_for_the_editor_is_read_by_the_server_and_shrunk(page, tmp_path: Path) -> None:
    """The editor gets a picture at most EDITOR_MAX_SIDE px wide (a phone photo at full size
    would be encoded again by the browser on every Redraw); what will be used of it is said."""
    Image.new("RGB", (4000, 3000), "olive").save(tmp_path / "photo.jpg")
    value, note = page.uploaded_picture(str(tmp_path / "photo.jpg"))
    assert value["background"].size == (1024, 768) and value["layers"] == []
    assert note == "ℹ️ Shown at 1024 x 768 px (from 4000 x 3000) to paint on."
    paint = np.zeros((768, 1024, 4), dtype=np.uint8)
    paint[:300, :300] = 255
    updates = run_edit(page, {"background": value["background"], "layers": [Image.fromarray(paint, "RGBA")]})
    assert updates[-1][1].endswith("· done")
    Image.new("RGB", (1, 1), "red").save(tmp_path / "dot.png")
    value, note = page.uploaded_picture(str(tmp_path / "dot.png"))
    assert value["background"].size == (1, 1) and "blocky" in note
    (tmp_path / "notes.png").write_text("not a picture")
    value, note = page.uploaded_picture(str(tmp_path / "notes.png"))
    assert is_skip(value) and note.startswith("⚠️") and "not an image format" in note
    assert str(tmp_path) not in note


def test_the_last_generated_picture_or_a_sentence_when_there_is_none(page) -> None:
    value, caption = page.last_generated([])
    assert is_skip(value) and caption == "⚠️ Generate a picture first: there is none to edit yet."
    picture = stripes(64)
    value, caption = page.last_generated([(picture, None)])
    assert value["background"] is picture and caption == ""


def test_extend_tab_places_the_picture(page, tmp_path: Path) -> None:
    stripes(64).save(tmp_path / "pic.png")
    upload = {"path": str(tmp_path / "pic.png"), "orig_name": "pic.png", "meta": {"_type": "gradio.FileData"}}
    args = (4, "cat", 0, 3, 1.5, 1.0, 0, 1.0, page.MODELS.default, "gif", "Any")
    updates = list(page.extend(upload, *args, page.FAST, "top right"))
    pipe = page.MODELS.get(None)
    want = list(pipe.extend(stripes(64), 4, "cat", place="top right", seed=3, cfg_scale=1.5,
                            temperature=1.0, top_k=0, top_p=1.0))[-1].images[0]
    assert same_picture(Image.open(updates[-1][2]).convert("RGB"), want)
    with pytest.raises(gr.Error):
        list(page.extend(upload, 4, "cat", 2, *args[3:], page.FAST, "left"))  # zoom-out is centre-only


# ---- in a real browser -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser_page():
    """Chromium on `python app.py` (the bundled model where it is there), as tests/test_browser.py."""
    from tests import test_browser as tb
    from tests.app_server import running_app, server_model

    tb._require_browser()
    from playwright.sync_api import sync_playwright

    tmp = Path(__import__("tempfile").mkdtemp(prefix="edit-browser-"))
    model = server_model(tmp)
    with running_app(model, tmp / "server.log") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(tb.CHROMIUM), args=tb.CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.set_default_timeout(tb.WAIT_MS)
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_selector("#gen-run")
        yield page, model
        browser.close()


EDIT_UPLOAD = "input[data-testid='Upload a picture-upload-button']"  # the Upload button's file input


@pytest.mark.browser
@pytest.mark.slow
def test_in_chromium_edit_refusals_are_one_sentence_and_leave_the_page_ready(browser_page, tmp_path) -> None:
    from tests import test_browser as tb

    page, _ = browser_page
    page.reload(wait_until="domcontentloaded")  # nothing generated yet in this session
    page.wait_for_selector("#gen-run")
    tb.open_tab(page, "Edit")
    page.click("#edit-take")
    tb.wait_caption(page, "#edit-caption", "Generate a picture first: there is none to edit yet.")
    fake = tmp_path / "holiday.png"
    fake.write_text("definitely not a picture")
    page.set_input_files(EDIT_UPLOAD, str(fake))
    tb.wait_caption(page, "#edit-caption", "not an image format we can read")
    # paint on the empty editor and Redraw: the paint is not a picture to edit
    page.locator("#edit-image button[aria-label='Brush']").first.click()
    box = page.locator("#edit-image canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 40, y + 30, steps=8)
    page.mouse.up()
    page.click("#edit-run")
    tb.wait_caption(page, "#edit-caption", "Upload a picture first")
    # the refused run ends like any other: Stop greys out, no "Error" badge over the canvas
    page.wait_for_function("() => document.querySelector('#edit-stop').disabled")
    assert "Error" not in page.inner_text("#edit-canvas")
    page.screenshot(path=tb.ARTIFACTS / "browser-edit-refused.png", full_page=True)


@pytest.mark.browser
@pytest.mark.slow
def test_in_chromium_the_painted_region_regrows_and_the_rest_stays(browser_page) -> None:
    import urllib.request

    from tests import test_browser as tb

    page, model = browser_page
    source = Path(__file__).parents[1] / "assets" / "examples" / "smiley.png"
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    tb.open_tab(page, "Edit")
    canvas = page.locator("#edit-image canvas").first
    # The editor shows the picture (its brush picked, Undo live) a moment after the upload; paint
    # before that and the run rightly says there is no picture or no paint. On a loaded machine
    # that moment can be late: upload, paint and run again (the caption says which it was). A
    # loaded machine can also deliver the server's live canvases in one burst, of which the
    # browser draws the last alone (the server, having sent them, then ends on the final picture,
    # not the playback): run again then too; the last attempt is held to the same assertion.
    loaded = ("() => document.querySelector('#edit-image button[aria-label=\"Brush\"].highlight')"
              " || document.querySelector('#edit-image button[aria-label=\"Undo\"]:not([disabled])')")
    ended = "() => window.__seen.captions.some(([text]) => /done|⚠️/.test(text))"  # this attempt's
    for _attempt in range(3):
        page.set_input_files(EDIT_UPLOAD, str(source))  # through the server (`uploaded_picture`)
        with contextlib.suppress(PlaywrightTimeout):
            page.wait_for_function(loaded, timeout=30_000)
        box = canvas.bounding_box()
        x, y = box["x"] + box["width"] * 0.55, box["y"] + box["height"] * 0.25  # the picture's top right
        page.mouse.move(x, y)
        page.mouse.down()
        for i in range(12):
            page.mouse.move(x + i * 6, y + (i % 3) * 8, steps=3)
        page.mouse.up()
        tb.watch(page, "edit")
        page.click("#edit-run")
        page.wait_for_function(ended)
        if "done" in page.inner_text("#edit-caption") and tb.growth_seen(page.evaluate("window.__seen")):
            break
    tb.wait_caption(page, "#edit-caption", "done")
    seen = page.evaluate("window.__seen")
    tb.assert_growth_seen(seen)  # it regrew on the canvas, step by step
    tb.assert_image_loaded(page, "#edit-final")
    page.screenshot(path=tb.ARTIFACTS / "browser-edit.png", full_page=True)
    with urllib.request.urlopen(page.locator("#edit-final img").get_attribute("src")) as reply:
        result = np.asarray(Image.open(io.BytesIO(reply.read())).convert("RGB")).astype(int)
    from ear.app_support import extend_model, model_choices

    pipe = EARPipeline.from_pretrained(extend_model(model, model_choices()))  # the Edit tab's own
    picture = Image.open(source).convert("RGB")
    tokens = pipe.encode_region(picture, (0, 0, pipe.grid, pipe.grid))
    recon = np.asarray(pipe.renderer(result.shape[0]).final(tokens[None])[0]).astype(int)
    half = result.shape[0] // 2
    far = np.abs(result[half:, :half] - recon[half:, :half])  # the quadrant far from the paint
    near = np.abs(result[:half, half:] - recon[:half, half:])
    assert far.mean() < 3 < near.mean(), (far.mean(), near.mean())


def test_refinement_rounds_keep_one_style(tmp_path: Path) -> None:
    folder = write_tiny_model(tmp_path / "styled", styles=["Flat", "Shaded"])
    styled = EARPipeline.from_pretrained(str(folder))
    cells = np.zeros((G, G), dtype=bool)
    cells[:2] = True
    frames = list(styled.edit(stripes(), cells, "cat", seed=3, refine=1))
    rounds = [f.state.tokens for f in frames if f.caption.startswith("round") and f.state.done]
    style = styled.style_index(styled.styles[3 % 2])
    for r, tokens in enumerate(rounds):  # round r is the plain edit with seed 3 + r in round 0's style
        alone = list(styled.edit(stripes(), cells, "cat", seed=3 + r, style=style))[-1].state.tokens
        assert torch.equal(tokens, alone)
