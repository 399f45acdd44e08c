"""The ``adalog`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from adalog.config import PLUS_RECONSTRUCTION, PRESETS, is_plus_preset
from adalog.errors import AdalogError, ConfigError

#: calibration images of a detector unless --calib-size says otherwise (a handful, as the
#: detection protocol; one 800 x 1088 image has 17 times the pixels of a 224 x 224 crop)
DETECTOR_CALIB_SIZE = 4
PRESET_HELP = (
    "w3a3/w4a4/w6a6: the reference configuration (reproduce the paper); w3a3-plus/w4a4-plus/"
    "w6a6-plus: the same bits with the options beyond the reference that measured best "
    "(value rotation and GPTQ rounding; adalog quantize follows them on a classifier with the "
    "'light' reconstruction, which learns the rounding instead)"
)


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="ImageNet-style folder of <wnid>/ images")
    parser.add_argument("--list", dest="include", help="keep only the images in this file list")
    parser.add_argument("--exclude-list", dest="exclude", help="drop the images in this list")
    parser.add_argument("--label-map", help="JSON {folder: ImageNet index} for non-wnid folders")
    parser.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="data loader processes")
    _add_device_arg(parser, "evaluate on")


def _add_device_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help=f"device to {what}: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N; "
        "checkpoints hold CPU tensors and load anywhere",
    )


def _add_model_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--model",
        required=required,
        help="timm model name; a pretrained tag (e.g. vit_tiny_patch16_224.augreg_in21k) picks "
        "the weights' preprocessing and classifier size, and is recorded in the checkpoint",
    )
    parser.add_argument(
        "--weights", help="local .safetensors/.pth/.bin weights (default: timm hub download)"
    )
    parser.add_argument(
        "--model-kwargs",
        type=_json_object,
        default={},
        metavar="JSON",
        help="timm constructor kwargs, e.g. '{\"num_classes\": 10}' (recorded in the checkpoint)",
    )


def _json_object(text: str) -> dict:
    """argparse type of --model-kwargs: a JSON object."""
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('must be a JSON object such as {"num_classes": 10}')
    return value


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    """--preset or --config, then bit-width overrides (quantize and ablate)."""
    parser.add_argument("--preset", choices=PRESETS, help=PRESET_HELP + " (default w4a4)")
    parser.add_argument("--config", help="JSON/YAML config file (instead of --preset)")
    for name, what in (("w", "weights"), ("a", "activations"), ("s", "post-Softmax quantizer")):
        parser.add_argument(
            f"--{name}-bits", type=int, metavar="N", help=f"bits of the {what} (2-8)"
        )


def _base_config(args: argparse.Namespace):
    """The config named by --preset or --config, with the bit-width flags applied."""
    from adalog.config import AdaLogConfig

    if args.preset and args.config:
        raise ConfigError("pass --preset or --config, not both (a config file sets every field)")
    if args.config:
        config = AdaLogConfig.load(args.config)
    else:
        config = AdaLogConfig.preset(args.preset or "w4a4")
    bits = {f"{k}_bits": getattr(args, f"{k}_bits") for k in ("w", "a", "s")}
    return config.with_overrides(**{k: v for k, v in bits.items() if v is not None})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adalog", description="AdaLog post-training quantization of Vision Transformers"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="top-1/top-5 of a model on an image folder")
    _add_model_args(ev, required=False)
    ev.add_argument("--quantized", help="evaluate the quantized checkpoint in this folder")
    ev.add_argument("--artifact", help="run this exported integer artifact (adalog export)")
    ev.add_argument(
        "--engine",
        choices=("reference", "fast", "onnx"),
        help="CPU engine: integer execution of --artifact (reference: exact int64 GEMMs; fast: "
        "oneDNN int8 linears and int8 _int_mm, float LUT for log-coded operands; onnx: the fast "
        "engine's graph in ONNX Runtime, ViT/DeiT only; default reference), or with --model the "
        "FP32 model in the same engine (fast: oneDNN linears; onnx: ONNX Runtime)",
    )
    ev.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="float type of the float parts (float64: fake-quant and the reference engine give "
        "the same codes, free of float32 rounding; not the fast engine)",
    )
    _add_data_args(ev)
    ev.add_argument("--json", help="write the result to this JSON file")
    ev.set_defaults(func=_cmd_eval)

    qu = sub.add_parser("quantize", help="calibrate a model with AdaLog and save it")
    _add_model_args(qu, required=True)
    qu.add_argument("--calib-data", required=True, help="ImageNet-style folder of <wnid>/ images")
    qu.add_argument(
        "--calib-list",
        help="file list of the calibration images (default: calib_size images drawn at random "
        "under --seed, spread over the folder's sub-folders; listed in the checkpoint)",
    )
    _add_config_args(qu)
    qu.add_argument(
        "--calib-size",
        type=int,
        metavar="N",
        help="calibration images drawn from --calib-data (default: the config's calib_size, "
        f"32 in the presets; {DETECTOR_CALIB_SIZE} for detectors, whose images are large)",
    )
    qu.add_argument(
        "--seed", type=int, help="seed of the calibration selection, augmentation and search"
    )
    qu.add_argument(
        "--eval-transform",
        action="store_true",
        help="calibrate on the eval transform instead of training augmentation",
    )
    _add_variant_args(qu)
    qu.add_argument(
        "--reconstruct",
        nargs="?",
        const="fast",
        metavar="PRESET|FILE",
        help="after calibration, block reconstruction (AdaRound; the reference also trains the "
        "activation scales) on views of the calibration images: preset 'fast' (default when "
        "the flag is bare), 'light' (the default of the *-plus presets) or 'reference', a "
        "JSON/YAML ReconstructConfig file, or 'none' (calibrate only); --seed also seeds it",
    )
    qu.add_argument(
        "--resume",
        metavar="DIR",
        help="save progress here after every block (calibration, then reconstruction in "
        "DIR/reconstruct); rerunning the same command continues there",
    )
    qu.add_argument(
        "--search-workers",
        type=int,
        metavar="N",
        default=1,
        help="module searches of a block run at once, each on threads/N intra-op threads "
        "(default 1: one search at a time on all threads)",
    )
    _add_device_arg(qu, "calibrate (and reconstruct) on")
    qu.add_argument(
        "--out",
        required=True,
        help="output folder for the quantized checkpoint (checked before any work; with "
        "--reconstruct the calibrated model is saved first to OUT/calibrated)",
    )
    qu.set_defaults(func=_cmd_quantize)

    ab = sub.add_parser(
        "ablate", help="calibrate + evaluate a set of quantizer variants (resumable tables, plots)"
    )
    _add_model_args(ab, required=True)
    ab.add_argument("--calib-data", required=True, help="folder of the calibration images")
    ab.add_argument("--calib-list", help="file list of the calibration images")
    ab.add_argument("--data", required=True, help="evaluation folder")
    ab.add_argument("--exclude-list", help="images of --data to leave out (e.g. calib32.txt)")
    ab.add_argument("--out", required=True, help="run folder (rerun to resume)")
    ab.add_argument(
        "--sets",
        nargs="+",
        default=["post-gelu", "post-softmax"],
        help="variant sets: post-gelu, post-softmax, fpcs, log-scale",
    )
    ab.add_argument("--variants", nargs="+", help="run only these variant names")
    _add_config_args(ab)
    ab.add_argument("--seed", type=int)
    ab.add_argument("--plot-block", type=int, help="block whose activations are plotted")
    ab.add_argument("--batch-size", type=int, default=64)
    ab.add_argument("--workers", type=int)
    _add_device_arg(ab, "calibrate and evaluate on")
    ab.set_defaults(func=_cmd_ablate)

    de = sub.add_parser("detect-eval", help="COCO box and mask AP of a detector (FP or quantized)")
    _add_model_args(de, required=False)
    de.add_argument("--quantized", help="evaluate the quantized detector in this folder")
    de.add_argument("--coco-root", required=True, help="folder of the images (file_name root)")
    de.add_argument("--ann", required=True, help="COCO instances annotation file (JSON)")
    de.add_argument("--limit", type=int, metavar="N", help="only the first N images (by id)")
    _add_device_arg(de, "evaluate on")
    de.add_argument("--json", help="write the result to this JSON file")
    de.set_defaults(func=_cmd_detect_eval)

    ex = sub.add_parser("export", help="export a quantized checkpoint as packed integer codes")
    ex.add_argument("qdir", help="quantized checkpoint folder (adalog quantize --out)")
    ex.add_argument("--out", required=True, help="artifact folder")
    ex.add_argument(
        "--onnx",
        help="also write the artifact as an ONNX model (the onnx engine's graph: integer "
        "linears, LUT-coded log operands; ViT/DeiT only) to this file",
    )
    ex.set_defaults(func=_cmd_export)
    return parser


def _cmd_eval(args: argparse.Namespace) -> None:
    import torch

    from adalog.distributed import join, rank_device
    from adalog.models import create_model
    from adalog.pipelines.checkpoint import load_quantized
    from adalog.pipelines.evaluate import build_eval_loader, evaluate

    _check_eval_sources(args)
    device = rank_device("cpu" if args.engine or args.artifact else args.device)
    ranks = join(device)
    if args.artifact:
        from adalog.runtime import load_integer_model

        engine = args.engine or "reference"
        if engine == "onnx":
            from adalog.runtime.onnx_engine import load_onnx_model

            model = load_onnx_model(args.artifact, args.model)
        else:
            dtype = getattr(torch, args.dtype)
            model = load_integer_model(args.artifact, engine, args.model, dtype)
        name = model.adalog_meta["model"]
    elif args.quantized:
        model = load_quantized(args.quantized, expected_model=args.model)
        name = model.adalog_meta["model"]
        if args.dtype != "float32":  # keep the float32 weight codes (the exported ones)
            from adalog.models.qmodules import snap_weights_to_grid

            snap_weights_to_grid(model)
    elif args.model:
        model = create_model(args.model, weights=args.weights, **args.model_kwargs)
        name = args.model
        if args.engine == "fast":  # FP32 on the fast engine's oneDNN GEMMs
            from adalog.runtime.fast import onednn_linears

            model = onednn_linears(model)
        elif args.engine == "onnx":  # FP32 in ONNX Runtime
            from adalog.runtime.onnx_engine import onnx_model

            model = onnx_model(model)
    else:
        raise AdalogError("pass --model (FP evaluation), --quantized QDIR or --artifact ART")
    from adalog.models.detection import is_detector

    if is_detector(model):
        raise ConfigError(f"{name} is a detector; score it with adalog detect-eval")
    loader = build_eval_loader(
        model,
        args.data,
        include=args.include,
        exclude=args.exclude,
        label_map=args.label_map,
        batch_size=args.batch_size,
        workers=args.workers,
        skip_bad_images=args.skip_bad_images,
        ranks=ranks,
    )
    dtype = getattr(torch, args.dtype)
    result = evaluate(model, loader, device=device, name=name, dtype=dtype, ranks=ranks)
    if args.quantized:
        result.extra["quantized"] = str(args.quantized)
        result.extra["bits"] = model.adalog_meta["bits"]
    if args.artifact:
        result.extra.update(artifact=str(args.artifact), bits=model.adalog_meta["bits"])
        result.extra.update(engine=engine, precision="integer")
        kernel = getattr(model, "integer_kernel", None)
        if kernel is not None:
            result.extra["kernel_calls"] = kernel.stats
        if getattr(kernel, "fallback_reason", None):
            result.extra["kernel_fallback"] = kernel.fallback_reason
    elif args.engine:
        linears = {"fast": "oneDNN fp32", "onnx": "ONNX Runtime fp32"}[args.engine]
        result.extra.update(engine=args.engine, precision="fp32", linears=linears)
    if ranks.is_main:
        _report(result, args.json)


def _cmd_detect_eval(args: argparse.Namespace) -> None:
    from adalog.io import atomic_write_json
    from adalog.models import create_model
    from adalog.models.detection import is_detector
    from adalog.pipelines.checkpoint import load_quantized
    from adalog.pipelines.detection_eval import evaluate_detector

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    if args.quantized:
        model = load_quantized(args.quantized, expected_model=args.model)
        name = model.adalog_meta["model"]
    elif args.model:
        model = create_model(args.model, weights=args.weights, **args.model_kwargs)
        name = args.model
    else:
        raise AdalogError("pass --model NAME [--weights CKPT] (FP) or --quantized QDIR")
    if not is_detector(model):
        raise ConfigError(f"{name} is a classifier; detect-eval evaluates detectors (use eval)")
    result = {"model": name} | evaluate_detector(
        model, args.coco_root, args.ann, limit=args.limit, device=args.device
    )
    if args.quantized:
        result |= {"quantized": str(args.quantized), "bits": model.adalog_meta["bits"]}
    print(
        f"{name}: box AP {result['bbox_AP']:.4f} (AP50 {result['bbox_AP50']:.4f})  "
        f"mask AP {result['segm_AP']:.4f} (AP50 {result['segm_AP50']:.4f})  "
        f"n={result['n_images']}  ({result['seconds']:.1f} s)"
    )
    if args.json:
        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")


def _check_eval_sources(args: argparse.Namespace) -> None:
    """One model source; engines are CPU-only and run artifacts or the FP32 baseline."""
    if args.artifact and args.quantized:
        raise AdalogError("pass either --quantized (fake-quant) or --artifact (integer), not both")
    if args.engine and args.quantized:
        raise AdalogError("--engine runs an --artifact or the FP32 --model, not --quantized")
    if args.engine == "reference" and not args.artifact:
        raise AdalogError("the reference engine runs integer artifacts; the FP32 baseline is fast")
    if args.dtype != "float32" and args.engine in ("fast", "onnx"):
        raise AdalogError(f"the {args.engine} engine runs float32 only, not --dtype {args.dtype}")
    if (args.engine or args.artifact) and args.device not in ("auto", "cpu"):
        raise AdalogError(f"the integer/fast engines run on the CPU, not --device {args.device}")


def _add_variant_args(parser: argparse.ArgumentParser) -> None:
    """Ablation switches applied on top of --preset / --config (issue: baselines and ablations)."""
    from adalog.config import (
        POST_GELU_CHOICES,
        POST_SOFTMAX_CHOICES,
        SEARCH_ENGINE_CHOICES,
        WEIGHT_ROUNDING_CHOICES,
    )

    parser.add_argument(
        "--post-softmax", choices=POST_SOFTMAX_CHOICES, help="post-Softmax quantizer"
    )
    parser.add_argument("--post-gelu", choices=POST_GELU_CHOICES, help="post-GELU quantizer")
    parser.add_argument(
        "--no-bias-reparam",
        action="store_true",
        help="no post-GELU shift / bias reparameterization (log quantizers see raw GELU output)",
    )
    parser.add_argument("--no-fpcs", action="store_true", help="plain exhaustive grid, no FPCS")
    parser.add_argument(
        "--log-scale-search",
        choices=("transplant", "own"),
        help="post-GELU log2/log-sqrt2 scale: AdaLog's (reference) or its own search",
    )
    parser.add_argument(
        "--search-engine", choices=SEARCH_ENGINE_CHOICES, help="fast (default) or naive scoring"
    )
    parser.add_argument(
        "--weight-rounding",
        choices=WEIGHT_ROUNDING_CHOICES,
        help="nearest (reference) or gptq (error-feedback rounding of every weight but the head's "
        "on its searched grid; not combinable with a reconstruction, so with a *-plus preset "
        "on a classifier it needs --reconstruct none)",
    )
    parser.add_argument(
        "--fc2-token-norm",
        action="store_true",
        help="score the post-GELU fc2 searches with each token's error divided by its input's "
        "squared norm (beyond the reference)",
    )
    parser.add_argument(
        "--rotate-values",
        action="store_true",
        help="rotate each attention head's values and proj's matching input columns by a fixed "
        "random orthogonal matrix before calibration (exact in float; beyond the reference)",
    )


def variant_overrides(args: argparse.Namespace) -> dict:
    """Config overrides named by the ablation switches (only those given)."""
    overrides = {
        "post_softmax": args.post_softmax,
        "post_gelu": args.post_gelu,
        "log_scale_search": args.log_scale_search,
        "search_engine": args.search_engine,
        "weight_rounding": args.weight_rounding,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.no_bias_reparam:
        overrides["bias_reparam"] = False
    if args.no_fpcs:
        overrides["fpcs"] = False
    if args.fc2_token_norm:
        overrides["fc2_token_norm"] = True
    if args.rotate_values:
        overrides["rotate_values"] = True
    return overrides


def _cmd_quantize(args: argparse.Namespace) -> None:
    from adalog.distributed import barrier, join, launched_world_size, rank_device
    from adalog.models import create_model
    from adalog.models.detection import DETECTORS
    from adalog.pipelines.calibrate import calibrate, calibration_batch
    from adalog.pipelines.checkpoint import check_output_folder, load_quantized, save_quantized

    config = _base_config(args)
    overrides = variant_overrides(args)
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.calib_size is not None:
        if args.calib_size < 1:
            raise ConfigError(f"--calib-size must be at least 1, got {args.calib_size}")
        overrides["calib_size"] = args.calib_size
    elif args.model in DETECTORS:
        overrides["calib_size"] = DETECTOR_CALIB_SIZE
    if args.eval_transform:
        overrides["calib_augment"] = False
    config = config.with_overrides(**overrides)
    recon = _reconstruct_config(args, detector=args.model in DETECTORS)
    preset_reconstructs = recon is not None and args.reconstruct is None  # a *-plus default
    if recon is not None and config.weight_rounding != "nearest":
        if args.weight_rounding is not None:
            raise ConfigError(
                f"--preset {args.preset} reconstructs, which learns the weight rounding: "
                "add --reconstruct none to calibrate only with --weight-rounding gptq"
                if preset_reconstructs
                else "--reconstruct learns the weight rounding itself: drop --weight-rounding gptq"
            )
        if not preset_reconstructs:  # the *-plus default says so in its own note
            print(
                "note: --reconstruct learns the weight rounding; the GPTQ rounding of the "
                "preset/config is left out (weight_rounding='nearest')",
                file=sys.stderr,
            )
        config = config.with_overrides(weight_rounding="nearest")
    if args.search_workers < 1:
        raise ConfigError(f"--search-workers must be at least 1, got {args.search_workers}")
    if recon is not None and args.model in DETECTORS:
        raise ConfigError("--reconstruct supports classifiers only; detectors are calibrate-only")
    if recon is None and launched_world_size() > 1:
        raise ConfigError(
            "under torchrun adalog quantize needs a reconstruction (--reconstruct, or a *-plus "
            "preset without --reconstruct none): calibration alone runs in one process"
        )
    device = rank_device(args.device)
    ranks = join(device)
    if ranks.is_main and preset_reconstructs:
        print(
            f"note: --preset {args.preset} reconstructs with the '{PLUS_RECONSTRUCTION}' preset "
            "after calibration (learned rounding instead of GPTQ; --reconstruct none: "
            "calibrate only)",
            file=sys.stderr,
        )
    # checked before any work, by rank 0 only (the others would see its files)
    out = check_output_folder(args.out) if ranks.is_main else Path(args.out)
    model = create_model(args.model, weights=args.weights, **args.model_kwargs)
    images, record = calibration_batch(model, args.calib_data, args.calib_list, config)
    if ranks.is_main:  # calibration runs once; the other ranks load its result
        model.to(device)
        calibrate(
            model,
            images,
            config,
            resume_dir=args.resume,
            search_workers=args.search_workers,
            calibration=record,
        )
    if recon is not None:
        from adalog.pipelines.reconstruct import reconstruct

        if ranks.is_main:
            save_quantized(model, out / "calibrated")
            print(f"saved the calibrated model to {out / 'calibrated'}; reconstructing")
        barrier(ranks)
        if ranks.active:  # every rank starts from the same saved model
            model = load_quantized(out / "calibrated").to(device)
        resume = None if args.resume is None else Path(args.resume) / "reconstruct"
        reconstruct(model, images, recon, resume_dir=resume, ranks=ranks)
    if not ranks.is_main:
        return
    save_quantized(model, out)
    print(
        f"wrote quantized {args.model} ({config.w_bits}/{config.a_bits}/{config.s_bits} bits"
        f"{', reconstructed' if recon is not None else ''}) to {out}"
    )


def _reconstruct_config(args: argparse.Namespace, detector: bool):
    """The ReconstructConfig named by ``--reconstruct``; without the flag, PLUS_RECONSTRUCTION
    for a ``*-plus`` preset on a classifier, else None (as for ``--reconstruct none``)."""
    spec = args.reconstruct
    if spec is None and is_plus_preset(args.preset) and not detector:
        spec = PLUS_RECONSTRUCTION
    if spec is None or spec == "none":
        return None
    from adalog.recon.config import ReconstructConfig

    recon = ReconstructConfig.resolve(spec)
    return recon if args.seed is None else recon.with_overrides(seed=args.seed)


def _cmd_ablate(args: argparse.Namespace) -> None:
    from adalog.models.detection import DETECTORS
    from adalog.pipelines.ablation import ablate, select_variants

    if args.model in DETECTORS:
        raise ConfigError("ablate evaluates classifiers by top-1; detectors are not supported")

    base = _base_config(args)
    if args.seed is not None:
        base = base.with_overrides(seed=args.seed)
    variants = select_variants(args.sets, args.variants)
    results = ablate(
        args.model,
        args.weights,
        args.calib_data,
        args.calib_list,
        args.data,
        args.exclude_list,
        args.out,
        variants,
        base,
        plot_block=args.plot_block,
        batch_size=args.batch_size,
        workers=args.workers,
        model_kwargs=args.model_kwargs,
        device=args.device,
    )
    print(f"{len(results)}/{len(variants)} variants finished; tables and plots in {args.out}")


def _cmd_export(args: argparse.Namespace) -> None:
    from adalog.pipelines.export import export_artifact

    meta = export_artifact(args.qdir, args.out)
    size, fp32 = meta["size_bytes"]["artifact"], meta["size_bytes"]["fp32_weights"]
    print(
        f"wrote {args.out}: {size / 2**20:.2f} MiB on disk; the FP32 weights of its "
        f"{len(meta['layers'])} quantized layers alone take {fp32 / 2**20:.2f} MiB "
        f"({fp32 / size:.1f}x)"
    )
    if args.onnx:
        from adalog.runtime.onnx_engine import load_onnx_model

        load_onnx_model(args.out).save(args.onnx)
        print(f"wrote {args.onnx}: {Path(args.onnx).stat().st_size / 2**20:.2f} MiB")


def _report(result, json_path: str | None) -> None:
    from adalog.io import atomic_write_json

    speed = result.extra.get("images_per_s")
    print(
        f"{result.model}: top-1 {result.top1:.4f}  top-5 {result.top5:.4f}  "
        f"n={result.n}  skipped={result.skipped_images}  ({result.seconds:.1f} s"
        + (f", model {speed:.1f} images/s)" if speed else ")")
    )
    if json_path:
        atomic_write_json(json_path, result.to_json())
        print(f"wrote {json_path}")


#: Commands that split their work over the processes of ``torchrun`` (adalog.distributed).
DISTRIBUTED_COMMANDS = ("eval", "ablate", "quantize")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        print("adalog: error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    from adalog.distributed import launched_world_size, leave  # imports torch: after --help

    try:
        if launched_world_size() > 1 and args.command not in DISTRIBUTED_COMMANDS:
            raise ConfigError(
                f"adalog {args.command} runs in one process; under torchrun only "
                f"{', '.join(DISTRIBUTED_COMMANDS)} split their work over the ranks"
            )
        args.func(args)
    except AdalogError as exc:
        print(f"adalog: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        leave()
    return 0


def _one_line(exc: AdalogError) -> str:
    """The error's own message: an error raised in a DataLoader worker arrives re-raised with
    the worker's traceback as its text, whose last line is the original ``Type: message``."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    prefix = f"\n{type(exc).__module__}.{type(exc).__qualname__}: "
    start = text.rfind(prefix)
    return text[start + len(prefix) :].strip() if start >= 0 else text


if __name__ == "__main__":
    sys.exit(main())
