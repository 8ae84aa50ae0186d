"""main.py under torchrun: 2 processes on the CPU (gloo) on digits.

The reported accuracy is the whole test set's, each image counted once (101 test images: the shards
hold 51 and 50, where DistributedSampler would pad to 2 x 51), and equals a single-process evaluation
of the saved checkpoint; only rank 0 logs and writes; a run stopped by SIGTERM continues under
torchrun to the same weights as the uninterrupted one.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import main
from engine.sampling import ResumableDistributedSampler, ShardSampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGV = ["--epochs", "2", "--train_subset", "600", "--test_subset", "101", "--batch_size", "16", "--lr_base", "0.064",
        "--warmup_epochs", "0.5", "--bench_steps", "1", "--bench_warmup", "0"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun(*argv, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen([*TORCHRUN, os.path.join(ROOT, "main.py"), *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    proc = torchrun(*ARGV, "--output_dir", str(out))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return out, stdout


def test_accuracy_is_the_whole_test_set_once(ddp_run, tmp_path):
    out, _ = ddp_run
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["epochs"] == 2
    single = main.run(main.parse_args(["--eval_only", "--checkpoint", str(out / "last.pt"), "--test_subset", "101",
                                       "--bench_steps", "1", "--bench_warmup", "0", "--output_dir", str(tmp_path)]))
    assert results["accuracy"] == single["accuracy"]
    assert round(results["accuracy"] * 101 / 100, 6).is_integer()  # a count out of 101, not out of 102


def test_rank_0_alone_logs_and_writes(ddp_run):
    out, stdout = ddp_run
    assert stdout.count("Summary") == 1 and stdout.count("epoch 2/2  train loss") == 1
    assert "batch 16 x 2 processes" in stdout
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["ranks"]) == 2
    assert not [key for key in checkpoint["model"] if key.startswith("module.")]
    # the learning rate follows the global batch: lr_base * batch_size * world_size / 512
    assert checkpoint["settings"]["lr"] == pytest.approx(0.064 * 16 * 2 / 512)


def test_sigterm_then_resume_under_torchrun(ddp_run, tmp_path):
    out, _ = ddp_run
    stopped = tmp_path / "stopped"
    proc = torchrun(*ARGV, "--output_dir", str(stopped))
    for line in proc.stdout:
        if line.startswith("training "):  # rank 0 is about to take its first step
            proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both processes
            break
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert stderr.count("main.py: stopped by SIGTERM") == 1, stderr[-3000:]  # rank 0 says it, once
    partial = torch.load(stopped / "last.pt", weights_only=True)
    assert partial["world_size"] == 2 and partial["epoch"] < 2
    assert not (stopped / "results.json").exists()

    proc = torchrun("--resume", str(stopped / "last.pt"), "--bench_steps", "1")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed from" in stdout
    a = torch.load(out / "last.pt", weights_only=True)
    b = torch.load(stopped / "last.pt", weights_only=True)
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert [h["test_acc"] for h in a["history"]] == [h["test_acc"] for h in b["history"]]
    assert json.loads((stopped / "results.json").read_text())["accuracy"] == a["history"][-1]["test_acc"]


def test_resume_with_another_number_of_processes_is_refused(ddp_run, capsys, tmp_path):
    out, _ = ddp_run
    assert main.main(["--resume", str(out / "last.pt"), "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "2 process(es), this one has 1" in err and err.count("\n") == 1


def test_samplers_count_each_test_image_once_and_resume_part_way():
    shards = [list(ShardSampler(101, rank, 2)) for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(101)) and [len(s) for s in shards] == [51, 50]
    sampler = ResumableDistributedSampler(range(101), num_replicas=2, rank=1, shuffle=True, seed=3)
    sampler.set_epoch(4)
    whole = list(sampler)
    sampler.skip = 20
    assert len(sampler) == len(whole) - 20 and list(sampler) == whole[20:]
    assert list(sampler) == whole  # the skip is for one epoch only
