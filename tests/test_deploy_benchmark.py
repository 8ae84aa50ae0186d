"""tools/deploy_benchmark.py runs end to end on a tiny model and writes JSON of the documented structure
(speed itself is never asserted: the machine is shared)."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import deploy_benchmark  # noqa: E402


def test_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = deploy_benchmark.main(["--arch", "vit_pico_patch2_8", "--methods", "tk_n", "--reduce_token", "3",
                                  "--batch_sizes", "1,2", "--runtimes", "eager,onnxruntime", "--rounds", "1",
                                  "--latency_rounds", "2", "--warmup", "0", "--train_batch_size", "2",
                                  "--train_rounds", "1", "--threads", "1", "--json", str(out)])
    table = capsys.readouterr().out
    assert code == 0
    report = json.loads(out.read_text())
    assert {"cpu", "threads", "torch", "onnxruntime"} <= set(report["machine"])
    assert report["machine"]["threads"] == 1 and len(report["loadavg_start"]) == 3
    rows = {(r["runtime"], r["method"], r["batch"]) for r in report["inference"]}
    assert rows == {(rt, m, b) for rt in ("eager", "onnxruntime") for m in ("none", "tk_n") for b in (1, 2)}
    for r in report["inference"] + report["training"]:
        assert {"median_ms", "p90_ms", "images_per_s", "speedup", "ideal", "of_ideal"} <= set(r)
        assert r["speedup"] > 0 and (r["ideal"] > 1) == (r["method"] != "none")
    assert [r["method"] for r in report["training"]] == ["none", "tk_n"]
    assert "| onnxruntime | tk_n | 1 |" in table and report["machine"]["cpu"] in table


def test_bad_runtime_is_one_line(capsys):
    assert deploy_benchmark.main(["--runtimes", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deploy_benchmark.py: error: --runtimes: unknown runtime 'tensorrt'") and err.count("\n") == 1


def test_random_keep_is_refused_for_onnxruntime_in_one_line(capsys):
    assert deploy_benchmark.main(["--methods", "tk_n,random", "--runtimes", "eager,onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deploy_benchmark.py: error: --methods random: not exported to ONNX") and err.count("\n") == 1
