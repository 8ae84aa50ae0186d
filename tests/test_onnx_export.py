"""tools/export_onnx.py: every method exports to ONNX with a dynamic batch, runs the same in onnxruntime,
and really runs fewer tokens; the command line works with main.py and timm checkpoints; bad input is one line."""
import copy
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import timm

import pruning.models  # noqa: F401
from pruning import METHOD_NAMES, apply_patch, get_method, get_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import export_onnx  # noqa: E402

ARCH = "vit_pico_patch2_8"  # 8x8 grayscale, 16 patches + class token, 4 blocks, width 64
DIM, TOKENS = 64, 17
POOL_K = 3


def token_dims(path: str) -> set:
    """The token counts N of the (batch, N, width) tensors in the exported graph."""
    graph = onnx.load(path).graph
    dims = set()
    for info in list(graph.value_info) + list(graph.output):
        shape = [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]
        if len(shape) == 3 and shape[2] == DIM and isinstance(shape[1], int):
            dims.add(shape[1])
    return dims


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(0)
    return timm.create_model(ARCH).eval()


@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if not get_method(m).stochastic])  # random: refused
def test_export_matches_pytorch_and_reduces_tokens(method, plain, tmp_path):
    model = apply_patch(timm.create_model(ARCH).eval(), method, POOL_K)
    model.load_state_dict(plain.state_dict())
    path = str(tmp_path / f"{method}.onnx")
    export_onnx.export_onnx(model, path)
    copy.deepcopy(model)  # exporting left the model as it was (no traced tensors in its state)
    session = export_onnx.ort_session(path, threads=1)

    # the same logits at two batch sizes (the batch dimension is dynamic; the export used batch 2)
    assert export_onnx.max_difference(model, session, [1, 3]) < export_onnx.TOLERANCE

    # the graph runs the reduced token counts, block by block
    images = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        expected = model(images)
        uncompressed = plain(images)
    per_block = get_state(model).tokens_per_block
    dims = token_dims(path)
    if method == "none":
        assert per_block == [TOKENS] * 4
        assert max(dims) == TOKENS and min(n for n in dims if n > 1) >= TOKENS - 1
    else:
        assert per_block[-1] < TOKENS - 4, per_block
        assert set(per_block) <= dims, (per_block, sorted(dims))
        # a patch silently dropped from the export would give the uncompressed model's logits
        got = export_onnx.ort_run(session, images.numpy())
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=0)
        assert np.abs(got - uncompressed.numpy()).max() > 1e-3
    # averages over heads, token norms and the fused token's sum over tokens export as products and plain sums,
    # not onnxruntime's slow reductions (ReduceMean, ReduceL2, and ReduceSum over any axis but the last)
    assert reductions(path) <= {("ReduceSum", "last axis"), ("ReduceMax", "last axis")}


def reductions(path: str) -> set:
    """(operator, "last axis" or the axes) of each Reduce node; axes as constant inputs (opset 18) or attributes,
    each read against its input's rank (the exporter may write the last axis as -1 or as rank - 1)."""
    graph = onnx.shape_inference.infer_shapes(onnx.load(path)).graph
    ranks = {info.name: len(info.type.tensor_type.shape.dim)
             for info in list(graph.value_info) + list(graph.input) + list(graph.output)}
    constants = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in graph.initializer}
    constants.update({node.output[0]: onnx.numpy_helper.to_array(node.attribute[0].t)
                      for node in graph.node if node.op_type == "Constant"})
    found = set()
    for node in graph.node:
        if node.op_type.startswith("Reduce"):
            axes = [list(constants[name]) for name in node.input[1:2] if name in constants]
            axes += [list(attribute.ints) for attribute in node.attribute if attribute.name == "axes"]
            rank = ranks[node.input[0]]
            axes = tuple(sorted(int(axis) % rank for axis in (axes[0] if axes else range(rank))))
            found.add((node.op_type, "last axis" if axes == (rank - 1,) else axes))
    return found


def run_cli(argv, capsys):
    code = export_onnx.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_main_checkpoint(tmp_path, capsys):
    """A main.py checkpoint: arch, method and schedule come from its settings, the head size from its weights."""
    torch.manual_seed(1)
    model = timm.create_model(ARCH, num_classes=7)
    path = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "epoch": 3,
                "settings": {"arch": ARCH, "model": "tk", "reduce_token": 2, "reduce_at": "block", "img_size": 8,
                             "patch_size": 2}}, path)
    out_path = str(tmp_path / "tk.onnx")
    code, out, err = run_cli(["--checkpoint", str(path), "--out", out_path, "--batch_size", "2", "--rounds", "2",
                              "--threads", "1"], capsys)
    assert code == 0, err
    assert "onnxruntime matches PyTorch (max |Δ|" in out
    assert "speedup" in out and "ideal" in out
    # the file holds the checkpoint's weights, compressed as the settings say
    apply_patch(model.eval(), "tk", 2)
    images = torch.randn(2, 1, 8, 8)
    got = export_onnx.ort_run(export_onnx.ort_session(out_path, 1), images.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(got, model(images).numpy(), atol=1e-4, rtol=0)
    assert got.shape == (2, 7)


def test_cli_timm_safetensors(tmp_path, capsys):
    from safetensors.torch import save_file
    torch.manual_seed(2)
    model = timm.create_model(ARCH, num_classes=5)
    path = tmp_path / "weights.safetensors"
    save_file(model.state_dict(), str(path))
    out_path = str(tmp_path / "tome.onnx")
    code, out, err = run_cli(["--arch", ARCH, "--checkpoint", str(path), "--model", "tome", "--reduce_token",
                              "2,2,2,2", "--out", out_path, "--batch_size", "3", "--rounds", "0"], capsys)
    assert code == 0, err
    assert "onnxruntime matches PyTorch" in out
    apply_patch(model.eval(), "tome", 2)
    images = torch.randn(4, 1, 8, 8)
    got = export_onnx.ort_run(export_onnx.ort_session(out_path, 1), images.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(got, model(images).numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("argv, message", [
    (["--arch", "vit_nonexistent", "--model", "tk", "--reduce_token", "2"], "--arch"),
    (["--arch", ARCH, "--checkpoint", "missing.pt", "--model", "tk", "--reduce_token", "2"], "not found"),
    (["--arch", ARCH, "--model", "topk", "--reduce_token", "2"], "--model: unknown method 'topk'"),
    (["--arch", ARCH, "--model", "tk", "--reduce_token", "2,2"], "2 values given, but --arch"),
    (["--arch", ARCH, "--model", "tk", "--reduce_token", "two"], "--reduce_token"),
    (["--arch", ARCH, "--reduce_token", "2"], "--model is required"),
    (["--arch", ARCH, "--model", "random", "--reduce_token", "2"], "--model random: not exported to ONNX"),
])
def test_cli_errors_are_one_line(argv, message, tmp_path, capsys):
    code, out, err = run_cli(argv + ["--out", str(tmp_path / "m.onnx")], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("export_onnx.py: error: ") and message in err, err
    assert not os.path.exists(tmp_path / "m.onnx")


def test_cli_mismatch_exits_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export_onnx, "max_difference", lambda *a, **k: 0.5)
    code, out, err = run_cli(["--arch", ARCH, "--model", "tk_n", "--reduce_token", "2", "--out",
                              str(tmp_path / "m.onnx"), "--rounds", "0"], capsys)
    assert code == 1
    assert err.count("\n") == 1 and "differs from PyTorch by max |Δ| 5.00e-01" in err


def test_script_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export_onnx.py"), "--arch", ARCH,
                             "--model", "bad", "--reduce_token", "2", "--out", str(tmp_path / "m.onnx")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("export_onnx.py: error: --model: unknown method") and "Traceback" not in \
        result.stderr


def test_a_schedule_the_blocks_cannot_honour_is_said_as_main_py_says_it(tmp_path, capsys):
    """Issue 20: 30 tokens per block from a 50-token model leave 2 tokens; the export says so."""
    code, out, err = run_cli(["--arch", "vit_pico_patch4_28", "--model", "tk_n", "--reduce_token", "30", "--out",
                              str(tmp_path / "m.onnx"), "--rounds", "0"], capsys)
    assert code == 0 and "wrote" in out
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and warning[0].startswith("export_onnx.py: warning: --reduce_token 30 cannot be honoured")
    assert "tokens 50 → 20 → 2 → 2 → 2 → 2 → 2" in warning[0]


def test_a_schedule_the_blocks_honour_exports_without_a_warning(tmp_path, capsys):
    code, _, err = run_cli(["--arch", "vit_pico_patch4_28", "--model", "tk_n", "--reduce_token", "4", "--out",
                            str(tmp_path / "m.onnx"), "--rounds", "0"], capsys)
    assert code == 0 and "warning" not in err


# --- transformers models (--arch hf:FOLDER) -------------------------------------------------------

@pytest.fixture(scope="module")
def hf_archs(tmp_path_factory):
    from tiny_folders import BUILDERS, save_tiny

    root = tmp_path_factory.mktemp("hf")
    return {family: save_tiny(root, family) for family in BUILDERS}


@pytest.mark.parametrize("method", ["tk_n", "tome"])
def test_siglip_exports_compressed_and_runs_the_same(method, hf_archs, tmp_path, capsys):
    """SigLIP (no class token, attention-pool head): the exported graph is the compressed wrapper, images in."""
    from engine.model import compress, create_model

    out_path = str(tmp_path / "siglip.onnx")
    code, out, err = run_cli(["--arch", hf_archs["siglip"], "--model", method, "--reduce_token", "3", "--out",
                              out_path, "--batch_size", "3", "--rounds", "0"], capsys)
    assert code == 0, err
    assert "input images (batch, 3, 32, 32)" in out and "onnxruntime matches PyTorch" in out
    torch.manual_seed(0)  # the tool's --seed: the same random weights
    model = compress(create_model(hf_archs["siglip"], None, None).eval(),
                     type("Settings", (), dict(method=method, schedule=3, reduce_at=None, prop_attn="on"))())
    images = torch.randn(2, 3, 32, 32)
    got = export_onnx.ort_run(export_onnx.ort_session(out_path, 1), images.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(got, model(images).numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["dinov3", "vit_nano_rope_patch4_28"])
@pytest.mark.parametrize("method", ["tk_n", "evit", "tome"])
def test_rope_models_export_compressed_and_match(arch, method, hf_archs, tmp_path, capsys):
    """RoPE (transformers DINOv3, timm Eva): the carried angles are traced into the graph, which matches PyTorch."""
    code, out, err = run_cli(["--arch", hf_archs.get(arch, arch), "--model", method, "--reduce_token", "3", "--out",
                              str(tmp_path / "rope.onnx"), "--batch_size", "3", "--rounds", "0"], capsys)
    assert code == 0, err
    assert "onnxruntime matches PyTorch" in out


def test_a_family_torch_export_cannot_trace_compressed_is_refused_naming_why(hf_archs, tmp_path, capsys):
    """transformers' ViT (5.x) builds an explicit mask under torch.export, which a compressing layer refuses:
    exit 1, one line naming that limit (a transformers that skips the mask exports it, matching PyTorch);
    uncompressed, it exports."""
    code, out, err = run_cli(["--arch", hf_archs["vit"], "--model", "tk_n", "--reduce_token", "2", "--out",
                              str(tmp_path / "vit.onnx"), "--rounds", "0"], capsys)
    if code == 0:
        assert "onnxruntime matches PyTorch" in out
    else:
        assert code == 1 and err.count("\n") == 1, err
        assert "transformers builds an explicit attention mask" in err and "refuses masks" in err
    code, out, err = run_cli(["--arch", hf_archs["vit"], "--model", "none", "--reduce_token", "0", "--out",
                              str(tmp_path / "vit.onnx"), "--rounds", "0"], capsys)
    assert code == 0 and "onnxruntime matches PyTorch" in out, err


def test_an_exporter_failure_names_its_cause_in_one_line():
    try:
        try:
            raise KeyError("aten.some_op has no ONNX translation")
        except KeyError as inner:
            raise RuntimeError("\x1b[96mFailed to convert\x1b[0m. Next steps: read the report\nmore lines") from inner
    except RuntimeError as err:
        line = export_onnx.export_failure(err)
    assert line == ("torch.onnx.export failed: RuntimeError: Failed to convert.; cause: KeyError: "
                    "'aten.some_op has no ONNX translation'")


def test_sessions_spin_their_threads_during_a_run_only_and_reuse_an_exported_file(plain, tmp_path):
    path = str(tmp_path / "plain.onnx")
    session = export_onnx.exported_session(plain, path, threads=2)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"  # no wake-up per operation
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"  # no spinning between runs
    written = os.path.getmtime(path)
    export_onnx.exported_session(None, path)  # the file is there: nothing to export (a model is not even needed)
    assert os.path.getmtime(path) == written


def test_explicit_attention_exports_without_slow_reductions_too(plain, tmp_path):
    model = apply_patch(timm.create_model(ARCH).eval(), "evit", POOL_K, fused_attn=False)  # the N×N weights' row
    model.load_state_dict(plain.state_dict())
    path = str(tmp_path / "evit_explicit.onnx")
    export_onnx.export_onnx(model, path)
    assert reductions(path) <= {("ReduceSum", "last axis"), ("ReduceMax", "last axis")}
    assert export_onnx.max_difference(model, export_onnx.ort_session(path, threads=1), [1, 3]) < export_onnx.TOLERANCE
