"""timm model creation, weight loading and family checks."""

from adalog.models.factory import SUPPORTED_FAMILIES, create_model, model_family
from adalog.models.weights import load_weights, read_state_dict

__all__ = ["SUPPORTED_FAMILIES", "create_model", "load_weights", "model_family", "read_state_dict"]
