"""ear.startup without a GPU: the machine is a `Hardware` value, the Hub a fake cache (offline,
or "online" with DNS faked), models tiny; every load is forced onto the CPU."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from ear import hub, startup
from ear.app_support import compare_steps
from ear.pipeline import EARPipeline
from ear.startup import Hardware, HubAccess
from tests.helpers import add_to_hub_cache

pytestmark = pytest.mark.usefixtures("torch_single_thread")

GB = 10**9
CPU_LOAD = partial(EARPipeline.from_pretrained, device="cpu")
NO_GPU = Hardware(cuda=False)
A10G = Hardware(cuda=True, gpu_name="NVIDIA A10G", gpu_bytes=24 * GB)
ZERO = Hardware(cuda=True, gpu_name="NVIDIA H200 MIG 3g.71gb", gpu_bytes=74_625_056_768, zero_gpu=True)


@pytest.fixture
def tiny_repo(hub_cache: Path, tiny_dir: Path) -> str:
    """A model in our format, in the fake Hub cache as a repo."""
    add_to_hub_cache(hub_cache, "someone/tiny-ear", {f: tiny_dir / f for f in hub.OWN_FILES.values()})
    return "someone/tiny-ear"


def _online(monkeypatch) -> None:
    """The Hub 'reachable': not offline, and its host name resolves (nothing is downloaded)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    address = [(socket.AF_INET, 0, 0, "", ("10.0.0.1", 443))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: address)


def _released_files(hub_cache: Path, tmp_path: Path, size: str) -> None:
    """Placeholder files where the Hub cache keeps EAR-adaLN-`size` and its tokenizer: choosing
    only looks at what is cached, it never reads them."""
    blob = tmp_path / f"placeholder-{size}.pt"
    blob.write_bytes(size.encode())
    add_to_hub_cache(hub_cache, "FoodBamboo/EAR", {f"EAR-adaLN-{size}.pt": blob})
    add_to_hub_cache(hub_cache, "qiuk6/RobustTok", {"XQGAN-8192.pt": blob})


def _never() -> HubAccess:
    raise AssertionError("the Hub should not be consulted here")


# ---- which model ----------------------------------------------------------------------------------

def test_no_gpu_opens_on_the_bundled_model_without_asking_the_hub() -> None:
    choice = startup.choose(NO_GPU, _never)
    assert choice.name == hub.DEFAULT_MODEL and "bundled" in choice.reason


@pytest.mark.parametrize(("gigabytes", "expected"), [
    (2, hub.DEFAULT_MODEL), (4, hub.DEFAULT_MODEL), (5, "EAR-adaLN-B"), (6, "EAR-adaLN-B"),
    (8, "EAR-adaLN-L"), (10, "EAR-adaLN-L"), (12, "EAR-adaLN-XL"), (16, "EAR-adaLN-XL"),
    (24, "EAR-adaLN-XL"), (80, "EAR-adaLN-XL")])
def test_largest_released_model_that_fits_the_gpu(gigabytes: float, expected: str) -> None:
    hardware = Hardware(cuda=True, gpu_name="GPU", gpu_bytes=int(gigabytes * GB))
    choice = startup.choose(hardware, lambda: HubAccess(online=True))
    assert choice.name == expected
    if expected == hub.DEFAULT_MODEL:
        assert "too small for EAR-adaLN-B" in choice.reason


def test_memory_need_is_weights_tokenizer_caches_and_reserve() -> None:
    """The thresholds above come from this sum: weights at bfloat16, the tokenizer at float32,
    and the KV caches the decode runner pools (per order, power-of-two bucket, guided or not)."""
    for size, params in (("B", 140_828_928), ("L", 477_277_184), ("XL", 1_107_900_160)):
        fixed = startup.gpu_bytes_needed(size, images=0)
        assert fixed == params * 2 + 172_238_880 * 4 + startup.RESERVED_BYTES
    # 8 images: buckets 1+2+4+8 = 15 rows unguided, 30 guided, and 3 other orders x 2 rows,
    # for each of the two requests in flight
    assert startup.kv_cache_rows(8) == 2 * (15 + 30 + 6) == 102
    assert startup.kv_cache_rows(5) == startup.kv_cache_rows(8) > startup.kv_cache_rows(4)
    needs = [startup.gpu_bytes_needed(s) for s in ("B", "L", "XL")]
    assert needs == sorted(needs) and needs[-1] < 12 * GB


def test_offline_empty_cache_keeps_the_bundled_model(hub_cache: Path) -> None:
    access = HubAccess.detect()
    assert access == HubAccess(online=False, cached=frozenset())
    choice = startup.choose(A10G, HubAccess.detect)
    assert choice.name == hub.DEFAULT_MODEL and "cannot be reached" in choice.reason


def test_offline_takes_the_largest_cached_model(hub_cache: Path, tmp_path: Path) -> None:
    _released_files(hub_cache, tmp_path, "L")
    assert HubAccess.detect().cached == {"EAR-adaLN-L"}
    choice = startup.choose(A10G, HubAccess.detect)
    assert choice.name == "EAR-adaLN-L" and choice.reason.endswith("cached")


def test_reachable_hub_takes_the_largest_that_fits(hub_cache: Path, tmp_path: Path, monkeypatch) -> None:
    _released_files(hub_cache, tmp_path, "B")
    _online(monkeypatch)
    assert HubAccess.detect().online
    assert startup.choose(A10G, HubAccess.detect).name == "EAR-adaLN-XL"
    eight = Hardware(cuda=True, gpu_bytes=8 * GB)
    assert startup.choose(eight, HubAccess.detect).name == "EAR-adaLN-L"


def test_override_wins_everywhere() -> None:
    for hardware in (NO_GPU, A10G, ZERO):
        choice = startup.choose(hardware, _never, "me/my-ear")
        assert choice == startup.Choice("me/my-ear", "EAR_STUDIO_MODEL")


def test_hardware_detect(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Hardware.detect({}) == NO_GPU
    props = types.SimpleNamespace(name="NVIDIA L4", total_memory=23_034_593_280)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    found = Hardware.detect({"SPACES_ZERO_GPU": "true"})
    assert (found.cuda, found.gpu_name, found.gpu_bytes) == (True, "NVIDIA L4", 23_034_593_280)
    assert found.zero_gpu == (startup.importlib.util.find_spec("spaces") is not None)
    assert str(found).startswith("NVIDIA L4, 23.0 GB")


# ---- getting it ready -----------------------------------------------------------------------------

def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ear.startup"]


def test_dedicated_gpu_downloads_loads_and_warms_up(tiny_repo: str, caplog) -> None:
    caplog.set_level(logging.INFO, "ear.startup")
    started = startup.start(A10G, _never, env={"EAR_STUDIO_MODEL": tiny_repo}, load=CPU_LOAD)
    assert started.name == tiny_repo and started.reason == "EAR_STUDIO_MODEL"
    assert started.pipeline.info()["source"] == f"hf://{tiny_repo}"
    lines = _messages(caplog)
    phases = ["files ready", "loaded on cpu", "warm-up generation", "ready on"]
    found = [next(i for i, line in enumerate(lines) if phase in line) for phase in phases]
    assert found == sorted(found) and lines[-1].startswith(f"start-up: ready on {tiny_repo} after")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_cpu_and_zero_gpu_skip_the_warm_up(tiny_dir: Path, caplog) -> None:
    caplog.set_level(logging.INFO, "ear.startup")
    for hardware in (NO_GPU, ZERO):
        started = startup.start(hardware, _never, env={"EAR_STUDIO_MODEL": str(tiny_dir)}, load=CPU_LOAD)
        assert started.name == str(tiny_dir)
    warm = startup.start(A10G, _never, env={"EAR_STUDIO_MODEL": str(tiny_dir), "EAR_STUDIO_WARMUP": "0"},
                         load=CPU_LOAD)
    assert warm.name == str(tiny_dir)
    assert not any("warm-up" in m for m in _messages(caplog))


def test_zero_gpu_downloads_and_loads_at_import(tiny_repo: str, caplog) -> None:
    caplog.set_level(logging.INFO, "ear.startup")
    started = startup.start(ZERO, _never, env={"EAR_STUDIO_MODEL": tiny_repo}, load=CPU_LOAD)
    assert started.name == tiny_repo
    assert any("files ready" in m for m in _messages(caplog))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "ear.startup" and r.levelno >= logging.WARNING]


def test_download_failure_falls_back_with_one_line(hub_cache: Path, caplog) -> None:
    """The Hub looked reachable, but the files never came: the page still opens."""
    started = startup.start(A10G, lambda: HubAccess(online=True), env={}, load=CPU_LOAD)
    assert started.name == hub.DEFAULT_MODEL and started.reason.startswith("fallback: EAR-adaLN-XL")
    [line] = _warnings(caplog)
    assert line.startswith("start-up: EAR-adaLN-XL could not be used (EAR-adaLN-XL is not downloaded yet")
    assert line.endswith("the page opens on ear-emoji instead.")
    assert len(started.pipeline.generate(0, seed=0, display_size=64)) == 1


def test_load_error_of_any_kind_falls_back(tiny_dir: Path, caplog) -> None:
    def out_of_memory(name: str) -> EARPipeline:
        if name != hub.DEFAULT_MODEL:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return CPU_LOAD(name)

    started = startup.start(A10G, _never, env={"EAR_STUDIO_MODEL": str(tiny_dir)}, load=out_of_memory)
    assert started.name == hub.DEFAULT_MODEL
    [line] = _warnings(caplog)
    assert "(OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB)" in line


def test_flat_warm_up_sample_falls_back(tiny_dir: Path, caplog) -> None:
    """A decoder that paints every picture one colour (broken weights) is caught at start-up."""

    def broken_decoder(name: str) -> EARPipeline:
        pipe = CPU_LOAD(name)
        if name != hub.DEFAULT_MODEL:
            with torch.no_grad():
                pipe.tokenizer.decoder.net[-1].weight.zero_()
        return pipe

    started = startup.start(A10G, _never, env={"EAR_STUDIO_MODEL": str(tiny_dir)}, load=broken_decoder)
    assert started.name == hub.DEFAULT_MODEL
    [line] = _warnings(caplog)
    assert f"{tiny_dir} could not be used (its warm-up sample is one flat colour)" in line


def test_a_broken_bundled_model_is_not_hidden() -> None:
    def broken(name: str) -> EARPipeline:
        raise ValueError("The model folder 'assets/ear-emoji' lacks ear.safetensors")

    with pytest.raises(ValueError, match=r"lacks ear\.safetensors"):
        startup.start(NO_GPU, _never, env={}, load=broken)


def test_check_sample() -> None:
    rng = np.random.default_rng(0)
    startup.check_sample(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    for flat in (np.full((8, 8, 3), 128, np.uint8), np.full((8, 8, 3), np.nan)):
        with pytest.raises(ValueError, match="one flat colour"):
            startup.check_sample(flat)


def test_download_progress_is_logged_every_tenth(caplog) -> None:
    caplog.set_level(logging.INFO, "ear.startup")
    with startup.LoggedProgress(total=3 * GB, desc="EAR-adaLN-XL.pt", unit="B") as bar:
        for _ in range(30):
            bar.update(GB // 10)
    lines = _messages(caplog)
    assert len(lines) == 11 and lines[0] == "download EAR-adaLN-XL.pt: 0.10 / 3.00 GB (0 %)"
    assert lines[1].endswith("0.30 / 3.00 GB (10 %)") and lines[-1].endswith("(100 %)")


# ---- ZeroGPU durations ----------------------------------------------------------------------------

def generate(class_name, num_images, seed, model, animation_format="gif"):  # the app's argument names
    """Stands in for app.generate."""


def extend(image, keep, class_name, zoom_rounds, seed, model):
    """Stands in for app.extend."""


def compare(class_name, seed, model):
    """Stands in for app.compare."""


def test_duration_follows_model_size_images_and_rounds(tiny_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("EAR_STUDIO_MODEL", str(tiny_dir))  # the one folder the page offers
    gen, ext = startup.request_duration(generate), startup.request_duration(extend)
    xl = [gen("x", n, 0, "EAR-adaLN-XL") for n in (1, 4, 8)]
    assert xl == sorted(xl) and len(set(xl)) == 3
    by_size = [gen("x", 8, 0, f"EAR-adaLN-{s}") for s in ("B", "L", "XL")]
    assert by_size == sorted(by_size) and by_size[0] < by_size[-1]
    assert gen("x", 1, 0, str(tiny_dir)) <= gen("x", 1, 0, "EAR-adaLN-B")
    assert gen("x", 1, 0, str(tiny_dir.parent)) == gen("x", 1, 0, "EAR-adaLN-XL")  # not offered
    zoom = [ext(None, 8, None, rounds, 0, "EAR-adaLN-L") for rounds in (0, 1, 3, 6)]
    assert zoom[0] == zoom[1] < zoom[2] < zoom[3]
    everything = startup.request_duration(compare, compare_steps)("x", 0, "EAR-adaLN-XL")
    assert everything > gen("x", 1, 0, "EAR-adaLN-XL")  # the raster order alone takes 256 steps
    assert all(startup.REQUEST_S < s <= startup.MAX_GPU_S for s in [*xl, *by_size, *zoom, everything])


def test_duration_worked_example() -> None:
    """XL, one image, 31 steps: 10 s + 31 x (0.02 + 0.03 x 1.108 + 0.03) s = 12.6 s -> 13 s."""
    assert startup.request_duration(generate)("x", 1, 0, "EAR-adaLN-XL") == 13
    assert startup.gpu_seconds(10**12, 10_000) == startup.MAX_GPU_S
    assert startup.gpu_seconds(1, 0) == startup.REQUEST_S


def test_duration_never_fails_on_what_a_client_sends() -> None:
    gen = startup.request_duration(generate)
    largest = gen("x", 8, 0, "EAR-adaLN-XL")
    assert gen("x", "lots", 0, "no/such-model") == gen("x", 1, 0, "EAR-adaLN-XL")
    assert gen("x", 10**9, 0, "EAR-adaLN-XL") == largest
    assert gen(num_images=8, model="EAR-adaLN-XL") == largest  # keywords, partial calls
    assert gen(1, 2, 3, 4, 5, 6, 7) == gen("x", 1, 0, "EAR-adaLN-XL")  # too many: budget as unknown


def test_zero_gpu_decorator() -> None:
    seen = {}

    def fake_gpu(task, duration):
        seen[task.__name__] = duration
        return task

    gpu = startup.zero_gpu(types.SimpleNamespace(GPU=fake_gpu))
    assert gpu(generate) is generate and gpu(total_steps=compare_steps)(compare) is compare
    assert seen["generate"]("x", 8, 0, "EAR-adaLN-XL") > seen["generate"]("x", 1, 0, "EAR-adaLN-XL")
    assert seen["compare"]("x", 0, "EAR-adaLN-XL") > seen["generate"]("x", 1, 0, "EAR-adaLN-XL")
    plain = startup.zero_gpu(None)
    assert plain(generate) is generate and plain(total_steps=compare_steps)(compare) is compare


def test_picker_labels_the_start_up_model(tiny_dir: Path) -> None:
    from ear.app_support import model_choices

    assert model_choices("me/my-ear")[0] == ("my-ear · Hub", "me/my-ear")
    assert model_choices(str(tiny_dir))[0] == ("tiny · local folder", str(tiny_dir))
    assert [name for _, name in model_choices("EAR-adaLN-XL")][:2] == ["EAR-adaLN-XL", hub.DEFAULT_MODEL]


@pytest.mark.slow
def test_bench_startup_runs_on_a_cpu(tiny_dir: Path, tmp_path: Path) -> None:
    """bench/bench_startup.py is meant to be run once on a GPU machine: it must not have rotted."""
    command = [sys.executable, "bench/bench_startup.py", "--models", str(tiny_dir), "--repeats", "1",
               "--images", "2", "--weights", str(tmp_path)]
    out = subprocess.run(command, cwd=hub.ASSETS.parent, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    row = next(line for line in out.stdout.splitlines() if line.startswith(f"| {tiny_dir} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["as given", "yes"] and len(cells) == 8
    ready, first_canvas, final, later_canvas, later_final = map(float, cells[3:])
    assert ready > 0 and 0 < first_canvas <= final and 0 < later_canvas <= later_final
