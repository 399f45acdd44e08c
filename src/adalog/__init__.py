"""adalog: post-training quantization of Vision Transformers with the AdaLog quantizer.

import adalog
qmodel = adalog.quantize(model, calib_images, adalog.AdaLogConfig.w4a4())
qmodel = adalog.reconstruct(qmodel, calib_images, adalog.ReconstructConfig.fast())  # optional
adalog.save_quantized(qmodel, "qdir"); qmodel = adalog.load_quantized("qdir")
"""

__version__ = "0.1.0"

from adalog.config import AdaLogConfig  # noqa: E402
from adalog.pipelines.calibrate import calibrate as quantize  # noqa: E402
from adalog.pipelines.checkpoint import load_quantized, save_quantized  # noqa: E402
from adalog.pipelines.reconstruct import reconstruct  # noqa: E402
from adalog.recon.config import ReconstructConfig  # noqa: E402

__all__ = [
    "AdaLogConfig",
    "ReconstructConfig",
    "__version__",
    "load_quantized",
    "quantize",
    "reconstruct",
    "save_quantized",
]
