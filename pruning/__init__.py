"""Token compression for timm Vision Transformers.

``pruning.patch.apply_patch(model, select_method="tk_n", pool_k=10)`` makes every block remove tokens.
"""
from .methods import CONTROL_NAMES, METHOD_NAMES, METHODS, CompressionMethod, get_method
from .patch import apply_patch, get_config, get_state, remove_patch
from .state import evaluation_draws, seed_draws

__all__ = ["METHODS", "METHOD_NAMES", "CONTROL_NAMES", "CompressionMethod", "get_method",
           "apply_patch", "remove_patch", "get_config", "get_state", "seed_draws", "evaluation_draws"]
