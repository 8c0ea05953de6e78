"""Start `python app.py` on 127.0.0.1 for the browser and concurrency tests, and stop it again.

The server runs as a subprocess exactly as on a host: the address comes only from
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, so the tests also check that app.py honours them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ear import hub
from tests.helpers import write_tiny_model

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 120


def server_model(tmp: Path) -> str:
    """The bundled small model when it is there (what users get), else a tiny random one."""
    bundled = {s.name: s.status for s in hub.list_models()}.get(hub.DEFAULT_MODEL) == "bundled"
    return hub.DEFAULT_MODEL if bundled else str(write_tiny_model(tmp / "tiny-model"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(model: str, log: Path, env: dict[str, str] | None = None,
                timeout: float = STARTUP_TIMEOUT_S) -> Iterator[str]:
    """Serve app.py with `model` as default (offline unless `env` says otherwise); yields the base
    URL once the server answers. The log file keeps the server's output for failure reports."""
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "EAR_STUDIO_MODEL": model,
           **(env or {})}
    url = f"http://127.0.0.1:{port}/"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(url + "gradio_api/info", timeout=5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"app.py did not answer on {url} within "
                                           f"{timeout:.0f} s:\n{log.read_text()[-3000:]}") from None
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
