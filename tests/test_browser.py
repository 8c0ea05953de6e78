"""A real browser (Debian's Chromium, driven by Playwright) against `python app.py` on 127.0.0.1.

What only a browser can show: that the canvas really changes after every step while the request
is still running (streaming, not one final answer), that the step caption counts to the end,
that the animation downloads as a file, that an uploaded picture is extended, that a bad upload
shows a readable message in the page, and that Stop halts a run and frees the worker.
Screenshots and the downloaded animation land in artifacts/ (gitignored).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from ear import hub
from ear.growth import PLAYBACK_STEP_S
from ear.order import SCHEDULES, make_schedule
from ear.pipeline import EARPipeline
from tests.app_server import REPO, running_app, server_model

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "artifacts"
WAIT_MS = 90_000

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Records every distinct image src and caption text of the watched elements, with the time (ms
# since the watch began) it first appeared, so the test can see frames that came and went.
WATCH_JS = """([canvas, caption]) => {
  const seen = {srcs: [], captions: [], start: performance.now()};
  const record = () => {
    const img = document.querySelector(canvas + ' img');
    const t = performance.now() - seen.start;
    const push = (list, value) => {
      if (value && (list.length === 0 || list.at(-1)[0] !== value)) list.push([value, t]);
    };
    push(seen.srcs, img && img.src);
    push(seen.captions, document.querySelector(caption).innerText.trim());
  };
  for (const sel of [canvas, caption]) {
    new MutationObserver(record).observe(document.querySelector(sel),
      {subtree: true, childList: true, characterData: true, attributes: true, attributeFilter: ['src']});
  }
  window.__seen = seen;
}"""


def _require_browser() -> None:
    why = None
    if not CHROMIUM.is_file():
        why = f"Debian chromium is not installed at {CHROMIUM} (apt-get install -y chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            why = "the playwright Python package is not installed (pip install -r requirements.txt)"
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and the browser test cannot run: {why}")
    pytest.skip(f"browser test skipped: {why}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    _require_browser()
    tmp = tmp_path_factory.mktemp("browser")
    model = server_model(tmp)
    with running_app(model, tmp / "server.log") as url:
        yield url, model


@pytest.fixture(scope="module")
def steps(server: tuple[str, str]) -> int:
    return EARPipeline.from_pretrained(server[1]).model.schedule.num_steps


@pytest.fixture(scope="module")
def page(server: tuple[str, str]) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
        page.set_default_timeout(WAIT_MS)
        page.goto(server[0], wait_until="domcontentloaded")
        page.wait_for_selector("#gen-run")
        yield page
        browser.close()


def watch(page: Any, prefix: str) -> None:
    page.evaluate(WATCH_JS, [f"#{prefix}-canvas", f"#{prefix}-caption"])


def growth_seen(seen: dict[str, Any]) -> bool:
    """Whether the canvas showed the growth step by step: live canvases, or (where the browser drew
    only the last of a quick run's updates, as a loaded machine can) a playback with several steps."""
    srcs = [src for src, _ in seen["srcs"]]
    if len(set(srcs)) >= 2:
        return True
    if not srcs or "-playback" not in srcs[-1]:
        return False
    with urllib.request.urlopen(srcs[-1]) as reply, Image.open(io.BytesIO(reply.read())) as gif:
        return gif.n_frames >= 2


def assert_growth_seen(seen: dict[str, Any]) -> None:
    assert growth_seen(seen), seen


def wait_caption(page: Any, selector: str, text: str) -> None:
    page.wait_for_function("([sel, text]) => document.querySelector(sel).innerText.includes(text)",
                           arg=[selector, text])


def assert_image_loaded(page: Any, selector: str) -> None:
    """The <img> under `selector` finished loading a real picture (not a broken or partial file)."""
    page.wait_for_function("(sel) => { const img = document.querySelector(sel + ' img');"
                           " return img && img.complete && img.naturalWidth > 0; }", arg=selector)


def open_tab(page: Any, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def step_numbers(captions: list[list[Any]]) -> list[int]:
    return [int(m.group(1)) for text, _ in captions if (m := re.search(r"step (\d+) / \d+", text))]


def test_page_opens_on_the_models_best_with_nothing_to_download_yet(page: Any,
                                                                    server: tuple[str, str]) -> None:
    pipe = EARPipeline.from_pretrained(server[1])
    assert page.get_by_label("Class").first.input_value() == pipe.default_class
    assert page.get_by_label("Number of images").first.input_value() == "4"
    style = page.locator("#gen-style")  # shown only for a model with styles (Twemoji, Noto)
    assert style.is_visible() == bool(pipe.styles)
    if pipe.styles:
        assert page.get_by_label("Style").first.input_value() == "Any"
    download = page.locator("#gen-download")
    assert download.is_disabled()  # item 5: nothing to download before a run
    assert page.locator("#gen-stop").is_disabled() and page.locator("#gen-replay").is_disabled()
    assert page.get_by_label("Watch").is_checked()  # the pace a visitor can follow
    page.screenshot(path=ARTIFACTS / "browser-open.png", full_page=True)


def set_images(page: Any, count: int) -> None:
    box = page.locator("input[type=number]").first  # the slider's number box
    box.fill(str(count))
    box.press("Enter")


def test_generate_streams_its_growth_and_downloads_every_step(page: Any, steps: int) -> None:
    set_images(page, 1)
    watch(page, "gen")
    page.click("#gen-run")
    wait_caption(page, "#gen-caption", "done")
    seen = page.evaluate("window.__seen")
    srcs, captions = seen["srcs"], seen["captions"]
    # Streaming is real: canvases changed while the run went on and the caption counted up.
    assert len({src for src, _ in srcs}) >= 2, srcs
    shown = step_numbers(captions)
    assert shown == sorted(shown) and shown[-1] == steps and len(shown) >= 2, captions
    first_frame_ms = srcs[0][1]
    final_image_ms = next(t for text, t in captions if text.startswith(f"step {steps} / {steps}"))
    assert first_frame_ms < final_image_ms <= captions[-1][1]
    for selector in ("#gen-canvas", "#gen-final"):
        assert_image_loaded(page, selector)
    # Item 7: one image leaves no tall empty box under its thumbnail.
    gallery, thumb = (page.locator(sel).first.bounding_box() for sel in ("#gen-final", "#gen-final img"))
    assert gallery["height"] - thumb["height"] < 80, (gallery, thumb)
    page.screenshot(path=ARTIFACTS / "browser-generate.png", full_page=True)

    with page.expect_download() as download_info:
        page.click("#gen-download")
    path = ARTIFACTS / "browser-growth.gif"
    download_info.value.save_as(path)
    assert path.stat().st_size > 0 and path.read_bytes()[:6] in (b"GIF87a", b"GIF89a")
    with Image.open(path) as gif:
        assert gif.n_frames == steps  # every step, however few canvases were streamed
    (ARTIFACTS / "browser-timings.json").write_text(json.dumps(
        {"steps": steps, "first_frame_ms": round(first_frame_ms), "final_image_ms": round(final_image_ms),
         "animation_ready_ms": round(captions[-1][1]), "canvases_seen": len(srcs)}, indent=1))


def stages(page: Any, selector: str, seconds: float) -> tuple[int, float, float]:
    """Element screenshots back to back for `seconds`: how many distinct stages were on screen
    (a screenshot shrunk to 48 x 48 grey, hashed), the mean time between screenshots and when
    (seconds from the start) the last new stage was seen."""
    seen, shots, start, last_new = set(), 0, time.perf_counter(), 0.0
    while time.perf_counter() - start < seconds:
        png = page.locator(selector).screenshot()
        stage = hashlib.sha1(Image.open(io.BytesIO(png)).convert("L").resize((48, 48)).tobytes()).digest()
        if stage not in seen:
            seen.add(stage)
            last_new = time.perf_counter() - start
        shots += 1
    return len(seen), (time.perf_counter() - start) / shots, last_new


def assert_watched(distinct: int, interval: float, steps: int) -> None:
    """At least 15 stages of a 31-step growth, when screenshots come about every 100 ms as here;
    on a machine too busy for that, at least every other screenshot a new stage."""
    playback = steps * PLAYBACK_STEP_S
    enough = min(15, steps) if interval <= 0.13 else min(15, steps, int(0.5 * playback / interval))
    assert distinct >= enough, (distinct, interval)


def gif_of(page: Any, selector: str) -> Image.Image:
    """The animated image an <img> under `selector` shows, fetched as the page fetched it."""
    src = page.locator(f"{selector} img").first.get_attribute("src")
    assert src and src.split("?")[0].endswith(".gif"), src
    return Image.open(io.BytesIO(page.request.get(src).body()))


def played_ms(gif: Image.Image) -> int:
    total = 0
    for i in range(gif.n_frames):
        gif.seek(i)
        total += gif.info["duration"]
    return total


@pytest.mark.parametrize("images", [1, 4])
def test_generate_is_seen_growing_at_a_human_pace(page: Any, steps: int, images: int) -> None:
    open_tab(page, "Generate")
    set_images(page, images)
    page.click("#gen-run")
    distinct, interval, ended = stages(page, "#gen-canvas", 5.0)
    assert_watched(distinct, interval, steps)
    assert ended < 4 + 2 * interval  # from the first cell to the finished picture within 4 s of the click
    wait_caption(page, "#gen-caption", "done")
    gif = gif_of(page, "#gen-canvas")
    assert gif.n_frames == steps and "loop" not in gif.info  # played once, the last frame held
    assert page.locator("#gen-final img").count() == images and page.locator("#gen-download").is_enabled()
    page.locator("#gen-canvas").screenshot(path=ARTIFACTS / f"browser-playback-{images}.png")
    (ARTIFACTS / f"browser-playback-{images}.json").write_text(json.dumps(
        {"distinct_stages": distinct, "screenshot_interval_s": round(interval, 3),
         "last_stage_s": round(ended, 2)}))
    if images == 4:  # Replay plays it again, from a fresh URL
        before = page.locator("#gen-canvas img").get_attribute("src")
        page.click("#gen-replay")
        page.wait_for_function("([sel, src]) => document.querySelector(sel + ' img').src !== src",
                               arg=["#gen-canvas", before])
        distinct, interval, _ = stages(page, "#gen-canvas", 2.8)
        assert_watched(distinct, interval, steps)


def test_stop_says_where_the_run_stopped(page: Any, steps: int) -> None:
    open_tab(page, "Generate")
    set_images(page, 8)
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    # (captions this run showed: the page still shows the last run's until the first update)
    ended = "window.__seen.captions.some(([text]) => /stopped|done/.test(text))"
    stoppable = ("window.__seen.captions.length > 0 && !document.querySelector('#gen-stop').disabled"
                 " && /^step \\d+ \\//.test(window.__seen.captions.at(-1)[0])")
    for _attempt in range(5):  # a fast machine may draw every step before Stop lands: try again
        watch(page, "gen")
        page.click("#gen-run")
        page.wait_for_function(f"() => ({stoppable}) || ({ended})", polling=10)
        with contextlib.suppress(PlaywrightTimeout):  # (the run ended first: Stop greyed out again)
            page.click("#gen-stop", timeout=2_000)
        page.wait_for_function(f"() => {ended}", polling=50, timeout=20_000)
        page.wait_for_function("() => document.querySelector('#gen-stop').disabled")  # the run has ended
        caption = page.inner_text("#gen-caption")
        if caption.startswith("stopped at step"):  # (not "done", nor stopped while the animation was written)
            break
    assert re.match(rf"stopped at step \d+ / {steps} · \d+ / \d+ tokens$", caption), \
        (caption, page.evaluate("window.__seen.captions"))
    time.sleep(1.0)
    assert page.inner_text("#gen-caption") == caption  # nothing streams after a Stop
    # what it got to: decoded on the canvas (played back when it went by too fast), downloadable
    assert_image_loaded(page, "#gen-canvas")
    assert page.locator("#gen-download").is_enabled() and page.locator("#gen-stop").is_disabled()
    assert "Drop Media Here" not in page.inner_text("#gen-final")  # the empty results are no upload box
    assert "Error" not in page.inner_text("#gen-canvas")
    page.screenshot(path=ARTIFACTS / "browser-generate-stopped.png", full_page=True)
    set_images(page, 4)


def test_bad_upload_is_refused_as_it_arrives(page: Any, tmp_path: Path) -> None:
    open_tab(page, "Extend")
    fake = tmp_path / "holiday.png"
    fake.write_text("definitely not a picture")
    page.set_input_files("#ext-image input[type=file]", str(fake))
    wait_caption(page, "#ext-upload-note", "not an image format we can read")  # before Extend is pressed
    assert page.locator("#ext-image img").count() == 0  # no broken picture left behind
    page.screenshot(path=ARTIFACTS / "browser-bad-upload.png")


def test_extend_grows_a_border_and_a_later_error_clears_it(page: Any, steps: int) -> None:
    open_tab(page, "Extend")
    page.set_input_files("#ext-image input[type=file]", str(REPO / "assets" / "examples" / "heart.png"))
    page.wait_for_selector("#ext-image img")
    page.wait_for_function("() => document.querySelector('#ext-upload-note').innerText.trim() === ''")
    watch(page, "ext")
    page.click("#ext-run")
    wait_caption(page, "#ext-caption", "done")
    seen = page.evaluate("window.__seen")
    assert_growth_seen(seen)
    assert f"step {steps} / {steps}" in seen["captions"][-1][0]
    for selector in ("#ext-canvas", "#ext-final"):
        assert_image_loaded(page, selector)
    gif = gif_of(page, "#ext-canvas")  # the border's growth, played back once
    assert 2 < gif.n_frames < steps and "loop" not in gif.info
    page.screenshot(path=ARTIFACTS / "browser-extend.png", full_page=True)
    # Item 2: an error after that success replaces it, said once, in the caption.
    page.locator("#ext-image button[aria-label='Remove Image']").first.click()
    page.click("#ext-run")
    wait_caption(page, "#ext-caption", "Upload an image first")
    time.sleep(0.5)
    assert page.get_by_text(re.compile("Upload an image first")).count() == 1  # no toast, no copies
    assert page.locator("#ext-final img").count() == 0 and page.locator("#ext-canvas img").count() == 0
    assert "Error" not in page.inner_text("#ext-caption") + page.inner_text("#ext-final")
    assert page.locator("#ext-download").is_disabled()
    page.wait_for_function("() => document.querySelector('#ext-stop').disabled")  # the run has ended
    assert "Error" not in page.inner_text("#ext-canvas")  # no badge over the canvas either
    page.screenshot(path=ARTIFACTS / "browser-error-after-success.png", full_page=True)
    # A cached example's result can be downloaded like any other.
    page.locator("#ext-examples tbody tr").first.click()
    page.wait_for_function("() => document.querySelector('#ext-caption').innerText.includes('done')")
    page.wait_for_function("() => !document.querySelector('#ext-download').disabled")


def test_compare_shows_every_arm_as_it_goes_and_stop_frees_the_worker(page: Any, steps: int,
                                                                      server: tuple[str, str]) -> None:
    open_tab(page, "Compare")
    raster = "#cmp-raster-caption"
    page.click("#cmp-run")
    wait_caption(page, raster, "step ")
    page.click("#cmp-stop")
    time.sleep(1.5)
    stopped = page.inner_text(raster)
    assert "done" in stopped or stopped.startswith("raster · off-distribution"), stopped
    pipe = EARPipeline.from_pretrained(server[1])
    orders = {name: make_schedule(name, pipe.grid).num_steps for name in SCHEDULES}
    running = {**orders, **({"activated": steps} if pipe.has_activation else {})}
    page.click("#cmp-run")  # the worker is free again: a new run goes all the way
    page.evaluate(COMPARE_WATCH_JS, list(running))
    for name in running:
        wait_caption(page, f"#cmp-{name}-caption", "done")
    done = page.evaluate("window.__done")
    progress = page.evaluate("window.__progress")
    # Item 9: raster's 256 steps hold nobody back, and every arm showed progress on the way.
    for name in running:
        if name != "raster":
            assert done[name] <= done["raster"], done
        assert progress[name] >= 2, progress
    assert "off-distribution" in page.inner_text(raster)
    activated = page.inner_text("#cmp-activated-caption")
    assert ("% active" in activated) if pipe.has_activation else activated.endswith("dynamic activation")
    # Then every arm plays side by side at one pace per step; raster's long tail goes faster.
    page.wait_for_function("() => document.querySelector('#cmp-stop').disabled")  # the run has ended
    for key in ("radar-refined", "radar-plain"):  # RadAR's rings, where the server has a RadAR model
        text = page.inner_text(f"#cmp-{key}-caption")
        if "done" in text:
            running[key] = EARPipeline.from_pretrained(hub.RADAR_MODEL).model.schedule.num_steps  # its rings
        else:  # one line saying why not, no picture
            assert "\n" not in text.strip() and page.locator(f"#cmp-{key}-canvas img").count() == 0, text
    together = sorted(running.values())[-2]
    for name, count in running.items():
        gif = gif_of(page, f"#cmp-{name}-canvas")
        assert "loop" not in gif.info and played_ms(gif) < 10_000, name
        assert gif.n_frames == count if count <= together else together < gif.n_frames < count
    time.sleep(1.0)
    page.screenshot(path=ARTIFACTS / "browser-compare.png", full_page=True)


# When each arm's caption first said "done", and how many different captions it showed.
COMPARE_WATCH_JS = """(names) => {
  window.__done = {}; window.__progress = {};
  const start = performance.now();
  for (const name of names) {
    const el = document.querySelector(`#cmp-${name}-caption`);
    let last = el.innerText;
    window.__progress[name] = 0;
    new MutationObserver(() => {
      const text = el.innerText;
      if (text === last) return;
      last = text;
      window.__progress[name] += 1;
      if (text.includes('done') && !(name in window.__done)) window.__done[name] = performance.now() - start;
    }).observe(el, {subtree: true, childList: true, characterData: true});
  }
}"""


def test_a_model_that_cannot_load_is_explained_to_a_visitor(page: Any) -> None:
    open_tab(page, "Generate")
    seed = page.get_by_label("Seed").first
    seed.fill("0")
    page.get_by_role("button", name="Random").first.click()
    page.wait_for_function("(el) => el.value !== '0'", arg=seed.element_handle())
    model = page.get_by_label("Model", exact=True)
    before = model.input_value()
    model.click()
    page.get_by_role("option", name=re.compile("EAR-adaLN-B")).click()  # offline: HF_HUB_OFFLINE=1
    toast = page.get_by_text(re.compile("EAR-adaLN-B' is not downloaded on this server"))
    toast.first.wait_for()
    text = toast.first.inner_text()
    assert "python -m ear download EAR-adaLN-B" in text
    assert "HF_HUB_OFFLINE" not in text and "--model" not in text  # the command-line form is in the log
    page.wait_for_function("([el, value]) => el.value === value", arg=[model.element_handle(), before])
    page.screenshot(path=ARTIFACTS / "browser-model-unavailable.png")


def test_model_info_is_a_readable_table_without_server_paths(page: Any, server: tuple[str, str]) -> None:
    open_tab(page, "Model info")
    table = page.locator("#model-info table")
    headers = table.locator("th").all_inner_texts()
    assert headers[0] == "Model" and all(h.strip() for h in headers), headers  # no empty header row
    lines = table.locator("td:first-child").evaluate_all(
        "(cells) => cells.map((cell) => { const range = document.createRange();"
        " range.selectNodeContents(cell); return [cell.innerText, range.getClientRects().length]; })")
    assert lines and all(count == 1 for _, count in lines), lines  # no label broken ("Paramet ers")
    text = table.inner_text()
    assert str(REPO) not in text and "/tmp" not in text
    if server[1] == "ear-emoji":
        assert "bundled with the app" in text
    page.screenshot(path=ARTIFACTS / "browser-model-info.png")


def test_generate_offers_what_the_model_can_speed_up(page: Any, server: tuple[str, str]) -> None:
    """Refine shows only for a model with the correction head, dynamic activation only for one
    that ships routers; turned on, the run's caption says how much of the FFN ran."""
    pipe = EARPipeline.from_pretrained(server[1])
    open_tab(page, "Generate")
    assert page.locator("#gen-refine").is_visible() == pipe.can_refine
    activation = page.locator("#gen-activation")
    assert activation.is_visible() == pipe.has_activation
    if not pipe.has_activation:
        return
    tau = page.locator("#gen-activation-tau input[type=number]")
    assert float(tau.input_value()) == pipe.info()["activation"]["tau"]
    assert tau.is_disabled()  # tau moves nothing until activation is on
    activation.locator("input[type=checkbox]").check()
    page.wait_for_function("() => !document.querySelector('#gen-activation-tau input[type=number]').disabled")
    tau.fill("0.5")
    tau.press("Enter")
    page.click("#gen-run")
    wait_caption(page, "#gen-caption", "done")
    assert re.search(r"FFN \d+ % active", page.locator("#gen-caption").inner_text())
    page.screenshot(path=ARTIFACTS / "browser-activation.png", full_page=True)
    activation.locator("input[type=checkbox]").uncheck()
