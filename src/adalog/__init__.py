"""adalog: post-training quantization of Vision Transformers with the AdaLog quantizer.

import adalog
qmodel = adalog.quantize(model, "calib_folder", adalog.AdaLogConfig.preset("w4a4-plus"))
adalog.save_quantized(qmodel, "qdir"); qmodel = adalog.load_quantized("qdir")

Block reconstruction starts from a calibration with ``weight_rounding="nearest"`` (the
``*-plus`` presets round with GPTQ); ``adalog quantize --preset w4a4-plus`` runs:
config = adalog.AdaLogConfig.preset("w4a4-plus", weight_rounding="nearest")
qmodel = adalog.reconstruct(adalog.quantize(model, images, config), images,
                            adalog.ReconstructConfig.light())
"""

from adalog._version import __version__
from adalog.config import AdaLogConfig
from adalog.pipelines.calibrate import quantize
from adalog.pipelines.checkpoint import load_quantized, save_quantized
from adalog.pipelines.reconstruct import reconstruct
from adalog.recon.config import ReconstructConfig

__all__ = [
    "AdaLogConfig",
    "ReconstructConfig",
    "__version__",
    "load_quantized",
    "quantize",
    "reconstruct",
    "save_quantized",
]
