"""The app's handlers called directly (no server, no browser): every endpoint streams frames and
ends with its results, and every kind of bad input becomes a `gr.Error` a person can read.

The app is imported with a tiny random model as its default (EAR_STUDIO_MODEL), so this file runs
in seconds on a CPU whether or not the bundled model is present.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import itertools
import os
import re
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock

import gradio as gr
import huggingface_hub.constants
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ear import app_support, hub
from ear.activate import Activation, ActivationConfig
from ear.app_support import (
    UNCONDITIONAL,
    OutputFiles,
    available_cpus,
    check_style,
    examples_cache,
    public_source,
    stopped_caption,
    threads_per_request,
)
from ear.growth import GrowthAnimation, PreviewPacer
from ear.order import RADAR_SCHEDULES, SCHEDULES, make_schedule
from ear.pipeline import EARPipeline
from ear.preview import PENDING_RGB
from ear.stops import RunStopped
from tests.helpers import CLASS_NAMES, is_skip, same_picture, tiny_ear, write_tiny_model

REPO = Path(__file__).resolve().parents[1]
SAMPLING = {"seed": 3, "cfg_scale": 1.5, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_model(tmp_path_factory.mktemp("app") / "tiny"))


@pytest.fixture(scope="module")
def app(tiny: str) -> types.ModuleType:
    with mock.patch.dict(os.environ, {"EAR_STUDIO_MODEL": tiny, "GRADIO_ANALYTICS_ENABLED": "False"}):
        import app as module
    assert module.MODELS.default == tiny, "app was imported before this fixture with another model"
    return module


@pytest.fixture(scope="module", autouse=True)
def served_threads(app: types.ModuleType) -> Iterator[None]:
    """Run handlers with the thread count the served app uses (see `threads_per_request`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(app.THREADS or before)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def steps(app: types.ModuleType) -> int:
    return app.MODELS.get(None).model.schedule.num_steps


@pytest.fixture(scope="module")
def states_of_a_run(app: types.ModuleType) -> list:
    return list(app.MODELS.get(None).states([0], seed=1))


def generate(app: types.ModuleType, class_name: Any = "cat", num_images: Any = 1, model: Any = None,
             fmt: Any = "gif", style: Any = "Any", pace: str = "fast", **sampling: Any) -> list[tuple]:
    return list(generating(app, class_name, num_images, model, fmt, style, pace, **sampling))


def generating(app: types.ModuleType, class_name: Any = "cat", num_images: Any = 1, model: Any = None,
               fmt: Any = "gif", style: Any = "Any", pace: str = "fast", **sampling: Any) -> Iterator[list]:
    args = {**SAMPLING, **sampling}
    return app.generate(class_name, num_images, args["seed"], args["cfg_scale"], args["temperature"],
                        args["top_k"], args["top_p"], model or app.MODELS.default, fmt, style, pace)


def extend(app: types.ModuleType, image: Any, keep: Any = 4, class_name: Any = UNCONDITIONAL,
           rounds: Any = 0, model: Any = None, fmt: Any = "gif", pace: str = "fast",
           **sampling: Any) -> list[tuple]:
    args = {**SAMPLING, **sampling}
    return list(app.extend(image, keep, class_name, rounds, args["seed"], args["cfg_scale"],
                           args["temperature"], args["top_k"], args["top_p"],
                           model or app.MODELS.default, fmt, "Any", pace))


def upload(path: Path) -> dict[str, Any]:
    """What Gradio hands a handler for an uploaded file when preprocessing is off."""
    return {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def saved(tmp_path: Path, image: Image.Image, name: str, **kwargs: Any) -> dict[str, Any]:
    path = tmp_path / name
    image.save(path, **kwargs)
    return upload(path)


def assert_user_error(call: Any, *fragments: str) -> str:
    """`call` raises gr.Error whose message contains every fragment and no traceback noise."""
    with pytest.raises(gr.Error) as info:
        call()
    message = info.value.message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    assert "Traceback" not in message and len(message) < 600
    return message


def pixels(path: str) -> np.ndarray:
    """Handlers return file paths (see OutputFiles); this is the picture behind one."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


ARMS = (*SCHEDULES, "radar-refined", "radar-plain", "activated")  # Compare's arms, in the page's order


def caption_of(compare_update: list[Any], key: str) -> str:
    """One arm's caption in a Compare update ('' when the update skips it)."""
    caption = compare_update[2 * ARMS.index(key) + 1]
    return "" if is_skip(caption) else caption


def canvas_of(compare_update: list[Any], key: str) -> Any:
    return compare_update[2 * ARMS.index(key)]


# ---- endpoints --------------------------------------------------------------------------------

@pytest.fixture
def every_step(app: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Previews as cheap as can be: the pacer shows every step."""
    monkeypatch.setattr(app, "PreviewPacer", functools.partial(PreviewPacer, share=1e9))


@pytest.fixture
def files(app: types.ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> OutputFiles:
    """The app's output folder, empty, for this test alone."""
    files = OutputFiles(tmp_path / "out", linger_s=0.0)
    monkeypatch.setattr(app, "FILES", files)
    return files


def test_visitors_at_once_share_the_scheduler_and_keep_their_own_pictures(
        app: types.ModuleType, files: OutputFiles) -> None:
    """Handlers served by the batching scheduler (the default): captions say when a run shared its
    batch with other visitors (and no serving jargon), and each visitor's pictures are those of
    its own seed alone."""
    assert app.SCHEDULER is not None and app.SCHEDULER.max_rows == app.CONCURRENCY_LIMIT
    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda seed: generate(app, num_images=2, seed=seed), [11, 12, 11]))
    for outs in runs:
        caption = outs[-1][1]
        assert re.search(r"· \d+\.\d\d s( · shared with \d other visitors?)? · done$", caption), caption
        assert "in flight" not in caption
    alone = [pixels(path) for path in generate(app, num_images=2, seed=11)[-2][2]]
    for outs, same in zip(runs, (True, False, True), strict=True):
        finals = [pixels(path) for path in outs[-2][2]]
        assert all(same_picture(a, b) for a, b in zip(finals, alone, strict=True)) == same


def test_generate_streams_every_step_then_images_and_gif(app: types.ModuleType, steps: int,
                                                          every_step: None, files: OutputFiles) -> None:
    outs = generate(app, num_images=4)
    assert len(outs) == steps + 1  # a canvas per step (the last with the results), then the animation
    captions = [o[1] for o in outs]
    assert captions[0].startswith(f"step 1 / {steps} · ")
    assert f"step {steps} / {steps}" in captions[-1] and captions[-1].endswith("done")
    assert outs[0][2:] == [None, None, None]  # the first update clears the last run
    # later updates leave them as the first left them: None (cheaper for Gradio than gr.skip())
    assert all(o[2:] == [None, None, None] for o in outs[1:-2])
    assert "writing the animation" in captions[-2] and outs[-2][3] is None  # results before the GIF
    finals, animation = outs[-2][2], outs[-1][3]
    assert outs[-1][:3] == [outs[-2][0], captions[-1], finals]  # the last update is the whole result
    key = outs[-1][4]
    assert outs[-2][4] == key and isinstance(key, str)  # the playback key (a State: not in the API)
    on, off = ({"__type__": "update", "interactive": state} for state in (True, False))
    assert app.after_run(captions[-1], key) == [captions[-1], off, on]  # Stop greys out, Replay is there
    assert app.after_run(captions[-1], None) == [captions[-1], off, off]
    assert app._downloadable(animation) == on and app._downloadable(None) == off
    assert len(finals) == 4 and all(pixels(path).shape == (256, 256, 3) for path in finals)
    with Image.open(finals[0]) as image:
        assert image.format == "PNG"  # finished pictures stay lossless
    with Image.open(animation) as gif:
        assert gif.format == "GIF" and gif.n_frames == steps
        gif.seek(steps - 1)
        assert gif.size == (258, 258)  # the 2 x 2 grid at half size, as the live canvas
        last = np.asarray(gif.convert("RGB"))[:128, :128].astype(int)  # a palette GIF: nearly equal
        with Image.open(finals[0]) as final:
            assert np.abs(last - np.asarray(final.reduce(2))).mean() < 8
    # Canvas files are bounded: of the streamed ones only the last, on screen, remains.
    canvases = [o[0] for o in outs[:-1]]
    assert len(set(canvases)) == steps
    time.sleep(0.2)  # the clean-up runs `linger_s` after the run (here 0 s)
    # the opening sketch shows only which cells come first: one file for every run alike
    assert Path(canvases[0]).parent == files.root / "shared" and Path(canvases[0]).exists()
    assert generate(app, num_images=4, seed=5)[0][0] == canvases[0]
    assert [Path(c).exists() for c in canvases[1:]] == [False] * (steps - 2) + [True]
    assert pixels(outs[-2][0]).shape[0] > 256  # four images shown as a 2 x 2 grid


def test_expensive_previews_are_skipped_but_the_animation_keeps_every_step(
        app: types.ModuleType, steps: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app, "PreviewPacer", functools.partial(PreviewPacer, share=0.0, max_gap=60.0))
    outs = generate(app, num_images=2)
    assert [o[1].split(" · ")[0] for o in outs] == [f"step {n} / {steps}" for n in (1, steps, steps)]
    with Image.open(outs[-1][3]) as gif:
        assert gif.n_frames == steps


def test_one_image_is_its_own_last_canvas(app: types.ModuleType) -> None:
    outs = generate(app, num_images=1)
    assert outs[-2][0] == outs[-2][2][0]


def test_generate_mp4_and_class_by_index(app: types.ModuleType) -> None:
    animation = Path(generate(app, class_name="2", fmt="MP4")[-1][3])
    assert animation.suffix == ".mp4" and animation.stat().st_size > 0


def test_same_seed_same_images(app: types.ModuleType) -> None:
    a, b = (pixels(generate(app, seed=11)[-2][2][0]) for _ in range(2))
    assert np.array_equal(a, b)


def test_extend_streams_border_around_upload(app: types.ModuleType, steps: int, every_step: None) -> None:
    example = upload(REPO / "assets" / "examples" / "heart.png")
    outs = extend(app, example, keep=4, class_name="dog")
    pipe = app.MODELS.get(None)
    first_step = pipe.model.schedule.square_steps()[4]
    assert outs[0][1].startswith(f"step {first_step} / {steps}")  # the upload is the first frame
    assert len(outs) == steps - first_step + 2
    assert pixels(outs[-2][2]).shape == (256, 256, 3) and outs[-1][1].endswith("done")
    assert Path(outs[-1][3]).read_bytes()[:4] == b"GIF8"


def test_extend_zoom_out_plays_rounds(app: types.ModuleType, every_step: None) -> None:
    outs = extend(app, upload(REPO / "assets" / "examples" / "smiley.png"), keep=4, rounds=2)
    captions = [o[1] for o in outs]
    assert captions[0].startswith("zoom 1 / 2") and captions[-1].startswith("zoom 2 / 2")
    assert any("zooming out" in c for c in captions)
    with Image.open(outs[-1][3]) as gif:
        assert gif.n_frames == len(outs) - 1


def test_extend_examples_are_cacheable(app: types.ModuleType) -> None:
    outs = list(app.extend_example(upload(app.EXAMPLES[0]), 4, UNCONDITIONAL))
    assert len(outs) > 2 and outs[-1][1].endswith("done")


def test_compare_streams_every_order_side_by_side(app: types.ModuleType, every_step: None) -> None:
    assert [arm.key for arm in app.COMPARE_LAYOUT] == list(ARMS)
    outs = list(app.compare("fish", 5, app.MODELS.default))
    pipe = app.MODELS.get(None)
    steps = {s: make_schedule(s, pipe.grid).num_steps for s in SCHEDULES}
    # a canvas per step of the longest order, then the result (every arm's picture and caption)
    assert len(outs) == max(steps.values()) + 1 and all(len(o) == 2 * len(ARMS) + 1 for o in outs)
    assert all(o[-1] is None for o in outs[:-1]) and isinstance(outs[-1][-1], str)
    result = outs[-1]
    for name in SCHEDULES:
        shown = next(canvas_of(o, name) for o in outs if caption_of(o, name).endswith("done"))
        assert canvas_of(result, name) == shown  # at Fast: no playback
        assert caption_of(result, name).endswith("done")
    outs = outs[:-1]
    trained = pipe.model.config.schedule
    captions = {name: [caption_of(o, name) for o in outs if caption_of(o, name)] for name in SCHEDULES}
    for name in SCHEDULES:
        assert len(captions[name]) == steps[name]  # every order shows its progress as it goes
        caption = captions[name][-1]
        assert caption.startswith(f"**{name}**") and caption.endswith("done")
        assert ("trained order" in caption) == (name == trained)
        assert ("off-distribution" in caption) == (name != trained)
        assert "corrected" not in caption and "active" not in caption  # (a dense model without the head)
        # an order's result arrives as soon as its own steps are done, not when the longest is
        done_at = next(i for i, o in enumerate(outs) if caption_of(o, name).endswith("done"))
        assert done_at == steps[name] - 1


def test_compare_arms_that_do_not_apply_say_why(app: types.ModuleType, every_step: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny model has no correction head and ships no activation, and this server offers no
    RadAR model: those arms show no picture and one line, and the rest of Compare runs."""
    monkeypatch.setattr(hub, "RADAR_MODEL", "radar-not-on-this-server")
    outs = list(app.compare("fish", 5, app.MODELS.default, "watch"))
    why = {"radar-refined": "no RadAR model on this server", "radar-plain": "no RadAR model on this server",
           "activated": "this model ships no dynamic activation"}
    for key, reason in why.items():
        assert canvas_of(outs[0], key) is None and canvas_of(outs[-1], key) is None
        assert caption_of(outs[0], key) == caption_of(outs[-1], key)
        assert caption_of(outs[-1], key).endswith(reason) and "\n" not in caption_of(outs[-1], key)
        assert all(is_skip(canvas_of(o, key)) and is_skip(o[2 * ARMS.index(key) + 1]) for o in outs[1:-1])
        assert app.after_run(caption_of(outs[-1], key), None)[0] == caption_of(outs[-1], key)
    replayed = app.replay(outs[-1][-1])
    assert [path is None for path in replayed] == [key in why for key in ARMS]


def test_compare_paced_still_shows_every_result(app: types.ModuleType,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app, "PreviewPacer", functools.partial(PreviewPacer, share=0.0, max_gap=60.0))
    outs = list(app.compare("fish", 5, app.MODELS.default))[:-1]  # (the last: the result)
    finished = [o for o in outs for name in SCHEDULES if caption_of(o, name).endswith("done")]
    assert len(finished) == len(SCHEDULES) and len(outs) < 10


def test_compare_draws_what_generate_draws_for_the_same_seed(app: types.ModuleType) -> None:
    trained = app.MODELS.get(None).model.config.schedule
    result = list(app.compare("fish", 5, app.MODELS.default))[-1]
    generated = generate(app, class_name="fish", seed=5)[-1][2][0]  # (SAMPLING is the default preset)
    assert same_picture(pixels(canvas_of(result, trained)), pixels(generated))


@pytest.fixture(scope="module")
def radar_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny model trained on RadAR's rings with the correction head (random weights)."""
    model = tiny_ear(32, 8, num_classes=len(CLASS_NAMES), schedule="radar", correction=True)
    return str(write_tiny_model(tmp_path_factory.mktemp("radar") / "tiny-radar", model=model))


@pytest.fixture
def offers_radar(app: types.ModuleType, radar_model: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The server offers a RadAR model (as it will once `hub.RADAR_MODEL` is in the registry)."""
    monkeypatch.setattr(app_support.hub, "RADAR_MODEL", radar_model)
    monkeypatch.setattr(app.MODELS, "names", [*app.MODELS.names, radar_model])
    return radar_model


def test_compare_streams_radar_rings_with_and_without_refinement(app: types.ModuleType, offers_radar: str,
                                                                 every_step: None) -> None:
    outs = list(app.compare("fish", 5, app.MODELS.default))
    radar = app.MODELS.get(offers_radar)
    steps = make_schedule("radar", radar.grid).num_steps
    for key in ("radar-refined", "radar-plain"):
        captions = [caption_of(o, key) for o in outs[:-1] if caption_of(o, key)]
        assert len(captions) == steps and captions[-1].endswith("done")
        assert f"· {radar.name}, trained order  \nstep {steps} / {steps} · " in captions[-1]
        assert (re.search(r"· \d+ corrected", captions[-1]) is not None) == (key == "radar-refined")
        assert Path(canvas_of(outs[-1], key)).is_file() and caption_of(outs[-1], key) == captions[-1]
    arms = {arm.key: arm for arm in app_support.compare_arms(app.MODELS.get(None), app.MODELS.names)}
    page = app.MODELS.get(None)
    for key, refined in (("radar-refined", True), ("radar-plain", False)):
        _, frames = app_support.arm_frames(arms[key], page, app.MODELS.get, 2, 5)
        states = [frame.state for frame in frames]
        assert len(states) == steps
        assert all((state.corrected is not None) == refined for state in states), key
    assert int(states[-1].known.sum()) == radar.grid ** 2


def test_compare_runs_radar_on_the_page_model_when_it_is_one(app: types.ModuleType, radar_model: str) -> None:
    page = EARPipeline.from_pretrained(radar_model)
    arms = {arm.key: arm for arm in app_support.compare_arms(page, offered=[])}
    assert [*arms] == list(ARMS)
    for key in ("radar-refined", "radar-plain"):
        assert arms[key].model is None and not arms[key].absent and arms[key].schedule is None
    heading, frames = app_support.arm_frames(arms["radar-refined"], page, app.MODELS.get, 0, 1)
    assert heading == "**radar · refined** · trained order" and frames is not None
    heading, _ = app_support.arm_frames(arms["arms"], page, app.MODELS.get, 0, 1)
    assert heading == "**arms** · off-distribution (model trained on radar)"


def test_a_radar_model_without_the_class_or_that_cannot_load_says_so(app: types.ModuleType,
                                                                      radar_model: str) -> None:
    page, arm = app.MODELS.get(None), app_support.Arm("radar-refined", "radar · refined", "elsewhere",
                                                       "radar", refine=True)
    other = EARPipeline.from_pretrained(radar_model)
    other.class_names = ["owl", "fox", "bee"]
    heading, frames = app_support.arm_frames(arm, page, lambda name: other, 2, 5)
    assert frames is None and heading == f"**radar · refined** · {other.name} has no class 'fish, goldfish'"

    def unavailable(name: str) -> Any:
        raise app_support.InputError("Model 'elsewhere' cannot be loaded on this server: its files ...")

    heading, frames = app_support.arm_frames(arm, page, unavailable, 2, 5)
    assert frames is None
    assert heading == "**radar · refined** · model elsewhere cannot be loaded on this server"


def test_compare_shows_the_activated_arm_on_a_model_that_ships_activation(app: types.ModuleType) -> None:
    if {s.name: s.status for s in hub.list_models()}.get("ear-emoji") != "bundled":
        pytest.skip("the bundled ear-emoji model is not here")
    emoji = app.MODELS.get("ear-emoji")
    arm = next(a for a in app_support.compare_arms(emoji, app.MODELS.names) if a.key == "activated")
    tau = emoji.info()["activation"]["tau"]
    assert arm.activation == tau and not arm.absent and arm.schedule is None
    heading, frames = app_support.arm_frames(arm, emoji, app.MODELS.get, 0, 3)
    assert heading == f"**activated** · trained order, tau {tau:g}"
    state = list(frames)[-1].state
    caption = app_support.arm_caption(heading, state, 0.25)
    assert state.done and 0 < state.ffn_active < 1
    assert re.search(r"0\.25 s · FFN \d+ % active · done$", caption), caption


def test_the_gpu_budget_counts_every_compare_arm(app: types.ModuleType) -> None:
    """ZeroGPU's estimate counts the steps of every arm, and the refined arm's extra pass; the
    RadAR arms at the longer RadAR order (their model may be another than the page's)."""
    for grid, trained in ((8, "arms"), (16, "arms"), (16, "radar"), (16, "radar-square")):
        rings = max(make_schedule(order, grid).num_steps for order in RADAR_SCHEDULES)
        steps = sum((rings if arm.key.startswith("radar") else
                     make_schedule(arm.schedule or trained, grid).num_steps) + (arm.refine is True)
                    for arm in app.COMPARE_LAYOUT)
        assert app_support.compare_steps(grid, trained) == steps


# ---- playback at a human pace -------------------------------------------------------------------

@pytest.fixture
def few_canvases(app: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pacer of a model faster than the eye: only the first canvas is shown live."""
    monkeypatch.setattr(app, "PreviewPacer", functools.partial(PreviewPacer, share=0.0, max_gap=60.0))


def gif_timing(path: str) -> tuple[int, list[int], bool]:
    """Frames, per-frame durations (ms) and whether the GIF loops."""
    with Image.open(path) as gif:
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
        return gif.n_frames, durations, "loop" in gif.info


def test_watch_pace_replays_a_fast_run_once_on_the_canvas(app: types.ModuleType, steps: int,
                                                           few_canvases: None, files: OutputFiles) -> None:
    outs = generate(app, num_images=4, pace="watch")
    canvas, caption, finals, animation, key = outs[-1]
    assert caption.endswith("done") and len(finals) == 4 and Path(animation).suffix == ".gif"
    assert outs[-2][0] == canvas  # the playback starts with the final images, before the animation file
    frames, durations, loops = gif_timing(canvas)
    assert frames == steps and not loops  # the whole growth, played once, its last frame kept
    assert durations[:-1] == [round(1000 * app.PLAYBACK_STEP_S)] * (steps - 1) and durations[-1] > 1000
    with Image.open(canvas) as gif:
        assert gif.size[1] > gif.size[0]  # a step counter under the 2 x 2 grid
    again = app.replay(key)
    assert again != canvas and Path(again).read_bytes() == Path(canvas).read_bytes()  # a new URL
    fast = generate(app, num_images=4, pace="fast")[-1]
    assert fast[0].endswith(".png") and fast[0] != fast[2][0]  # the grid, no playback
    assert gif_timing(app.replay(fast[4]))[0] == steps  # Replay works at the Fast pace too


def test_a_run_watched_live_is_not_replayed(app: types.ModuleType, every_step: None) -> None:
    outs = generate(app, num_images=1, pace="watch")
    assert outs[-1][0] == outs[-1][2][0]  # every step was on screen: the canvas keeps the picture


def test_a_zoom_out_plays_back_as_one_continuous_growth(app: types.ModuleType, few_canvases: None) -> None:
    outs = extend(app, upload(REPO / "assets" / "examples" / "smiley.png"), keep=4, rounds=3, pace="watch")
    canvas, caption, _final, animation, _key = outs[-1]
    assert caption.startswith("zoom 3 / 3") and caption.endswith("done")
    frames, durations, loops = gif_timing(canvas)
    assert frames == gif_timing(animation)[0] and not loops  # every round and bridge, once
    assert sum(durations[:-1]) <= 1000 * app.MAX_PLAYBACK_S


def test_replay_without_a_run_is_one_sentence(app: types.ModuleType) -> None:
    for key in (None, "no-such-run", 3):
        assert_user_error(lambda key=key: app.replay(key), "no recent run to replay")


@pytest.mark.parametrize("pace", ["fast", "watch"])
def test_a_stopped_run_shows_and_plays_what_it_got_to(app: types.ModuleType, steps: int, pace: str,
                                                       every_step: None, monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    monkeypatch.setattr(app, "_played", lambda pace, live, growth: pace == "watch")  # (the rule: above)
    run = generating(app, num_images=2, pace=pace)
    for _ in range(3):
        next(run)
    canvas, caption, finals, animation, key = run.throw(RunStopped())  # what ear.stops does
    with pytest.raises(StopIteration):
        next(run)
    assert re.fullmatch(rf"stopped at step 3 / {steps} · \d+ / \d+ tokens", caption), caption
    assert finals is None and stopped_caption(caption) == caption
    assert gif_timing(animation)[0] == 3  # downloadable: the growth up to the stop
    assert gif_timing(app.replay(key))[0] == 3
    if pace == "fast":  # the cells made so far, decoded at the stop: no grey pending tiles
        picture = pixels(canvas)
        pending = [np.all(picture == rgb, axis=-1) for rgb in PENDING_RGB]
        assert picture.shape[1] > 256 and not any(p.any() for p in pending)
    else:
        assert gif_timing(canvas)[0] == 3


def test_a_stop_once_the_pictures_are_there_still_gives_the_animation(app: types.ModuleType) -> None:
    run = generating(app, num_images=1)
    updates = list(itertools.takewhile(lambda u: "writing the animation" not in u[1], run))
    last = run.throw(RunStopped())
    assert updates and last[1].endswith("done") and Path(last[3]).is_file()


def test_compare_at_the_watch_pace_plays_every_order_side_by_side(app: types.ModuleType,
                                                                   few_canvases: None) -> None:
    outs = list(app.compare("fish", 5, app.MODELS.default, "watch"))
    pipe = app.MODELS.get(None)
    steps = {s: make_schedule(s, pipe.grid).num_steps for s in SCHEDULES}
    result = outs[-1]
    together = sorted(steps.values())[-2]
    for name in SCHEDULES:
        frames, durations, loops = gif_timing(canvas_of(result, name))
        assert not loops and caption_of(result, name).endswith("done")
        assert durations[0] == round(1000 * app.PLAYBACK_STEP_S)
        if steps[name] <= together:
            assert frames == steps[name]  # one step per frame, the same pace for all
        else:  # the long one keeps pace until the others are done, then goes faster, labelled
            assert together < frames <= together + app.COMPARE_TAIL_FRAMES + 1
        assert sum(durations) < 10_000
    assert len(app.replay(result[-1])) == len(ARMS)


def test_a_stopped_compare_plays_what_each_order_got_to(app: types.ModuleType, offers_radar: str,
                                                        every_step: None) -> None:
    run = app.compare("fish", 5, app.MODELS.default, "watch")
    for _ in range(4):
        next(run)
    result = run.throw(RunStopped())
    for arm in app_support.compare_arms(app.MODELS.get(None), app.MODELS.names)[:-1]:  # orders, rings
        model = app.MODELS.get(None if arm.model is None else offers_radar)
        steps = make_schedule(arm.schedule or model.model.config.schedule, model.grid).num_steps
        assert gif_timing(canvas_of(result, arm.key))[0] == min(4, steps), arm.key
        assert ("stopped at step 4" in caption_of(result, arm.key)) == (steps > 4)
    assert canvas_of(result, "activated") is None
    assert caption_of(result, "activated").endswith("this model ships no dynamic activation")


def test_a_blank_seed_means_a_random_one_said_in_the_caption(app: types.ModuleType) -> None:
    runs = [generate(app, seed=blank)[-1] for blank in (None, "", " ")]
    seeds = [int(re.search(r"· random seed (\d+) · done$", run[1]).group(1)) for run in runs]
    assert len(set(seeds)) > 1  # (a 1 in 2^31 chance of two alike)
    again = generate(app, seed=seeds[0])[-1]
    assert "random seed" not in again[1]
    assert np.array_equal(pixels(again[2][0]), pixels(runs[0][2][0]))  # the seed said makes it again


def test_model_info_panel(app: types.ModuleType, tiny: str) -> None:
    text, info = app.model_info(app.MODELS.default)
    for key in ("name", "device", "dtype", "parameters", "licence", "attribution", "cached"):
        assert key in info
    assert "Parameters" in text and "MIT (test)" in text and "cpu / float32" in text
    assert text.startswith("| Model | tiny-test |")  # a real header row, not an empty one
    assert info["source"] == "local folder 'tiny'" and tiny not in text and tiny not in str(info)
    # an API client naming a model the picker does not list: the app's sentence, not Gradio's check
    assert_user_error(lambda: app.model_info("no-such-model"), "Unknown model")
    fn = next(f for f in app.demo.fns.values() if f.api_name == "model_info")
    assert not fn.preprocess


def test_public_source_never_shows_server_paths(tmp_path: Path) -> None:
    assert public_source(str(REPO / "assets" / "ear-emoji")) == "bundled with the app"
    assert public_source("hf://org/name") == "Hugging Face Hub: org/name"
    official = "FoodBamboo/EAR/EAR-adaLN-B.pt (revision main)"
    assert (public_source(f"{official} + {tmp_path / 'xq.pt'}")
            == f"Hugging Face Hub: {official} + local file 'xq.pt'")


def test_select_model_refills_controls_or_goes_back(app: types.ModuleType,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fn = next(f for f in app.demo.fns.values() if f.name == "select_model")  # the page's (first)
    out = app.select_model(app.MODELS.default, app.MODELS.default)
    assert len(out) == len(fn.outputs) == app.PAGE_DEPENDENT + 2
    assert out[2].choices == [(c, c) for c in CLASS_NAMES]
    # the Extend tab's own picker refills its own controls: class, style, kept canvas, sampling
    ext = app.select_model(app.MODELS.default, app.MODELS.default, app._extend_updates, app.EXTEND_DEPENDENT)
    assert len(ext) == app.EXTEND_DEPENDENT + 2 and ext[2].choices[0] == (UNCONDITIONAL, UNCONDITIONAL)
    assert [c[1] for c in ext[4].choices] == app.MODELS.get(None).keep_sizes()
    # ... and so does the Edit tab's: class, style, then its sampling controls on the "edit" preset
    edit = app.select_model(app.MODELS.default, app.MODELS.default, app._edit_updates, app.EDIT_DEPENDENT)
    assert len(edit) == app.EDIT_DEPENDENT + 2 and edit[2].choices[0] == (UNCONDITIONAL, UNCONDITIONAL)
    fns = [f for f in app.demo.fns.values() if "select_model" in repr(f.fn)]  # partials too
    assert sorted(len(f.outputs) for f in fns) == sorted(
        n + 2 for n in (app.PAGE_DEPENDENT, app.EXTEND_DEPENDENT, app.EDIT_DEPENDENT))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.warns(UserWarning, match="not downloaded on this server"):
        out = app.select_model("EAR-adaLN-B", app.MODELS.default)
    assert out[:2] == [app.MODELS.default] * 2 and all(is_skip(o) for o in out[2:])


def test_the_edit_tab_opens_on_its_models_edit_preset(app: types.ModuleType) -> None:
    """ear-photo ships an "edit" preset (temperature 0.5: bench_edit's halves clear 3 dB with it
    and 8 rounds); a model without one opens on its default."""
    photo = EARPipeline.from_pretrained("ear-photo")
    assert app._preset_name(photo, app.EDIT_PRESET) == "edit" and photo.presets["edit"].temperature == 0.5
    updates = app._slider_updates(photo, app.EDIT_PRESET)
    assert updates[0].value == "edit" and updates[2].value == 0.5
    plain = app.MODELS.get(None)
    assert app._preset_name(plain, app.EDIT_PRESET) == app._preset_name(plain)


# ---- RadAR and ActVAR controls -------------------------------------------------------------------

@pytest.fixture(scope="module")
def speedy(app: types.ModuleType, tiny: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny models beside the page's: one with the correction head, one that ships routers."""
    root = tmp_path_factory.mktemp("speedy")
    refined = write_tiny_model(root / "refined", model=tiny_ear(32, 8, seed=0, correction=True))
    activated = write_tiny_model(root / "activated", seed=1)
    model = EARPipeline.from_pretrained(str(activated)).model
    Activation(model, ActivationConfig(experts=2, router_hidden=8, tau=0.4)).save(activated)
    return {"plain": tiny, "refined": str(refined), "activated": str(activated)}


@pytest.fixture
def speedy_models(app: types.ModuleType, speedy: dict[str, str],
                  monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The page's registry holds the tiny models, served as the app serves its own; returns the
    names of the models whose request went to the server's shared batches (a request each)."""
    served: list[str] = []

    def load(name: str) -> EARPipeline:
        pipe = app.attach(EARPipeline.from_pretrained(name), app.SCHEDULER)
        shared = pipe.sampler

        def counted(*args: Any, **kwargs: Any) -> Iterator[Any]:
            served.append(name)
            return shared(*args, **kwargs)

        pipe.sampler = counted
        return pipe

    monkeypatch.setattr(app, "MODELS", app_support.ModelRegistry(list(speedy.values()), load, capacity=3))
    return served


def speedup_updates(app: types.ModuleType, name: str) -> list[dict[str, Any]]:
    """The Generate tab's Refine, Dynamic activation and tau updates of a model change."""
    out = app.select_model(name, name)[2:]
    first = 2 + len(app._slider_updates(app.MODELS.get(name)))  # after class, style, sampling
    return [{"visible": u.visible, "value": u.value} for u in out[first:first + 3]]


def test_refine_and_activation_controls_follow_the_model(app: types.ModuleType, speedy: dict[str, str],
                                                         speedy_models: list[str]) -> None:
    hidden = {"visible": False, "value": False}
    assert speedup_updates(app, speedy["plain"]) == [hidden, hidden, {"visible": False, "value": 1.0}]
    assert speedup_updates(app, speedy["refined"])[:2] == [{"visible": True, "value": True}, hidden]
    assert speedup_updates(app, speedy["activated"]) == [hidden, {"visible": True, "value": False},
                                                         {"visible": True, "value": 0.4}]
    fn = next(f for f in app.demo.fns.values() if f.api_name == "generate")
    assert [getattr(b, "elem_id", None) for b in fn.inputs[-3:]] == \
        ["gen-refine", "gen-activation", "gen-activation-tau"]
    api = app.demo.get_api_info()["named_endpoints"]["/generate"]["parameters"]
    assert [p["parameter_name"] for p in api[-4:]] == ["style", "refine", "activation", "activation_tau"]


def speedy_captions(app: types.ModuleType, model: str, **speedups: Any) -> list[str]:
    """Every caption of a 2-image Generate run at temperature 3 (a ring's draws disagree)."""
    runs = app.generate("cat", 2, 3, 1.0, 3.0, 0, 1.0, model, "gif", "Any", "fast", **speedups)
    return [update[1] for update in runs]


def test_generate_refines_on_a_model_with_the_correction_head(
        app: types.ModuleType, speedy: dict[str, str], speedy_models: list[str], every_step: None) -> None:
    refined = speedy_captions(app, speedy["refined"])  # on by default where the model has the head
    counts = [int(m.group(1)) for c in refined if (m := re.search(r" · (\d+) corrected", c))]
    assert len(counts) == len(refined) and counts == sorted(counts) and counts[-1] > 0, refined
    assert "corrected (cyan)" in refined[1] and "(cyan)" not in refined[-1]  # no outline when finished
    assert speedy_captions(app, speedy["refined"], refine=True)[-1].split(" · ")[-2] == \
        refined[-1].split(" · ")[-2]  # the same seed corrects the same cells
    assert not any("corrected" in c for c in speedy_captions(app, speedy["refined"], refine=False))
    assert speedy_models == [speedy["refined"]] * 3  # refined or not, in the server's shared batches


def test_generate_activated_says_how_much_of_the_ffn_ran(
        app: types.ModuleType, speedy: dict[str, str], speedy_models: list[str]) -> None:
    for tau in (0.05, None):  # None: the shipped tau
        caption = speedy_captions(app, speedy["activated"], activation=True, activation_tau=tau)[-1]
        assert re.search(r" · FFN \d+ % active", caption), caption
    assert not any("FFN" in c for c in speedy_captions(app, speedy["activated"], activation_tau=0.05))
    assert speedy_models == [speedy["activated"]] * 3  # activated or not, in the shared batches


def test_model_info_says_what_refinement_and_activation_offer(
        app: types.ModuleType, speedy: dict[str, str], speedy_models: list[str]) -> None:
    text, info = app.model_info(speedy["activated"])
    act = info["activation"]
    assert act["flops_active"] < act["flops_dense"] and 0 < act["ffn_active"] < 1
    saving = (1 - act["flops_active"] / act["flops_dense"]) * 100
    share = act["ffn_active"] * 100
    assert f"| Dynamic activation (ActVAR) | 2 experts, tau 0.4, FFN {share:.0f} % active, total FLOPs " \
           f"−{saving:.1f} % (counted) |" in text
    assert "| Refinement (RadAR) | no" in text
    text, info = app.model_info(speedy["refined"])
    assert "| Refinement (RadAR) | yes" in text and "| Dynamic activation (ActVAR) | no" in text


@pytest.mark.parametrize(("model", "speedups", "fragment"), [
    ("plain", {"refine": True}, "correction objective"),
    ("plain", {"activation": True}, "has no dynamic activation"),
    ("refined", {"refine": "yes"}, "Refine (RadAR) must be true or false"),
    ("activated", {"activation": 1}, "Dynamic activation (ActVAR) must be true or false"),
    ("activated", {"activation": True, "activation_tau": 2}, "Activation tau must be between 0.05 and 1"),
    ("activated", {"activation": True, "activation_tau": "x"}, "Activation tau must be a number"),
])
def test_bad_refine_and_activation_values_are_one_sentence(
        app: types.ModuleType, speedy: dict[str, str], speedy_models: list[str], model: str,
        speedups: dict[str, Any], fragment: str) -> None:
    message = assert_user_error(lambda: speedy_captions(app, speedy[model], **speedups), fragment)
    assert message.count(". ") == 0 and "\n" not in message


def test_the_bundled_model_offers_activation_and_counts_its_saving(app: types.ModuleType,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """ear-emoji ships routers: the controls show and Model info shows the counted FLOPs saving."""
    monkeypatch.setattr(app, "MODELS", app_support.ModelRegistry(["ear-emoji"], EARPipeline.from_pretrained))
    refine, activation, tau = speedup_updates(app, "ear-emoji")
    assert refine["visible"] is False and activation == {"visible": True, "value": False}
    assert tau["visible"] and tau["value"] == app.MODELS.get("ear-emoji").info()["activation"]["tau"]
    assert re.search(r"\| Dynamic activation \(ActVAR\) \| 4 experts \(tuned\), tau 0\.\d+, the first "
                     r"\d+ % of the order dense, FFN \d+ % active, "
                     r"total FLOPs −\d+\.\d % \(counted\) \|", app.model_info("ear-emoji")[0])


# ---- hosting ----------------------------------------------------------------------------------

def test_every_tab_is_a_named_endpoint_behind_a_bounded_queue(app: types.ModuleType) -> None:
    names = {f.api_name: f for f in app.demo.fns.values()}
    for name in ("generate", "extend", "edit", "compare", "model_info"):
        assert name in names and names[name].api_visibility == "public"
    for name in ("generate", "extend", "edit", "compare"):
        assert names[name].concurrency_id == "ear" and not names[name].preprocess
    assert app.demo._queue.max_size == app.QUEUE_SIZE
    assert app.demo._queue.default_concurrency_limit == app.CONCURRENCY_LIMIT
    cancels = [f for f in app.demo.fns.values() if f.cancels]
    assert len(cancels) == 4  # after each Stop asked its run to end itself (ear.stops): a queued run
    stops = [f for f in app.demo.fns.values() if f.name == "stop_run"]
    assert len(stops) == 4 and not any(f.queue for f in stops + cancels)
    assert all(f.api_visibility == "private" for f in stops)


def test_readme_front_matter_makes_a_space() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and (REPO / "app.py").is_file()
    assert meta["sdk_version"] == gr.__version__
    assert f"gradio=={meta['sdk_version']}" in (REPO / "requirements.txt").read_text()
    for key in ("title", "license", "short_description"):
        assert meta.get(key)


def test_zerogpu_decorator_used_when_spaces_exists(tiny: str) -> None:
    durations = {}
    fake = types.ModuleType("spaces")
    fake.GPU = lambda fn, duration: durations.setdefault(fn.__name__, duration) and fn
    spec = importlib.util.spec_from_file_location("app_on_zerogpu", REPO / "app.py")
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(sys.modules, {"spaces": fake}), \
            mock.patch.dict(os.environ, {"EAR_STUDIO_MODEL": tiny}):
        spec.loader.exec_module(module)
    assert sorted(durations) == ["compare", "edit", "extend", "generate"]
    one = durations["generate"]("cat", 1, 0, 1.5, 1.0, 0, 1.0, tiny, "gif")
    assert durations["generate"]("cat", 8, 0, 1.5, 1.0, 0, 1.0, tiny, "gif") > one
    assert durations["compare"]("cat", 0, tiny) > one  # every order, raster included


def test_page_opens_on_the_model_start_up_prepared(app: types.ModuleType, tiny: str) -> None:
    assert app.STARTED.name == app.MODELS.default == tiny
    assert app.MODELS.get(None) is app.STARTED.pipeline  # not loaded a second time


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value", "fragment"), [
    ("num_images", 0, "Number of images must be between 1 and 8"),
    ("num_images", 9, "between 1 and 8"),
    ("num_images", 2.5, "whole number"),
    ("seed", -1, "Seed must be between 0"),
    ("seed", "abc", "Seed must be a number"),
    ("cfg_scale", 99, "CFG scale must be between 0 and 10"),
    ("cfg_scale", float("nan"), "finite"),
    ("temperature", 0, "Temperature must be between 0.05 and 3"),
    ("top_k", 33, "Top-k must be between 0 and 32"),  # the tiny model has 32 codes
    ("top_p", 0, "Top-p must be between 0.05 and 1"),
    ("top_p", None, "Top-p must be a number"),
    ("fmt", "avi", "gif, mp4"),
    ("class_name", "", "Pick a class"),
    ("class_name", True, "class"),
])
def test_out_of_range_values_sent_through_the_api(app: types.ModuleType, field: str, value: Any,
                                                   fragment: str) -> None:
    assert_user_error(lambda: generate(app, **{field: value}), fragment)


def test_unknown_class_suggests_close_names(app: types.ModuleType) -> None:
    assert_user_error(lambda: generate(app, class_name="dgo"), "Unknown class 'dgo'", "Did you mean 'dog'")
    assert_user_error(lambda: extend(app, upload(REPO / "assets/examples/heart.png"), class_name="x" * 500),
                      "too long")


def test_style_is_checked(app: types.ModuleType, tmp_path: Path) -> None:
    assert_user_error(lambda: generate(app, style="Noto"), "has no styles")  # the tiny model has none
    styled = EARPipeline.from_pretrained(str(write_tiny_model(tmp_path / "m", styles=["Flat", "Shaded"])))
    assert check_style(styled, "Any") is None and check_style(styled, None) is None
    assert check_style(styled, "shaded") == "shaded"
    for bad, phrase in (("Noto", "choose one of Flat, Shaded"), (3, "style names"),
                        ("x" * 500, "style names")):
        with pytest.raises(ValueError, match=phrase):
            check_style(styled, bad)


def test_unknown_and_unloadable_models(app: types.ModuleType, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    assert_user_error(lambda: generate(app, model="/etc"), "Unknown model '/etc'")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with caplog.at_level("WARNING", logger="ear.app"):
        message = assert_user_error(lambda: generate(app, model="EAR-adaLN-L"), "EAR-adaLN-L",
                                    "not downloaded on this server", "python -m ear download EAR-adaLN-L")
    # Two short sentences for a visitor; the command-line form (flags, variables) goes to the log.
    assert message.count(". ") == 1 and "--" not in message and "EAR_" not in message
    assert "HF_HUB_OFFLINE" not in message and "HF_HUB_OFFLINE" in caplog.text
    assert len(generate(app)) > 2  # and the default model still serves


def test_a_refusal_after_a_run_clears_it_and_is_said_once(app: types.ModuleType) -> None:
    assert generate(app)[-1][1].endswith("done")
    updates = []
    with pytest.raises(gr.Error) as info:
        updates.extend(app.generate("cat", 1, 0, 1.5, 1.0, 0, 7.0, app.MODELS.default, "gif"))
    assert len(updates) == 1
    canvas, caption, finals, download, key = updates[0]
    assert canvas is finals is download is key is None  # the last run goes (download and Replay grey out)
    assert caption == f"⚠️ {info.value.message}" and "Top-p must be between" in caption
    assert info.value.visible is False  # API clients get the error; the page shows no second copy


def test_a_stopped_run_says_where_it_stopped() -> None:
    stopped = stopped_caption("step 10 / 31 · 120 / 256 tokens · 0.41 s")
    assert stopped == "stopped at step 10 / 31 · 120 / 256 tokens"
    compare = "**raster** · off-distribution (trained on arms)  \nstep 40 / 256 · 40 / 256 tokens · 0.30 s"
    assert stopped_caption(compare).endswith("  \nstopped at step 40 / 256 · 40 / 256 tokens")
    writing = "step 31 / 31 · 256 / 256 tokens · 0.41 s · writing the animation…"
    assert stopped_caption(writing).endswith("0.41 s · stopped before the animation was written")
    for unchanged in ("", "step 31 / 31 · 256 / 256 tokens · 0.41 s · done", "⚠️ Upload an image first."):
        assert stopped_caption(unchanged) == unchanged


def test_unreadable_upload_is_refused_as_it_arrives(app: types.ModuleType, tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    image, note = app.check_upload(upload(text))
    assert image is None and "not an image format" in note and str(tmp_path) not in note
    image, note = app.check_upload(upload(REPO / "assets" / "examples" / "heart.png"))
    assert is_skip(image) and note == ""


def test_uploads_a_browser_cannot_show_or_of_odd_sizes_are_explained(app: types.ModuleType,
                                                                      tmp_path: Path) -> None:
    ramp = np.linspace(0.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    tiff = saved(tmp_path, Image.fromarray(ramp, "F"), "scan.tif")
    image, note = app.check_upload(tiff)
    assert isinstance(image, str) and Image.open(image).format == "PNG" and note == ""  # shown as a PNG
    image, note = app.check_upload(saved(tmp_path, Image.new("RGB", (1, 1), "red"), "dot.png"))
    assert is_skip(image) and "1 x 1 px" in note and "blocky" in note
    image, note = app.check_upload(saved(tmp_path, Image.new("RGB", (5000, 40), "blue"), "strip.png"))
    assert is_skip(image) and "centred 40 x 40 px square of this 5000 x 40 px picture" in note
    assert note.startswith("ℹ️") and "\n" not in note


@pytest.mark.parametrize(("field", "value", "fragment"), [
    ("keep", 99, "Kept centre must be between 1 and 7"),
    ("keep", "four", "Kept centre must be a number"),
    ("rounds", 7, "Zoom-out rounds must be between 0 and 6"),
    ("rounds", -1, "between 0 and 6"),
])
def test_extend_checks_its_own_fields(app: types.ModuleType, field: str, value: Any, fragment: str) -> None:
    example = upload(REPO / "assets" / "examples" / "heart.png")
    assert_user_error(lambda: extend(app, example, **{field: value}), fragment)


def test_non_image_truncated_and_missing_uploads(app: types.ModuleType, tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    assert_user_error(lambda: extend(app, upload(text)), "not an image format")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "teal").save(buffer, "PNG")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert_user_error(lambda: extend(app, upload(truncated)), "truncated or corrupt")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert_user_error(lambda: extend(app, upload(empty)), "empty")
    assert_user_error(lambda: extend(app, None), "Upload an image first")
    assert_user_error(lambda: extend(app, upload(tmp_path / "gone.png")), "could not be read")
    message = assert_user_error(lambda: extend(app, upload(text)), "image")
    assert str(tmp_path) not in message  # no server paths in messages


def test_decompression_bomb_is_refused_before_decoding(app: types.ModuleType, tmp_path: Path) -> None:
    bomb = saved(tmp_path, Image.new("1", (12_000, 12_000)), "bomb.png")  # 144 MP, a few KB on disk
    assert Path(bomb["path"]).stat().st_size < 100_000
    assert_user_error(lambda: extend(app, bomb), "too large")


@pytest.mark.parametrize("kind", ["rgba", "cmyk", "grey16", "grey", "palette", "animated"])
def test_unusual_image_modes_are_accepted(app: types.ModuleType, tmp_path: Path, kind: str) -> None:
    ramp = np.linspace(0, 255, 48 * 48, dtype=np.uint8).reshape(48, 48)
    if kind == "rgba":
        payload = saved(tmp_path, Image.fromarray(np.dstack([ramp] * 4), "RGBA"), "a.png")
    elif kind == "cmyk":
        payload = saved(tmp_path, Image.new("CMYK", (40, 30), (0, 120, 200, 10)), "c.jpg")
    elif kind == "grey16":
        payload = saved(tmp_path, Image.fromarray(ramp.astype(np.uint16) * 257), "g16.png")
    elif kind == "grey":
        payload = saved(tmp_path, Image.fromarray(ramp), "g.jpg")
    elif kind == "palette":
        payload = saved(tmp_path, Image.fromarray(ramp).convert("P"), "p.gif", transparency=0)
    else:
        frames = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
        payload = saved(tmp_path, frames[0], "anim.gif", save_all=True, append_images=frames[1:])
    outs = extend(app, payload, keep=2)
    assert len(outs) > 2 and outs[-1][1].endswith("done")


def test_presets_fill_the_sliders(app: types.ModuleType) -> None:
    assert app.apply_preset("greedyish", app.MODELS.default) == [1.0, 0.5, 4, 0.9]
    assert app.apply_preset("default", app.MODELS.default)[0] == 1.5
    assert_user_error(lambda: app.apply_preset("fid", app.MODELS.default), "Unknown preset 'fid'",
                      "greedyish")


def test_threads_per_request_never_oversubscribe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = available_cpus()
    assert 1 <= cores <= (os.cpu_count() or 1)
    assert threads_per_request(2) * 2 <= max(2, cores) and threads_per_request(cores + 5) == 1
    assert threads_per_request(1, spare=1) == max(1, cores - 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_request(2) is None


def test_output_files_are_unique_bounded_and_pruned(tmp_path: Path, states_of_a_run: list) -> None:
    files = OutputFiles(tmp_path / "out", max_age_s=60, linger_s=0.0)
    image = Image.new("RGB", (8, 8), "red")
    first, second = files.image(image, "x"), files.image(image, "x")
    assert first != second and pixels(first).shape == (8, 8, 3)
    canvases = files.canvases("live")
    shown = [canvases.show(image) for _ in range(4)]
    assert [Path(p).exists() for p in shown] == [False, False, True, True]  # at most two at a time
    canvases.close()
    time.sleep(0.2)
    assert [Path(p).exists() for p in shown] == [False, False, False, True]  # the one on screen
    lingering = OutputFiles(tmp_path / "out", linger_s=60).canvases("slow")
    assert all(Path(lingering.show(image)).exists() for _ in range(4))  # a slow browser may still ask
    assert pixels(canvases.show(Image.new("RGB", (1000, 600)))).shape == (300, 500, 3)  # big: shrunk
    os.utime(first, (0, 0))  # an hour-old file
    growth = GrowthAnimation()
    for state in states_of_a_run:
        growth.add(state, [image] if state.done else None)
    animation = files.animation(growth, "anim", "gif")
    assert not Path(first).exists() and Path(second).exists() and Path(animation).is_file()


def test_our_files_are_served_in_place_and_asked_about_first(app: types.ModuleType, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    static = gr.data_classes._StaticFiles
    monkeypatch.setattr(static, "all_paths", [Path("/gradio/icon.svg")])  # Gradio's own come first
    app.serve_in_place(tmp_path)
    assert static.all_paths == [tmp_path.resolve(), Path("/gradio/icon.svg")]


def test_canvases_many_requests_show_alike_are_written_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(app_support, "SHARED_CANVASES", 2)
    files = OutputFiles(tmp_path / "out", max_age_s=60, linger_s=0.0)
    drawn = []

    def draw(colour: str) -> Callable[[], Image.Image]:
        return lambda: drawn.append(colour) or Image.new("RGB", (8, 8), colour)

    red = files.shared_canvas("red", draw("red"))
    assert files.shared_canvas("red", draw("red")) == red and drawn == ["red"]  # drawn once
    assert pixels(red)[0, 0].tolist() == [255, 0, 0] and Path(red).parent == files.root / "shared"
    blue, green = files.shared_canvas("blue", draw("blue")), files.shared_canvas("green", draw("green"))
    assert Path(blue).exists() and Path(green).exists()  # the latest 2 kept
    time.sleep(0.1)
    assert not Path(red).exists()  # deleted a moment after it left (here linger_s = 0)
    leftover = files.root / "shared" / "canvas-of-an-earlier-run.png"
    leftover.write_bytes(b"")
    for path in (blue, leftover):
        os.utime(path, (0, 0))
    files._pruned = 0.0
    files.prune()  # kept shared canvases stay, however old; an earlier run's go
    assert Path(blue).exists() and not leftover.exists()
    os.remove(green)  # gone from disk meanwhile: drawn again
    assert files.shared_canvas("green", draw("green")) != green and drawn[-1] == "green"


def test_animations_wait_while_final_pictures_are_delivered(tmp_path: Path, states_of_a_run: list) -> None:
    files = OutputFiles(tmp_path / "out", max_defer_s=5.0)
    growth = GrowthAnimation()
    for state in states_of_a_run:
        growth.add(state, [Image.new("RGB", (8, 8), "red")] if state.done else None)
    written: list[float] = []
    with files.delivering():
        writer = threading.Thread(target=lambda: written.append(
            (files.animation(growth, "anim", "gif"), time.perf_counter())[1]))
        writer.start()
        time.sleep(0.3)
        assert not written  # still delivering someone's pictures
        ended = time.perf_counter()
    writer.join(10)
    assert written and written[0] >= ended
    files.max_defer_s = 0.05  # a steady stream of finishing requests still gets its animations
    with files.delivering():
        assert Path(files.animation(growth, "anim", "gif")).is_file()


def test_example_cache_follows_the_model_files(app: types.ModuleType, tiny: str) -> None:
    pipe = app.MODELS.get(None)
    with examples_cache(pipe) as first:
        assert os.environ["GRADIO_EXAMPLES_CACHE"] == str(first)
    assert "GRADIO_EXAMPLES_CACHE" not in os.environ or os.environ["GRADIO_EXAMPLES_CACHE"] != str(first)
    config = Path(tiny) / "config.json"
    os.utime(config, ns=(0, config.stat().st_mtime_ns + 1))  # the model was retrained
    with examples_cache(pipe) as second:
        assert second != first and second.parent == first.parent
