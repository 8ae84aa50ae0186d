"""Patching models so that their blocks compress tokens. ``timm.py`` holds everything timm-specific."""
from .timm import apply_patch, get_config, get_state, remove_patch

__all__ = ["apply_patch", "remove_patch", "get_config", "get_state"]
