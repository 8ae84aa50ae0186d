"""Every method on the RoPE families: timm ``Eva`` (EVA-02 packed and separate projections, DINOv3 with registers,
RoPE-ViT axial and mixed) and transformers ``DINOv3ViTModel``, built small with random weights (no downloads),
checked against ``reference_rope`` (the rules written out one image at a time: each token keeps its original
patch's angles, prefix and fused tokens are not rotated, a merged token keeps its destination's)."""
import pytest
import timm
import torch
from timm.models.eva import Eva

from pruning import METHOD_NAMES
from pruning.flops import analytic_flops
from pruning.patch import apply_patch, get_config, get_state, remove_patch
from reference_rope import (DEPTH, FAMILIES, IMAGE, PATCH, make_model, num_prefix_of, output,
                            randomise, reference_outputs)
from family_checks import (SquareOutputs, assert_all_differ, assert_fused_path_forms_no_attention_matrix,
                           assert_nothing_removed_is_bit_identical, counted_flops, patched_and_expected)
from reference_vit import expected_token_counts

REDUCING = [m for m in METHOD_NAMES if m != "none"]
FUSING = ("evit", "evit_n", "n_wa", "a_wn")
SCHEDULE = [3, 5, 2, 4]
PATCHES = (IMAGE // PATCH) ** 2


@pytest.fixture
def images():
    return torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def _patched_and_expected(model, images, method, schedule, **kwargs):
    return patched_and_expected(model, images, output, reference_outputs, method, schedule, **kwargs)


# --- the rules ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["fused", "explicit"])
@pytest.mark.parametrize("method", REDUCING)
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_follow_the_rules(family, method, variant, images):
    """The fused path at the method's own placement; the explicit (N×N) path at the other one."""
    model = make_model(family, "sdpa" if variant == "fused" else "eager")
    kwargs = {}
    if variant == "explicit":
        kwargs = dict(reduce_at="block" if method == "tome" else "attn", fused_attn=False)
    got, expected = _patched_and_expected(model, images, method, SCHEDULE, **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_unpatched_reference_is_the_model(family, images):
    model = make_model(family)
    with torch.no_grad():
        torch.testing.assert_close(output(model, images), reference_outputs(model, images, "none", [0] * DEPTH),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["dinov3", "rope_mixed", "hf_dinov3"])
def test_the_carried_angles_matter(family, images):
    """Guards the tests: rotating each token by its slot instead of its original patch gives other outputs."""
    model = apply_patch(make_model(family), "tk_n", SCHEDULE)
    get_config(model).carry_positions = False  # the positions then stay the slots 0, 1, 2, ...
    with torch.no_grad():
        wrong = output(model, images)
    expected = reference_outputs(remove_patch(model), images, "tk_n", SCHEDULE)
    assert not torch.allclose(wrong, expected, atol=1e-3)


@pytest.mark.parametrize("family", ["eva02", "dinov3", "hf_dinov3"])
def test_tome_without_proportional_attention_follows_the_rules(family, images):
    got, expected = _patched_and_expected(make_model(family), images, "tome", [4] * DEPTH, prop_attn=False)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_dynamic_image_size_rotates_by_the_actual_grid():
    """DINOv3 computes its angles for the image's own grid (here 6 × 5 patches, not the 4 × 4 it was built for)."""
    model = make_model("dinov3")
    assert model.dynamic_img_size
    images = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(2))
    for method in ("tome", "evit", "tk_n"):
        got, expected = _patched_and_expected(model, images, method, [4] * DEPTH)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_a_full_size_dinov3_under_tome_follows_the_rules():
    """vit_small_patch16_dinov3 as timm builds it (random weights), ToMe r = 8, one 224 × 224 image."""
    torch.manual_seed(0)
    model = randomise(timm.create_model("vit_small_patch16_dinov3", pretrained=False))
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    got, expected = _patched_and_expected(model, image, "tome", [8] * len(model.blocks))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_the_methods_really_differ(images):
    with torch.no_grad():
        assert_all_differ({m: output(apply_patch(make_model("dinov3"), m, 5), images) for m in REDUCING})


# --- pooling --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["eva02", "dinov3"])
def test_average_pooling_under_tome_is_the_mean_over_original_patches(family, images):
    model = apply_patch(make_model(family), "tome", 4, trace_source=True)
    num_prefix = num_prefix_of(model)
    captured = {}
    hook = model.norm.register_forward_hook(lambda m, i, o: captured.update(tokens=o))
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(images), pre_logits=True)
    hook.remove()
    tokens, source = captured["tokens"], get_state(model).source
    owner = source[:, num_prefix:, num_prefix:].argmax(dim=1)  # the token holding each original patch
    per_patch = tokens[:, num_prefix:].gather(1, owner.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    torch.testing.assert_close(pooled, model.fc_norm(per_patch.mean(dim=1)), atol=1e-5, rtol=0)


# --- identities -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_k_zero_method_none_and_remove_patch_are_bit_identical(family, images):
    model = make_model(family)
    model_class = type(model)
    assert_nothing_removed_is_bit_identical(model, images, output, METHOD_NAMES)
    assert type(model) is model_class


@pytest.mark.parametrize("family", ["eva02", "rope_mixed", "hf_dinov3"])
def test_patching_twice_replaces_the_first_patch(family, images):
    once, twice = make_model(family), make_model(family)
    apply_patch(once, "evit", 3)
    apply_patch(twice, "tome", 2)
    apply_patch(twice, "evit", 3)
    with torch.no_grad():
        assert torch.equal(output(once, images), output(twice, images))


# --- tokens, sources ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", REDUCING)
@pytest.mark.parametrize("family", ["dinov3", "rope_axial", "hf_dinov3"])
def test_tokens_per_block_and_sources_keep_the_prefix_first(family, method, images):
    model = apply_patch(make_model(family), method, SCHEDULE, trace_source=True)
    num_prefix = num_prefix_of(model)
    with torch.no_grad():
        output(model, images)
    state = get_state(model)
    assert state.tokens_per_block == expected_token_counts(method, PATCHES + num_prefix, SCHEDULE, num_prefix)
    assert len(state.block_sources) == DEPTH
    for source in state.block_sources:
        prefix_rows = source[:, :num_prefix, :]
        assert torch.equal(prefix_rows, torch.eye(source.shape[-1])[:num_prefix].expand_as(prefix_rows))
        assert source[:, num_prefix:, :num_prefix].sum() == 0
        carried = source.sum(dim=1)
        if method == "tome" or method in FUSING:
            assert torch.equal(carried, torch.ones_like(carried))
        else:
            assert carried.max() == 1


# --- attention paths, FLOPs -----------------------------------------------------------------------

class _SquareSoftmax(SquareOutputs):
    """A softmax over (..., n, n): an attention matrix (the rotation's own square tensors are not)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        seen = len(self.seen)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if "softmax" not in str(func):
            del self.seen[seen:]
        return out


@pytest.mark.parametrize("method", ["tk", "evit", "tome"])
@pytest.mark.parametrize("family", ["eva02", "rope_mixed", "hf_dinov3"])
def test_the_fused_path_never_forms_the_attention_matrix(family, method, images):
    assert_fused_path_forms_no_attention_matrix(make_model, output, family, method, images, DEPTH, _SquareSoftmax)


@pytest.mark.parametrize("family", FAMILIES)
def test_analytic_flops_match_the_flop_counter(family, images):
    model = make_model(family)
    plain = analytic_flops(model)
    assert counted_flops(model, images, output) == plain
    for method, reduce_at in [("tk_n", "block"), ("evit_n", "attn"), ("tome", "attn"), ("tk", "attn"),
                              ("evit", "block")]:
        apply_patch(model, method, SCHEDULE, reduce_at=reduce_at)
        assert counted_flops(model, images, output) == analytic_flops(model) < plain, method


@pytest.mark.parametrize("family", ["eva02", "hf_dinov3"])
def test_train_mode_gradients_reach_the_blocks(family, images):
    model = apply_patch(make_model(family), "tome", 3).train()
    output(model, images).logsumexp(dim=-1).sum().backward()
    for name, param in model.named_parameters():
        if "blocks" in name or ".layer." in name:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name


# --- refusals -------------------------------------------------------------------------------------

def _small_eva(**kwargs):
    return Eva(img_size=IMAGE, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2, num_classes=5,
               use_rot_pos_emb=True, **kwargs)


def test_what_the_rules_cannot_serve_is_refused_in_one_line():
    checkpointed = _small_eva()
    checkpointed.set_grad_checkpointing(True)
    cases = [
        (_small_eva(use_post_norm=True), "post-norm"),
        (checkpointed, "gradient checkpointing"),
        (_small_eva(global_pool="map"), "global_pool 'map'"),
        (_small_eva(global_pool="max"), "global_pool 'max'"),
        (_small_eva(attn_type="rope", qkv_fused=False, num_kv_heads=1), "grouped-query"),
    ]
    for model, words in cases:
        with pytest.raises(ValueError, match="^model:") as info:
            apply_patch(model, "tome", 1)
        message = str(info.value)
        assert words in message and "\n" not in message, message


def test_attention_masks_are_refused_while_compressing(images):
    model = apply_patch(make_model("eva02"), "tk_n", 3)
    with pytest.raises(ValueError, match="^attn_mask:"):
        model(images, attn_mask=torch.ones(PATCHES + 1, PATCHES + 1, dtype=torch.bool))


def test_attention_scores_are_refused_without_a_class_token(images):
    model = _small_eva(class_token=False, global_pool="avg").eval()
    with pytest.raises(ValueError, match="^select_method: 'tk' reads class-token attention, but this model has no "
                                         "class token; methods that work without one: tk_n, evit_n, tome, random, "
                                         "low_norm$"):
        apply_patch(model, "tk", 2)
    apply_patch(model, "tome", 2)
    with torch.no_grad():
        assert model(images).shape == (3, 5)


@pytest.mark.parametrize("family", ["eva02", "hf_dinov3"])
def test_bad_arguments_name_the_argument(family):
    for kwargs, argument in [(dict(select_method="topk"), "select_method"), (dict(pool_k=[1, 2]), "pool_k"),
                             (dict(reduce_at="mlp"), "reduce_at")]:
        with pytest.raises(ValueError, match=f"^{argument}:"):
            apply_patch(make_model(family), **kwargs)

