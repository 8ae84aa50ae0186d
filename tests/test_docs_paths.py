"""Issue 20: every repository path that the README, docs/, the results READMEs, the configs and the
programs' own messages name is one the program reads or writes, never a stale one.

A path (a word starting with one of the repository's folders, e.g. `output/latest/best.pt`,
`configs/x.yaml`, `results/...`) is accepted when it
- exists in the repository (a file or a folder; `*` patterns must match something), or
- lies in a run folder that main.py makes: `output/`, `output/latest`, `output/<placeholder>` or a dated
  run name, optionally followed by a file a run writes (`RUN_FILES`, `visualization.png`), or
- is main.py's default data folder (`datasets/`) or a file a dataset reader reads there, or
- lies under a folder that a documented command or config writes to (`--output_dir`, `--out_dir`,
  `--work_dir`, `--out`, `--json`, `--md`; `output_dir:`, `out_dir:`, `work_dir:` in YAML).
"""
import re
from pathlib import Path
from typing import List, Set, Tuple

import pytest

from data import datasets as readers
from engine.outputs import RUN_FILES

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ([ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "results").glob("*/README.md"))
         + sorted((ROOT / "configs").glob("*.yaml")) + [ROOT / "main.py"]
         + sorted(p for folder in ("engine", "tools", "data", "pruning") for p in (ROOT / folder).rglob("*.py")))
FOLDERS = ("output", "results", "configs", "docs", "tools", "tests", "runs", "engine", "pruning", "data", "datasets")
PATH_RE = re.compile(r"(?<![\w./<>-])((?:%s)/[\w./<>*+-]*)" % "|".join(FOLDERS))
WRITES_RE = re.compile(r"(?:--(?:output_dir|out_dir|work_dir|out|json|md)[ =]|\b(?:output_dir|out_dir|work_dir):\s*)"
                       r"([\w./-]+)")
RUN_FOLDER = r"(?:latest|LATEST|<[^/]*>|\d{8}-\d{6}_[\w.+-]+)"
RUN_PRODUCTS = "|".join(re.escape(name) for name in (*RUN_FILES, "visualization.png", "predictions.npz"))
OUTPUT_RE = re.compile(rf"output/(?:{RUN_FOLDER}(?:/(?:{RUN_PRODUCTS}))?)?/?")
DATA_ROOT = "datasets"  # main.py's --data_root default (checked below)
DATA_FILES = {f"{DATA_ROOT}/{name}" for files in (readers.FASHION_MNIST_FILES, readers.CIFAR10_FILES,
                                                  readers.CIFAR100_FILES, readers.STL10_FILES) for name in files}


def named_paths() -> List[Tuple[str, str]]:
    """(file, path) for every repository path named in the texts."""
    found = []
    for text_path in TEXTS:
        for match in PATH_RE.finditer(text_path.read_text()):
            path = match.group(1).rstrip(".,:;")
            if path.endswith(".py") and "/" not in path[:-3]:
                continue
            found.append((str(text_path.relative_to(ROOT)), path))
    return found


def written_folders() -> Set[str]:
    """The folders that a documented command or a config names as where it writes."""
    folders = set()
    for text_path in TEXTS:
        for match in WRITES_RE.finditer(text_path.read_text()):
            folders.add(match.group(1).rstrip("/").split("$")[0])
    return {folder for folder in folders if folder}


def accepted(path: str, written: Set[str]) -> bool:
    if "*" in path:
        return any(ROOT.glob(path))
    if (ROOT / path).exists() or OUTPUT_RE.fullmatch(path) or path.rstrip("/") == DATA_ROOT or path in DATA_FILES:
        return True
    bare = path.rstrip("/")
    return any(bare == folder or bare.startswith(folder if folder.endswith("_") else folder + "/")
               or (folder.endswith("_") and bare.startswith(folder)) for folder in written)


def test_the_data_folder_is_main_pys_default():
    import main

    assert main.parse_args([]).data_root == DATA_ROOT


def test_every_path_named_is_one_the_program_reads_or_writes():
    written = written_folders()
    stale = sorted({f"{where}: {path}" for where, path in named_paths() if not accepted(path, written)})
    assert not stale, "paths named that nothing reads or writes:\n" + "\n".join(stale)


@pytest.mark.parametrize("path, ok", [
    ("output/latest/best.pt", True), ("output/best.pt", False), ("output/latest/model.bin", False),
    ("configs/quickstart.yaml", True), ("configs/nothing.yaml", False), ("results/fashionmnist-gpu/", False),
    ("output/20261125-134501_vit_pico_patch2_8_tk_n_k2/results.json", True),
    ("datasets/FashionMNIST/raw/train-images-idx3-ubyte", True), ("datasets/FashionMNIST/train.bin", False),
])
def test_the_checker_tells_stale_paths_from_real_ones(path, ok):
    assert accepted(path, written={"runs/sweep_fashionmnist_v2"}) is ok


def test_the_checker_reads_paths_out_of_prose_and_code():
    text = "see `output/latest/best.pt` or \"configs/x.yaml\"; (results/a/README.md), not foo/output/x"
    assert [m.group(1) for m in PATH_RE.finditer(text)] == ["output/latest/best.pt", "configs/x.yaml",
                                                           "results/a/README.md"]
