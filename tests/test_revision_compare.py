"""tools/revision_compare.py imports the library of a git revision beside the working tree's and times both on
copies of one model (speed itself is never asserted: the machine is shared). The revisions here are commits of
a small repository made in the test, so the tests do not depend on the history of the clone they run in."""
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import revision_compare  # noqa: E402

import pruning  # noqa: E402
from engine import model as engine_model  # noqa: E402

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]


def commit(repo, message):
    subprocess.run([*GIT, "-C", str(repo), "add", "-A"], check=True, capture_output=True)
    subprocess.run([*GIT, "-C", str(repo), "commit", "-q", "-m", message], check=True, capture_output=True)
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A git repository whose first commit holds the working tree's ``pruning`` package (caches left out)."""
    path = tmp_path / "repo"
    shutil.copytree(os.path.join(ROOT, "pruning"), path / "pruning", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    return path


def test_the_library_is_read_from_the_commit_and_imported_under_a_name_of_its_own(repo, tmp_path):
    init = repo / "pruning" / "__init__.py"
    init.write_text(init.read_text() + "\nMARKER = 'first'\n")
    first = commit(repo, "first")
    init.write_text(init.read_text().replace("'first'", "'second'"))
    commit(repo, "second")
    init.write_text(init.read_text().replace("'second'", "'uncommitted'"))

    library = revision_compare.library_at(first[:7], str(repo), str(tmp_path / "extracted"))
    assert library.MARKER == "first" and library.commit == first
    assert library.__name__ == f"pruning_at_{first[:12]}" and library is not pruning
    # its modules import one another relatively, so they are the copy's, not the working tree's
    assert library.patch.apply_patch.__module__ == f"{library.__name__}.patch"
    assert library.patch.apply_patch is not pruning.patch.apply_patch
    assert not hasattr(pruning, "MARKER")


def test_same_code_at_both_sides_gives_identical_outputs_and_a_row_per_method_and_phase(repo, tmp_path, capsys):
    revision = commit(repo, "the working tree's library")
    out = tmp_path / "compare.json"
    assert revision_compare.main(["--against", "HEAD", "--repo", str(repo), "--arch", "vit_pico_patch2_8",
                                  "--methods", "tk_n,tome", "--reduce_token", "3", "--quick",
                                  "--json", str(out), "--md", str(tmp_path / "compare.md")]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["settings"]["revision_commit"] == revision
    assert [(r["phase"], r["method"]) for r in report["rows"]] == [
        (phase, method) for phase in ("forward", "train step") for method in ("tk_n", "tome")]
    label = revision[:12]
    for phase, times in report["times"].items():
        assert set(times) == {"none", "tk_n@tree", f"tk_n@{label}", "tome@tree", f"tome@{label}"}
    for r in report["rows"]:
        assert r["output_difference"] == 0.0  # the same code on the same weights and images
        low, high = r["tree_over_revision_ci"]
        assert low <= r["tree_over_revision"] <= high
        assert r["verdict"] == revision_compare.verdict(low, high)
        assert r["tree_speedup"] == pytest.approx(r["baseline_ms"] / r["tree_ms"])
        assert r["revision_speedup"] == pytest.approx(r["baseline_ms"] / r["revision_ms"])
    assert f"The library at {label} (HEAD) against the working tree" in table
    assert (tmp_path / "compare.md").read_text() == table


def test_each_library_patches_its_own_copy_of_one_model(repo, tmp_path):
    revision = commit(repo, "the working tree's library")
    library = revision_compare.library_at(revision, str(repo), str(tmp_path / "extracted"))
    args = revision_compare.build_parser().parse_args(["--against", revision, "--arch", "vit_pico_patch2_8",
                                                       "--methods", "evit", "--reduce_token", "2"])
    revision_compare.check(args)
    models = revision_compare.build_models(args, {"tree": pruning, "old": library})
    plain, tree, old = models["none"], models["evit@tree"], models["evit@old"]
    assert type(tree.blocks[0]).__module__.startswith("pruning.")
    assert type(old.blocks[0]).__module__.startswith(library.__name__ + ".")
    assert all(torch.equal(p, q) and p.data_ptr() != q.data_ptr()
               for p, q in zip(tree.parameters(), old.parameters()))
    assert pruning.get_config(plain) is None  # the uncompressed model stays uncompressed


def test_the_output_difference_is_the_largest_gap_between_the_two_libraries_outputs():
    plain = engine_model.create_model("vit_pico_patch2_8", None, None).eval()
    shifted = copy.deepcopy(plain)
    with torch.no_grad():
        shifted.head.bias[1] += 0.5
    models = {"none": plain, "m@a": plain, "m@b": shifted}
    for runtime in revision_compare.RUNTIMES:
        run = revision_compare.forwards(models, runtime, threads=1)
        assert revision_compare.output_differences(run, (1, 8, 8), ["m"], ["a", "b"], 3) == {
            "m": pytest.approx(0.5, abs=1e-5)}, runtime


def test_onnxruntime_times_the_two_libraries_exported(repo, tmp_path, capsys):
    revision = commit(repo, "the working tree's library")
    out = tmp_path / "compare.json"
    assert revision_compare.main(["--against", "HEAD", "--repo", str(repo), "--arch", "vit_pico_patch2_8",
                                  "--methods", "tk_n,tome", "--reduce_token", "3", "--batch_size", "2", "--rounds", "2",
                                  "--warmup", "0", "--train_batch_size", "0", "--runtime", "onnxruntime",
                                  "--json", str(out)]) == 0
    assert "forward in onnxruntime" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["settings"]["runtime"] == "onnxruntime" and report["settings"]["revision_commit"] == revision
    assert [(r["phase"], r["method"]) for r in report["rows"]] == [("forward", "tk_n"), ("forward", "tome")]
    label = revision[:12]
    assert set(report["times"]["forward"]) == {"none", "tk_n@tree", f"tk_n@{label}", "tome@tree", f"tome@{label}"}
    assert all(r["output_difference"] == 0.0 for r in report["rows"])  # one library exported twice, one graph


@pytest.mark.parametrize("argv, message", [
    (["--against", "no-such-revision"], "--against: 'no-such-revision' is not a commit in"),
    (["--against", "HEAD", "--methods", "tk_n,foo"], "--methods: unknown method 'foo'; choose from"),
    (["--against", "HEAD", "--methods", "none,tk_n"], "--methods: 'none' is the uncompressed model"),
    (["--against", "HEAD", "--batch_size", "0", "--train_batch_size", "0"], "--batch_size, --train_batch_size:"),
    (["--against", "HEAD", "--rounds", "0"], "--rounds: must be >= 1"),
    (["--against", "HEAD", "--warmup", "-1"], "--warmup: must be >= 0"),
    (["--against", "HEAD", "--json", "/no/such/folder/x.json"], "--json: the folder of"),
    (["--against", "HEAD", "--runtime", "onnxruntime", "--methods", "random"], "--methods random: not exported"),
])
def test_bad_input_is_a_one_line_error(repo, capsys, argv, message):
    commit(repo, "a library")
    assert revision_compare.main([*argv, "--repo", str(repo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"revision_compare.py: error: {message}") and err.count("\n") == 1


def test_a_revision_without_the_library_is_a_one_line_error(tmp_path, capsys):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "README.md").write_text("no library here\n")
    commit(repo, "no pruning package")
    assert revision_compare.main(["--against", "HEAD", "--repo", str(repo), "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("revision_compare.py: error: --against: HEAD has no pruning package") and err.count("\n") == 1


def test_an_interrupted_run_keeps_the_phases_it_finished(repo, tmp_path, monkeypatch):
    commit(repo, "a library")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(revision_compare, "train_callables", interrupted)
    out = tmp_path / "compare.json"
    with pytest.raises(KeyboardInterrupt):
        revision_compare.main(["--against", "HEAD", "--repo", str(repo), "--arch", "vit_pico_patch2_8",
                               "--methods", "tk_n", "--quick", "--json", str(out), "--md", str(tmp_path / "c.md")])
    report = json.loads(out.read_text())
    assert [(r["phase"], r["method"]) for r in report["rows"]] == [("forward", "tk_n")]
    assert "| forward | 2 | tk_n |" in (tmp_path / "c.md").read_text()
