"""Command line for both training stages, data preparation and whole-run recipes.

    python -m ear.train tokenizer --run-dir runs/tok --export assets/ear-emoji
    python -m ear.train ear --tokenizer runs/tok --run-dir runs/ear --export assets/ear-emoji
    accelerate launch -m ear.train ear ...        # same flags on one or several GPUs
    python -m ear.train prepare --classes all --out runs/emoji-all.npz
    python -m ear.train recipe gpu --data runs/emoji-all.npz --run-dir runs/gpu --export runs/gpu/asset
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ear.order import ORDERS
from ear.train.recipe import RECIPES, stage_argv


def add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="emoji",
                   help='"emoji" (npm Twemoji + Noto), "photos" (Debian wallpapers, ear.train.photos), '
                        'a prepared .npz, an image folder root/<class>/*, '
                        "or unpacked emoji-datasource package folders joined with os.pathsep")
    p.add_argument("--cache-dir", default=None, help="npm tarballs and prepared .npz "
                   "(default ~/.cache/ear-studio/emoji)")
    p.add_argument("--classes", default="familiar", dest="class_set",
                   help='emoji class set: "familiar" (228 emoji, one class each), "all" (every emoji), '
                        '"subcategory" (broad Unicode subcategories) or a file of CLDR names')
    p.add_argument("--min-class-size", type=int, default=20,
                   help="distinct emoji a subcategory needs to be its own class (--classes subcategory)")
    p.add_argument("--sets", default="twitter,google",
                   help="emoji image sets, comma-separated: twitter, google, fluent-flat, fluent-color, "
                        "and the earlier releases twitter-2014, twitter-2017, google-2016 (each joins its "
                        "artist's style; the SVG sets need PyPI cairosvg)")


def add_common(p: argparse.ArgumentParser, steps: int, batch: int, lr: float) -> None:
    add_data(p)
    p.add_argument("--init-from", default=None, metavar="FOLDER",
                   help="warm start from an asset or run folder's weights (tensors whose name and shape "
                        "match; e.g. a new class table is left fresh)")
    p.add_argument("--run-dir", required=True, help="checkpoints, logs and the final weights")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=batch, help="global batch (split across processes)")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="stop after this much training wall time; the LR schedule follows whichever "
                        "of steps/budget runs out first")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999, help="weight EMA decay")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=200, help="checkpoint interval in steps")
    p.add_argument("--resume", action="store_true", help="continue from run-dir/checkpoint if present")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                   help="auto: bf16 on GPU, full precision on CPU")
    p.add_argument("--export", default=None, help="asset folder to write (e.g. assets/ear-emoji)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ear.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)

    tok = sub.add_parser("tokenizer", help="train the ConvVQ tokenizer")
    add_common(tok, steps=1200, batch=24, lr=2e-3)
    tok.add_argument("--codebook-size", type=int, default=512)
    tok.add_argument("--codebook-dim", type=int, default=8)
    tok.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    tok.add_argument("--crop", type=int, default=64,
                     help="train on random crops of this size (64 = whole images; on CPU crops were "
                          "not cheaper per pixel, so the shipped model used whole images)")

    tok.add_argument("--decoder-only", action="store_true",
                     help="train the decoder only: encoder and codebook stay fixed, so the token grids an "
                          "EAR was trained on stay valid (use with --init-from)")

    ear = sub.add_parser("ear", help="train the EAR transformer on tokenized images")
    add_common(ear, steps=4000, batch=16, lr=2e-3)
    ear.add_argument("--tokenizer", required=True, help="folder with config.json + tokenizer.safetensors")
    ear.add_argument("--dim", type=int, default=128)
    ear.add_argument("--n-layer", type=int, default=4)
    ear.add_argument("--n-head", type=int, default=4)
    ear.add_argument("--multiple-of", type=int, default=64, help="SwiGLU hidden width rounding")
    ear.add_argument("--schedule", default="arms", choices=ORDERS, help="the generation order trained")
    ear.add_argument("--rope", default="sequence", choices=["sequence", "true2d"])
    ear.add_argument("--no-adaln", dest="adaln", action="store_false")
    ear.add_argument("--correction", action="store_true",
                     help="also train the correction objective (RadAR-style nested refinement, ear.refine)")
    ear.add_argument("--corruption", type=float, default=0.3,
                     help="with --correction: share of cells replaced by the model's own draws or noise")
    ear.add_argument("--corruption-noise", type=float, default=0.2,
                     help="with --correction: share of the replaced cells that take a random code")
    ear.add_argument("--class-dropout", type=float, default=0.1)
    ear.add_argument("--dropout", type=float, default=0.0)
    ear.add_argument("--aug-copies", type=int, default=4,
                     help="tokenized copies per image (copy 0 plain, the rest shifted/zoomed)")
    ear.add_argument("--balance-classes", action="store_true",
                     help="repeat sequences so every class is drawn about equally often (skin-tone emoji "
                          "have 12 images, most emoji 2)")
    ear.add_argument("--style-classes", action="store_true",
                     help="one class embedding per (class, image set): samples follow one artist's drawing "
                          "(the page picks or alternates the style)")
    ear.add_argument("--drawings", type=int, default=1, metavar="N",
                     help="with --style-classes: N class embeddings per (class, style), one per picture "
                          "(earlier releases, skin tones, then 2 px shifts); a seed picks one (default 1)")
    ear.add_argument("--shared-styles", action="store_true",
                     help="one class embedding per class shared by every image set, plus a style embedding "
                          "added to it (config num_styles): labels as with --style-classes")
    ear.add_argument("--name", default="ear-emoji")

    prep = sub.add_parser("prepare", help="build the data set once (CPU) as one .npz to carry to a GPU")
    add_data(prep)
    prep.add_argument("--out", required=True, help="the .npz to write")

    rec = sub.add_parser("recipe", help="both stages with a machine's preset flags (see ear/train/recipe.py)")
    rec.add_argument("recipe", choices=list(RECIPES))
    rec.add_argument("--data", default="emoji", help="as for the stages; a prepared .npz for the GPU")
    rec.add_argument("--run-dir", required=True, help="gets tokenizer/ and ear/ run folders")
    rec.add_argument("--export", default=None, help="asset folder to write at the end")
    rec.add_argument("--init-from", default=None, help="warm start both stages from this asset folder")
    rec.add_argument("--tokenizer-extra", default="", help="flags appended to the tokenizer stage "
                     "(write --tokenizer-extra='--resume')")
    rec.add_argument("--ear-extra", default="", help="flags appended to the EAR stage")
    rec.add_argument("--dry-run", action="store_true", help="print the two stage commands only")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.stage == "prepare":
        from ear.train.data import dataset_from_args

        data = dataset_from_args(args)
        data.save(Path(args.out))
        print(f"{args.out}: {len(data)} images, {len(data.class_names)} classes")
        return
    if args.stage == "recipe":

        stages = stage_argv(args.recipe, args.data, Path(args.run_dir), args.export, args.init_from,
                            {"tokenizer": args.tokenizer_extra, "ear": args.ear_extra})
        for stage in stages:
            print("python -m ear.train " + shlex.join(stage), flush=True)
            if not args.dry_run:
                main(stage)
        return
    if args.stage == "tokenizer":
        from ear.train.stage_tokenizer import train
    else:
        from ear.train.stage_ear import train
    train(args)


if __name__ == "__main__":
    main()
