"""--amp (bf16 autocast on CPU) and --compile (torch.compile) in training, evaluation and the benchmark."""
import functools
import shutil

import pytest
import torch
import torch.nn.functional as F

import engine.measure
import main

TINY = ["--epochs", "1", "--train_subset", "32", "--test_subset", "16", "--batch_size", "16",
        "--bench_steps", "2", "--bench_warmup", "1"]


def record_throughput_calls(monkeypatch) -> list:
    """What main.py hands to pruning.benchmark.measure_throughput: the models and the autocast dtype."""
    calls = []
    real = engine.measure.measure_throughput

    def measure_throughput(models, inputs, warmup, rounds, autocast_dtype=None):
        calls.append(({name: model for name, model in models.items()}, autocast_dtype))
        return real(models, inputs, warmup, rounds, autocast_dtype)

    monkeypatch.setattr(engine.measure, "measure_throughput", measure_throughput)
    return calls


def test_amp_trains_evaluates_and_measures_in_bfloat16_on_cpu(tmp_path, monkeypatch):
    dtypes = []
    real_cross_entropy = F.cross_entropy

    def cross_entropy(logits, *args, **kwargs):
        dtypes.append(logits.dtype)
        return real_cross_entropy(logits, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", cross_entropy)
    calls = record_throughput_calls(monkeypatch)
    results = main.run(main.parse_args([*TINY, "--amp", "--device", "cpu", "--output_dir", str(tmp_path)]))
    assert dtypes[:2] == [torch.bfloat16] * 2  # the 2 training steps' logits (evaluation casts to float32)
    assert calls[0][1] == torch.bfloat16
    assert 0.0 <= results["accuracy"] <= 100.0 and results["throughput"] > 0
    assert torch.load(tmp_path / "last.pt", weights_only=True)["model"]["head.weight"].dtype == torch.float32


def test_amp_dtype_float16_on_cpu_is_refused(capsys, tmp_path):
    assert main.main([*TINY, "--amp", "--amp_dtype", "float16", "--device", "cpu", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("main.py: error: --amp_dtype float16") and "bfloat16" in err and "\n" not in err


@pytest.mark.skipif(not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")),
                    reason="inductor needs a C++ compiler on the CPU")
def test_benchmark_times_the_compiled_models(tmp_path, monkeypatch):
    """Inductor for real (the slowest test: it compiles two small models on the CPU)."""
    calls = record_throughput_calls(monkeypatch)
    results = main.run(main.parse_args([*TINY, "--benchmark", "--compile", "--model", "tk_n", "--reduce_token", "2",
                                        "--output_dir", str(tmp_path / "compiled")]))
    timed = calls[-1][0]
    assert set(timed) == {"model", "baseline"}
    assert all(isinstance(model, torch._dynamo.eval_frame.OptimizedModule) for model in timed.values())
    plain = main.run(main.parse_args([*TINY, "--benchmark", "--model", "tk_n", "--reduce_token", "2",
                                      "--output_dir", str(tmp_path / "plain")]))
    for key in ("gflops", "baseline_gflops", "gmacs_thop", "params_m"):  # counted on the plain modules
        assert results[key] == plain[key], key
    assert results["throughput"] > 0 and results["speedup"] == results["throughput"] / results["baseline_throughput"]
    # the compiled patched model computes what the plain one does
    compiled, images = timed["model"], torch.randn(4, 1, 8, 8)
    with torch.inference_mode():
        assert torch.allclose(compiled(images), compiled._orig_mod(images), atol=1e-5)


def test_compile_in_training_keeps_plain_checkpoints(tmp_path, monkeypatch):
    """The training path with torch.compile (eager backend: the wiring, not inductor's speed)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    trained = main.run(main.parse_args([*TINY, "--epochs", "2", "--compile", "--output_dir", str(tmp_path / "c")]))
    checkpoint = torch.load(tmp_path / "c" / "last.pt", weights_only=True)
    assert not [key for key in checkpoint["model"] if "_orig_mod" in key or key.startswith("module.")]
    assert checkpoint["settings"]["compile"] is True
    monkeypatch.undo()
    evaluated = main.run(main.parse_args([*TINY, "--eval_only", "--checkpoint", str(tmp_path / "c" / "last.pt"),
                                          "--output_dir", str(tmp_path / "e")]))
    assert evaluated["accuracy"] == trained["accuracy"]


@pytest.mark.parametrize("option", ["--amp_dtype", "--compile"])
def test_options_are_documented(option):
    assert option in main.build_parser().format_help()
