"""Fidelity record: adalog's checkpoint against the reference implementation's state dict.

Both sides are meant to be calibrated in the reference configuration on the same images (the
reference's own calibration tensors, ``reference_calib32_vit_tiny.safetensors``). Every tensor of
the reference state dict is renamed and reshaped into adalog's representation (``MAPPING``, one
table for both directions; :func:`from_reference` and its inverse :func:`to_reference_names`)
and classified:

* ``equal``: bit-identical after the conversion;
* ``float32 rounding``: every element within ``ULP_TOL`` float32 ulps of the reference's (for
  the biases the folds compute as sums, ulps of the tensor's largest magnitude);
* ``differs``: the rest, with the largest absolute and relative differences, the elements beyond
  rounding and the groups (rows, heads, channels) they fall in.

Each differing tensor gets an explanation. With the pretrained FP weights (``--fp-weights``) the
LayerNorm folds (§3) are inverted: ``r_c = γ_c / γ'_c`` and ``δ_c = β_c / r_c − β'_c`` on each
side. With the calibration tensors (``--calib-tensor``) both models are rebuilt with adalog's
modules, their FP captures recorded (each side in its own folded network) and every differing
choice re-scored on the objective it was searched on (§5.1), in float64:

* a weight row, a matmul head, an input quantizer or a post-softmax base is scored with the other
  operand fixed to the reference's (and to adalog's) choice: a relative objective gap within
  ``NEAR_TIE`` is a near-tie that float32 scoring noise can break either way (the float32 noise of
  each objective is recorded beside it);
* a post-LN channel's (s_c, z_c) is re-scored on the per-channel input error on the pre-fold
  LayerNorm output; both sides' channels come from inverting their folds, with a rerun of
  adalog's channel-wise search there as the anchor that fixes s* and z*;
* a module whose folded FP weight differs has its own output error compared (each side on its
  own capture): the fold propagates into its grids, so no single choice can be compared;
* the fc2 bias is ``b − shift·ΣŴ`` (§4) on both sides: its rows follow Ŵ.

Both networks are FP-equivalent, so each side's FP capture is within float rounding of the
other's (and of what either implementation saw while calibrating); a gap whose sign flips
between the two captures is a near-tie as well. Verdicts: ``near-tie``; ``alternation`` (the
other operand differs too, and each side's choice is at least as good, to a near-tie, with its
own partner: the alternating searches of §5.7 followed different partners); ``adalog better`` /
``adalog worse`` / ``mixed`` (a gap beyond a near-tie); ``propagated`` (follows another
difference: a fold, q, the fc2 Ŵ); ``unexpected`` (a tensor no search or fold changes).

``--eval`` also evaluates both models on dev-rest (the reference's state through adalog's
modules) as ``compare_checkpoints.py --eval`` does: top-1 under four float roundings, KL
divergence from the FP model, argmax agreement. The reference's own figure is 0.6004 (281/468).

Example (the issue "A fidelity record"):
    python benchmarks/fidelity.py runs/vit_tiny_w4a4_refcalib_fidelity \\
        ../shared/reference/official_vit_tiny_w4a4.pth --eval \\
        --out benchmarks/logs/fidelity_vit_tiny_w4a4.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from compare_checkpoints import compare, evaluate_pair, in_blocks, print_eval
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from adalog.io import atomic_write_json
from adalog.models import read_state_dict
from adalog.models.hooks import forward_batches, forward_hooks
from adalog.models.qmodules import QuantConv2d, QuantLinear, QuantMatMul, set_quant_mode
from adalog.pipelines.checkpoint import META_FILE, WEIGHTS_FILE, load_quantized, read_meta
from adalog.pipelines.reconstruct import unfold_post_gelu_shift
from adalog.quant import LogQuantizer, adalog_q_candidates, adalog_tables, asym_fake_quant
from adalog.search import procedures
from adalog.search.fpcs import best_q, fpcs_adalog
from adalog.search.grids import (
    ACTIVATION_SCALE_FLOOR,
    activation_grid,
    adalog_scale_grid,
    matmul_grid,
    weight_grid,
)
from adalog.search.objectives import log_exponent
from adalog.search.procedures import SearchSettings, channelwise_input_search

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SAMPLE = SHARED / "data" / "imagenet-sample"
CALIB_TENSOR = SAMPLE / "reference_calib32_vit_tiny.safetensors"
FP_WEIGHTS = SHARED / "models" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"

ULP_TOL = 4
"""Elements at most this many float32 ulps apart count as float32 rounding."""
NEAR_TIE = 1e-5
"""Relative objective gap (float64) below which two choices are a near-tie: the float32
objectives the searches compare carry noise of about 1e-7..1e-5 (recorded per module)."""
CHANNEL_TOL = 1e-6
"""Relative tolerance on a post-LN channel scale reconstructed from a fold (a few ulps of each
of the two divisions)."""

# -- the mapping ---------------------------------------------------------------------------------

WEIGHTED = ("conv", "qkv", "linear", "fc2")
ANY = (*WEIGHTED, "matmul_qk", "matmul_av", None)


@dataclass(frozen=True)
class Rule:
    """One parameter of one module kind: reference suffix -> adalog suffix.

    ``form`` names the conversion (both directions in :func:`_to_adalog` / :func:`_to_reference`):
    ``same`` (identical tensor), ``rows`` (per-row weight parameters, reshaped), ``scalar``
    (a one-element tensor: reference shape ``reference_shape``, adalog ``()``), ``table1``
    (reference float32, adalog int64 holding the same integers).
    """

    label: str
    kinds: tuple[str | None, ...]
    reference: str
    adalog: str
    form: str
    note: str
    reference_shape: tuple[int, ...] | None = None


# fmt: off
MAPPING: tuple[Rule, ...] = tuple(Rule(*row) for row in (
    # label, module kinds, reference suffix, adalog suffix,
    #     conversion, note, reference shape (scalars)
    ("FP weight", ANY, "weight", "weight",
        "same", "same name; qkv/fc1 hold the LayerNorm-folded W·r (§3 step 4), LayerNorms γ/r"),
    ("FP bias", ANY, "bias", "bias",
        "same", "same name; qkv/fc1: b + (W·r)·δ (§3), LayerNorms β/r − δ; fc2: b − shift·ΣŴ, "
                "the post-GELU shift folded (§4) on both sides"),
    ("FP parameter", (None,), "", "",
        "same", "cls_token, pos_embed: unchanged"),
    ("weight scale", WEIGHTED, "w_quantizer.scale", "weight_quant.scale",
        "rows", "per output row: reference (n_V, O/n_V, 1) with n_V = 3 for qkv, else 1, and "
                "(O, 1) for the conv; adalog (O, 1), conv (O, 1, 1, 1); a reshape, row order kept"),
    ("weight zero point", WEIGHTED, "w_quantizer.zero_point", "weight_quant.zero_point",
        "rows", "reshaped like the scale; one convention on both sides: code = clamp(round(w/s) "
                "+ round(z), 0, 2^b − 1), value (code − round(z))·s (§1.2)"),
    ("input scale", ("qkv", "linear"), "a_quantizer.scale", "input_quant.scale",
        "same", "per tensor, (1,) on both sides (qkv/fc1: after the fold, §3 step 6)"),
    ("input zero point", ("qkv", "linear"), "a_quantizer.zero_point", "input_quant.zero_point",
        "same", "per tensor, (1,); convention as for the weights"),
    ("post-GELU scale", ("fc2",), "a_quantizer.scale", "input_quant.scale",
        "scalar", "AdaLog s = largest value (code 0), in the shifted domain x + shift", (1,)),
    ("post-GELU q", ("fc2",), "a_quantizer.q", "input_quant.q",
        "scalar", "int64 base exponent, β = 2^(q/37)", (1,)),
    ("post-GELU table1", ("fc2",), "a_quantizer.table1", "input_quant.t1",
        "table1", "T1[i] = floor(i·q/37): reference float32, adalog int64"),
    ("post-GELU table2", ("fc2",), "a_quantizer.table2", "input_quant.t2",
        "same", "T2[i] = round(2^(−(i·q mod 37)/37)·D)/D, float32 on both sides"),
    ("post-GELU shift", ("fc2",), "a_quantizer.shift", "input_quant.shift",
        "scalar", "0.16997124254703522", (1,)),
    ("post-GELU shift folded", ("fc2",), "a_quantizer.bias_reparamed", "input_quant.shift_folded",
        "same", "bool (): the −shift lives in the fc2 bias (§4)"),
    ("q scale", ("matmul_qk",), "A_quantizer.scale", "a_quant.scale",
        "same", "per head, (1, Hh, 1, 1) on both sides"),
    ("q zero point", ("matmul_qk",), "A_quantizer.zero_point", "a_quant.zero_point",
        "same", "per head"),
    ("k scale", ("matmul_qk",), "B_quantizer.scale", "b_quant.scale",
        "same", "per head"),
    ("k zero point", ("matmul_qk",), "B_quantizer.zero_point", "b_quant.zero_point",
        "same", "per head"),
    ("post-softmax scale", ("matmul_av",), "A_quantizer.scale", "a_quant.scale",
        "scalar", "fixed to 1 in calibration (§10.6)", (1, 1, 1, 1)),
    ("post-softmax q", ("matmul_av",), "A_quantizer.q", "a_quant.q",
        "scalar", "int64 base exponent, one for all heads", (1,)),
    ("post-softmax table1", ("matmul_av",), "A_quantizer.table1", "a_quant.t1",
        "table1", "as for post-GELU"),
    ("post-softmax table2", ("matmul_av",), "A_quantizer.table2", "a_quant.t2",
        "same", "as for post-GELU"),
    ("v scale", ("matmul_av",), "B_quantizer.scale", "b_quant.scale",
        "same", "per head"),
    ("v zero point", ("matmul_av",), "B_quantizer.zero_point", "b_quant.zero_point",
        "same", "per head"),
))
# fmt: on
RULES = {rule.label: rule for rule in MAPPING}

#: Reference tensors without an adalog counterpart: module kind, suffix, shape, why.
REFERENCE_ONLY = (
    (
        "conv",
        "a_quantizer.scale",
        (1, 1, 1, 1),
        "the patch-embed conv's 8-bit symmetric input quantizer, never applied (§10.1, §12.8); "
        "adalog's conv has no input quantizer",
    ),
)
#: adalog tensors without a reference counterpart: module kind, suffix, required value, why.
ADALOG_ONLY = (
    (
        "matmul_av",
        "a_quant.shift",
        0.0,
        "adalog's LogQuantizer carries a shift for every use; the post-softmax one is 0",
    ),
    ("matmul_av", "a_quant.shift_folded", False, "unfolded (there is no shift to fold)"),
)


def module_kind(module: str) -> str | None:
    """Which rules apply to the parameters of ``module`` (a dotted name of a timm ViT/DeiT)."""
    leaf = module.rsplit(".", 1)[-1]
    if module.endswith("patch_embed.proj"):
        return "conv"
    kinds = {"qkv": "qkv", "fc2": "fc2", "proj": "linear", "fc1": "linear", "head": "linear"}
    kinds |= {"matmul1": "matmul_qk", "matmul2": "matmul_av"}
    return kinds.get(leaf)


def _split(key: str, side: str) -> tuple[Rule, str]:
    """The rule of a state key on ``side`` ('reference' or 'adalog') and its module name."""
    for rule in sorted(MAPPING, key=lambda r: -len(getattr(r, side))):
        suffix = getattr(rule, side)
        if suffix and key.endswith("." + suffix):
            module = key[: -len(suffix) - 1]
            if module_kind(module) in rule.kinds:
                return rule, module
    if "." not in key:
        return RULES["FP parameter"], ""  # cls_token, pos_embed
    raise ValueError(f"{side} tensor {key!r} has no rule in MAPPING")


def _join(module: str, suffix: str) -> str:
    return ".".join(p for p in (module, suffix) if p)


def _to_adalog(t: Tensor, rule: Rule, module: str) -> Tensor:
    if rule.form == "rows":
        return t.reshape(-1, 1, 1, 1) if module_kind(module) == "conv" else t.reshape(-1, 1)
    if rule.form == "scalar":
        return t.reshape(())
    if rule.form == "table1":
        if not torch.equal(t, t.round()):
            raise ValueError(f"{module}: table1 is not integer-valued")
        return t.round().to(torch.int64)
    return t


def _to_reference(t: Tensor, rule: Rule, module: str) -> Tensor:
    if rule.form == "rows":
        kind = module_kind(module)
        if kind == "conv":
            return t.reshape(-1, 1)
        return t.reshape(3, -1, 1) if kind == "qkv" else t.reshape(1, -1, 1)
    if rule.form == "scalar":
        return t.reshape(rule.reference_shape)
    if rule.form == "table1":
        return t.to(torch.float32)
    return t


def _label(rule: Rule, module: str) -> str:
    if module_kind(module) is None and rule.label in ("FP weight", "FP bias") and "norm" in module:
        return "LayerNorm " + rule.label.split()[-1]
    return rule.label


def from_reference(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The reference state in adalog's names and representation, with the adalog-only tensors
    at their required values, and the name map adalog key -> reference key."""
    out, names = {}, {}
    for key, tensor in state.items():
        module, _, suffix = key.rpartition(".a_quantizer.")
        if any(
            module_kind(module) == kind and f"a_quantizer.{suffix}" == s
            for kind, s, *_ in REFERENCE_ONLY
        ):
            continue
        rule, module = _split(key, "reference")
        new = _join(module, rule.adalog) if rule.adalog else key
        out[new], names[new] = _to_adalog(tensor, rule, module), key
    modules = {m for key in out for m in [key.rsplit(".", 2)[0]] if module_kind(m)}
    for module in sorted(modules):
        for kind, suffix, value, _ in ADALOG_ONLY:
            if module_kind(module) == kind:
                dtype = torch.bool if isinstance(value, bool) else torch.float32
                out[_join(module, suffix)] = torch.tensor(value, dtype=dtype)
    return out, names


def to_reference_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """adalog's state in the reference's names and representation (the inverse of
    :func:`from_reference`); the reference-only conv input scale is added as 0, as the reference
    stores it."""
    out = {}
    for key, tensor in state.items():
        extra = [
            (s, v)
            for kind, s, v, _ in ADALOG_ONLY
            if key.endswith("." + s) and module_kind(key[: -len(s) - 1]) == kind
        ]
        if extra:
            if tensor.item() != extra[0][1]:
                raise ValueError(f"{key} = {tensor.item()} has no reference counterpart")
            continue
        rule, module = _split(key, "adalog")
        out[_join(module, rule.reference) if rule.reference else key] = _to_reference(
            tensor, rule, module
        )
        if rule.label == "weight scale":
            for kind, suffix, shape, _ in REFERENCE_ONLY:
                if module_kind(module) == kind:
                    out[_join(module, suffix)] = torch.zeros(shape)
    return out


def load_reference(path: str | Path) -> dict[str, Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


# -- classification ------------------------------------------------------------------------------


def _ordinal(t: Tensor) -> Tensor:
    """Integers ordered like the floats, so that ulp distances are differences."""
    int_type = {torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype]
    i = t.contiguous().view(int_type).long()
    sign = torch.iinfo(int_type).max
    return torch.where(i < 0, -(i & sign), i)


def _group_dim(t: Tensor) -> tuple[int | None, str]:
    if t.dim() == 4 and t.shape[0] == 1 and t.shape[2:] == (1, 1):
        return 1, "heads"
    if t.dim() == 0:
        return None, "tensor"
    return 0, "rows" if t.dim() > 1 else "elements"


def classify(a: Tensor, r: Tensor, sums: bool = False) -> tuple[dict, Tensor | None]:
    """Class and differences of adalog tensor ``a`` against reference tensor ``r``; also the
    per-group mask of differences beyond rounding (None when nothing differs).

    ``sums``: the tensor holds float32 sums of many terms (the biases the folds write,
    ``b + W·r·δ`` and ``b − shift·ΣŴ``), whose rounding scales with the terms rather than
    with each result; ulps are then counted at the tensor's largest magnitude."""
    info: dict = {"shape": list(a.shape), "elements": a.numel()}
    if a.shape != r.shape:
        return info | {"class": "differs", "shapes": [list(a.shape), list(r.shape)]}, None
    if torch.equal(a, r):
        return info | {"class": "equal"}, None
    diff = (a.double() - r.double()).abs()
    info |= {
        "elements_differing": int((diff > 0).sum()),
        "max_abs": float(diff.max()),
        "max_relative": float((diff / r.double().abs().clamp_min(1e-30)).max()),
    }
    if a.is_floating_point() and a.dtype == r.dtype:
        ulps = (_ordinal(a) - _ordinal(r)).abs()
        beyond = ulps > ULP_TOL
        info["max_ulps"] = int(ulps.max())
        if sums:
            top = torch.maximum(a.abs().max(), r.abs().max())
            ulp = float(torch.nextafter(top, torch.tensor(float("inf"), dtype=top.dtype)) - top)
            beyond = diff > ULP_TOL * ulp
            info["rounding_measured_at"] = "tensor maximum"
    else:
        beyond = diff > 0
    info["elements_beyond_rounding"] = int(beyond.sum())
    if not beyond.any():
        return info | {"class": "float32 rounding"}, None
    dim, name = _group_dim(a)
    mask = beyond.reshape(1) if dim is None else beyond.movedim(dim, 0).reshape(a.shape[dim], -1)
    mask = mask.any(-1) if mask.dim() > 1 else mask
    info |= {"class": "differs", "group": name, "groups": mask.numel()}
    info["groups_differing"] = int(mask.sum())
    return info, mask


# -- LayerNorm folds -----------------------------------------------------------------------------


FOLDS = (("norm1", "attn.qkv"), ("norm2", "mlp.fc1"))


def fold_pairs(state: dict[str, Tensor]) -> list[tuple[str, str]]:
    """(LayerNorm, linear) pairs whose post-LN input is folded (§3)."""
    pairs = []
    for key in state:
        for norm, linear in FOLDS:
            if key.endswith(f".{norm}.weight"):
                block = key[: -len(f".{norm}.weight")]
                if f"{block}.{linear}.weight" in state:
                    pairs.append((f"{block}.{norm}", f"{block}.{linear}"))
    return pairs


def invert_fold(state: dict[str, Tensor], fp: dict[str, Tensor], norm: str, linear: str) -> dict:
    """``r`` and ``δ`` of one side's fold, and how well ``W·r`` reproduces its weight."""
    g0, b0 = fp[f"{norm}.weight"].double(), fp[f"{norm}.bias"].double()
    r = g0 / state[f"{norm}.weight"].double()
    delta = b0 / r - state[f"{norm}.bias"].double()
    w0 = fp[f"{linear}.weight"].double()
    w_err = ((w0 * r) - state[f"{linear}.weight"].double()).abs().max() / (w0 * r).abs().max()
    return {"r": r, "delta": delta, "weight_check": float(w_err)}


def fold_analysis(
    adalog: dict[str, Tensor],
    reference: dict[str, Tensor],
    fp: dict[str, Tensor],
    channel_scores: dict[str, dict],
) -> dict[str, dict]:
    """Per fold: which channels' (s_c, z_c) differ between the two sides, and (with captures)
    their per-channel input error on both choices."""
    out = {}
    for norm, linear in fold_pairs(adalog):
        a, r = invert_fold(adalog, fp, norm, linear), invert_fold(reference, fp, norm, linear)
        info = {"linear": linear, "weight_check": [a["weight_check"], r["weight_check"]]}
        scores = channel_scores.get(norm)
        if scores is None:  # no captures: scales up to the common factor s*_A / s*_R only
            ratio = a["r"] / r["r"]
            ratio = ratio / ratio.median()
            differ = (ratio - 1).abs() > CHANNEL_TOL
        else:
            differ = scores["differ"]
            info |= {k: v for k, v in scores.items() if k not in ("differ",)}
        info["channels"] = differ.numel()
        info["channels_differing"] = torch.nonzero(differ).flatten().tolist()
        out[norm] = info
    return out


def fold_channels(
    s_anchor: Tensor, z_anchor: Tensor, r: Tensor, delta: Tensor
) -> tuple[Tensor, Tensor, dict]:
    """One side's per-channel (s_c, z_c) from its fold, ``r_c = s_c/s*`` and
    ``δ_c = s*(z* − z_c)`` with integers ``z* − z_c``: ``s*`` is the least-squares fit of
    ``δ_c = s*·m_c`` (the median of ``s_anchor / r`` where every ``m_c`` is 0), ``z*`` the
    most common ``z_anchor + m`` over the anchor channels (a rerun of the channel-wise search),
    so that a few anchor channels that differ (near-ties) do not matter."""
    s_star = (s_anchor / r).median()
    m_int = (delta / s_star).round()
    if m_int.abs().sum() > 0:
        s_star = (delta * m_int).sum() / m_int.square().sum()
    m = delta / s_star  # = z* − z_c
    m_int = m.round()
    z_star = Counter((z_anchor + m_int).tolist()).most_common(1)[0][0]
    z = z_star - m_int
    checks = {
        "s_star": float(s_star),
        "z_star": z_star,
        "z_offsets_off_integer": float((m - m_int).abs().max()),
        "mean_r": float(r.mean()),
        "z_star_is_rounded_mean": bool(round(float(z.mean())) == z_star),
    }
    return r * s_star, z, checks


def _channels_differ(s1: Tensor, z1: Tensor, s2: Tensor, z2: Tensor) -> Tensor:
    return ((s1 / s2 - 1).abs() > CHANNEL_TOL) | (z1 != z2)


def _channel_error(x: Tensor, s: Tensor, z: Tensor, n_bits: int) -> Tensor:
    """Per-channel input error ``Σ_t (x − Q(x))²`` in float64 (§5.1, input MSE per channel)."""
    x_hat = asym_fake_quant(x.double(), s.double(), z.double(), n_bits)
    return (x.double() - x_hat).square().sum(0)


# -- re-scoring on the calibration tensors -------------------------------------------------------


@contextmanager
def reference_checkpoint(adalog_dir: str | Path, reference: dict[str, Tensor]) -> Iterator[Path]:
    """A temporary adalog checkpoint folder holding the reference's state (adalog's names) and
    adalog's ``adalog.json``."""
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in reference.items()}, str(Path(tmp) / WEIGHTS_FILE))
        shutil.copy(Path(adalog_dir) / META_FILE, Path(tmp) / META_FILE)
        yield Path(tmp)


def build_models(adalog_dir: str | Path, reference: dict[str, Tensor]) -> tuple[nn.Module, ...]:
    """adalog's model and the reference state in the same modules (both in quant mode)."""
    model_a = load_quantized(adalog_dir)
    with reference_checkpoint(adalog_dir, reference) as folder:
        model_r = load_quantized(folder)
    return model_a, model_r


def _weight_hat(module: nn.Module) -> Tensor:
    return module.quantized_weight().double()


def _errors(module: nn.Module, other: nn.Module, inputs, output, tags: str, cross: bool) -> dict:
    """Per-group float64 errors of the combinations of both sides' quantizers on one capture.

    Keys are two letters, the owner (R reference, A adalog) of the first operand's quantizer
    (linear input, matmul A) and of the second's (weight, matmul B); the conv has one letter.
    ``noise`` is the relative float32 error of the own combination's objective.
    """
    own, oth = tags
    sides = {own: module, oth: other}
    pairs = [own + own] + (
        [a + b for a in tags for b in tags if a + b != own + own] if cross else []
    )
    out: dict = {}
    if isinstance(module, QuantMatMul):
        a, b = inputs
        target = a.double() @ b.double()
        for pair in pairs:
            qa, qb = sides[pair[0]].a_quant(a), sides[pair[1]].b_quant(b)
            err = (qa.double() @ qb.double() - target).square()
            out[pair] = err.sum((0, 2, 3))
            if pair == own + own:
                noise = (qa @ qb - a @ b).square().sum((0, 2, 3)).double()
        return out | {"noise": (noise - out[own + own]).abs() / out[own + own]}
    x, y = inputs[0], output
    if isinstance(module, QuantConv2d):
        for side in (own, oth) if cross else (own,):
            m = sides[side]
            geometry = (m.stride, m.padding, m.dilation, m.groups)
            w_hat = m.quantized_weight()
            y_hat = F.conv2d(x.double(), w_hat.double(), m.bias.double(), *geometry)
            out[side] = (y_hat - y.double()).square().sum((0, 2, 3))
            if side == own:
                y32 = F.conv2d(x, w_hat, m.bias, *geometry)
                noise = (y32 - y).square().sum((0, 2, 3)).double()
        return out | {"noise": (noise - out[own]).abs() / out[own]}
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    for pair in pairs:
        x_hat, m = sides[pair[0]].input_quant(x), sides[pair[1]]
        y_hat = F.linear(x_hat.double(), _weight_hat(m), m.bias.double())
        out[pair] = (y_hat - y.double()).square().sum(0)
        if pair == own + own:
            noise = (F.linear(x_hat, m.quantized_weight(), m.bias) - y).square().sum(0).double()
    return out | {"noise": (noise - out[own + own]).abs() / out[own + own]}


def _same_weights(m1: nn.Module, m2: nn.Module) -> bool:
    """Whether two modules hold the same FP weight (to rounding), so that one capture serves
    both sides' quantizers (biases may differ by the rounding of a fold)."""
    w1, w2 = m1.weight.detach(), m2.weight.detach()
    return w1.shape == w2.shape and int((_ordinal(w1) - _ordinal(w2)).abs().max()) <= ULP_TOL


def rescore(
    model_a: nn.Module,
    model_r: nn.Module,
    images: Tensor,
    fp: dict[str, Tensor] | None,
    settings: SearchSettings,
    replays: dict[str, set[str]] | None = None,
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per module, the errors of both sides' quantizers on FP captures (see :func:`_errors`)
    and, for the labels in ``replays[module]``, adalog's own search replayed with the
    reference's partner quantizers on the reference network's capture (:func:`replay`); per
    folded LayerNorm, both sides' per-channel choices and errors (pre-fold LN output)."""
    replays = replays or {}
    unfold_post_gelu_shift(model_a)
    unfold_post_gelu_shift(model_r)
    scores: dict[str, dict] = {}
    channels: dict[str, dict] = {}
    folds = dict(fold_pairs(model_a.state_dict())) if fp is not None else {}
    ref_state = model_r.state_dict()
    for own, other, tags in ((model_r, model_a, "RA"), (model_a, model_r, "AR")):
        layers = {
            name: m
            for name, m in own.named_modules()
            if isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul))
        }
        if tags[0] == "A":
            layers |= {norm: own.get_submodule(norm) for norm in folds}

        def hook(name, module, inputs, output, own=own, other=other, tags=tags):
            if name in folds:
                channels[name] = _channel_scores(
                    module, inputs[0], name, folds[name], own, ref_state, fp, settings
                )
                return
            twin = other.get_submodule(name)
            cross = isinstance(module, QuantMatMul) or _same_weights(module, twin)
            with torch.no_grad():
                errors = _errors(module, twin, inputs, output, tags, cross)
                if cross and replays.get(name):  # the reference's module, on this capture
                    ref_module = module if tags[0] == "R" else twin
                    errors["replay"] = replay(ref_module, inputs, output, settings, replays[name])
            scores.setdefault(name, {})[tags[0]] = errors

        set_quant_mode(own, False)
        with forward_hooks(layers, hook):
            forward_batches(own, images, images.shape[0])
        set_quant_mode(own, True)
    return scores, channels


def replay(
    module: nn.Module, inputs: tuple, output: Tensor, settings: SearchSettings, labels: set[str]
) -> dict[str, Tensor]:
    """adalog's own final search step (§5.7) for each quantizer named in ``labels``, run on this
    capture with the module's other quantizers as they are (the reference's): whether adalog's
    search, given the reference's partner, returns the reference's choice. Values in adalog's
    shapes; ``error`` holds the message where a search could not be replayed."""
    out: dict[str, Tensor] = {}
    try:
        _replay(module, inputs, output, settings, labels, out)
    except Exception as exc:  # noqa: BLE001 - a record, not a crash, on a changed adalog API
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def _replay(module, inputs, output, settings, labels, out) -> None:
    proc, eq_n = procedures, settings.eq_n

    def search(score, grid, floor=None):
        return proc._search(settings, score, grid, floor)

    def per_head(result, names):
        out[names[0]] = result.scale.reshape(1, -1, 1, 1)
        out[names[1]] = result.zero_point.reshape(1, -1, 1, 1)

    if isinstance(module, QuantMatMul):
        a, b = inputs
        target = a @ b
        a_q, b_q = module.a_quant, module.b_quant
        n_b = b_q.n_bits
        if labels & {"q scale", "q zero point"}:
            grid = matmul_grid(proc._head_groups(a), n_b, eq_n)
            score = proc._operand_a_score(a, b_q(b), target, a_q.n_bits)
            per_head(search(score, grid), ("q scale", "q zero point"))
        if labels & {"k scale", "k zero point", "v scale", "v zero point"}:
            grid = matmul_grid(proc._head_groups(b), n_b, eq_n)
            score = proc._operand_b(settings)(a_q(a), b, target, n_b)
            kv = ("k scale", "k zero point")
            names = kv if labels & set(kv) else ("v scale", "v zero point")
            per_head(search(score, grid), names)
        if "post-softmax q" in labels:
            base_error = proc._AvBaseError(a, target, a_q.n_bits)
            score_q = lambda qs: base_error(qs, v_hat=b_q(b))  # noqa: E731
            q = best_q(score_q, adalog_q_candidates(eq_n)).q
            out["post-softmax q"] = torch.as_tensor(q, dtype=torch.int64).reshape(())
        return
    weight, bias = module.weight.detach(), module.bias
    rows = weight.reshape(weight.shape[0], -1)
    n_w = module.weight_quant.n_bits
    if isinstance(module, QuantConv2d):
        x = module.input_patches(inputs[0])
        y = output.flatten(2).transpose(1, 2).reshape(-1, output.shape[1])
        zp_cap = settings.zp_cap if settings.conv_zp_cap else None
        grid = weight_grid(rows, n_w, eq_n, zp_cap=zp_cap)
    else:
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        y = output.reshape(-1, output.shape[-1])
        grid = weight_grid(rows, n_w, eq_n, settings.zp_cap)
    target = y if bias is None else y - bias
    if labels & {"weight scale", "weight zero point"}:
        x_hat = x if module.input_quant is None else module.input_quant(x)
        result = search(proc._weight_score(settings, x_hat, target, rows, n_w), grid)
        shape = module.weight_quant.scale.shape
        out["weight scale"] = result.scale.reshape(shape)
        out["weight zero point"] = result.zero_point.reshape(shape)
    quant = getattr(module, "input_quant", None)
    if labels & {"input scale", "input zero point"}:
        x_grid = activation_grid(x.reshape(1, -1), quant.n_bits, eq_n)
        score = proc._input_score(settings, x, target, rows, module.weight_quant, quant.n_bits)
        result = search(score, x_grid, ACTIVATION_SCALE_FLOOR)
        out["input scale"] = result.scale.reshape(1)
        out["input zero point"] = result.zero_point.reshape(1)
    if labels & {"post-GELU scale", "post-GELU q"} and isinstance(quant, LogQuantizer):
        shift = float(quant.shift)
        grid = adalog_scale_grid(x, eq_n, shift)
        scorer = proc._LogInputScorer(
            log_exponent(x, shift), target, module.quantized_weight(), quant.n_bits, shift
        )
        scale = quant.scale.reshape(())  # the scale the base pre-selection holds fixed

        def score_q(qs: Tensor) -> Tensor:
            return scorer.adalog(scale.expand(qs.shape[0]), qs)

        cands = adalog_q_candidates(eq_n)
        result = fpcs_adalog(score_q, scorer.adalog, grid.lo, grid.hi, cands, steps=settings.steps)
        out["post-GELU scale"] = torch.as_tensor(result.scale).reshape(())
        out["post-GELU q"] = torch.as_tensor(result.q, dtype=torch.int64).reshape(())


def _channel_scores(norm_module, h, norm, linear, model_a, ref_state, fp, settings) -> dict:
    """Both sides' post-LN channels (s_c, z_c), reconstructed from their folds with a rerun of
    adalog's channel-wise search on the pre-fold LN output as the anchor, and their per-channel
    input errors there. The rerun sees adalog's network with this block's LayerNorms folded,
    where adalog's calibration saw them unfolded: float rounding can flip near-tied channels."""
    a_state = {k: v for k, v in model_a.state_dict().items() if k.startswith((norm, linear))}
    g0, b0 = fp[f"{norm}.weight"], fp[f"{norm}.bias"]
    x = F.layer_norm(h, g0.shape, g0, b0, norm_module.eps).reshape(-1, g0.numel())
    n_bits = model_a.get_submodule(linear).input_quant.n_bits
    with torch.no_grad():
        s_run, z_run = channelwise_input_search(x, n_bits, settings)
    s_run, z_run = s_run.double().flatten(), z_run.double().flatten()
    fold_a, fold_r = (invert_fold(st, fp, norm, linear) for st in (a_state, ref_state))
    s_a, z_a, checks_a = fold_channels(s_run, z_run, fold_a["r"], fold_a["delta"])
    s_r, z_r, checks_r = fold_channels(s_run, z_run, fold_r["r"], fold_r["delta"])
    differ = _channels_differ(s_a, z_a, s_r, z_r)
    e_a, e_r = (_channel_error(x, s, z, n_bits) for s, z in ((s_a, z_a), (s_r, z_r)))
    gap = (e_a - e_r) / e_r
    idx = torch.nonzero(differ).flatten()
    rerun_differs = _channels_differ(s_run, z_run, s_a, z_a)
    rerun_unlike_ref = _channels_differ(s_run, z_run, s_r, z_r)
    return {
        "differ": differ,
        "rerun_channels_unlike_adalog": torch.nonzero(rerun_differs).flatten().tolist(),
        "rerun_channels_unlike_reference": int(rerun_unlike_ref.sum()),
        "adalog_reconstruction": checks_a,
        "reference_reconstruction": checks_r,
        "channel_gaps": {int(c): float(gap[c]) for c in idx},
        "zero_points_differing": int((z_r != z_a).sum()),
        "objective_total_gap": float((e_a.sum() - e_r.sum()) / e_r.sum()),
    }


# -- explanations --------------------------------------------------------------------------------

#: For each quantizer label: which operand it is (0: linear input / matmul A, 1: weight /
#: matmul B) and the labels of the other operand's parameters.
_WEIGHT = ("weight scale", "weight zero point")
_INPUT = ("input scale", "input zero point", "post-GELU scale", "post-GELU q")
OPERANDS = {
    "weight scale": (1, _INPUT),
    "weight zero point": (1, _INPUT),
    "input scale": (0, _WEIGHT),
    "input zero point": (0, _WEIGHT),
    "post-GELU scale": (0, _WEIGHT),
    "post-GELU q": (0, _WEIGHT),
    "q scale": (0, ("k scale", "k zero point")),
    "q zero point": (0, ("k scale", "k zero point")),
    "k scale": (1, ("q scale", "q zero point")),
    "k zero point": (1, ("q scale", "q zero point")),
    "post-softmax q": (0, ("v scale", "v zero point")),
    "v scale": (1, ("post-softmax q",)),
    "v zero point": (1, ("post-softmax q",)),
}
#: Parameters searched jointly (FPCS keeps (scale, zero point) or (scale, q) pairs).
PARTNERS = {
    "weight scale": "weight zero point",
    "weight zero point": "weight scale",
    "input scale": "input zero point",
    "input zero point": "input scale",
    "post-GELU scale": "post-GELU q",
    "post-GELU q": "post-GELU scale",
    "q scale": "q zero point",
    "q zero point": "q scale",
    "k scale": "k zero point",
    "k zero point": "k scale",
    "v scale": "v zero point",
    "v zero point": "v scale",
}


def _gaps(errors: dict, operand: int, other: str, mask: Tensor | None) -> Tensor:
    """Relative gaps (adalog's choice − reference's) / reference's of one operand, with the
    other operand's quantizer from side ``other``, over the groups of ``mask`` (the whole
    objective for a per-tensor choice)."""
    pair = ("A" + other, "R" + other) if operand == 0 else (other + "A", other + "R")
    if len(next(iter(errors))) == 1:  # the conv: one operand
        pair = ("A", "R")
    e_a, e_r = errors[pair[0]], errors[pair[1]]
    if mask is None or mask.numel() != e_a.numel():
        e_a, e_r = e_a.sum().reshape(1), e_r.sum().reshape(1)
    else:
        e_a, e_r = e_a[mask], e_r[mask]
    return (e_a - e_r) / e_r


def _ties(gaps_r: Tensor, gaps_a: Tensor | None) -> Tensor:
    """Near-ties: a gap within ``NEAR_TIE`` on the reference's capture, or one whose sign flips
    between the two FP-equivalent captures (float rounding of the inputs decides it)."""
    ties = gaps_r.abs() <= NEAR_TIE
    if gaps_a is not None:
        ties |= torch.sign(gaps_r) != torch.sign(gaps_a)
    return ties


def _gap_text(gaps_r: Tensor, gaps_a: Tensor | None, context: str) -> str:
    """``gaps_*``: (adalog's error − reference's) / reference's per differing group, on the
    reference's network capture and (if scored) on adalog's."""
    ties = _ties(gaps_r, gaps_a)
    text = (
        f"objective gap with {context}: {int(ties.sum())}/{gaps_r.numel()} near-ties, "
        f"max abs gap {float(gaps_r.abs().max()):.2g}, adalog's choice lower in "
        f"{int((gaps_r < 0).sum())}"
    )
    if gaps_a is not None:
        flips = int((torch.sign(gaps_r) != torch.sign(gaps_a)).sum())
        text += f" ({flips} flip sign on adalog's capture)"
    return text


def _verdict(gaps: tuple, reproduced: Tensor | None = None) -> str:
    """Verdict on one differing choice: ``gaps`` (on the reference's capture, on adalog's or
    None) with the reference's partner quantizer, ``reproduced`` which groups adalog's replayed
    search returned the reference's choice for (None: not replayed).

    near-tie: every group ties; reproduced: every other group is what adalog's own search
    returns given the reference's partner and capture; otherwise who is worse beyond a tie."""
    ties = _ties(*gaps)
    if bool(ties.all()):
        return "near-tie"
    if reproduced is not None and bool((ties | reproduced).all()):
        return "reproduced"
    open_ = ~ties if reproduced is None else ~(ties | reproduced)
    worse, better = bool((gaps[0][open_] > 0).any()), bool((gaps[0][open_] < 0).any())
    return "mixed" if worse and better else ("adalog worse" if worse else "adalog better")


def _reproduced(replayed: Tensor | None, reference: Tensor, mask: Tensor) -> Tensor | None:
    """Per differing group (``mask``), whether the replayed value equals the reference's to
    rounding; None without a replay."""
    if replayed is None:
        return None
    info, beyond = classify(replayed.to(reference.dtype).reshape(reference.shape), reference)
    if beyond is None:
        return torch.ones(int(mask.sum()), dtype=torch.bool)
    if beyond.numel() != mask.numel():  # a per-tensor value
        return ~beyond.reshape(-1)[:1].expand(int(mask.sum()))
    return ~beyond[mask]


def explain(
    records: dict[str, dict],
    masks: dict,
    folds: dict,
    scores: dict,
    states: tuple[dict, dict],
    w_bits: int,
) -> None:
    """Fill ``explanation`` (and ``verdict``) of every differing record."""
    by_module: dict[str, dict[str, str]] = {}
    for key, rec in records.items():
        by_module.setdefault(rec["module"], {})[rec["label"]] = key

    def differs(module: str, label: str) -> bool:
        key = by_module.get(module, {}).get(label)
        return key is not None and records[key]["class"] == "differs"

    for key, rec in records.items():
        if rec["class"] != "differs":
            continue
        label, module = rec["label"], rec["module"]
        folded_norm = module.replace("attn.qkv", "norm1").replace("mlp.fc1", "norm2")
        verdict, text = "unexplained", ""
        if label.startswith("LayerNorm"):
            fold = folds.get(module)
            if fold is None:
                verdict, text = "unexpected", "a LayerNorm that is not folded differs"
            else:
                verdict, text = _fold_text(fold)
        elif (
            label in ("FP weight", "FP bias")
            and module_kind(module) in ("qkv", "linear")
            and (folded_norm in folds)
        ):
            verdict = "propagated"
            text = f"follows the LayerNorm fold of {folded_norm} (W·r, b + W·r·δ; §3)"
        elif label == "FP bias" and module_kind(module) == "fc2":
            verdict, text = _fc2_bias_text(states, module, masks[key], w_bits)
        elif label.startswith("FP"):
            verdict, text = "unexpected", "an FP tensor that no fold changes differs"
        elif label.endswith(("table1", "table2")):
            verdict = "propagated"
            text = "follows q (tables rebuilt from q)"
        elif label in OPERANDS:
            labels = tuple(by_module[module])
            verdict, text = _quantizer_text(
                key, masks.get(key), module, label, labels, folds, scores, differs, states[1]
            )
            if label in _WEIGHT and text and verdict != "propagated":
                same = _identical_rows(states, module, masks[key], w_bits)
                if same:
                    text += f"; {same} of these rows quantize to the identical Ŵ (exact ties)"
        rec["verdict"], rec["explanation"] = verdict, text


def _identical_rows(states: tuple[dict, dict], module: str, mask: Tensor, n_bits: int) -> int:
    """Differing weight-quantizer rows whose quantized weights are nevertheless identical (a
    zero point that clamps nothing, its scale unchanged: an exact tie of every objective)."""
    w_hats = []
    for state in states:
        weight = state[f"{module}.weight"]
        scale = state[f"{module}.weight_quant.scale"].reshape(weight.shape[0], -1)
        zp = state[f"{module}.weight_quant.zero_point"].reshape(weight.shape[0], -1)
        rows = weight.reshape(weight.shape[0], -1)
        w_hats.append(asym_fake_quant(rows, scale, zp, n_bits))
    if w_hats[0].shape != w_hats[1].shape:
        return 0
    same = (w_hats[0] == w_hats[1]).all(1)
    return int((same & mask).sum()) if mask.numel() == same.numel() else 0


def _fold_text(fold: dict) -> tuple[str, str]:
    n, c = len(fold["channels_differing"]), fold["channels"]
    head = (
        f"LayerNorm fold (§3): the per-channel search chose another (s_c, z_c) in {n} of "
        f"{c} channels {fold['channels_differing'][:12]}{' …' if n > 12 else ''}; the other "
        "channels move with s* = mean s_c (r_c = s_c/s*, δ_c = s*(z* − z_c))"
    )
    gaps = fold.get("channel_gaps")
    if gaps is None:
        return "fold", head
    values = torch.tensor(list(gaps.values()), dtype=torch.float64)
    if not values.numel():
        return "fold", head
    text = head + "; per-channel input error (§5.1), "
    text += _gap_text(values, None, "the pre-fold LN output")
    if "rerun_channels_unlike_adalog" in fold:
        text += (
            f"; adalog's channel search rerun there differs from adalog's fold in "
            f"{len(fold['rerun_channels_unlike_adalog'])} and from the reference's in "
            f"{fold['rerun_channels_unlike_reference']} channels"
        )
    return _verdict((values, None)), text


def _fc2_bias_text(states: tuple[dict, dict], module: str, mask: Tensor, n_bits: int):
    """The reparameterised fc2 bias ``b − shift·ΣŴ`` (§4): do its differing rows have a
    different quantized weight row?"""
    w_hats = []
    for state in states:
        weight = state[f"{module}.weight"]
        scale, zp = (
            state[f"{module}.weight_quant.scale"],
            state[f"{module}.weight_quant.zero_point"],
        )
        w_hats.append(asym_fake_quant(weight, scale, zp, n_bits))
    other_w_hat = (w_hats[0] != w_hats[1]).any(1)
    covered = int((mask & other_w_hat).sum())
    text = (
        f"b − shift·ΣŴ (§4): {covered} of its {int(mask.sum())} differing rows quantize the "
        "weight row differently (see the fc2 weight quantizer); the unfolded biases match the "
        "pretrained bias on both sides (derived checks)"
    )
    return ("propagated" if covered == int(mask.sum()) else "unexplained"), text


def _quantizer_text(
    key, mask, module, label, labels, folds, scores, differs, reference
) -> tuple[str, str]:
    """Explain a differing quantizer parameter ``key`` of ``module`` (``labels``: all its
    parameters; ``reference``: the reference state in adalog's names)."""
    operand, other_labels = OPERANDS[label]
    module_scores = scores.get(module, {})
    folded = module_kind(module) == "qkv" or module.endswith("mlp.fc1")
    folded_norm = module.replace("attn.qkv", "norm1").replace("mlp.fc1", "norm2")
    if folded and folded_norm in folds and folds[folded_norm]["channels_differing"]:
        text = f"follows the LayerNorm fold of {folded_norm}: the folded weight and inputs differ"
        own_r, own_a = module_scores.get("R", {}).get("RR"), module_scores.get("A", {}).get("AA")
        if own_r is not None and own_a is not None:
            gap = float((own_a.sum() - own_r.sum()) / own_r.sum())
            text += f"; module output error, each side on its own capture: adalog {gap:+.2g} rel."
        return "propagated", text
    captures = {c: e for c, e in module_scores.items() if "RA" in e or {"A", "R"} <= set(e)}
    if "R" not in captures:
        return "unexplained", "no re-scoring (run with --calib-tensor and --fp-weights)"
    replayed = {c: e.get("replay", {}) for c, e in captures.items()}
    reproduced = None  # on either FP capture
    for side in replayed.values():
        found = _reproduced(side.get(label), reference[key], mask)
        if found is not None:
            reproduced = found if reproduced is None else reproduced | found
    errors = [side["error"] for side in replayed.values() if "error" in side]
    other_differs = any(differs(module, o) for o in other_labels)
    partner = PARTNERS.get(label)
    present = [o for o in other_labels if o in labels]
    other_name = (present or other_labels)[0].removesuffix(" scale").removesuffix(" q")
    parts = []
    if module_kind(module) == "conv":
        parts.append("single FPCS on the FP image (§5.7 G)")
        other_name = None
    elif other_differs:
        parts.append(f"alternating search (§5.7) against another {other_name} quantizer")
    if partner is not None and differs(module, partner):
        parts.append(f"chosen jointly with the {partner}")
    g_r = _gaps(captures["R"], operand, "R", mask)
    g_a = _gaps(captures["A"], operand, "R", mask) if "A" in captures else None
    context = "the same input" if other_name is None else f"the reference's {other_name} quantizer"
    parts.append(_gap_text(g_r, g_a, context))
    if reproduced is not None:
        partner_text = "" if other_name is None else f" with the reference's {other_name} quantizer"
        parts.append(
            f"adalog's own search replayed{partner_text} returns the reference's choice in "
            f"{int(reproduced.sum())}/{reproduced.numel()} (on either FP capture)"
        )
    elif errors:
        parts.append(f"replay failed ({errors[0]})")
    return _verdict((g_r, g_a), reproduced), "; ".join(parts)


# -- derived checks ------------------------------------------------------------------------------


def derived_checks(adalog: dict, reference: dict, fp: dict | None, meta: dict) -> dict:
    """Representation checks: the fc2 bias reparameterisation, tables against q, s = 1."""
    out: dict = {}
    bits = meta.get("bits", {})
    matches = []
    for key, q in reference.items():
        if key.endswith(".q"):  # the reference's T1/T2 against adalog's tables for its q
            prefix, n_bits = key[: -len("q")], bits.get("s" if ".matmul2." in key else "a", 4)
            t1, t2 = adalog_tables(q.reshape(()), n_bits)
            matches.append(
                torch.equal(t1, reference[prefix + "t1"])
                and torch.equal(t2, reference[prefix + "t2"])
            )
    out["reference_tables_match_adalog_construction"] = all(matches)
    ones = [float(v) for k, v in reference.items() if k.endswith("matmul2.a_quant.scale")]
    out["post_softmax_scales_all_one"] = all(v == 1.0 for v in ones)
    if fp is not None:
        for name, state in (("adalog", adalog), ("reference", reference)):
            worst = 0.0
            for key in state:
                if not key.endswith("mlp.fc2.weight"):
                    continue
                module = key[: -len(".weight")]
                w_hat = asym_fake_quant(
                    state[key],
                    state[f"{module}.weight_quant.scale"],
                    state[f"{module}.weight_quant.zero_point"],
                    bits.get("w", 4),
                )
                shift = float(state[f"{module}.input_quant.shift"])
                unfolded = state[f"{module}.bias"].double() + shift * w_hat.double().sum(1)
                b0 = fp[f"{module}.bias"].double()
                fold = float((shift * w_hat.double().sum(1)).abs().max())
                scale = max(float(b0.abs().max()), fold, 1e-30)
                worst = max(worst, float((unfolded - b0).abs().max()) / scale)
            out[f"fc2_bias_unfolded_vs_pretrained_{name}"] = worst
    return out


# -- the record ----------------------------------------------------------------------------------


def fidelity_record(
    adalog_dir: str | Path,
    reference_path: str | Path,
    calib_tensor: str | Path | None = None,
    fp_weights: str | Path | None = None,
    evaluate: bool = False,
) -> dict:
    adalog = read_state_dict(Path(adalog_dir) / WEIGHTS_FILE)
    reference_raw = load_reference(reference_path)
    reference, names = from_reference(reference_raw)  # with adalog-only tensors, for loading
    adalog_only = _adalog_only(adalog)
    missing = sorted(set(adalog) - set(reference))
    extra = sorted(set(reference) - set(adalog))
    if missing or extra:
        raise SystemExit(
            f"unmatched tensors: adalog only {missing[:8]}, reference only {extra[:8]}"
        )
    compared = {k: v for k, v in adalog.items() if k not in adalog_only}
    reference_compared = {k: v for k, v in reference.items() if k not in adalog_only}
    first_pass = compare(compared, reference_compared)  # as between two adalog checkpoints
    records, masks = {}, {}
    for key in sorted(compared, key=_natural):
        rule, module = _split(key, "adalog")
        if key not in first_pass["differing"]:
            tensor = adalog[key]
            info, mask = {"shape": list(tensor.shape), "elements": tensor.numel()}, None
            info["class"] = "equal"
        else:
            info, mask = classify(adalog[key], reference[key], sums=rule.label == "FP bias")
        records[key] = {"reference": names[key], "label": _label(rule, module), "module": module}
        records[key] |= info
        if mask is not None:
            masks[key] = mask
    meta = read_meta(adalog_dir)
    fp = load_file(str(fp_weights)) if fp_weights else None
    scores: dict = {}
    channels: dict = {}
    result: dict = {"adalog": str(adalog_dir), "reference": str(reference_path)}
    if calib_tensor:
        images = load_file(str(calib_tensor))["x"]
        cfg = meta["config"]
        settings = SearchSettings(
            eq_n=cfg.get("eq_n", 128),
            rounds=cfg.get("search_rounds", 3),
            fpcs=cfg.get("fpcs", True),
            steps=cfg.get("fpcs_steps", 6),
            zp_cap=cfg.get("zp_cap", 16),
            conv_zp_cap=cfg.get("conv_zp_cap", False),
            engine=cfg.get("search_engine", "fast"),
        )
        replays: dict[str, set[str]] = {}
        for rec in records.values():
            if rec["class"] == "differs" and rec["label"] in OPERANDS:
                replays.setdefault(rec["module"], set()).add(rec["label"])
        model_a, model_r = build_models(adalog_dir, reference)
        scores, channels = rescore(model_a, model_r, images, fp, settings, replays)
        result["objective_float32_noise"] = _noise_summary(scores)
    folds = fold_analysis(adalog, reference, fp, channels) if fp is not None else {}
    explain(records, masks, folds, scores, (adalog, reference), meta.get("bits", {}).get("w", 4))
    result |= {
        "ulp_tol": ULP_TOL,
        "near_tie": NEAR_TIE,
        "mapping": [vars(rule) for rule in MAPPING],
        "reference_only": [
            {"tensor": k, "value": reference_raw[k].flatten().tolist(), "why": why}
            for k in reference_raw
            for kind, s, _, why in REFERENCE_ONLY
            if k.endswith("." + s) and module_kind(k[: -len(s) - 1]) == kind
        ],
        "adalog_only": [
            {"tensor": k, "value": adalog[k].item(), "required": value, "why": why}
            for k, (value, why) in adalog_only.items()
        ],
        "summary": dict(Counter(r["class"] for r in records.values())),
        "by_label": _by_label(records),
        "by_block": _by_block(records),
        "derived_checks": derived_checks(adalog, reference, fp, meta),
        "folds": {k: _jsonable(v) for k, v in folds.items()},
        "tensors": records,
    }
    if scores:
        result["module_scores"] = _module_summary(scores)
    if evaluate:
        result["eval"] = evaluate_both(adalog_dir, reference)
    return result


def _adalog_only(state: dict) -> dict[str, tuple]:
    """adalog-only tensors of ``state`` with their required value and why they have none in the
    reference; a tensor away from its required value is an error."""
    out = {}
    for key, tensor in state.items():
        for kind, suffix, value, why in ADALOG_ONLY:
            if key.endswith("." + suffix) and module_kind(key[: -len(suffix) - 1]) == kind:
                if tensor.item() != value:
                    raise SystemExit(f"{key} = {tensor.item()}, expected {value}")
                out[key] = (value, why)
    return out


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in key.split(".")]


def _by_label(records: dict) -> dict:
    out: dict = {}
    for rec in records.values():
        row = out.setdefault(rec["label"], Counter())
        row[rec["class"]] += 1
        row["tensors"] += 1
    order = [r.label for r in MAPPING[:2]] + ["LayerNorm weight", "LayerNorm bias"]
    order += [r.label for r in MAPPING[2:]]
    return {k: dict(out[k]) for k in sorted(out, key=lambda k: order.index(k))}


def _by_block(records: dict) -> dict:
    """Differing tensors per transformer block (and outside the blocks)."""
    blocks = sorted(
        {".".join(k.split(".")[:2]) for k in records if k.startswith("blocks.")}, key=_natural
    )
    out = {}
    for block in blocks + ["other"]:
        keys = [
            k
            for k in records
            if (in_blocks(k, [block]) if block != "other" else not in_blocks(k, blocks))
        ]
        out[block] = dict(Counter(records[k]["class"] for k in keys))
    return out


def _jsonable(value):
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if k not in ("r", "delta")}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _noise_summary(scores: dict) -> dict:
    values = [float(v) for s in scores.values() for e in s.values() for v in e["noise"].flatten()]
    return {"median": statistics.median(values), "max": max(values)} if values else {}


def _module_summary(scores: dict) -> dict:
    """Own-objective totals per module: each side on its own capture."""
    out = {}
    for name, sides in scores.items():
        r = sides.get("R", {}).get("RR", sides.get("R", {}).get("R"))
        a = sides.get("A", {}).get("AA", sides.get("A", {}).get("A"))
        if r is None or a is None:
            continue
        out[name] = {
            "reference": float(r.sum()),
            "adalog": float(a.sum()),
            "gap": float((a.sum() - r.sum()) / r.sum()),
        }
    return out


def evaluate_both(adalog_dir: str | Path, reference: dict[str, Tensor]) -> dict:
    """dev-rest top-1 of adalog's checkpoint ("first") and of the reference's state through
    adalog's modules ("second"), as compare_checkpoints scores two checkpoints: four float
    roundings, KL divergence from the FP model, argmax agreement."""
    with reference_checkpoint(adalog_dir, reference) as folder:
        return evaluate_pair(str(adalog_dir), str(folder))


# -- output --------------------------------------------------------------------------------------

CLASSES = ("equal", "float32 rounding", "differs")


def print_markdown(result: dict) -> None:
    summary = result["summary"]
    total = sum(summary.values())
    print(
        f"adalog {result['adalog']} vs reference {result['reference']}: {total} tensors; "
        + ", ".join(f"{c} {summary.get(c, 0)}" for c in CLASSES)
    )
    print("\n| parameter | tensors | equal | float32 rounding | differs |")
    print("|---|---|---|---|---|")
    for label, row in result["by_label"].items():
        cells = " | ".join(str(row.get(c, 0)) for c in CLASSES)
        print(f"| {label} | {row['tensors']} | {cells} |")
    print("\n| block | " + " | ".join(CLASSES) + " |")
    print("|---|---|---|---|")
    for block, row in result["by_block"].items():
        print(f"| {block} | " + " | ".join(str(row.get(c, 0)) for c in CLASSES) + " |")
    rows = [(k, r) for k, r in result["tensors"].items() if r["class"] == "differs"]
    if rows:
        verdicts = Counter(r.get("verdict", "unexplained") for _, r in rows)
        print(
            "\nverdicts of the differing tensors: "
            + ", ".join(f"{v} {n}" for v, n in verdicts.most_common())
        )
        print_verdicts(rows)
        print("\n| tensor (adalog name) | differing | max abs | max rel | verdict | why |")
        print("|---|---|---|---|---|---|")
    for key, rec in rows:
        groups = (
            f"{rec.get('groups_differing', '?')}/{rec.get('groups', '?')} {rec.get('group', '')}"
        )
        print(
            f"| {key} | {groups} | {rec.get('max_abs', 0):.3g} | "
            f"{rec.get('max_relative', 0):.3g} | {rec.get('verdict', '')} | "
            f"{rec.get('explanation', '').replace('|', '/')} |"
        )
    if "module_scores" in result:
        print_module_scores(result["module_scores"])
    checks = result["derived_checks"]
    print("\nderived checks: " + ", ".join(f"{k} = {v}" for k, v in checks.items()))
    if "objective_float32_noise" in result:
        noise = result["objective_float32_noise"]
        print(
            f"float32 noise of the re-scored objectives: median {noise['median']:.2g}, "
            f"max {noise['max']:.2g} (relative)"
        )
    if "eval" in result:
        print("\ndev-rest (first = adalog, second = the reference's state in adalog's modules):")
        print_eval(result["eval"])


VERDICTS = ("near-tie", "reproduced", "propagated", "adalog better", "adalog worse", "mixed")


def print_verdicts(rows: list[tuple[str, dict]]) -> None:
    """Differing tensors per parameter and verdict."""
    table: dict[str, Counter] = {}
    for _, rec in rows:
        table.setdefault(rec["label"], Counter())[rec.get("verdict", "unexplained")] += 1
    others = sorted({v for c in table.values() for v in c} - set(VERDICTS))
    columns = list(VERDICTS) + others
    print("\n| differing parameter | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for label, counts in table.items():
        print(f"| {label} | " + " | ".join(str(counts.get(c, 0)) for c in columns) + " |")


def print_module_scores(scores: dict) -> None:
    """Each module's quantized output error (its search objective), both sides on their own
    FP captures, grouped by module type."""
    groups: dict[str, list[float]] = {}
    for name, row in scores.items():
        groups.setdefault(name.rsplit(".", 1)[-1] if "blocks." in name else name, []).append(
            row["gap"]
        )
    print("\nmodule output error (float64, each side on its own capture), adalog vs reference:")
    print("\n| module | modules | adalog lower | median gap | max abs gap |")
    print("|---|---|---|---|---|")
    for name, gaps in groups.items():
        lower = sum(g < 0 for g in gaps)
        print(
            f"| {name} | {len(gaps)} | {lower} | {statistics.median(gaps):+.2g} | "
            f"{max(abs(g) for g in gaps):.2g} |"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adalog", help="adalog checkpoint folder (model.safetensors, adalog.json)")
    parser.add_argument("reference", help="the reference's calibrated state dict (.pth)")
    parser.add_argument("--out", required=True, help="JSON record")
    parser.add_argument(
        "--calib-tensor",
        default=str(CALIB_TENSOR),
        help="calibration tensors for re-scoring ('' to skip)",
    )
    parser.add_argument(
        "--fp-weights",
        default=str(FP_WEIGHTS),
        help="pretrained FP weights for the fold analysis ('' to skip)",
    )
    parser.add_argument("--eval", action="store_true", help="also evaluate both on dev-rest")
    args = parser.parse_args(argv)
    result = fidelity_record(
        args.adalog, args.reference, args.calib_tensor or None, args.fp_weights or None, args.eval
    )
    atomic_write_json(args.out, result)
    print_markdown(result)
    return result


if __name__ == "__main__":
    main()
