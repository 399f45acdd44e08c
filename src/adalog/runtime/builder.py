"""Build an artifact's integer model on the ``reference`` or the ``fast`` engine.

Above both engines' modules (:mod:`adalog.runtime.integer`, :mod:`adalog.runtime.fast`, which
builds on the former) so that choosing an engine adds no import back into either of them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from adalog.errors import ArtifactError
from adalog.models.qmodules import QuantConv2d, QuantLinear, QuantMatMul
from adalog.pipelines.export import Artifact, fake_quant_model, read_artifact
from adalog.runtime.fast import FastMatMul, fast_linear, fuse_model
from adalog.runtime.integer import IntConv2d, IntLinear, IntMatMul
from adalog.runtime.kernels import make_kernel

__all__ = ["build_integer_model", "load_integer_model"]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def build_integer_model(
    artifact: Artifact, engine: str = "reference", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The artifact's model with every quantized product executed in integers.

    ``engine``: ``reference`` (:mod:`adalog.runtime.integer`, exact int64 ``torch.matmul``) or
    ``fast`` (:mod:`adalog.runtime.fast`: int8 GEMMs, float LUTs for log operands, fused ViT
    blocks; float32 only, equal up to float32 rounding). CPU only. ``dtype`` is the float type
    of the parts that stay float (float64 only to verify against a float64 fake-quant model
    without float32 rounding noise). ``model.integer_kernel.stats`` counts GEMM calls per kernel
    path.
    """
    kernel = make_kernel(engine)
    if engine == "fast" and dtype != torch.float32:
        raise ValueError("the fast engine runs in float32 only")
    model = fake_quant_model(artifact)
    replacements = {QuantLinear: IntLinear, QuantConv2d: IntConv2d, QuantMatMul: IntMatMul}
    if engine == "fast":
        replacements.update({QuantLinear: fast_linear, QuantMatMul: FastMatMul})
    for name, module in list(model.named_modules()):
        build = replacements.get(type(module))
        if build is not None:
            _set_submodule(model, name, build(artifact, name, module, kernel))
    if engine == "fast":
        fuse_model(model)
    model.integer_kernel = kernel
    return model.to(dtype).eval().requires_grad_(False)


def load_integer_model(
    art_dir: str | Path,
    engine: str = "reference",
    expected_model: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Read and validate the artifact in ``art_dir`` (:func:`read_artifact`) and build its
    integer model; ``expected_model`` guards against running another architecture's artifact."""
    artifact = read_artifact(art_dir)
    found = artifact.meta["model"]
    if expected_model is not None and expected_model.split(".")[0] != found.split(".")[0]:
        raise ArtifactError(
            f"artifact {art_dir} was made for model '{found}', not '{expected_model}'"
        )
    return build_integer_model(artifact, engine, dtype)
