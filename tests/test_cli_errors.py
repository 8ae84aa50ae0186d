"""Bad input ends with exit code 2 and one line on stderr that names the option, never a traceback."""
import os
import pickle
import subprocess
import sys

import pytest
import torch

import engine.hub
import engine.model
from engine.model import create_model
from cli_helpers import fails

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--epochs", "1", "--train_subset", "32", "--test_subset", "16", "--batch_size", "16",
        "--bench_steps", "1", "--bench_warmup", "0"]


@pytest.mark.parametrize("argv, names", [
    (["--model", "topk"], ["--model", "invalid choice", "tk_n"]),
    (["--reduce_token", "-1"], ["--reduce_token", ">= 0"]),
    (["--reduce_token", "two"], ["--reduce_token", "comma list"]),
    (["--reduce_at", "mlp"], ["--reduce_at", "invalid choice"]),
    (["--data_name", "imagenet"], ["--data_name", "digits"]),
    (["--epochs", "0"], ["--epochs", ">= 1"]),
    (["--lr", "-1"], ["--lr", "> 0"]),
    (["--batch_size", "x"], ["--batch_size", "integer"]),
    (["--no-such-option"], ["unrecognized arguments", "--no-such-option"]),
    (["--config", "missing.yaml"], ["--config", "missing.yaml", "not found"]),
])
def test_bad_option_values(capsys, argv, names):
    line = fails(capsys, *argv)
    for name in names:
        assert name in line


def test_reduce_token_list_of_the_wrong_length(capsys, tmp_path):
    line = fails(capsys, *TINY, "--output_dir", str(tmp_path), "--reduce_token", "1,2,3")
    assert "--reduce_token" in line and "3 values" in line and "4 blocks" in line


@pytest.mark.parametrize("argv, names", [
    (["--arch", "not_a_model"], ["--arch", "not_a_model", "list_models"]),
    (["--arch", "resnet18"], ["--arch", "VisionTransformer"]),
    (["--arch", "vit_pico_patch2_8", "--pretrained"], ["--pretrained", "--checkpoint"]),
    (["--img_size", "9"], ["--img_size 9", "--patch_size 2"]),
    (["--device", "tpu9"], ["--device", "tpu9"]),
    (["--eval_only"], ["--eval_only", "--checkpoint"]),
    (["--checkpoint", "nowhere.pt"], ["--checkpoint", "nowhere.pt", "not found"]),
    (["--resume", "nowhere.pt"], ["--resume", "nowhere.pt", "not found"]),
])
def test_bad_runs(capsys, tmp_path, argv, names):
    line = fails(capsys, *TINY, "--output_dir", str(tmp_path / "out"), *argv)
    for name in names:
        assert name in line


def test_cuda_requested_without_cuda(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    line = fails(capsys, *TINY, "--output_dir", str(tmp_path), "--device", "cuda")
    assert "--device cuda" in line and "--device cpu" in line


def test_unwritable_output_dir(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    line = fails(capsys, *TINY, "--output_dir", str(blocker / "out"))
    assert "--output_dir" in line


def test_dataset_missing_offline(capsys, tmp_path):
    line = fails(capsys, *TINY, "--output_dir", str(tmp_path / "out"), "--data_name", "CIFAR10",
                 "--data_root", str(tmp_path / "data"), "--no-download")
    assert "--data_name CIFAR10" in line and "cifar-10-batches-py" in line and "--data_root" in line


def test_hub_weights_that_cannot_be_fetched(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(engine.hub, "hub_unreachable", lambda: "the hub cannot be reached (offline)")
    line = fails(capsys, *TINY, "--output_dir", str(tmp_path / "out"), "--arch", "vit_tiny_patch16_224",
                 "--img_size", "32", "--pretrained")
    assert "--pretrained" in line and "--checkpoint" in line and "HF_HUB_OFFLINE" in line


class Payload:
    """An object whose unpickling would run code."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_with_pickled_objects_is_refused(capsys, tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Payload()}, f, protocol=2)
    line = fails(capsys, *TINY, "--output_dir", str(tmp_path / "out"), "--eval_only", "--checkpoint", str(path))
    assert "--checkpoint" in line and "not loaded" in line


def test_damaged_and_mismatched_checkpoints(capsys, tmp_path):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    line = fails(capsys, *TINY, "--output_dir", str(tmp_path / "out"), "--eval_only", "--checkpoint", str(damaged))
    assert "--checkpoint" in line and "damaged" in line

    other = create_model("vit_pico_patch4_28", 10, 1)
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": other.state_dict()}, wrong)  # another embedding: does not fit the digits model
    line = fails(capsys, *TINY, "--output_dir", str(tmp_path / "out"), "--eval_only", "--checkpoint", str(wrong))
    assert "--checkpoint" in line and "--arch" in line


def test_resume_with_eval_only_is_refused(capsys, tmp_path):
    line = fails(capsys, *TINY, "--output_dir", str(tmp_path), "--resume", "x.pt", "--eval_only")
    assert "--resume" in line


def test_command_line_process_prints_one_line(tmp_path):
    """The real process: exit code 2, one stderr line, no traceback (argparse usage text included)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--data_name", "STL10",
                           "--data_root", str(tmp_path), "--no-download", "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "stl10_binary" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
