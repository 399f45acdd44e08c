"""Serialisable quantization configuration with the reference presets (docs/algorithm.md §2.1)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from adalog.errors import ConfigError

#: The concrete config class of a classmethod/method result (typing.Self needs Python 3.11).
Self = TypeVar("Self", bound="SerialisableConfig")

POST_SOFTMAX_CHOICES = ("adalog", "log2", "logsqrt2", "uniform")
POST_GELU_CHOICES = ("adalog", "log2", "logsqrt2", "twin", "uniform")
LOG_SCALE_SEARCH_CHOICES = ("transplant", "own")
SEARCH_ENGINE_CHOICES = ("fast", "naive")
WEIGHT_ROUNDING_CHOICES = ("nearest", "gptq")
BIT_RANGE = range(2, 9)
#: Options beyond the reference that the ``*-plus`` presets turn on: per-head value rotation
#: and GPTQ weight rounding, which add up (benchmarks/RESULTS.md, "Beyond-reference presets").
#: ``fc2_token_norm`` is left out: on top of GPTQ it lowered top-1 (GPTQ already weighs fc2's
#: tokens by their norm).
PLUS_OPTIONS: dict[str, Any] = {"rotate_values": True, "weight_rounding": "gptq"}
#: The block reconstruction (a ReconstructConfig preset) that ``adalog quantize --preset *-plus``
#: runs after calibrating a classifier: it learns the weight rounding, so GPTQ is left out then;
#: calibrate-only (detectors, ``--reconstruct none``, ``AdaLogConfig.preset``) GPTQ stays.
PLUS_RECONSTRUCTION = "light"
#: Preset names: the reference configurations and their beyond-reference counterparts.
PRESETS = ("w3a3", "w4a4", "w6a6", "w3a3-plus", "w4a4-plus", "w6a6-plus")


class SerialisableConfig:
    """``with_overrides``, ``to_dict``/``from_dict`` and JSON/YAML ``save``/``load`` for the
    frozen dataclass configs (unknown keys refused, writes atomic)."""

    #: What the error messages call this config.
    config_kind = "config"

    def with_overrides(self: Self, **overrides: Any) -> Self:
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown {self.config_kind} keys: {', '.join(sorted(unknown))}")
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[Self], data: dict[str, Any]) -> Self:
        if not isinstance(data, dict):
            raise ConfigError(f"a {cls.config_kind} must be a mapping of field names to values")
        return cls().with_overrides(**data)

    def save(self, path: str | Path) -> None:
        from adalog.io import atomic_write_text

        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=True))
        else:
            atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls: type[Self], path: str | Path) -> Self:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"could not read {cls.config_kind} {path}: {exc}") from exc
        return cls.from_dict(data)


@dataclass(frozen=True)
class AdaLogConfig(SerialisableConfig):
    """Everything that decides how a model is quantized and calibrated.

    Defaults are the reference W4A4 values. ``head_a_bits=None`` means "same as a_bits" (the
    reference quantizes the classifier input at a_bits). The image fed to the patch embedding
    stays float, as in the reference (§10.1).
    """

    w_bits: int = 4
    a_bits: int = 4
    s_bits: int = 4
    head_a_bits: int | None = None
    post_softmax: str = "adalog"
    post_gelu: str = "adalog"
    bias_reparam: bool = True
    ln_fold: bool = True
    # Post-GELU log2/log-sqrt2 ablations: 'transplant' copies the AdaLog-searched scale as the
    # reference does (§10.8); 'own' searches the fixed-base quantizer's own scale.
    log_scale_search: str = "transplant"
    eq_n: int = 128
    search_rounds: int = 3
    fpcs: bool = True
    fpcs_steps: int = 6
    zp_cap: int = 16
    # The reference applies zp_cap to linear weights and matmuls but not to the patch-embed conv
    # (§10.10), whose 8-bit grid then has 128 zero points and, at eq_n=128, one scale each (a
    # degenerate grid, refused). True caps the conv grid too (needed for w_bits=8 at eq_n=128).
    conv_zp_cap: bool = False
    # 'fast' scores candidates with exact closed forms (same choices, much faster); 'naive'
    # recomputes the layer output per candidate like the reference (for checks and timing).
    search_engine: str = "fast"
    # Beyond the reference: 'gptq' re-rounds every quantized weight but the head's on its
    # searched grid with GPTQ's error feedback (token-normalised input Gram matrices of
    # gptq_views seeded views of the calibration images; gptq_damp x mean diagonal added);
    # 'nearest' is the reference.
    weight_rounding: str = "nearest"
    # Beyond the reference: score the post-GELU fc2 searches (log input quantizer and weights)
    # with each token's squared output error divided by its input's squared norm, so that the
    # few massive-activation tokens do not decide the grids; False is the reference's plain sum.
    fc2_token_norm: bool = False
    # Beyond the reference: before calibration, rotate each attention head's values and the
    # matching proj input columns by a fixed random orthogonal matrix (exact in float, free at
    # run time; adalog.models.rotation). False is the reference.
    rotate_values: bool = False
    gptq_damp: float = 0.1
    gptq_views: int = 256
    calib_size: int = 32
    calib_batch_size: int = 32
    calib_augment: bool = True
    seed: int = 5

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "s_bits"):
            _check_bits(name, getattr(self, name))
        if self.head_a_bits is not None:
            _check_bits("head_a_bits", self.head_a_bits)
        _check_choice("post_softmax", self.post_softmax, POST_SOFTMAX_CHOICES)
        _check_choice("post_gelu", self.post_gelu, POST_GELU_CHOICES)
        _check_choice("log_scale_search", self.log_scale_search, LOG_SCALE_SEARCH_CHOICES)
        _check_choice("search_engine", self.search_engine, SEARCH_ENGINE_CHOICES)
        _check_choice("weight_rounding", self.weight_rounding, WEIGHT_ROUNDING_CHOICES)
        if self.fc2_token_norm and self.post_gelu not in ("adalog", "log2", "logsqrt2"):
            raise ConfigError(
                "fc2_token_norm weighs the log-quantizer fc2 searches; it has no effect with "
                f"post_gelu={self.post_gelu!r}"
            )
        if not self.gptq_damp > 0:
            raise ConfigError(f"gptq_damp must be > 0, got {self.gptq_damp!r}")
        counts = ("eq_n", "search_rounds", "fpcs_steps", "calib_size", "calib_batch_size")
        for name in (*counts, "gptq_views"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fpcs_steps < 2 and self.fpcs:
            raise ConfigError("fpcs_steps must be >= 2 (one coarse step plus refinements)")

    @property
    def head_bits(self) -> int:
        return self.a_bits if self.head_a_bits is None else self.head_a_bits

    @property
    def folds_layernorm(self) -> bool:
        """The reference folds post-LN scales only when input and weight bits agree (§10.16)."""
        return self.ln_fold and self.a_bits == self.w_bits

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> AdaLogConfig:
        """``w3a3``/``w4a4``/``w6a6`` are the reference configurations (for reproduction);
        ``*-plus`` adds the options beyond the reference that measured best (PLUS_OPTIONS)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset '{name}'; choose from {', '.join(PRESETS)}")
        bits = int(name[1])
        extra = PLUS_OPTIONS if is_plus_preset(name) else {}
        return cls(w_bits=bits, a_bits=bits, s_bits=bits, **extra).with_overrides(**overrides)

    @classmethod
    def w3a3(cls, **overrides: Any) -> AdaLogConfig:
        return cls.preset("w3a3", **overrides)

    @classmethod
    def w4a4(cls, **overrides: Any) -> AdaLogConfig:
        return cls.preset("w4a4", **overrides)

    @classmethod
    def w6a6(cls, **overrides: Any) -> AdaLogConfig:
        return cls.preset("w6a6", **overrides)


def is_plus_preset(name: str | None) -> bool:
    """Whether ``name`` is one of the beyond-reference ``*-plus`` presets."""
    return name in PRESETS and name.endswith("-plus")


def _check_bits(name: str, value: int) -> None:
    if not isinstance(value, int) or value not in BIT_RANGE:
        raise ConfigError(f"{name} must be an integer bit-width in 2..8, got {value!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
