"""Checks that the tests of every model family make alike, written once: a patched model against its family's
reference, a patch that removes nothing is the plain model bit for bit, the methods give different outputs (so a
test comparing one method with its reference cannot pass by running another), the fused path never forms an
attention matrix, and the FLOP counter's count of a model."""
from typing import Callable, Dict, Iterable, Tuple, Type

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from engine.measure import FLOP_FORMULAS  # the fused CPU attention kernel, which flop_counter's table lacks
from pruning import get_method
from pruning.patch import apply_patch, get_config, get_state, remove_patch
from reference_vit import kept_ids

Run = Callable[[nn.Module, Tensor], Tensor]  # a family's output of a model for images


def patched_and_expected(model: nn.Module, images: Tensor, run: Run, reference: Callable, method: str,
                         schedule, **kwargs) -> Tuple[Tensor, Tensor]:
    """(the patched model's output, the family's ``reference`` under the same arguments); ``random`` is given the
    tokens the model drew. A ``fused_attn`` given is checked to be the one in force."""
    stochastic = get_method(method).stochastic
    apply_patch(model, method, schedule, trace_source=stochastic, **kwargs)
    if "fused_attn" in kwargs:
        assert get_config(model).fused_attn == kwargs["fused_attn"]
    with torch.no_grad():
        got = run(model, images)
    kept = kept_ids(get_state(model).block_sources) if stochastic else None
    expected = reference(remove_patch(model), images, method, schedule, kwargs.get("reduce_at"),
                         kwargs.get("prop_attn", True), kept=kept)
    return got, expected


def assert_nothing_removed_is_bit_identical(model: nn.Module, images: Tensor, run: Run,
                                            methods: Iterable[str]) -> None:
    """Every method at k = 0 and ``none`` at any k give the unpatched output bit for bit, ``tome`` at k = 3 does not;
    patching keeps the state-dict keys; ``remove_patch`` restores the output, every module's class and the model's
    config (none). ``run(model, images)`` is the family's output."""
    keys = list(model.state_dict())
    classes = [type(m) for m in model.modules()]
    with torch.no_grad():
        plain = run(model, images)
        for method in methods:
            apply_patch(model, method, 0)
            assert torch.equal(run(model, images), plain), method
        apply_patch(model, "none", 7)
        assert torch.equal(run(model, images), plain)
        apply_patch(model, "tome", 3)
        assert not torch.allclose(run(model, images), plain)
        assert list(model.state_dict()) == keys
        remove_patch(model)
        assert torch.equal(run(model, images), plain)
    assert [type(m) for m in model.modules()] == classes
    assert get_config(model) is None and not hasattr(model, "_compression")


def assert_all_differ(outputs: Dict[str, Tensor]) -> None:
    """No two methods' outputs agree within 1e-4."""
    names = sorted(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.allclose(outputs[a], outputs[b], atol=1e-4), (a, b)


class SquareOutputs(TorchDispatchMode):
    """Records every op output of shape (..., n, n) with n > head_dim: an attention matrix."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.ndim == 4 and t.shape[-1] == t.shape[-2] > 8:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def assert_fused_path_forms_no_attention_matrix(make_model: Callable, run: Run, family: str, method: str,
                                                images: Tensor, depth: int,
                                                guard: Type[SquareOutputs] = SquareOutputs) -> None:
    """Patched on its fused (SDPA) attention, ``method`` forms no N×N attention matrix; patched with
    ``fused_attn=False`` on eager attention it does (so the guard sees one where there is one)."""
    fused = apply_patch(make_model(family, "sdpa"), method, [3] * depth)
    with torch.no_grad(), guard() as mode:
        run(fused, images)
    assert mode.seen == []
    explicit = apply_patch(make_model(family, "eager"), method, [3] * depth, fused_attn=False)
    with torch.no_grad(), guard() as mode:
        run(explicit, images)
    assert mode.seen


def counted_flops(model: nn.Module, images: Tensor, run: Run) -> float:
    """flop_counter's count per image, the fused CPU attention kernel included (as engine code counts)."""
    # OpenCLIP's unpatched nn.MultiheadAttention takes a fast path without grad that flop_counter misses
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter, torch.enable_grad():
        run(model, images)
    return counter.get_total_flops() / images.shape[0]
