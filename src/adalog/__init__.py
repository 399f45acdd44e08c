"""adalog: post-training quantization of Vision Transformers with the AdaLog quantizer."""

__version__ = "0.1.0"
