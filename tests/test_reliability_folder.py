"""ImageFolder data (--data_name folder): files that do not decode are named by path; folders with no
images, or with a single class, are refused before anything is trained."""
import multiprocessing
import os

import numpy as np
import pytest
from PIL import Image

import main
from cli_helpers import one_error_line

RNG = np.random.default_rng(0)
ARGV = ["--data_name", "folder", "--arch", "vit_pico_patch4_32", "--epochs", "1", "--batch_size", "4",
        "--bench_steps", "1", "--bench_warmup", "0"]


def write_images(folder, n: int = 4) -> None:
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(RNG.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def write_folder(root, classes=("cat", "dog")) -> None:
    for split in ("train", "val"):
        for name in classes:
            write_images(root / split / name)


def fails(capsys, root, *argv) -> str:
    return one_error_line(capsys, [*ARGV, "--data_root", str(root), "--output_dir", str(root / "out"), *argv])


@pytest.mark.parametrize("workers", ["0", "2"])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_an_image_that_does_not_decode_is_named(capsys, tmp_path, workers, damage):
    write_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "broken.png"
    if damage == "garbage":
        bad.write_bytes(b"this is not a PNG file")
    else:  # a valid header, the pixel data cut off
        whole = (tmp_path / "train" / "dog" / "0.png").read_bytes()
        bad.write_bytes(whole[: len(whole) // 2])
    before = set(multiprocessing.active_children())
    line = fails(capsys, tmp_path, "--num_workers", workers)
    assert f"cannot decode {bad}" in line and "--data_name folder" in line and "replace or delete" in line
    left = [child for child in multiprocessing.active_children() if child not in before]
    assert left == []  # the failed run's loader workers are stopped: they would keep this process from exiting


def test_a_folder_without_class_folders(capsys, tmp_path):
    (tmp_path / "train").mkdir()
    write_images(tmp_path / "val" / "cat")
    line = fails(capsys, tmp_path)
    assert "--data_name folder" in line and "train" in line and "<data_root>/train/<class>" in line


def test_a_class_folder_without_images(capsys, tmp_path):
    write_folder(tmp_path)
    (tmp_path / "train" / "bird").mkdir()
    (tmp_path / "train" / "bird" / "notes.txt").write_text("no images here")
    line = fails(capsys, tmp_path)
    assert "--data_name folder" in line and "bird" in line


def test_a_single_class_is_refused(capsys, tmp_path):
    write_folder(tmp_path, classes=("cat",))
    line = fails(capsys, tmp_path)
    assert "one class folder (cat/)" in line and "at least two" in line
    assert not (tmp_path / "out" / "last.pt").exists()


def test_a_good_folder_trains(tmp_path):
    write_folder(tmp_path)
    results = main.run(main.parse_args([*ARGV, "--data_root", str(tmp_path), "--output_dir", str(tmp_path / "out")]))
    assert 0.0 <= results["accuracy"] <= 100.0
