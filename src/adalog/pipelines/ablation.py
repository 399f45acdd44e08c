"""Resumable ablation runs: calibrate + evaluate one config variant at a time, keep every result.

A run directory holds one JSON file per finished variant (``variants/<name>.json``, written
atomically when the variant is done) and tables rebuilt from all finished variants after each
one (``results.md``, ``results.csv``, ``results.json``). Rerunning the same command skips the
finished variants, so an interruption loses at most the variant in progress.

Every module is calibrated on FP captures (§6.2), so a variant that only changes the post-GELU
quantizer (or the post-Softmax one) leaves every other module's search result unchanged. Such
variants reuse a calibration of the base config (kept, resumable, under ``base/``) and search
only fc2 (or matmul2) again: the same parameters as a full calibration, several times faster.
Their ``calib_seconds`` counts only that work; ``searched`` says what was searched.

Under ``torchrun`` the ranks share the run folder: rank 0 evaluates the FP model and calibrates
the base once, then every rank takes the unfinished variants one at a time by an atomic claim
file (``claims/<job token>/<variant>``). Claims belong to one job, so a variant whose rank died
is unclaimed again for the next run; rank 0 writes the tables and plots at the end.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adalog.config import AdaLogConfig
from adalog.devices import model_device
from adalog.distributed import Ranks, barrier, broadcast_text, join, rank_device
from adalog.errors import ConfigError
from adalog.io import atomic_write_json, atomic_write_text
from adalog.models.parts import FC2, MATMUL_AV, model_parts
from adalog.pipelines.calibrate import Reuse, calibrate, load_calibration_images
from adalog.pipelines.runstore import (
    check_fingerprint,
    model_identity,
    read_progress_state,
    run_fingerprint,
    tensor_digest,
)


@dataclass(frozen=True)
class Variant:
    """A named set of config overrides applied on top of the run's base config."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    group: str = ""


def post_gelu_variants() -> list[Variant]:
    """Table-B style: every post-GELU quantizer, with and without the bias reparameterization
    where it applies (the shift only exists for the log quantizers)."""
    out = [
        Variant("gelu-uniform", {"post_gelu": "uniform"}, "post-gelu"),
        Variant("gelu-twin", {"post_gelu": "twin"}, "post-gelu"),
    ]
    for kind in ("log2", "logsqrt2", "adalog"):
        out.append(Variant(f"gelu-{kind}", {"post_gelu": kind}, "post-gelu"))
        out.append(
            Variant(
                f"gelu-{kind}-no-reparam", {"post_gelu": kind, "bias_reparam": False}, "post-gelu"
            )
        )
    return out


def post_softmax_variants(bits: tuple[int, ...] = (4, 3, 2)) -> list[Variant]:
    """Table-C style: every post-Softmax quantizer at each s-bit width."""
    return [
        Variant(f"softmax-{kind}-s{b}", {"post_softmax": kind, "s_bits": b}, "post-softmax")
        for b in bits
        for kind in ("uniform", "log2", "logsqrt2", "adalog")
    ]


def fpcs_variants() -> list[Variant]:
    """FPCS against the plain exhaustive grid (accuracy and calibration time)."""
    return [
        Variant("fpcs", {"fpcs": True}, "fpcs"),
        Variant("exhaustive", {"fpcs": False}, "fpcs"),
    ]


def log_scale_variants() -> list[Variant]:
    """Post-GELU log2/log-√2 with AdaLog's transplanted scale (reference) or their own search."""
    return [
        Variant(f"gelu-{kind}-{mode}", {"post_gelu": kind, "log_scale_search": mode}, "log-scale")
        for kind in ("log2", "logsqrt2")
        for mode in ("transplant", "own")
    ]


VARIANT_SETS: dict[str, Callable[[], list[Variant]]] = {
    "post-gelu": post_gelu_variants,
    "post-softmax": post_softmax_variants,
    "fpcs": fpcs_variants,
    "log-scale": log_scale_variants,
}


def select_variants(sets: list[str], only: list[str] | None = None) -> list[Variant]:
    """Variants of the named sets (duplicates by name dropped), optionally filtered by name."""
    unknown = [s for s in sets if s not in VARIANT_SETS]
    if unknown:
        raise ConfigError(f"unknown variant set(s) {unknown}; choose from {sorted(VARIANT_SETS)}")
    chosen: dict[str, Variant] = {}
    for name in sets:
        for variant in VARIANT_SETS[name]():
            chosen.setdefault(variant.name, variant)
    if only:
        missing = sorted(set(only) - set(chosen))
        if missing:
            raise ConfigError(f"unknown variant(s) {missing}; available: {sorted(chosen)}")
        return [chosen[name] for name in only]
    return list(chosen.values())


#: The FP model's result in a run folder (the tables' and the bar chart's reference).
FP32_FILE = "fp32.json"
#: Post-GELU log quantizers whose scale the reference transplants from AdaLog (§10 item 8).
FIXED_BASE_LOG_KINDS = ("log2", "logsqrt2")

#: Config fields whose change only affects the quantizers of the modules playing the part.
MODULE_LOCAL_FIELDS = {
    "post_gelu": FC2,
    "bias_reparam": FC2,
    "log_scale_search": FC2,
    "post_softmax": MATMUL_AV,
    "s_bits": MATMUL_AV,
}


def searched_parts(overrides: dict[str, Any]) -> tuple[str, ...] | None:
    """The parts (``fc2``, ``matmul_av``) whose modules a variant must search again, or None
    if it needs a full run."""
    if not overrides or not set(overrides) <= set(MODULE_LOCAL_FIELDS):
        return None
    return tuple(sorted({MODULE_LOCAL_FIELDS[k] for k in overrides}))


ModelFactory = Callable[[], nn.Module]
Evaluator = Callable[[nn.Module], dict[str, Any]]
Inspector = Callable[[nn.Module], dict[str, Any]]


def run_ablation(
    out_dir: str | Path,
    variants: list[Variant],
    base: AdaLogConfig,
    make_model: ModelFactory,
    images: Tensor,
    evaluate: Evaluator,
    inspect: Inspector | None = None,
    progress: bool = True,
    eval_data: dict[str, Any] | None = None,
    ranks: Ranks | None = None,
) -> list[dict[str, Any]]:
    """Run each unfinished variant and return all finished results in ``variants`` order.

    ``make_model`` builds a fresh FP model, ``evaluate`` returns at least ``top1``/``top5``, and
    ``inspect`` may add per-variant details (e.g. the representable levels for the plots).
    Every result carries the run's fingerprint (model with tag, kwargs and weights digest, base
    config, calibration images, ``eval_data``: what ``evaluate`` scores on); finished results
    of another run in ``out_dir`` are refused, naming what differs, instead of being reused.
    With ``ranks`` of several processes the variants are shared out by claims (module doc).
    """
    ranks = ranks or Ranks()
    out_dir = Path(out_dir)
    probe = make_model()
    parts = model_parts(probe)
    fingerprint = run_fingerprint(
        model_identity(probe),
        config=base,
        images_sha256=tensor_digest([images]),
        eval_data=eval_data or {},
    )
    check_finished(out_dir, fingerprint)
    (out_dir / "variants").mkdir(parents=True, exist_ok=True)
    pending = [v for v in variants if not _variant_path(out_dir, v).exists()]
    base_state = None
    if any(searched_parts(v.overrides) is not None for v in pending):
        if ranks.is_main:
            calibrate(make_model(), images, base, progress=progress, resume_dir=out_dir / "base")
        barrier(ranks)
        base_state = read_progress_state(out_dir / "base")
    claims = out_dir / "claims" / broadcast_text(uuid.uuid4().hex, ranks)
    for variant in pending:
        if ranks.active and not _claim(claims, variant, ranks):
            continue
        config = base.with_overrides(**variant.overrides)
        searched = searched_parts(variant.overrides)
        reuse = None
        if searched is not None:
            reuse = Reuse(base_state, lambda name, s=searched: parts.part_of(name) in s)
        model = make_model()
        start = time.perf_counter()
        calibrate(model, images, config, progress=progress and ranks.is_main, reuse=reuse)
        seconds = time.perf_counter() - start
        result = {
            "variant": variant.name,
            "group": variant.group,
            "overrides": variant.overrides,
            "config": config.to_dict(),
            "calib_seconds": seconds,
            "searched": "all" if searched is None else ", ".join(searched),
            **evaluate(model),
            "rank": f"{ranks.rank} of {ranks.world_size}",
            "fingerprint": fingerprint,
        }
        if inspect is not None:
            result["details"] = inspect(model)
        atomic_write_json(_variant_path(out_dir, variant), result)
        if ranks.is_main:
            write_tables(out_dir, all_results(out_dir))
    barrier(ranks)
    if ranks.active and ranks.is_main:
        write_tables(out_dir, all_results(out_dir))
        shutil.rmtree(out_dir / "claims", ignore_errors=True)
    return load_results(out_dir, variants)


def _claim(claims: Path, variant: Variant, ranks: Ranks) -> bool:
    """Take ``variant`` for this rank unless another rank of this job has: the claim file is
    created exclusively, which one rank wins on a shared file system."""
    claims.mkdir(parents=True, exist_ok=True)
    try:
        handle = os.open(claims / variant.name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(handle, "w") as file:
        file.write(f"rank {ranks.rank} of {ranks.world_size}\n")
    return True


def check_finished(out_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse a run folder whose finished variants were made by another run (another model,
    weights, base config, calibration images or evaluation set)."""
    for path in sorted((out_dir / "variants").glob("*.json")):
        saved = json.loads(path.read_text()).get("fingerprint", {})
        check_fingerprint(saved, fingerprint, path)


def _variant_path(out_dir: Path, variant: Variant) -> Path:
    return out_dir / "variants" / f"{variant.name}.json"


def load_results(out_dir: str | Path, variants: list[Variant]) -> list[dict[str, Any]]:
    """Finished results among ``variants``, in order."""
    paths = [_variant_path(Path(out_dir), v) for v in variants]
    return [json.loads(p.read_text()) for p in paths if p.exists()]


def all_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every finished result in the run folder (from any invocation): the known variants in
    set order, then any others by name."""
    known = [v for name in VARIANT_SETS for v in select_variants([name])]
    order = {v.name: i for i, v in enumerate(dict((v.name, v) for v in known).values())}
    paths = sorted(
        (Path(out_dir) / "variants").glob("*.json"),
        key=lambda p: (order.get(p.stem, len(order)), p.stem),
    )
    return [json.loads(p.read_text()) for p in paths]


def _row(result: dict[str, Any]) -> dict[str, Any]:
    config = result["config"]
    return {
        "variant": result["variant"],
        "group": result["group"],
        "post_gelu": config["post_gelu"],
        "post_softmax": config["post_softmax"],
        "s_bits": config["s_bits"],
        "bias_reparam": config["bias_reparam"],
        "log_scale_search": config["log_scale_search"],
        "fpcs": config["fpcs"],
        "top1": round(result["top1"], 4),
        "top5": round(result["top5"], 4),
        "calib_seconds": round(result["calib_seconds"], 1),
        "searched": result.get("searched", "all"),
    }


def write_tables(out_dir: str | Path, results: list[dict[str, Any]]) -> None:
    """``results.md`` (Table B / Table C style pivots, then every variant), ``results.csv`` and
    ``results.json`` from finished results; the FP model's ``fp32.json``, if present, is cited."""
    out_dir = Path(out_dir)
    rows = [_row(r) for r in results]
    atomic_write_json(out_dir / "results.json", rows)
    if not rows:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "results.csv", buffer.getvalue())
    lines = []
    fp32 = read_fp32(out_dir)
    if fp32 is not None:
        lines += [
            f"FP32 model: top-1 {_percent(fp32['top1'])}, top-5 {_percent(fp32['top5'])}.",
            "",
        ]
    lines += _pivot_tables(rows)
    header = list(rows[0])
    lines += ["All variants (top-1/top-5 as fractions, calibration seconds):", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[c]) for c in header) + " |" for row in rows]
    atomic_write_text(out_dir / "results.md", "\n".join(lines) + "\n")


def read_fp32(out_dir: str | Path) -> dict[str, Any] | None:
    """The FP model's result kept in the run folder (``fp32.json``), if it was evaluated."""
    path = Path(out_dir) / FP32_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f} %"


def _gelu_row_label(row: dict[str, Any]) -> str:
    kind = row["post_gelu"]
    if kind not in FIXED_BASE_LOG_KINDS:
        return kind
    return f"{kind} ({'own scale search' if row['log_scale_search'] == 'own' else 'AdaLog scale'})"


def _pivot_tables(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown pivots of top-1: post-GELU quantizer × bias reparameterization (Table B) and
    post-Softmax quantizer × bits (Table C); empty for groups without finished variants."""
    lines: list[str] = []
    gelu = [r for r in rows if r["group"] in ("post-gelu", "log-scale")]
    if gelu:
        lines += [
            "Post-GELU quantizer (fc2 input), top-1; the base config elsewhere. The shift and bias "
            "reparameterization (§4) exist for the log quantizers only; 'AdaLog scale': "
            "the reference transplants AdaLog's searched scale (§10 item 8).",
            "",
        ]
        lines += _pivot(
            gelu,
            _gelu_row_label,
            lambda r: (
                (0, "default (reparam where it applies)")
                if r["bias_reparam"]
                else (1, "no bias reparam")
            ),
            "post-GELU quantizer",
        )
    softmax = [r for r in rows if r["group"] == "post-softmax"]
    if softmax:
        lines += [
            "Post-Softmax quantizer (attention probabilities), top-1 by its bit-width; "
            "the base config elsewhere.",
            "",
        ]
        lines += _pivot(
            softmax,
            lambda r: r["post_softmax"],
            lambda r: (-r["s_bits"], f"{r['s_bits']}-bit"),
            "post-Softmax quantizer",
        )
    search = [r for r in rows if r["group"] == "fpcs"]
    if search:
        lines += ["Search: FPCS against the plain coarse grid (top-1, calibration time).", ""]
        lines += ["| search | top-1 | calibration (s) |", "|---|---|---|"]
        lines += [
            f"| {'FPCS' if r['fpcs'] else 'coarse grid only'} | {_percent(r['top1'])} "
            f"| {r['calib_seconds']:.0f} |"
            for r in search
        ]
        lines += [""]
    return lines


def _pivot(rows: list[dict[str, Any]], row_key: Callable, col_key: Callable, corner: str):
    """Rows in order of appearance; ``col_key`` gives (sort key, label) pairs."""
    row_names = list(dict.fromkeys(row_key(r) for r in rows))
    cols = sorted(set(col_key(r) for r in rows))
    cells = {(row_key(r), col_key(r)): _percent(r["top1"]) for r in rows}
    header = [corner, *(label for _, label in cols)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name in row_names:
        values = [cells.get((name, col), "–") for col in cols]
        lines.append("| " + " | ".join([name, *values]) + " |")
    return lines + [""]


def eval_set_identity(records: list) -> dict[str, Any]:
    """Which images (file names and labels) an evaluation scores: part of an ablation's
    fingerprint, so a rerun on another set is not mixed with earlier results."""
    lines = "\n".join(f"{r.path.parent.name}/{r.path.name}\t{r.label}" for r in records)
    return {"n": len(records), "files_sha256": hashlib.sha256(lines.encode()).hexdigest()}


def ablate(
    model_name: str,
    weights: str | None,
    calib_data: str | Path,
    calib_list: str | Path | None,
    data: str | Path,
    exclude: str | Path | None,
    out_dir: str | Path,
    variants: list[Variant],
    base: AdaLogConfig,
    plot_block: int | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    device: str | torch.device = "auto",
) -> list[dict[str, Any]]:
    """The ``adalog ablate`` job: run the variants on one model, then write tables and plots
    (calibration and evaluation on ``device``; ``auto``: CUDA when available)."""
    from adalog.models import create_model
    from adalog.pipelines.evaluate import build_eval_loader, evaluate
    from adalog.pipelines.plots import quantizer_values

    device = rank_device(device)
    ranks = join(device)

    def make_model() -> nn.Module:
        return create_model(model_name, weights=weights, **(model_kwargs or {})).to(device)

    probe = make_model()
    images = load_calibration_images(probe, calib_data, calib_list, base)
    loader = build_eval_loader(probe, data, exclude=exclude, batch_size=batch_size, workers=workers)
    eval_data = eval_set_identity(loader.dataset.records)
    n_blocks = len(model_parts(probe).find(probe, FC2))
    block = plot_block if plot_block is not None else n_blocks // 2

    def score(model: nn.Module) -> dict[str, Any]:
        result = evaluate(model, loader, device=device, name=model_name, progress=ranks.is_main)
        return {"top1": result.top1, "top5": result.top5, "n": result.n}

    fp32_fingerprint = run_fingerprint(model_identity(probe), eval_data=eval_data)
    if ranks.is_main and read_fp32(out_dir) is None:  # the tables' and bar chart's reference
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fp32 = score(make_model()) | {"fingerprint": fp32_fingerprint}
        atomic_write_json(Path(out_dir) / FP32_FILE, fp32)
    barrier(ranks)
    fp32 = read_fp32(out_dir)
    check_fingerprint(fp32.get("fingerprint", {}), fp32_fingerprint, Path(out_dir) / FP32_FILE)
    results = run_ablation(
        out_dir,
        variants,
        base,
        make_model,
        images,
        score,
        inspect=lambda model: {"block": block, **quantizer_values(model, block)},
        eval_data=eval_data,
        ranks=ranks,
    )
    if ranks.is_main:
        _write_figures(Path(out_dir), model_name, data, base, make_model, images, block)
    return results


def _write_figures(
    out_dir: Path,
    model_name: str,
    data: str | Path,
    base: AdaLogConfig,
    make_model: ModelFactory,
    images: Tensor,
    block: int,
) -> None:
    """The tables of every finished variant (this invocation's and earlier ones), the accuracy
    bar chart and the quantization-level plots of the chosen block."""
    from adalog.pipelines.plots import capture_activations, plot_accuracy, plot_levels

    finished = all_results(out_dir)
    write_tables(out_dir, finished)
    rows = [_row(r) for r in finished]
    if rows:
        n_images = finished[0].get("n")
        title = (
            f"{model_name}, W{base.w_bits}A{base.a_bits} base: top-1 per variant "
            f"({n_images} images of {Path(data).name})"
        )
        plot_accuracy(rows, out_dir / "accuracy.png", title, read_fp32(out_dir))
    model = make_model()
    activations = capture_activations(model, images[:8].to(model_device(model)), block)
    for key, groups in (
        ("post_gelu", ("post-gelu", "log-scale")),
        ("post_softmax", ("post-softmax",)),
    ):
        chosen = [(r["variant"], r["details"]) for r in finished if r["group"] in groups]
        if chosen:
            plot_levels(activations, chosen, key, out_dir / f"levels_{key}.png", block)
