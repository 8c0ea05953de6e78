"""Does drawing a preview frame per step cost much next to the step itself?

Samples once without previews (timing every step), then renders a frame for each of those
states (timing the tokenizer decode and the whole frame), and prints the ratios. Also reports
end-to-end seconds per image for `generate` (previews off) and `stream` (previews on).

    python bench/bench_preview.py                        # bundled model, or a same-shape stand-in
    python bench/bench_preview.py --model EAR-adaLN-B    # any name/folder EARPipeline can load
    python bench/bench_preview.py --random official-B --device cuda   # random weights, real shapes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ear import hub
from ear.model import EAR, EARConfig
from ear.pipeline import EARPipeline
from ear.tokenizer.conv_vq import ConvVQ, ConvVQConfig


def _random_pipeline(kind: str, device: str | None) -> EARPipeline:
    """Random weights with the shapes that matter for timing (no download, no trained asset)."""
    if kind.startswith("official-"):
        from ear.tokenizer.xqgan import XQGAN

        config, tokenizer = EARConfig.official(kind.split("-", 1)[1]), XQGAN()
    else:  # the embedded model's tokenizer with a small transformer
        tokenizer = ConvVQ(ConvVQConfig())
        config = EARConfig(dim=384, n_layer=8, n_head=6, vocab_size=tokenizer.codebook_size, num_classes=16)
    names = [str(i) for i in range(config.num_classes)]
    loaded = hub.LoadedModel(name=f"random {kind}", source="random", model=EAR(config).eval(),
                             tokenizer=tokenizer.eval(), class_names=names,
                             presets={"default": {"cfg_scale": 1.5}}, default_preset="default")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return EARPipeline(loaded, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)


def _sync(pipe: EARPipeline) -> None:
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()


def measure(pipe: EARPipeline, batch: int, display: int) -> dict[str, float]:
    classes = [0] * batch
    _sync(pipe)
    states, step_times = [], []
    last = time.perf_counter()
    for state in pipe.states(classes, seed=0):
        _sync(pipe)
        now = time.perf_counter()
        step_times.append(now - last)
        states.append(state)
        last = now
    renderer = pipe.renderer(display)
    frame_times = []
    for state in states:
        start = time.perf_counter()
        renderer.render(state)
        _sync(pipe)
        frame_times.append(time.perf_counter() - start)
    decode = renderer.decode_seconds / renderer.decode_calls
    step, frame = statistics.mean(step_times), statistics.mean(frame_times)
    start = time.perf_counter()
    pipe.generate(classes, seed=1, display_size=display)
    _sync(pipe)
    generate = time.perf_counter() - start
    start = time.perf_counter()
    for frame in pipe.stream(classes, seed=1, display_size=display):
        frame.images  # noqa: B018  frames are drawn when asked for: ask for every one
    _sync(pipe)
    stream = time.perf_counter() - start
    return {"step": step, "decode": decode, "frame": frame, "generate": generate / batch,
            "stream": stream / batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=hub.DEFAULT_MODEL)
    parser.add_argument("--random", help="skip loading: 'emoji' or 'official-B|L|XL' random weights")
    parser.add_argument("--device")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--display", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.random:
        pipe = _random_pipeline(args.random, args.device)
    else:
        try:
            pipe = EARPipeline.from_pretrained(args.model, device=args.device)
        except ValueError as err:
            print(f"({err}) -> using a random stand-in with the embedded model's shapes")
            pipe = _random_pipeline("emoji", args.device)
    print(f"{pipe.name}: {pipe.model.num_params() / 1e6:.1f}M params, {pipe.device}, {pipe.dtype}, "
          f"{pipe.model.schedule.num_steps} steps, batch {args.batch}, torch threads "
          f"{torch.get_num_threads()}")
    measure(pipe, args.batch, args.display)  # warm-up: kernels, caches, the neutral token
    runs = [measure(pipe, args.batch, args.display) for _ in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"sampling step        {med['step'] * 1e3:8.2f} ms (mean over steps)")
    print(f"decode per frame     {med['decode'] * 1e3:8.2f} ms  = {med['decode'] / med['step']:.2f} x step")
    print(f"whole frame (decode + mask + outline + PIL) {med['frame'] * 1e3:.2f} ms "
          f"= {med['frame'] / med['step']:.2f} x step")
    print(f"end to end per image: generate {med['generate']:.3f} s, stream with previews "
          f"{med['stream']:.3f} s")


if __name__ == "__main__":
    main()
