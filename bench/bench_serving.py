"""Many visitors at once: concurrent `/generate` requests through `gradio_client` against the real
app (`python app.py` on 127.0.0.1, bundled model), with batching off (EAR_BATCHING=0, the
baseline: two requests at a time, each with its own forwards) and on, in the same run.

For 1, 4, 8 and 16 clients sending one single-image request each at the same moment (`--repeats`
rounds each, latencies pooled): p50/p95 seconds from the request to its first canvas and to its
final images (when the update reached the client, see `_StampedMessages`), and images per second.
The app serves as it does by default (for this CPU model: the scheduler in a worker process; run
with EAR_SERVING_PROCESS=0 to measure it in the server's process).
Then one 8-image request against 8 single-image requests (the target: the 8 singles all done
within 1.3x), and 30 clients at once against the queue's maximum: every accepted request must get
its own images (pixel for pixel the picture its seed gives served alone), the rest the app's
"queue is full" answer. Then the 8 vs 8 comparison again through the Generate handler in this
process (no HTTP), and how often a token differs between a request served alone and in a batch
of 16 (a batch's shape can change a float's rounding).

    python bench/bench_serving.py [--clients 1,4,8,16] [--repeats 3] [--overflow 30] [--agreement 32]
    python bench/bench_serving.py --model radar-emoji   # refined requests (RadAR), in batches of their own
"""

from __future__ import annotations

import argparse
import io
import os
import ssl
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ear  # noqa: F401  first: it sets the OpenMP wait policy before torch is loaded

# isort: split
import gradio_client.client
import numpy as np
import torch
from gradio_client import Client
from PIL import Image

from ear import hub
from ear.app_support import threads_per_request
from ear.pipeline import EARPipeline
from ear.sampler import generate, sample
from tests.app_server import running_app

POLL_S = 0.01  # how often a client looks whether its job is done (a busy loop would steal the server's cores)
TIMEOUT_S = 600
# gradio_client opens every request with a fresh httpx client, which builds a TLS context from the
# CA bundle even for http:// (about 15 ms of CPU each here). The clients run on the server's own
# two cores, so they share one context: the benchmark measures the server, not certificate parsing.
TLS = ssl.create_default_context()


class _StampedMessages(deque):
    """gradio_client's queue of one job's server messages, noting when each arrived. Its job
    thread takes them from there every 50 ms (a sleep in gradio_client), so a time read from the
    job's outputs would carry up to 50 ms of the client's polling, most of it for the slowest of
    several clients; the benchmark takes the time the message reached the client instead."""

    def append(self, message: dict[str, Any] | None) -> None:
        if message is not None and message.get("msg") == "process_generating":
            ARRIVALS.setdefault(message.get("event_id"), []).append(time.perf_counter())
        super().append(message)


ARRIVALS: dict[str, list[float]] = {}  # event id -> arrival times of its updates, in order
gradio_client.client.deque = _StampedMessages  # what its SSE reader files each job's messages in


@dataclass
class Visit:
    """What one client saw: seconds from its request to the first canvas and to the final images
    (None if it never came), the final images' URLs, and the refusal if there was one."""

    seed: int
    first: float | None = None
    final: float | None = None
    images: list[str] | None = None
    refused: str | None = None


def visit(client: Client, class_name: str, seed: int, num_images: int, start: threading.Barrier) -> Visit:
    result = Visit(seed)
    start.wait()
    started = time.perf_counter()
    job = client.submit(class_name=class_name, num_images=num_images, seed=seed, api_name="/generate")
    while not job.done():
        if time.perf_counter() - started > TIMEOUT_S:
            raise TimeoutError(f"seed {seed}: no answer within {TIMEOUT_S} s")
        time.sleep(POLL_S)
    arrived = ARRIVALS.pop(job.communicator.event_id, []) if job.communicator else []
    for (canvas, caption, finals, _animation), at in zip(job.outputs(), arrived, strict=False):
        if result.first is None and canvas and str(caption).startswith("step"):
            result.first = at - started
        if result.final is None and isinstance(finals, list) and finals:
            result.final = at - started
            result.images = [f["image"]["url"] for f in finals]
    error = job.exception()
    if error is not None:
        result.refused = str(error)
    return result


def crowd(clients: list[Client], class_name: str, num_images: int = 1,
          first_seed: int = 0) -> tuple[list[Visit], float]:
    """Every client sends one request at the same moment; returns the visits and the wall time."""
    start = threading.Barrier(len(clients) + 1)
    visits: list[Visit] = []

    def run(client: Client, seed: int) -> None:
        visits.append(visit(client, class_name, seed, num_images, start))

    threads = [threading.Thread(target=run, args=(c, first_seed + i)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    return sorted(visits, key=lambda v: v.seed), time.perf_counter() - began


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def fetch(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=60) as response:
        return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))


def serve(batching: bool, args: argparse.Namespace, tmp: Path, pipe: EARPipeline) -> dict[str, float]:
    """One server, one mode: every client count `args.repeats` times (latencies pooled), then the
    8-image request against 8 single-image requests (medians of the repeats), then the overflow."""
    os.environ["EAR_BATCHING"] = "1" if batching else "0"
    mode = "batching" if batching else "baseline"
    summary: dict[str, float] = {}
    with running_app(args.model, tmp / f"server-{mode}.log") as url:
        most = max([*args.clients, 8, args.overflow])
        clients = [Client(url, verbose=False, download_files=False, ssl_verify=TLS) for _ in range(most)]
        crowd(clients[:2], pipe.default_class)  # warm-up: first requests pay for lazy initialisation
        for n in args.clients:
            rounds = [crowd(clients[:n], pipe.default_class, first_seed=1000 * n + 100 * r)
                      for r in range(args.repeats)]
            firsts = [v.first for visits, _ in rounds for v in visits if v.first is not None]
            finals = [v.final for visits, _ in rounds for v in visits if v.final is not None]
            rate = len(finals) / sum(wall for _, wall in rounds)
            print(f"| {mode} | {n} | {percentile(firsts, 50):.2f} | {percentile(firsts, 95):.2f} | "
                  f"{percentile(finals, 50):.2f} | {percentile(finals, 95):.2f} | {rate:.2f} |", flush=True)
            summary[f"first_p95_{n}"] = percentile(firsts, 95)
        ones, eights = [], []
        for r in range(args.repeats):
            one, _ = crowd(clients[:1], pipe.default_class, num_images=8, first_seed=77 + r)
            singles, _ = crowd(clients[:8], pipe.default_class, first_seed=88 + 10 * r)
            ones.append(one[0].final or float("nan"))
            eights.append(max(v.final or float("nan") for v in singles))
        summary["eight_images"], summary["eight_singles"] = statistics.median(ones), statistics.median(eights)
        if batching or args.overflow_both:
            summary.update(overflow(clients[: args.overflow], pipe, mode))
    return summary


def overflow(clients: list[Client], pipe: EARPipeline, mode: str) -> dict[str, float]:
    """All clients at once: accepted ones must get the picture their own seed gives served alone."""
    visits, _ = crowd(clients, pipe.default_class, first_seed=5000)
    accepted = [v for v in visits if v.refused is None]
    refused = [v for v in visits if v.refused is not None]
    own = 0
    for v in accepted:
        alone = pipe.generate(pipe.default_class, seed=v.seed)[0]
        own += bool(v.images) and np.array_equal(fetch(v.images[0]), np.asarray(alone.convert("RGB")))
    messages = sorted({v.refused for v in refused})
    print(f"{mode}, {len(clients)} clients at once: {len(accepted)} accepted, {own} of them with their "
          f"own picture (equal to its seed served alone); {len(refused)} refused: {messages}", flush=True)
    return {"accepted": len(accepted), "own": own, "refused": len(refused)}


def agreement(pipe: EARPipeline, requests: int, batch: int = 16) -> None:
    """Tokens of requests served alone vs `batch` at a time (per-row seeds and row ids, as the
    scheduler batches them), on the page's model in float32 on this CPU (refined where it can)."""
    model, sampling = pipe.model, {**asdict(pipe.default_settings), "refine": pipe.can_refine}
    ids = [i % len(pipe.class_names) for i in range(requests)]
    alone = torch.cat([generate(model, [c], seed=s, **sampling) for s, c in enumerate(ids)])
    together = torch.cat([generate(model, ids[i:i + batch], seed=list(range(i, i + len(ids[i:i + batch]))),
                                   row_ids=[0] * len(ids[i:i + batch]), **sampling)
                          for i in range(0, requests, batch)])
    differ = alone != together
    print(f"alone vs in batches of {batch} ({requests} images, {pipe.name}, {pipe.dtype}, CPU): "
          f"{int(differ.any(-1).any(-1).sum())} images and {int(differ.sum())} of {differ.numel()} tokens "
          f"differ", flush=True)


def handler_times(args: argparse.Namespace) -> None:
    """The same 8 vs 8 comparison through app.py's Generate handler in this process, no HTTP: what
    the scheduler and the handlers cost without the transport (requests arrive at once). The
    baseline is emulated as the server runs it: two handlers at a time, each with its share of
    the cores."""
    os.environ["EAR_BATCHING"] = "1"
    os.environ["EAR_STUDIO_MODEL"] = args.model
    import app  # builds the page and loads the model: only when asked for

    pipe = app.MODELS.get(None)
    p = pipe.default_settings

    def final_after(num_images: int, seed: int, gate: threading.Semaphore) -> float:
        started = time.perf_counter()
        with gate:
            for _canvas, _caption, finals, _animation, _playback in app.generate(
                    pipe.default_class, num_images, seed, p.cfg_scale, p.temperature, p.top_k, p.top_p,
                    app.MODELS.default, "gif"):
                if isinstance(finals, list) and finals:
                    return time.perf_counter() - started
        raise RuntimeError("the handler never showed its final images")

    served = pipe.sampler
    for mode, sampler, at_once, spare in (("baseline", sample, 2, 0), ("batching", served, 1, 1)):
        pipe.sampler = sampler
        torch.set_num_threads(threads_per_request(at_once, spare) or torch.get_num_threads())
        gate = threading.Semaphore(at_once if mode == "baseline" else 8)
        final_after(1, 0, gate)  # warm-up
        ones, eights = [], []
        for r in range(args.repeats):
            ones.append(final_after(8, 77 + r, gate))
            with ThreadPoolExecutor(8) as pool:
                seeds = [88 + 10 * r + i for i in range(8)]
                eights.append(max(pool.map(final_after, [1] * 8, seeds, [gate] * 8)))
        one, eight = statistics.median(ones), statistics.median(eights)
        print(f"{mode}, handlers in-process: one 8-image request {one:.2f} s; 8 single-image requests all "
              f"done in {eight:.2f} s = {eight / one:.2f}x (medians of {args.repeats})", flush=True)
    pipe.sampler = served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=hub.DEFAULT_MODEL, help="the page's model (default the bundled "
                        "one; a RadAR model's requests are refined, as the page does by default)")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per client count (pooled)")
    parser.add_argument("--overflow", type=int, default=30, help="clients at once for the overflow check")
    parser.add_argument("--overflow-both", action="store_true", help="also run the overflow check unbatched")
    parser.add_argument("--modes", default="baseline,batching", help="which servers to measure")
    parser.add_argument("--logs", type=Path, help="keep the servers' logs in this folder")
    parser.add_argument("--no-handlers", dest="handlers", action="store_false",
                        help="skip the in-process handler comparison")
    parser.add_argument("--agreement", type=int, default=32,
                        help="images for the alone-vs-batch check (0: skip)")
    args = parser.parse_args()
    args.clients = [int(n) for n in args.clients.split(",") if n.strip()]
    pipe = EARPipeline.from_pretrained(args.model)
    print(f"model {pipe.name}, {pipe.model.schedule.num_steps} steps, default preset "
          f"{pipe.default_settings}, refined {pipe.can_refine}; {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| mode | clients | first canvas p50 (s) | p95 (s) | final images p50 (s) | p95 (s) | images/s |")
    print("|---|---|---|---|---|---|---|")
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        results = {batching: serve(batching, args, logs, pipe)
                   for batching in (False, True) if ("batching" if batching else "baseline") in modes}
    for batching, r in results.items():
        mode = "batching" if batching else "baseline"
        print(f"{mode}: one 8-image request {r['eight_images']:.2f} s; 8 single-image requests all done in "
              f"{r['eight_singles']:.2f} s = {r['eight_singles'] / r['eight_images']:.2f}x (target <= 1.3x; "
              f"medians of {args.repeats})")
    if args.handlers:
        handler_times(args)
    if args.agreement:
        agreement(pipe, args.agreement)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
