"""Token compression for timm Vision Transformers.

``pruning.patch.apply_patch(model, select_method="tk_n", pool_k=10)`` makes every block remove tokens.
"""
from .methods import METHOD_NAMES, METHODS, CompressionMethod, get_method
from .patch import apply_patch, get_config, get_state, remove_patch

__all__ = ["METHODS", "METHOD_NAMES", "CompressionMethod", "get_method",
           "apply_patch", "remove_patch", "get_config", "get_state"]
