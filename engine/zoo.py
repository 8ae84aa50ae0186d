"""``--arch`` beyond timm: Hugging Face transformers and OpenCLIP models for the command line.

    --arch vit_small_patch16_224            a timm name (engine/model.py builds it, as before)
    --arch hf:FOLDER_OR_HUB_ID              a transformers model (save_pretrained's folder, or a hub id)
    --arch FOLDER                           the same, for an existing folder holding config.json
    --arch open_clip:NAME                   an OpenCLIP model config (open_clip.list_models()); its
                                            weights come from --checkpoint FILE (OpenCLIP's own file)
    --arch open_clip:local-dir:FOLDER       OpenCLIP's folder: open_clip_config.json (+ weights)
    --arch FOLDER                           the same, for an existing folder holding open_clip_config.json

Weights follow timm's rule: ``--arch`` names the architecture, ``--pretrained`` loads its weights (a
transformers folder's or hub id's, an OpenCLIP ``local-dir:`` folder's); ``--checkpoint FILE`` loads a main.py
checkpoint, or, for ``open_clip:``, OpenCLIP's own weights file. Every model is wrapped in :class:`Classifier`,
a module mapping the dataset's images to logits: gray images are repeated to the model's 3 channels, the
dataset's normalisation is turned into the model's own (its preprocessor's mean/std), and a model without a
classifier gets a linear head on its pooled feature. This is the only module of the engine that knows these
families; the library (``pruning/``) patches the wrapped backbone, ``backbone_of(model).module``.
"""
import contextlib
import copy
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from pruning.core.state import CONFIG_ATTR
from pruning.flops import ModelShape, model_shape

from . import hub
from .errors import CLIError, one_line

HF, OPEN_CLIP = "hf:", "open_clip:"
LOCAL_DIR = "local-dir:"
HF_CONFIG, OPEN_CLIP_CONFIG = "config.json", "open_clip_config.json"
SYNTAX = ("a timm name, hf:FOLDER_OR_HUB_ID (a transformers model), open_clip:NAME or "
          "open_clip:local-dir:FOLDER (an OpenCLIP model)")


# --- what --arch names ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """What ``--arch`` names: ``family`` timm, hf or open_clip, and the name within it."""
    family: str
    name: str


def parse_arch(arch: str) -> Source:
    """The family and name of ``--arch``: by prefix, else an existing folder by the config file it holds,
    else a timm name."""
    for prefix, family in ((HF, "hf"), (OPEN_CLIP, "open_clip")):
        if arch.startswith(prefix):
            name = arch[len(prefix):]
            if not name or name == LOCAL_DIR:
                raise CLIError(f"--arch {arch}: name the model after {arch}, e.g. hf:path/to/folder or "
                               f"open_clip:ViT-B-32")
            return Source(family, name)
    if os.path.isdir(arch):
        if os.path.isfile(os.path.join(arch, OPEN_CLIP_CONFIG)):
            return Source("open_clip", LOCAL_DIR + arch)
        return Source("hf", arch)
    return Source("timm", arch)


def arch_label(arch: str) -> str:
    """A short name of ``--arch`` for folder names: a folder's last part, a name without its prefix."""
    source = parse_arch(arch) if arch else Source("timm", arch)
    name = source.name.removeprefix(LOCAL_DIR)
    return os.path.basename(os.path.normpath(name)) if os.path.isdir(name) or os.sep in name else name


# --- the wrapped model ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Backbone:
    """What the engine knows of a model of any family beyond the library's ``ModelShape``: the module the library
    patches, the images it takes, and the head the engine added on its output. Its blocks, tokens and widths are
    the library's: ``shape``; its FLOPs ``pruning.flops.analytic_flops(backbone.module, head=backbone.head)``."""
    module: nn.Module  # what pruning.patch.apply_patch patches (the model itself for timm)
    img_size: int  # input height = width in pixels
    patch_size: int
    in_chans: int  # channels the model takes
    head: Optional[nn.Linear] = None  # the linear head a Classifier adds on the module's output; None: none added

    @property
    def shape(self) -> ModelShape:
        """The library's sizes of ``module`` (``pruning.flops.model_shape``): blocks, tokens, widths."""
        return model_shape(self.module)


assert CONFIG_ATTR == "_compression"  # Classifier._compression below


class Classifier(nn.Module):
    """Images (normalised with the dataset's mean/std, the dataset's channels) -> logits, for a transformers
    or OpenCLIP ``backbone`` (the module that is patched).

    ``output``: the backbone output read (``logits`` of a transformers classifier; ``pooler_output`` /
    ``image_embeds`` of a bare transformers model; ``""``: OpenCLIP's pooled, projected feature); ``head``: the
    linear head added on it (None when the backbone classifies itself).
    """

    def __init__(self, backbone: nn.Module, *, family: str, arch: str, output: str, head: Optional[nn.Linear],
                 img_size: int, patch_size: int, channels: int,
                 scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, head_keys: Sequence[str] = (),
                 new_head: bool = True, naflex: bool = False):
        super().__init__()
        self.naflex = naflex  # SigLIP 2: the images go in as patchified pixel_values (pruning.patch.hf.naflex_inputs)
        self.new_head = new_head  # the classifier starts untrained (added here, built from the config, resized)
        self.backbone, self.head = backbone, head
        self.family, self.arch, self.output = family, arch, output
        self.img_size, self.patch_size, self.channels = img_size, patch_size, channels
        self.head_keys = tuple(head_keys) if head is None else ("head.weight", "head.bias")
        self.renormalise = scale is not None
        self.register_buffer("scale", scale if scale is not None else torch.ones(channels, 1, 1), persistent=False)
        self.register_buffer("shift", shift if shift is not None else torch.zeros(channels, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        x = images.expand(-1, self.channels, -1, -1) if images.shape[1] == 1 != self.channels else images
        if self.renormalise:
            x = x * self.scale + self.shift
        if self.naflex:
            from pruning.patch.hf import naflex_inputs

            feature = getattr(self.backbone(**naflex_inputs(x, self.patch_size)), self.output)
        elif self.family == "hf":
            feature = getattr(self.backbone(pixel_values=x), self.output)
        else:
            feature = self.backbone(x)
        return feature if self.head is None else self.head(feature)

    def with_backbone(self, backbone: nn.Module) -> "Classifier":
        """A copy sharing everything but the backbone (a patched copy of it, say): the same head and inputs."""
        twin = copy.copy(self)
        twin._modules = dict(self._modules, backbone=backbone)
        twin._parameters, twin._buffers = dict(self._parameters), dict(self._buffers)
        return twin

    @property
    def _compression(self):
        """``pruning.patch.get_config(classifier)``: the compression its backbone was patched with."""
        return getattr(self.backbone, CONFIG_ATTR, None)

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, reads={self.output or 'pooled'!r}"


def backbone_of(model: nn.Module) -> Backbone:
    """The :class:`Backbone` of a timm model (the model itself) or of a :class:`Classifier`."""
    if isinstance(model, Classifier):
        return Backbone(model.backbone, model.img_size, model.patch_size, model.channels, model.head)
    embed = model.patch_embed
    return Backbone(model, embed.img_size[0], embed.patch_size[0], embed.proj.in_channels)


def _renormalisation(channels: int, data_norm: Optional[Tuple[Sequence[float], Sequence[float]]],
                     model_norm: Optional[Tuple[Sequence[float], Sequence[float]]]) -> Dict[str, Optional[Tensor]]:
    """scale and shift turning images normalised with the dataset's mean/std into the model's (none when
    either is unknown): (x·s_d + m_d − m_m) / s_m."""
    if data_norm is None or model_norm is None:
        return dict(scale=None, shift=None)

    def column(values: Sequence[float]) -> Tensor:
        t = torch.tensor([float(v) for v in values], dtype=torch.float32)
        return t.expand(channels).clone().reshape(channels, 1, 1) if t.numel() in (1, channels) else None

    (m_d, s_d), (m_m, s_m) = [(column(m), column(s)) for m, s in (data_norm, model_norm)]
    if any(t is None for t in (m_d, s_d, m_m, s_m)):
        return dict(scale=None, shift=None)
    return dict(scale=s_d / s_m, shift=(m_d - m_m) / s_m)


def _square(value: Any, what: str, arch: str) -> int:
    sizes = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * 2
    if sizes[0] != sizes[1]:
        raise CLIError(f"--arch {arch}: its {what} is {sizes[0]}x{sizes[1]}; the command line runs square "
                       f"images and patches only")
    return sizes[0]


def _check_sizes(arch: str, img_size: int, patch_size: int, want_img: Optional[int], want_patch: Optional[int],
                 channels: int, in_chans: int) -> None:
    if want_img is not None and want_img != img_size:
        raise CLIError(f"--img_size {want_img}: --arch {arch} runs at its own size, {img_size} px (images are "
                       f"resized to it); drop --img_size")
    if want_patch is not None and want_patch != patch_size:
        raise CLIError(f"--patch_size {want_patch}: --arch {arch} has patch {patch_size}; drop --patch_size")
    if img_size % patch_size:
        raise CLIError(f"--arch {arch}: its image size {img_size} is not a multiple of its patch size {patch_size}")
    if in_chans is not None and in_chans not in (1, channels):
        raise CLIError(f"--arch {arch} takes {channels}-channel images, the dataset has {in_chans} channels; "
                       f"choose a {channels}-channel dataset")


def _head(features: int, num_classes: Optional[int]) -> Optional[nn.Linear]:
    """The linear head added on the pooled feature; none for ``num_classes`` None (the features themselves)."""
    return None if num_classes is None else nn.Linear(features, num_classes)


# --- transformers ---------------------------------------------------------------------------------------

HF_POOLED = {"CLIPVisionModelWithProjection": "image_embeds"}  # else pooler_output
HF_VISION_TOWERS = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel",  # a two-tower model's image side
                    "siglip2": "Siglip2VisionModel"}


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' own warnings (newly initialised heads, ...) are replaced by main.py's one-line notes."""
    from transformers.utils import logging as hf_logging

    before, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _quiet_logging():
    """Python logging's warnings off (OpenCLIP logs to the root logger)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep + os.sep in name


def _hf_config(arch: str, name: str):
    """The transformers config of a folder or hub id; one-line errors for a missing folder, a folder without
    config.json, an unreachable hub."""
    from transformers import AutoConfig

    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, HF_CONFIG)):
            raise CLIError(f"--arch {arch}: {name} is not a transformers model folder (no {HF_CONFIG}); write one "
                           f"with model.save_pretrained(FOLDER), or give a timm name")
    elif _looks_like_path(name) or os.path.exists(name):
        raise CLIError(f"--arch {arch}: no such folder {name}")
    elif os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("", "0", "false"):
        why = hub.hub_unreachable()
        if why:
            raise CLIError(f"--arch {arch}: {name} is not a folder here, and as a hub id it cannot be fetched: {why}; "
                           f"save the model with save_pretrained and give its folder")
    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(name)
    except Exception as err:
        raise CLIError(f"--arch {arch}: cannot read the transformers config of {name} "
                       f"({one_line(err, named=True, limit=200)})") from None


def _hf_class(arch: str, config) -> Tuple[str, Any]:
    """(class name, config) of the supported transformers class to build: the config's architecture; a
    CLIPModel's vision tower (CLIPVisionModel)."""
    from pruning.patch.hf import SUPPORTED

    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in SUPPORTED:
            return name, config
    tower = HF_VISION_TOWERS.get(getattr(config, "model_type", ""))
    if tower is not None:
        return tower, config.vision_config
    what = ", ".join(names) or f"model_type {getattr(config, 'model_type', '?')}"
    raise CLIError(f"--arch {arch}: a {what} model; token compression supports {', '.join(SUPPORTED)} "
                   f"(and the vision tower of a CLIPModel, SiglipModel or Siglip2Model)")


def _hf_mean_std(name: str) -> Optional[Tuple[List[float], List[float]]]:
    """image_mean/image_std of the model's preprocessor_config.json, where it has one."""
    path = os.path.join(name, "preprocessor_config.json")
    if not os.path.isdir(name):
        try:
            from transformers.utils import cached_file

            path = cached_file(name, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        except Exception:
            return None
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            processor = json.load(f)
        return list(processor["image_mean"]), list(processor["image_std"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _build_hf(arch: str, name: str, num_classes: int, in_chans: int, pretrained: bool,
              data_norm, img_size: Optional[int], patch_size: Optional[int]) -> Classifier:
    import transformers

    config = _hf_config(arch, name)
    class_name, config = _hf_class(arch, config)
    cls = getattr(transformers, class_name)
    classifies = "ForImageClassification" in class_name
    resize = classifies and num_classes is not None  # None: the classifier as saved (tools/benchmark.py)
    kwargs: Dict[str, Any] = dict(num_labels=num_classes, ignore_mismatched_sizes=True) if resize else {}
    trained_head = classifies and pretrained and int(getattr(config, "num_labels", 0)) == num_classes
    try:
        with _quiet_transformers():
            if pretrained:
                model = cls.from_pretrained(name, **kwargs)
            else:
                if resize:
                    config.num_labels = num_classes
                model = cls(config)
    except Exception as err:
        raise CLIError(f"--arch {arch}: cannot build {class_name} from {name} "
                       f"({one_line(err, named=True, limit=200)})") from None
    model_config = model.config
    from pruning.patch.hf import SIGLIP, image_size

    if class_name in SIGLIP and not getattr(model_config, "vision_use_head", True):
        raise CLIError(f"--arch {arch}: this {class_name} has no attention-pool head (vision_use_head=False), "
                       f"so no pooled feature to classify; use one with its head")
    img = _square(image_size(model_config), "image size", arch)
    patch = _square(model_config.patch_size, "patch size", arch)
    channels = int(getattr(model_config, "num_channels", 3))
    _check_sizes(arch, img, patch, img_size, patch_size, channels, in_chans)
    if classifies:
        heads = ("cls_classifier", "distillation_classifier") if "WithTeacher" in class_name else ("classifier",)
        return Classifier(model, family="hf", arch=arch, output="logits", head=None, img_size=img, patch_size=patch,
                          channels=channels, head_keys=[f"backbone.{h}.{p}" for h in heads for p in ("weight", "bias")],
                          new_head=not trained_head,
                          **_renormalisation(channels, data_norm, _hf_mean_std(name)))
    from pruning.patch.hf import takes_naflex

    output = HF_POOLED.get(class_name, "pooler_output")
    features = int(model_config.projection_dim) if output == "image_embeds" else int(model_config.hidden_size)
    return Classifier(model, family="hf", arch=arch, output=output, head=_head(features, num_classes),
                      img_size=img, patch_size=patch, channels=channels, naflex=takes_naflex(model),
                      **_renormalisation(channels, data_norm, _hf_mean_std(name)))


# --- OpenCLIP -------------------------------------------------------------------------------------------

def _open_clip_config(arch: str, name: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(model_cfg, preprocess_cfg) of a built-in name or a ``local-dir:`` folder; one-line errors."""
    import open_clip

    if name.startswith(LOCAL_DIR):
        folder = name[len(LOCAL_DIR):]
        path = os.path.join(folder, OPEN_CLIP_CONFIG)
        if not os.path.isdir(folder):
            raise CLIError(f"--arch {arch}: no such folder {folder}")
        if not os.path.isfile(path):
            raise CLIError(f"--arch {arch}: {folder} is not an OpenCLIP model folder (no {OPEN_CLIP_CONFIG})")
        try:
            with open(path) as f:
                saved = json.load(f)
            return dict(saved["model_cfg"]), dict(saved.get("preprocess_cfg") or {})
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CLIError(f"--arch {arch}: {path} is not an OpenCLIP config with model_cfg "
                           f"({one_line(err, named=True, limit=200)})") from None
    if name.startswith("hf-hub:"):
        raise CLIError(f"--arch {arch}: OpenCLIP hub models are not fetched by main.py; download the folder once "
                       f"and give open_clip:local-dir:FOLDER")
    config = open_clip.get_model_config(name.replace("/", "-"))
    if config is None:
        raise CLIError(f"--arch {arch}: unknown OpenCLIP model {name!r}; list them with python -c \"import "
                       f"open_clip; print(open_clip.list_models())\", or give open_clip:local-dir:FOLDER")
    return dict(config), {}


def state_keys(path: str) -> List[str]:
    """The tensor names of a weights file (a main.py checkpoint's model, a state_dict, safetensors)."""
    from .checkpoint import file_kind, torch_load

    if file_kind(path) == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as f:
                return list(f.keys())
        except Exception as err:
            raise CLIError(f"--checkpoint: {path} cannot be read ({one_line(err, named=True, limit=200)})") from None
    state = torch_load(path, "--checkpoint")
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return [str(k) for k in state] if isinstance(state, dict) else []


def is_main_checkpoint(path: str) -> bool:
    """Whether ``path`` holds a :class:`Classifier`'s weights (written by main.py), not a family's own."""
    keys = [k.removeprefix("module.").removeprefix("_orig_mod.") for k in state_keys(path)]
    return bool(keys) and all(k.startswith(("backbone.", "head.")) for k in keys)


def _build_open_clip(arch: str, name: str, num_classes: int, in_chans: int, pretrained: bool,
                     weights: Optional[str], data_norm, img_size: Optional[int],
                     patch_size: Optional[int]) -> Classifier:
    import open_clip
    from open_clip.transformer import VisionTransformer

    model_cfg, preprocess = _open_clip_config(arch, name)
    local = name.startswith(LOCAL_DIR)
    if pretrained and not local:
        raise CLIError(f"--pretrained: main.py reads OpenCLIP weights from a local file: --arch {arch} "
                       f"--checkpoint FILE (e.g. open_clip_pytorch_model.bin), or open_clip:local-dir:FOLDER "
                       f"--pretrained; drop --pretrained")
    try:
        if pretrained or weights:
            with _quiet_logging():  # open_clip logs "no pretrained weights loaded" before --checkpoint's are
                clip = open_clip.create_model(name, load_weights=pretrained)
            if weights:
                open_clip.load_checkpoint(clip, weights)
            visual = clip.visual
        else:  # the image tower alone, as create_model builds it
            visual = open_clip.model._build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"],
                                                         quick_gelu=model_cfg.get("quick_gelu", False))
    except CLIError:
        raise
    except Exception as err:
        what = f"with the weights of --checkpoint {weights}" if weights else "from its config"
        raise CLIError(f"--arch {arch}: cannot build the OpenCLIP model {what} "
                       f"({one_line(err, named=True, limit=200)})") from None
    if not isinstance(visual, VisionTransformer):
        raise CLIError(f"--arch {arch}: its image tower is a {type(visual).__name__}; token compression supports "
                       f"OpenCLIP's VisionTransformer towers")
    img = _square(visual.image_size, "image size", arch)
    patch = _square(visual.patch_size, "patch size", arch)
    channels = visual.conv1.in_channels
    _check_sizes(arch, img, patch, img_size, patch_size, channels, in_chans)
    features = visual.proj.shape[1] if visual.proj is not None else visual.transformer.width
    from open_clip.transform import PreprocessCfg

    defaults = PreprocessCfg()
    model_norm = (preprocess.get("mean", defaults.mean), preprocess.get("std", defaults.std))
    return Classifier(visual, family="open_clip", arch=arch, output="", head=_head(features, num_classes),
                      img_size=img, patch_size=patch, channels=channels,
                      **_renormalisation(channels, data_norm, model_norm))


# --- the entry ------------------------------------------------------------------------------------------

def build(arch: str, num_classes: Optional[int], in_chans: int, *, pretrained: bool = False,
          weights: Optional[str] = None,
          data_norm: Optional[Tuple[Sequence[float], Sequence[float]]] = None, img_size: Optional[int] = None,
          patch_size: Optional[int] = None) -> Classifier:
    """The transformers or OpenCLIP model ``arch`` (``hf:``/``open_clip:``/a folder) as a :class:`Classifier`
    for ``num_classes`` classes and ``in_chans``-channel images normalised with ``data_norm`` (mean, std).
    ``num_classes`` None: a transformers classifier keeps its own head, a model without one gets none (it returns
    its pooled feature), as ``tools/benchmark.py`` times the models.

    ``pretrained``: the folder's (hub id's) weights; ``weights``: OpenCLIP's own weights file (open_clip only).
    """
    source = parse_arch(arch)
    if source.family == "hf":
        return _build_hf(arch, source.name, num_classes, in_chans, pretrained, data_norm, img_size, patch_size)
    if source.family == "open_clip":
        return _build_open_clip(arch, source.name, num_classes, in_chans, pretrained, weights, data_norm, img_size,
                                patch_size)
    raise ValueError(f"{arch} is a timm name")
