"""EAR Studio: watch class-conditional images grow from the centre outward, one EAR step at a time.

UI only. Every request goes through `ear.pipeline.EARPipeline` (picked from a small model
registry) and every value is checked again on the server by `ear.app_support`, because the HTTP
API accepts whatever a client sends. `python app.py` serves it; GRADIO_SERVER_NAME and
GRADIO_SERVER_PORT choose the address. `ear.startup` chooses, downloads, loads and warms up the
first model before the page is built (EAR_STUDIO_MODEL overrides its choice).
"""

from __future__ import annotations

import ear  # noqa: F401  first: it sets the OpenMP wait policy before torch is loaded

try:  # ZeroGPU (Hugging Face Spaces) must patch torch before anything initialises CUDA
    import spaces
except ImportError:
    spaces = None

import contextlib
import functools
import inspect
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import torch

from ear import startup
from ear.app_support import (
    ACTIVATION_TAU,
    ANIMATION_FORMATS,
    ANY_STYLE,
    CFG,
    EDITOR_CANVAS,
    MAX_UPLOAD_BYTES,
    NUM_IMAGES,
    REFINE_ROUNDS,
    SEED,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    UNCONDITIONAL,
    ZOOM_ROUNDS,
    Canvases,
    ModelRegistry,
    OutputFiles,
    Playbacks,
    Range,
    arm_caption,
    arm_frames,
    check_format,
    check_keep,
    check_place,
    check_style,
    compare_arms,
    compare_steps,
    default_keep,
    edit_upload,
    editor_picture,
    examples_cache,
    extend_model,
    info_markdown,
    keep_choices,
    load_upload,
    model_choices,
    public_info,
    resolve_class,
    sampling_kwargs,
    seed_note,
    shipped_tau,
    speedup_kwargs,
    stopped_caption,
    threads_per_request,
    timed,
    upload_preview,
)
from ear.growth import FULL, PLAYBACK_STEP_S, SKETCH, GrowthAnimation, PreviewPacer
from ear.order import SCHEDULES
from ear.pipeline import PLACES, EARPipeline, Frame
from ear.preview import CORRECTED_COLOUR, make_grid
from ear.serving import ProcessScheduler, attach, from_environment, log_batches
from ear.stops import RunStopped, Stops

gpu = startup.zero_gpu(spaces)  # spaces.GPU with a duration that follows each request's work


def serve_in_place(folder: Path) -> None:
    """Gradio serves `folder`'s files where they are, never copying them into its temp folder (see
    OutputFiles). For every file an update names, Gradio asks each static path in turn whether
    the file lies under it, resolving both on disk; ours is the one asked about on every canvas,
    so it is asked first (Gradio registers two icons of its own before it)."""
    gr.set_static_paths([folder])
    static = gr.data_classes._StaticFiles.all_paths  # no public way to order them
    static.sort(key=lambda path: path != folder.resolve())


EXAMPLES = sorted((Path(__file__).parent / "assets" / "examples").glob("*.jpg"))  # photographs
STARTED = startup.start()  # ready (downloaded, loaded, warmed up) before the page exists
SCHEDULER = from_environment()  # concurrent requests share batched forwards (EAR_BATCHING=0: off)
MODEL_CHOICES = model_choices(STARTED.name)
EXTEND_MODEL = extend_model(STARTED.name, MODEL_CHOICES)
MODELS = ModelRegistry([name for _, name in MODEL_CHOICES],
                       lambda name: attach(EARPipeline.from_pretrained(name), SCHEDULER),
                       preloaded={STARTED.name: attach(STARTED.pipeline, SCHEDULER)})
# Compare's arms as the page lays them out (the arms of every model have these keys and labels)
COMPARE_LAYOUT = compare_arms(MODELS.get(None), MODELS.names)
FILES = OutputFiles()
PLAYBACKS = Playbacks(FILES)
STOPS = Stops()
serve_in_place(FILES.root)
DEFAULT_IMAGES = 4  # a 2 x 2 grid: enough to see what the class looks like, fast on a CPU
# Generations computing at once: the scheduler runs one batch at a time; without it, one request per
# CPU core on a basic Space. Requests handled at once: with the scheduler, enough to fill a batch.
GENERATIONS_AT_ONCE = 2 if SCHEDULER is None else 1
CONCURRENCY_LIMIT = GENERATIONS_AT_ONCE if SCHEDULER is None else SCHEDULER.max_rows
# PyTorch threads per generation; the scheduler's worker leaves one core to Gradio and the drawing
THREADS = threads_per_request(GENERATIONS_AT_ONCE, spare=0 if SCHEDULER is None else 1)
QUEUE_SIZE = 24  # beyond this the page says the app is busy and to try again
WATCH, FAST = "watch", "fast"  # the page's pace: replay a fast run on the canvas, or just show the result
WATCHED_STAGES = 15  # live canvases that show a growth well enough: such a run is not replayed
MAX_PLAYBACK_S = 12.0  # a long zoom-out plays quicker than PLAYBACK_STEP_S per frame, within this
COMPARE_TAIL_FRAMES = 40  # Compare: frames a long order (raster) still plays after the others ended
TOKENS_AND_AFTER = re.compile(r" · \d+ / \d+ tokens.*$")
RANDOM_SEED_JS = f"() => Math.floor(Math.random() * {SEED.hi + 1})"
# On a phone the canvas sits below the controls: bring it into view when a run starts.
SHOW_CANVAS_JS = """() => { if (window.innerWidth < 768) {
  document.querySelector('CANVAS')?.scrollIntoView({behavior: 'smooth', block: 'start'}); } }"""
# Canvases fill their box, enlarged as crisp pixels (live canvases of big grids come at half
# size); the results gallery is as tall as its thumbnails, not a fixed 450 px, its columns share
# the width (a phone's too) and its label sits above the first picture, not on it.
CSS = """
.caption p { font-family: ui-monospace, monospace; font-size: 0.95rem; }
.canvas .image-frame { width: 100%; height: 100%; }
.canvas img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
#gen-final .grid-wrap { min-height: 0; height: auto; }
#gen-final .grid-container { grid-template-columns: repeat(var(--grid-cols), minmax(0, 1fr));
                             padding-top: 2rem; }
#model-info td:first-child { white-space: nowrap; padding-right: 1.5em; }
@media (max-width: 640px) {  /* a phone: the labels wrap too, so the values keep their width */
  #model-info td:first-child { white-space: normal; padding-right: 0.75em; width: 30%; }
}
"""


# Gradio's own theme serves Source Sans Pro at weights 400 and 600, but its 600 file holds 55
# glyphs (no "E", "R", ...): headings and buttons came out in two fonts ("EᴀR"). Its full Bold
# file stands in for every weight above 500.
THEME = gr.themes.Default(font=[gr.themes.LocalFont("Source Sans Pro", weights=(400, 700)),
                                "ui-sans-serif", "system-ui", "sans-serif"])


@contextlib.contextmanager
def shown_to_user() -> Iterator[None]:
    """Refusals (ValueErrors with a readable sentence) become an error toast; the server keeps serving."""
    try:
        yield
    except ValueError as err:
        raise gr.Error(str(err), print_exception=False) from None


def _refuse(err: ValueError, update: list[Any]) -> Iterator[list[Any]]:
    """A refused request: `update` (the reason where the caption goes, the previous run's pictures
    and download cleared) is the page's one message; the error still reaches API clients, but
    without a second copy of the message as a toast."""
    yield update
    raise gr.Error(str(err), visible=False, print_exception=False)


def _warning(err: ValueError) -> str:
    return f"⚠️ {err}"


def _with_last(frames: Iterator[Frame]) -> Iterator[tuple[Frame, bool]]:
    """Each frame and whether it is the last (one frame of look-ahead)."""
    previous = next(frames, None)
    for frame in frames:
        yield previous, False
        previous = frame
    if previous is not None:
        yield previous, True


def _canvas(frame: Frame, kind: str, canvases: Canvases, opening: bool) -> str:
    """A live canvas's file; an opening sketch that depends only on the cells (that of every
    generation) is drawn once for all requests."""
    key = frame.sketch_key() if opening and kind == SKETCH else None
    if key is not None:
        return FILES.shared_canvas(key, lambda: make_grid(frame.sketch()))
    return canvases.show(make_grid(frame.images if kind == FULL else frame.sketch()))


def _strip_label(caption: str) -> str:
    """A frame's counter in the playback: its caption up to the token count ("step 12 / 31",
    "zoom 1 / 3 · zooming out 2 / 8", "stopped at step 9 / 31")."""
    return TOKENS_AND_AFTER.sub("", caption)


def _played(pace: Any, live: int, growth: GrowthAnimation) -> bool:
    """Whether the canvas replays the (recorded) run: at the Watch pace, unless its `live`
    canvases and the picture it ends on showed enough of the growth (a model slower than the
    playback is watched live)."""
    return pace == WATCH and live + 1 < min(growth.frame_count, WATCHED_STAGES)


def _play(frames: Iterator[Frame], stem: str, fmt: str, pace: Any = FAST, first: str = FULL,
          note: str = "") -> Iterator[list[Any]]:
    """Stream a run: canvases as the pacer allows (every step while that costs little; else the
    first, one at least every 0.2 s), then the finished images, the growth animation and the
    playback key; at the Watch pace, a run faster than its playback is then replayed on the
    canvas (`Playbacks`). A Stop (`RunStopped`) ends it where it got to. The first update
    clears the previous run; `first` says whether the first canvas is decoded (an upload) or
    sketched (a single cell); `note` ends every caption."""
    pacer, growth, canvases = PreviewPacer(first=first), GrowthAnimation(), FILES.canvases(stem)
    frame = None
    try:
        try:
            for frame, last in _with_last(frames):
                if last:
                    break
                pictures = frame.images if frame.state.done else None  # (a zoom-out's bridge frames)
                growth.add(frame.state, pictures, _strip_label(frame.caption))
                kind = pacer.due(sharing=frame.sharing)
                if kind:
                    opening = not any(pacer.shown.values())
                    with pacer.showing(kind):
                        canvas = _canvas(frame, kind, canvases, opening)
                        # None clears the last run's gallery, animation and playback, then leaves
                        # them so. Not gr.skip() nor a greyed-out button: Gradio rebuilds a component
                        # for any change of its properties, per request, while a crowd's generation
                        # runs (the download button follows its value, see `_downloadable`).
                        yield [canvas, frame.caption + note, None, None, None]
        except RunStopped:
            if frame is not None:
                yield _stopped(frame, growth, canvases, stem, fmt, pace, sum(pacer.shown.values()), note)
            return
        if frame is None:
            raise gr.Error("The model produced no frames.")
        yield from _finished(frame, growth, canvases, stem, fmt, pace, sum(pacer.shown.values()), note)
    finally:
        canvases.close()


def _finished(frame: Frame, growth: GrowthAnimation, canvases: Canvases, stem: str, fmt: str,
              pace: Any, live: int, note: str) -> Iterator[list[Any]]:
    """The last step: final images (and the playback) first, then the animation file. A Stop
    from here on changes nothing: everything the run made is on its way."""
    with FILES.delivering():
        growth.add(frame.state, frame.images, _strip_label(frame.caption))
        finals = [FILES.image(image, f"{stem}-final") for image in frame.images]
        canvas, key = _kept(growth, stem, pace, live, lambda: finals[0] if len(finals) == 1
                            else canvases.show(make_grid(frame.images)))
        caption = frame.caption + note
        with contextlib.suppress(RunStopped):
            yield [canvas, f"{caption} · writing the animation…", finals, None, key]
    animation = FILES.animation(growth, stem, fmt)
    yield [canvas, f"{caption} · done", finals, animation, key]  # all of them: the API's result


def _stopped(frame: Frame, growth: GrowthAnimation, canvases: Canvases, stem: str, fmt: str,
             pace: Any, live: int, note: str) -> list[Any]:
    """A stopped run's last update: the cells made so far decoded once (no pending tiles), the
    growth up to there as playback and download, and where it stopped."""
    caption = stopped_caption(frame.caption)
    pictures = frame.decoded()
    if not frame.state.done:  # (a zoom-out's bridge frame is a finished picture already)
        growth.stop(pictures, _strip_label(caption))
    canvas, key = _kept(growth, stem, pace, live, lambda: canvases.show(make_grid(pictures)))
    return [canvas, caption + note, None, FILES.animation(growth, stem, fmt), key]


def _kept(growth: GrowthAnimation, stem: str, pace: Any, live: int, shown: Callable[[], str]
          ) -> tuple[str, str]:
    """Keep a run's growth for the page (its playback key) and pick the canvas it ends on: the
    playback where `_played` says so, else `shown()` (the pictures as they are)."""
    key = PLAYBACKS.keep(stem, [growth], [_pace(growth)])
    return (PLAYBACKS.play(key)[0] if _played(pace, live, growth) else shown()), key


def _pace(growth: GrowthAnimation) -> dict[str, float]:
    """Playback options: the Watch pace, quicker for long zoom-outs (at most MAX_PLAYBACK_S)."""
    return {"step_s": min(PLAYBACK_STEP_S, MAX_PLAYBACK_S / max(1, growth.frame_count))}


@gpu
def generate(class_name: str, num_images: int, seed: int, cfg_scale: float, temperature: float,
             top_k: int, top_p: float, model: str, animation_format: str,
             style: str = ANY_STYLE, pace: str = FAST, refine: bool | None = None,
             activation: bool = False, activation_tau: float | None = None) -> Iterator[list[Any]]:
    """Grow `num_images` images of a class: live canvases, then the final images (a gallery) and
    the growth as a GIF/MP4 file (a blank seed: a random one, said in the caption). `refine`:
    nested refinement (None: where the model has the correction head); `activation`: the FFNs
    activated at `activation_tau` (None: the shipped tau)."""
    try:
        pipe = MODELS.get(model)
        class_id = resolve_class(pipe, class_name, required=True)
        batch = [class_id] * NUM_IMAGES.check(num_images)
        kwargs = sampling_kwargs(pipe, seed, cfg_scale, temperature, top_k, top_p)
        fmt = check_format(animation_format)
        speedups = speedup_kwargs(pipe, refine, activation, activation_tau)
        frames = pipe.stream(batch, style=check_style(pipe, style), **kwargs, **speedups)
    except ValueError as err:
        yield from _refuse(err, [None, _warning(err), None, None, None])
    yield from _play(frames, "ear-generate", fmt, pace, first=SKETCH, note=seed_note(seed, kwargs["seed"]))


@gpu
def extend(image: Any, keep: int, class_name: str, zoom_rounds: int, seed: int, cfg_scale: float,
           temperature: float, top_k: int, top_p: float, model: str,
           animation_format: str, style: str = ANY_STYLE, pace: str = FAST,
           place: str = "centre") -> Iterator[list[Any]]:
    """Grow the canvas around an uploaded picture (kept as keep x keep tokens in the centre or a
    corner, or a band keep tokens deep along a side); with zoom-out rounds > 0 (centre only),
    shrink the result into the centre and extend again, as one zoom-out."""
    try:
        pipe = MODELS.get(model)
        picture = load_upload(image)
        keep = check_keep(pipe, keep)
        place = check_place(place)
        class_id = resolve_class(pipe, class_name, required=False)
        rounds = ZOOM_ROUNDS.check(zoom_rounds)
        if rounds and place != "centre":
            raise ValueError("Zoom-out shrinks the picture into the centre: set the placement to centre.")
        kwargs = sampling_kwargs(pipe, seed, cfg_scale, temperature, top_k, top_p)
        kwargs["style"] = check_style(pipe, style)
        fmt = check_format(animation_format)
        frames = (pipe.zoom_out(picture, rounds, keep, class_id, **kwargs) if rounds
                  else pipe.extend(picture, keep, class_id, place=place, **kwargs))
    except ValueError as err:
        yield from _refuse(err, [None, _warning(err), None, None, None])
    yield from _play_one(frames, "ear-extend", fmt, pace, seed_note(seed, kwargs["seed"]))


def _play_one(frames: Iterator[Frame], stem: str, fmt: str, pace: Any, note: str) -> Iterator[list[Any]]:
    """`_play` for a tab whose result is one picture (Extend, Edit)."""
    for canvas, caption, finals, download, key in _play(frames, stem, fmt, pace, note=note):
        yield [canvas, caption, finals[0] if isinstance(finals, list) else finals, download, key]


@gpu
def edit(picture: Any, class_name: str, refine_rounds: int, seed: int, cfg_scale: float, temperature: float,
         top_k: int, top_p: float, model: str, animation_format: str, style: str = ANY_STYLE,
         pace: str = FAST) -> Iterator[list[Any]]:
    """Redraw what is painted on the picture (the image editor's value: the picture as its
    background, the paint on its layers), in the model's order; the rest stays as it is."""
    try:
        pipe = MODELS.get(model)
        image, mask = edit_upload(picture)
        class_id = resolve_class(pipe, class_name, required=False)
        kwargs = sampling_kwargs(pipe, seed, cfg_scale, temperature, top_k, top_p)
        kwargs["style"] = check_style(pipe, style)
        fmt = check_format(animation_format)
        frames = pipe.edit(image, mask, class_id, refine=REFINE_ROUNDS.check(refine_rounds), **kwargs)
    except ValueError as err:
        yield from _refuse(err, [None, _warning(err), None, None, None])
    yield from _play_one(frames, "ear-edit", fmt, pace, seed_note(seed, kwargs["seed"]))


def extend_example(image: Any, keep: int, class_name: str) -> Iterator[list[Any]]:
    """The cached examples: the Extend tab's default model and its preset, seed 0, no zoom; cached
    as the finished result (no playback key: a cache outlives the server's runs)."""
    preset = MODELS.get(EXTEND_MODEL).default_settings
    for update in extend(image, keep, class_name, 0, 0, preset.cfg_scale, preset.temperature,
                         preset.top_k, preset.top_p, EXTEND_MODEL, "gif"):
        yield update[:4]


def check_upload(image: Any) -> list[Any]:
    """Read an upload as soon as it arrives: one that cannot be used is taken off again and the
    reason is shown under it, instead of a broken picture until Extend is pressed; one a browser
    cannot show (a TIFF) is shown as a PNG; what will be used of an odd size is said."""
    try:
        preview, note = upload_preview(image, FILES)
    except ValueError as err:
        return [None, _warning(err)]
    return [gr.skip() if preview is None else preview, note and f"ℹ️ {note}"]


@gpu(total_steps=compare_steps)
def compare(class_name: str, seed: int, model: str, pace: str = FAST) -> Iterator[list[Any]]:
    """The same class and seed in every arm of `compare_arms` (the page model in every order of
    SCHEDULES, RadAR's rings with and without refinement, the page model activated), one step of
    each in turn, so every arm shows its progress as it goes and the short ones finish long before
    raster's 256 steps; canvases are paced as in Generate, every arm's last step shown. An arm
    that does not apply says why where its caption goes. Each arm's time counts only its own
    steps (previews excluded). At the Watch pace, all arms are then played side by side at one
    pace per step (`_compare_paces`)."""
    try:
        pipe = MODELS.get(model)
        class_id = resolve_class(pipe, class_name, required=True)
        seed = SEED.check(seed)
        opened = {arm.key: arm_frames(arm, pipe, MODELS.get, class_id, seed)
                  for arm in compare_arms(pipe, MODELS.names)}
    except ValueError as err:
        yield from _refuse(err, [None, _warning(err), *[None, ""] * (len(COMPARE_LAYOUT) - 1), None])
    headings = {key: heading for key, (heading, _) in opened.items()}  # every arm, in the page's order
    streams = {key: timed(frames) for key, (_, frames) in opened.items() if frames is not None}
    pacer = PreviewPacer()
    canvases = {key: FILES.canvases(f"ear-{key}") for key in streams}
    growths = {key: GrowthAnimation() for key in streams}
    spent = dict.fromkeys(streams, 0.0)
    latest: dict[str, Frame] = {}  # each running arm's newest frame
    finals: dict[str, str] = {}  # the finished (or stopped) arms' pictures, as shown
    waiting: dict[str, Frame] = {}  # ... not shown yet
    opening = True  # the first update also clears the arms that do not run
    try:
        while streams:
            for key in list(streams):
                item = next(streams[key], None)
                if item is None:
                    del streams[key]
                    continue
                frame, seconds = item
                latest[key] = waiting[key] = frame
                spent[key] += seconds
                growths[key].add(frame.state, frame.images if frame.state.done else None)
            finished = any(frame.state.done for frame in waiting.values())
            kind = FULL if finished else pacer.due()
            if waiting and kind:
                with pacer.showing(kind):
                    update = {key: _arm_update(key, waiting.pop(key, None), canvases[key], headings[key],
                                               spent[key], kind) for key in growths}
                finals.update((key, image) for key, (image, _) in update.items()
                              if latest[key].state.done and isinstance(image, str))
                try:
                    yield [*_arm_values(headings, update, opening), None]
                except RunStopped:
                    for key, frame in latest.items():
                        if not frame.state.done:  # its cells so far, decoded once for both uses
                            pictures = frame.decoded()
                            growths[key].stop(pictures, _strip_label(stopped_caption(frame.caption)))
                            finals[key] = FILES.image(pictures[0], f"ear-{key}-final")
                    break
                opening = False
        yield _compare_result(headings, latest, finals, growths, spent, pace == WATCH)
    finally:
        for files in canvases.values():
            files.close()


def _arm_values(headings: dict[str, str], update: dict[str, list[Any]], opening: bool) -> list[Any]:
    """A Compare update's canvases and captions in the page's order: the running arms' as `update`
    has them; an arm that does not run is cleared to its heading (why not) in the run's first
    update and left so after."""
    values: list[Any] = []
    for key, heading in headings.items():
        values += update.get(key) or ([None, heading] if opening else [gr.skip(), gr.skip()])
    return values


def _compare_result(headings: dict[str, str], latest: dict[str, Frame], finals: dict[str, str],
                    growths: dict[str, GrowthAnimation], spent: dict[str, float], played: bool) -> list[Any]:
    """Every arm's last canvas and caption (its playback at the Watch pace; a stopped arm's cells
    decoded once; an arm that did not run, its heading) and the playback key: the final update,
    which the API returns."""
    held = [growths.get(key) for key in headings]
    key = PLAYBACKS.keep("ear-compare", held, _compare_paces(held))
    playbacks = dict(zip(headings, PLAYBACKS.play(key) if played else [None] * len(held), strict=True))
    update: dict[str, list[Any]] = {}
    for arm, frame in latest.items():
        caption = arm_caption(headings[arm], frame.state, spent[arm])
        if not frame.state.done:
            caption = stopped_caption(caption)
        update[arm] = [playbacks[arm] or finals[arm], caption]
    return [*_arm_values(headings, update, opening=True), key]


def _compare_paces(growths: list[GrowthAnimation | None]) -> list[dict[str, float]]:
    """One pace per step for every arm until the second-longest has finished (arms' 31 steps); a
    longer one (raster's 256) then goes faster, labelled, so it ends COMPARE_TAIL_FRAMES frames
    later. An arm that did not run has no growth and no options."""
    counts = [None if growth is None else growth.frame_count for growth in growths]
    ran = sorted(count for count in counts if count is not None)
    together = ran[-2] if len(ran) > 1 else ran[0]
    return [{} if count is None else
            {"fast_after": together, "speedup": max(1, math.ceil((count - together) / COMPARE_TAIL_FRAMES))}
            for count in counts]


def _arm_update(key: str, frame: Frame | None, canvases: Canvases, heading: str, seconds: float,
                kind: str) -> list[Any]:
    """Canvas and caption of one arm in a Compare update (a finished picture as lossless PNG)."""
    if frame is None:
        return [gr.skip(), gr.skip()]
    if frame.state.done:
        image = FILES.image(frame.images[0], f"ear-{key}-final")
    else:
        image = canvases.show((frame.images if kind == FULL else frame.sketch())[0])
    return [image, arm_caption(heading, frame.state, seconds)]


def model_info(model: str) -> tuple[str, dict[str, Any]]:
    """What is loaded: model, device, dtype, parameters, licence and attribution, Hub cache state
    (where it came from as "bundled", a Hub id or a folder name: never a path on the server)."""
    with shown_to_user():
        info = public_info(MODELS.get(model).info())
    return info_markdown(info), info


def _slider(r: Range, value: float, step: float, **kwargs: Any) -> gr.Slider:
    """A slider whose bounds are the server-side check's bounds."""
    return gr.Slider(r.lo, kwargs.pop("maximum", r.hi), value=value, step=step, label=r.label, **kwargs)


def _preset_name(pipe: EARPipeline, wanted: str | None = None) -> str:
    """`wanted` where the model has a preset of that name (Edit opens on "edit"), else its default."""
    if wanted in pipe.presets:
        return wanted
    return next(name for name, settings in pipe.presets.items() if settings is pipe.default_settings)


def apply_preset(preset: str, model: str) -> list[float]:
    """The four slider values of one of the model's named presets (e.g. "visual", "fid")."""
    with shown_to_user():
        pipe = MODELS.get(model)
        if not isinstance(preset, str) or preset not in pipe.presets:
            raise ValueError(f"Unknown preset {str(preset)[:40]!r}; {pipe.name} has "
                             f"{', '.join(pipe.presets)}.")
    settings = pipe.presets[preset]
    return [settings.cfg_scale, settings.temperature, settings.top_k, settings.top_p]


def _sampling_controls(pipe: EARPipeline, model: gr.Dropdown, wanted: str | None = None
                       ) -> tuple[list[Any], list[Any]]:
    """Seed (with a random button), a preset picker and the four sampling sliders.

    Returns the handler inputs (seed and sliders) and the controls a model change refills."""
    name = _preset_name(pipe, wanted)
    preset = pipe.presets[name]
    with gr.Row(equal_height=True):
        seed = gr.Number(0, label=SEED.label, precision=0, minimum=SEED.lo, maximum=SEED.hi, scale=3)
        dice = gr.Button("Random", size="sm", scale=1, min_width=80)
    dice.click(None, js=RANDOM_SEED_JS, outputs=seed, queue=False, api_visibility="private")
    with gr.Accordion("Sampling", open=False):
        presets = gr.Dropdown(list(pipe.presets), value=name, label="Preset",
                              info="the model's recommended settings")
        cfg = _slider(CFG, preset.cfg_scale, 0.05, info="classifier-free guidance; 1 = none")
        temperature = _slider(TEMPERATURE, preset.temperature, 0.05)
        top_k = _slider(TOP_K, preset.top_k, 1, maximum=pipe.tokenizer.codebook_size, info="0 = off")
        top_p = _slider(TOP_P, preset.top_p, 0.01, info="1 = off")
    sliders = [cfg, temperature, top_k, top_p]
    presets.select(apply_preset, [presets, model], sliders, api_visibility="private", queue=False)
    return [seed, *sliders], [presets, *sliders]


def _outputs(prefix: str, final: gr.components.Component) -> list[gr.components.Component]:
    """Live canvas, step caption, finished result, the animation download and the run's playback
    key (a State: invisible to the API) of one tab."""
    canvas = gr.Image(label="Canvas", format="png", interactive=False, elem_id=f"{prefix}-canvas",
                      elem_classes="canvas", height=420, placeholder="The latest step's cells are outlined.")
    caption = gr.Markdown(label="Caption", elem_id=f"{prefix}-caption", elem_classes="caption")
    final.render()
    download = gr.DownloadButton("Download animation", interactive=False, elem_id=f"{prefix}-download")
    download.change(_downloadable, download, download, queue=False, show_progress="hidden",
                    api_visibility="private")
    return [canvas, caption, final, download, gr.State()]


def _downloadable(animation: Any) -> dict[str, Any]:
    """The download button can be pressed exactly when it has a file (a cached example's too)."""
    return gr.update(interactive=bool(animation))


def _format_picker() -> gr.Radio:
    return gr.Radio([(f.upper(), f) for f in ANIMATION_FORMATS], value="gif", label="Animation format")


def _buttons(label: str, prefix: str) -> tuple[gr.Button, gr.Button, gr.Button]:
    """Run, Stop (enabled only while a run goes) and Replay (once a run has a growth to play)."""
    with gr.Row():
        return (gr.Button(label, variant="primary", elem_id=f"{prefix}-run", min_width=90),
                gr.Button("Stop", variant="secondary", interactive=False, elem_id=f"{prefix}-stop",
                          min_width=70),
                gr.Button("Replay", variant="secondary", interactive=False, elem_id=f"{prefix}-replay",
                          min_width=70))


def after_run(*values: Any) -> list[Any]:
    """Once a run has ended, however (inputs: its captions, then its playback key): a run that was
    cancelled says where it stopped (Gradio sends nothing after a cancel, and this runs after
    every update already sent has landed), Stop greys out, Replay is there if there is a growth."""
    *captions, key = values
    return [*(stopped_caption(c) for c in captions), gr.update(interactive=False),
            gr.update(interactive=bool(key))]


def running() -> list[dict[str, Any]]:
    """As a run starts: Stop can be pressed, Replay waits for this run's growth."""
    return [gr.update(interactive=True), gr.update(interactive=False)]


def replay(key: Any) -> str | list[str]:
    """The last run's growth played again on its canvases (a fresh file name each time): one
    file for one canvas (Gradio takes a list there as the value itself), else one per canvas."""
    with shown_to_user():
        paths = PLAYBACKS.play(key)
    return paths[0] if len(paths) == 1 else paths


def _run_key(request: gr.Request | None, tab: str) -> tuple[str, str] | None:
    session = request.session_hash if request is not None else None
    return None if session is None else (session, tab)


def _stoppable(run: Callable[..., Iterator[list[Any]]], tab: str) -> Callable[..., Iterator[list[Any]]]:
    """`run` as the tab's Stop button can end it (`ear.stops`); the request says whose run it is.
    It keeps `run`'s name, docstring and parameters (the API's), with Gradio's request first."""
    @functools.wraps(run)
    def served(request: gr.Request, *args: Any) -> Iterator[list[Any]]:
        yield from STOPS.follow(_run_key(request, tab), run(*args))

    signature = inspect.signature(run)
    first = inspect.Parameter("request", inspect.Parameter.POSITIONAL_ONLY, annotation=gr.Request)
    served.__signature__ = signature.replace(parameters=[first, *signature.parameters.values()])
    served.__annotations__ = {**run.__annotations__, "request": gr.Request}
    return served


def _wire(run: gr.Button, buttons: list[gr.Button], tab: str, handler: Callable[..., Iterator[list[Any]]],
          inputs: list[Any], outputs: list[Any], captions: list[Any], key: gr.State,
          canvases: list[Any], **listen: Any) -> None:
    """A tab's run and its buttons. The run first enables Stop (Gradio's page handles one
    trigger's listeners in turn: a second listener of the click would only run after the
    generation) and brings the canvas into view on a phone. Stop ends the run at its next update,
    as a normal end (`ear.stops` says why), then cancels what is left: a run still queued, or
    one busy past the wait. When the run has ended, `after_run` tidies `captions` and the
    buttons; Replay plays `key`'s growth on `canvases`."""
    stop, again = buttons
    quiet: dict[str, Any] = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}
    started = run.click(None, js=SHOW_CANVAS_JS.replace("CANVAS", f"#{canvases[0].elem_id}"), **quiet) \
        .then(running, None, [stop, again], **quiet)
    event = started.then(_stoppable(handler, tab), inputs, outputs, **HEAVY, **listen)

    def stop_run(request: gr.Request) -> None:
        run_key = _run_key(request, tab)
        if run_key is not None:
            STOPS.stop(run_key)

    stop.click(stop_run, None, None, **quiet).then(None, cancels=[event], **quiet)
    event.then(after_run, [*captions, key], [*captions, stop, again], **quiet)

    def after_refusal(*values: Any) -> list[Any]:
        """Gradio's page runs `.then` listeners only after a success: a refused request
        (`_refuse`) ends in an error, and Stop would stay pressable for good. Touching the
        canvases also takes the failed run's "Error" badge off them (the caption says why)."""
        return [*after_run(*values), *[gr.skip()] * len(canvases)]

    event.failure(after_refusal, [*captions, key], [*captions, stop, again, *canvases], **quiet)
    again.click(replay, key, canvases, **quiet)


def _class_picker(pipe: EARPipeline, **kwargs: Any) -> gr.Dropdown:
    """Searchable class names (typing filters the list); the model's own default class preselected."""
    return gr.Dropdown(pipe.class_names, value=pipe.default_class, label="Class", info="type to search",
                       **kwargs)


def _optional_class_choices(pipe: EARPipeline) -> dict[str, Any]:
    """Extend and Edit: unconditional first and preselected, then the model's classes."""
    return {"choices": [UNCONDITIONAL, *pipe.class_names], "value": UNCONDITIONAL}


def _optional_class_picker(pipe: EARPipeline) -> gr.Dropdown:
    return gr.Dropdown(**_optional_class_choices(pipe), label="Class", info="optional; type to search")


def _one_result_outputs(prefix: str) -> list[gr.components.Component]:
    """`_outputs` of a tab whose result is one picture (Extend, Edit)."""
    return _outputs(prefix, gr.Image(label="Result", format="png", interactive=False, render=False,
                                     elem_id=f"{prefix}-final"))


def _style_choices(pipe: EARPipeline) -> dict[str, Any]:
    """Shown only for a model with styles (one class embedding per class and image set)."""
    return {"choices": [ANY_STYLE, *pipe.styles], "value": ANY_STYLE, "visible": bool(pipe.styles)}


def _style_picker(pipe: EARPipeline, prefix: str) -> gr.Dropdown:
    return gr.Dropdown(**_style_choices(pipe), label="Style", filterable=False, elem_id=f"{prefix}-style",
                       info="whose drawings to follow; Any alternates them")


def _speedup_values(pipe: EARPipeline) -> list[dict[str, Any]]:
    """Refine (shown and on where the model has the correction head), dynamic activation (shown
    where it ships routers; off) and its tau (the shipped one): what a model change resets."""
    tau = shipped_tau(pipe)
    return [{"visible": pipe.can_refine, "value": pipe.can_refine},
            {"visible": tau is not None, "value": False},
            {"visible": tau is not None, "value": ACTIVATION_TAU.hi if tau is None else tau,
             "interactive": False}]  # until activation is ticked (`tau_follows`)


def tau_follows(activation: bool) -> dict[str, Any]:
    """The tau slider can be moved only while dynamic activation is on: it changes nothing else."""
    return gr.update(interactive=bool(activation))


def _speedup_controls(pipe: EARPipeline) -> list[gr.components.Component]:
    """The Generate tab's RadAR and ActVAR controls (`_speedup_values`)."""
    refine, activation, tau = _speedup_values(pipe)
    return [gr.Checkbox(label="Refine (RadAR)", elem_id="gen-refine", **refine,
                        info="redraw the cells the model finds implausible one step later (outlined in "
                             f"{CORRECTED_COLOUR})"),
            gr.Checkbox(label="Dynamic activation (ActVAR)", elem_id="gen-activation", **activation,
                        info="run only the FFN experts each token's router picks"),
            _slider(ACTIVATION_TAU, tau.pop("value"), 0.05, elem_id="gen-activation-tau", **tau,
                    info="dynamic-k: experts predicted at >= (1 - tau) x the largest run; 1 = all")]


def _generate_tab(pipe: EARPipeline, model: gr.Dropdown, pace: gr.State) -> list[gr.components.Component]:
    with gr.Row():
        with gr.Column(scale=1):
            klass = _class_picker(pipe)
            style = _style_picker(pipe, "gen")
            count = gr.Slider(NUM_IMAGES.lo, NUM_IMAGES.hi, value=DEFAULT_IMAGES, step=1,
                              label=NUM_IMAGES.label, info="shown as a grid")
            sampling, refilled = _sampling_controls(pipe, model)
            speedups = _speedup_controls(pipe)
            _refine, activation, tau = speedups
            activation.change(tau_follows, activation, tau, queue=False, show_progress="hidden",
                              api_visibility="private")
            fmt = _format_picker()
            run, *buttons = _buttons("Generate", "gen")
        with gr.Column(scale=2):
            # not interactive, although the Edit tab reads it: no upload box where results go
            finals = gr.Gallery(label="Final images", columns=4, fit_columns=False, preview=False,
                                format="png", height="auto", object_fit="contain", render=False,
                                interactive=False, elem_id="gen-final")
            outputs = _outputs("gen", finals)
    _wire(run, buttons, "gen", generate, [klass, count, *sampling, model, fmt, style, pace, *speedups],
          outputs, [outputs[1]], outputs[4], [outputs[0]], api_name="generate", show_progress_on=outputs[0])
    return [klass, style, *refilled, *speedups]


def _picture_model_picker(prefix: str) -> gr.Dropdown:
    """The model picker of a tab that works on the visitor's own picture (Extend, Edit): uploads
    are photos more often than emoji, so it opens on EXTEND_MODEL, not the page's model."""
    return gr.Dropdown(MODEL_CHOICES, value=EXTEND_MODEL, label="Model for your picture", filterable=False,
                       elem_id=f"{prefix}-model", info="ear-photo has learnt how photographs continue")


def _extend_tab(pace: gr.State) -> tuple[gr.Dropdown, gr.State, list[gr.components.Component]]:
    """The Extend tab, with a model picker of its own (uploads are photos more often than emoji):
    returns it, the State of the model loaded for it, and the controls that follow it."""
    pipe = MODELS.get(EXTEND_MODEL)
    with gr.Row():
        with gr.Column(scale=1):
            model = _picture_model_picker("ext")
            image = gr.Image(label="Your picture", type="filepath", sources=["upload", "clipboard"],
                             elem_id="ext-image")
            note = gr.Markdown(elem_id="ext-upload-note")
            image.upload(check_upload, image, [image, note], queue=False, preprocess=False,
                         show_progress="hidden", api_visibility="private")
            with gr.Row():
                place = gr.Dropdown(list(PLACES), value="centre", label="Placement", filterable=False,
                                    elem_id="ext-place", min_width=200,
                                    info="where your picture sits; the canvas grows "
                                    "around it (a side: grows the other way)")
                keep = gr.Dropdown(keep_choices(pipe), value=default_keep(pipe), label="Kept canvas",
                                   min_width=200,
                                   info="how much of the final canvas your picture covers (a side: "
                                   "how deep its band is)")
            klass = _optional_class_picker(pipe)
            style = _style_picker(pipe, "ext")
            rounds = gr.Slider(ZOOM_ROUNDS.lo, ZOOM_ROUNDS.hi, value=0, step=1, label=ZOOM_ROUNDS.label,
                               info="0 = extend once; n = zoom out n times")
            sampling, refilled = _sampling_controls(pipe, model)
            fmt = _format_picker()
            run, *buttons = _buttons("Extend", "ext")
        with gr.Column(scale=2):
            outputs = _one_result_outputs("ext")
    with examples_cache(pipe):
        gr.Examples([[str(p), default_keep(pipe), UNCONDITIONAL] for p in EXAMPLES],
                    inputs=[image, keep, klass], outputs=outputs[:4], fn=extend_example, cache_examples=True,
                    cache_mode="lazy", preprocess=False, label=f"Examples (results cached, {EXTEND_MODEL})",
                    elem_id="ext-examples")
    _wire(run, buttons, "ext", extend,
          [image, keep, klass, rounds, *sampling, model, fmt, style, pace, place], outputs, [outputs[1]],
          outputs[4], [outputs[0]], api_name="extend", show_progress_on=outputs[0])
    loaded = gr.State(EXTEND_MODEL)
    return model, loaded, [klass, style, keep, *refilled]


def _with_editor(editor: gr.ImageEditor, run: Callable[..., Iterator[list[Any]]]
                 ) -> Callable[..., Iterator[list[Any]]]:
    """`run` given the editor's value as pictures: handlers take their inputs unprocessed (HEAVY),
    and the browser sends the editor's pictures as blobs that only the component can find."""
    @functools.wraps(run)
    def with_pictures(value: Any, *args: Any) -> Iterator[list[Any]]:
        # Not an editor's value, or files that are no pictures: `edit_upload` reads what it was
        # given and says what is wrong.
        with contextlib.suppress(Exception):
            value = editor.preprocess(gr.components.image_editor.EditorData.model_validate(value))
        yield from run(value, *args)

    return with_pictures


def last_generated(gallery: Any) -> list[Any]:
    """The first picture of the Generate tab's results as the editor's new background, and the
    caption (a toast would not show: the click skips the queue)."""
    first = gallery[0] if isinstance(gallery, list) and gallery else None
    picture = first[0] if isinstance(first, tuple | list) else first
    if picture is None:
        return [gr.skip(), _warning(ValueError("Generate a picture first: there is none to edit yet."))]
    return [_editor_value(picture), ""]


def uploaded_picture(file: Any) -> list[Any]:
    """A picture uploaded for the editor, read here (`editor_picture`: shrunk to paint on if it
    is large; one the server cannot use is refused with a sentence) and set as its background,
    with what will be used of it in the caption."""
    try:
        picture, note = editor_picture(file)
    except ValueError as err:
        return [gr.skip(), _warning(err)]
    return [_editor_value(picture), note and f"ℹ️ {note}"]


def _editor_value(picture: Any) -> dict[str, Any]:
    return {"background": picture, "layers": [], "composite": picture}


def _edit_tab(pace: gr.State, generated: gr.Gallery | None
              ) -> tuple[gr.Dropdown, gr.State, list[gr.components.Component]]:
    """The Edit tab, with its own model picker as Extend's: returns it, the State of the model
    loaded for it, and the controls that follow it (`_edit_updates`)."""
    pipe = MODELS.get(EXTEND_MODEL)
    with gr.Row():
        with gr.Column(scale=1):
            model = _picture_model_picker("edit")
            # Uploads come in through the button (`uploaded_picture`), not the editor's own upload:
            # that would keep a phone photo at full size in the browser.
            editor = gr.ImageEditor(label="Your picture: paint over what to redraw", type="pil",
                                    image_mode="RGBA", sources=["clipboard"], format="png",
                                    transforms=(), layers=False, elem_id="edit-image",
                                    canvas_size=EDITOR_CANVAS,
                                    brush=gr.Brush(default_size=24, colors=["#ff00ff"], color_mode="fixed"))
            with gr.Row():
                upload = gr.UploadButton("Upload a picture", file_types=["image"], size="sm",
                                         elem_id="edit-upload")
                take = gr.Button("Use the last generated picture", size="sm", elem_id="edit-take")
            klass = _optional_class_picker(pipe)
            style = _style_picker(pipe, "edit")
            refine = gr.Slider(REFINE_ROUNDS.lo, REFINE_ROUNDS.hi, value=EDIT_ROUNDS, step=1,
                               label=REFINE_ROUNDS.label,
                               info="redraw n more times, keep the draw that fits the rest best")
            sampling, refilled = _sampling_controls(pipe, model, EDIT_PRESET)
            fmt = _format_picker()
            run, *buttons = _buttons("Redraw", "edit")
        with gr.Column(scale=2):
            outputs = _one_result_outputs("edit")
    if generated is not None:
        take.click(last_generated, generated, [editor, outputs[1]], queue=False, api_visibility="private")
    upload.upload(uploaded_picture, upload, [editor, outputs[1]], queue=False, api_visibility="private")
    _wire(run, buttons, "edit", _with_editor(editor, edit),
          [editor, klass, refine, *sampling, model, fmt, style, pace], outputs, [outputs[1]], outputs[4],
          [outputs[0]], api_name="edit", show_progress_on=outputs[0])
    return model, gr.State(EXTEND_MODEL), [klass, style, *refilled]


def _compare_tab(pipe: EARPipeline, model: gr.Dropdown, pace: gr.State) -> list[gr.components.Component]:
    gr.Markdown("Same class, same seed, several ways to draw it: the page's model in every generation "
                "order (it only ever saw its training order; the others show what happens "
                "off-distribution), RadAR's rings with and without nested refinement, and the model "
                "with dynamic activation. Each counts its own steps and time.")
    with gr.Row(equal_height=True):
        klass = _class_picker(pipe, scale=3)
        seed = gr.Number(0, label=SEED.label, precision=0, minimum=SEED.lo, maximum=SEED.hi, scale=2)
        with gr.Column(scale=2):
            run, *buttons = _buttons("Compare", "cmp")
    outputs: list[gr.components.Component] = []
    width = len(SCHEDULES)  # rows of this many columns: the orders, then RadAR and activation
    for start in range(0, len(COMPARE_LAYOUT), width):
        row = COMPARE_LAYOUT[start:start + width]
        with gr.Row():
            for arm in row:
                with gr.Column(min_width=160):
                    outputs.append(gr.Image(label=arm.label, format="png", interactive=False,
                                            elem_classes="canvas", elem_id=f"cmp-{arm.key}-canvas"))
                    outputs.append(gr.Markdown(label=f"{arm.label} caption", elem_classes="caption",
                                               elem_id=f"cmp-{arm.key}-caption"))
            for _ in range(width - len(row)):  # the last row's pictures as wide as the others
                gr.Column(min_width=160)
    key = gr.State()
    _wire(run, buttons, "cmp", compare, [klass, seed, model, pace], [*outputs, key], outputs[1::2], key,
          outputs[0::2], api_name="compare", show_progress_on=outputs[0::2])
    return [klass]


def _info_tab(model: gr.Dropdown) -> list[gr.components.Component]:
    text, info = model_info(MODELS.default)
    view = gr.Markdown(text, elem_id="model-info")
    with gr.Accordion("As JSON", open=False):
        raw = gr.JSON(info)
    refresh = gr.Button("Refresh", size="sm")
    # unprocessed: a model the picker does not list gets the app's sentence, not Gradio's check
    refresh.click(model_info, model, [view, raw], api_name="model_info", preprocess=False)
    return [view, raw]


def _slider_updates(pipe: EARPipeline, wanted: str | None = None) -> list[Any]:
    """The preset picker and the four sampling sliders, as `_sampling_controls` builds them."""
    name = _preset_name(pipe, wanted)
    preset = pipe.presets[name]
    return [gr.Dropdown(choices=list(pipe.presets), value=name),
            gr.Slider(value=preset.cfg_scale), gr.Slider(value=preset.temperature),
            gr.Slider(value=preset.top_k, maximum=pipe.tokenizer.codebook_size),
            gr.Slider(value=preset.top_p)]


def _page_updates(pipe: EARPipeline, name: str) -> list[Any]:
    """New choices and presets for the controls that follow the page's model, in `build_demo`'s
    order: Generate, Compare, Model info."""
    style = gr.Dropdown(**_style_choices(pipe))
    classes = {"choices": pipe.class_names, "value": pipe.default_class}
    refine, activation, tau = _speedup_values(pipe)
    speedups = [gr.Checkbox(**refine), gr.Checkbox(**activation), gr.Slider(**tau)]
    return [gr.Dropdown(**classes), style, *_slider_updates(pipe), *speedups, gr.Dropdown(**classes),
            *model_info(name)]


def _extend_updates(pipe: EARPipeline, name: str) -> list[Any]:
    """The same for the controls that follow the Extend tab's own model, in `_extend_tab`'s order."""
    return [gr.Dropdown(**_optional_class_choices(pipe)), gr.Dropdown(**_style_choices(pipe)),
            gr.Dropdown(choices=keep_choices(pipe), value=default_keep(pipe)), *_slider_updates(pipe)]


def _edit_updates(pipe: EARPipeline, name: str) -> list[Any]:
    """The same for the Edit tab's own model, in `_edit_tab`'s order (its "edit" preset first)."""
    return [gr.Dropdown(**_optional_class_choices(pipe)), gr.Dropdown(**_style_choices(pipe)),
            *_slider_updates(pipe, EDIT_PRESET)]


def select_model(name: str, previous: str, updates: Callable[[EARPipeline, str], list[Any]] = _page_updates,
                 count: int = 0) -> list[Any]:
    """Load the picked model and refill the controls that depend on it (`updates`, `count` of
    them); if it cannot be loaded, say why and switch back to the model that was loaded."""
    try:
        pipe = MODELS.get(name)
    except ValueError as err:
        gr.Warning(str(err))
        return [previous, previous, *[gr.skip()] * (count or PAGE_DEPENDENT)]
    return [name, name, *updates(pipe, name)]


HEAVY: dict[str, Any] = {"concurrency_id": "ear", "preprocess": False}
# outputs of _page_updates: class and style pickers, presets, sliders, Generate's refine and
# activation controls, info
PAGE_DEPENDENT = 13
EXTEND_DEPENDENT = 8  # outputs of _extend_updates: class, style, keep sizes, presets, sliders
EDIT_DEPENDENT = 7  # outputs of _edit_updates: class, style, presets, sliders
EDIT_PRESET = "edit"  # the preset the Edit tab opens on where a model has one
EDIT_ROUNDS = 8  # refinement rounds the Edit tab opens on (bench_edit: the halves clear 3 dB there)


def _same(value: Any) -> Any:
    return value


def _by_id(blocks: gr.Blocks, elem_id: str) -> Any:
    """A component built so far, found by its element id (tabs share components this way)."""
    return next((b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == elem_id), None)


def build_demo() -> gr.Blocks:
    """The whole page. Module-level `demo` below, so `gradio app.py` reload mode and tests find it."""
    pipe = MODELS.get(None)
    with gr.Blocks(title="EAR Studio", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as demo:  # hourly: files older than an hour
        gr.Markdown("# EAR Studio\nWatch an image grow from its centre outward: EAR (Expanding "
                    "Autoregressive Representation, [arXiv 2511.15499](https://arxiv.org/abs/2511.15499)) "
                    "predicts image tokens in a spiral, several per step.")
        with gr.Row(equal_height=True):
            model = gr.Dropdown(MODEL_CHOICES, value=MODELS.default, label="Model", filterable=False,
                                info="Hub models load only if already downloaded (or online)", scale=3,
                                min_width=300)  # a line of its own on a phone: names stay whole
            shown_pace = gr.Radio([("Watch", WATCH), ("Fast", FAST)], value=WATCH, label="Pace", scale=1,
                                  elem_id="pace", info="Watch replays a quick run's growth on the canvas")
        loaded = gr.State(MODELS.default)
        # The handlers read the pace from a State, which the API does not see: API clients get
        # their results as before (FAST), the page what its radio says (copied in on load).
        pace = gr.State(FAST)
        for listen in (demo.load, shown_pace.change):
            listen(_same, shown_pace, pace, queue=False, show_progress="hidden", api_visibility="private")
        with gr.Tab("Generate"):
            dependent = _generate_tab(pipe, model, pace)
        with gr.Tab("Extend"):
            ext_model, ext_loaded, ext_dependent = _extend_tab(pace)
        with gr.Tab("Edit"):
            edit_model, edit_loaded, edit_dependent = _edit_tab(pace, _by_id(demo, "gen-final"))
        with gr.Tab("Compare"):
            dependent += _compare_tab(pipe, model, pace)
        with gr.Tab("Model info"):
            dependent += _info_tab(model)
        # `select`, not `input` (Gradio 6's dropdown fires that twice per pick) nor `change` (also
        # fired when a failed load puts the previous model back)
        model.select(select_model, [model, loaded], [model, loaded, *dependent], api_visibility="private",
                     concurrency_id="ear")
        for own, own_loaded, own_dependent, updates, count in (
                (ext_model, ext_loaded, ext_dependent, _extend_updates, EXTEND_DEPENDENT),
                (edit_model, edit_loaded, edit_dependent, _edit_updates, EDIT_DEPENDENT)):
            own.select(functools.partial(select_model, updates=updates, count=count),
                       [own, own_loaded], [own, own_loaded, *own_dependent],
                       api_visibility="private", concurrency_id="ear")
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=QUEUE_SIZE)
    return demo


demo = build_demo()


def launch(**kwargs: Any) -> Any:
    """Start the server; address and port come from GRADIO_SERVER_NAME/PORT unless passed here."""
    if SCHEDULER is not None:
        log_batches()
    if THREADS is not None:
        torch.set_num_threads(THREADS)
    if isinstance(SCHEDULER, ProcessScheduler) and STARTED.pipeline.device.type == "cpu":
        SCHEDULER.start()  # its worker takes these threads, and a second to start
    return demo.launch(css=CSS, theme=THEME, max_file_size=MAX_UPLOAD_BYTES, **kwargs)


if __name__ == "__main__":
    launch()
