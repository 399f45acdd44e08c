"""Integer execution of exported artifacts (issue 7): exact integer GEMM kernels and an
executor that swaps every quantized product of the model for an integer one."""

from adalog.runtime.integer import build_integer_model, load_integer_model
from adalog.runtime.kernels import ENGINES, make_kernel

__all__ = ["ENGINES", "build_integer_model", "load_integer_model", "make_kernel"]
