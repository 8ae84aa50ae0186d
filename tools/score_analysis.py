"""Why norm or attention? How the two Top-K scores relate, block by block, on an uncompressed ViT.

    python tools/score_analysis.py --checkpoint results/fashionmnist_v2/baseline/last.pt --arch vit_nano_patch4_28 \\
        --data_name FashionMNIST --data_root ../shared/datasets --images 1000 --reduce_token 2 --out_dir analysis

The model (a timm VisionTransformer, or an Eva such as the RoPE ViT-Nano, rotary angles applied as the
library applies them) runs with every block seeing all tokens (nothing is removed). At every block the two scores
that the pruning methods use are read where the paper's placement (``--reduce_at block``) reads them:

- ``attn`` (method ``tk``): the class-token row of the block's attention, averaged over heads;
- ``norm`` (method ``tk_n``): the L2 norm of every token of the block's output (with ``--reduce_at attn``:
  after the attention residual, before the MLP).

Only patch tokens are scored (the class token and any register tokens are never ranked). Per block the tool reports:

1. kept-set overlap: IoU |A∩B| / |A∪B| of the K patch tokens kept by norm (A) and by attention (B), averaged
   over images, for K = patches - ``--reduce_token`` and for every ``--keep_fractions`` (K = round(f·patches)),
   next to the IoU two random K-subsets have on average (chance);
2. Spearman rank correlation of the two scores over the patch tokens of one image, averaged over images;
3. outlying norms: per image, the largest patch-token norm over the median patch-token norm; the fraction of
   images with at least one patch token whose norm exceeds ``--outlier_factor`` times that image's median
   patch-token norm, and the number of such tokens; where on the patch grid the top-norm and the
   top-attention token sit, and whether they (and the outlying tokens) sit on background patches (mean
   pixel intensity below ``--background_threshold`` on the 0..1 scale; Fashion-MNIST's background is black).

Means come with a percentile bootstrap 95% CI over images. Writes ``score_analysis.json`` (every number),
``score_analysis.md`` (tables) and ``score_analysis.png`` into ``--out_dir``. Bad input ends as one line on
stderr (``score_analysis.py: error: ...``) and exit code 2.
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # ``python tools/score_analysis.py`` puts tools/ first on the path, not the repo
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from engine.errors import BAD_INPUT, CLIError, first_line, report_error  # noqa: E402
from tools.stats import bootstrap_ci  # noqa: E402  (the tools' one bootstrap)
from engine.options import ArgumentParser, int_at_least  # noqa: E402

PROG = "score_analysis.py"
CRITERIA = ("norm", "attn")


# ----------------------------------------------------------------------------------------------
# pure computations (numpy; each one is checked against a plain reference in the tests)

def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores of every row, best first: (B, N) -> (B, k)."""
    return np.argsort(-np.asarray(scores), axis=-1, kind="stable")[:, :k]


def set_iou(a: np.ndarray, b: np.ndarray, num_items: int) -> np.ndarray:
    """Per row, |A∩B| / |A∪B| of the index sets in the rows of ``a`` (B, Ka) and ``b`` (B, Kb) (indices < num_items)."""
    a, b = np.asarray(a), np.asarray(b)
    rows = np.arange(a.shape[0])[:, None]
    in_a = np.zeros((a.shape[0], num_items), dtype=bool)
    in_b = np.zeros((b.shape[0], num_items), dtype=bool)
    in_a[rows, a] = True
    in_b[rows, b] = True
    union = (in_a | in_b).sum(axis=1)
    return np.where(union > 0, (in_a & in_b).sum(axis=1) / np.maximum(union, 1), 1.0)


def chance_iou(num_items: int, k: int) -> float:
    """Expected IoU of two independent, uniformly random k-subsets of ``num_items`` items.

    Their intersection is hypergeometric: P(|A∩B| = i) = C(k, i) C(n - k, k - i) / C(n, k); IoU = i / (2k - i).
    """
    if k <= 0:
        return 1.0
    total = math.comb(num_items, k)
    return sum(math.comb(k, i) * math.comb(num_items - k, k - i) / total * i / (2 * k - i)
               for i in range(max(0, 2 * k - num_items), k + 1))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis, ties given the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    less = (x[..., None, :] < x[..., :, None]).sum(axis=-1)
    equal = (x[..., None, :] == x[..., :, None]).sum(axis=-1)
    return less + (equal + 1) / 2.0


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of ``a[i]`` and ``b[i]`` for every row: (B, N), (B, N) -> (B,); NaN for a
    row where either is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra = ra - ra.mean(axis=-1, keepdims=True)
    rb = rb - rb.mean(axis=-1, keepdims=True)
    denom = np.sqrt((ra * ra).sum(axis=-1) * (rb * rb).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(axis=-1) / np.where(denom > 0, denom, 1.0), np.nan)


def norm_outliers(norms: np.ndarray, factor: float) -> Dict[str, np.ndarray]:
    """Per image (row of the patch-token norms, (B, P)): ``max_over_median`` (largest norm / median norm),
    ``count`` (tokens whose norm exceeds ``factor`` × the median), ``has_outlier`` (count ≥ 1) and the
    boolean mask ``is_outlier`` (B, P)."""
    norms = np.asarray(norms, dtype=np.float64)
    median = np.median(norms, axis=-1, keepdims=True)
    is_outlier = norms > factor * median
    count = is_outlier.sum(axis=-1)
    return {"max_over_median": norms.max(axis=-1) / median[:, 0], "count": count, "has_outlier": count > 0,
            "is_outlier": is_outlier}


def position_frequency(indices: np.ndarray, num_items: int) -> np.ndarray:
    """How often each position is the chosen one: (B,) indices -> (num_items,) fractions summing to 1."""
    indices = np.asarray(indices).ravel()
    return np.bincount(indices, minlength=num_items)[:num_items] / max(indices.size, 1)


def patch_intensity(pixels: np.ndarray, patch: int) -> np.ndarray:
    """Mean pixel value of every patch in row-major order: (B, C, H, W) -> (B, (H/p)·(W/p))."""
    pixels = np.asarray(pixels, dtype=np.float64)
    batch, _, height, width = pixels.shape
    gh, gw = height // patch, width // patch
    pixels = pixels[:, :, :gh * patch, :gw * patch].mean(axis=1)
    return pixels.reshape(batch, gh, patch, gw, patch).mean(axis=(2, 4)).reshape(batch, gh * gw)


def fraction_on(mask: np.ndarray, chosen: np.ndarray) -> float:
    """Of the chosen positions (boolean (B, P)), the fraction that ``mask`` (B, P) marks; NaN if none is chosen."""
    chosen = np.asarray(chosen, dtype=bool)
    total = chosen.sum()
    return float((np.asarray(mask, dtype=bool) & chosen).sum() / total) if total else math.nan


def one_hot(indices: np.ndarray, num_items: int) -> np.ndarray:
    """(B, K) indices -> (B, num_items) boolean membership."""
    indices = np.asarray(indices).reshape(len(indices), -1)
    mask = np.zeros((indices.shape[0], num_items), dtype=bool)
    mask[np.arange(indices.shape[0])[:, None], indices] = True
    return mask


# ----------------------------------------------------------------------------------------------
# the model, run block by block

def _embedded(model: torch.nn.Module, images: Tensor) -> Tuple[Tensor, Any, Any]:
    """The tokens entering the first block, the library's layout of the model's blocks, and a function giving
    block ``i``'s rotary angles of the tokens ``x`` in their original order (None without rotary embeddings)."""
    from timm.models.eva import Eva

    from pruning.core.state import original_positions
    if not isinstance(model, Eva):
        from pruning.patch.timm import BLOCK_LAYOUT as TIMM_LAYOUT
        tokens = model.patch_drop(model.norm_pre(model._pos_embed(model.patch_embed(images))))
        return tokens, TIMM_LAYOUT, lambda i, x: None
    from pruning.patch.eva import BLOCK_LAYOUT as EVA_LAYOUT
    tokens, rope = model._pos_embed(model.patch_embed(images))
    tokens = model.norm_pre(tokens)

    def angles(index: int, x: Tensor):
        if rope is None:
            return None
        table = EVA_LAYOUT.rotary_table(model.blocks[index].attn, rope[index] if model.rope_mixed else rope)
        return table.for_tokens(original_positions(x.shape[0], x.shape[1], model.num_prefix_tokens, x.device))
    return tokens, EVA_LAYOUT, angles


def block_scores(model: torch.nn.Module, images: Tensor, reduce_at: str = "block",
                 batch_size: int = 250) -> Tuple[Tensor, Tensor, Tensor]:
    """Run a timm VisionTransformer or Eva (RoPE) with all tokens and read both scores at every block, through
    the library's own layout of the blocks (the same attention the compressed model runs).

    Returns (norms, attn, logits): norms and attn of the patch tokens, (depth, B, P) each, and the model's
    logits computed from the same block-by-block pass.
    """
    from pruning.core.scoring import token_norm

    prefix = model.num_prefix_tokens
    norms, attns, logits = [], [], []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x, layout, angles = _embedded(model, images[start:start + batch_size])
            batch_norms, batch_attn = [], []
            for index, block in enumerate(model.blocks):
                out, cls_attn, _ = layout.attention(block.attn, block.norm1(x), size=None, want_cls_attn=True,
                                                    want_keys=False, fused=False, angles=angles(index, x))
                x = x + layout.branch(block, layout.attn_post, out)
                if reduce_at == "attn":
                    batch_norms.append(token_norm(x)[:, prefix:])
                x = x + layout.branch(block, layout.mlp_post, block.mlp(block.norm2(x)))
                if reduce_at == "block":
                    batch_norms.append(token_norm(x)[:, prefix:])
                batch_attn.append(cls_attn[:, prefix:])
            norms.append(torch.stack(batch_norms))
            attns.append(torch.stack(batch_attn))
            logits.append(model.forward_head(model.norm(x)))
    return torch.cat(norms, dim=1), torch.cat(attns, dim=1), torch.cat(logits)


def kept_patches(scores: Tensor, keep: int) -> np.ndarray:
    """The patch tokens (0-based among the patches) a Top-K keeps: the library's ``select_tokens``, with a
    dummy prefix token in front so that it ranks exactly these scores. (B, P) -> (B, keep)."""
    from pruning.core.reduction import select_tokens
    padded = torch.cat([scores.new_zeros(scores.shape[0], 1), scores], dim=1)
    index = select_tokens(padded, keep + 1, num_prefix=1)
    return (index[:, 1:] - 1).numpy()


# ----------------------------------------------------------------------------------------------
# the analysis

def keep_levels(num_patches: int, reduce_token: int, fractions: Sequence[float]) -> List[Dict[str, Any]]:
    """The kept-set sizes compared: K = patches - reduce_token (as the library counts it), then each fraction."""
    from pruning.core.reduction import tokens_kept
    levels = [{"label": f"K={tokens_kept(num_patches + 1, reduce_token, 1) - 1} (reduce_token {reduce_token})",
               "keep": tokens_kept(num_patches + 1, reduce_token, 1) - 1, "source": "reduce_token",
               "fraction": None}]
    for fraction in fractions:
        keep = min(num_patches, max(1, int(round(fraction * num_patches))))
        levels.append({"label": f"K={keep} (keep {fraction:g})", "keep": keep, "source": "keep_fraction",
                       "fraction": fraction})
    for level in levels:
        level["chance_iou"] = chance_iou(num_patches, level["keep"])
    return levels


def _ci_lists(per_block: Sequence[np.ndarray], seed: int, resamples: int) -> Dict[str, List[float]]:
    cis = [bootstrap_ci(values, seed=seed + i, resamples=resamples) for i, values in enumerate(per_block)]
    return {"mean": [c[0] for c in cis], "ci_low": [c[1] for c in cis], "ci_high": [c[2] for c in cis]}


def analyse(norms: np.ndarray, attn: np.ndarray, intensity: np.ndarray, grid: Tuple[int, int], *,
            reduce_token: int, keep_fractions: Sequence[float], outlier_factor: float, background_threshold: float,
            seed: int = 0, resamples: int = 2000) -> Dict[str, Any]:
    """Every number of the report from the scores (depth, B, P) and the patch intensities (B, P)."""
    depth, count, patches = norms.shape
    norms_t, attn_t = torch.from_numpy(np.ascontiguousarray(norms)), torch.from_numpy(np.ascontiguousarray(attn))
    levels = keep_levels(patches, reduce_token, keep_fractions)
    for level in levels:
        ious = [set_iou(kept_patches(norms_t[b], level["keep"]), kept_patches(attn_t[b], level["keep"]), patches)
                for b in range(depth)]
        level["iou"] = _ci_lists(ious, seed, resamples)
    rho = [spearman_rows(norms[b], attn[b]) for b in range(depth)]
    spearman = _ci_lists(rho, seed, resamples)
    spearman["images_used"] = [int((~np.isnan(r)).sum()) for r in rho]

    background = intensity < background_threshold
    outliers = [norm_outliers(norms[b], outlier_factor) for b in range(depth)]
    ratio = _ci_lists([o["max_over_median"] for o in outliers], seed, resamples)
    ratio["median"] = [float(np.median(o["max_over_median"])) for o in outliers]
    ratio["max"] = [float(np.max(o["max_over_median"])) for o in outliers]
    top = {c: [np.argmax(s[b], axis=-1) for b in range(depth)] for c, s in (("norm", norms), ("attn", attn))}
    freq = {c: [position_frequency(top[c][b], patches) for b in range(depth)] for c in CRITERIA}
    main_keep = levels[-1]["keep"]  # the smallest kept set: where the choice matters most
    on_background = {
        "top_norm": [fraction_on(background, one_hot(top["norm"][b], patches)) for b in range(depth)],
        "top_attn": [fraction_on(background, one_hot(top["attn"][b], patches)) for b in range(depth)],
        "outlier_tokens": [fraction_on(background, o["is_outlier"]) for o in outliers],
        "kept_norm": [fraction_on(background, one_hot(kept_patches(norms_t[b], main_keep), patches))
                      for b in range(depth)],
        "kept_attn": [fraction_on(background, one_hot(kept_patches(attn_t[b], main_keep), patches))
                      for b in range(depth)],
    }
    return {
        "keep_sets": levels,
        "spearman": spearman,
        "norm_outliers": {
            "factor": outlier_factor,
            "max_over_median": ratio,
            "images_with_outlier": [float(o["has_outlier"].mean()) for o in outliers],
            "outliers_per_image": [float(o["count"].mean()) for o in outliers],
        },
        "positions": {
            "grid": list(grid),
            "top_norm_frequency": [f.reshape(grid).tolist() for f in freq["norm"]],
            "top_attn_frequency": [f.reshape(grid).tolist() for f in freq["attn"]],
            "top_norm_mode": [_mode(f) for f in freq["norm"]],
            "top_attn_mode": [_mode(f) for f in freq["attn"]],
            "same_top_token": [float((top["norm"][b] == top["attn"][b]).mean()) for b in range(depth)],
        },
        "background": {
            "threshold": background_threshold,
            "patch_fraction": float(background.mean()),
            "kept_keep": main_keep,
            **on_background,
        },
    }


def _mode(freq: np.ndarray) -> Dict[str, Any]:
    index = int(np.argmax(freq))
    return {"index": index, "frequency": float(freq[index])}


# ----------------------------------------------------------------------------------------------
# input

def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="weights: a main.py checkpoint or a timm .pth/.safetensors (required)")
    parser.add_argument("--arch", required=True, metavar="NAME", help="timm ViT the checkpoint was trained as (required)")
    parser.add_argument("--data_name", default="FashionMNIST", help="dataset (default: %(default)s)")
    parser.add_argument("--data_root", default="datasets", help="dataset folder (default: %(default)s, as main.py)")
    parser.add_argument("--images", type=int_at_least(1), default=1000, help="first N test images (default: %(default)s)")
    parser.add_argument("--reduce_token", type=_non_negative_int, default=2,
                        help="tokens removed per block: the kept set compared first has patches - K tokens "
                             "(default: %(default)s)")
    parser.add_argument("--keep_fractions", type=_fractions, default=[0.5, 0.25],
                        help="further kept-set sizes, as fractions of the patches, comma separated "
                             "(default: 0.5,0.25)")
    parser.add_argument("--reduce_at", choices=("block", "attn"), default="block",
                        help="where the norm is read: after the block (the paper's), or after attention "
                             "(default: %(default)s)")
    parser.add_argument("--outlier_factor", type=_positive_float, default=3.0,
                        help="a token's norm is outlying above this many times its image's median patch-token "
                             "norm (default: %(default)s)")
    parser.add_argument("--background_threshold", type=float, default=0.05,
                        help="a patch is background when its mean pixel (0..1) is below this (default: %(default)s)")
    parser.add_argument("--bootstrap", type=int_at_least(1), default=2000,
                        help="bootstrap resamples for the CIs (default: %(default)s)")
    parser.add_argument("--examples", type=_non_negative_int, default=4,
                        help="example images drawn with both kept sets (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    parser.add_argument("--threads", type=int_at_least(1), default=1, help="CPU threads (default: %(default)s)")
    parser.add_argument("--out_dir", required=True, metavar="DIR", help="folder for the JSON, markdown and PNG (required)")
    return parser


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def _fractions(text: str) -> List[float]:
    values = [float(part) for part in text.split(",") if part.strip()]
    if any(not 0 < v <= 1 for v in values):
        raise ValueError(text)
    return values


def load_model(arch: str, path: str, num_classes: int, in_chans: int) -> torch.nn.Module:
    """``arch`` with the weights of ``path``, in eval mode; CLIError for a missing file or weights that do not fit."""
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    from engine.checkpoint import load_weights
    from engine.model import create_model

    if not os.path.isfile(path):
        raise CLIError(f"--checkpoint: {path}: no such file")
    model = create_model(arch, num_classes, in_chans)
    if not isinstance(model, (VisionTransformer, Eva)) or getattr(model, "cls_token", None) is None:
        raise CLIError(f"--arch {arch}: not a timm VisionTransformer or Eva with a class token (the analysis "
                       f"compares the norm with class-token attention)")
    # new_head_ok=True: load_weights then reports a body of another width as "does not fit" (with False, any
    # head of another shape is described as a head for another number of classes, even for a wrong --arch)
    left_out = load_weights(model, path, new_head_ok=True)
    if left_out:
        raise CLIError(f"--checkpoint: {path} has a classifier head of another shape than --arch {arch} on this "
                        f"dataset ({num_classes} classes); analyse it on the dataset it was trained on")
    return model.eval()


def load_images(name: str, root: str, count: int, img_size: int) -> Tuple[Tensor, Tensor, np.ndarray, int]:
    """The first ``count`` test images as the model sees them, their labels, their 0..1 pixels and the number of
    classes."""
    import data
    try:
        splits = data.build_dataset(name, root, download=False)
        splits.set_transforms(img_size, augment="none")
        items = [splits.test[i] for i in range(min(count, len(splits.test)))]
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as err:
        raise CLIError(f"--data_root: the test images of {name!r} cannot be read from {root}: "
                        f"{first_line(err)}") from None
    images = torch.stack([image for image, _ in items])
    labels = torch.tensor([int(label) for _, label in items])
    mean = torch.tensor(splits.spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(splits.spec.std).view(1, -1, 1, 1)
    pixels = (images * std + mean).clamp(0, 1).numpy()
    return images, labels, pixels, splits.num_classes


# ----------------------------------------------------------------------------------------------
# output

def _clean(obj: Any) -> Any:
    """JSON-safe: NaN and inf become null, numpy scalars plain numbers."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def checkpoint_name(path: str) -> str:
    """The checkpoint as titles name it: its folder and file name (``baseline_run/last.pt``)."""
    return "/".join(Path(path).parts[-2:])


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pct(value: Optional[float]) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.0f}%"


def write_markdown(report: Dict[str, Any], path: str) -> None:
    depth = report["depth"]
    name = checkpoint_name(report["checkpoint"])
    lines = [f"# Norm vs. class-token attention: {name} ({report['arch']})", "",
             f"{report['images']} test images of {report['data_name']}, {report['num_patches']} patch tokens, "
             f"{depth} blocks, no tokens removed; norm read at `{report['reduce_at']}`. "
             f"Mean over images [bootstrap 95% CI]. Test accuracy on these images: "
             f"{_pct(report['sanity']['accuracy'])}.", "",
             "## Kept-set overlap (IoU of Top-K by norm and by attention)", ""]
    levels = report["keep_sets"]
    lines.append("| block | " + " | ".join(level["label"] for level in levels) + " | Spearman ρ |")
    lines.append("|---" * (len(levels) + 2) + "|")
    for b in range(depth):
        cells = [f"{_fmt(l['iou']['mean'][b])} [{_fmt(l['iou']['ci_low'][b])}, {_fmt(l['iou']['ci_high'][b])}]"
                 for l in levels]
        sp = report["spearman"]
        cells.append(f"{_fmt(sp['mean'][b])} [{_fmt(sp['ci_low'][b])}, {_fmt(sp['ci_high'][b])}]")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines.append("| chance | " + " | ".join(_fmt(l["chance_iou"]) for l in levels) + " | 0 |")
    out, bg, pos = report["norm_outliers"], report["background"], report["positions"]
    grid_w = pos["grid"][1]
    lines += ["", "## Outlying norms and where the top tokens sit", "",
              f"max/median: the largest patch-token norm over the median one, per image. Outlier: a patch token "
              f"whose norm exceeds {out['factor']:g}× its image's median patch-token norm. Background: a patch whose "
              f"mean pixel is below {bg['threshold']:g} (0..1); {_pct(bg['patch_fraction'])} of all patches are "
              f"background. Kept on background: of the K={bg['kept_keep']} patches each criterion keeps. "
              f"Mode: the grid cell (row, col) most often holding the top token, and how often.", "",
              "| block | max/median [CI] | images with outlier | outliers / image | top-norm on bg | top-attn on bg "
              "| outliers on bg | kept on bg: norm / attn | top-norm mode | top-attn mode | same top token |",
              "|---" * 11 + "|"]
    for b in range(depth):
        r = out["max_over_median"]
        mode_n, mode_a = pos["top_norm_mode"][b], pos["top_attn_mode"][b]
        cell = lambda m: f"({m['index'] // grid_w}, {m['index'] % grid_w}) {_pct(m['frequency'])}"  # noqa: E731
        lines.append(
            f"| {b} | {_fmt(r['mean'][b], 2)} [{_fmt(r['ci_low'][b], 2)}, {_fmt(r['ci_high'][b], 2)}] "
            f"| {_pct(out['images_with_outlier'][b])} | {_fmt(out['outliers_per_image'][b], 2)} "
            f"| {_pct(bg['top_norm'][b])} | {_pct(bg['top_attn'][b])} | {_pct(bg['outlier_tokens'][b])} "
            f"| {_pct(bg['kept_norm'][b])} / {_pct(bg['kept_attn'][b])} | {cell(mode_n)} | {cell(mode_a)} "
            f"| {_pct(pos['same_top_token'][b])} |")
    lines += ["", "## In short", "", in_short(report), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _span(values: Sequence[float], show: Any) -> str:
    """``low to high`` of the finite values, each shown by ``show``; ``–`` without any."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return "–"
    low, high = show(min(finite)), show(max(finite))
    return low if low == high else f"{low} to {high}"


def in_short(report: Dict[str, Any]) -> str:
    """The tables' main facts in one paragraph, over the blocks after the first (block 0 reads the embedding
    more than the image, and in a one-block model the first is all there is). Measured, not interpreted."""
    later = slice(1, None) if report["depth"] > 1 else slice(None)
    blocks = "after block 0" if report["depth"] > 1 else "in its block"
    smallest = report["keep_sets"][-1]
    out, bg = report["norm_outliers"], report["background"]
    pct = lambda v: f"{100 * v:.0f}"  # noqa: E731
    return (f"{blocks[0].upper()}{blocks[1:]}, the kept sets of norm and attention overlap with IoU "
            f"{_span(smallest['iou']['mean'][later], lambda v: f'{v:.2f}')} at {smallest['label'].split(' (')[0]} "
            f"(random sets: {smallest['chance_iou']:.2f}) and the scores' rank correlation is "
            f"{_span(report['spearman']['mean'][later], lambda v: f'{v:.2f}')}. The top-norm token is a background "
            f"patch in {_span(bg['top_norm'][later], pct)} % of the images, the top-attention token in "
            f"{_span(bg['top_attn'][later], pct)} %; of the K={bg['kept_keep']} tokens each keeps, "
            f"{_span(bg['kept_norm'][later], pct)} % are background by norm and {_span(bg['kept_attn'][later], pct)} % "
            f"by attention ({pct(bg['patch_fraction'])} % of all patches are background). Images with an outlying "
            f"norm (over {out['factor']:g}× the median): {_span(out['images_with_outlier'][later], pct)} %; the "
            f"largest norm is {_span(out['max_over_median']['mean'][later], lambda v: f'{v:.2f}')}× the median.")


def save_figure(report: Dict[str, Any], pixels: np.ndarray, norms: np.ndarray, attn: np.ndarray, path: str,
                examples: int) -> None:
    """score_analysis.png: overlap and correlation per block, outliers and background, position heatmaps,
    example images with both kept sets."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth, name = report["depth"], checkpoint_name(report["checkpoint"])
    examples = min(examples, pixels.shape[0])
    fig = plt.figure(figsize=(max(16, 2.2 * depth + 2), 15), layout="constrained")
    rows = fig.add_gridspec(4, 1, height_ratios=[1.1, 1.0, 1.0, 1.0 if examples else 0.01])
    fig.suptitle(f"Norm vs. class-token attention scores, {name} ({report['arch']}, {report['images']} "
                 f"{report['data_name']} test images, no tokens removed)", fontsize=13)
    top = rows[0].subgridspec(1, 4).subplots()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    blocks = np.arange(depth)
    _plot_overlap(top[0], top[1], report, blocks, colors)
    _plot_outliers(top[2], report["norm_outliers"], blocks, colors)
    _plot_background(top[3], report["background"], blocks)
    for ax in top:
        ax.set_xticks(blocks)
    _plot_positions(fig, (rows[1], rows[2]), report["positions"], depth)
    if examples:
        _plot_examples(rows[3], report, pixels, norms, attn, examples)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_overlap(iou_ax, rho_ax, report: Dict[str, Any], blocks: np.ndarray, colors: Sequence[str]) -> None:
    """Kept-set IoU of every keep level (chance dotted) and the Spearman correlation, per block."""
    for i, level in enumerate(report["keep_sets"]):
        iou, c = level["iou"], colors[i % len(colors)]
        iou_ax.plot(blocks, _arr(iou["mean"]), "o-", color=c, label=level["label"])
        iou_ax.fill_between(blocks, _arr(iou["ci_low"]), _arr(iou["ci_high"]), color=c, alpha=0.25)
        iou_ax.axhline(level["chance_iou"], color=c, ls=":", lw=1)
    iou_ax.set(title="Kept-set IoU, norm vs attention\n(dotted: two random sets)", xlabel="block", ylabel="IoU",
               ylim=(0, 1.02))
    iou_ax.legend(fontsize=8)
    sp = report["spearman"]
    rho_ax.plot(blocks, _arr(sp["mean"]), "o-", color="k")
    rho_ax.fill_between(blocks, _arr(sp["ci_low"]), _arr(sp["ci_high"]), color="k", alpha=0.2)
    rho_ax.axhline(0, color="grey", lw=0.8)
    rho_ax.set(title="Spearman ρ(norm, attention)\nover patch tokens, mean per image", xlabel="block",
               ylabel="Spearman ρ", ylim=(-1, 1))


def _plot_outliers(ax, out: Dict[str, Any], blocks: np.ndarray, colors: Sequence[str]) -> None:
    """Max over median norm per block, and the share of images with an outlying token (right axis)."""
    r = out["max_over_median"]
    ax.plot(blocks, _arr(r["mean"]), "o-", color=colors[0], label="max/median norm (mean)")
    ax.fill_between(blocks, _arr(r["ci_low"]), _arr(r["ci_high"]), color=colors[0], alpha=0.25)
    ax.plot(blocks, _arr(r["max"]), "^--", color=colors[0], alpha=0.6, label="max/median norm (worst image)")
    ax.axhline(out["factor"], color="grey", ls=":", lw=1, label=f"outlier factor {out['factor']:g}")
    ax.set(title="Outlying norms", xlabel="block", ylabel="max / median patch-token norm")
    twin = ax.twinx()
    twin.plot(blocks, 100 * _arr(out["images_with_outlier"]), "s-", color=colors[3],
              label=f"images with a token > {out['factor']:g}× median")
    twin.set(ylabel="% of images", ylim=(0, 102))
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="best")


def _plot_background(ax, bg: Dict[str, Any], blocks: np.ndarray) -> None:
    """The share of top-scored, outlying and kept tokens that are background patches, per block."""
    for key, label, marker in (("top_norm", "top-norm token", "o-"), ("top_attn", "top-attention token", "s-"),
                               ("outlier_tokens", "outlier tokens", "^:"),
                               ("kept_norm", f"kept by norm (K={bg['kept_keep']})", "o--"),
                               ("kept_attn", f"kept by attention (K={bg['kept_keep']})", "s--")):
        ax.plot(blocks, 100 * _arr(bg[key]), marker, label=label)
    ax.axhline(100 * bg["patch_fraction"], color="grey", ls=":", label="all patches")
    ax.set(title=f"On background patches\n(mean pixel < {bg['threshold']:g})", xlabel="block",
           ylabel="% on background", ylim=(0, 102))
    ax.legend(fontsize=7, loc="best")


def _plot_positions(fig, rows, pos: Dict[str, Any], depth: int) -> None:
    """Two rows of heatmaps: where the top-norm and the top-attention token lie, per block."""
    gh, gw = pos["grid"]
    for row, (key, label) in zip(rows, (("top_norm_frequency", "top-norm"), ("top_attn_frequency", "top-attention"))):
        axes = row.subgridspec(1, depth + 1, width_ratios=[1] * depth + [0.06]).subplots()
        maps = np.asarray(pos[key], dtype=float)
        vmax = max(maps.max(), 1e-9)
        for b in range(depth):
            image = axes[b].imshow(maps[b], cmap="magma", vmin=0, vmax=vmax)
            axes[b].set(title=f"{label} token, block {b}", xticks=range(gw), yticks=range(gh))
            axes[b].tick_params(labelsize=6)
            axes[b].set_xlabel("patch column", fontsize=7)
            if b == 0:
                axes[b].set_ylabel("patch row", fontsize=7)
        fig.colorbar(image, cax=axes[-1], label="fraction of images")


def _plot_examples(row, report: Dict[str, Any], pixels: np.ndarray, norms: np.ndarray, attn: np.ndarray,
                   examples: int) -> None:
    """The first test images with the patches each score keeps at the middle block overlaid."""
    from matplotlib.patches import Patch

    gh, gw = report["positions"]["grid"]
    block, keep = report["depth"] // 2, report["keep_sets"][-1]["keep"]
    axes = row.subgridspec(1, examples).subplots(squeeze=False)[0]
    norm_t, attn_t = torch.from_numpy(norms[block][:examples]), torch.from_numpy(attn[block][:examples])
    by_norm = one_hot(kept_patches(norm_t, keep), gh * gw)
    by_attn = one_hot(kept_patches(attn_t, keep), gh * gw)
    for i, ax in enumerate(axes):
        ax.imshow(pixels[i].mean(axis=0), cmap="gray", vmin=0, vmax=1, extent=(0, gw, gh, 0))
        overlay = np.zeros((gh * gw, 4))
        overlay[by_norm[i] & by_attn[i]] = (0.1, 0.8, 0.1, 0.45)
        overlay[by_norm[i] & ~by_attn[i]] = (0.1, 0.4, 1.0, 0.6)
        overlay[~by_norm[i] & by_attn[i]] = (1.0, 0.5, 0.0, 0.6)
        overlay[~by_norm[i] & ~by_attn[i]] = (0, 0, 0, 0.0)
        ax.imshow(overlay.reshape(gh, gw, 4), extent=(0, gw, gh, 0), interpolation="nearest")
        iou = set_iou(np.flatnonzero(by_norm[i])[None], np.flatnonzero(by_attn[i])[None], gh * gw)[0]
        ax.set(title=f"test image {i}, block {block}, K={keep}: IoU {iou:.2f}", xticks=[], yticks=[])
    legend = [Patch(color=(0.1, 0.8, 0.1), label="kept by both"), Patch(color=(0.1, 0.4, 1.0), label="norm only"),
              Patch(color=(1.0, 0.5, 0.0), label="attention only"),
              Patch(facecolor="none", edgecolor="grey", label="dropped by both")]
    axes[-1].legend(handles=legend, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _arr(values: Sequence[Optional[float]]) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=float)


# ----------------------------------------------------------------------------------------------
# the command

def run(args: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    import timm
    import pruning.models  # noqa: F401  (registers the small ViTs in timm's registry)
    import data

    if not os.path.isfile(args.checkpoint):
        raise CLIError(f"--checkpoint: {args.checkpoint}: no such file")
    if not timm.is_model(args.arch):
        raise CLIError(f"--arch: unknown timm model {args.arch!r}")
    if args.data_name not in data.DATASETS:
        raise CLIError(f"--data_name: unknown dataset {args.data_name!r}; choose from {', '.join(data.DATASETS)}")
    spec = data.DATASETS[args.data_name]
    model = load_model(args.arch, args.checkpoint, spec.num_classes or 0, spec.in_chans)
    img_size = model.patch_embed.img_size[0]
    patch = model.patch_embed.patch_size[0]
    grid = tuple(model.patch_embed.grid_size)
    images, labels, pixels, _ = load_images(args.data_name, args.data_root, args.images, img_size)
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as err:
        raise CLIError(f"--out_dir: {args.out_dir}: {err.strerror or first_line(err)}") from None

    norms_t, attn_t, logits = block_scores(model, images, args.reduce_at)
    with torch.no_grad():
        reference = model(images)
    norms, attn = norms_t.double().numpy(), attn_t.double().numpy()
    intensity = patch_intensity(pixels, patch)
    report: Dict[str, Any] = {
        "checkpoint": os.path.abspath(args.checkpoint), "arch": args.arch, "data_name": args.data_name,
        "images": int(images.shape[0]), "num_patches": int(norms.shape[2]), "depth": int(norms.shape[0]),
        "reduce_at": args.reduce_at, "reduce_token": args.reduce_token, "keep_fractions": list(args.keep_fractions),
        "bootstrap": {"resamples": args.bootstrap, "level": 0.95, "seed": args.seed, "over": "images"},
        "definitions": {
            "attn": "head-averaged softmax attention of the class token to each patch token, in the block's attention",
            "norm": f"L2 norm of each patch token of the block's output ({args.reduce_at} placement)",
            "iou": "|A∩B|/|A∪B| of the K patch tokens with the largest norm (A) and attention (B), per image",
            "chance_iou": "expected IoU of two independent uniformly random K-subsets of the patches",
            "spearman": "Spearman rank correlation of norm and attention over the patch tokens, per image",
            "max_over_median": "largest patch-token norm / median patch-token norm, per image",
            "images_with_outlier": "fraction of images with a patch token whose norm > factor × the image's median "
                                   "patch-token norm",
            "positions": "fraction of images in which each grid cell (row-major) holds the top-norm / top-attention "
                         "patch token",
            "background": "a patch whose mean pixel (0..1, before normalisation) is below threshold; each entry is "
                          "the fraction of the chosen tokens (over all images) that sit on background",
        },
        "sanity": {
            "max_abs_logit_diff": float((logits - reference).abs().max()),
            "accuracy": float((logits.argmax(-1) == labels).float().mean()),
        },
    }
    report.update(analyse(norms, attn, intensity, grid, reduce_token=args.reduce_token,
                          keep_fractions=args.keep_fractions, outlier_factor=args.outlier_factor,
                          background_threshold=args.background_threshold, seed=args.seed, resamples=args.bootstrap))
    report = _clean(report)
    paths = {kind: os.path.join(args.out_dir, f"score_analysis.{kind}") for kind in ("json", "md", "png")}
    try:
        with open(paths["json"], "w") as f:
            json.dump(report, f, indent=1, allow_nan=False)
        write_markdown(report, paths["md"])
        save_figure(report, pixels, norms, attn, paths["png"], args.examples)
    except OSError as err:
        raise CLIError(f"--out_dir: {args.out_dir}: {err.strerror or first_line(err)}") from None
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: bad input ends as one line on stderr and exit code 2, never a traceback."""
    try:
        args = build_parser().parse_args(argv)
        report = run(args)
    except BAD_INPUT as err:
        return report_error(PROG, err)
    for level in report["keep_sets"]:
        print(f"IoU {level['label']:<28} " + " ".join(_fmt(v, 2) for v in level["iou"]["mean"])
              + f"   (chance {level['chance_iou']:.2f})")
    print(f"{'Spearman rho':<32} " + " ".join(_fmt(v, 2) for v in report["spearman"]["mean"]))
    print(f"{'max/median norm':<32} " + " ".join(_fmt(v, 2) for v in report["norm_outliers"]["max_over_median"]["mean"]))
    print(f"wrote score_analysis.json, .md and .png in {os.path.abspath(args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
