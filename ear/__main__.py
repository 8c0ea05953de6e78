"""Command line: `python -m ear models | download | generate | extend | edit | sample` (each has --help).

Bad input of any kind (unreadable image, unknown model or class, bad --keep, corrupt checkpoint,
offline without a cached model) ends with one line on stderr and exit code 2, never a traceback.
Outputs are checked before the model loads and written to temporary files that are renamed into
place only when complete, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from huggingface_hub import constants
from PIL import Image
from tqdm import tqdm

from ear import hub
from ear.images import load_image, load_mask, save_image
from ear.pipeline import MAX_BATCH, MAX_REFINE, MAX_ZOOM_ROUNDS, PLACES, EARPipeline, Frame
from ear.preview import ANIMATION_SUFFIXES, DISPLAY_SIZES, MAX_FPS, make_grid, save_animation
from ear.refine import DEFAULT_THRESHOLD

EXIT_BAD_INPUT = 2


def _add_hub_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where the weights come from (each also read from the EAR_* variable shown)")
    for component in hub.COMPONENTS:
        for what in hub.OVERRIDE_FIELDS:
            g.add_argument(hub.override_flag(component, what), dest=f"{component}_{what}", metavar="X",
                           help=f"{component} {what} ({hub.override_env_name(component, what)})")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=hub.DEFAULT_MODEL,
                   help=f"registry name ({', '.join(hub.REGISTRY)}), a model folder, a released .pt "
                        f"file or a Hub repo id in our format (default {hub.DEFAULT_MODEL})")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="model precision (default: bfloat16 on CUDA, float32 on CPU)")
    _add_hub_flags(p)


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the model's preset)")
    g.add_argument("--preset", help="named settings of the model (see `models`), e.g. visual or fid")
    g.add_argument("--seed", type=int, help="random seed (same seed, same picture)")
    g.add_argument("--cfg", type=float, dest="cfg_scale", help="classifier-free guidance scale (>= 0)")
    g.add_argument("--temperature", type=float, help="sampling temperature (>= 0; 0 = greedy)")
    g.add_argument("--top-k", type=int, dest="top_k", help="keep the k most likely codes (0 = all)")
    g.add_argument("--top-p", type=float, dest="top_p", help="nucleus sampling mass in (0, 1]")
    g.add_argument("--style", help="for a model with styles (see `models`), e.g. Twemoji or Noto: draw "
                                   "every image in it (default: images alternate styles)")


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="final image (.png, .jpg, .webp ...)")
    p.add_argument("--animation", type=Path, help="also write the growth as .gif or .mp4")
    p.add_argument("--fps", type=float, default=8.0, help="animation frames per second (default 8)")
    p.add_argument("--size", type=int, default=256, help="output/display size in pixels (default 256)")
    p.add_argument("--no-outline", dest="outline", action="store_false",
                   help="do not outline the cells each step adds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_class_flags(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--class-id", dest="class_", type=int, metavar="N", help="class index")
    g.add_argument("--class", dest="class_", metavar="NAME", help="class name (e.g. 'tench')")


class _Parser(argparse.ArgumentParser):
    """Bad flags get one `error:` line and status 2, as every other bad input (argparse's own
    error prints its usage lines first); the line says where the usage is."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m ear", description="EAR Studio: images that grow "
                                     "from the centre outward, a few tokens per step.")
    parser.add_argument("--verbose", action="store_true", help="log what is loaded and from where")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the known models and what is cached locally")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_hub_flags(p)

    p = sub.add_parser("download", help="fetch a Hub model into the Hugging Face cache")
    p.add_argument("name", help="registry name or Hub repo id")
    _add_hub_flags(p)

    p = sub.add_parser("generate", help="generate images of a class, step by step")
    _add_model_flags(p)
    _add_class_flags(p, required=True)
    p.add_argument("--batch", type=int, default=1, help="number of images (saved as a grid)")
    p.add_argument("--schedule", help="another generation order: arms, rings, raster, radial, radar or "
                                      "radar-square (off-distribution unless the model was trained with it)")
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                   help="nested refinement: redraw a step's implausible tokens from the next step's "
                        "correction (default: on for a model trained with the correction objective)")
    p.add_argument("--refine-threshold", type=float, metavar="P",
                   help="with --refine: redraw a token whose probability under the correction is below P "
                        f"(in (0, 1), default {DEFAULT_THRESHOLD})")
    p.add_argument("--activation", type=float, metavar="TAU",
                   help="dynamic activation (a model that ships routers): run only the FFN experts "
                        "predicted at >= (1 - TAU) x the largest, tokens gated; 1 runs every expert")
    p.add_argument("--activation-dir", type=Path, metavar="DIR",
                   help="the activation.safetensors `ear activate --out DIR` wrote (default: the model's)")
    _add_sampling_flags(p)
    _add_output_flags(p)

    p = sub.add_parser("extend", help="grow a picture outward from your image")
    _add_model_flags(p)
    p.add_argument("--image", required=True, type=Path, help="the picture to keep")
    p.add_argument("--keep", required=True, type=int, help="how much canvas the picture keeps, in tokens: "
                   "the square's side, or the band's depth for a side (see the error message for the "
                   "allowed sizes)")
    p.add_argument("--place", default="centre", choices=PLACES, metavar="WHERE",
                   help=f"where the picture sits: {', '.join(PLACES)} (default centre; a side keeps a "
                        "band spanning the canvas and grows the other way)")
    _add_class_flags(p, required=False)
    p.add_argument("--zoom-out", type=int, default=0, metavar="N",
                   help="repeat N times: shrink the result into the centre and extend again")
    _add_sampling_flags(p)
    _add_output_flags(p)

    p = sub.add_parser("edit", help="redraw the painted part of a picture, keep the rest")
    _add_model_flags(p)
    p.add_argument("--image", required=True, type=Path, help="the picture to edit")
    p.add_argument("--mask", required=True, type=Path,
                   help="a picture of the same size: where it is opaque (if it has transparency) or "
                        "light (white), the cells are redrawn")
    _add_class_flags(p, required=False)
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help=f"draw the region N more times and keep the draw that fits the kept cells best "
                        f"(0-{MAX_REFINE}, default 0)")
    _add_sampling_flags(p)
    _add_output_flags(p)

    p = sub.add_parser("activate", help="dynamic activation (ActVAR): FFN experts and routers, distilled "
                                        "on the model's own samples, written beside it",
                       description="Writes DIR/activation.safetensors; the model's files stay as they are.")
    _add_model_flags(p)
    p.add_argument("--experts", type=int, default=4, help="equal experts per FFN (default 4)")
    p.add_argument("--tau", type=float, default=None, help="dynamic-k: run experts predicted at >= (1 - tau) "
                   "x the largest (default 0.6; with --reuse, the file's)")
    p.add_argument("--budget", type=float, default=0.75, help="share of experts to run, aimed at in "
                   "distillation (default 0.75)")
    p.add_argument("--router-hidden", type=int, default=64, help="width of each layer's router (default 64)")
    p.add_argument("--dense-lead", type=float, default=None, help="share of the generation order drawn "
                   "dense before routing starts, in [0, 1) (default 0: every step routed; with --reuse, "
                   "the file's)")
    p.add_argument("--tune-experts", action="store_true", help="stage 2 also tunes the experts' own "
                   "weights (stored beside the routers; every expert on still runs the dense weights)")
    p.add_argument("--samples", type=int, default=64, help="own samples to distil on (as many to measure)")
    p.add_argument("--reuse", type=Path, default=None, metavar="DIR",
                   help="keep the experts, routers and gates of DIR's activation.safetensors, no "
                        "distillation: only --tau and --dense-lead change, measured again on the "
                        "held-out own samples (--samples as when it was made)")
    p.add_argument("--router-steps", type=int, default=300)
    p.add_argument("--distill-steps", type=int, default=80)
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("sample", help="bulk sampling for evaluation: N images of every class into one "
                                      "npz; the same under torchrun or accelerate launch on many GPUs",
                       description="Image j takes its randomness from (--seed, j) alone (--seed is 0 unless "
                                   "given), so any number of processes writes the same file; a rerun after "
                                   "an interruption resumes from the finished chunks.")
    p.set_defaults(seed=0)
    _add_model_flags(p)
    p.add_argument("--per-class", type=int, required=True, metavar="N", help="images of each class")
    p.add_argument("--classes", metavar="LIST", help="only these classes: ids, ranges or names without "
                                                     "commas, e.g. 0,1,2 or 0-99 (default: every class)")
    p.add_argument("--batch", type=int, help="images per forward in each process (default: the largest "
                   "that fits: free GPU memory over one image's KV cache and logits; 32 on a CPU)")
    _add_sampling_flags(p)
    p.add_argument("--out", type=Path, metavar="SAMPLES.npz",
                   help="arr_0: uint8 N x H x W x 3, arr_1: class labels (the ImageNet evaluator's input)")
    p.add_argument("--png-dir", type=Path, metavar="DIR", help="also (or only) one PNG per image")
    p.add_argument("--work-dir", type=Path, metavar="DIR",
                   help="finished chunks, kept until the end so that a rerun resumes (default: next to the "
                        "output, SAMPLES.parts); on several machines it must be on a shared filesystem")
    p.add_argument("--fid", type=Path, metavar="REFERENCE.npz",
                   help="then compute FID / IS against this reference batch (needs torch-fidelity and its "
                        "Inception weights)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, str | None]:
    return {f"{c}_{w}": getattr(args, f"{c}_{w}") for c in hub.COMPONENTS for w in hub.OVERRIDE_FIELDS}


def _check_outputs(args: argparse.Namespace) -> None:
    """Fail on unwritable outputs now, not after minutes of sampling."""
    formats = Image.registered_extensions()
    if formats.get(args.out.suffix.lower()) not in Image.SAVE:
        raise ValueError(f"--out must end in an image extension such as .png, .jpg or .webp, got "
                         f"'{args.out.name}'.")
    lo, hi = DISPLAY_SIZES
    if not lo <= args.size <= hi:
        raise ValueError(f"--size must lie in [{lo}, {hi}] pixels, got {args.size}.")
    outputs = [args.out]
    if args.animation is not None:
        if not 0 < args.fps <= MAX_FPS:
            raise ValueError(f"--fps must lie in (0, {MAX_FPS}], got {args.fps:g}.")
        if args.animation.suffix.lower() not in ANIMATION_SUFFIXES:
            raise ValueError(f"--animation must end in .gif or .mp4, got '{args.animation.name}'.")
        outputs.append(args.animation)
    for path in outputs:
        if not path.parent.is_dir():
            raise ValueError(f"Cannot write '{path}': the folder '{path.parent}' does not exist.")


SAMPLING_FLAGS = ("cfg_scale", "temperature", "top_k", "top_p")


def _sampling(args: argparse.Namespace, pipe: EARPipeline) -> dict:
    base = {}
    if args.preset is not None:
        if args.preset not in pipe.presets:
            raise ValueError(f"Unknown preset '{args.preset}' for {pipe.name}; it has "
                             f"{', '.join(pipe.presets)}.")
        preset = pipe.presets[args.preset]
        base = {k: getattr(preset, k) for k in SAMPLING_FLAGS}
    given = {k: getattr(args, k) for k in SAMPLING_FLAGS}
    if args.style is not None:
        pipe.style_index(args.style)  # a clear message before any work starts
    return {**base, **{k: v for k, v in given.items() if v is not None},
            "seed": args.seed, "style": args.style}


def _load(args: argparse.Namespace) -> EARPipeline:
    return EARPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype, **_overrides(args))


def _run_frames(frames: Iterator[Frame], total: int | None, args: argparse.Namespace, keep_frames: bool
                ) -> tuple[Frame, list[Image.Image]]:
    """Consume frames with a progress bar; keep grid images only when an animation is wanted."""
    shown: list[Image.Image] = []
    last = None
    with tqdm(total=total, unit="frame", disable=args.quiet, file=sys.stderr) as bar:
        for last in frames:
            if keep_frames:
                shown.append(make_grid(last.images))
            bar.set_postfix_str(last.caption.split(" · ")[-1], refresh=False)
            bar.update()
    assert last is not None
    return last, shown


def _write(args: argparse.Namespace, final: Image.Image, frames: list[Image.Image]) -> None:
    if args.animation is not None:
        written = save_animation(frames, args.animation, fps=args.fps)
        print(f"wrote {written}")
    print(f"wrote {save_image(final, args.out)}")


def cmd_generate(args: argparse.Namespace) -> None:
    _check_outputs(args)
    if not 1 <= args.batch <= MAX_BATCH:
        raise ValueError(f"--batch must lie in [1, {MAX_BATCH}], got {args.batch}.")
    pipe = _load(args)
    classes = [pipe.class_id(args.class_)] * args.batch
    sampling = {**_sampling(args, pipe), "refine": args.refine, "refine_threshold": args.refine_threshold}
    if args.activation_dir is not None:
        pipe.load_activation(args.activation_dir)
    if args.activation is not None:
        pipe.routed(args.activation)  # a bad value or a model without routers: said before any work
        sampling["activation"] = args.activation
    if args.animation is None:  # no previews needed: decode once, at the end
        states = pipe.states(classes, schedule=args.schedule, **sampling)
        with tqdm(total=pipe.model.schedule.num_steps, unit="step", disable=args.quiet,
                  file=sys.stderr) as bar:
            for state in states:
                bar.set_postfix_str(f"{state.num_known} tokens", refresh=False)
                bar.update()
        final = make_grid(pipe.renderer(args.size).final(state.tokens))
        _write(args, final, [])
        return
    frames = pipe.stream(classes, schedule=args.schedule, outline=args.outline, display_size=args.size,
                         **sampling)
    _, shown = _run_frames(frames, pipe.frame_count(), args, keep_frames=True)
    _write(args, shown[-1], shown)


def cmd_extend(args: argparse.Namespace) -> None:
    _check_outputs(args)
    if not 0 <= args.zoom_out <= MAX_ZOOM_ROUNDS:
        raise ValueError(f"--zoom-out must be 0 (no zoom) or a number of rounds up to {MAX_ZOOM_ROUNDS}, "
                         f"got {args.zoom_out}.")
    if args.zoom_out and args.place != "centre":
        raise ValueError("--zoom-out shrinks the picture into the centre: leave --place at centre.")
    image = load_image(args.image)  # before the model: a bad image should fail fast
    pipe = _load(args)
    class_id = None if args.class_ is None else pipe.class_id(args.class_)
    sampling = _sampling(args, pipe)
    extra = {"display_size": args.size, "outline": args.outline, **sampling}
    if args.zoom_out:
        frames = pipe.zoom_out(image, args.zoom_out, args.keep, class_id, **extra)
    else:
        frames = pipe.extend(image, args.keep, class_id, place=args.place, **extra)
    total = pipe.frame_count(args.keep, max(1, args.zoom_out), place=args.place)
    last, shown = _run_frames(frames, total, args, keep_frames=args.animation is not None)
    _write(args, make_grid(last.images), shown)


def cmd_edit(args: argparse.Namespace) -> None:
    _check_outputs(args)
    image = load_image(args.image)  # before the model: a bad image or mask should fail fast
    mask = load_mask(args.mask, image.size)
    pipe = _load(args)
    class_id = None if args.class_ is None else pipe.class_id(args.class_)
    frames = pipe.edit(image, mask, class_id, refine=args.refine, display_size=args.size,
                       outline=args.outline, **_sampling(args, pipe))
    last, shown = _run_frames(frames, None, args, keep_frames=args.animation is not None)
    _write(args, make_grid(last.images), shown)


def _check_sample_flags(args: argparse.Namespace) -> None:
    """Everything that can be wrong with the flags, before the model loads or any rank starts."""
    from ear import bulk, fid

    if args.per_class < 1:
        raise ValueError(f"--per-class must be at least 1, got {args.per_class}.")
    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}.")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must lie in [0, 2^63), got {args.seed}.")
    if args.out is None and args.png_dir is None:
        raise ValueError("give --out SAMPLES.npz, --png-dir DIR or both.")
    if args.out is not None:
        if args.out.is_dir():
            raise ValueError(f"--out '{args.out}' is a folder; give a file name ending in .npz.")
        if args.out.suffix != ".npz":
            raise ValueError(f"--out must end in .npz (the evaluator's format), got '{args.out.name}'.")
        bulk.check_writable(args.out.parent, f"'{args.out.name}'")
    if args.png_dir is not None:
        if args.png_dir.exists() and not args.png_dir.is_dir():
            raise ValueError(f"--png-dir '{args.png_dir}' exists and is not a folder.")
        bulk.check_writable(args.png_dir.parent, f"the folder '{args.png_dir.name}'")
    if args.fid is not None:
        if args.out is None:
            raise ValueError("--fid scores the npz: give --out SAMPLES.npz as well.")
        problem = fid.missing(args.fid)
        if problem:
            raise ValueError(problem)


def cmd_sample(args: argparse.Namespace) -> None:
    from ear import bulk, fid

    _check_sample_flags(args)
    state, device = bulk.start(args.device)
    pipe = EARPipeline.from_pretrained(args.model, device=device, dtype=args.dtype, **_overrides(args))
    sampling = _sampling(args, pipe)
    settings = pipe.default_settings.merged(**{k: v for k, v in sampling.items()
                                               if k not in ("seed", "style")})
    classes = bulk.parse_classes(args.classes, pipe)
    plan = bulk.Plan.of(pipe, classes, args.per_class, args.seed, settings, sampling["style"])
    batch = args.batch or bulk.fitting_batch(pipe.model, settings.guided, pipe.device)
    work_dir = args.work_dir or bulk.default_work_dir(args.out, args.png_dir)
    if bulk.run(pipe, plan, bulk.Outputs(args.out, args.png_dir, work_dir), batch, state, args.quiet) \
            and args.fid is not None:
        print(json.dumps(fid.scores(args.out, args.fid)))


def cmd_activate(args: argparse.Namespace) -> None:
    from ear.activate import ACTIVATION_FILE, Activation, ActivationConfig, convert, reconfigured

    if args.samples < 1 or args.router_steps < 0 or args.distill_steps < 0:
        raise ValueError("--samples must be positive and the step counts not negative")
    if args.reuse is None and args.tau is not None and not 0 <= args.tau < 1:
        raise ValueError(f"--tau must lie in [0, 1) for a distillation (1 runs every expert: there is "
                         f"nothing to learn), got {args.tau:g}.")
    given = {k: v for k, v in (("tau", args.tau), ("dense_lead", args.dense_lead)) if v is not None}
    config = ActivationConfig(experts=args.experts, router_hidden=args.router_hidden,
                              tuned=args.tune_experts, **{"tau": 0.6, "dense_lead": 0.0, **given})
    pipe = EARPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype, **_overrides(args))
    if args.reuse is not None:
        if not (args.reuse / ACTIVATION_FILE).is_file():
            raise ValueError(f"--reuse {args.reuse} holds no {ACTIVATION_FILE}")
        activation = reconfigured(Activation.load(args.reuse, pipe.model), pipe.model, args.samples, **given)
        activation.report.update(pipe.activation_saving(activation))
        print(json.dumps({"written": str(activation.save(args.out)), **activation.report}))
        return
    with tqdm(total=4, unit="stage", disable=args.quiet) as bar:
        def progress(stage: str) -> None:
            bar.set_description(stage)
            bar.update(1)

        activation, _ = convert(pipe.model, config, args.budget, args.samples, args.router_steps,
                                args.distill_steps, progress=progress)
        bar.set_description("counting FLOPs")
        activation.report.update(pipe.activation_saving(activation))  # kept in the file: Model info
    path = activation.save(args.out)
    print(json.dumps({"written": str(path), **activation.report}))


def cmd_models(args: argparse.Namespace) -> None:
    rows = hub.list_models(**_overrides(args))
    if args.json:
        print(json.dumps([vars(r) for r in rows], indent=1))
        return
    width = max(len(r.name) for r in rows)
    for r in rows:
        size = f"{r.size_bytes / 1e6:,.1f} MB" if r.size_bytes else "-"
        print(f"{r.name:<{width}}  {r.status:<14}  {size:>11}  {r.description}\n{'':<{width}}  {r.location}")
    offline = " (HF_HUB_OFFLINE is set)" if constants.is_offline_mode() else ""
    print(f"\nHub cache: {constants.HF_HUB_CACHE}{offline}")


def cmd_download(args: argparse.Namespace) -> None:
    paths = hub.download(args.name, **_overrides(args))
    for path in paths:
        print(f"cached {path}")
    if not paths:
        print(f"{args.name} is bundled; nothing to download.")


COMMANDS = {"models": cmd_models, "download": cmd_download, "generate": cmd_generate,
            "extend": cmd_extend, "edit": cmd_edit, "sample": cmd_sample, "activate": cmd_activate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    warnings.formatwarning = lambda message, *_args, **_kw: f"warning: {message}\n"
    try:
        COMMANDS[args.command](args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
