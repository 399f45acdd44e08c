"""Calibration pipeline (docs/algorithm.md §6): capture FP tensors block by block, run each
module's search (§5.7), fold post-LayerNorm scales (§3) and the post-GELU shift (§4)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from adalog.config import AdaLogConfig
from adalog.data import (
    ImageRecord,
    LabeledImageFolder,
    calibration_transform,
    letterbox_transform,
    list_images,
    model_data_config,
    spread_sample,
)
from adalog.devices import exact_matmuls, model_device, resolve_device
from adalog.errors import ConfigError, DataError
from adalog.models.detection import is_detector
from adalog.models.hooks import StopForward, forward_batches, forward_hooks
from adalog.models.qmodules import (
    QuantConv2d,
    QuantConvTranspose2d,
    QuantLinear,
    QuantMatMul,
    set_quant_mode,
)
from adalog.models.rotation import rotate_value_heads
from adalog.models.wrap import Target, wrap_model
from adalog.pipelines.checkpoint import quantization_meta
from adalog.pipelines.runstore import (
    load_partial_state,
    load_progress,
    model_identity,
    run_fingerprint,
    save_progress,
    tensor_digest,
)
from adalog.pipelines.weight_rounding import gptq_round_weights
from adalog.quant import LogQuantizer, TwinUniformQuantizer, UniformQuantizer
from adalog.recon.data import augmented_views
from adalog.search.procedures import (
    SearchSettings,
    calibrate_conv_weight,
    calibrate_linear,
    calibrate_matmul_av,
    calibrate_matmul_qk,
    calibrate_post_gelu_log,
    calibrate_post_gelu_twin,
    channelwise_input_search,
)

#: Search order inside a block when modules run in parallel: the costliest first, so that the
#: last module to finish is a short one (longest-processing-time-first scheduling).
_COST_RANK = {
    "linear_gelu": 0, "matmul_av": 1, "matmul_qk": 2, "linear_ln": 3, "linear": 4, "conv_act": 5
}  # fmt: skip

#: Smallest crop area of the seeded views whose Gram matrices GPTQ uses (as reconstruction's).
GPTQ_CROP_SCALE_MIN = 0.25


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


#: Calibration images: a ready (N, 3, H, W) tensor, a folder, or a list of image files.
CalibrationData = Tensor | str | Path | Sequence[str | Path]


def calibration_batch(
    model: nn.Module,
    data: str | Path | Sequence[str | Path],
    list_file: str | Path | None,
    config: AdaLogConfig,
) -> tuple[Tensor, dict[str, Any]]:
    """The calibration batch ``(N, 3, H, W)`` and a record of it for the checkpoint.

    ``data`` is a folder (any layout; class sub-folders not needed) or a list of image files.
    From a folder: the images of ``list_file``, or else ``config.calib_size`` images drawn under
    ``config.seed`` and spread over its sub-folders (:func:`adalog.data.spread_sample`; the
    first files in sorted order would be one ImageNet class). Each image goes through the
    seeded calibration transform (§6.1): training augmentation, or the eval transform when
    ``config.calib_augment`` is off.
    """
    if isinstance(data, (str, Path)):
        root = Path(data)
        paths = list_images(root, list_file)
        selection = "list" if list_file is not None else "all"
        if list_file is None and len(paths) > config.calib_size:
            paths = spread_sample(paths, config.calib_size, config.seed)
            selection = f"random, spread over folders (seed {config.seed})"
    else:
        if list_file is not None:
            raise DataError("a list file selects images of a folder; got a list of images")
        paths = [Path(p).resolve() for p in data]
        missing = [str(p) for p in paths if not p.is_file()]
        if not paths or missing:
            raise DataError(f"calibration images not found: {', '.join(missing[:5]) or 'none'}")
        root, selection = None, "given files"
    seed_everything(config.seed)
    if is_detector(model):
        transform, how = letterbox_transform(model), "letterbox on the detector's canvas"
    else:
        transform = calibration_transform(model, config.calib_augment)
        how = f"training augmentation (seed {config.seed})" if config.calib_augment else "eval"
    dataset = LabeledImageFolder([ImageRecord(p, -1) for p in paths], transform)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    record = {
        "source": str(root) if root is not None else None,
        "list": str(list_file) if list_file is not None else None,
        "selection": selection,
        "images": [_relative(p, root) for p in paths],
        "transform": how,
    }
    return images, record


def load_calibration_images(
    model: nn.Module,
    data: str | Path | Sequence[str | Path],
    list_file: str | Path | None,
    config: AdaLogConfig,
) -> Tensor:
    """The calibration batch of :func:`calibration_batch`, without its record."""
    return calibration_batch(model, data, list_file, config)[0]


def _relative(path: Path, root: Path | None) -> str:
    if root is not None and path.is_relative_to(root.resolve()):
        return str(path.relative_to(root.resolve()))
    return str(path)


def quantize(
    model: nn.Module,
    calib_data: CalibrationData,
    config: AdaLogConfig | None = None,
    *,
    calib_list: str | Path | None = None,
    progress: bool = True,
    resume_dir: str | Path | None = None,
    search_workers: int = 1,
    model_kwargs: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Quantize ``model`` in place with AdaLog and return it (``adalog.quantize``).

    ``calib_data`` is a folder or a list of image files, turned into the calibration batch
    exactly as ``adalog quantize`` does (:func:`calibration_batch`: ``calib_size``, seeded
    selection and transform, ``calib_augment``), or a ready ``(N, 3, H, W)`` tensor, used as
    it is (the checkpoint then records a tensor source, not a selection or transform).
    ``config`` defaults to the reference W4A4 preset. ``resume_dir`` saves progress after every
    block; rerunning the same call continues there (progress of another run is refused).
    ``model_kwargs`` declares timm constructor kwargs for a model not built by
    :func:`adalog.models.create_model` (which records them), so the checkpoint can rebuild it.
    ``device`` (``"auto"``: CUDA when available, ``"cpu"``, ``"cuda:1"``, …) moves the model
    there first; by default it calibrates where the model is. The checkpoint does not depend on
    it: :func:`save_quantized` writes CPU tensors.
    """
    config = AdaLogConfig() if config is None else config
    if device is not None:
        model.to(resolve_device(device))
    if isinstance(calib_data, Tensor):
        if calib_list is not None:
            raise DataError("calib_list selects images of a folder; got a tensor")
        images, record = calib_data, {"source": "tensor", "selection": "given tensor"}
    else:
        images, record = calibration_batch(model, calib_data, calib_list, config)
    if search_workers < 1:
        raise ConfigError(f"search_workers must be at least 1, got {search_workers}")
    return calibrate(
        model,
        images,
        config,
        progress=progress,
        model_kwargs=model_kwargs,
        resume_dir=resume_dir,
        search_workers=search_workers,
        calibration=record,
    )


def _run_capture(model: nn.Module, images: Tensor, batch_size: int, targets, stop_after):
    """Every target's inputs (and linear/conv outputs), up to ``stop_after``."""
    records: dict[str, list] = {t.name: [] for t in targets}

    def hook(name, module, inputs, output):
        keep_output = not isinstance(module, QuantMatMul)
        records[name].append((inputs, output if keep_output else None))
        if module is stop_after:
            raise StopForward

    with forward_hooks({t.name: t.module for t in targets}, hook):
        forward_batches(model, images, batch_size)
    return records


def _cat(chunks: list, index: int | None = None) -> Tensor:
    """Concatenate captured chunks: ``index`` selects an input, ``None`` the output."""
    return torch.cat([c[1] if index is None else c[0][index] for c in chunks])


def calibrate(
    model: nn.Module,
    images: Tensor,
    config: AdaLogConfig,
    progress: bool = True,
    model_kwargs: dict | None = None,
    timings: dict[str, float] | None = None,
    resume_dir: str | Path | None = None,
    reuse: Reuse | None = None,
    search_workers: int = 1,
    calibration: dict[str, Any] | None = None,
) -> nn.Module:
    """Wrap ``model`` in place, calibrate it on ``images`` and return it in quant mode (the
    engine behind :func:`quantize`, with the hooks benchmarks and ablations need).

    ``model_kwargs`` are the timm constructor arguments beyond the name, recorded so that a
    saved checkpoint can rebuild the same architecture (default: those
    :func:`adalog.pipelines.runstore.model_kwargs_of` finds); ``calibration`` describes where
    ``images`` came from, for the checkpoint. ``timings``, when given, receives the
    wall seconds of every module's search and of the FP capture passes (key ``"capture"``).
    With ``resume_dir`` the state is saved there after every block, and a rerun with the same
    model (name, tag, kwargs, starting weights), config and images continues after the last
    saved block (another run's progress is refused, naming what differs): every module is calibrated
    on FP captures, so the result is the same as an uninterrupted run. With ``reuse`` only the
    modules it names are searched; every other module takes its result from ``reuse.state``.
    With ``config.weight_rounding == "gptq"`` the weights are re-rounded after the last block
    (:mod:`adalog.pipelines.weight_rounding`; ``timings["gptq"]``).

    Every module is searched on FP captures (§6.2), so the searches of one block are independent:
    ``search_workers`` of them run at once, each on its own thread with
    ``threads // search_workers`` intra-op threads; the result is that of a one-worker run at
    that many threads, bit for bit. On the 2-core benchmark machine two workers were only about
    5 % faster than one search on both cores (the searches are memory-bound) and held 1 GB more,
    so the default is one.
    """
    timings = {} if timings is None else timings
    if images.dim() != 4 or images.shape[0] == 0:
        raise DataError(
            f"calibration images must be a non-empty (N, C, H, W) batch, got {tuple(images.shape)}"
        )
    seed_everything(config.seed)
    model.eval()
    images = images.to(model_device(model))
    identity = model_identity(model)  # before rotation and folds change the weights
    if model_kwargs is not None:
        identity["model_kwargs"] = dict(model_kwargs)
    images_sha256 = tensor_digest([images])
    data_config = model_data_config(model)
    if config.rotate_values:
        rotate_value_heads(model)
    targets = wrap_model(model, config)
    model.eval()
    settings = SearchSettings(
        eq_n=config.eq_n,
        rounds=config.search_rounds,
        fpcs=config.fpcs,
        steps=config.fpcs_steps,
        zp_cap=config.zp_cap,
        conv_zp_cap=config.conv_zp_cap,
        engine=config.search_engine,
    )
    blocks = list(dict.fromkeys(t.block for t in targets))
    done: list[str] = []
    if resume_dir is not None:
        fingerprint = run_fingerprint(identity, config=config, images_sha256=images_sha256)
        done = load_progress(model, resume_dir, fingerprint)
    bar = tqdm(
        total=len(targets),
        initial=sum(t.block in done for t in targets),
        desc="calibrate",
        unit="module",
        disable=not progress,
    )
    for block in blocks:
        if block in done:
            continue
        members = [t for t in targets if t.block == block]
        searched = [t for t in members if reuse is None or reuse.recompute(t.name)]
        start = time.perf_counter()
        if searched:
            records = _run_capture(
                model, images, config.calib_batch_size, searched, searched[-1].module
            )
        timings["capture"] = timings.get("capture", 0.0) + time.perf_counter() - start
        for target in members:
            if target not in searched:  # the capture above saw this block before its folds
                start = time.perf_counter()
                prefixes = [target.name] + ([target.norm] if target.norm else [])
                load_partial_state(model, reuse.state, prefixes)
                timings[target.name] = time.perf_counter() - start
                bar.update()

        def search(target: Target, chunks: list) -> str:
            bar.set_description(f"calibrate {target.name}")
            start = time.perf_counter()
            _calibrate_target(model, target, chunks, settings, config)
            timings[target.name] = time.perf_counter() - start
            return target.name

        jobs = [(t, records.pop(t.name)) for t in searched]
        with exact_matmuls(enabled=images.is_cuda):
            for _ in _run_searches(jobs, search, search_workers):
                bar.update()
        if resume_dir is not None:
            done.append(block)
            save_progress(model, resume_dir, done, fingerprint)
    bar.close()
    if config.weight_rounding == "gptq":
        start = time.perf_counter()
        views = augmented_views(images, config.gptq_views, GPTQ_CROP_SCALE_MIN, True, config.seed)
        gptq_round_weights(model, views, config.calib_batch_size, config.gptq_damp, progress)
        timings["gptq"] = time.perf_counter() - start
    set_quant_mode(model, True)
    fold_post_gelu_shift(model)
    calibration = (calibration or {"source": "tensor", "selection": "given tensor"}) | {
        "n": images.shape[0],
        "images_sha256": images_sha256,
    }
    model.adalog_meta = quantization_meta(identity, config, data_config, calibration)
    return model


@dataclass(frozen=True)
class Reuse:
    """An earlier calibration of the same model on the same images (its pre-fold state, e.g.
    ``read_progress_state`` of a ``resume_dir`` run), kept for every module that
    ``recompute(name)`` rejects. Exact when a config change only touches the recomputed
    modules' own quantizers, because every module is calibrated on FP captures (§6.2)."""

    state: dict[str, Tensor]
    recompute: Callable[[str], bool]


def _run_searches(
    jobs: list[tuple[Target, list]], search: Callable[[Target, list], str], workers: int
) -> Iterator[str]:
    """Run ``search`` on every job, ``workers`` at a time; yield module names as they finish.

    Jobs are popped from ``jobs`` so that each capture is freed as soon as its search ends.
    """
    threads = torch.get_num_threads()
    if workers <= 1:
        while jobs:
            yield search(*jobs.pop(0))
        return
    # a lone module (patch embedding, head) gets the same thread count: results stay those of
    # a one-worker run at threads // workers, whatever the block
    jobs.sort(key=lambda job: _COST_RANK.get(job[0].role, len(_COST_RANK)))
    pool = ThreadPoolExecutor(min(workers, max(1, len(jobs))))
    with _intra_op_threads(max(1, threads // workers)), pool:
        futures = []
        while jobs:
            futures.append(pool.submit(search, *jobs.pop(0)))
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:  # on an error, do not start the searches still queued
            for future in futures:
                future.cancel()


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _calibrate_target(
    model: nn.Module, target: Target, chunks: list, settings: SearchSettings, config: AdaLogConfig
) -> None:
    module = target.module
    with torch.no_grad():
        if isinstance(module, QuantMatMul):
            a, b = _cat(chunks, 0), _cat(chunks, 1)
            if target.role == "matmul_qk":
                calibrate_matmul_qk(a, b, module.a_quant, module.b_quant, settings)
            else:
                calibrate_matmul_av(a, b, module.a_quant, module.b_quant, settings)
        elif isinstance(module, QuantConv2d):
            x, y = _cat(chunks, 0), _cat(chunks, None)
            patches = module.input_patches(x)
            y = y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
            if module.input_quant is None:
                calibrate_conv_weight(
                    patches, y, module.weight, module.bias, module.weight_quant, settings
                )
            else:
                _calibrate_conv_as_linear(module, patches, y, settings)
        elif isinstance(module, QuantConvTranspose2d):
            x, y = _cat(chunks, 0), _cat(chunks, None)
            x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
            rows, y = module.linear_rows(), module.linear_outputs(y)
            calibrate_linear(x, y, rows, None, module.weight_quant, module.input_quant, settings)
        else:
            x, y = _cat(chunks, 0), _cat(chunks, None)
            x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            if target.role == "linear_ln":
                x = fold_layernorm(model.get_submodule(target.norm), module, x, settings)
            args = (x, y, module.weight, module.bias, module.weight_quant, module.input_quant)
            if isinstance(module.input_quant, LogQuantizer):
                transplant = config.log_scale_search == "transplant"
                calibrate_post_gelu_log(*args, settings, transplant, config.fc2_token_norm)
            elif isinstance(module.input_quant, TwinUniformQuantizer):
                calibrate_post_gelu_twin(*args, settings)
            else:
                calibrate_linear(*args, settings)


def _calibrate_conv_as_linear(
    conv: QuantConv2d, patches: Tensor, y: Tensor, settings: SearchSettings
) -> None:
    """A conv with a quantized input is the linear layer of its receptive fields: searched as
    one on weight rows, the per-out-channel result copied into the conv's weight quantizer."""
    weight_quant = conv.weight_quant
    rows = conv.weight.reshape(conv.weight.shape[0], -1)
    row_quant = UniformQuantizer(
        weight_quant.n_bits, (rows.shape[0], 1), device=rows.device, dtype=rows.dtype
    )
    calibrate_linear(patches, y, rows, conv.bias, row_quant, conv.input_quant, settings)
    shape = weight_quant.scale.shape
    weight_quant.set_params(row_quant.scale.reshape(shape), row_quant.zero_point.reshape(shape))


def fold_layernorm(
    norm: nn.LayerNorm, module: QuantLinear, x: Tensor, settings: SearchSettings
) -> Tensor:
    """§3: per-channel search, then fold the channel scales into ``norm`` and ``module``.

    Returns the captured inputs transformed like the new LayerNorm output (``x / r - δ``).
    """
    quant: UniformQuantizer = module.input_quant
    scales, zps = channelwise_input_search(x, quant.n_bits, settings)
    s_star = scales.mean()
    z_star = zps.mean().round()
    r = scales / s_star
    delta = s_star * (z_star - zps)
    norm.weight.div_(r)
    norm.bias.div_(r).sub_(delta)
    module.weight.mul_(r)
    module.ensure_bias().add_(module.weight @ delta)
    quant.set_params(s_star.reshape(1), z_star.reshape(1))
    return x / r - delta


def fold_post_gelu_shift(model: nn.Module) -> None:
    """§4: fold ``-shift · Σ_j Ŵ[:, j]`` into the fc2 bias; the quantizer then skips ``-shift``."""
    for module in model.modules():
        quant = getattr(module, "input_quant", None)
        if not isinstance(module, QuantLinear) or not isinstance(quant, LogQuantizer):
            continue
        if float(quant.shift) == 0.0 or bool(quant.shift_folded):
            continue
        with torch.no_grad():
            w_hat = module.quantized_weight()
            module.ensure_bias().sub_(float(quant.shift) * w_hat.sum(dim=1))
        quant.set_shift_folded(True)
