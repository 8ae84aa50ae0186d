"""`pip install .` gives the library and only the library: `pruning` importable from any folder,
with torch and timm as its only required dependencies."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


COPIED = {"pyproject.toml", "README.md", "LICENSE", "pruning", "main.py", "data", "engine", "tools", "tests"}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the clone's files, to build in, so that the clone stays clean."""
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for name in ("pruning", "main.py", "data", "engine", "tools", "tests"):  # all there, so the filter is tested
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": ignore} if (ROOT / name).is_dir() else {}))
    return source


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    """The wheel `pip install .` would install."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--disable-pip-version-check", "-w", str(out), str(source)], check=True)
    (built,) = out.glob("*.whl")
    return built


def test_what_the_build_leaves_in_the_clone_is_ignored_by_git(wheel, source):
    """Issue 20: `pip install .` leaves build/ and *.egg-info/ beside the sources; git ignores them."""
    left = sorted(p.name + "/" for p in source.iterdir() if p.name not in COPIED and p.is_dir())
    assert any(name.endswith(".egg-info/") for name in left), left  # what setuptools leaves, so the check sees it
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *left], cwd=ROOT, capture_output=True, text=True)
    assert sorted(ignored.stdout.split()) == left


def test_the_wheel_holds_the_library_package_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"pruning"}
    assert "pruning/patch/timm.py" in names and "pruning/core/methods.py" in names


def test_the_library_depends_on_torch_and_timm_only(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        lines = archive.read(metadata).decode().splitlines()
    required = {line.split(":", 1)[1].split(">")[0].split("=")[0].split("<")[0].strip()
                for line in lines if line.startswith("Requires-Dist:") and "extra ==" not in line}
    assert required == {"torch", "timm"}


def test_installed_library_patches_a_timm_model_from_another_folder(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check",
                    "--target", str(target), str(wheel)], check=True)
    code = ("import timm, pruning.patch as p; m = timm.create_model('vit_tiny_patch16_224'); "
            "p.apply_patch(m, 'tome', 8); import pruning; print(pruning.__file__)")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_relative_to(target)  # the installed copy, not the clone
