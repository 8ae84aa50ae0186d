"""Token compression for Vision Transformers (timm, transformers, OpenCLIP).

``pruning.patch.apply_patch(model, "tk_n", 10)`` makes every block remove tokens: a compression method and
its schedule (tokens removed per block), by keyword ``method=``/``schedule=`` (or the seed's
``select_method=``/``pool_k=``).
"""
from .core.methods import CONTROL_NAMES, METHOD_NAMES, METHODS, CompressionMethod, get_method
from .patch import apply_patch, get_config, get_state, remove_patch
from .core.state import evaluation_draws, seed_draws

__all__ = ["METHODS", "METHOD_NAMES", "CONTROL_NAMES", "CompressionMethod", "get_method",
           "apply_patch", "remove_patch", "get_config", "get_state", "seed_draws", "evaluation_draws"]
