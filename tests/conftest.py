"""Shared fixtures: where the official conformance vectors live, a fake offline Hub cache, a tiny
model folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _conformance_dir() -> Path:
    return Path(os.environ.get("EAR_CONFORMANCE_DIR", REPO.parent / "shared" / "conformance"))


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    """The official EAR reference vectors; tests that need them skip when they are absent."""
    path = _conformance_dir()
    if not (path / "README.md").is_file():
        pytest.skip(f"conformance vectors not found at {path} (set EAR_CONFORMANCE_DIR to the "
                    "folder holding spiral.json and the ear_*_tiny files)")
    return path


@pytest.fixture(scope="module")
def torch_single_thread():
    """One intra-op thread for tiny-model tests: on a busy shared 2-core machine OpenMP's second
    thread mostly waits, and small ops took ~30 ms each instead of microseconds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty, offline Hugging Face cache for this test (see helpers.offline_hub_cache)."""
    from tests.helpers import offline_hub_cache

    return offline_hub_cache(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random model folder in our format, shared by a test module."""
    from tests.helpers import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("own") / "tiny")
