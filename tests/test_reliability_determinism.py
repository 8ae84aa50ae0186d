"""The same command with the same seed gives the same results.json on CPU, bit for bit, apart from the
measured times (main.TIMING_KEYS: throughput, baseline_throughput, speedup)."""
import json
import os
import subprocess
import sys

import torch

import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# random augmentation, loader worker processes, a method with random-free but data-dependent choices
ARGV = ["--epochs", "2", "--train_subset", "96", "--test_subset", "40", "--batch_size", "16", "--augment", "light",
        "--num_workers", "2", "--model", "evit", "--reduce_token", "2", "--seed", "7",
        "--bench_steps", "1", "--bench_warmup", "0"]


def without_times(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in main.TIMING_KEYS}


def test_same_command_same_results(tmp_path):
    # once in this process (after other tests have used the generators), once in a fresh one
    main.run(main.parse_args([*ARGV, "--output_dir", str(tmp_path / "a")]))
    subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *ARGV, "--output_dir", str(tmp_path / "b")],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    a, b = (json.loads((tmp_path / name / "results.json").read_text()) for name in "ab")
    assert set(main.TIMING_KEYS) < set(a) and a["throughput"] > 0
    assert without_times(a) == without_times(b)
    logs = [[{k: v for k, v in json.loads(line).items() if k != "time_s"}
             for line in (tmp_path / name / "log.jsonl").read_text().splitlines()] for name in "ab"]
    assert logs[0] == logs[1] and len(logs[0]) == 2
    ca, cb = (torch.load(tmp_path / name / "last.pt", weights_only=True) for name in "ab")
    for key, tensor in ca["model"].items():
        assert torch.equal(tensor, cb["model"][key]), key


def test_another_seed_gives_another_run(tmp_path):
    argv = [a if a != "7" else "8" for a in ARGV]
    other = main.run(main.parse_args([*argv, "--output_dir", str(tmp_path / "c")]))
    main.run(main.parse_args([*ARGV, "--output_dir", str(tmp_path / "d")]))
    assert other["seed"] == 8
    c, d = (torch.load(tmp_path / name / "last.pt", weights_only=True)["model"] for name in "cd")
    assert not torch.equal(c["head.weight"], d["head.weight"])
