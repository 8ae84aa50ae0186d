"""Untrusted, damaged and mismatched checkpoints: refused with one line naming the option, nothing in
them executes, and a head of another size is left out only where that makes sense (fine-tuning)."""
import pytest
import torch

import main
from engine.model import create_model
from cli_helpers import fails

TINY = ["--epochs", "1", "--train_subset", "32", "--test_subset", "16", "--batch_size", "16",
        "--bench_steps", "1", "--bench_warmup", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished two-epoch run on digits: its last.pt is a complete main.py checkpoint."""
    out = tmp_path_factory.mktemp("trained")
    main.run(main.parse_args([*TINY, "--epochs", "2", "--output_dir", str(out)]))
    return out


class WritesAFile:
    """Unpickling it would call open(marker, "w"): proof that code in a checkpoint ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("option", ["--checkpoint", "--resume"])
def test_pickled_code_is_refused_and_never_runs(capsys, tmp_path, option):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": WritesAFile(marker)}, evil)
    mode = ["--eval_only"] if option == "--checkpoint" else []
    line = fails(capsys, *TINY, "--output_dir", str(tmp_path / "out"), *mode, option, str(evil))
    assert option in line and "not loaded" in line and "state_dict()" in line
    assert not marker.exists()


@pytest.mark.parametrize("option", ["--checkpoint", "--resume"])
def test_truncated_checkpoint(capsys, tmp_path, trained, option):
    whole = (trained / "last.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole[: len(whole) // 2])
    mode = ["--eval_only"] if option == "--checkpoint" else []
    line = fails(capsys, *TINY, "--output_dir", str(tmp_path / "out"), *mode, option, str(cut))
    assert option in line and "damaged" in line and str(cut) in line


def test_truncated_safetensors(capsys, tmp_path, trained):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(torch.load(trained / "last.pt", weights_only=True)["model"], str(path))
    path.write_bytes(path.read_bytes()[:100])
    line = fails(capsys, *TINY, "--output_dir", str(tmp_path / "out"), "--eval_only", "--checkpoint", str(path))
    assert "--checkpoint" in line and "damaged" in line


def test_evaluating_a_head_for_other_classes_is_refused(capsys, tmp_path):
    model = create_model("vit_pico_patch2_8", 100, 1)
    path = tmp_path / "cifar100_head.pth"
    torch.save(model.state_dict(), path)
    line = fails(capsys, *TINY, "--output_dir", str(tmp_path / "out"), "--eval_only", "--checkpoint", str(path))
    assert "100 classes" in line and "has 10" in line and "--data_name" in line and "--eval_only" in line


def test_wrong_arch_names_the_options(capsys, tmp_path):
    other = create_model("vit_pico_patch4_28", 10, 1)
    path = tmp_path / "fashion.pt"
    torch.save({"model": other.state_dict()}, path)
    for mode in (["--eval_only"], []):  # evaluating, and fine-tuning from it
        line = fails(capsys, *TINY, "--output_dir", str(tmp_path / "out"), *mode, "--checkpoint", str(path))
        assert "--checkpoint" in line and "--arch" in line and "--patch_size" in line


def test_resume_needs_a_complete_training_checkpoint(capsys, tmp_path, trained):
    weights = tmp_path / "weights.pt"
    torch.save({"model": torch.load(trained / "last.pt", weights_only=True)["model"]}, weights)
    line = fails(capsys, "--resume", str(weights))
    assert "--resume" in line and "optimizer" in line and f"--checkpoint {weights}" in line


def test_resume_with_tensors_that_do_not_fit(capsys, tmp_path, trained):
    checkpoint = torch.load(trained / "last.pt", weights_only=True)
    checkpoint["model"]["head.weight"] = torch.zeros(7, 64)  # edited: 7 classes where the settings say 10
    path = tmp_path / "edited.pt"
    torch.save(checkpoint, path)
    line = fails(capsys, "--resume", str(path), "--output_dir", str(tmp_path / "out"))
    assert "--resume" in line and "does not fit" in line and "head.weight" in line


def test_resume_with_another_number_of_processes(capsys, tmp_path, trained):
    checkpoint = torch.load(trained / "last.pt", weights_only=True)
    checkpoint["world_size"] = 4
    path = tmp_path / "ddp.pt"
    torch.save(checkpoint, path)
    line = fails(capsys, "--resume", str(path), "--output_dir", str(tmp_path / "out"))
    assert "4 process(es)" in line and "torchrun --nproc_per_node" in line


def test_checkpoints_reload_with_weights_only(trained):
    """What main.py writes is what the safe loader accepts (tensors and plain data only)."""
    for name in ("last.pt", "best.pt"):
        checkpoint = torch.load(trained / name, weights_only=True)
        assert checkpoint["world_size"] == 1 and checkpoint["step"] == 0
        assert set(checkpoint["progress"]) == {"step", "loss_sum", "correct", "seen", "seconds"}
