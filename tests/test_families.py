"""Every method on transformers ViT / DeiT / DINOv2 (with registers) / CLIP vision models and OpenCLIP's
VisionTransformer, built small from configs with random weights (no downloads), checked against
``reference_families`` (each family's forward written out, one image at a time)."""
import math

import pytest
import torch
import transformers as T
from open_clip.transformer import VisionTransformer

from pruning import METHOD_NAMES
from pruning.flops import analytic_flops
from pruning.patch import apply_patch, get_state
from pruning.patch.hf import patch_token_mean
from reference_families import CONFIGS, DEPTH, FAMILIES, PATCHES, SIZES, make_model, output, reference_outputs
from family_checks import (SquareOutputs, assert_all_differ, assert_fused_path_forms_no_attention_matrix,
                           assert_nothing_removed_is_bit_identical, counted_flops, patched_and_expected)
from reference_vit import expected_token_counts

REDUCING = [m for m in METHOD_NAMES if m != "none"]
FUSING = ("evit", "evit_n", "n_wa", "a_wn")
SCHEDULE = [3, 5, 2, 4]


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --- the rules, on every family -------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["fused", "explicit"])
@pytest.mark.parametrize("method", REDUCING)
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_follow_the_rules(family, method, variant, images):
    """Fused attention at the method's own placement, the explicit N×N attention at the other one."""
    fused = variant == "fused"
    model = make_model(family, "sdpa" if fused else "eager")
    reduce_at = None if fused else ("block" if method == "tome" else "attn")
    got, expected = patched_and_expected(model, images, output, reference_outputs, method, SCHEDULE,
                                         reduce_at=reduce_at, fused_attn=fused)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_unpatched_reference_is_the_model(family, images):
    """Guards the reference: with nothing removed it computes what the library's model computes."""
    model = make_model(family)
    with torch.no_grad():
        torch.testing.assert_close(output(model, images), reference_outputs(model, images, "none", [0] * DEPTH),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["vit", "dinov2_reg", "open_clip"])
def test_tome_without_proportional_attention_follows_the_rules(family, images):
    model = make_model(family)
    expected = reference_outputs(model, images, "tome", [4] * DEPTH, prop_attn=False)
    apply_patch(model, "tome", 4, prop_attn=False)
    with torch.no_grad():
        torch.testing.assert_close(output(model, images), expected, atol=1e-4, rtol=0)


def test_the_methods_really_differ(images):
    with torch.no_grad():
        assert_all_differ({m: output(apply_patch(make_model("dinov2"), m, 5), images) for m in REDUCING})


# --- identities -----------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pool_k_zero_method_none_and_remove_patch_are_bit_identical(family, attn, images):
    assert_nothing_removed_is_bit_identical(make_model(family, attn), images, output, METHOD_NAMES)


@pytest.mark.parametrize("family", ["vit", "dinov2_reg", "open_clip"])
def test_patching_twice_replaces_the_first_patch(family, images):
    once, twice = make_model(family), make_model(family)
    apply_patch(once, "tk", 3)
    apply_patch(twice, "tome", 2)
    apply_patch(twice, "tk", 3)
    with torch.no_grad():
        assert torch.equal(output(once, images), output(twice, images))


# --- tokens and what is kept ----------------------------------------------------------------------

@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_per_block(family, method, images):
    num_prefix = CONFIGS[family][2]
    model = apply_patch(make_model(family), method, SCHEDULE)
    with torch.no_grad():
        output(model, images)
    assert get_state(model).tokens_per_block == expected_token_counts(method, PATCHES + num_prefix, SCHEDULE,
                                                                      num_prefix)


@pytest.mark.parametrize("method", REDUCING)
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_tokens_are_kept_first_and_sources_cover_the_patches(family, method, images):
    num_prefix = CONFIGS[family][2]
    model = apply_patch(make_model(family), method, 4, trace_source=True)
    with torch.no_grad():
        output(model, images)
    sources = get_state(model).block_sources
    assert len(sources) == DEPTH
    for source in sources:
        prefix_rows = source[:, :num_prefix, :]
        assert torch.equal(prefix_rows, torch.eye(source.shape[-1])[:num_prefix].expand_as(prefix_rows))
        assert source[:, num_prefix:, :num_prefix].sum() == 0
        carried = source.sum(dim=1)
        if method == "tome" or method in FUSING:
            assert torch.equal(carried, torch.ones_like(carried))
        else:
            assert carried.max() == 1


@pytest.mark.parametrize("family", ["dinov2", "dinov2_reg"])
def test_dinov2_mean_under_tome_is_the_mean_over_original_patches(family, images):
    """The documented pooling: a merged token counts once per patch it holds."""
    num_prefix = CONFIGS[family][2]
    model = apply_patch(make_model(family), "tome", 4, trace_source=True)
    captured = {}
    backbone = model.dinov2 if family == "dinov2" else model.dinov2_with_registers
    hook = backbone.register_forward_hook(lambda m, i, o: captured.update(tokens=o.last_hidden_state))
    with torch.no_grad():
        output(model, images)
    hook.remove()
    tokens, source = captured["tokens"], get_state(model).source
    owner = source[:, num_prefix:, num_prefix:].argmax(dim=1)  # the token holding each original patch
    per_patch = tokens[:, num_prefix:].gather(1, owner.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    torch.testing.assert_close(patch_token_mean(model, tokens), per_patch.mean(dim=1), atol=1e-5, rtol=0)


# --- attention paths, batches, gradients ----------------------------------------------------------

@pytest.mark.parametrize("method", ["tk", "evit", "a_wn", "tome"])
@pytest.mark.parametrize("family", ["vit", "deit", "dinov2_reg", "clip", "open_clip"])
def test_the_fused_path_never_forms_the_attention_matrix(family, method, images):
    assert_fused_path_forms_no_attention_matrix(make_model, output, family, method, images, DEPTH)


@pytest.mark.parametrize("family", ["vit", "clip", "open_clip"])
def test_one_switch_decides_the_attention_of_every_layer(family, images):
    """fused_attn=False on a model whose own layers run SDPA: the layers that reduce nothing materialise
    the attention too, so no layer runs a different kind of attention from the others."""
    schedule = [3, 0, 3, 0]  # 17 -> 14 -> 14 -> 11 tokens: only the last layer, which reduces nothing, sees 11
    fused = apply_patch(make_model(family, "sdpa"), "tk_n", schedule)
    with torch.no_grad(), SquareOutputs() as mode:
        expected = output(fused, images)
    assert mode.seen == []
    explicit = apply_patch(make_model(family, "sdpa"), "tk_n", schedule, fused_attn=False)
    with torch.no_grad(), SquareOutputs() as mode:
        got = output(explicit, images)
    assert any(shape[-1] == PATCHES + 1 - 6 for _, shape in mode.seen), mode.seen  # the last, k = 0, layer
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_independence(family, images):
    model = apply_patch(make_model(family), "evit", 3)
    with torch.no_grad():
        together = output(model, images)
        alone = torch.cat([output(model, images[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["tk", "tome"])
@pytest.mark.parametrize("family", ["vit", "deit", "dinov2", "clip", "open_clip"])
def test_train_mode_gradients_reach_the_blocks(family, method, images):
    model = apply_patch(make_model(family), method, 3).train()
    output(model, images).logsumexp(dim=-1).sum().backward()
    for name, param in model.named_parameters():
        if "layer" in name or "resblocks" in name:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_attention_masks_are_refused_while_compressing(images):
    model = apply_patch(make_model("vit_model"), "tk_n", 3)
    with pytest.raises(ValueError, match="^attention_mask:"):
        model(images, attention_mask=torch.ones(3, 1, 1, PATCHES + 1, dtype=torch.bool))


# --- refusals -------------------------------------------------------------------------------------

def test_unsupported_models_are_refused_in_one_line():
    cases = [
        (T.ViTForMaskedImageModeling(T.ViTConfig(intermediate_size=64, **SIZES)), "supported: ViTModel"),
        (VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=2,
                           attentional_pool=True, attn_pooler_heads=4, output_dim=32), "attn_pool"),
        (VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=2,
                           pool_type="avg"), "pool_type 'avg'"),
        (VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=2,
                           qk_norm=True), "ResidualAttentionBlock"),
        (torch.nn.Linear(2, 2), "timm VisionTransformer, a transformers ViT"),
    ]
    for model, words in cases:
        with pytest.raises(ValueError, match="^model:") as info:
            apply_patch(model, "tk", 1)
        message = str(info.value)
        assert words in message and "\n" not in message, message


@pytest.mark.parametrize("family", ["vit", "open_clip"])
def test_bad_arguments_name_the_argument(family):
    for kwargs, argument in [(dict(select_method="topk"), "select_method"), (dict(pool_k=[1, 2]), "pool_k"),
                             (dict(pool_k=-1), "pool_k"), (dict(reduce_at="mlp"), "reduce_at")]:
        with pytest.raises(ValueError, match=f"^{argument}:"):
            apply_patch(make_model(family), **kwargs)


# --- FLOPs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_analytic_flops_match_the_flop_counter(family, attn, images):
    model = make_model(family, attn)
    plain = analytic_flops(model)
    assert counted_flops(model, images, output) == plain
    cases = [("tk_n", "block"), ("evit_n", "attn"), ("tome", "attn")]
    if attn == "sdpa":  # the analytic count is the fused path's: the explicit one reads the class row off N×N
        cases += [("tk", "attn"), ("evit", "block"), ("a_wn", "attn")]
    for method, reduce_at in cases:
        apply_patch(model, method, SCHEDULE, reduce_at=reduce_at, fused_attn=attn == "sdpa")
        assert counted_flops(model, images, output) == analytic_flops(model) < plain, method


def test_flops_of_a_vit_b16_config():
    """ViT-B/16 (ViTConfig defaults): 24·N·d² + 4·N²·d per block, N = 197, d = 768, plus embedding and head."""
    model = T.ViTForImageClassification(T.ViTConfig(num_labels=1000))
    n, d = 197, 768
    expected = 12 * (24 * n * d * d + 4 * n * n * d) + 2 * 196 * 3 * 16 * 16 * d + 2 * d * 1000
    assert analytic_flops(model) == expected
    assert math.isclose(analytic_flops(model) / 1e9, 35.15, rel_tol=1e-3)


# --- the visualisation's trace --------------------------------------------------------------------

def test_visualisation_trace_works_on_other_families(images):
    from pruning.visualize import trace_patches

    for family in ("deit", "open_clip"):
        model = apply_patch(make_model(family), "evit", 4)
        name, maps = trace_patches(model, images)
        assert name == "evit" and len(maps) == DEPTH
        assert maps[0].owner.shape == (3, PATCHES)
