"""Models without a class token: transformers' SigLIP and SigLIP 2 vision models (an attention-pool head over
all tokens) and timm's MAP-head ViT, against the independent references (``reference_families``,
``reference_vit``): the methods that need no class token, both placements, fused and explicit attention; the
pool head weighing merged tokens by size; refusals; identities; FLOPs."""
import pytest
import timm
import torch

import pruning.models  # noqa: F401  (registers the small models)
from pruning import METHODS, get_method
from pruning.flops import analytic_flops, model_shape
from pruning.patch import apply_patch, get_config, get_state
from reference_families import (CONFIGS_WITHOUT_CLASS_TOKEN, DEPTH, PATCHES, make_model, naflex_inputs, output,
                                reference_outputs)
from engine.measure import FLOP_FORMULAS
from family_checks import (assert_all_differ, assert_fused_path_forms_no_attention_matrix,
                           assert_nothing_removed_is_bit_identical, counted_flops, patched_and_expected)
from reference_vit import expected_token_counts, reference_logits

FAMILIES = list(CONFIGS_WITHOUT_CLASS_TOKEN)
WORKING = [name for name, m in METHODS.items() if m.reduction != "none" and not m.needs_cls_attention]
REFUSED = [name for name, m in METHODS.items() if m.needs_cls_attention]
SCHEDULE = [3, 5, 2, 4]


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_the_method_lists_are_the_papers():
    assert WORKING == ["tk_n", "evit_n", "tome", "random", "low_norm"]
    assert REFUSED == ["tk", "evit", "n_wa", "a_wn"]


# --- the rules ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["fused", "explicit"])
@pytest.mark.parametrize("method", WORKING)
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_follow_the_rules(family, method, variant, images):
    """Fused attention at the method's own placement, the explicit N×N attention at the other one."""
    fused = variant == "fused"
    model = make_model(family, "sdpa" if fused else "eager")
    reduce_at = None if fused else ("block" if method == "tome" else "attn")
    got, expected = patched_and_expected(model, images, output, reference_outputs, method, SCHEDULE,
                                         reduce_at=reduce_at, fused_attn=fused)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_unpatched_reference_is_the_model(family, attn, images):
    model = make_model(family, attn)
    with torch.no_grad():
        torch.testing.assert_close(output(model, images), reference_outputs(model, images, "none", [0] * DEPTH),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_pool_head_weighs_merged_tokens_by_size(family, images):
    """With proportional attention the pool adds log(size) to its logits, as the blocks do; without it the pool
    reads every token once. Either rule, applied where the other is meant, misses by far more than the tolerance."""
    model = make_model(family)
    weighted = reference_outputs(model, images, "tome", [4] * DEPTH)
    unweighted = reference_outputs(model, images, "tome", [4] * DEPTH, prop_attn=False)
    with torch.no_grad():
        got = output(apply_patch(model, "tome", 4), images)
        torch.testing.assert_close(got, weighted, atol=1e-4, rtol=0)
        assert not torch.allclose(got, unweighted, atol=1e-3)
        torch.testing.assert_close(output(apply_patch(model, "tome", 4, prop_attn=False), images), unweighted,
                                   atol=1e-4, rtol=0)


def test_the_methods_really_differ(images):
    with torch.no_grad():
        assert_all_differ({m: output(apply_patch(make_model("siglip2"), m, 5), images) for m in WORKING})


# --- timm's MAP head: the same rule ---------------------------------------------------------------

@pytest.mark.parametrize("reduce_at", ["attn", "block"])
@pytest.mark.parametrize("fused", [True, False])
def test_timm_map_head_weighs_merged_tokens_by_size(reduce_at, fused):
    model = timm.create_model("vit_nano_map_patch4_28").eval()
    with torch.no_grad():  # a trained-like pool: its latent query far from zero, so the weighting shows
        model.attn_pool.latent.normal_(std=1.0)
    images = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    weighted = reference_logits(model, images, "tome", [6] * 6, reduce_at)
    unweighted = reference_logits(model, images, "tome", [6] * 6, reduce_at, prop_attn=False)
    apply_patch(model, "tome", 6, reduce_at=reduce_at, fused_attn=fused)
    with torch.no_grad():
        got = model(images)
    torch.testing.assert_close(got, weighted, atol=1e-4, rtol=0)
    assert not torch.allclose(got, unweighted, atol=1e-3)


def test_timm_map_flops_count_the_pool_head():
    model = timm.create_model("vit_nano_map_patch4_28").eval()
    images = torch.randn(2, 1, 28, 28)

    def counted():
        with torch.utils.flop_counter.FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
            model(images)
        return counter.get_total_flops() / images.shape[0]

    plain = analytic_flops(model)
    assert model_shape(model).pool_token_flops > 0 and counted() == plain
    for method, reduce_at in [("tk_n", "block"), ("evit_n", "attn"), ("tome", "attn"), ("tome", "block")]:
        apply_patch(model, method, 5, reduce_at=reduce_at)
        assert counted() == analytic_flops(model) < plain, (method, reduce_at)


# --- refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", REFUSED)
@pytest.mark.parametrize("family", FAMILIES + ["timm_map"])
def test_class_token_attention_is_refused_in_one_line(family, method):
    model = timm.create_model("vit_nano_map_patch4_28") if family == "timm_map" else make_model(family)
    with pytest.raises(ValueError) as info:
        apply_patch(model, method=method, schedule=2)
    message = str(info.value)
    assert message.startswith(f"method: {method!r}") and "no class token" in message and "\n" not in message
    assert message.endswith(", ".join(WORKING))  # the working methods, controls included, from the table


def test_methods_for_lists_what_apply_patch_takes():
    from pruning import METHOD_NAMES
    from pruning.patch import methods_for

    for model in (make_model("siglip"), make_model("siglip2"), timm.create_model("vit_nano_map_patch4_28")):
        assert methods_for(model) == ("none", *WORKING)
        for method in METHOD_NAMES:
            if method in methods_for(model):
                apply_patch(model, method, 1)
            else:
                with pytest.raises(ValueError, match="no class token"):
                    apply_patch(model, method, 1)
    assert methods_for(make_model("vit")) == methods_for(timm.create_model("vit_nano_patch4_28")) == METHOD_NAMES
    assert methods_for(make_model("open_clip")) == METHOD_NAMES


def test_a_padded_siglip2_batch_is_refused_in_one_line_while_compressing(images):
    model = make_model("siglip2")
    pixel_values, mask, shapes = naflex_inputs(images, 8)
    mask[1, -3:] = 0  # the second image is padded
    with torch.no_grad():
        own = model(pixel_values, mask, shapes).pooler_output
        apply_patch(model, "tk_n", 0)  # compressing nothing: the model's own forward, mask and all
        assert torch.equal(model(pixel_values, mask, shapes).pooler_output, own)
        apply_patch(model, "tk_n", 2)
        with pytest.raises(ValueError, match="^pixel_attention_mask: the batch is padded") as info:
            model(pixel_values, mask, shapes)
    assert "\n" not in str(info.value)


# --- identities, tokens, sources ------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_k_zero_none_and_remove_patch_are_bit_identical(family, attn, images):
    model = make_model(family, attn)
    assert_nothing_removed_is_bit_identical(model, images, output, WORKING)
    assert get_config(model.head.attention) is None


@pytest.mark.parametrize("method", ["none"] + WORKING)
@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_per_block(family, method, images):
    model = apply_patch(make_model(family), method, SCHEDULE)
    with torch.no_grad():
        output(model, images)
    assert get_state(model).tokens_per_block == expected_token_counts(method, PATCHES, SCHEDULE, num_prefix=0)


@pytest.mark.parametrize("method", WORKING)
@pytest.mark.parametrize("family", FAMILIES)
def test_sources_cover_the_patches(family, method, images):
    model = apply_patch(make_model(family), method, 4, trace_source=True)
    with torch.no_grad():
        output(model, images)
    sources = get_state(model).block_sources
    assert len(sources) == DEPTH and sources[0].shape[-1] == PATCHES
    for source in sources:
        carried = source.sum(dim=1)  # how many tokens hold each original patch
        if get_method(method).fuses or method == "tome":
            assert torch.equal(carried, torch.ones_like(carried))
        else:
            assert carried.max() == 1 and torch.equal(source.sum(dim=2), torch.ones(source.shape[:2]))


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_independence(family, images):
    model = apply_patch(make_model(family), "tome", 3)
    with torch.no_grad():
        together = output(model, images)
        alone = torch.cat([output(model, images[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


# --- attention paths, FLOPs -----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["tk_n", "evit_n", "tome"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_fused_path_never_forms_the_attention_matrix(family, method, images):
    assert_fused_path_forms_no_attention_matrix(make_model, output, family, method, images, DEPTH)


def _embedding_flops(model, images):
    """flop_counter's count per image of the embeddings alone (SigLIP 2 resizes its position grid with a matrix
    product in some transformers versions, an interpolation in others: outside the analytic count)."""
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        if model.embeddings.patch_embedding.__class__ is torch.nn.Linear:
            pixel_values, _, shapes = naflex_inputs(images, model.config.patch_size)
            model.embeddings(pixel_values, shapes)
        else:
            model.embeddings(images)
    return counter.get_total_flops() / images.shape[0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_analytic_flops_match_the_flop_counter(family, attn, images):
    """Blocks, reductions and the attention-pool head (per token it reads) exactly; the embedding at least."""
    model = make_model(family, attn)
    embed = model_shape(model).embed_flops
    beyond_embedding = lambda: counted_flops(model, images, output) - _embedding_flops(model, images)  # noqa: E731
    assert _embedding_flops(model, images) >= embed > 0
    if family == "siglip":
        assert counted_flops(model, images, output) == analytic_flops(model)
    plain = analytic_flops(model)
    assert beyond_embedding() == plain - embed
    for method, reduce_at in [("tk_n", "block"), ("evit_n", "attn"), ("tome", "attn"), ("low_norm", "attn")]:
        apply_patch(model, method, SCHEDULE, reduce_at=reduce_at, fused_attn=attn == "sdpa")
        assert beyond_embedding() == analytic_flops(model) - embed < plain - embed, method
