"""Small Vision Transformers for CPU-sized experiments, registered in timm's model registry.

Importing this module makes them available to ``timm.create_model`` by name, so ``main.py --arch``
takes a timm name whether the model is one of these or one of timm's own. They are plain timm
``VisionTransformer`` instances (class token, pre-norm blocks, MLP ratio 4); there are no
pretrained weights for them.

| name                   | image | patch | tokens | width | depth | heads | meant for      |
|------------------------|-------|-------|--------|-------|-------|-------|----------------|
| ``vit_pico_patch2_8``  | 8     | 2     | 16 + 1 | 64    | 4     | 4     | digits (8x8)   |
| ``vit_pico_patch4_28`` | 28    | 4     | 49 + 1 | 64    | 6     | 4     | Fashion-MNIST  |
| ``vit_pico_patch4_32`` | 32    | 4     | 64 + 1 | 64    | 6     | 4     | CIFAR-10/100   |
| ``vit_nano_patch4_28`` | 28    | 4     | 49 + 1 | 128   | 6     | 4     | Fashion-MNIST  |
| ``vit_nano_map_patch4_28`` | 28 | 4     | 49     | 128   | 6     | 4     | Fashion-MNIST, no class token |
| ``vit_nano_rope_patch4_28`` | 28 | 4    | 49 + 5 | 128   | 6     | 4     | Fashion-MNIST, RoPE, registers |

``vit_nano_map_patch4_28`` is ``vit_nano_patch4_28`` without a class token, pooled by an attention-pool
head (timm's ``global_pool="map"``: one learned query attends over all tokens), as SigLIP's vision tower
is: the model where Top-K by class-token attention cannot run and the norm score can.

``vit_nano_rope_patch4_28`` is ViT-Nano/4 as DINOv3 builds it (a timm ``Eva``): rotary position embeddings (DINOv3's
RoPE, no absolute position embedding), a class token and 4 register tokens, pooled by the average of the patch
tokens (timm's default for DINOv3); a class token exists, so attention Top-K can run, but the head does not read it.
"""
from typing import Any, Dict, Tuple

from timm.models import register_model
from timm.models.eva import Eva, _create_eva
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

__all__ = ["vit_pico_patch2_8", "vit_pico_patch4_28", "vit_pico_patch4_32", "vit_nano_patch4_28",
           "vit_nano_map_patch4_28", "vit_nano_rope_patch4_28"]

# The input normalisation of each small model's pretrained cfg: (mean, std) per channel of the images (0..1
# pixels) it is meant for. The datasets' own statistics are facts of ``data/`` (the library does not import
# it); tests/test_library_structure.py checks that the two agree.
GRAY_8X8_NORM = ((0.3056,), (0.3761,))  # scikit-learn digits
GRAY_28X28_NORM = ((0.2860,), (0.3530,))  # Fashion-MNIST
RGB_32X32_NORM = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))  # CIFAR-10

PICO_ARGS: Dict[str, Any] = dict(embed_dim=64, depth=6, num_heads=4, mlp_ratio=4.0)


def _cfg(in_chans: int, img_size: int, norm: Tuple[tuple, tuple], **kwargs) -> Dict[str, Any]:
    """timm pretrained-cfg entry for a model without downloadable weights."""
    return {
        "url": "", "num_classes": 10, "input_size": (in_chans, img_size, img_size), "pool_size": None,
        "crop_pct": 1.0, "interpolation": "bilinear", "fixed_input_size": True, "mean": norm[0], "std": norm[1],
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "mit", **kwargs,
    }


# Looked up by timm's ``register_model`` in this module, by model name.
default_cfgs = generate_default_cfgs({
    "vit_pico_patch2_8": _cfg(1, 8, GRAY_8X8_NORM),
    "vit_pico_patch4_28": _cfg(1, 28, GRAY_28X28_NORM),
    "vit_pico_patch4_32": _cfg(3, 32, RGB_32X32_NORM),
    "vit_nano_patch4_28": _cfg(1, 28, GRAY_28X28_NORM),
    "vit_nano_map_patch4_28": _cfg(1, 28, GRAY_28X28_NORM),
    "vit_nano_rope_patch4_28": _cfg(1, 28, GRAY_28X28_NORM),
})


def _refuse_pretrained(variant: str, pretrained: bool) -> None:
    if pretrained:
        raise ValueError(f"{variant} has no pretrained weights: train it, or load weights with --checkpoint")


def _create(variant: str, pretrained: bool, model_args: Dict[str, Any], **kwargs) -> VisionTransformer:
    _refuse_pretrained(variant, pretrained)
    return _create_vision_transformer(variant, pretrained=False, **dict(model_args, **kwargs))


@register_model
def vit_pico_patch2_8(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Pico/2 for 8x8 grayscale images (scikit-learn digits): 16 patches + class token."""
    # 4 blocks, not 6: on 1437 training images it learns faster (95% vs 93% test accuracy after 30 epochs)
    return _create("vit_pico_patch2_8", pretrained, dict(PICO_ARGS, depth=4, img_size=8, patch_size=2, in_chans=1,
                                                         num_classes=10), **kwargs)


@register_model
def vit_pico_patch4_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Pico/4 for 28x28 grayscale images (Fashion-MNIST, MNIST): 49 patches + class token."""
    return _create("vit_pico_patch4_28", pretrained, dict(PICO_ARGS, img_size=28, patch_size=4, in_chans=1,
                                                          num_classes=10), **kwargs)


@register_model
def vit_pico_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Pico/4 for 32x32 RGB images (CIFAR-10/100): 64 patches + class token."""
    return _create("vit_pico_patch4_32", pretrained, dict(PICO_ARGS, img_size=32, patch_size=4, in_chans=3,
                                                          num_classes=10), **kwargs)


@register_model
def vit_nano_patch4_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Nano/4 for 28x28 grayscale images: ViT-Pico/4 at width 128 (at width 64 Pico stays near 87% on
    Fashion-MNIST, capacity-bound); the experiment's baseline."""
    return _create("vit_nano_patch4_28", pretrained, dict(PICO_ARGS, embed_dim=128, img_size=28, patch_size=4,
                                                          in_chans=1, num_classes=10), **kwargs)


@register_model
def vit_nano_map_patch4_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Nano/4 without a class token, pooled by an attention-pool head (SigLIP-style): 49 patch tokens."""
    return _create("vit_nano_map_patch4_28", pretrained, dict(PICO_ARGS, embed_dim=128, img_size=28, patch_size=4,
                                                              in_chans=1, num_classes=10, class_token=False,
                                                              global_pool="map"), **kwargs)


@register_model
def vit_nano_rope_patch4_28(pretrained: bool = False, **kwargs) -> Eva:
    """ViT-Nano/4 built like DINOv3 (timm Eva): RoPE, class token + 4 registers, average pooling of the patches."""
    _refuse_pretrained("vit_nano_rope_patch4_28", pretrained)
    model_args = dict(PICO_ARGS, embed_dim=128, img_size=28, patch_size=4, in_chans=1, num_classes=10,
                      use_abs_pos_emb=False, use_rot_pos_emb=True, rope_type="dinov3", rope_temperature=100,
                      rope_rotate_half=True, num_reg_tokens=4, global_pool="avg", use_fc_norm=False)
    return _create_eva("vit_nano_rope_patch4_28", pretrained=False, **dict(model_args, **kwargs))
