"""tools/benchmark.py and tools/visualize.py: the command lines around the library's benchmark and pictures."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import pruning
import pruning.benchmark
import pruning.models  # noqa: F401  (registers the vit_pico_* models)
from pruning.benchmark import time_interleaved
from pruning.patch import get_config
from pruning.visualize import CAPTION_INCHES, DPI, PANEL_INCHES, TITLE_INCHES, display_images, patch_columns
from tools import benchmark as bench_tool
from tools import visualize as vis_tool

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(capsys, main, argv, prog):
    """Run a tool's ``main(argv)``: exit code 2 and one line on stderr, ``<prog>: error: ...``; return the line."""
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def run_script(*argv, cwd):
    env = dict(os.environ, PYTHONPATH="")  # the tool itself must find the repository
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


# --- timing: pruning.benchmark.time_interleaved (every tool's clock) ----------------------------------

def test_time_interleaved_warms_up_then_rotates_the_order_every_round():
    calls = []
    functions = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = time_interleaved(functions, rounds=4, warmup=2)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up: each twice, untimed
    assert calls[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4, "c": 4}


def test_time_interleaved_times_each_call_on_its_own(monkeypatch):
    ticks = iter(range(1000))  # a fake clock: one second per tick
    monkeypatch.setattr(pruning.benchmark.time, "perf_counter", lambda: next(ticks))
    spans = {"short": 1, "long": 3}  # a call of span s lets s - 1 ticks pass inside it

    def call(name):
        for _ in range(spans[name] - 1):
            next(ticks)
    times = time_interleaved({name: (lambda name=name: call(name)) for name in spans}, rounds=3, warmup=0)
    assert times == {"short": [1, 1, 1], "long": [3, 3, 3]}


# --- tools/benchmark.py -------------------------------------------------------------------------

def test_benchmark_help_shows_every_default():
    parser = bench_tool.build_parser()
    help_text = parser.format_help()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert "default" in action.help, action.dest
        if action.default not in (None, False):
            assert f"default: {action.default}" in " ".join(help_text.split()), action.dest


@pytest.mark.parametrize("arch, shape", [("vit_pico_patch4_28", (1, 28, 28)), ("vit_pico_patch4_32", (3, 32, 32)),
                                         ("vit_tiny_patch16_224", (3, 224, 224))])
def test_benchmark_inputs_have_the_models_own_size_and_channels(arch, shape):
    model = bench_tool.create_model(arch)
    assert tuple(bench_tool.benchmark_inputs(model, 2, torch.device("cpu")).shape) == (2, *shape)


def test_benchmark_times_a_small_model_on_its_own_tokens(capsys):
    # vit_pico_patch4_28 at its own 28x28: 49 patches + the class token (at 224 px it would be 3,137)
    assert bench_tool.main(["--arch", "vit_pico_patch4_28", "--batch_size", "2", "--rounds", "1",
                            "--methods", "tk_n,tome", "--pool_k", "3"]) == 0
    out = capsys.readouterr().out
    assert "28x28 px, 1 channel(s), 50 tokens" in out
    rows = [line.split()[0] for line in out.splitlines()[2:]]
    assert rows == ["none", "tk_n", "tome"]


def test_benchmark_img_size_overrides_the_models_own(capsys):
    assert bench_tool.main(["--arch", "vit_pico_patch4_28", "--img_size", "16", "--batch_size", "1",
                            "--rounds", "1", "--pool_k", "1"]) == 0
    assert "16x16 px, 1 channel(s), 17 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("argv, names", [
    (["--arch", "vit_no_such_model"], "--arch"),
    (["--arch", "resnet18"], "--arch"),
    (["--arch", "vit_pico_patch2_8", "--methods", "tk,topk"], "--methods"),
    (["--arch", "vit_pico_patch2_8", "--pool_k", "1,2"], "--pool_k"),
    (["--arch", "vit_pico_patch2_8", "--pool_k", "-3"], "--pool_k"),
    (["--arch", "vit_pico_patch2_8", "--batch_size", "0"], "--batch_size"),
    (["--arch", "vit_pico_patch2_8", "--device", "nodevice"], "--device"),
    (["--no_such_option"], "--no_such_option"),
])
def test_benchmark_bad_input_is_one_line(capsys, argv, names):
    assert names in one_error_line(capsys, bench_tool.main, argv, "benchmark.py")


def test_benchmark_runs_as_a_script_from_anywhere(tmp_path):
    done = run_script(ROOT / "tools" / "benchmark.py", "--arch", "vit_pico_patch2_8", "--batch_size", "2",
                      "--rounds", "1", "--methods", "tk", "--pool_k", "2", "--explicit", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()[2:]] == ["none", "tk", "none/explicit",
                                                                          "tk/explicit"]
    bad = run_script("tools/benchmark.py", "--arch", "nope", cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith("benchmark.py: error: --arch: 'nope' is not a timm model;")


# --- tools/visualize.py -------------------------------------------------------------------------

def write_checkpoint(path: Path, method: str, seed: int, **settings) -> str:
    """A checkpoint like main.py's: the model's state and the settings it was trained with."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_pico_patch2_8")
    settings = dict(dict(arch="vit_pico_patch2_8", img_size=8, patch_size=2, model=method, reduce_token=2,
                         reduce_at=None, data_name="digits", data_root=str(path.parent / "data"), augment=None),
                    **settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "settings": settings}, path)
    return str(path)


def grid_width(columns: int) -> int:
    return round((1 + columns) * PANEL_INCHES * DPI)


def test_two_checkpoints_of_the_same_method_each_get_their_columns(tmp_path, capsys):
    first = write_checkpoint(tmp_path / "run_a" / "best.pt", "tk", seed=0)
    second = write_checkpoint(tmp_path / "run_b" / "best.pt", "tk", seed=1)
    out = tmp_path / "grid.png"
    assert vis_tool.main(["grid", "--checkpoint", first, "--checkpoint", second, "--images", "2",
                          "--blocks", "0,3", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    width, height = Image.open(out).size
    assert width == grid_width(2 * 2)  # the image, then 2 blocks for each checkpoint
    assert height == round((2 * PANEL_INCHES + TITLE_INCHES + CAPTION_INCHES) * DPI)


def test_checkpoints_by_old_and_new_setting_names_load_alike(tmp_path):
    """main.py checkpoints name the method and schedule ``method``/``schedule``; older ones ``model``/``reduce_token``."""
    old = write_checkpoint(tmp_path / "old" / "best.pt", "tome", seed=0)
    new = tmp_path / "new" / "best.pt"
    checkpoint = torch.load(old, weights_only=True)
    settings = checkpoint["settings"]
    settings.update(method=settings.pop("model"), schedule=[1, 2, 3, 3])
    del settings["reduce_token"]
    new.parent.mkdir()
    torch.save(checkpoint, new)
    (old_model, old_settings), (new_model, new_settings) = vis_tool.load_trained(old), vis_tool.load_trained(str(new))
    assert (old_settings["method"], old_settings["schedule"]) == ("tome", 2)
    assert (new_settings["method"], new_settings["schedule"]) == ("tome", [1, 2, 3, 3])
    assert get_config(old_model).schedule == [2, 2, 2, 2] and get_config(new_model).schedule == [1, 2, 3, 3]
    images = torch.randn(2, 1, 8, 8)
    assert not torch.equal(old_model(images), new_model(images))  # the schedules differ, the weights do not
    assert torch.equal(old_model(images), vis_tool.load_trained(old)[0](images))


def test_checkpoint_labels_tell_the_checkpoints_apart(tmp_path):
    labels = vis_tool.checkpoint_labels(["out/run_a/best.pt", "out/run_b/best.pt", "out/run_b/last.pt"])
    assert labels == [("run_a/best.pt", "out/run_a/best.pt"), ("run_b/best.pt", "out/run_b/best.pt"),
                      ("run_b/last.pt", "out/run_b/last.pt")]
    assert vis_tool.checkpoint_labels(["a.pt", "x/b.pt"]) == [("a.pt", "a.pt"), ("b.pt", "x/b.pt")]
    assert vis_tool.checkpoint_labels(["small=out/a/best.pt", "out/b/best.pt"]) == [
        ("small", "out/a/best.pt"), ("best.pt", "out/b/best.pt")]
    odd = tmp_path / "lr=0.1.pt"  # an existing file whose name holds "=" is a path, not LABEL=PATH
    odd.write_bytes(b"")
    assert vis_tool.checkpoint_labels([str(odd)]) == [("lr=0.1.pt", str(odd))]


def test_grid_titles_carry_the_labels_and_the_method(tmp_path):
    first = write_checkpoint(tmp_path / "a" / "best.pt", "tk", seed=0)
    second = write_checkpoint(tmp_path / "b" / "best.pt", "tk", seed=1)
    models = {label: vis_tool.load_trained(path)[0] for label, path in vis_tool.checkpoint_labels([first, second])}
    assert set(models) == {"a/best.pt", "b/best.pt"}
    images, _, _ = vis_tool.load_test_images(vis_tool.load_trained(first)[1], 2)
    shown = display_images(images)
    titles = [column.title for label, model in models.items()
              for column in patch_columns(model, images, shown, [3], label)]
    assert titles[0].splitlines()[:2] == ["a/best.pt", "tk"] and titles[1].splitlines()[:2] == ["b/best.pt", "tk"]


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated", "no_settings", "same_label", "bad_arch",
                                    "wrong_weights"])
def test_a_bad_checkpoint_is_one_line(tmp_path, capsys, damage):
    good = write_checkpoint(tmp_path / "good" / "best.pt", "tk", seed=0)
    bad = tmp_path / "bad.pt"
    argv = ["grid", "--out", str(tmp_path / "x.png"), "--checkpoint", str(bad)]
    if damage == "garbage":
        bad.write_text("not a checkpoint\n")
    elif damage == "truncated":
        bad.write_bytes(Path(good).read_bytes()[:500])
    elif damage == "no_settings":
        torch.save({"model": {}}, bad)
    elif damage == "same_label":
        argv = ["grid", "--out", str(tmp_path / "x.png"), "--checkpoint", f"x={good}", "--checkpoint", f"x={good}"]
    elif damage == "bad_arch":
        write_checkpoint(bad, "tk", seed=0, arch="vit_no_such_model")
    elif damage == "wrong_weights":
        write_checkpoint(bad, "tk", seed=0, patch_size=4)
    line = one_error_line(capsys, vis_tool.main, argv, "visualize.py")
    assert "--checkpoint" in line
    assert not (tmp_path / "x.png").exists()


def test_visualize_bad_options_are_one_line(tmp_path, capsys):
    good = write_checkpoint(tmp_path / "good" / "best.pt", "tk", seed=0)
    out = str(tmp_path / "x.png")
    assert "--blocks" in one_error_line(capsys, vis_tool.main, ["grid", "--checkpoint", good, "--blocks", "9",
                                                                "--out", out], "visualize.py")
    assert "--arch" in one_error_line(capsys, vis_tool.main, ["tokens", "--arch", "vit_no_such_model",
                                                              "--pool_k", "2", "--out", out], "visualize.py")
    one_error_line(capsys, vis_tool.main, ["tokens", "--pool_k", "2", "--out", out], "visualize.py")
    one_error_line(capsys, vis_tool.main, [], "visualize.py")


def test_visualize_runs_as_a_script(tmp_path):
    out = tmp_path / "tokens.png"
    done = run_script("tools/visualize.py", "tokens", "--arch", "vit_pico_patch4_28", "--pool_k", "3",
                      "--out", out, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out) and Image.open(out).size == (640, 400)
    missing = run_script(ROOT / "tools" / "visualize.py", "grid", "--checkpoint", "nowhere/best.pt", "--out",
                         tmp_path / "g.png", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip() == "visualize.py: error: --checkpoint: nowhere/best.pt not found"


# --- every family: transformers models by --arch hf:FOLDER --------------------------------------------

@pytest.fixture(scope="module")
def hf_archs(tmp_path_factory):
    from tiny_folders import BUILDERS, save_tiny

    root = tmp_path_factory.mktemp("hf")
    return {family: save_tiny(root, family) for family in BUILDERS}


@pytest.mark.parametrize("family", ["vit", "dinov3", "siglip", "siglip2"])
def test_benchmark_times_every_family_from_images(family, hf_archs, capsys):
    from tiny_folders import TOKENS

    assert bench_tool.main(["--arch", hf_archs[family], "--batch_size", "2", "--rounds", "1", "--methods",
                            "tk_n,tome", "--pool_k", "2", "--explicit"]) == 0
    out = capsys.readouterr().out
    assert f"32x32 px, 3 channel(s), {TOKENS[family]} tokens" in out
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["none", "tk_n", "tome", "none/explicit",
                                                                  "tk_n/explicit", "tome/explicit"]


def test_benchmark_variants_are_the_wrapper_around_patched_copies(hf_archs):
    from engine.zoo import backbone_of
    from pruning.flops import analytic_flops

    model = bench_tool.create_model(hf_archs["siglip2"])
    variants = bench_tool.variants_of(model, ["tk_n", "tome"], 3, explicit=True)
    assert get_config(model) is None  # the model itself stays as it was
    images = bench_tool.benchmark_inputs(model, 2, torch.device("cpu"))
    with torch.no_grad():
        plain = model(images)
        for name, variant in variants.items():
            module = backbone_of(variant).module
            assert module is not backbone_of(model).module or name == "none"
            assert get_config(variant) is None if name == "none" else get_config(variant).method.name == \
                name.split("/")[0]
            assert bench_tool.flops_of(variant) == analytic_flops(module)
            out = variant(images)
            assert out.shape == plain.shape
            if name == "none":
                assert torch.equal(out, plain)
            elif name == "none/explicit":  # the attention matrix materialised: the same to rounding
                torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)
    assert bench_tool.flops_of(variants["tome"]) < bench_tool.flops_of(variants["none"])


def test_benchmark_refuses_class_token_attention_without_a_class_token(hf_archs, capsys):
    line = one_error_line(capsys, bench_tool.main, ["--arch", hf_archs["siglip"], "--methods", "tk_n,tk"],
                          "benchmark.py")
    assert line.startswith("benchmark.py: error: --methods: 'tk' reads class-token attention") and \
        "tk_n, evit_n, tome, random, low_norm" in line


def test_token_plot_of_a_model_without_class_token_leaves_out_the_methods_it_refuses(hf_archs, tmp_path,
                                                                                     monkeypatch):
    drawn = {}
    monkeypatch.setattr(vis_tool, "save_tokens_per_block_plot",
                        lambda path, *args, **kwargs: drawn.update(args=args, **kwargs) or path)
    for family in ("siglip", "vit"):
        assert vis_tool.main(["tokens", "--arch", hf_archs[family], "--pool_k", "3",
                              "--out", str(tmp_path / "t.png")]) == 0
        num_tokens, depth, _ = drawn["args"]
        assert (num_tokens, depth, drawn["num_prefix_tokens"]) == ((16, 2, 0) if family == "siglip" else (17, 2, 1))
        expected = ("none", "tk_n", "evit_n", "tome", "random", "low_norm")
        assert drawn["method_names"] == (expected if family == "siglip" else pruning.METHOD_NAMES)


def write_hf_checkpoint(path: Path, arch: str, method: str) -> str:
    """A main.py checkpoint of a transformers model (the engine's wrapper's state) for digits at 32 px."""
    from engine.model import create_model

    torch.manual_seed(0)
    model = create_model(arch, 10, 1)
    settings = dict(arch=arch, img_size=32, patch_size=None, model=method, reduce_token=3, reduce_at=None,
                    data_name="digits", data_root=str(path.parent / "data"), augment=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "settings": settings}, path)
    return str(path)


def test_grid_draws_checkpoints_of_every_family(hf_archs, tmp_path, capsys):
    checkpoints = [f"{family}={write_hf_checkpoint(tmp_path / family / 'last.pt', hf_archs[family], method)}"
                   for family, method in (("siglip2", "tome"), ("siglip", "tk_n"), ("vit", "tk"),
                                          ("dinov3", "evit"))]
    out = tmp_path / "grid.png"
    assert vis_tool.main(["grid", *[arg for c in checkpoints for arg in ("--checkpoint", c)], "--images", "2",
                          "--blocks", "0,1", "--out", str(out)]) == 0
    width, height = Image.open(out).size
    assert width == grid_width(4 * 2)
    assert height == round((2 * PANEL_INCHES + TITLE_INCHES + CAPTION_INCHES) * DPI)


def test_families_table_shows_refused_methods_as_refused(capsys):
    from tools import families_table

    families_table.main(["--families", "siglip2,vit", "--methods", "tk,tk_n", "--no-speed"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| siglip2 |")
            or line.startswith("| vit |")]
    assert rows[0] == "| siglip2 | tk | refused (no class token) | - | - | - | - |"
    assert [row.split(" | ")[:2] for row in rows[1:]] == [["| siglip2", "tk_n"], ["| vit", "tk"], ["| vit", "tk_n"]]
    assert all(row.split(" | ")[3] == "yes" for row in rows[1:])  # conforms within 1e-4
