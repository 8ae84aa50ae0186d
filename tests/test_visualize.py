"""The token visualisation: what became of each patch, and the pictures drawn from it."""
import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from pruning import METHODS
from pruning.patch import apply_patch, get_config, get_state
from pruning.visualize import (CAPTION_INCHES, DIM_KEEP, DIM_TOWARDS, DPI, DROPPED, FUSED, KEPT, MERGED,
                               PANEL_INCHES, TITLE_INCHES, block_patch_maps, build_grid_figure, default_blocks,
                               display_images, patch_columns, patch_grid, render_patches, save_token_grid,
                               save_token_grid_comparison, save_tokens_per_block_plot, token_curves,
                               tokens_per_block, trace_patches)

DEPTH = 4
PATCHES = 16  # 16x16 images, patch 4
PRUNING = ("tk", "tk_n")
FUSING = ("evit", "evit_n", "n_wa", "a_wn")


def tiny_vit(reg_tokens: int = 0, in_chans: int = 3) -> VisionTransformer:
    """A 4-block ViT on 16x16 images (16 patches) with spread-out embeddings, so the scores differ."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, in_chans=in_chans, num_classes=3, embed_dim=16,
                              depth=DEPTH, num_heads=2, reg_tokens=reg_tokens).eval()
    with torch.no_grad():
        model.cls_token.normal_()
        model.pos_embed.normal_()
    return model


def images(count: int = 3, in_chans: int = 3) -> torch.Tensor:
    return torch.randn(count, in_chans, 16, 16, generator=torch.Generator().manual_seed(1))


def traced_maps(method: str, schedule, reg_tokens: int = 0):
    """(per-block patch maps, per-block source maps, number of prefix tokens) of one traced forward."""
    model = apply_patch(tiny_vit(reg_tokens), method, schedule, trace_source=True)
    with torch.no_grad():
        model(images())
    state, prefix = get_state(model), get_config(model).num_prefix_tokens
    return block_patch_maps(state.block_sources, prefix, METHODS[method], get_config(model).schedule), \
        [s.float() for s in state.block_sources], prefix


def patch_rows(source: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, N, P) bool: which original patches each token carries."""
    return source[:, :, prefix:] > 0.5


# --- what became of each patch -------------------------------------------------------------------

@pytest.mark.parametrize("reg_tokens", [0, 2])
@pytest.mark.parametrize("method", PRUNING)
def test_pruning_kept_and_dropped_partition_the_patches(method, reg_tokens):
    maps, sources, prefix = traced_maps(method, [3, 5, 2, 4], reg_tokens)
    dropped_before = torch.zeros(3, PATCHES, dtype=torch.bool)
    for patches, source in zip(maps, sources):
        carried = patch_rows(source, prefix).sum(dim=1)  # (B, P): tokens carrying each patch
        kept, dropped = patches.status == KEPT, patches.status == DROPPED
        assert torch.equal(kept | dropped, torch.ones_like(kept)) and not (kept & dropped).any()
        assert torch.equal(carried, kept.long())  # each kept patch exactly once, each dropped patch nowhere
        assert torch.equal(kept.sum(dim=1), torch.full((3,), patches.tokens_left - prefix))
        assert (dropped_before <= dropped).all()  # a pruned patch never comes back
        dropped_before = dropped
        for row in range(3):  # each kept patch is its own token, right after the prefix tokens
            owners = patches.owner[row][kept[row]]
            assert owners.unique().numel() == owners.numel() and owners.min() >= prefix
            assert (patches.owner[row][dropped[row]] == -1).all()


@pytest.mark.parametrize("method", FUSING)
def test_fused_token_holds_exactly_the_dropped_patches(method):
    schedule = [5, 0, 1, 6]  # a block that reduces nothing, and one that drops a single token
    maps, sources, prefix = traced_maps(method, schedule)
    before = patch_rows(torch.eye(prefix + PATCHES).expand(3, -1, -1), prefix)  # tokens entering block 0
    fused_patches = torch.zeros(3, PATCHES, dtype=torch.bool)
    for patches, source, k in zip(maps, sources, schedule):
        rows = patch_rows(source, prefix)
        assert torch.equal(rows.sum(dim=1), torch.ones(3, PATCHES, dtype=torch.long))  # every patch exactly once
        assert not (patches.status == DROPPED).any()
        if k > 0:
            kept_rows, fused_row = rows[:, :-1], rows[:, -1]
            carried_by_kept = kept_rows.any(dim=1)
            assert torch.equal(fused_row, ~carried_by_kept)  # the fused token holds exactly the dropped patches
            # the kept tokens are tokens that entered the block, unchanged
            for row in range(3):
                entered = {tuple(r.tolist()) for r in before[row]}
                assert all(tuple(r.tolist()) in entered for r in kept_rows[row])
            fused_patches |= fused_row
        else:
            assert torch.equal(rows, before)  # nothing removed: the same tokens in the same order
        # FUSED: every patch that has gone into a fused token so far (fused tokens stay fused)
        assert torch.equal(patches.status == FUSED, fused_patches)
        assert torch.equal(patches.owner, rows.float().argmax(dim=1))
        before = rows
    assert maps[2].tokens_left == maps[1].tokens_left  # k = 1: keep n - 1, plus the fused token
    assert fused_patches.sum(dim=1).min() >= 1


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_tome_groups_partition_the_patches(reg_tokens):
    maps, sources, prefix = traced_maps("tome", [3, 4, 2, 5], reg_tokens)
    for patches, source in zip(maps, sources):
        rows = patch_rows(source, prefix)
        assert torch.equal(rows.sum(dim=1), torch.ones(3, PATCHES, dtype=torch.long))  # each patch in one group
        assert (patches.owner >= prefix).all()
        for row in range(3):
            owner = patches.owner[row]
            groups, sizes = owner.unique(return_counts=True)
            assert groups.numel() == patches.tokens_left - prefix  # every non-prefix token is a group
            for group, size in zip(groups, sizes):
                members = owner == group
                assert torch.equal(members, rows[row, group])
                expected = MERGED if size > 1 else KEPT
                assert (patches.status[row][members] == expected).all()
    assert (maps[-1].status == MERGED).any()


def test_no_compression_keeps_every_patch_as_its_own_token():
    maps, _, prefix = traced_maps("none", 0)
    for patches in maps:
        assert (patches.status == KEPT).all()
        assert torch.equal(patches.owner, torch.arange(prefix, prefix + PATCHES).expand(3, -1))


def test_maps_need_one_source_per_block():
    with pytest.raises(ValueError, match="block_sources"):
        block_patch_maps([torch.eye(17)[None]], 1, METHODS["tk"], [2, 2])


def test_tracing_leaves_the_model_as_it_was():
    model = apply_patch(tiny_vit(), "tk_n", 3).train()
    method, maps = trace_patches(model, images())
    assert method == "tk_n" and len(maps) == DEPTH
    assert get_config(model).trace_source is False and model.training
    plain = tiny_vit()
    method, maps = trace_patches(plain, images())  # unpatched: traced as "none", then restored
    assert method == "none" and get_config(plain) is None
    assert all((m.status == KEPT).all() for m in maps)


def test_default_blocks_spread_over_depth_and_end_with_the_last():
    assert default_blocks(12) == [0, 4, 7, 11]
    assert default_blocks(6) == [0, 2, 3, 5]
    assert default_blocks(3) == [0, 1, 2]


# --- drawing -------------------------------------------------------------------------------------

def test_display_images_undo_normalisation_and_show_grayscale_in_gray():
    raw = torch.rand(2, 1, 8, 8)
    shown = display_images((raw - 0.3) / 0.2, mean=(0.3,), std=(0.2,))
    assert shown.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(shown[..., 0], raw[:, 0].numpy(), atol=1e-6)
    assert np.array_equal(shown[..., 0], shown[..., 1]) and np.array_equal(shown[..., 0], shown[..., 2])
    stretched = display_images(torch.randn(1, 3, 8, 8))
    assert stretched.min() == 0.0 and stretched.max() == 1.0


def test_render_dims_dropped_patches_and_fills_groups_with_their_mean():
    image = np.random.default_rng(0).random((4, 4, 3))  # a 2x2 grid of 2x2-pixel patches
    pruned = render_patches(image, np.array([1, -1, 2, 3]), np.array([KEPT, DROPPED, KEPT, KEPT]), (2, 2), 8)
    assert pruned.shape == (32, 32, 3)  # enlarged 8 times; each patch is 16x16 display pixels
    np.testing.assert_allclose(pruned[20:28, 4:12], image[2:, :2].repeat(4, 0).repeat(4, 1))  # kept: the image
    dropped_inside = pruned[4:12, 20:28]  # patch (0, 1), away from the outlines
    np.testing.assert_allclose(dropped_inside, DIM_KEEP * image[:2, 2:].repeat(4, 0).repeat(4, 1)
                               + (1 - DIM_KEEP) * DIM_TOWARDS)
    merged = render_patches(image, np.array([1, 2, 1, 3]), np.array([MERGED, KEPT, MERGED, KEPT]), (2, 2), 8)
    group_mean = np.concatenate([image[:2, :2], image[2:, :2]]).reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(merged[12, 4], group_mean)  # inside the group, away from its outline
    np.testing.assert_allclose(merged[20, 20], image[2:, 2:].reshape(-1, 3).mean(axis=0))  # a lone patch: its mean


def test_token_grid_png_has_one_row_per_image_and_one_column_per_block(tmp_path):
    model = apply_patch(tiny_vit(), "evit", 3)
    path = save_token_grid(model, images(3), str(tmp_path / "grid.png"), blocks=[0, 3])
    width, height = Image.open(path).size
    assert width == round(3 * PANEL_INCHES * DPI)  # image + 2 blocks
    assert height == round((3 * PANEL_INCHES + TITLE_INCHES + CAPTION_INCHES) * DPI)  # 3 images


def test_grid_figure_axes_and_titles():
    model = apply_patch(tiny_vit(in_chans=1), "tome", 4)
    batch = images(2, in_chans=1)
    shown = display_images(batch)
    columns = patch_columns(model, batch, shown, blocks=None)
    figure = build_grid_figure(shown, columns)
    assert len(figure.axes) == 2 * (1 + DEPTH)  # default blocks of a 4-block model: all of them
    assert figure.axes[0].get_subplotspec().get_geometry()[:2] == (2, 1 + DEPTH)
    last_title = figure.axes[DEPTH].get_title()
    assert "tome" in last_title and f"block {DEPTH}/{DEPTH}" in last_title
    assert f"{tokens_per_block('tome', 17, DEPTH, 4)[-1]} tokens" in last_title


def test_comparison_puts_the_methods_side_by_side(tmp_path):
    models = {name: apply_patch(tiny_vit(), name, 3) for name in ("tk", "tk_n", "tome")}
    path = save_token_grid_comparison(models, images(2), str(tmp_path / "cmp.png"), blocks=[1, 3])
    width, height = Image.open(path).size
    assert width == round((1 + 3 * 2) * PANEL_INCHES * DPI)
    assert height == round((2 * PANEL_INCHES + TITLE_INCHES + CAPTION_INCHES) * DPI)


def test_blocks_out_of_range_are_refused(tmp_path):
    with pytest.raises(ValueError, match="blocks"):
        save_token_grid(apply_patch(tiny_vit(), "tk", 2), images(1), str(tmp_path / "x.png"), blocks=[DEPTH])


# --- tokens left per block -----------------------------------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
def test_tokens_per_block_match_a_real_forward(method):
    schedule = [3, 0, 9, 5]
    model = apply_patch(tiny_vit(reg_tokens=1), method, schedule)
    with torch.no_grad():
        model(images())
    assert tokens_per_block(method, 18, DEPTH, schedule, num_prefix_tokens=2) == \
        [18] + get_state(model).tokens_per_block


def test_token_curves_share_lines_for_identical_counts(tmp_path):
    curves = token_curves(197, 12, 10)
    assert set(curves) == {"none", "tk, tk_n, tome, random, low_norm", "evit, evit_n, n_wa, a_wn"}
    assert curves["tk, tk_n, tome, random, low_norm"][-1] == 197 - 12 * 10
    assert curves["evit, evit_n, n_wa, a_wn"][1] == 197 - 10 + 1
    path = save_tokens_per_block_plot(str(tmp_path / "tokens.png"), 197, 12, 10)
    assert Image.open(path).size == (640, 400)


# --- any family: the grid read off the trace -----------------------------------------------------

@pytest.mark.parametrize("height, width, patches, grid", [(16, 16, 16, (4, 4)), (32, 32, 16, (4, 4)),
                                                          (30, 30, 49, (7, 7)), (224, 224, 196, (14, 14)),
                                                          (32, 16, 8, (4, 2))])
def test_the_patch_grid_is_read_from_the_image_and_the_traced_patches(height, width, patches, grid):
    assert patch_grid(height, width, patches) == grid


def test_an_image_no_square_patch_cuts_as_traced_is_refused():
    with pytest.raises(ValueError, match="^images: a 16x16 image cannot be cut into the 15 square patches"):
        patch_grid(16, 16, 15)


def test_a_model_without_class_token_is_drawn(tmp_path):
    """transformers' SigLIP (no prefix token, 16 patches of 8 px): every patch is drawn, as traced."""
    from reference_families import make_model

    model = apply_patch(make_model("siglip"), "tome", 3)
    batch = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    name, maps = trace_patches(model, batch)
    assert name == "tome" and len(maps) == DEPTH and maps[0].owner.shape == (2, 16)
    path = save_token_grid(model, batch, str(tmp_path / "siglip.png"), blocks=[0, 3])
    assert Image.open(path).size == (round(3 * PANEL_INCHES * DPI),
                                     round((2 * PANEL_INCHES + TITLE_INCHES + CAPTION_INCHES) * DPI))
