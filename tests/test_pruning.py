"""The token compression library, specified by its behaviour on small timm ViTs."""
import pytest
import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

from pruning import METHOD_NAMES, get_method
from pruning.core.merging import first_non_prefix, in_token_order
from pruning.core.reduction import weighted_token_sum
from pruning.core.scoring import head_average, token_norm
from pruning.flops import analytic_flops
from pruning.patch import apply_patch, get_config, get_state, remove_patch
from pruning.schedules import keep_rate_schedule, matched_flops_schedule
from reference_vit import expected_token_counts, kept_ids, reference_logits

REDUCING = [m for m in METHOD_NAMES if m != "none"]
DETERMINISTIC = [m for m in REDUCING if not get_method(m).stochastic]  # random: an image's draw depends on the batch
FUSING = ("evit", "evit_n", "n_wa", "a_wn")
DEPTH = 4


def make_vit(seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(img_size=32, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=DEPTH, num_heads=4)
    kwargs.update(overrides)
    model = VisionTransformer(**kwargs).eval()
    with torch.no_grad():  # timm's small initial values would make the methods' logits nearly equal
        if model.cls_token is not None:
            model.cls_token.normal_(std=1.0)
        model.pos_embed.normal_(std=1.0)
        model.head.weight.normal_(std=1.0)
    return model


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --- exact rules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("reduce_at", ["block", "attn"])
@pytest.mark.parametrize("method", REDUCING)
def test_logits_follow_the_rules(method, reduce_at, images):
    """The reference applies each rule; for random, the rule once its draw is known: the tokens the model kept
    (read from its source maps) are kept."""
    model = make_vit()
    schedule = [9, 20, 5, 30]
    stochastic = get_method(method).stochastic
    apply_patch(model, select_method=method, pool_k=schedule, reduce_at=reduce_at, trace_source=stochastic)
    with torch.no_grad():
        got = model(images)
    kept = kept_ids(get_state(model).block_sources) if stochastic else None
    expected = reference_logits(remove_patch(model), images, method, schedule, reduce_at, kept=kept)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_tome_without_proportional_attention_follows_the_rules(images):
    model = make_vit()
    expected = reference_logits(model, images, "tome", [12] * DEPTH, prop_attn=False)
    apply_patch(model, "tome", 12, prop_attn=False)
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected, atol=1e-4, rtol=0)


def test_rules_hold_with_register_tokens(images):
    model = make_vit(reg_tokens=3)
    for method in ("tk", "evit_n", "tome"):
        expected = reference_logits(model, images, method, [10] * DEPTH)
        apply_patch(model, method, 10)
        with torch.no_grad():
            torch.testing.assert_close(model(images), expected, atol=1e-4, rtol=0)


class GatedAttention(Attention):
    """timm's attention with its sigmoid output gate on (VisionTransformer builds its attention by class)."""

    def __init__(self, *args, depth=0, **kwargs):
        super().__init__(*args, gated=True, **kwargs)


ATTENTION_OPTIONS = {  # the optional parts of timm's block, which the layout reads
    "qk_norm+attn_norm+layer_scale": dict(qk_norm=True, scale_attn_norm=True, init_values=0.5),
    "gate": dict(attn_layer=GatedAttention),
}


def make_vit_with(option, seed=0):
    model = make_vit(seed, **ATTENTION_OPTIONS[option])
    with torch.no_grad():  # the norms and layer scales away from their identity-like initial values
        for name, param in model.blocks.named_parameters():
            if name.endswith(("norm.weight", "norm.bias", "gamma")):
                param.add_(0.5 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("reduce_at", ["block", "attn"])
@pytest.mark.parametrize("method", REDUCING)
@pytest.mark.parametrize("option", ATTENTION_OPTIONS)
def test_attention_options_follow_the_rules(option, method, reduce_at, fused_attn, images):
    """As ``test_logits_follow_the_rules``, with timm's optional attention parts on (random: the tokens the model
    drew are kept by the reference)."""
    model = make_vit_with(option)
    schedule = [9, 20, 5, 30]
    stochastic = get_method(method).stochastic  # random: the reference keeps what the model drew
    apply_patch(model, method, schedule, reduce_at=reduce_at, fused_attn=fused_attn, trace_source=stochastic)
    with torch.no_grad():
        got = model(images)
    kept = kept_ids(get_state(model).block_sources) if stochastic else None
    expected = reference_logits(remove_patch(model), images, method, schedule, reduce_at, kept=kept)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("option", ATTENTION_OPTIONS)
def test_attention_options_k_zero_and_remove_patch_are_bit_identical(option, fused_attn, images):
    model = make_vit_with(option)
    for block in model.blocks:
        block.attn.fused_attn = fused_attn
    with torch.no_grad():
        plain = model(images)
        for method in ("tk", "tome"):
            apply_patch(model, method, 0, fused_attn=fused_attn)
            assert torch.equal(model(images), plain)
            apply_patch(model, method, 4, fused_attn=fused_attn)
            assert not torch.allclose(model(images), plain)
            remove_patch(model)
            assert torch.equal(model(images), plain)


def test_method_and_schedule_keywords_are_the_seeds_select_method_and_pool_k(images):
    seed = apply_patch(make_vit(), select_method="evit", pool_k=[3, 0, 5, 2], reduce_at="attn")
    library = apply_patch(make_vit(), method="evit", schedule=[3, 0, 5, 2], reduce_at="attn")
    positional = apply_patch(make_vit(), "evit", [3, 0, 5, 2], reduce_at="attn")
    assert get_config(library).method.name == "evit" and get_config(library).schedule == [3, 0, 5, 2]
    with torch.no_grad():
        assert torch.equal(library(images), seed(images)) and torch.equal(positional(images), seed(images))
    assert get_config(apply_patch(make_vit())).method.name == "tk_n"  # the defaults: tk_n, 10 per block
    assert get_config(apply_patch(make_vit())).schedule == [10] * DEPTH


@pytest.mark.parametrize("kwargs, argument", [
    (dict(method="topk"), "method"),
    (dict(schedule=-1), "schedule"),
    (dict(schedule=[1, 2]), "schedule"),
    (dict(method="tk", select_method="tk_n"), "method"),
    (dict(schedule=1, pool_k=2), "schedule"),
])
def test_errors_name_the_keyword_given(kwargs, argument):
    with pytest.raises(ValueError, match=f"^{argument}:"):
        apply_patch(make_vit(), **kwargs)
    with pytest.raises(ValueError, match="^method:.*class token"):
        apply_patch(make_vit(class_token=False, global_pool="avg"), method="tk")


def test_the_methods_really_differ(images):
    """Guards the rule tests: each criterion and each fusion changes the result."""
    outputs = {}
    for method in REDUCING:
        model = apply_patch(make_vit(), method, 20)
        with torch.no_grad():
            outputs[method] = model(images)
    for a in REDUCING:
        for b in REDUCING:
            if a < b:
                assert not torch.allclose(outputs[a], outputs[b], atol=1e-4), (a, b)


# --- token counts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("reduce_at", ["block", "attn"])
@pytest.mark.parametrize("pool_k", [0, 1, 7, [0, 30, 2, 16], [64, 64, 64, 64]])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_tokens_per_block(method, pool_k, reduce_at, images):
    model = apply_patch(make_vit(), method, pool_k, reduce_at=reduce_at)
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.shape[1])) for b in model.blocks]
    with torch.no_grad():
        model(images)
    schedule = pool_k if isinstance(pool_k, list) else [pool_k] * DEPTH
    assert seen == expected_token_counts(method, 65, schedule)
    assert get_state(model).tokens_per_block == seen
    for h in hooks:
        h.remove()


def test_k_larger_than_the_tokens_left_keeps_two():
    model = apply_patch(make_vit(), "tk_n", [100, 0, 0, 0])
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert get_state(model).tokens_per_block == [2, 2, 2, 2]


def test_tome_merges_at_most_half_of_the_patch_tokens():
    model = apply_patch(make_vit(), "tome", 1000)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert get_state(model).tokens_per_block == [33, 17, 9, 5]  # 65 -> 65 - 32 -> ...


@pytest.mark.parametrize("num_prefix, num_tokens", [(0, 6), (1, 6), (1, 7), (2, 7), (3, 8)])
def test_tome_slots_are_laid_out_in_token_order(num_prefix, num_tokens):
    # positions num_prefix.. alternate between the A (even) and B (odd) sets; each value names its token
    a_first, b_first = first_non_prefix(num_prefix)
    tokens = torch.arange(num_tokens)[None]
    laid_out = in_token_order(tokens[:, :num_prefix], tokens[:, a_first::2], tokens[:, b_first::2], num_prefix)
    assert laid_out.tolist() == tokens.tolist()


EXPORT_FORMS = {  # (the library's function, its eager definition, arguments): exported as faster onnxruntime nodes
    "head average": (head_average, lambda keys: keys.mean(dim=1), (torch.randn(2, 6, 11, 8),)),
    "token norm": (token_norm, lambda x: torch.linalg.vector_norm(x, dim=-1), (torch.randn(2, 11, 8) * 3,)),
    "fused token": (weighted_token_sum, lambda w, x: (w.unsqueeze(-1) * x).sum(dim=1, keepdim=True),
                    (torch.rand(2, 11), torch.randn(2, 11, 8))),
}


@pytest.mark.parametrize("form", EXPORT_FORMS)
def test_export_forms_are_bit_identical_in_eager_and_the_same_values_when_exporting(form, monkeypatch):
    function, definition, arguments = EXPORT_FORMS[form]
    assert torch.equal(function(*arguments), definition(*arguments))
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    torch.testing.assert_close(function(*arguments), definition(*arguments))


def test_fusion_appends_a_token_only_when_something_was_dropped():
    model = apply_patch(make_vit(), "evit", [63, 5, 5, 0])
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    # 65 -> keep 2 + fused; then 3 tokens: keep 2 + fused = 3; the same again; k = 0 changes nothing
    assert get_state(model).tokens_per_block == [3, 3, 3, 3]


# --- what is always kept --------------------------------------------------------------------------

@pytest.mark.parametrize("method", REDUCING)
def test_class_and_register_tokens_are_kept_and_first(method, images):
    model = apply_patch(make_vit(reg_tokens=2), method, 15, trace_source=True)
    with torch.no_grad():
        model(images)
    num_prefix = 3
    for source in get_state(model).block_sources:
        prefix_rows = source[:, :num_prefix, :]
        expected = torch.eye(source.shape[-1])[:num_prefix].expand_as(prefix_rows)
        assert torch.equal(prefix_rows, expected)
        assert source[:, num_prefix:, :num_prefix].sum() == 0  # no other token carries a prefix token


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_source_map_covers_every_patch(method, images):
    model = apply_patch(make_vit(), method, 11, trace_source=True)
    with torch.no_grad():
        model(images)
    state = get_state(model)
    assert len(state.block_sources) == DEPTH
    for source in state.block_sources:
        carried = source.sum(dim=1)
        if method in ("none", "tome") or method in FUSING:
            assert torch.equal(carried, torch.ones_like(carried))  # a partition of the original tokens
        else:
            assert carried.max() == 1  # pruning: each patch is kept once or gone


def test_trace_source_is_off_by_default(images):
    model = apply_patch(make_vit(), "tome", 8)
    with torch.no_grad():
        model(images)
    assert get_state(model).source is None and get_state(model).block_sources == []


def test_tome_sizes_sum_to_the_original_token_count(images):
    model = apply_patch(make_vit(), "tome", [10, 3, 8, 4])
    with torch.no_grad():
        model(images)
    size = get_state(model).size
    assert torch.equal(size.sum(dim=1).flatten(), torch.full((3,), 65.0))


# --- identities -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHOD_NAMES)
def test_pool_k_zero_is_bit_identical(method, images):
    model = make_vit()
    with torch.no_grad():
        plain = model(images)
        apply_patch(model, method, 0)
        assert torch.equal(model(images), plain)


def test_method_none_is_bit_identical_whatever_k(images):
    model = make_vit()
    with torch.no_grad():
        plain = model(images)
        apply_patch(model, "none", 20)
        assert torch.equal(model(images), plain)


def test_remove_patch_restores_the_model(images):
    model = make_vit()
    with torch.no_grad():
        plain = model(images)
        apply_patch(model, "tome", 10)
        assert not torch.allclose(model(images), plain)
        remove_patch(model)
        assert torch.equal(model(images), plain)
    assert not hasattr(model, "_compression")
    assert all(type(b).__name__ == "Block" and type(b.attn).__name__ == "Attention" for b in model.blocks)


def test_patching_twice_replaces_the_first_patch(images):
    once, twice = make_vit(), make_vit()
    apply_patch(once, "tk", 9)
    apply_patch(twice, "tome", 4)
    apply_patch(twice, "tk", 9)
    with torch.no_grad():
        assert torch.equal(once(images), twice(images))


def test_state_dict_is_unchanged_by_patching():
    model = make_vit()
    keys = list(model.state_dict())
    apply_patch(model, "evit", 5)
    assert list(model.state_dict()) == keys


# --- batches, gradients, attention paths ----------------------------------------------------------

@pytest.mark.parametrize("method", DETERMINISTIC)
def test_batch_independence(method, images):
    model = apply_patch(make_vit(), method, 13)
    with torch.no_grad():
        together = model(images)
        alone = torch.cat([model(images[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", REDUCING)
def test_train_mode_gradients_reach_all_parameters(method, images):
    model = apply_patch(make_vit(drop_path_rate=0.1, attn_drop_rate=0.1), method, 10).train()
    model(images).logsumexp(dim=-1).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("reduce_at", ["block", "attn"])
@pytest.mark.parametrize("method", REDUCING)
def test_fused_and_explicit_attention_agree(method, reduce_at, images):
    fused = apply_patch(make_vit(), method, 14, reduce_at=reduce_at)
    explicit = apply_patch(make_vit(), method, 14, reduce_at=reduce_at, fused_attn=False)
    with torch.no_grad():
        torch.testing.assert_close(fused(images), explicit(images), atol=1e-5, rtol=0)


def _sdpa_calls(model, images, monkeypatch):
    """How many times a forward of ``model`` calls scaled_dot_product_attention (timm's path or the patch's)."""
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
        with torch.no_grad():
            model(images)
    return len(calls)


@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("method", ["tk_n", "tome"])
def test_one_switch_decides_fused_attention_in_every_block(method, fused_attn, images, monkeypatch):
    # blocks 0 and 2 reduce nothing (timm's own forward), 1 and 3 reduce (the patch's attention);
    # timm's own switch starts out the other way in every block
    model = make_vit()
    for block in model.blocks:
        block.attn.fused_attn = not fused_attn
    apply_patch(model, method, [0, 6, 0, 6], fused_attn=fused_attn)
    assert all(block.attn.fused_attn is fused_attn for block in model.blocks)
    assert _sdpa_calls(model, images, monkeypatch) == (DEPTH if fused_attn else 0)
    with pytest.raises(AttributeError, match="apply_patch"):
        model.blocks[0].attn.fused_attn = not fused_attn  # a second switch would let blocks disagree
    remove_patch(model)
    assert all(block.attn.fused_attn is (not fused_attn) for block in model.blocks)
    assert _sdpa_calls(model, images, monkeypatch) == (0 if fused_attn else DEPTH)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_k_zero_with_explicit_attention_is_bit_identical_to_timm_explicit(method, images):
    model = make_vit()
    for block in model.blocks:
        block.attn.fused_attn = False
    with torch.no_grad():
        plain = model(images)
        apply_patch(model, method, 0, fused_attn=False)
        assert torch.equal(model(images), plain)


def test_remove_patch_restores_every_block_exactly(images):
    model = make_vit()
    model.blocks[1].attn.fused_attn = False  # mixed on purpose: each block gets its own value back
    del model.blocks[2].attn.fused_attn  # timm's class annotation only: nothing in the instance
    before = [(type(b), type(b.attn), dict(vars(b)), dict(vars(b.attn))) for b in model.blocks]
    apply_patch(model, "evit", 5, fused_attn=True)
    apply_patch(model, "tome", 3, fused_attn=False)
    remove_patch(model)
    after = [(type(b), type(b.attn), dict(vars(b)), dict(vars(b.attn))) for b in model.blocks]
    assert after == before


def test_model_without_class_token():
    model = make_vit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="select_method.*class token"):
        apply_patch(model, "tk", 5)
    for method in ("tk_n", "evit_n", "tome"):
        apply_patch(model, method, 5)
        with torch.no_grad():
            assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_other_image_and_patch_sizes_and_channels():
    model = make_vit(img_size=28, patch_size=7, in_chans=1, num_classes=3)
    apply_patch(model, "tk_n", [2, 2, 2, 2])
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    assert get_state(model).tokens_per_block == [15, 13, 11, 9]


# --- bad arguments --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, argument", [
    (dict(select_method="topk"), "select_method"),
    (dict(pool_k=-1), "pool_k"),
    (dict(pool_k=[1, 2]), "pool_k"),
    (dict(pool_k=[1, 2, -3, 4]), "pool_k"),
    (dict(pool_k="10"), "pool_k"),
    (dict(pool_k=2.5), "pool_k"),
    (dict(reduce_at="mlp"), "reduce_at"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=f"^{argument}:"):
        apply_patch(make_vit(), **kwargs)


def test_non_vit_model_is_refused():
    with pytest.raises(ValueError, match="^model:"):
        apply_patch(torch.nn.Linear(2, 2), "tk", 1)


# --- FLOPs and schedules --------------------------------------------------------------------------

def _counted_flops(model, images):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    return counter.get_total_flops() / images.shape[0]


def test_analytic_flops_of_a_plain_vit_match_the_flop_counter(images):
    model = make_vit()
    for block in model.blocks:
        block.attn.fused_attn = False  # the CPU fused kernel is not in flop_counter's table
    assert _counted_flops(model, images) == analytic_flops(model)
    d, n = 32, 65  # 24·N·d² + 4·N²·d per block, plus patch embedding and head
    assert analytic_flops(model) == DEPTH * (24 * n * d * d + 4 * n * n * d) + 2 * 64 * 48 * d + 2 * d * 5


@pytest.mark.parametrize("method, reduce_at", [("tk_n", "block"), ("tk_n", "attn"), ("tome", "attn")])
def test_analytic_flops_of_a_patched_vit_match_the_flop_counter(method, reduce_at, images):
    model = apply_patch(make_vit(), method, 9, reduce_at=reduce_at, fused_attn=False)
    assert _counted_flops(model, images) == analytic_flops(model)
    assert analytic_flops(model) < analytic_flops(remove_patch(make_vit()))


def test_analytic_flops_count_an_added_head():
    model = make_vit()
    head = torch.nn.Linear(32, 7)
    assert analytic_flops(model, head=head) == analytic_flops(model) + 2 * 32 * 7
    apply_patch(model, "tome", 5)
    assert analytic_flops(model, head=head) == analytic_flops(model) + 2 * 32 * 7


def test_keep_rate_schedule():
    # EViT's ViT-S setting: 196 patches, keep 70% at blocks 3, 6 and 9
    assert keep_rate_schedule(197, 12, 0.7, [3, 6, 9]) == [0, 0, 0, 58, 0, 0, 41, 0, 0, 29, 0, 0]
    with pytest.raises(ValueError, match="keep_rate"):
        keep_rate_schedule(197, 12, 1.5, [3])


def test_matched_flops_schedule_equalises_cost():
    target = analytic_flops(apply_patch(make_vit(), "tk_n", 8))
    # a fused token adds one back per block, so evit_n needs one more token removed per block
    assert matched_flops_schedule(make_vit(), "evit_n", target) == [9] * DEPTH
    assert matched_flops_schedule(make_vit(), "tk_n", target) == [8] * DEPTH
    for method in ("tk", "evit", "tome"):
        schedule = matched_flops_schedule(make_vit(), method, target)
        flops = analytic_flops(apply_patch(make_vit(), method, schedule))
        assert abs(flops - target) / target < 0.02, (method, schedule)
    assert matched_flops_schedule(make_vit(), "tk", 10 * target) == [0] * DEPTH
