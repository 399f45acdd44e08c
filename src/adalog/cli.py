"""The ``adalog`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from adalog.errors import AdalogError


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="ImageNet-style folder of <wnid>/ images")
    parser.add_argument("--list", dest="include", help="keep only the images in this file list")
    parser.add_argument("--exclude-list", dest="exclude", help="drop the images in this list")
    parser.add_argument("--label-map", help="JSON {folder: ImageNet index} for non-wnid folders")
    parser.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="data loader processes")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")


def _add_model_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--model", required=required, help="timm model name, tags allowed")
    parser.add_argument(
        "--weights", help="local .safetensors/.pth/.bin weights (default: timm hub download)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adalog", description="AdaLog post-training quantization of Vision Transformers"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="top-1/top-5 of a model on an image folder")
    _add_model_args(ev, required=True)
    _add_data_args(ev)
    ev.add_argument("--json", help="write the result to this JSON file")
    ev.set_defaults(func=_cmd_eval)
    return parser


def _cmd_eval(args: argparse.Namespace) -> None:
    from adalog.models import create_model
    from adalog.pipelines.evaluate import build_eval_loader, evaluate

    model = create_model(args.model, weights=args.weights)
    loader = build_eval_loader(
        model,
        args.data,
        include=args.include,
        exclude=args.exclude,
        label_map=args.label_map,
        batch_size=args.batch_size,
        workers=args.workers,
        skip_bad_images=args.skip_bad_images,
    )
    result = evaluate(model, loader, device=args.device, name=args.model)
    _report(result, args.json)


def _report(result, json_path: str | None) -> None:
    from adalog.io import atomic_write_json

    print(
        f"{result.model}: top-1 {result.top1:.4f}  top-5 {result.top5:.4f}  "
        f"n={result.n}  skipped={result.skipped_images}  ({result.seconds:.1f} s)"
    )
    if json_path:
        atomic_write_json(json_path, result.to_json())
        print(f"wrote {json_path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        print("adalog: error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        args.func(args)
    except AdalogError as exc:
        print(f"adalog: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
