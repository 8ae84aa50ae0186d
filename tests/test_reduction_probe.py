"""tools/reduction_probe.py times the library's own reduction step, with the inputs a patched block gives it, and
writes JSON of the documented structure (speed itself is never asserted: the machine is shared)."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import reduction_probe  # noqa: E402

ARCH = "vit_pico_patch2_8"


def test_runs_every_step_under_every_condition_and_writes_json(tmp_path, capsys):
    out = tmp_path / "probe.json"
    argv = ["--arch", ARCH, "--methods", "tk_n,evit,tome", "--reduce_token", "3", "--rounds", "3", "--json", str(out),
            "--md", str(tmp_path / "probe.md")]
    assert reduction_probe.main(argv) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["settings"]["command"] == "python tools/reduction_probe.py " + " ".join(argv)
    rows = {r["step"]: r for r in report["rows"]}
    assert list(rows) == ["python loop", "one add", "ten adds", "tk_n", "evit", "tome"]
    # the counter counts dispatched operations: one per add, none in plain Python
    assert [rows[n]["aten_ops"] for n in ("python loop", "one add", "ten adds")] == [0, 1, 10]
    for r in rows.values():
        assert r["warm_us"] > 0
        for key in ("block", "matmul", "sweep"):
            low, high = r[f"{key}_ratio_ci"]
            assert low <= r[f"{key}_ratio"] <= high
            assert r[f"{key}_ratio"] == pytest.approx(r[f"after_{key}_us"] / r["warm_us"])
    # ToMe's matching and merge dispatch more operations than a top-k selection and one gather
    assert rows["tome"]["aten_ops"] > rows["evit"]["aten_ops"] > rows["tk_n"]["aten_ops"] > 1
    assert (tmp_path / "probe.md").read_text() == table
    assert "| tome |" in table
    assert ("| warm µs | after block µs | after matmul µs | after sweep µs | block / warm | matmul / warm | "
            "sweep / warm |") in table


@pytest.mark.parametrize("method, removed", [("tk_n", 3), ("evit", 2), ("tome", 3)])
def test_the_timed_step_is_the_methods_reduction_of_one_block(method, removed):
    # pruning removes k tokens, fusing adds one back, merging removes k
    model = reduction_probe.probed_model(ARCH)
    x = torch.randn(1, 65, model.embed_dim)
    with torch.inference_mode():
        step = reduction_probe.reduction_step(method, model.blocks[0], x, 3)
        assert step().shape == (1, 65 - removed, model.embed_dim)
        assert torch.equal(step(), step())  # each call starts a fresh forward's state


def test_each_condition_runs_its_call_before_the_timed_step():
    block = reduction_probe.probed_model(ARCH).blocks[0]
    x = torch.randn(1, 65, block.mlp.fc1.in_features)
    with torch.inference_mode():
        before = reduction_probe.preceding_calls(block, x)
        assert list(before) == list(reduction_probe.AFTER)
        assert torch.equal(before["block"](), block(x))
        assert before["matmul"]().shape == (1, 65, block.mlp.fc1.out_features)  # the block's largest product
        assert before["sweep"]().item() == sum(p.numel() for p in block.parameters())  # a sum of ones
    calls = []
    times = reduction_probe.measure({"step": lambda: calls.append("step")},
                                    {c: (lambda c=c: calls.append(c)) for c in reduction_probe.AFTER}, rounds=2)
    assert {c: len(t) for c, t in times["step"].items()} == {"warm": 2, "block": 2, "matmul": 2, "sweep": 2}
    # one untimed step first; then per round: warm (the step twice), then each condition's call before the step
    assert calls == ["step"] + 2 * ["step", "step", "block", "step", "matmul", "step", "sweep", "step"]


@pytest.mark.parametrize("argv, start", [
    (["--methods", "none"], "--methods: 'none' has no deterministic reduction step"),
    (["--methods", "tk_n,nope"], "--methods: unknown method 'nope'; choose from tk, tk_n,"),
    (["--methods", "random"], "--methods: 'random' has no deterministic reduction step"),
    (["--rounds", "0"], "--rounds: must be >= 1"),
    (["--md", "no/such/folder/probe.md"], "--md: the folder of no/such/folder/probe.md does not exist"),
    (["--arch", "not_a_model"], "--arch: 'not_a_model' is not a timm model name"),
    (["--arch", "resnet18"], "--arch: 'resnet18' is not a timm VisionTransformer"),
])
def test_bad_input_is_one_line(capsys, argv, start):
    assert reduction_probe.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("reduction_probe.py: error: " + start) and err.count("\n") == 1
