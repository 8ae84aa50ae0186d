"""SIGINT (Ctrl-C) and SIGTERM during training: the step in progress finishes, last.pt holds it, the run
exits, and --resume continues to exactly the result of the uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import main
from engine.errors import Interrupted
from engine.signals import StopSignal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 steps of 16 per epoch; light augmentation draws random numbers for every image, so an exact
# resume needs every generator restored, not only the weights
ARGV = ["--epochs", "3", "--train_subset", "64", "--test_subset", "40", "--batch_size", "16", "--augment", "light",
        "--model", "tome", "--reduce_token", "2", "--bench_steps", "1", "--bench_warmup", "0"]
TRAIN, TEST = 64, 40  # images read per epoch


def run(out, *argv):
    return main.run(main.parse_args([*ARGV, "--output_dir", str(out), *argv]))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run: its results and its last.pt."""
    out = tmp_path_factory.mktemp("straight")
    return run(out), torch.load(out / "last.pt", weights_only=True)


def signal_at_read(monkeypatch, n: int, signum: int) -> None:
    """Send ``signum`` to this process while the ``n``-th image (counting from 1) is read."""
    reads = []
    real = data.Digits.__getitem__

    def getitem(self, index):
        reads.append(index)
        if len(reads) == n:
            os.kill(os.getpid(), signum)
        return real(self, index)

    monkeypatch.setattr(data.Digits, "__getitem__", getitem)


def assert_same_run(resumed, resumed_last, straight) -> None:
    results, last = straight
    for key in ("accuracy", "best_accuracy", "gflops", "epochs", "method", "schedule", "seed"):
        assert resumed[key] == results[key], key
    strip = [{k: v for k, v in h.items() if k != "time_s"} for h in last["history"]]
    assert [{k: v for k, v in h.items() if k != "time_s"} for h in resumed_last["history"]] == strip
    for name, tensor in last["model"].items():
        assert torch.equal(tensor, resumed_last["model"][name]), name
    for key in ("torch", "loader"):
        assert torch.equal(last["rng"][key], resumed_last["rng"][key]), key


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_epoch_then_resume(tmp_path, monkeypatch, straight, signum):
    # while reading the 2nd batch of epoch 2: that step finishes, then the run stops
    signal_at_read(monkeypatch, TRAIN + TEST + 16 + 5, signum)
    out = tmp_path / "run"
    handlers = [signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)]
    with pytest.raises(Interrupted) as stopped:
        run(out)
    assert [signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)] == handlers  # put back
    assert stopped.value.exit_code == 128 + signum
    assert f"stopped by {signal.Signals(signum).name} after step 2 of 4 in epoch 2/3" in str(stopped.value)
    assert f"--resume {out / 'last.pt'}" in str(stopped.value)
    last = torch.load(out / "last.pt", weights_only=True)
    assert (last["epoch"], last["step"], last["progress"]["seen"]) == (1, 2, 32)
    assert not (out / "results.json").exists() and not list(out.glob("*.tmp"))

    monkeypatch.undo()
    resumed = main.run(main.parse_args(["--resume", str(out / "last.pt"), "--bench_steps", "1"]))
    assert_same_run(resumed, torch.load(out / "last.pt", weights_only=True), straight)


def test_signal_during_evaluation_stops_after_the_epoch(tmp_path, monkeypatch, straight):
    signal_at_read(monkeypatch, TRAIN + 10, signal.SIGTERM)  # epoch 1's test pass
    out = tmp_path / "run"
    with pytest.raises(Interrupted, match="after epoch 1/3"):
        run(out)
    last = torch.load(out / "last.pt", weights_only=True)
    assert (last["epoch"], last["step"]) == (1, 0) and len(last["history"]) == 1
    monkeypatch.undo()
    resumed = main.run(main.parse_args(["--resume", str(out / "last.pt"), "--bench_steps", "1"]))
    assert_same_run(resumed, torch.load(out / "last.pt", weights_only=True), straight)


def test_second_ctrl_c_stops_at_once():
    handler = signal.getsignal(signal.SIGINT)
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs before this returns
    assert signal.getsignal(signal.SIGINT) is handler


def test_sigterm_to_the_process(tmp_path, straight):
    """The real command: SIGTERM once training has started, exit 143 with one line, then --resume."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *ARGV, "--output_dir", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("training "):  # printed just before the first step
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("main.py: stopped by SIGTERM") and "Traceback" not in err, err
    assert "--resume" in lines[0]
    resumed = main.run(main.parse_args(["--resume", str(out / "last.pt"), "--bench_steps", "1"]))
    assert_same_run(resumed, torch.load(out / "last.pt", weights_only=True), straight)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_process_group(tmp_path, signum):
    """Ctrl-C in a terminal signals the whole process group, and batch schedulers send SIGTERM to every
    process of a job: loader workers included. They ignore it, so that the run still finishes its
    step, writes last.pt and exits with 128 + signal (a worker killed by SIGTERM would fail the run)."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *ARGV, "--num_workers", "2",
                             "--train_subset", "640", "--output_dir", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("epoch 1/3"):  # the (persistent) workers are running, epoch 2 has begun
            os.killpg(proc.pid, signum)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"main.py: stopped by {signal.Signals(signum).name}"), err
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] >= 1
