"""End-to-end tests of main.py on scikit-learn digits: every method, eval-only and benchmark modes,
options and config files, results.json, checkpoints and resume.

Runs are tiny (a subset of digits, one or two epochs, one timed forward) to keep the suite fast.
"""
import glob
import json
import os

import pytest
import torch
import yaml

import main
from cli_helpers import stopped_by_ctrl_c_in_epoch
from engine.errors import CLIError
from engine.model import create_model
from pruning import METHOD_NAMES
from pruning.flops import analytic_flops
from pruning.patch import apply_patch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--epochs", "1", "--train_subset", "64", "--test_subset", "40", "--batch_size", "16",
        "--bench_steps", "1", "--bench_warmup", "0"]


def run(tmp_path, *argv, name="out"):
    out = tmp_path / name
    results = main.run(main.parse_args([*TINY, "--output_dir", str(out), *argv]))
    return results, out


def test_results_json_has_exactly_the_documented_fields(tmp_path):
    results, out = run(tmp_path)
    written = json.loads((out / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert tuple(written) == main.RESULT_KEYS
    assert written["method"] == "tk_n" and written["schedule"] == 2 and written["data_name"] == "digits"
    assert written["arch"] == "vit_pico_patch2_8" and written["epochs"] == 1 and written["seed"] == 0
    assert written["world_size"] == 1
    assert 0.0 <= written["accuracy"] <= 100.0 and written["best_accuracy"] >= written["accuracy"]
    assert written["throughput"] > 0 and written["gflops"] > 0 and written["gmacs_thop"] > 0
    assert written["params_m"] == pytest.approx(0.20, abs=0.01)
    for key in ("baseline_throughput", "baseline_gflops", "speedup"):
        assert written[key] is None  # only measured with --benchmark
    assert (out / "config.yaml").is_file() and (out / "log.jsonl").is_file()


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_trains_and_counts_flops(tmp_path, method):
    results, out = run(tmp_path, "--model", method, "--reduce_token", "3")
    assert results["method"] == method and 0.0 <= results["accuracy"] <= 100.0
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    # flop_counter's count (attention products included) agrees with the analytic count of the patched model
    model = create_model("vit_pico_patch2_8", 10, 1)
    apply_patch(model, method, 3)
    assert results["gflops"] == pytest.approx(analytic_flops(model) / 1e9, rel=0.02)


def test_uncompressed_flops_match_the_plain_vit_formula(tmp_path):
    results, _ = run(tmp_path, "--model", "none")
    n, d, depth, classes = 4 * 4 + 1, 64, 4, 10  # 8x8 image, patch 2: 16 patches + class token
    per_block = 24 * n * d ** 2 + 4 * n ** 2 * d
    embed, head = 2 * 16 * (1 * 2 * 2) * d, 2 * d * classes
    assert results["gflops"] * 1e9 == pytest.approx(depth * per_block + embed + head, rel=1e-6)
    assert results["gflops"] > run(tmp_path, "--model", "tk_n", "--reduce_token", "2", name="tk_n")[0]["gflops"]


def test_reduce_token_per_block_and_reduce_at(tmp_path):
    results, out = run(tmp_path, "--model", "evit", "--reduce_token", "0,4,4,2", "--reduce_at", "attn")
    assert results["schedule"] == results["schedule_per_block"] == [0, 4, 4, 2]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["schedule"] == [0, 4, 4, 2] and saved["reduce_at"] == "attn" and saved["method"] == "evit"


def test_eval_only_reproduces_the_best_checkpoint(tmp_path):
    trained, out = run(tmp_path, "--epochs", "2")
    evaluated, eval_out = run(tmp_path, "--eval_only", "--checkpoint", str(out / "best.pt"), name="eval")
    assert evaluated["accuracy"] == evaluated["best_accuracy"] == trained["best_accuracy"]
    assert evaluated["epochs"] == 0
    assert not (eval_out / "last.pt").exists()
    # the same weights with another method: the off-the-shelf protocol
    other, _ = run(tmp_path, "--eval_only", "--checkpoint", str(out / "best.pt"), "--model", "tome", name="tome")
    assert other["method"] == "tome" and other["gflops"] < evaluated["gflops"] * 1.5


def test_benchmark_measures_method_and_baseline_in_one_run(tmp_path):
    results, out = run(tmp_path, "--benchmark", "--reduce_token", "3", "--bench_steps", "3")
    assert results["accuracy"] is None and results["epochs"] == 0
    assert results["baseline_gflops"] > results["gflops"] > 0
    assert results["baseline_throughput"] > 0
    assert results["speedup"] == pytest.approx(results["throughput"] / results["baseline_throughput"])
    assert not (out / "last.pt").exists()


def test_checkpoints_hold_the_full_state_and_load_safely(tmp_path):
    _, out = run(tmp_path, "--epochs", "2")
    for name in ("last.pt", "best.pt"):
        checkpoint = torch.load(out / name, map_location="cpu", weights_only=True)
        assert {"model", "optimizer", "scheduler", "epoch", "rng", "settings", "best_accuracy"} <= set(checkpoint)
        assert set(checkpoint["rng"]) >= {"torch", "numpy", "python", "loader"}
        assert checkpoint["settings"]["arch"] == "vit_pico_patch2_8"
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_resume_continues_to_the_same_result(tmp_path):
    argv = ["--epochs", "3", "--model", "evit_n", "--reduce_token", "2"]
    straight, straight_out = run(tmp_path, *argv, name="straight")

    with stopped_by_ctrl_c_in_epoch(3):
        run(tmp_path, *argv, name="resumed")
    interrupted = tmp_path / "resumed"
    assert torch.load(interrupted / "last.pt", weights_only=True)["epoch"] == 2
    assert not (interrupted / "results.json").exists()

    resumed = main.run(main.parse_args(["--resume", str(interrupted / "last.pt"), "--bench_steps", "1"]))
    for key in ("accuracy", "best_accuracy", "gflops", "method", "schedule", "epochs", "seed"):
        assert resumed[key] == straight[key], key
    a = torch.load(straight_out / "last.pt", weights_only=True)
    b = torch.load(interrupted / "last.pt", weights_only=True)
    assert a["history"] == [dict(h, time_s=a["history"][i]["time_s"]) for i, h in enumerate(b["history"])]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_checkpoint_formats_and_head_of_another_size(tmp_path, capsys):
    from safetensors.torch import save_file

    for classes in (10, 100):
        model = create_model("vit_pico_patch2_8", classes, 1)
        torch.save(model.state_dict(), tmp_path / f"weights{classes}.pth")
        save_file(model.state_dict(), str(tmp_path / f"weights{classes}.safetensors"))
    for name in ("weights10.pth", "weights10.safetensors"):
        results, _ = run(tmp_path, "--eval_only", "--checkpoint", str(tmp_path / name), name=f"eval_{name}")
        assert results["accuracy"] is not None
    # fine-tuning from weights with another head: all but the head is loaded, and the run says so
    for name in ("weights100.pth", "weights100.safetensors"):
        results, _ = run(tmp_path, "--checkpoint", str(tmp_path / name), name=f"train_{name}")
        assert results["accuracy"] is not None
        assert "loaded all but head.weight, head.bias" in capsys.readouterr().out
    # evaluating them would measure a random head: refused (tests/test_reliability_checkpoints.py)


# ----------------------------------------------------------------------------------------------
# options, config files, help

def test_defaults_are_the_quickstart_config():
    defaults = main.parse_args([])
    assert vars(main.parse_args(["--config", os.path.join(ROOT, "configs", "quickstart.yaml")])) == \
        dict(vars(defaults), config=os.path.join(ROOT, "configs", "quickstart.yaml"))


def test_config_then_command_line_override_defaults(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("method: tk\nepochs: 7\nschedule: [1, 2, 3, 4, 5, 6]\namp: true\nlr: null\n")
    args = main.parse_args(["--config", str(config), "--epochs", "9", "--no-amp"])
    assert args.method == "tk" and args.schedule == [1, 2, 3, 4, 5, 6]  # from the file
    assert args.epochs == 9 and args.amp is False  # the command line wins
    assert args.batch_size == main.parse_args([]).batch_size and args.lr is None  # defaults elsewhere


def test_config_files_take_the_flags_names_too(tmp_path):
    """YAML files written before the rename name the method and schedule as the flags do."""
    config = tmp_path / "old.yaml"
    config.write_text("model: evit\nreduce_token: 3\n")
    args = main.parse_args(["--config", str(config)])
    assert (args.method, args.schedule) == ("evit", 3)
    assert main.parse_args(["--config", str(config), "--model", "tk"]).method == "tk"


@pytest.mark.parametrize("text, message", [
    ("modle: tk\n", "unknown option 'modle'"),
    ("model: topk\n", "invalid choice: 'topk'"),
    ("epochs: many\n", "--epochs"),
    ("amp: 1\n", "amp must be true or false"),
    ("- a list\n", "mapping"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_bad_config_files_are_named(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(CLIError, match="--config") as err:
        main.parse_args(["--config", str(config)])
    assert message in str(err.value)


@pytest.mark.parametrize("name", ["quickstart", "fashionmnist", "paper_cifar10", "paper_stl10"])
def test_config_files_parse(name):
    args = main.parse_args(["--config", os.path.join(ROOT, "configs", f"{name}.yaml")])
    if name.startswith("paper"):  # the seed's setup
        assert (args.arch, args.img_size, args.batch_size, args.epochs) == \
            ("vit_small_patch16_224.augreg_in21k", 224, 32, 100)
        assert args.pretrained and args.schedule == 10 and args.weight_decay == 1e-4
        assert args.lr is None and args.lr_base == 5e-4  # lr = 5e-4 * batch_size / 512


def test_help_documents_every_option_and_default():
    parser = main.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.option_strings[0] in text
        assert "default" in action.help, action.dest


def test_docs_name_every_results_field():
    """Every results.json field is explained in the README or docs/ (options are explained by --help)."""
    pages = [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md"))]
    text = "".join(open(page).read() for page in pages)
    for key in main.RESULT_KEYS:
        assert f"`{key}`" in text, key


def test_visualize_writes_the_png(tmp_path):
    results, out = run(tmp_path, "--visualize", "3", "--model", "tome")
    assert (out / "visualization.png").stat().st_size > 0
    evaluated, eval_out = run(tmp_path, "--eval_only", "--checkpoint", str(out / "best.pt"), "--visualize", "2",
                              name="eval")
    assert (eval_out / "visualization.png").stat().st_size > 0
