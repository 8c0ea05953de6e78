"""A real browser (Debian's Chromium, driven by Playwright) against `python app.py` on 127.0.0.1.

What only a browser can show: that the canvas really changes after every step while the request
is still running (streaming, not one final answer), that the step caption counts to the end,
that the animation downloads as a file, that an uploaded picture is extended, that a bad upload
shows a readable message in the page, and that Stop halts a run and frees the worker.
Screenshots and the downloaded animation land in artifacts/ (gitignored).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from ear.order import SCHEDULES
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


def test_generate_streams_every_step_and_downloads_the_animation(page: Any, steps: int) -> None:
    watch(page, "gen")
    page.click("#gen-run")
    wait_caption(page, "#gen-caption", f"step {steps} / {steps}")
    wait_caption(page, "#gen-caption", "done")
    seen = page.evaluate("window.__seen")
    srcs, captions = seen["srcs"], seen["captions"]
    # Streaming is real: several different canvases were on screen before the last one, and the
    # caption counted through intermediate steps while the run was in progress.
    assert len({src for src, _ in srcs}) >= min(steps, 4), srcs
    shown = step_numbers(captions)
    assert len(set(shown) - {steps}) >= min(steps - 1, 3), captions
    assert shown == sorted(shown) and shown[-1] == steps
    first_frame_ms = srcs[0][1]
    final_image_ms = next(t for text, t in captions if text.startswith(f"step {steps} / {steps}"))
    assert first_frame_ms < final_image_ms <= captions[-1][1]
    for selector in ("#gen-canvas", "#gen-final"):
        assert_image_loaded(page, selector)
    page.screenshot(path=ARTIFACTS / "browser-generate.png", full_page=True)

    with page.expect_download() as download_info:
        page.click("#gen-download")
    path = ARTIFACTS / "browser-growth.gif"
    download_info.value.save_as(path)
    assert path.stat().st_size > 0 and path.read_bytes()[:6] in (b"GIF87a", b"GIF89a")
    with Image.open(path) as gif:
        assert gif.n_frames == steps
    (ARTIFACTS / "browser-timings.json").write_text(json.dumps(
        {"steps": steps, "first_frame_ms": round(first_frame_ms), "final_image_ms": round(final_image_ms),
         "animation_ready_ms": round(captions[-1][1]), "canvases_seen": len(srcs)}, indent=1))


def test_bad_upload_shows_a_readable_message(page: Any, tmp_path: Path) -> None:
    open_tab(page, "Extend")
    fake = tmp_path / "holiday.png"
    fake.write_text("definitely not a picture")
    page.set_input_files("#ext-image input[type=file]", str(fake))
    page.click("#ext-run")
    toast = page.get_by_text(re.compile("not an image format we can read"))
    toast.first.wait_for()
    page.screenshot(path=ARTIFACTS / "browser-bad-upload.png")


def test_extend_grows_a_border_around_the_upload(page: Any, steps: int) -> None:
    open_tab(page, "Extend")
    remove = page.locator("#ext-image button[aria-label='Remove Image']")
    if remove.count():  # the bad upload of the previous test may still be there
        remove.first.click()
    page.set_input_files("#ext-image input[type=file]", str(REPO / "assets" / "examples" / "heart.png"))
    page.wait_for_selector("#ext-image img")
    watch(page, "ext")
    page.click("#ext-run")
    wait_caption(page, "#ext-caption", "done")
    seen = page.evaluate("window.__seen")
    assert len({src for src, _ in seen["srcs"]}) >= 3
    assert f"step {steps} / {steps}" in seen["captions"][-1][0]
    for selector in ("#ext-canvas", "#ext-final"):
        assert_image_loaded(page, selector)
    page.screenshot(path=ARTIFACTS / "browser-extend.png", full_page=True)


def test_stop_halts_a_run_and_frees_the_worker(page: Any, steps: int) -> None:
    open_tab(page, "Compare orders")
    raster = "#cmp-raster-caption"
    page.click("#cmp-run")
    wait_caption(page, raster, "step ")
    page.click("#cmp-stop")
    time.sleep(1.0)
    stopped = page.inner_text(raster)
    time.sleep(1.5)
    assert page.inner_text(raster) == stopped and "done" not in stopped
    page.screenshot(path=ARTIFACTS / "browser-compare-stopped.png", full_page=True)
    page.click("#cmp-run")  # the worker is free again: a new run goes all the way
    for name in SCHEDULES:
        wait_caption(page, f"#cmp-{name}-caption", "done")
    assert "off-distribution" in page.inner_text(raster)
    open_tab(page, "Generate")
    watch(page, "gen")
    page.click("#gen-run")
    page.wait_for_function("""() => {
      const texts = window.__seen.captions.map(([text]) => text);
      const start = texts.findIndex((text) => text.startsWith('step 1 /'));
      return start >= 0 && texts.slice(start).some((text) => text.endsWith('done'));
    }""")
    assert f"step {steps} / {steps}" in page.inner_text("#gen-caption")


def test_random_seed_and_a_model_that_cannot_load(page: Any) -> None:
    open_tab(page, "Generate")
    seed = page.get_by_label("Seed").first
    seed.fill("0")
    page.get_by_role("button", name="Random").first.click()
    page.wait_for_function("(el) => el.value !== '0'", arg=seed.element_handle())
    model = page.get_by_label("Model")
    before = model.input_value()
    model.click()
    page.get_by_role("option", name=re.compile("EAR-adaLN-B")).click()  # offline: HF_HUB_OFFLINE=1
    page.get_by_text(re.compile("EAR-adaLN-B' cannot be loaded")).first.wait_for()
    page.wait_for_function("([el, value]) => el.value === value", arg=[model.element_handle(), before])
    page.screenshot(path=ARTIFACTS / "browser-model-unavailable.png")
