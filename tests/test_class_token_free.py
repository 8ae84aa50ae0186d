"""The class-token-free baseline (issue 22): ViT-Nano/4 with an attention-pool head, as SigLIP pools."""
import pytest
import timm
import torch

import main
import pruning.models  # noqa: F401  (registers the small models)
from engine.measure import count_gflops
from pruning.flops import analytic_flops
from pruning.patch import apply_patch


def test_the_model_has_no_class_token_and_pools_by_attention():
    model = timm.create_model("vit_nano_map_patch4_28")
    assert model.num_prefix_tokens == 0 and model.global_pool == "map"
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_flop_counter_counts_an_attention_pool_head_and_leaves_the_parameters_trainable():
    model = timm.create_model("vit_nano_map_patch4_28")
    gflops = count_gflops(model, (1, 28, 28), torch.device("cpu"))
    assert gflops * 1e9 >= analytic_flops(model)  # the blocks and more: the pool head is counted too
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["tk_n", "evit_n", "tome"])
def test_the_norm_scored_methods_and_tome_run_on_it(method):
    model = apply_patch(timm.create_model("vit_nano_map_patch4_28").eval(), method, 4)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_attention_top_k_is_refused_in_one_line(capsys):
    code = main.main(["--arch", "vit_nano_map_patch4_28", "--model", "tk", "--benchmark", "--bench_steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "class token" in err[0]
