"""Patching models so that their blocks compress tokens. ``timm.py`` holds everything timm-specific;
``hf.py`` (transformers ViT, DeiT, DINOv2, CLIP vision) and ``open_clip.py`` (OpenCLIP VisionTransformer)
the same for their families, imported only when a model of theirs is patched."""
from typing import Optional, Sequence

from timm.models.vision_transformer import VisionTransformer

from ..counting import PoolK
from ..state import get_config, get_state
from . import timm as _timm

__all__ = ["apply_patch", "remove_patch", "get_config", "get_state", "family_shape"]

SUPPORTED_MODELS = ("a timm VisionTransformer, a transformers ViT / DeiT / DINOv2 / CLIP vision model, "
                    "or an OpenCLIP VisionTransformer")


def _adapter(model):
    """The adapter module of ``model``'s family (by the package its class, or a base class, comes from);
    None for anything else, which the timm path handles or refuses."""
    packages = {cls.__module__.split(".")[0] for cls in type(model).__mro__}
    if "transformers" in packages:
        from . import hf
        return hf
    if "open_clip" in packages:
        from . import open_clip
        return open_clip
    return None


def apply_patch(model, select_method: str = "tk_n", pool_k: PoolK = 10, *, reduce_at: Optional[str] = None,
                prop_attn: bool = True, trace_source: bool = False, fused_attn: bool = True):
    """Make every block of ``model`` remove tokens; patches it in place and returns it. See ``timm.apply_patch``
    for the arguments; transformers and OpenCLIP models go to their adapters (``hf.py``, ``open_clip.py``)."""
    adapter = _adapter(model)
    if adapter is None and not isinstance(model, VisionTransformer):
        raise ValueError(f"model: expected {SUPPORTED_MODELS}, got {type(model).__name__}")
    return (adapter or _timm).apply_patch(model, select_method, pool_k, reduce_at=reduce_at, prop_attn=prop_attn,
                                          trace_source=trace_source, fused_attn=fused_attn)


def remove_patch(model):
    """Undo ``apply_patch``: the model runs exactly as before it was patched."""
    return (_adapter(model) or _timm).remove_patch(model)


def family_shape(model, img_size: Optional[Sequence[int]] = None):
    """The ``flops.ViTShape`` of a transformers or OpenCLIP model, from its adapter; None for timm models."""
    adapter = _adapter(model)
    return None if adapter is None else adapter.model_shape(model, img_size)
