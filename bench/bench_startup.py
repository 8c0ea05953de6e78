"""What the first visitors of a GPU Space wait for, per model: the page ready (from starting
`python app.py` until the server answers, start-up's download, load and warm-up included), then
through the real HTTP API the first canvas and the final image of the very first request, and
the medians of later ones. The same start without warm-up (EAR_STUDIO_WARMUP=0) is measured in
the same run as the baseline the warm-up is judged against.

Released models whose files cannot be had (no Hub, nothing cached) run with random weights in the
official format (float32 `.pt` files written once to --weights), which have the same shapes and
cost the same time.

    python bench/bench_startup.py                                  # EAR-adaLN-B,L,XL on a GPU
    python bench/bench_startup.py --models ear-emoji --repeats 1   # CPU check, bundled model
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradio_client import Client

from ear import hub
from ear.model import EAR, EARConfig
from ear.startup import HubAccess
from tests.app_server import running_app

START_TIMEOUT_S = 1800  # a first XL start downloads several GB


def random_official(size: str, folder: Path) -> dict[str, str]:
    """Environment that makes the app start on random EAR-adaLN-`size` weights in the official
    layout (a training checkpoint's {"model": state dict}, XQGAN-8192 alike)."""
    from ear.tokenizer.xqgan import XQGAN, XQGANConfig

    folder.mkdir(parents=True, exist_ok=True)
    files = {"model": folder / f"random-EAR-adaLN-{size}.pt", "tokenizer": folder / "random-XQGAN-8192.pt"}
    builders = {"model": lambda: EAR(EARConfig.official(size)), "tokenizer": lambda: XQGAN(XQGANConfig())}
    for key, path in files.items():
        if not path.is_file():
            torch.manual_seed(0)
            partial = path.with_suffix(".part")
            torch.save({"model": builders[key]().state_dict()}, partial)
            partial.replace(path)
    return {"EAR_STUDIO_MODEL": str(files["model"]), "EAR_TOKENIZER_FILE": str(files["tokenizer"])}


def source(name: str, access: HubAccess, weights: Path) -> tuple[str, dict[str, str]]:
    """(what the table calls the weights, environment for app.py)."""
    if name in hub.REGISTRY and not hub.REGISTRY[name].bundled and not access.obtainable(name):
        return "random, official format", random_official(name.rsplit("-", 1)[1], weights)
    online = {} if not access.online else {"HF_HUB_OFFLINE": "0"}
    return ("released" if name in hub.REGISTRY and not hub.REGISTRY[name].bundled else "as given"), \
        {"EAR_STUDIO_MODEL": name, **online}


def request(client: Client, images: int, seed: int) -> tuple[float, float]:
    """Seconds from submitting a Generate request to its first canvas and to its final images.
    The request then runs to its end (the animation file) before the next one starts."""
    started = time.perf_counter()
    first = final = None
    for _canvas, _caption, finals, _animation in client.submit(num_images=images, seed=seed,
                                                                api_name="/generate"):
        now = time.perf_counter() - started
        first = now if first is None else first
        final = now if final is None and finals else final
    if first is None or final is None:
        raise RuntimeError("the request ended without final images")
    return first, final


def measure(env: dict[str, str], images: list[int], repeats: int, log: Path) -> dict[str, Any]:
    """Start the app, time the page and the first request, then `repeats` more per batch size."""
    started = time.perf_counter()
    with running_app(env["EAR_STUDIO_MODEL"], log, env=env, timeout=START_TIMEOUT_S) as url:
        ready = time.perf_counter() - started
        client = Client(url, verbose=False, download_files=False)
        info = client.predict(api_name="/model_info")[1]
        first_canvas, first_final = request(client, 1, 0)
        later = {n: [request(client, n, seed) for seed in range(1, repeats + 1)] for n in images}
    lines = [line for line in log.read_text().splitlines() if "start-up:" in line]
    return {"ready": ready, "first": (first_canvas, first_final), "info": info, "log": lines,
            "later": {n: tuple(statistics.median(t[i] for t in times) for i in (0, 1))
                      for n, times in later.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="EAR-adaLN-B,EAR-adaLN-L,EAR-adaLN-XL")
    parser.add_argument("--images", default="1,8", help="batch sizes of the later requests")
    parser.add_argument("--repeats", type=int, default=3, help="later requests per batch size")
    parser.add_argument("--weights", type=Path, default=Path(tempfile.gettempdir()) / "ear-random-weights",
                        help="where random official-format weights are written (and reused)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the start without warm-up")
    args = parser.parse_args()
    images = [int(n) for n in args.images.split(",")]
    access = HubAccess.detect()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU (no warm-up)"
    print(f"{gpu}; Hub {'reachable' if access.online else 'unreachable'}; later requests: medians of "
          f"{args.repeats}; times in seconds")
    header = ("| model | weights | warm-up | page ready | 1st request: first canvas | final image | "
              + " | ".join(f"later, {n} image(s): first canvas | final" for n in images) + " |")
    rows = []
    for name in args.models.split(","):
        kind, env = source(name, access, args.weights)
        variants = [("yes", {})] + ([] if args.no_baseline or not torch.cuda.is_available()
                                    else [("no (baseline)", {"EAR_STUDIO_WARMUP": "0"})])
        for warm, extra in variants:
            with tempfile.TemporaryDirectory() as tmp:
                result = measure({**env, **extra}, images, args.repeats, Path(tmp) / "server.log")
            print(json.dumps({"model": name, "warm-up": warm, **{k: v for k, v in result.items()
                                                                  if k != "info"}}), flush=True)
            if result["info"]["name"] == hub.DEFAULT_MODEL != name:
                print(f"warning: the app fell back to {hub.DEFAULT_MODEL} instead of {name} (log above)")
            later = " | ".join(f"{c:.2f} | {f:.2f}" for c, f in result["later"].values())
            rows.append(f"| {name} | {kind} | {warm} | {result['ready']:.1f} | {result['first'][0]:.2f} | "
                        f"{result['first'][1]:.2f} | {later} |")
    print("\n" + header + "\n" + "|---" * (6 + 2 * len(images)) + "|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
