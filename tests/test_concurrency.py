"""Six `gradio_client` users at once against `python app.py` on 127.0.0.1: the queue takes them
all, runs them a couple at a time, and every one ends with its final frame and animation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from tests.app_server import REPO, running_app, server_model

CLIENTS = 6
TIMEOUT_S = 150

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("concurrency")
    with running_app(server_model(tmp), tmp / "server.log") as url:
        yield url


def one_user(url: str, i: int, downloads: Path) -> dict[str, Any]:
    """A separate client (its own session): Generate for most, Extend for every third, batch 1,
    every other argument left at the page's defaults."""
    client = Client(url, verbose=False, download_files=str(downloads / f"user{i}"))
    started = time.perf_counter()
    if i % 3 == 2:
        example = handle_file(str(REPO / "assets" / "examples" / "smiley.png"))
        job = client.submit(image=example, seed=i, api_name="/extend")
    else:
        job = client.submit(num_images=1, seed=i, api_name="/generate")
    result = job.result(timeout=TIMEOUT_S)
    return {"frames": len(job.outputs()), "result": result, "seconds": time.perf_counter() - started}


def test_six_clients_at_once_all_finish(server: str, tmp_path: Path) -> None:
    steps = Client(server, verbose=False).predict(api_name="/model_info")[1]["steps"]
    with ThreadPoolExecutor(CLIENTS) as pool:
        users = list(pool.map(lambda i: one_user(server, i, tmp_path), range(CLIENTS)))
    for i, user in enumerate(users):
        canvas, caption, final, animation = user["result"]
        assert caption.endswith("done") and f"/ {steps} ·" in caption, (i, caption)
        assert user["frames"] >= 3, i  # streamed: canvases before the result
        assert Path(canvas).is_file() and Path(animation).stat().st_size > 0
        with Image.open(animation) as gif:
            assert gif.format == "GIF" and gif.n_frames >= 2
        if i % 3 == 2:
            assert Path(final).is_file()
        else:
            assert len(final) == 1
    slowest = max(u["seconds"] for u in users)
    assert slowest < TIMEOUT_S


def test_a_refused_request_raises_the_pages_sentence(server: str) -> None:
    client = Client(server, verbose=False)
    with pytest.raises(AppError, match="Number of images must be between 1 and 8"):
        client.predict(num_images=9, api_name="/generate")
