"""What a finished run shows: the end-of-run summary table, and (``--visualize``) the tokens the
compressed model keeps of a few test images."""
import copy
import os
import platform
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from timm.models.vision_transformer import VisionTransformer

import data
from pruning.patch import remove_patch

from .model import compress


# schedule: tokens removed per block as asked (an int, or one per block); schedule_per_block: the same, one
# value per block; removed_per_block: what each block really removed (fewer where too few tokens were left)
RESULT_KEYS = ("accuracy", "best_accuracy", "throughput", "gflops", "gmacs_thop", "params_m", "method", "schedule",
               "schedule_per_block", "removed_per_block", "tokens_per_block", "arch", "data_name", "epochs", "seed",
               "world_size", "baseline_throughput", "baseline_gflops", "speedup", "analytic_gflops", "prop_attn",
               "predictions", "environment")
# results.json fields that are measured times, so differ between two runs of the same command
TIMING_KEYS = ("throughput", "baseline_throughput", "speedup")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else the platform's word for it)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment(device: torch.device) -> Dict[str, Any]:
    """What a run ran on: versions, the device (CPU model or CUDA device name) and torch's CPU threads."""
    import numpy
    import timm

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "numpy": numpy.__version__, "device": name, "threads": torch.get_num_threads()}


def save_predictions(path: str, predicted: Sequence[int], labels: Sequence[int],
                     indices: Optional[Sequence[int]] = None) -> str:
    """``predictions.npz``: ``labels`` and ``predicted`` (int64, test-set order) and, for a test subset, the
    ``indices`` of those images in the full test split; written atomically. Returns ``path``."""
    import io

    import numpy as np

    arrays = {"labels": np.asarray(labels, dtype=np.int64), "predicted": np.asarray(predicted, dtype=np.int64)}
    if indices is not None:
        arrays["indices"] = np.asarray(indices, dtype=np.int64)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def tokens_text(schedule: Any) -> str:
    """A schedule as ``--reduce_token`` takes it: ``2`` or ``0,2,2,2``."""
    return str(schedule) if isinstance(schedule, int) else ",".join(map(str, schedule))


def arrows(tokens: Sequence[int]) -> str:
    """Tokens entering the first block, then leaving each block: ``17 → 15 → 13``."""
    return " → ".join(map(str, tokens))


def unmet_warning(method: str, schedule: Any, unmet: Sequence[Tuple[int, int, int]], tokens: Sequence[int],
                  prog: str = "main.py") -> str:
    """The one stderr line for blocks that cannot remove what ``--reduce_token`` asks; ``unmet``: (block,
    tokens asked, tokens removed) of each such block; ``prog``: the program that warns."""
    plural = len(unmet) > 1
    blocks = ", ".join(str(block) for block, _, _ in unmet)
    removed = ", ".join(str(n) for _, _, n in unmet)
    asked = ", ".join(sorted({str(k) for _, k, _ in unmet}, key=int))
    return (f"{prog}: warning: --reduce_token {tokens_text(schedule)} cannot be honoured: block"
            f"{'s' if plural else ''} {blocks} remove{'' if plural else 's'} {removed} of the {asked} tokens asked "
            f"({tokens[0]} tokens enter block 1 and {method} keeps the prefix tokens and at least one patch); "
            f"tokens {arrows(tokens)}; ask for fewer")


def summary(results: Dict[str, Any], extra: Dict[str, str]) -> str:
    """The end-of-run table of ``results``; ``extra`` says how they came about (keys: reduce_at, shape,
    sizes, bench, analytic, ideal, time, results)."""
    def num(value: Optional[float], fmt: str, unit: str = "") -> str:
        return "-" if value is None else f"{value:{fmt}}{unit}"

    rows = [
        ("method", f"{results['method']} (schedule {tokens_text(results['schedule'])}, at {extra['reduce_at']})"),
        ("tokens", " → ".join(map(str, results["tokens_per_block"])) if results.get("tokens_per_block") else "-"),
        ("arch", f"{results['arch']} ({extra['shape']})"),
        ("data", f"{results['data_name']} ({extra['sizes']})"),
        ("epochs", str(results["epochs"])),
        ("accuracy", f"{num(results['accuracy'], '.2f', ' %')} (best {num(results['best_accuracy'], '.2f', ' %')})"),
        ("throughput", f"{num(results['throughput'], ',.0f', ' img/s')} ({extra['bench']})"),
        ("GFLOPs / image", f"{num(results['gflops'], '.4g')} (analytic {extra['analytic']})"),
        ("GMACs (thop)", num(results["gmacs_thop"], ".4g")),
        ("params", num(results["params_m"], ".3f", " M")),
    ]
    if results["speedup"] is not None:
        rows += [("baseline", f"{num(results['baseline_throughput'], ',.0f', ' img/s')}, "
                              f"{num(results['baseline_gflops'], '.4g')} GFLOPs (method none)"),
                 ("speedup", f"{results['speedup']:.3f}x (ideal by FLOPs {extra['ideal']})")]
    rows += [("time", extra["time"]), ("results", extra["results"])]
    width = max(len(name) for name, _ in rows)
    line = "-" * (width + 2 + max(len(value) for _, value in rows))
    return "\n".join(["Summary", line] + [f"{name:<{width}}  {value}" for name, value in rows] + [line])


def save_visualization(model: VisionTransformer, args: Any, splits: data.Splits, device: torch.device,
                       out_dir: str) -> str:
    """``<out_dir>/visualization.png``: what the compressed model keeps of the first ``--visualize`` test images
    (``args``: the run's settings); returns its path."""
    from pruning.visualize import save_token_grid  # matplotlib: imported only when asked for

    traced = compress(remove_patch(copy.deepcopy(model)), args, trace_source=True)
    images = torch.stack([splits.test[i][0] for i in range(min(args.visualize, len(splits.test)))]).to(device)
    return save_token_grid(traced, images, os.path.join(out_dir, "visualization.png"),
                           mean=splits.spec.mean, std=splits.spec.std)
