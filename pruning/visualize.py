"""Pictures of what a compressed ViT keeps: a token grid over the input images and a tokens-per-block plot.

``save_token_grid(model, images, path)`` draws one row per image: the image, then the image as seen
after a few blocks. Pruned patches are dimmed; patches that went into a fused token (EViT family)
are tinted orange and hatched; ToMe's merged groups are filled with their mean colour and outlined
in one colour per group, as in ToMe's own visualisation. ``save_token_grid_comparison`` puts several
models (methods) side by side on the same images. ``save_tokens_per_block_plot`` plots the tokens
left after every block for all methods.

Working out what became of each patch (``block_patch_maps``) is separate from drawing, so it can be
checked without images. Drawing uses matplotlib's Agg canvas directly: no pyplot, no global backend.

The command line (main.py checkpoints, test images) is ``tools/visualize.py``:

    python tools/visualize.py tokens --arch vit_small_patch16_224 --pool_k 10 --out tokens.png
    python tools/visualize.py grid --checkpoint out_tk/best.pt --checkpoint out_tome/best.pt --out grid.png
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from torch import Tensor

from .core.counting import Schedule, resolve_schedule, token_counts
from .core.methods import METHOD_NAMES, CompressionMethod, get_method
from .patch import apply_patch, get_config, get_state, remove_patch
from .core.reduction import tokens_kept

# What became of an original patch after a block.
KEPT = 0  # still its own token
DROPPED = 1  # pruned away (tk, tk_n): carried by no token
FUSED = 2  # inside a fused token (evit, evit_n, n_wa, a_wn)
MERGED = 3  # inside a ToMe token that holds more than one patch

PANEL_INCHES = 1.6  # each grid cell
TITLE_INCHES = 0.75  # column titles above the first row
CAPTION_INCHES = 0.35  # the legend line below the grid
DPI = 100
MIN_PANEL_PIXELS = 96  # small images are enlarged (nearest neighbour) to at least this many pixels

# dropped: 30% image, 70% pale blue-gray (a tint, so that it shows on grayscale images too)
DIM_TOWARDS, DIM_KEEP = np.array([0.78, 0.84, 0.95]), 0.3
FUSED_TINT, FUSED_ALPHA = np.array([1.0, 0.55, 0.0]), 0.45
EDGE_GRAY = np.array([0.35, 0.35, 0.35])
CAPTION = ("dimmed (pale blue): pruned · orange, hatched: in a fused token · "
           "ToMe: one outline colour per merged group, filled with the group's mean colour")


# --- what became of each patch -------------------------------------------------------------------

@dataclass
class BlockPatches:
    """What became of every original patch after one block.

    owner: (B, P) index of the token that carries each patch after the block, -1 if none does.
    status: (B, P) KEPT, DROPPED, FUSED or MERGED.
    tokens_left: tokens leaving the block (prefix tokens and fused tokens included).
    """

    block: int
    tokens_left: int
    owner: Tensor
    status: Tensor


def patch_owner(source: Tensor, num_prefix: int) -> Tensor:
    """(B, P) index of the token carrying each original patch in ``source`` (B, N, N0); -1 if none."""
    carried = source[:, :, num_prefix:] > 0.5
    owner = carried.to(torch.uint8).argmax(dim=1)
    return torch.where(carried.any(dim=1), owner, torch.full_like(owner, -1))


def block_patch_maps(block_sources: Sequence[Tensor], num_prefix: int, method: CompressionMethod,
                     schedule: Sequence[int]) -> List[BlockPatches]:
    """What became of each patch after every block, from the source maps a traced forward recorded.

    ``schedule`` (tokens removed per block, as patched) tells at which blocks a fusing method
    appended a fused token (the last token). Fused tokens stay fused tokens later on (kept, or fused
    again), so a patch once fused stays FUSED.
    """
    if len(block_sources) != len(schedule):
        raise ValueError(f"block_sources: {len(block_sources)} source maps for {len(schedule)} blocks")
    maps: List[BlockPatches] = []
    tokens_before = block_sources[0].shape[2] if block_sources else 0
    fused_so_far: Optional[Tensor] = None
    for block, (source, k) in enumerate(zip(block_sources, schedule)):
        source = source.detach().float().cpu()
        owner = patch_owner(source, num_prefix)
        status = torch.full_like(owner, KEPT)
        if method.reduction == "merge":
            group_size = (source[:, :, num_prefix:] > 0.5).sum(dim=2)  # (B, N) patches per token
            status[group_size.gather(1, owner.clamp(min=0)) > 1] = MERGED
        elif method.reduction == "prune":
            if method.fuses:
                if fused_so_far is None:
                    fused_so_far = torch.zeros_like(owner, dtype=torch.bool)
                if k > 0 and tokens_kept(tokens_before, k, num_prefix) < tokens_before:
                    fused_so_far = fused_so_far | (source[:, -1, num_prefix:] > 0.5)
                status[fused_so_far] = FUSED
            status[owner < 0] = DROPPED
        maps.append(BlockPatches(block, source.shape[1], owner, status))
        tokens_before = source.shape[1]
    return maps


@contextlib.contextmanager
def tracing_sources(model: torch.nn.Module) -> Iterator[None]:
    """Make the model's forward record source maps; restore its compression and train mode after.

    An unpatched model is patched with ``none`` for the duration (every patch kept).
    """
    cfg = get_config(model)
    was_training = model.training
    if cfg is None:
        apply_patch(model, "none", 0, trace_source=True)
    else:
        old_trace, cfg.trace_source = cfg.trace_source, True
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        if cfg is None:
            remove_patch(model)
        else:
            cfg.trace_source = old_trace


def trace_patches(model: torch.nn.Module, images: Tensor) -> Tuple[str, List[BlockPatches]]:
    """Run ``images`` through the model with source tracing on; (method name, per-block patch maps)."""
    device = next(model.parameters()).device
    with tracing_sources(model), torch.no_grad():
        model(images.to(device))
        cfg = get_config(model)
        state = get_state(model)
        maps = block_patch_maps(state.block_sources, cfg.num_prefix_tokens, cfg.method, cfg.schedule)
    return cfg.method.name, maps


def default_blocks(depth: int, count: int = 4) -> List[int]:
    """``count`` block indices spread evenly over the depth, the last block always among them."""
    if depth <= count:
        return list(range(depth))
    return sorted({round(i * (depth - 1) / (count - 1)) for i in range(count)})


# --- drawing -------------------------------------------------------------------------------------

def display_images(images: Tensor, mean: Optional[Sequence[float]] = None,
                   std: Optional[Sequence[float]] = None) -> np.ndarray:
    """(N, C, H, W) model inputs as (N, H, W, 3) RGB in [0, 1]; grayscale is repeated into gray RGB.

    With ``mean``/``std`` the normalisation is undone; without, each image is stretched to [0, 1].
    """
    x = images.detach().float().cpu()
    channels = x.shape[1]
    if mean is not None and std is not None:
        as_column = lambda values: torch.tensor(values, dtype=x.dtype).view(1, -1, 1, 1)  # noqa: E731
        x = x * as_column(std) + as_column(mean)
    else:
        low = x.amin(dim=(1, 2, 3), keepdim=True)
        high = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - low) / (high - low).clamp(min=1e-8)
    x = x.clamp(0, 1)
    if channels == 1:
        x = x.expand(-1, 3, -1, -1)
    elif channels != 3:
        x = x[:, :3] if channels > 3 else torch.cat([x, x[:, -1:].expand(-1, 3 - channels, -1, -1)], dim=1)
    return x.permute(0, 2, 3, 1).numpy()


def group_colors(count: int) -> np.ndarray:
    """``count`` saturated RGB colours, neighbouring indices far apart in hue (golden-ratio steps)."""
    hues = (np.arange(count) * 0.618033988749895) % 1.0
    hsv = np.stack([hues, np.full(count, 0.85), np.where(np.arange(count) % 2 == 0, 0.95, 0.7)], axis=-1)
    return hsv_to_rgb(hsv)


def _enlarge(array: np.ndarray, scale: int) -> np.ndarray:
    return array.repeat(scale, axis=0).repeat(scale, axis=1)


def _owner_edges(owner_px: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` of a pixel that belongs to another token (inner outlines of each token)."""
    edge = np.zeros(owner_px.shape, dtype=bool)
    for shift in range(1, width + 1):
        edge[shift:] |= owner_px[shift:] != owner_px[:-shift]
        edge[:-shift] |= owner_px[:-shift] != owner_px[shift:]
        edge[:, shift:] |= owner_px[:, shift:] != owner_px[:, :-shift]
        edge[:, :-shift] |= owner_px[:, :-shift] != owner_px[:, shift:]
    return edge


def render_patches(image: np.ndarray, owner: np.ndarray, status: np.ndarray, grid: Tuple[int, int],
                   scale: int) -> np.ndarray:
    """One panel: ``image`` (H, W, 3) enlarged ``scale`` times, with what became of each patch drawn in.

    owner, status: (P,) for the grid's P = grid_h * grid_w patches, row-major.
    """
    height, width = image.shape[:2]
    grid_h, grid_w = grid
    patch_h, patch_w = height // grid_h, width // grid_w
    image = image[:grid_h * patch_h, :grid_w * patch_w]  # timm drops a remainder the same way
    to_pixels = lambda a: a.reshape(grid_h, grid_w).repeat(patch_h, axis=0).repeat(patch_w, axis=1)  # noqa: E731
    owner_px, status_px = to_pixels(owner), to_pixels(status)

    panel = image.copy()
    merged = status_px == MERGED
    if merged.any():  # every token's pixels filled with the token's mean colour
        labels = owner_px.ravel()
        counts = np.bincount(labels, minlength=labels.max() + 1).clip(min=1)
        means = np.stack([np.bincount(labels, weights=image[..., c].ravel(), minlength=counts.size) / counts
                          for c in range(3)], axis=-1)
        panel = means[owner_px]
    dropped = status_px == DROPPED
    panel[dropped] = DIM_KEEP * panel[dropped] + (1 - DIM_KEEP) * DIM_TOWARDS
    fused = status_px == FUSED
    panel[fused] = (1 - FUSED_ALPHA) * panel[fused] + FUSED_ALPHA * FUSED_TINT

    panel, owner_big, status_big = _enlarge(panel, scale), _enlarge(owner_px, scale), _enlarge(status_px, scale)
    line = max(1, round(scale * min(patch_h, patch_w) / 12))
    rows, cols = np.indices(owner_big.shape)
    hatch = ((rows + cols) // line) % 6 == 0
    panel[(status_big == FUSED) & hatch] = FUSED_TINT * 0.7
    edges = _owner_edges(owner_big, line) & (owner_big >= 0)
    group_edges = edges & (status_big == MERGED)
    panel[edges & ~group_edges] = 0.5 * panel[edges & ~group_edges] + 0.5 * EDGE_GRAY
    panel[group_edges] = group_colors(int(owner_big.max()) + 1)[owner_big[group_edges]]
    return panel.clip(0, 1)


def display_scale(height: int) -> int:
    """Nearest-neighbour enlargement that makes an image at least ``MIN_PANEL_PIXELS`` tall."""
    return max(1, math.ceil(MIN_PANEL_PIXELS / height))


@dataclass
class GridColumn:
    """One column of the grid: its title and one panel (H, W, 3) per image row."""

    title: str
    panels: List[np.ndarray]


def patch_columns(model: torch.nn.Module, images: Tensor, shown: np.ndarray, blocks: Optional[Sequence[int]],
                  label: Optional[str] = None) -> List[GridColumn]:
    """The grid columns for one model: one per chosen block (default: ``default_blocks``).

    Titles name the method; a ``label`` other than the method's name comes first, on its own line.
    """
    name, maps = trace_patches(model, images)
    heading = name if label is None or label == name else f"{label}\n{name}"
    depth = len(maps)
    blocks = default_blocks(depth) if blocks is None else list(blocks)
    for block in blocks:
        if not -depth <= block < depth:
            raise ValueError(f"blocks: block {block} is outside 0..{depth - 1}")
    grid = patch_grid(images.shape[2], images.shape[3], maps[0].owner.shape[1])
    scale = display_scale(shown.shape[1])
    columns = []
    for block in blocks:
        patches = maps[block]
        title = f"{heading}\nblock {patches.block + 1}/{depth}\n{patches.tokens_left} tokens"
        panels = [render_patches(shown[i], patches.owner[i].numpy(), patches.status[i].numpy(), grid, scale)
                  for i in range(shown.shape[0])]
        columns.append(GridColumn(title, panels))
    return columns


def patch_grid(height: int, width: int, num_patches: int) -> Tuple[int, int]:
    """(rows, columns) of square patches that cut a ``height`` x ``width`` image into the ``num_patches`` patches
    a model traced (any family: the trace says how many patches there are, the image how they lie); the smallest
    patch that does so (a remainder beyond the grid is dropped, as the patch embeddings drop it)."""
    for patch in range(1, min(height, width) + 1):
        rows, cols = height // patch, width // patch
        if rows * cols == num_patches:
            return rows, cols
        if rows * cols < num_patches:
            break
    raise ValueError(f"images: a {height}x{width} image cannot be cut into the {num_patches} square patches the "
                     f"model traced")


def build_grid_figure(shown: np.ndarray, columns: Sequence[GridColumn], caption: str = CAPTION) -> Figure:
    """One row per image: the image, then the columns' panels; titles above the first row."""
    rows, cols = shown.shape[0], 1 + len(columns)
    height = rows * PANEL_INCHES + TITLE_INCHES + CAPTION_INCHES
    figure = Figure(figsize=(cols * PANEL_INCHES, height), dpi=DPI)
    FigureCanvasAgg(figure)
    figure.subplots_adjust(left=0.01, right=0.99, wspace=0.06, hspace=0.06,
                           top=1 - TITLE_INCHES / height, bottom=CAPTION_INCHES / height)
    axes = figure.subplots(rows, cols, squeeze=False)
    scale = display_scale(shown.shape[1])
    for row in range(rows):
        axes[row, 0].imshow(_enlarge(shown[row], scale), interpolation="nearest")
        for col, column in enumerate(columns, start=1):
            axes[row, col].imshow(column.panels[row], interpolation="nearest")
    axes[0, 0].set_title("image", fontsize=8)
    for col, column in enumerate(columns, start=1):
        axes[0, col].set_title(column.title, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    figure.text(0.5, CAPTION_INCHES / height / 2, caption, ha="center", va="center", fontsize=7)
    return figure


def save_token_grid_comparison(models: Mapping[str, torch.nn.Module], images: Tensor, path: str, *,
                               blocks: Optional[Sequence[int]] = None, mean: Optional[Sequence[float]] = None,
                               std: Optional[Sequence[float]] = None) -> str:
    """Like ``save_token_grid`` with the columns of several models (label -> patched model) side by side."""
    if not models:
        raise ValueError("models: give at least one model")
    shown = display_images(images, mean, std)
    columns = [column for label, model in models.items()
               for column in patch_columns(model, images, shown, blocks, label)]
    build_grid_figure(shown, columns).savefig(path, dpi=DPI)
    return path


def save_token_grid(model: torch.nn.Module, images: Tensor, path: str, *, blocks: Optional[Sequence[int]] = None,
                    mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> str:
    """Write a PNG grid of what ``model`` (patched or not) keeps of ``images`` (N, C, H, W) and return ``path``.

    One row per image: the image, then one column per block in ``blocks`` (0-based; default: a few
    spread over the depth and the last), titled with the method, the block and the tokens left.
    ``mean``/``std`` undo the input normalisation for display. The model's compression settings
    and train mode are left as they were.
    """
    shown = display_images(images, mean, std)
    build_grid_figure(shown, patch_columns(model, images, shown, blocks)).savefig(path, dpi=DPI)
    return path


# --- tokens left per block -----------------------------------------------------------------------

def tokens_per_block(method: str, num_tokens: int, depth: int, schedule: Schedule,
                     num_prefix_tokens: int = 1) -> List[int]:
    """Tokens entering the first block, then tokens leaving each block, for ``method`` and ``schedule``.

    Where a block reduces (after attention or after the MLP) does not change how many tokens leave it.
    """
    per_block = resolve_schedule(schedule, depth)
    # placed between attention and MLP, the MLP sees exactly the tokens that leave the block
    counts = token_counts(get_method(method), num_tokens, per_block, num_prefix_tokens, reduce_at="attn")
    return [num_tokens] + [n_mlp for _, n_mlp in counts]


def token_curves(num_tokens: int, depth: int, schedule: Schedule, num_prefix_tokens: int = 1,
                 method_names: Sequence[str] = METHOD_NAMES) -> Dict[str, List[int]]:
    """``tokens_per_block`` for each method name; methods with the same counts share one entry, labelled
    with their names joined by commas (so tk and tk_n, which always match, give one line)."""
    grouped: Dict[Tuple[int, ...], List[str]] = {}
    for name in method_names:
        counts = tuple(tokens_per_block(name, num_tokens, depth, schedule, num_prefix_tokens))
        grouped.setdefault(counts, []).append(name)
    return {", ".join(names): list(counts) for counts, names in grouped.items()}


def save_tokens_per_block_plot(path: str, num_tokens: int, depth: int, schedule: Schedule, *,
                               num_prefix_tokens: int = 1, method_names: Sequence[str] = METHOD_NAMES,
                               title: Optional[str] = None) -> str:
    """Plot tokens left vs. block index for each method and return ``path``.

    num_tokens: tokens entering the first block (patches + prefix tokens), e.g. 197 for ViT-S/16 at 224.
    """
    figure = Figure(figsize=(6.4, 4.0), dpi=DPI)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    markers = "osD^vP*X"
    curves = token_curves(num_tokens, depth, schedule, num_prefix_tokens, method_names)
    for index, (label, counts) in enumerate(curves.items()):
        ax.plot(range(depth + 1), counts, marker=markers[index % len(markers)], markersize=4, label=label)
    ax.set_xlabel("block (0 = tokens entering the first block)")
    ax.set_ylabel("tokens left (prefix tokens included)")
    ax.set_xticks(range(depth + 1))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{num_tokens} tokens, {depth} blocks, pool_k={schedule}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path
