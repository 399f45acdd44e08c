"""Exceptions with messages meant for users; the CLI prints them without a traceback."""


class AdalogError(Exception):
    """Base class of every error adalog raises for bad user input."""


class UnknownModelError(AdalogError):
    """The model name is not a timm model."""


class UnsupportedModelError(AdalogError):
    """The model family cannot be quantized by adalog."""


class WeightsError(AdalogError):
    """Weights could not be found, read, or matched to the model."""


class DataError(AdalogError):
    """The image data is missing, empty, unreadable, or unlabeled."""


class ConfigError(AdalogError):
    """A quantization configuration or checkpoint is invalid or does not match."""


class ArtifactError(AdalogError):
    """An exported integer artifact is corrupt, incomplete or of another format version."""
