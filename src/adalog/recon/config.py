"""Serialisable block-reconstruction settings (docs/algorithm.md §7): presets ``reference``,
``fast``, ``light``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adalog.config import SerialisableConfig
from adalog.errors import ConfigError

INPUT_SOURCES = ("fp", "quantized")
LOSSES = ("mse", "fisher", "token_norm")
PRESETS = ("reference", "fast", "light")


@dataclass(frozen=True)
class ReconstructConfig(SerialisableConfig):
    """How ``adalog.reconstruct`` trains AdaRound rounding and activation scales block by block.

    Defaults are the reference values (§7). Beyond the reference: ``input_source="quantized"``
    feeds each block the output of the already-reconstructed quantized blocks before it (BRECQ)
    instead of FP inputs; ``drop_prob`` keeps each activation element FP with that probability
    while training (QDrop); ``loss="fisher"`` weights the block output error by the squared
    gradient of the FP model's loss (diagonal Fisher); ``loss="token_norm"`` divides each output
    token's error by the token's FP variance, as the next LayerNorm does;
    ``keep_if_worse=False`` reverts a unit to its calibrated state when, after hard rounding,
    its loss on the first ``batch_size`` unaugmented views (no QDrop) is higher than before
    training (the reference keeps every result); ``train_bias_norm=True`` also trains the
    unit's biases and LayerNorm affine parameters (they stay float, so any value is exact and
    exportable) with Adam at ``bias_norm_lr``, cosine-annealed (the reference freezes them).
    ``network_iterations > 0`` adds a stage after the blocks: every activation scale and every
    float bias and LayerNorm affine of the whole model is trained end to end (weights fixed,
    no QDrop) on the KL divergence of its logits from the FP model's, with ``act_lr`` and
    ``bias_norm_lr`` annealed to 0; the stage is undone if it raises the KL on the
    unaugmented views and ``keep_if_worse`` is False. ``kl_tail > 0`` (ViT/DeiT) trains the
    last ``kl_tail`` blocks together with the final norm and the head as one unit on the KL
    divergence of the logits, like the head, instead of each block on its output MSE, which
    the few massive-activation tokens of the late blocks dominate; the reference trains every
    block alone. ``iterations=0`` skips the block stage.
    The data are
    ``data_size`` seeded views (crops, flips) of the calibration images: the originals first,
    then random crops; ``mix_prob > 0`` pastes a rectangle of another image's crop into that
    share of the crops (CutMix without labels; the reference has no such step).
    """

    config_kind = "reconstruction config"  # for error messages; not a field

    iterations: int = 20000
    batch_size: int = 32
    data_size: int = 1024
    crop_scale_min: float = 0.25
    hflip: bool = True
    mix_prob: float = 0.0
    weight_lr: float = 1e-3
    act_lr: float = 4e-5
    train_weights: bool = True
    train_act: bool = True
    round_reg: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    rec_weight: float = 0.1
    input_source: str = "fp"
    drop_prob: float = 0.0
    loss: str = "mse"
    keep_if_worse: bool = True
    train_bias_norm: bool = False
    bias_norm_lr: float = 1e-4
    network_iterations: int = 0
    kl_tail: int = 0
    seed: int = 5

    def __post_init__(self) -> None:
        for name, least in (
            ("iterations", 0),
            ("network_iterations", 0),
            ("kl_tail", 0),
            ("batch_size", 1),
            ("data_size", 1),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
        rates = ("weight_lr", "act_lr", "bias_norm_lr")
        for name in rates + ("round_reg", "beta_start", "beta_end", "rec_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        _check_unit("warmup", self.warmup, closed=True)
        _check_unit("drop_prob", self.drop_prob, closed=False)
        _check_unit("mix_prob", self.mix_prob, closed=True)
        if not 0 < self.crop_scale_min <= 1:
            raise ConfigError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min!r}")
        _check_choice("input_source", self.input_source, INPUT_SOURCES)
        _check_choice("loss", self.loss, LOSSES)

    @classmethod
    def reference(cls, **overrides: Any) -> ReconstructConfig:
        """§7: 20k iterations per block, batch 32, 1024 images, FP inputs, plain MSE."""
        return cls().with_overrides(**overrides)

    @classmethod
    def fast(cls, **overrides: Any) -> ReconstructConfig:
        """Sized for a 2-core CPU: 300 iterations per block (ViT-Tiny: about 0.45 s per batch-32
        iteration on one thread), learning rates raised so the rounding settles in that many
        steps, quantized block inputs and QDrop. Chosen for unseen images, not for the block
        loss (benchmarks/RESULTS.md, Block reconstruction, 2026-12-04): 1024 views, half of them
        mixed, only the rounding trained (learned activation scales fit the calibration images,
        not others), a unit whose probe loss rose is reverted, and the token-normalised loss
        (ViT-Tiny W3A3 +25.0 / +26.5 points over calibrate-only on two seeds against +6.6 with
        the MSE)."""
        base = cls(
            iterations=300,
            data_size=1024,
            mix_prob=0.5,
            weight_lr=1e-2,
            act_lr=4e-4,
            train_act=False,
            input_source="quantized",
            drop_prob=0.5,
            keep_if_worse=False,
            loss="token_norm",
        )
        return base.with_overrides(**overrides)

    @classmethod
    def light(cls, **overrides: Any) -> ReconstructConfig:
        """``fast`` cut to 60 iterations on 256 views, the reconstruction of the ``*-plus``
        presets: ``fast`` plateaus early (150 iterations scored as well as 300 on ViT-Tiny
        W4A4), so a few minutes buy most of its gain over calibrate-only, with no more memory
        than the calibration (benchmarks/RESULTS.md, Beyond-reference presets)."""
        return cls.fast(**({"iterations": 60, "data_size": 256} | overrides))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ReconstructConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown reconstruction preset '{name}'; choose from {PRESETS}")
        return getattr(cls, name)(**overrides)

    @classmethod
    def resolve(cls, spec: str) -> ReconstructConfig:
        """A preset name, or the path of a JSON/YAML file (the CLI's ``--reconstruct`` value)."""
        return cls.preset(spec) if spec in PRESETS else cls.load(spec)


def _check_unit(name: str, value: float, closed: bool) -> None:
    ok = 0 <= value <= 1 if closed else 0 <= value < 1
    if not ok:
        interval = "[0, 1]" if closed else "[0, 1)"
        raise ConfigError(f"{name} must be in {interval}, got {value!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
