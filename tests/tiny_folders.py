"""Tiny transformers models saved as save_pretrained saves them (random weights, no downloads), for the tools'
tests: ``--arch hf:FOLDER`` of each family the tools take."""
import torch
import transformers as T

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8)
BUILDERS = {  # family: (class, config); 32 px images, 16 patches
    "vit": (T.ViTForImageClassification, lambda: T.ViTConfig(image_size=32, num_labels=10, **SMALL)),
    "dinov3": (T.DINOv3ViTModel, lambda: T.DINOv3ViTConfig(image_size=32, num_register_tokens=2, **SMALL)),  # RoPE
    "siglip": (T.SiglipVisionModel, lambda: T.SiglipVisionConfig(image_size=32, **SMALL)),
    "siglip2": (T.Siglip2VisionModel, lambda: T.Siglip2VisionConfig(num_patches=16, **SMALL)),
}
TOKENS = {"vit": 17, "dinov3": 19, "siglip": 16, "siglip2": 16}  # tokens entering the first block


def save_tiny(root, family: str) -> str:
    """Save a tiny ``family`` model under ``root``; its ``--arch``."""
    torch.manual_seed(0)
    cls, config = BUILDERS[family]
    cls(config()).save_pretrained(root / family)
    return f"hf:{root / family}"
