"""The Hugging Face transformers part: every method on ViT, DeiT, DINOv2 (with or without registers), DINOv3
(rotary position embeddings: each token keeps its original patch's angles, see ``layers.RotaryTable``) and CLIP's
vision tower; on SigLIP and SigLIP 2's vision towers, which have no class token, every method that does not read
class-token attention.

This is the only module that knows transformers' classes. Each family is a layout of the shared compressed
layer (``layers.py``, as for timm and OpenCLIP): each encoder layer (and, for the DINOv2 classifiers, the model
itself) is given a subclass of its own class, so weights, hooks and ``state_dict`` are untouched and
``remove_patch`` restores the plain model.

Attention: a layer that reduces nothing runs transformers' own forward, with whatever attention implementation
the model was loaded with (``config._attn_implementation``), so a schedule of 0 is bit-identical. A layer that
reduces runs the projections itself: with ``eager`` it materialises the N×N attention matrix, as transformers'
eager path does; with any other implementation (``sdpa``, ...) it calls ``scaled_dot_product_attention`` and
computes the class-token attention row on its own (O(N·d)), so the N×N matrix is never formed.
``fused_attn=False`` makes the reducing layers materialise it whatever the implementation.

Pooling: the class token (and the distillation token, the registers) stay first, so the heads that read
``[:, 0]`` (and DeiT's ``[:, 1]``) are unchanged. The DINOv2 classifiers concatenate the class token with the
mean of the patch tokens; under compression that mean is ``patch_token_mean``: each remaining token weighted
by the original patches it holds (ToMe's sizes, so a merged token counts as many times as the patches in it
and the mean equals the mean over the original patches' slots), and every other token, a fused EViT-style
token included, counted once (a fused token is a weighted sum, not an average, of the tokens it replaced;
no patch count is kept for it). SigLIP's attention-pool head (a probe query over all tokens) reads the tokens
left, merged ones weighted by their size while ``prop_attn`` is on (``layers.SizeWeightedPool``), as the blocks
weigh them. SigLIP 2 takes patchified pixels with ``pixel_attention_mask`` and ``spatial_shapes``: while it
compresses, a batch whose mask is all ones runs without it and a padded one is refused (``naflex_inputs``
builds the inputs of images that fill their patches).

transformers itself is imported only inside the functions that need its classes.
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..core.cost import ModelShape
from ..core.counting import Schedule
from ..core.state import get_config
from .layers import (LayerLayout, MaskRefused, RotaryTable, build_config, compressed_class, get_path, grid_of,
                     linear_flops, mlp_hidden, patch_layers, patch_pool, unpatch_layers, unpatch_pool)
from .layers import patch_token_mean as size_weighted_mean

__all__ = ["apply_patch", "remove_patch", "supports", "model_shape", "patch_token_mean", "naflex_inputs",
           "takes_naflex", "image_size", "has_class_token", "SUPPORTED", "SIGLIP"]

SIGLIP = ("SiglipVisionModel", "Siglip2VisionModel")  # the families without a class token
SUPPORTED = ("ViTModel", "ViTForImageClassification", "DeiTModel", "DeiTForImageClassification",
             "DeiTForImageClassificationWithTeacher", "Dinov2Model", "Dinov2ForImageClassification",
             "Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification", "CLIPVisionModel",
             "CLIPVisionModelWithProjection", "DINOv3ViTModel") + SIGLIP


# --- transformers' families -------------------------------------------------------------------------------

_VIT = LayerLayout("hf_vit", "layernorm_before", "attention", "layernorm_after", "mlp",
                   attn_post=("dropout",), mlp_post=("dropout",))
_DINOV2 = LayerLayout("hf_dinov2", "norm1", "attention", "norm2", "mlp",
                      attn_post=("layer_scale1", "drop_path"), mlp_post=("layer_scale2", "drop_path"))
_CLIP = LayerLayout("hf_clip", "layer_norm1", "self_attn", "layer_norm2", "mlp", out_proj="out_proj",
                    scale="scale", dropout="dropout")


class _RotateHalfLayout(LayerLayout):
    """DINOv3: every layer is given ``position_embeddings=(cos, sin)``, rows (P, D) of every patch, rotate-half
    pairs; prefix tokens (class, registers) are not rotated."""

    def rotary_table(self, attn: nn.Module, value: Tuple[Tensor, Tensor]) -> RotaryTable:
        cos, sin = value
        return RotaryTable(sin, cos, half=True)


_DINOV3 = _RotateHalfLayout("hf_dinov3", "norm1", "attention", "norm2", "mlp", dropout="dropout",
                            attn_post=("layer_scale1", "drop_path"), mlp_post=("layer_scale2", "drop_path"),
                            rotary_arg="position_embeddings")


@dataclass(frozen=True)
class _Family:
    """One supported transformers class: where its encoder layers and its parts are."""

    class_name: str
    backbone: str  # attribute holding the vision model ("" for the model itself)
    layers: str  # dotted path from the backbone to the ModuleList of layers
    layout: LayerLayout
    patch_conv: str  # dotted path from the backbone to the patch embedding (a Conv2d; SigLIP 2: a Linear)
    heads: Tuple[str, ...] = ()  # dotted paths from the model to the Linear heads (for FLOPs)
    mean_pool: bool = False  # the classifier reads class token + mean of the patch tokens (DINOv2)
    class_token: bool = True  # False: no prefix token at all (SigLIP)
    probe_head: str = ""  # dotted path from the backbone to an attention-pool head (a probe query; SigLIP's)
    naflex: bool = False  # takes patchified pixel_values with pixel_attention_mask and spatial_shapes (SigLIP 2)

    def backbone_of(self, model: nn.Module) -> nn.Module:
        return get_path(model, self.backbone) if self.backbone else model

    def layers_of(self, model: nn.Module) -> nn.ModuleList:
        return get_path(self.backbone_of(model), self.layers)

    def num_prefix(self, model: nn.Module) -> int:
        name = self.class_name
        if not self.class_token:
            return 0
        if name.startswith("DeiT"):
            return 2  # class and distillation tokens
        if name.startswith("Dinov2WithRegisters") or name.startswith("DINOv3"):
            return 1 + model.config.num_register_tokens
        return 1


# --- SigLIP and SigLIP 2: no class token, an attention-pool head, SigLIP 2's patchified (NaFlex) inputs -------

_SIGLIP_FAMILIES = (
    _Family("SiglipVisionModel", "", "encoder.layers", _CLIP, "embeddings.patch_embedding", class_token=False,
            probe_head="head"),
    _Family("Siglip2VisionModel", "", "encoder.layers", _CLIP, "embeddings.patch_embedding", class_token=False,
            probe_head="head", naflex=True),
)


class _UnpaddedNaFlex:
    """A SigLIP 2 vision model while it compresses: a batch whose images all fill their patches (its
    ``pixel_attention_mask`` all ones) runs without the mask; a padded batch is refused."""

    def forward(self, pixel_values: Tensor, pixel_attention_mask: Optional[Tensor] = None,
                spatial_shapes: Optional[Tensor] = None, **kwargs):
        cfg = get_config(self)
        if cfg is not None and cfg.compresses():
            if pixel_attention_mask is not None and not bool(pixel_attention_mask.all()):
                raise MaskRefused("pixel_attention_mask: the batch is padded; token compression changes the token "
                                  "set, so padding masks are not supported: give images of one patch count (mask "
                                  "all ones)")
            pixel_attention_mask = None
        return super().forward(pixel_values, pixel_attention_mask, spatial_shapes, **kwargs)


def _probe_pool_flops(head: nn.Module) -> Tuple[float, float]:
    """(FLOPs once, FLOPs per token read) of SigLIP's attention-pool head: the probe's query projection, the
    output projection and the MLP once; per token its key and value projections and the two attention products."""
    attn = head.attention
    dim = attn.embed_dim
    once = 2.0 * dim * dim + linear_flops(attn.out_proj) + linear_flops(head.mlp.fc1, head.mlp.fc2)
    per_token = 2.0 * dim * 2 * dim + 2 * 2 * dim
    return once, per_token


def _patch_flops(embedding: nn.Module) -> float:
    """FLOPs of the patch embedding per patch: a Conv2d over one patch, or a Linear of a patchified one."""
    if isinstance(embedding, nn.Linear):
        return linear_flops(embedding)
    return 2.0 * embedding.in_channels * embedding.kernel_size[0] * embedding.kernel_size[1] * embedding.out_channels


def naflex_inputs(images: Tensor, patch_size: int) -> Dict[str, Tensor]:
    """SigLIP 2's keyword inputs for a batch of (B, C, H, W) images that fill their patches: ``pixel_values``
    (B, N, p·p·C), each patch flattened by rows, columns, then channels (as its image processor does),
    ``spatial_shapes`` (B, 2) and no ``pixel_attention_mask`` (no padding)."""
    batch, channels, height, width = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    pieces = images[:, :, :grid_h * patch_size, :grid_w * patch_size].reshape(
        batch, channels, grid_h, patch_size, grid_w, patch_size).permute(0, 2, 4, 3, 5, 1)
    spatial_shapes = torch.tensor([grid_h, grid_w], device=images.device).expand(batch, 2)
    return dict(pixel_values=pieces.reshape(batch, grid_h * grid_w, -1), pixel_attention_mask=None,
                spatial_shapes=spatial_shapes)


def takes_naflex(model: nn.Module) -> bool:
    """Whether ``model`` takes SigLIP 2's patchified inputs (``naflex_inputs``) rather than images."""
    return _require_family(model).naflex


def image_size(config) -> int:
    """The model's image size: its config's, or (SigLIP 2) the side of its square position grid in pixels."""
    size = getattr(config, "image_size", None)
    return size if size is not None else math.isqrt(config.num_patches) * config.patch_size


_FAMILIES = {f.class_name: f for f in (
    _Family("ViTModel", "", "layers", _VIT, "embeddings.patch_embeddings.projection", heads=("pooler.dense",)),
    _Family("ViTForImageClassification", "vit", "layers", _VIT, "embeddings.patch_embeddings.projection",
            heads=("classifier",)),
    _Family("DeiTModel", "", "layers", _VIT, "embeddings.patch_embeddings.projection", heads=("pooler.dense",)),
    _Family("DeiTForImageClassification", "deit", "layers", _VIT, "embeddings.patch_embeddings.projection",
            heads=("classifier",)),
    _Family("DeiTForImageClassificationWithTeacher", "deit", "layers", _VIT,
            "embeddings.patch_embeddings.projection", heads=("cls_classifier", "distillation_classifier")),
    _Family("Dinov2Model", "", "encoder.layer", _DINOV2, "embeddings.patch_embeddings.projection"),
    _Family("Dinov2ForImageClassification", "dinov2", "encoder.layer", _DINOV2,
            "embeddings.patch_embeddings.projection", heads=("classifier",), mean_pool=True),
    _Family("Dinov2WithRegistersModel", "", "encoder.layer", _DINOV2, "embeddings.patch_embeddings.projection"),
    _Family("Dinov2WithRegistersForImageClassification", "dinov2_with_registers", "encoder.layer", _DINOV2,
            "embeddings.patch_embeddings.projection", heads=("classifier",), mean_pool=True),
    _Family("CLIPVisionModel", "", "encoder.layers", _CLIP, "embeddings.patch_embedding"),
    _Family("CLIPVisionModelWithProjection", "vision_model", "encoder.layers", _CLIP, "embeddings.patch_embedding",
            heads=("visual_projection",)),
    _Family("DINOv3ViTModel", "", "model.layer", _DINOV3, "embeddings.patch_embeddings"),
) + _SIGLIP_FAMILIES}
assert tuple(_FAMILIES) == SUPPORTED


def _family(model: nn.Module) -> Optional[_Family]:
    """The family of ``model`` (its class or the nearest supported base class), or None."""
    import transformers

    for cls in type(model).__mro__:
        family = _FAMILIES.get(cls.__name__)
        if family is not None and getattr(transformers, cls.__name__, None) is cls:
            return family
    return None


def supports(model: nn.Module) -> bool:
    """Whether ``model`` is one of the transformers classes this adapter patches."""
    return _family(model) is not None


def _require_family(model: nn.Module) -> _Family:
    family = _family(model)
    if family is None:
        raise ValueError(f"model: transformers class {type(model).__name__} is not supported; "
                         f"supported: {', '.join(SUPPORTED)} (a CLIPModel: patch its vision_model)")
    return family


def has_class_token(model: nn.Module) -> bool:
    return _require_family(model).class_token


def apply_patch(model: nn.Module, method: str, schedule: Schedule, *, fused_attn: bool = True,
                **options) -> nn.Module:
    """Make every encoder layer of a transformers ViT / DeiT / DINOv2 / CLIP / SigLIP vision model remove tokens
    (arguments as ``pruning.patch.apply_patch``).

    ``fused_attn``: reducing layers use scaled_dot_product_attention unless the model was loaded with
    ``attn_implementation="eager"`` or this is False. It is one switch for every layer: with ``fused_attn=False``
    on an sdpa model the layers that reduce nothing materialise the attention too (instead of transformers'
    own sdpa forward).
    """
    family = _require_family(model)
    checkpointing = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    if getattr(model, checkpointing, False):
        raise ValueError("model: gradient checkpointing re-runs layers and would corrupt the token state; "
                         "call model.gradient_checkpointing_disable() before apply_patch")
    layers = family.layers_of(model)
    own_fused = getattr(model.config, "_attn_implementation", "eager") != "eager"
    cfg = build_config(method, schedule, len(layers), family.num_prefix(model), class_token=family.class_token,
                       fused_attn=bool(fused_attn) and own_fused,
                       carry_positions=family.layout.rotary_arg is not None, **options)
    remove_patch(model)
    patch_layers(model, layers, family.layout, cfg, own_attn_fused=own_fused)
    patch_pool(_probe_attention(family, model), cfg, keys_at=1, per_head=True)
    if family.mean_pool or family.naflex:
        model._original_class = model.__class__
        model.__class__ = (_mean_pooled_class(model.__class__, family.backbone) if family.mean_pool
                           else compressed_class(model.__class__, _UnpaddedNaFlex, "naflex"))
    return model


def _probe_attention(family: _Family, model: nn.Module) -> Optional[nn.Module]:
    """The attention of the model's attention-pool head (SigLIP's ``head.attention``), or None."""
    head = get_path(family.backbone_of(model), family.probe_head) if family.probe_head else None
    return None if head is None else head.attention


def remove_patch(model: nn.Module) -> nn.Module:
    """Undo ``apply_patch``: the model runs exactly as before it was patched."""
    family = _require_family(model)
    unpatch_layers(model, family.layers_of(model))
    unpatch_pool(_probe_attention(family, model))
    return model


def model_shape(model: nn.Module, img_size: Optional[Sequence[int]] = None) -> ModelShape:
    """The sizes ``pruning.flops`` needs, read from the model and its config (``img_size`` overrides its own)."""
    family = _require_family(model)
    backbone, layers = family.backbone_of(model), family.layers_of(model)
    config = backbone.config
    grid_h, grid_w, _, _ = grid_of(image_size(config), config.patch_size, img_size)
    attn = getattr(layers[0], family.layout.attn)
    prefix = family.num_prefix(model)
    probe = get_path(backbone, family.probe_head) if family.probe_head else None
    pool_once, pool_per_token = _probe_pool_flops(probe) if probe is not None else (0.0, 0.0)
    return ModelShape(
        num_tokens=grid_h * grid_w + prefix, num_prefix=prefix, dim=config.hidden_size,
        attn_dim=config.num_attention_heads * attn.head_dim, head_dim=attn.head_dim,
        hidden=mlp_hidden(getattr(layers[0], family.layout.mlp)), depth=len(layers),
        embed_flops=grid_h * grid_w * _patch_flops(get_path(backbone, family.patch_conv)),
        head_flops=linear_flops(*(get_path(model, path) for path in family.heads)) + pool_once,
        pool_token_flops=pool_per_token,
    )


def patch_token_mean(model: nn.Module, tokens: Tensor) -> Tensor:
    """Mean of the non-prefix tokens of ``tokens`` (B, N, C) as the patched ``model`` left them: weighted by the
    patches each holds when ToMe merged (so it is the mean over the original patches), else each token once.
    Without compression it is exactly ``tokens[:, num_prefix:].mean(dim=1)``."""
    cfg = get_config(model)
    num_prefix = cfg.num_prefix_tokens if cfg is not None else _require_family(model).num_prefix(model)
    return size_weighted_mean(cfg, tokens, num_prefix)


class _MeanPooledClassifier:
    """A DINOv2 classifier whose patch-token mean is ``patch_token_mean`` (see the module docstring)."""

    _backbone: str

    def forward(self, pixel_values: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, **kwargs):
        from transformers.modeling_outputs import ImageClassifierOutput

        outputs = getattr(self, self._backbone)(pixel_values, attention_mask=attention_mask, **kwargs)
        sequence_output = outputs.last_hidden_state
        linear_input = torch.cat([sequence_output[:, 0], patch_token_mean(self, sequence_output)], dim=1)
        logits = self.classifier(linear_input)
        loss = None if labels is None else self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


_POOLED_CLASSES: Dict[Tuple[type, str], type] = {}


def _mean_pooled_class(cls: type, backbone: str) -> type:
    key = (cls, backbone)
    if key not in _POOLED_CLASSES:
        from transformers.utils.generic import can_return_tuple

        forward = can_return_tuple(_MeanPooledClassifier.forward)
        _POOLED_CLASSES[key] = type(f"Compressed{cls.__name__}", (_MeanPooledClassifier, cls),
                                    {"_backbone": backbone, "forward": forward})
    return _POOLED_CLASSES[key]

