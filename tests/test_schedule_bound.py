"""The schedule-only bound (``pruning.benchmark.schedule_only``): the plain blocks at the token counts a method
leaves, each reduction a free slice. Checked against the patched model's own token counts as it runs, and
against the plain model where nothing is removed."""
import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from pruning.benchmark import schedule_only
from pruning.patch import apply_patch, get_state
from reference_vit import expected_token_counts

SCHEDULE = [3, 0, 9, 5]


def make_vit(**overrides):
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=4, num_heads=4)
    kwargs.update(overrides)
    return VisionTransformer(**kwargs).eval()


def mlp_and_block_tokens(blocks, images, model):
    """(tokens into every block's MLP, tokens into the next norm or the final one) in one forward of ``model``."""
    into_mlp, out = [], []
    hooks = [b.mlp.register_forward_pre_hook(lambda m, args: into_mlp.append(args[0].shape[1])) for b in blocks]
    norms = [b.norm1 for b in blocks[1:]] + [model.norm]
    hooks += [n.register_forward_pre_hook(lambda m, args: out.append(args[0].shape[1])) for n in norms]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return into_mlp, out


@pytest.mark.parametrize("method, reduce_at", [("tk_n", "block"), ("tk_n", "attn"), ("evit", "block"),
                                               ("evit_n", "attn"), ("tome", "attn"), ("tome", "block")])
@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_bound_runs_the_token_counts_the_method_leaves(method, reduce_at, reg_tokens):
    plain = make_vit(reg_tokens=reg_tokens)
    compressed = apply_patch(copy.deepcopy(plain), method, SCHEDULE, reduce_at=reduce_at)
    images = torch.randn(2, 3, 32, 32)
    method_mlp, method_out = mlp_and_block_tokens(compressed.blocks, images, compressed)
    bound = schedule_only(plain, compressed)
    bound_mlp, bound_out = mlp_and_block_tokens([sliced.block for sliced in bound.blocks], images, bound)
    expected = expected_token_counts(method, 65 + reg_tokens, SCHEDULE, num_prefix=1 + reg_tokens)
    assert method_out == get_state(compressed).tokens_per_block == expected
    assert (bound_mlp, bound_out) == (method_mlp, method_out)
    assert bound_mlp == (expected if reduce_at == "attn" else [65 + reg_tokens] + expected[:-1])


def test_bound_of_a_schedule_removing_nothing_is_the_plain_model():
    plain = make_vit()
    bound = schedule_only(plain, apply_patch(copy.deepcopy(plain), "tome", 0))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bound(images), plain(images))


def test_bound_keeps_the_first_tokens_and_leaves_the_model_alone():
    plain = make_vit()
    weights = copy.deepcopy(plain.state_dict())
    bound = schedule_only(plain, apply_patch(copy.deepcopy(plain), "tk_n", [0, 0, 0, 60]))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # only the last block reduces, to 5 tokens: the plain model's first 5 (norm is per token)
        assert torch.equal(bound.forward_features(images), plain.forward_features(images)[:, :5])
    assert all(torch.equal(weights[k], v) for k, v in plain.state_dict().items())
    assert type(plain.blocks[0]).__name__ == "Block" and bound.blocks[0].block is not plain.blocks[0]


def test_bound_refuses_a_patched_model_and_an_unpatched_method_in_one_line():
    plain = make_vit()
    compressed = apply_patch(copy.deepcopy(plain), "tk_n", 3)
    with pytest.raises(ValueError, match="^model: the schedule-only bound is built from an unpatched"):
        schedule_only(compressed, compressed)
    with pytest.raises(ValueError, match="^model: not patched"):
        schedule_only(plain, plain)
