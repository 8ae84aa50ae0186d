"""The model of a run: a timm model created by name (hub weights when asked for, checked before timm tries), or a
transformers / OpenCLIP model (``hf:``, ``open_clip:``, built by ``zoo``); its starting weights loaded, and
compressed with the chosen method. ``zoo.backbone_of(model)`` reads the module to patch, its image and patch size
and its channels, of every family."""
import argparse
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

import data

import pruning.models  # noqa: F401  (registers the vit_pico_* models in timm's registry)
from pruning import get_method, seed_draws
from pruning.core.counting import tokens_after
from pruning.flops import model_shape, model_token_counts
from pruning.patch import apply_patch, get_config

from . import hub, zoo
from .checkpoint import load_weights, torch_load
from .errors import CLIError, one_line
from .options import dests
from .zoo import arch_label, backbone_of  # noqa: F401  (arch_label: main.py's folder names)


def create_model(arch: str, num_classes: Optional[int], in_chans: Optional[int], *, pretrained: bool = False,
                 img_size: Optional[int] = None, patch_size: Optional[int] = None, weights: Optional[str] = None,
                 data_norm: Optional[Tuple[Sequence[float], Sequence[float]]] = None) -> nn.Module:
    """The model ``arch`` (``--arch``) for this dataset: a timm VisionTransformer, optionally with hub weights,
    or a transformers / OpenCLIP model wrapped by ``zoo.build`` (``weights``: OpenCLIP's own weights file;
    ``data_norm``: the dataset's (mean, std), turned into the model's own normalisation). ``num_classes``,
    ``in_chans``, ``img_size``, ``patch_size`` None: the arch's own."""
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
    if pretrained and (why := hub.hub_unreachable()):
        raise CLIError(f"--pretrained: cannot fetch the timm weights of {arch}: {why}; fetch them once online "
                       f"(they stay in the Hugging Face cache; offline, set HF_HUB_OFFLINE=1 to use it), or pass a "
                       f"local weights file with --checkpoint FILE and drop --pretrained")
    sizes = dict(num_classes=num_classes, in_chans=in_chans, img_size=img_size, patch_size=patch_size)
    kwargs: Dict[str, Any] = {name: value for name, value in sizes.items() if value is not None}
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
    if not isinstance(model, (VisionTransformer, Eva)):
        raise CLIError(f"--arch: {arch} is a {type(model).__name__}; token compression needs a timm "
                       f"VisionTransformer (vit_*, deit_*) or Eva (eva02_*, *_dinov3, *_rope_*)")
    img, patch = model.patch_embed.img_size, model.patch_embed.patch_size
    if img[0] % patch[0] or img[1] % patch[1]:
        raise CLIError(f"--img_size {img[0]} is not a multiple of --patch_size {patch[0]}")
    return model


def build_model(args: Any, num_classes: int, in_chans: int, resumed: bool) -> nn.Module:
    """The model of ``--arch`` with its starting weights (hub, a transformers folder, ``--checkpoint``; none when
    resuming: the checkpoint's come later); ``args``: the run's settings (``engine.config.RunConfig``)."""
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
    return model


def _announce_head(model: nn.Module, args: Any, num_classes: int, trained: bool) -> None:
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


def compress(model: nn.Module, settings: Any, trace_source: bool = False) -> nn.Module:
    """Patch ``model`` (its backbone, ``backbone_of(model).module``) in place with the settings' ``method``,
    ``schedule``, ``reduce_at`` and ``prop_attn`` (on unless ``off``, the library's default); its random draws
    (the ``random`` control) seeded with the settings' ``seed``; returns ``model``."""
    try:
        apply_patch(backbone_of(model).module, settings.method, settings.schedule, reduce_at=settings.reduce_at,
                    prop_attn=settings.prop_attn != "off", trace_source=trace_source)
    except ValueError as err:
        raise CLIError(f"--model {settings.method} / --reduce_token / --reduce_at: {err}") from None
    if get_method(settings.method).stochastic:
        seed_draws(backbone_of(model).module, getattr(settings, "seed", 0))
    return model


def check_schedule_length(schedule: Any, depth: int, arch: str) -> None:
    """A per-block schedule (``--reduce_token 0,2,2,2``) must give one value per block of the model."""
    if isinstance(schedule, (list, tuple)) and len(schedule) != depth:
        raise CLIError(f"--reduce_token: {len(schedule)} values given, but --arch {arch} has {depth} blocks; give "
                       f"one value per block, or a single int")


def load_trained(path: str, option: str = "--checkpoint") -> Tuple[nn.Module, Dict[str, Any]]:
    """The model a main.py checkpoint holds, rebuilt and compressed as its settings say (either names: see
    ``engine.options.dests``), in eval mode; returns (model, its settings by today's names). Tools read trained
    runs through it."""
    checkpoint = torch_load(path, option)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("settings"), dict) \
            or not isinstance(checkpoint.get("model"), dict):
        raise CLIError(f"{option}: {path} is not a checkpoint written by main.py (no settings or model)")
    settings, state = dests(checkpoint["settings"]), checkpoint["model"]
    missing = [key for key in ("arch", "method", "schedule", "data_name") if key not in settings]
    if missing:
        raise CLIError(f"{option}: {path} lacks {', '.join(missing)}; not a checkpoint written by main.py")
    spec = data.DATASETS.get(settings["data_name"])
    head, embed = state.get("head.weight"), state.get("patch_embed.proj.weight")  # a timm model's; else the data's
    num_classes = head.shape[0] if head is not None else getattr(spec, "num_classes", None)
    in_chans = embed.shape[1] if embed is not None else getattr(spec, "in_chans", None)
    try:
        model = create_model(settings["arch"], num_classes, in_chans, img_size=settings.get("img_size"),
                             patch_size=settings.get("patch_size"), data_norm=(spec.mean, spec.std) if spec else None)
        model.load_state_dict(state)
    except (CLIError, RuntimeError, ValueError, TypeError) as err:  # an unknown arch, weights that do not fit
        raise CLIError(f"{option}: {path}: {one_line(err)}") from None
    settings.setdefault("reduce_at", None)
    compress(model, argparse.Namespace(**{"prop_attn": "on", **settings}))
    return model.eval(), settings


def tokens_per_block(model: nn.Module) -> List[int]:
    """Tokens entering the first block, then leaving each block, as the compressed model runs them
    (the library's own count, ``pruning.flops.model_token_counts``): ``[17, 15, 13, 11, 9]``."""
    model = backbone_of(model).module
    entering = [attn for attn, _ in model_token_counts(model)]
    cfg = get_config(model)
    last = entering[-1] if cfg is None else tokens_after(cfg.method, entering[-1], cfg.schedule[-1],
                                                         model_shape(model).num_prefix)
    return entering + [last]


def removed_per_block(tokens: Sequence[int]) -> List[int]:
    """The tokens each block really removed, from :func:`tokens_per_block`'s counts: what the schedule asked, or
    fewer where too few tokens were left (``[10, 10, 10, 10, 8, 0]`` for 10 per block on 50 tokens)."""
    return [before - after for before, after in zip(tokens, tokens[1:])]


def unmet_reductions(model: nn.Module) -> List[Tuple[int, int, int]]:
    """(block, tokens asked, tokens removed) of every block that removes fewer tokens than the method removes
    when tokens are plentiful, because too few are left (the prefix tokens and at least one patch stay)."""
    cfg = get_config(model)
    if cfg is None:
        return []
    tokens, prefix = tokens_per_block(model), backbone_of(model).shape.num_prefix
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
