"""Patching models so that their blocks compress tokens.

The compressed layer exists once, in ``layers.py``; each family adapter says where its layers and their
parts are (a ``layers.LayerLayout``) and holds what is its library's own: ``timm.py`` (timm
VisionTransformer), ``eva.py`` (timm Eva: EVA-02, DINOv3, RoPE-ViT), ``hf.py`` (transformers ViT, DeiT, DINOv2,
DINOv3, CLIP vision, SigLIP, SigLIP 2) and ``open_clip.py`` (OpenCLIP VisionTransformer), the last two
imported only when a model of theirs is patched. Every adapter has the same
entry points: ``supports``, ``apply_patch``, ``remove_patch``, ``model_shape`` and ``has_class_token``.
"""
from typing import Optional, Sequence, Tuple

from ..core.cost import ModelShape
from ..core.counting import Schedule
from ..core.methods import METHODS
from ..core.state import get_config, get_state
from . import eva as _eva
from . import timm as _timm

__all__ = ["apply_patch", "remove_patch", "get_config", "get_state", "model_shape", "methods_for"]

SUPPORTED_MODELS = ("a timm VisionTransformer, a transformers ViT / DeiT / DINOv2 / DINOv3 / CLIP / SigLIP vision "
                    "model, a timm Eva (EVA-02, DINOv3, RoPE-ViT) or an OpenCLIP VisionTransformer")


def _adapter(model):
    """The adapter module of ``model``'s family: by the package its class, or a base class, comes from;
    ValueError (naming ``model``) for anything else."""
    if _timm.supports(model):
        return _timm
    if _eva.supports(model):
        return _eva
    packages = {cls.__module__.split(".")[0] for cls in type(model).__mro__}
    if "transformers" in packages:
        from . import hf
        return hf
    if "open_clip" in packages:
        from . import open_clip
        return open_clip
    raise ValueError(f"model: expected {SUPPORTED_MODELS}, got {type(model).__name__}")


def apply_patch(model, select_method: Optional[str] = None, pool_k: Optional[Schedule] = None, *,
                method: Optional[str] = None, schedule: Optional[Schedule] = None, reduce_at: Optional[str] = None,
                prop_attn: bool = True, trace_source: bool = False, fused_attn: bool = True):
    """Make every block of ``model`` remove tokens; patches it in place and returns it.

    Args:
        method: one of ``pruning.METHOD_NAMES`` (none, tk, tk_n, evit, evit_n, n_wa, a_wn, tome); default tk_n.
            Positionally, or as ``select_method=`` (the seed's keyword).
        schedule: tokens removed per block: one int for every block, or a list with one int per block;
            default 10. Positionally, or as ``pool_k=`` (the seed's keyword).
        reduce_at: ``block`` (after the MLP, the paper's placement) or ``attn`` (between attention and
            MLP); default: the method's own (``block``; ``attn`` for tome).
        prop_attn: ToMe's proportional attention (log of token sizes added to the attention logits).
        trace_source: record which original tokens every token carries (``get_state(model).source``).
        fused_attn: run attention through scaled_dot_product_attention; False materialises the N×N
            attention matrix. One switch for every block, whether it reduces or not (a transformers model
            loaded with ``attn_implementation="eager"`` always materialises it).

    A bad argument raises ValueError naming it as it was given (``select_method:``/``pool_k:`` for positional
    values).
    """
    method_arg, chosen_method = _one_of(("method", method), ("select_method", select_method), default="tk_n")
    schedule_arg, chosen_schedule = _one_of(("schedule", schedule), ("pool_k", pool_k), default=10)
    return _adapter(model).apply_patch(model, chosen_method, chosen_schedule, names=(method_arg, schedule_arg),
                                       reduce_at=reduce_at, prop_attn=prop_attn, trace_source=trace_source,
                                       fused_attn=fused_attn)


def _one_of(new, seed, default):
    """(the argument's name, its value) from the library's keyword or the seed's (positional) one."""
    (new_name, new_value), (seed_name, seed_value) = new, seed
    if new_value is not None and seed_value is not None:
        raise ValueError(f"{new_name}: given twice, as {new_name}= and as {seed_name} (positionally or by keyword)")
    if new_value is not None:
        return new_name, new_value
    return seed_name, default if seed_value is None else seed_value


def remove_patch(model):
    """Undo ``apply_patch``: the model runs exactly as before it was patched."""
    return _adapter(model).remove_patch(model)


def model_shape(model, img_size: Optional[Sequence[int]] = None) -> ModelShape:
    """The sizes of ``model`` that its FLOPs depend on, from its family's adapter (``img_size`` (height, width)
    overrides the model's own image size)."""
    return _adapter(model).model_shape(model, img_size)


def methods_for(model) -> Tuple[str, ...]:
    """The method names ``apply_patch`` takes for ``model``: every one for a model with a class token; without
    one, those that do not read class-token attention (``none``, ``tk_n``, ``evit_n``, ``tome``, the controls)."""
    with_class_token = _adapter(model).has_class_token(model)
    return tuple(name for name, method in METHODS.items() if with_class_token or not method.needs_cls_attention)
