"""Checks that the tests of every model family make alike, written once: a patch that removes nothing is the
plain model bit for bit, and the methods give different outputs (so a test comparing one method with its
reference cannot pass by running another)."""
from typing import Callable, Dict, Iterable

import torch
from torch import Tensor, nn

from pruning.patch import apply_patch, get_config, remove_patch


def assert_nothing_removed_is_bit_identical(model: nn.Module, images: Tensor, run: Callable[[nn.Module, Tensor], Tensor],
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
