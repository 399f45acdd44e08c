"""Integer execution of exported artifacts (issue 7): exact integer GEMM kernels and an
executor that swaps every quantized product of the model for an integer one.

Module layering (no import cycles, ``tests/test_imports.py``): ``kernels`` and ``artifact``
(reading the artifact) at the bottom, the reference modules in ``integer``, the fast engine's
in ``fast`` (which reuses ``integer``), ``builder`` choosing between them, ``onnx_engine`` on top.
"""

from adalog.runtime.builder import build_integer_model, load_integer_model
from adalog.runtime.kernels import ENGINES, make_kernel

__all__ = ["ENGINES", "build_integer_model", "load_integer_model", "make_kernel"]
