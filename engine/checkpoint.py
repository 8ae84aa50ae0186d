"""Files of a run: safe loading of weights and checkpoints, atomic writing, random generator states,
and the checks of ``--output_dir`` done before training starts.

Nothing here unpickles arbitrary objects: ``torch.load(weights_only=True)`` accepts tensors and plain
containers only, so a file from the internet cannot run code when it is loaded.
"""
import contextlib
import errno
import json
import os
import pickle
import random
import shutil
from typing import Any, Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .errors import CLIError, one_line

# What --resume needs from a checkpoint (main.py's training writes all of them).
RESUME_KEYS = ("model", "optimizer", "scheduler", "epoch", "best_accuracy", "history", "rng", "settings")


def file_kind(path: str) -> str:
    """What a weights file holds, from its first bytes: ``torch`` (torch.save's zip archive), ``pickle``
    (torch.save's legacy format), ``safetensors``, ``empty`` or ``other``."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        return "torch"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) > 8 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100_000_000:
        return "safetensors"
    return "other"


def _not_weights(path: str, option: str, kind: str) -> CLIError:
    with open(path, "rb") as f:
        start = f.read(24).decode("utf-8", "replace")
    what = "it is empty" if kind == "empty" else f"it starts with {start!r}"
    return CLIError(f"{option}: {path} is not a PyTorch checkpoint or safetensors file ({what}); give the .pt/.pth "
                    f"written by torch.save (e.g. output/latest/best.pt) or a .safetensors file")


def torch_load(path: str, option: str) -> Any:
    """``torch.load`` of tensors and plain containers only (nothing in the file can run code)."""
    if not os.path.isfile(path):
        raise CLIError(f"{option}: {path} not found")
    kind = file_kind(path)
    if kind in ("empty", "other", "safetensors"):
        if kind == "safetensors" and option == "--resume":
            raise CLIError(f"--resume: {path} is a safetensors file (weights only), not a checkpoint written by "
                           f"main.py; to start from its weights use --checkpoint {path}")
        raise _not_weights(path, option, kind)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):  # not the safe loader's refusal: a damaged file
            raise CLIError(f"{option}: {path} cannot be read, it is damaged or not a PyTorch file "
                           f"({one_line(err, named=True, limit=200)})") from None
        raise CLIError(f"{option}: {path} holds more than tensors and plain data, so it is not loaded "
                       f"(safe loading: {one_line(err, named=True, limit=200)}); save its state_dict() "
                       f"instead") from None
    except Exception as err:
        raise CLIError(f"{option}: {path} cannot be read, it is damaged or not a PyTorch file "
                       f"({one_line(err, named=True, limit=200)})") from None


def saved_run_settings(path: str) -> Optional[Dict[str, Any]]:
    """A main.py checkpoint's ``settings`` with ``epoch`` and ``step`` beside them, read with its tensors left on
    disk (mmap); None for a missing, unreadable or other file (whoever loads its weights says what is wrong)."""
    if not os.path.isfile(path) or file_kind(path) != "torch":
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("settings"), dict):
        return None
    return {"settings": checkpoint["settings"], "epoch": checkpoint.get("epoch"), "step": checkpoint.get("step")}


def unfinished_training(path: str) -> Optional[str]:
    """Where a main.py training checkpoint stopped ("epoch 5/25 and 120 steps") when its run has epochs left
    (it was interrupted, or is still running); None for a finished run or any other file."""
    saved = saved_run_settings(path)
    if saved is None:
        return None
    done, total, step = saved["epoch"], saved["settings"].get("epochs"), saved["step"] or 0
    if not isinstance(done, int) or not isinstance(total, int) or (done >= total and not step):
        return None
    return f"epoch {done}/{total}" + (f" and {step} steps" if step else "")


def read_resume(path: str) -> Dict[str, Any]:
    """A checkpoint that ``--resume`` can continue: a main.py training checkpoint, complete."""
    checkpoint = torch_load(path, "--resume")
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CLIError(f"--resume: {path} is not a checkpoint written by main.py; to start from its weights use "
                       f"--checkpoint {path}")
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        raise CLIError(f"--resume: {path} lacks {', '.join(missing)}, so the run cannot continue exactly; start "
                       f"from its weights with --checkpoint {path} instead")
    return checkpoint


def load_weights(model: VisionTransformer, path: str, new_head_ok: bool = True) -> List[str]:
    """Load a timm .pth/.safetensors file or a main.py checkpoint into ``model``.

    Returns the keys left out: a classifier head of another size (another number of classes), which
    is only allowed when ``new_head_ok`` (the head is then trained from scratch).
    """
    if not os.path.isfile(path):
        raise CLIError(f"--checkpoint: {path} not found")
    kind = file_kind(path)
    if kind == "safetensors" or (path.endswith(".safetensors") and kind not in ("torch", "pickle")):
        from safetensors.torch import load_file
        try:
            state = load_file(path)
        except Exception as err:
            raise CLIError(f"--checkpoint: {path} cannot be read, it is damaged or not a safetensors file "
                           f"({one_line(err, named=True, limit=200)})") from None
    else:
        state = torch_load(path, "--checkpoint")
    for key in ("model", "state_dict", "model_ema"):  # main.py / DeiT / other training scripts
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(f"--checkpoint: {path} holds no state_dict of tensors")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    arch = _arch_of(model)
    if isinstance(model, VisionTransformer):
        try:
            state = checkpoint_filter_fn(state, model)  # timm: resamples position and patch embeddings to this model
        except Exception as err:
            raise CLIError(f"--checkpoint: {path} does not fit --arch {arch} ({one_line(err, named=True, limit=200)}); "
                           f"use the --arch, --img_size and --patch_size it was trained with") from None
    own = model.state_dict()
    heads = tuple(getattr(model, "head_keys", ("head.weight", "head.bias")))  # engine.zoo.Classifier says its own
    left_out = [k for k in heads if k in state and k in own and state[k].shape != own[k].shape]
    weight = next((k for k in heads if k.endswith("weight") and k in state and k in own), None)
    if left_out and (weight is None or state[weight].shape[0] == own[weight].shape[0]):
        # the same number of classes, another width: the checkpoint is of another model, not another dataset
        detail = f" ({weight}: {tuple(state[weight].shape)} here, {tuple(own[weight].shape)} in the model)" \
            if weight else ""
        raise CLIError(f"--checkpoint: {path} does not fit --arch {arch}{detail}; use the --arch, --img_size and "
                       f"--patch_size it was trained with")
    if left_out and not new_head_ok:
        raise CLIError(f"--checkpoint: {path} has a classifier head for {state[weight].shape[0]} classes, "
                       f"the dataset has {own[weight].shape[0]}; evaluating needs the head trained on "
                       f"this dataset: choose the matching --data_name, or fine-tune first (drop --eval_only)")
    for key in left_out:
        del state[key]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise CLIError(f"--checkpoint: {path} does not fit --arch {arch} ({detail}); use the --arch, --img_size "
                       f"and --patch_size it was trained with") from None
    missing = [k for k in missing if k not in left_out]
    if missing or unexpected:
        raise CLIError(f"--checkpoint: {path} does not fit this model (missing {missing[:3]}, unexpected "
                       f"{unexpected[:3]}); use the --arch, --img_size and --patch_size it was trained with")
    return left_out


def _arch_of(model: torch.nn.Module) -> str:
    """The name of ``model``'s arch in messages: timm's, or the --arch of an ``engine.zoo.Classifier``."""
    config = getattr(model, "default_cfg", None)
    return getattr(model, "arch", None) or (config.get("architecture", "") if isinstance(config, dict) else "")


# ----------------------------------------------------------------------------------------------
# writing

def _write_failed(path: str, err: OSError) -> CLIError:
    full = " (the disk is full)" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return CLIError(f"--output_dir: could not write {path}{full} ({err.strerror or err}); the previous "
                    f"{os.path.basename(path)} is kept; free space or choose another --output_dir (continue with "
                    f"--resume {os.path.join(os.path.dirname(path), 'last.pt')} if it exists)")


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """The temporary path beside ``path`` to write; on leaving, renamed over ``path``: a crash, a full disk or a
    Ctrl-C never leaves half a file (the previous one stays until the new one is complete), nor the temporary."""
    tmp = f"{path}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_atomic(obj: Any, path: str) -> None:
    """torch.save through ``replacing``, synced to the disk before the rename; a failure is one line naming
    --output_dir."""
    try:
        with replacing(path) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise _write_failed(path, err) from None


def replace_file(text: str, path: str) -> None:
    """Write ``text`` to ``path`` through ``replacing``. Raises OSError."""
    with replacing(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_text_atomic(text: str, path: str) -> None:
    """``replace_file``; a failure is one line naming --output_dir."""
    try:
        replace_file(text, path)
    except OSError as err:
        raise _write_failed(path, err) from None


def write_json_atomic(obj: Any, path: str) -> None:
    write_text_atomic(json.dumps(obj, indent=2) + "\n", path)


def append_line(text: str, path: str) -> None:
    """Append one line (a log record); a failure is one line naming --output_dir."""
    try:
        with open(path, "a") as f:
            f.write(text + "\n")
    except OSError as err:
        raise _write_failed(path, err) from None


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """About the size of one training checkpoint: the weights and AdamW's two moments, plus some margin."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 3 * weights + (1 << 20)


def _megabytes(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def check_free_space(path: str, one_checkpoint: int, replaced: Iterable[str] = ("last.pt", "best.pt")) -> None:
    """Refuse to train when ``path`` cannot hold ``last.pt``, ``best.pt`` and the temporary copy written
    while one of them is replaced (files there that will be replaced count as free)."""
    reusable = sum(os.path.getsize(os.path.join(path, name)) for name in replaced
                   if os.path.isfile(os.path.join(path, name)))
    need = 3 * one_checkpoint - reusable
    existing = path
    while not os.path.isdir(existing) and os.path.dirname(os.path.abspath(existing)) != os.path.abspath(existing):
        existing = os.path.dirname(os.path.abspath(existing))  # the folder is created when training starts
    free = shutil.disk_usage(existing).free
    if free < need:
        raise CLIError(f"--output_dir: {path} has {_megabytes(free)} free, the checkpoints need about "
                       f"{_megabytes(need)} (last.pt, best.pt and a temporary copy); free space or choose "
                       f"another --output_dir")


# ----------------------------------------------------------------------------------------------
# random generators

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states(loader_generator: torch.Generator) -> Dict[str, Any]:
    """Every random number generator a run draws from, as tensors and plain data."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [version, list(internal), gauss],
        "loader": loader_generator.get_state(),
    }


def set_rng_states(states: Dict[str, Any], loader_generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    loader_generator.set_state(states["loader"])
