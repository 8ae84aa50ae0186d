"""tools/deploy_benchmark.py runs end to end on a tiny model and writes JSON of the documented structure
(speed itself is never asserted: the machine is shared)."""
import argparse
import errno
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import deploy_benchmark  # noqa: E402
from engine.errors import CLIError  # noqa: E402


def test_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = deploy_benchmark.main(["--arch", "vit_pico_patch2_8", "--methods", "tk_n,tk,tome", "--reduce_token", "3",
                                  "--runtimes", "eager,onnxruntime", "--threads", "1", "--quick", "--json", str(out)])
    table = capsys.readouterr().out
    assert code == 0
    report = json.loads(out.read_text())
    assert {"cpu", "torch", "onnxruntime", "glibc_tunables"} <= set(report["machine"])
    assert report["settings"]["threads"] == [1] and len(report["loadavg_start"]) == 3
    # tk and tk_n leave the same token counts, so they share one bound
    assert report["settings"]["bounds"] == {"tk_n": "bound:tk_n", "tk": "bound:tk_n", "tome": "bound:tome"}
    rows = {(r["runtime"], r["threads"], r["method"], r["batch"]) for r in report["inference"]}
    assert rows == {(rt, 1, m, b) for rt in ("eager", "onnxruntime") for m in ("none", "tk_n", "tk", "tome")
                    for b in (1, 2)}
    for r in report["inference"] + report["training"]:
        assert {"median_ms", "p90_ms", "images_per_s", "speedup", "ideal", "of_ideal"} <= set(r)
        assert r["speedup"] > 0 and (r["ideal"] > 1) == (r["method"] != "none")
    for r in report["inference"]:
        decomposed = {"bound_ms", "bound_speedup", "bound_of_ideal", "of_bound"}
        assert decomposed <= set(r) if r["method"] != "none" else not decomposed & set(r)
        if r["method"] != "none":
            assert r["bound_speedup"] / r["ideal"] == pytest.approx(r["bound_of_ideal"])
            assert r["speedup"] / r["bound_speedup"] == pytest.approx(r["of_bound"])
            for key in ("of_bound", "of_ideal"):  # each figure with its interval
                low, high = r[key + "_ci"]
                assert low <= r[key] <= high
    assert [r["method"] for r in report["training"]] == ["none", "tk_n", "tk", "tome"]
    assert "| onnxruntime | 1 | 1 | tk_n |" in table and report["machine"]["cpu"] in table
    assert "| bound | bound/ideal | speedup | of bound | of ideal | method ms |" in table
    assert "[95 % interval, rounds resampled in pairs]" in table
    # one run: no repeats to summarise
    assert report["settings"]["repeats"] == 1 and {r["repeat"] for r in report["inference"]} == {0}
    assert report["across_repeats"] == [] and "####" not in table
    assert report["complete"] and "Interrupted" not in table


@pytest.fixture
def built(monkeypatch):
    """Every (models, bound_of) the benchmark builds, in order."""
    calls = []
    build = deploy_benchmark.build_models
    monkeypatch.setattr(deploy_benchmark, "build_models", lambda args: calls.append(build(args)) or calls[-1])
    return calls


def test_repeats_rebuild_the_models_and_summarise_each_cell_across_them(tmp_path, capsys, built):
    out = tmp_path / "bench.json"
    code = deploy_benchmark.main(["--arch", "vit_pico_patch2_8", "--methods", "tk_n,tome", "--reduce_token", "3",
                                  "--runtimes", "eager", "--threads", "1", "--quick", "--repeats", "3",
                                  "--json", str(out)])
    table = capsys.readouterr().out
    assert code == 0
    # a repeat's models have the first one's weights, in new memory
    plains = [models["none"] for models, _ in built]
    assert len(plains) == 3
    for later in plains[1:]:
        for (name, first), (_, again) in zip(plains[0].state_dict().items(), later.state_dict().items()):
            assert torch.equal(first, again) and first.data_ptr() != again.data_ptr(), name
    report = json.loads(out.read_text())
    assert report["settings"]["repeats"] == 3
    rows = report["inference"]
    assert sorted({r["repeat"] for r in rows}) == [0, 1, 2]
    summary = report["across_repeats"]
    assert {(r["method"], r["batch"]) for r in summary} == {(m, b) for m in ("tk_n", "tome") for b in (1, 2)}
    for s in summary:
        derived = {"lost_to_method": lambda r: r["bound_of_ideal"] - r["of_ideal"],
                   "method_ms": lambda r: r["median_ms"] - r["bound_ms"]}
        for key in ("of_bound", "of_ideal", "bound_of_ideal", "lost_to_method", "method_ms"):
            values = [derived[key](r) if key in derived else r[key]
                      for r in rows if (r["method"], r["batch"]) == (s["method"], s["batch"])]
            assert s["repeats"] == len(values) == 3
            assert s[key] == pytest.approx(sum(values) / 3)
            assert s[f"{key}_range"] == [min(values), max(values)]
            low, high = s[f"{key}_ci"]
            assert low <= s[key] <= high
    assert table.count("#### Repeat ") == 3 and "#### Across the 3 repeats" in table
    assert table.count("eager (train step)") == 3  # timed once, after the repeats: one row per model


def test_from_json_prints_a_saved_report_again_without_measuring(tmp_path, capsys, monkeypatch):
    out, md = tmp_path / "bench.json", tmp_path / "again.md"
    assert deploy_benchmark.main(["--arch", "vit_pico_patch2_8", "--methods", "tk_n", "--reduce_token", "3",
                                  "--runtimes", "eager", "--threads", "1", "--quick", "--train_batch_size", "0",
                                  "--repeats", "2", "--json", str(out)]) == 0
    measured = capsys.readouterr().out
    monkeypatch.setattr(deploy_benchmark, "time_interleaved", None)  # nothing may be timed
    saved = out.read_text()
    assert deploy_benchmark.main(["--from_json", str(out), "--md", str(md), "--json", str(out)]) == 0
    assert capsys.readouterr().out == measured == md.read_text()
    assert out.read_text() == saved  # the saved report is read, never rewritten
    # a report saved by a version that kept no summary across repeats gets the current one
    report = json.loads(out.read_text())
    del report["across_repeats"]
    out.write_text(json.dumps(report))
    assert deploy_benchmark.main(["--from_json", str(out)]) == 0
    assert capsys.readouterr().out == measured


def test_from_json_of_a_file_that_is_no_report_is_a_one_line_error(tmp_path, capsys):
    for text in ('{"inference": []}', "{"):
        (tmp_path / "other.json").write_text(text)
        assert deploy_benchmark.main(["--from_json", str(tmp_path / "other.json")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("deploy_benchmark.py: error: --from_json: ") and err.count("\n") == 1
    assert deploy_benchmark.main(["--from_json", str(tmp_path / "absent.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert deploy_benchmark.main(["--from_json", str(tmp_path / "other.json"),
                                  "--md", str(tmp_path / "absent" / "t.md")]) == 2
    assert capsys.readouterr().err.startswith("deploy_benchmark.py: error: --md: the folder of")


def test_an_interrupted_run_keeps_the_cells_it_measured(tmp_path, monkeypatch):
    timed = deploy_benchmark.time_interleaved

    def interrupted_in_the_third_cell(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return timed(*args, **kwargs)
    calls = []
    monkeypatch.setattr(deploy_benchmark, "time_interleaved", interrupted_in_the_third_cell)
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    with pytest.raises(KeyboardInterrupt):  # the cells run batch 1 then 2, in each repeat
        deploy_benchmark.main(["--arch", "vit_pico_patch2_8", "--methods", "tk_n", "--reduce_token", "3",
                               "--runtimes", "eager", "--threads", "1", "--quick", "--repeats", "2",
                               "--json", str(out), "--md", str(md)])
    report = json.loads(out.read_text())
    assert not report["complete"] and report["training"] == []
    assert [(r["repeat"], r["batch"], r["method"]) for r in report["inference"]] == [
        (0, b, m) for b in (1, 2) for m in ("none", "tk_n")]
    assert report["across_repeats"] == []  # one repeat of each cell: no spread yet
    table = md.read_text()
    assert table.count("| eager | 1 | 2 | tk_n |") == 1 and "#### Repeat 1 of 2" in table
    assert "Interrupted after" in table and "#### Repeat 2 of 2" not in table


def test_a_missing_output_folder_is_a_one_line_error(tmp_path, capsys):
    assert deploy_benchmark.main(["--md", str(tmp_path / "absent" / "bench.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deploy_benchmark.py: error: --md: the folder of") and err.count("\n") == 1


def test_thread_counts_are_one_line_errors_when_bad(capsys):
    assert deploy_benchmark.main(["--threads", "1,two"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deploy_benchmark.py: error: --threads: expected") and err.count("\n") == 1


def test_keep_models_times_the_same_models_in_every_repeat(tmp_path, capsys, built):
    out = tmp_path / "bench.json"
    assert deploy_benchmark.main(["--arch", "vit_pico_patch2_8", "--methods", "tk_n", "--reduce_token", "3",
                                  "--runtimes", "eager", "--threads", "1", "--quick", "--train_batch_size", "0",
                                  "--repeats", "2", "--keep_models", "--json", str(out)]) == 0
    assert len(built) == 1
    report = json.loads(out.read_text())
    assert report["settings"]["keep_models"] and [r["repeats"] for r in report["across_repeats"]] == [2, 2]
    assert "#### Across the 2 repeats (the same models in each)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats: must be >= 1"),
    (["--keep_models"], "--keep_models: only with --repeats 2 or more"),
])
def test_bad_repeats_are_a_one_line_error(capsys, argv, message):
    assert deploy_benchmark.main(argv) == 2
    assert capsys.readouterr().err == f"deploy_benchmark.py: error: {message}\n"


def test_bad_runtime_is_one_line(capsys):
    assert deploy_benchmark.main(["--runtimes", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deploy_benchmark.py: error: --runtimes: unknown runtime 'tensorrt'") and err.count("\n") == 1


def test_random_keep_is_refused_for_onnxruntime_in_one_line(capsys):
    assert deploy_benchmark.main(["--methods", "tk_n,random", "--runtimes", "eager,onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deploy_benchmark.py: error: --methods random: not exported to ONNX") and err.count("\n") == 1


def test_amp_dtype_runs_the_models_under_autocast(tmp_path, capsys):
    seen = []
    deploy_benchmark.on_device(lambda: seen.append(torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype),
                               torch.device("cpu"), torch.bfloat16)()
    assert seen == [torch.bfloat16]
    out = tmp_path / "bench.json"
    code = deploy_benchmark.main(["--arch", "vit_pico_patch2_8", "--methods", "tome", "--reduce_token", "3",
                                  "--runtimes", "eager", "--amp_dtype", "bfloat16", "--threads", "1", "--quick",
                                  "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["settings"]["precision"] == "bfloat16 autocast" and report["settings"]["device"] == "cpu"
    assert report["machine"]["gpu"] is None
    assert capsys.readouterr().out.startswith("### vit_pico_patch2_8 @ 8px, schedule 3, bfloat16 autocast")


@pytest.mark.parametrize("argv, start", [
    (["--amp_dtype", "bfloat16", "--runtimes", "eager,onnxruntime"], "--runtimes onnxruntime: measured on the CPU"),
    (["--amp_dtype", "float16", "--runtimes", "eager"], "--amp_dtype float16: autocast on CPU runs bfloat16"),
])
def test_runtime_and_precision_clashes_are_one_line(capsys, argv, start):
    assert deploy_benchmark.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"deploy_benchmark.py: error: {start}") and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(capsys):
    assert deploy_benchmark.main(["--device", "cuda", "--runtimes", "eager"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deploy_benchmark.py: error: --device cuda: no CUDA device") and err.count("\n") == 1


class _Scaled(torch.nn.Module):
    """One forward shared by every instance, recompiled for each ``factor`` (a Python constant dynamo guards on),
    as the benchmark's models share timm's forward."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_the_compile_runtime_compiles_every_model_past_dynamos_default_limit():
    import torch._dynamo
    from torch._dynamo.utils import counters

    # config.patch restores the settings afterwards (monkeypatch cannot: dynamo's config is not a plain module)
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=False):
        torch._dynamo.reset()
        counters.clear()
        x = torch.ones(2)
        with deploy_benchmark.allow_compiles(12):
            for factor in range(12):  # without the raised limit the last 4 would run in eager, silently
                assert torch.compile(_Scaled(factor), backend="eager")(x).tolist() == [factor, factor]
        assert counters["stats"]["unique_graphs"] == 12
        # and on leaving, dynamo's own settings are back
        assert (torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit) == (8, False)
    torch._dynamo.reset()


def test_a_report_file_is_replaced_whole_or_kept_as_it_was(tmp_path, monkeypatch):
    report_path, tables_path = tmp_path / "bench.json", tmp_path / "bench.md"
    args = argparse.Namespace(json=str(report_path), md=str(tables_path))
    save = deploy_benchmark.report_saver(args, render=lambda report: f"{len(report)} rows\n")
    save({"rows": 1})
    assert json.loads(report_path.read_text()) == {"rows": 1} and tables_path.read_text() == "1 rows\n"

    def interrupted(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupted)  # a Ctrl-C after the new text is written, before the rename
    with pytest.raises(KeyboardInterrupt):
        save({"rows": 2, "more": 3})
    assert json.loads(report_path.read_text()) == {"rows": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md"]  # no temporary file left

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(CLIError, match=r"^--json: could not write .*bench\.json \(No space left on device\); "
                                       r"the file as it was before is kept$"):
        save({"rows": 2, "more": 3})
    assert json.loads(report_path.read_text()) == {"rows": 1} and tables_path.read_text() == "1 rows\n"
