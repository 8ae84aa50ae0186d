"""The model of a run: a timm model created by name (hub weights when asked for, checked before timm tries), or a
transformers / OpenCLIP model (``hf:``, ``open_clip:``, built by ``zoo``); its starting weights loaded, and
compressed with the chosen method. ``geometry(model)`` reads image size, patch size and blocks of every family."""
import argparse
import os
import socket
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

import data

import pruning.models  # noqa: F401  (registers the vit_pico_* models in timm's registry)
from pruning.counting import tokens_after
from pruning.flops import model_shape as vit_shape, model_token_counts
from pruning.patch import apply_patch, get_config

from . import zoo
from .checkpoint import load_weights
from .errors import CLIError, one_line
from .zoo import Geometry, analytic_flops, arch_label, geometry  # noqa: F401  (the accessors of every family)


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
                 img_size: Optional[int] = None, patch_size: Optional[int] = None, weights: Optional[str] = None,
                 data_norm: Optional[Tuple[Sequence[float], Sequence[float]]] = None) -> nn.Module:
    """The model ``arch`` (``--arch``) for this dataset: a timm VisionTransformer, optionally with hub weights,
    or a transformers / OpenCLIP model wrapped by ``zoo.build`` (``weights``: OpenCLIP's own weights file;
    ``data_norm``: the dataset's (mean, std), turned into the model's own normalisation)."""
    if zoo.parse_arch(arch).family != "timm":
        return zoo.build(arch, num_classes, in_chans, pretrained=pretrained, weights=weights, data_norm=data_norm,
                         img_size=img_size, patch_size=patch_size)
    if not timm.is_model(arch.split(".")[0]):
        raise CLIError(f"--arch: {arch!r} is not a timm model; list ViTs with "
                       f"python -c \"import timm; print(timm.list_models('vit_*'))\"; other families: "
                       f"hf:FOLDER_OR_HUB_ID, open_clip:NAME, open_clip:local-dir:FOLDER")
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


def build_model(args: argparse.Namespace, num_classes: int, in_chans: int, resumed: bool) -> nn.Module:
    """The model of ``--arch`` with its starting weights (hub, a transformers folder, ``--checkpoint``; none when
    resuming: the checkpoint's come later)."""
    family = zoo.parse_arch(args.arch).family
    if family != "timm" and args.visualize:
        raise CLIError(f"--visualize: the token grid is drawn for timm models only (it reads model.patch_embed); "
                       f"drop --visualize for --arch {args.arch}")
    # OpenCLIP's own weights file (not a main.py checkpoint) is read while the model is built
    weights = args.checkpoint if family == "open_clip" and args.checkpoint and not resumed and \
        not zoo.is_main_checkpoint(args.checkpoint) else None
    spec = data.DATASETS.get(args.data_name)
    model = create_model(args.arch, num_classes, in_chans, pretrained=args.pretrained and not resumed,
                         img_size=args.img_size, patch_size=args.patch_size, weights=weights,
                         data_norm=(spec.mean, spec.std) if spec else None)
    if family != "timm" and not resumed:
        _announce_head(model, args, num_classes, trained=bool(args.checkpoint and not weights))
    if args.checkpoint and not resumed and not weights:
        left_out = load_weights(model, args.checkpoint, new_head_ok=not args.eval_only)
        if left_out:
            print(f"--checkpoint: loaded all but {', '.join(left_out)} (another number of classes); the head "
                  f"starts from scratch for {num_classes} classes")
    depth = geometry(model).depth
    if isinstance(args.reduce_token, list) and len(args.reduce_token) != depth:
        raise CLIError(f"--reduce_token: {len(args.reduce_token)} values given, but --arch {args.arch} has "
                       f"{depth} blocks; give one value per block, or a single int")
    return model


def _announce_head(model: nn.Module, args: argparse.Namespace, num_classes: int, trained: bool) -> None:
    """One line on the classifier of a transformers / OpenCLIP model that starts untrained (a warning when it
    is evaluated): a linear head added on the pooled feature, or a classifier built anew."""
    if not getattr(model, "new_head", False) or trained:
        return
    where = f"the linear head on {model.output or 'the pooled, projected feature'}" if model.head is not None \
        else "its classifier"
    if args.eval_only:
        print(f"main.py: warning: --eval_only: {where} is untrained for the {num_classes} classes of "
              f"{args.data_name}, so the accuracy is chance; fine-tune first (drop --eval_only) and evaluate with "
              f"--checkpoint best.pt", file=sys.stderr, flush=True)
    else:
        print(f"{args.arch}: {where} starts untrained for {num_classes} classes")


def compress(model: nn.Module, args: argparse.Namespace, trace_source: bool = False) -> nn.Module:
    """Patch ``model`` (its backbone, ``geometry(model).module``) in place with ``--model`` (the method),
    ``--reduce_token``, ``--reduce_at`` and ``--prop_attn`` (``auto`` not yet resolved by the run: on, the
    library's default); returns ``model``."""
    try:
        apply_patch(geometry(model).module, args.method, args.reduce_token, reduce_at=args.reduce_at,
                    prop_attn=getattr(args, "prop_attn", "auto") != "off", trace_source=trace_source)
    except ValueError as err:
        raise CLIError(f"--model {args.method} / --reduce_token / --reduce_at: {err}") from None
    return model


def tokens_per_block(model: nn.Module) -> List[int]:
    """Tokens entering the first block, then leaving each block, as the compressed model runs them
    (the library's own count, ``pruning.flops.model_token_counts``): ``[17, 15, 13, 11, 9]``."""
    model = geometry(model).module
    entering = [attn for attn, _ in model_token_counts(model)]
    cfg = get_config(model)
    last = entering[-1] if cfg is None else tokens_after(cfg.method, entering[-1], cfg.schedule[-1],
                                                         vit_shape(model).num_prefix)
    return entering + [last]


def unmet_reductions(model: nn.Module) -> List[Tuple[int, int, int]]:
    """(block, tokens asked, tokens removed) of every block that removes fewer tokens than the method removes
    when tokens are plentiful, because too few are left (the prefix tokens and at least one patch stay)."""
    cfg = get_config(model)
    if cfg is None:
        return []
    tokens, prefix = tokens_per_block(model), vit_shape(geometry(model).module).num_prefix
    unmet = []
    for block, k in enumerate(cfg.schedule):
        plenty = tokens[block] + 2 * k + prefix + 2
        if tokens[block] - tokens[block + 1] < plenty - tokens_after(cfg.method, plenty, k, prefix):
            unmet.append((block + 1, k, tokens[block] - tokens[block + 1]))
    return unmet


SMALL_MODEL_PARAMS = 5_000_000  # --threads 0: one thread below this size
DEFAULT_THREADS = torch.get_num_threads()  # PyTorch's own default: one per physical core


def reference_model(args: argparse.Namespace, arch: str) -> nn.Module:
    """An untrained ``arch`` of the shape the options describe (classes, channels, sizes)."""
    facts = data.DATASETS[args.data_name]
    return create_model(arch, data.class_count(args.data_name, args.data_root), facts.in_chans,
                        img_size=args.img_size, patch_size=args.patch_size)


def auto_threads(args: argparse.Namespace, arch: str) -> int:
    """1 for models under 5 M parameters (their matrices are too small to split, and spare cores stay
    free), else PyTorch's default; counted on a weightless (meta) copy of the model."""
    try:
        with torch.device("meta"):
            size = sum(p.numel() for p in reference_model(args, arch).parameters())
    except Exception:  # options run() refuses with their own message: the thread count does not matter
        return DEFAULT_THREADS
    return 1 if size < SMALL_MODEL_PARAMS else DEFAULT_THREADS
