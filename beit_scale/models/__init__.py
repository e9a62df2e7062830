"""BEiT models: the zoo (typed configs by name), the plain-PyTorch model and timm interop."""
from .zoo import BeitConfig, build_model, get_config, list_models, resolve_config
from .beit import (BeitBackbone, BeitClassifier, BeitForMIM, resize_abs_pos_embed,
                   resize_rel_pos_bias_table)
from .convert import adapt_state_dict_to, from_timm, to_timm

__all__ = [
    "BeitConfig", "build_model", "get_config", "list_models", "resolve_config",
    "BeitBackbone", "BeitClassifier", "BeitForMIM", "resize_rel_pos_bias_table",
    "resize_abs_pos_embed", "from_timm", "to_timm", "adapt_state_dict_to",
]
