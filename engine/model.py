"""The timm model of a run: created by name (hub weights when asked for, checked before timm tries),
its starting weights loaded, and compressed with the chosen method."""
import argparse
import os
import socket
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlparse

import timm
from timm.models.vision_transformer import VisionTransformer

import pruning.models  # noqa: F401  (registers the vit_pico_* models in timm's registry)
from pruning.counting import tokens_after
from pruning.flops import model_token_counts, vit_shape
from pruning.patch import apply_patch, get_config

from .checkpoint import load_weights
from .errors import CLIError, one_line


def hub_unreachable() -> Optional[str]:
    """Why the Hugging Face hub cannot be reached (its host name does not resolve), or None.

    Checked before timm tries, since the hub client retries for over a minute when offline.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false"):
        return None  # the user asked for the local cache
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    try:
        socket.getaddrinfo(host, 443)
    except OSError as err:
        return f"{host} cannot be reached ({err.strerror or err})"
    return None


def create_model(arch: str, num_classes: int, in_chans: int, *, pretrained: bool = False,
                 img_size: Optional[int] = None, patch_size: Optional[int] = None) -> VisionTransformer:
    """The timm VisionTransformer ``arch`` (``--arch``) for this dataset, optionally with hub weights."""
    if not timm.is_model(arch.split(".")[0]):
        raise CLIError(f"--arch: {arch!r} is not a timm model; list ViTs with "
                       f"python -c \"import timm; print(timm.list_models('vit_*'))\"")
    if pretrained and not any(n == arch or n.startswith(arch + ".") for n in timm.list_pretrained(arch + "*")):
        raise CLIError(f"--pretrained: timm has no pretrained weights for --arch {arch}; drop --pretrained, "
                       f"or load weights with --checkpoint FILE")
    if pretrained and (why := hub_unreachable()):
        raise CLIError(f"--pretrained: cannot fetch the timm weights of {arch}: {why}; fetch them once online "
                       f"(they stay in the Hugging Face cache; offline, set HF_HUB_OFFLINE=1 to use it), or pass a "
                       f"local weights file with --checkpoint FILE and drop --pretrained")
    kwargs: Dict[str, Any] = dict(num_classes=num_classes, in_chans=in_chans)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    try:
        model = timm.create_model(arch, pretrained=pretrained, **kwargs)
    except TypeError as err:
        raise CLIError(f"--arch {arch}: {one_line(err, named=True)}; --arch must be a timm VisionTransformer") \
            from None
    except Exception as err:
        if not pretrained:
            raise
        raise CLIError(f"--pretrained: could not fetch the timm weights of {arch} ({one_line(err, named=True)}); "
                       f"fetch them once online (they are kept in the Hugging Face cache), or pass a local "
                       f"weights file with --checkpoint FILE and drop --pretrained") from None
    if not isinstance(model, VisionTransformer):
        raise CLIError(f"--arch: {arch} is a {type(model).__name__}; token compression needs a timm "
                       f"VisionTransformer (vit_*, deit_*)")
    img, patch = model.patch_embed.img_size, model.patch_embed.patch_size
    if img[0] % patch[0] or img[1] % patch[1]:
        raise CLIError(f"--img_size {img[0]} is not a multiple of --patch_size {patch[0]}")
    return model


def build_model(args: argparse.Namespace, num_classes: int, in_chans: int, resumed: bool) -> VisionTransformer:
    """The model of ``--arch`` with its starting weights (hub, ``--checkpoint``; none when resuming:
    the checkpoint's come later)."""
    model = create_model(args.arch, num_classes, in_chans, pretrained=args.pretrained and not resumed,
                         img_size=args.img_size, patch_size=args.patch_size)
    if args.checkpoint and not resumed:
        left_out = load_weights(model, args.checkpoint, new_head_ok=not args.eval_only)
        if left_out:
            print(f"--checkpoint: loaded all but {', '.join(left_out)} (another number of classes); the head "
                  f"starts from scratch for {num_classes} classes")
    if isinstance(args.reduce_token, list) and len(args.reduce_token) != len(model.blocks):
        raise CLIError(f"--reduce_token: {len(args.reduce_token)} values given, but --arch {args.arch} has "
                       f"{len(model.blocks)} blocks; give one value per block, or a single int")
    return model


def compress(model: VisionTransformer, args: argparse.Namespace, trace_source: bool = False) -> VisionTransformer:
    """Patch ``model`` in place with ``--model`` (the method), ``--reduce_token`` and ``--reduce_at``."""
    try:
        return apply_patch(model, args.method, args.reduce_token, reduce_at=args.reduce_at,
                           trace_source=trace_source)
    except ValueError as err:
        raise CLIError(f"--model {args.method} / --reduce_token / --reduce_at: {err}") from None


def tokens_per_block(model: VisionTransformer) -> List[int]:
    """Tokens entering the first block, then leaving each block, as the compressed model runs them
    (the library's own count, ``pruning.flops.model_token_counts``): ``[17, 15, 13, 11, 9]``."""
    entering = [attn for attn, _ in model_token_counts(model)]
    cfg = get_config(model)
    last = entering[-1] if cfg is None else tokens_after(cfg.method, entering[-1], cfg.schedule[-1],
                                                         vit_shape(model).num_prefix)
    return entering + [last]


def unmet_reductions(model: VisionTransformer) -> List[Tuple[int, int, int]]:
    """(block, tokens asked, tokens removed) of every block that removes fewer tokens than the method removes
    when tokens are plentiful, because too few are left (the prefix tokens and at least one patch stay)."""
    cfg = get_config(model)
    if cfg is None:
        return []
    tokens, prefix = tokens_per_block(model), vit_shape(model).num_prefix
    unmet = []
    for block, k in enumerate(cfg.schedule):
        plenty = tokens[block] + 2 * k + prefix + 2
        if tokens[block] - tokens[block + 1] < plenty - tokens_after(cfg.method, plenty, k, prefix):
            unmet.append((block + 1, k, tokens[block] - tokens[block + 1]))
    return unmet
