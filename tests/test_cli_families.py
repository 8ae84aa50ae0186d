"""main.py and tools/benchmark.py on transformers and OpenCLIP models (``--arch hf:...``, ``open_clip:...``, a model
folder): tiny models built from configs (no downloads), saved as their libraries save them, then evaluated,
benchmarked and trained for one epoch on digits; and the one-line errors."""
import json
import os

import open_clip
import pytest
import timm
import torch
import transformers as T

import data
import main
from engine.outputs import run_folder_name
from cli_helpers import fails
from engine import zoo
from engine.checkpoint import load_weights
from engine.errors import CLIError
from pruning.flops import analytic_flops
from pruning.patch import apply_patch
from tools import benchmark as bench_tool

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8)
OPEN_CLIP_CFG = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                                 "patch_size": 8, "mlp_ratio": 2.0},
                 "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
OPEN_CLIP_NORM = ([0.4, 0.45, 0.5], [0.3, 0.25, 0.2])
DIGITS = data.DATASETS["digits"]
FAMILIES = ("vit", "deit", "dinov2", "dinov3", "clip", "open_clip", "siglip", "siglip2")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{family: --arch} of tiny saved models, and "open_clip_weights": OpenCLIP's own weights file."""
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    T.ViTForImageClassification(T.ViTConfig(num_labels=3, **SMALL)).save_pretrained(root / "vit")
    T.ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(root / "vit")
    T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(num_labels=10, **SMALL)).save_pretrained(root / "deit")
    T.Dinov2Model(T.Dinov2Config(mlp_ratio=2, **SMALL)).save_pretrained(root / "dinov2")
    T.DINOv3ViTModel(T.DINOv3ViTConfig(num_register_tokens=2, **SMALL)).save_pretrained(root / "dinov3")  # RoPE
    T.CLIPVisionModel(T.CLIPVisionConfig(**SMALL)).save_pretrained(root / "clip")
    T.SiglipVisionModel(T.SiglipVisionConfig(**SMALL)).save_pretrained(root / "siglip")  # no class token
    T.Siglip2VisionModel(T.Siglip2VisionConfig(num_patches=16, **{k: v for k, v in SMALL.items() if k != "image_size"})
                         ).save_pretrained(root / "siglip2")  # patchified (NaFlex) inputs
    clip = open_clip.model.CLIP(**OPEN_CLIP_CFG)
    (root / "open_clip").mkdir()
    with open(root / "open_clip" / "open_clip_config.json", "w") as f:
        json.dump({"model_cfg": OPEN_CLIP_CFG,
                   "preprocess_cfg": {"mean": OPEN_CLIP_NORM[0], "std": OPEN_CLIP_NORM[1]}}, f)
    torch.save(clip.state_dict(), root / "open_clip" / "open_clip_pytorch_model.bin")
    other = open_clip.model.CLIP(**OPEN_CLIP_CFG)  # other weights, given with --checkpoint
    torch.save({"state_dict": other.state_dict()}, root / "open_clip_weights.pt")
    return {"vit": f"hf:{root / 'vit'}", "deit": str(root / "deit"), "dinov2": f"hf:{root / 'dinov2'}",
            "dinov3": f"hf:{root / 'dinov3'}",
            "clip": f"hf:{root / 'clip'}", "siglip": f"hf:{root / 'siglip'}", "siglip2": str(root / "siglip2"),
            "open_clip": f"open_clip:local-dir:{root / 'open_clip'}",
            "open_clip_folder": str(root / "open_clip"), "open_clip_weights": str(root / "open_clip_weights.pt"),
            "root": str(root)}


def _run(argv, out) -> dict:
    assert main.main([*argv, "--output_dir", str(out), "--test_subset", "32", "--batch_size", "32",
                      "--bench_warmup", "1", "--bench_steps", "2"]) == 0
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def _analytic_gflops(arch: str, method: str, k: int) -> float:
    model = zoo.build(arch, 10, 1)
    backbone = zoo.backbone_of(model)
    apply_patch(backbone.module, method, k)
    return analytic_flops(backbone.module, head=backbone.head) / 1e9


def _check_gflops(results: dict, analytic: float, family: str) -> None:
    """flop_counter's count is the analytic one; SigLIP 2's adds the resize of its position grid where
    transformers does it by a matrix product (the analytic count leaves it out: an interpolation elsewhere)."""
    assert results["analytic_gflops"] == pytest.approx(analytic, rel=1e-6)
    if family == "siglip2":
        assert results["gflops"] >= analytic
    else:
        assert results["gflops"] == pytest.approx(analytic, rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_train_evaluate_and_benchmark(family, folders, tmp_path, capsys):
    arch = folders[family]
    trained = _run(["--arch", arch, "--pretrained", "--epochs", "1", "--train_subset", "64", "--reduce_token", "2"],
                   tmp_path / "train")
    assert trained["epochs"] == 1 and trained["accuracy"] is not None and trained["arch"] == arch
    assert trained["tokens_per_block"] == {"deit": [18, 16, 14], "dinov3": [19, 17, 15], "siglip": [16, 14, 12],
                                           "siglip2": [16, 14, 12]}.get(family, [17, 15, 13])
    _check_gflops(trained, _analytic_gflops(arch, "tk_n", 2), family)
    assert os.path.isfile(tmp_path / "train" / "best.pt")

    # the trained weights evaluated: the accuracy training reported
    evaluated = _run(["--arch", arch, "--checkpoint", str(tmp_path / "train" / "last.pt"), "--eval_only",
                      "--reduce_token", "2"], tmp_path / "eval")
    assert evaluated["accuracy"] == pytest.approx(trained["accuracy"])
    assert "untrained" not in capsys.readouterr().err

    bench = _run(["--arch", arch, "--benchmark", "--model", "tome", "--reduce_token", "3"], tmp_path / "bench")
    _check_gflops(bench, _analytic_gflops(arch, "tome", 3), family)
    if family != "siglip2":
        assert bench["baseline_gflops"] == pytest.approx(_analytic_gflops(arch, "none", 0), rel=1e-6)
    assert bench["speedup"] > 0 and bench["gmacs_thop"] > 0


def test_a_timm_rope_model_trains_evaluates_and_benchmarks(tmp_path):
    """timm Eva (here the DINOv3-style ViT-Nano at 8 px, patch 2): 16 patches + class token + 4 registers."""
    arch = ["--arch", "vit_nano_rope_patch4_28", "--img_size", "8", "--patch_size", "2"]
    trained = _run([*arch, "--epochs", "1", "--train_subset", "64", "--reduce_token", "2"], tmp_path / "train")
    assert trained["tokens_per_block"] == [21, 19, 17, 15, 13, 11, 9]  # entering, then after each of 6 blocks
    assert trained["gflops"] == pytest.approx(trained["analytic_gflops"], rel=1e-6)
    evaluated = _run([*arch, "--checkpoint", str(tmp_path / "train" / "last.pt"), "--eval_only", "--reduce_token",
                      "2"], tmp_path / "eval")
    assert evaluated["accuracy"] == pytest.approx(trained["accuracy"])
    bench = _run([*arch, "--benchmark", "--model", "tome", "--reduce_token", "3"], tmp_path / "bench")
    assert bench["speedup"] > 0 and bench["gflops"] < bench["baseline_gflops"]


def test_eval_of_an_untrained_head_warns(folders, tmp_path, capsys):
    results = _run(["--arch", folders["clip"], "--pretrained", "--eval_only"], tmp_path / "eval")
    assert results["accuracy"] is not None
    assert "linear head on pooler_output is untrained" in capsys.readouterr().err


def test_a_model_folder_without_prefix(folders, tmp_path):
    """A folder holding open_clip_config.json is an OpenCLIP model; one holding config.json a transformers one."""
    assert zoo.parse_arch(folders["open_clip_folder"]) == zoo.Source("open_clip", folders["open_clip"][10:])
    assert zoo.parse_arch(folders["deit"]).family == "hf"
    assert zoo.parse_arch("vit_pico_patch2_8").family == "timm"
    name = run_folder_name(main.parse_args(["--arch", folders["deit"]]), zoo.arch_label(folders["deit"]), 0)
    assert name.endswith("_deit_tk_n_k2")


def test_images_reach_the_model_as_its_preprocessor_says(folders):
    """Gray digits, normalised with the dataset's mean/std, reach the model repeated to 3 channels and
    normalised with its own preprocessor's mean/std (ViT: 0.5/0.5; OpenCLIP: its preprocess_cfg)."""
    raw = torch.rand(2, 1, 32, 32)
    images = (raw - DIGITS.mean[0]) / DIGITS.std[0]
    vit = zoo.build(folders["vit"], 10, 1, pretrained=True, data_norm=(DIGITS.mean, DIGITS.std)).eval()
    oc = zoo.build(folders["open_clip"], 10, 1, pretrained=True, data_norm=(DIGITS.mean, DIGITS.std)).eval()
    with torch.no_grad():
        expected = vit.backbone(pixel_values=(raw.expand(-1, 3, -1, -1) - 0.5) / 0.5).logits
        torch.testing.assert_close(vit(images), expected, atol=1e-5, rtol=0)
        mean, std = (torch.tensor(v).reshape(1, 3, 1, 1) for v in OPEN_CLIP_NORM)
        expected = oc.head(oc.backbone((raw.expand(-1, 3, -1, -1) - mean) / std))
        torch.testing.assert_close(oc(images), expected, atol=1e-5, rtol=0)
    backbone = zoo.backbone_of(vit)
    assert (backbone.img_size, backbone.patch_size, backbone.shape.depth, backbone.in_chans) == (32, 8, 2, 3)
    assert backbone.module is vit.backbone and backbone.head is None
    assert vit.backbone.classifier.out_features == 10  # the saved 3-class head resized for the dataset


def test_open_clip_weights_from_checkpoint(folders, tmp_path):
    """--checkpoint with OpenCLIP's own weights file loads them into the image tower."""
    model = zoo.build(folders["open_clip"], 10, 1, weights=folders["open_clip_weights"])
    saved = torch.load(folders["open_clip_weights"], weights_only=True)["state_dict"]
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, saved[f"visual.{key}"]), key
    results = _run(["--arch", folders["open_clip"], "--checkpoint", folders["open_clip_weights"], "--eval_only"],
                   tmp_path / "eval")
    assert results["accuracy"] is not None


@pytest.mark.parametrize("argv, message", [
    (["--arch", "hf:{root}/missing"], "--arch hf:{root}/missing: no such folder {root}/missing"),
    (["--arch", "hf:{root}"], "is not a transformers model folder (no config.json)"),
    (["--arch", "{root}"], "is not a transformers model folder (no config.json)"),
    (["--arch", "open_clip:ViT-Nope"], "--arch open_clip:ViT-Nope: unknown OpenCLIP model 'ViT-Nope'"),
    (["--arch", "open_clip:local-dir:{root}/vit"], "is not an OpenCLIP model folder (no open_clip_config.json)"),
    (["--arch", "hf:someone/some-model"], "as a hub id it cannot be fetched: huggingface.co cannot be reached"),
    (["--arch", "open_clip:ViT-B-32", "--pretrained"], "--pretrained: main.py reads OpenCLIP weights from a local"),
    (["--arch", "{vit}", "--img_size", "64"], "--img_size 64: --arch hf:{root}/vit runs at its own size, 32 px"),
    (["--arch", "{vit}", "--pretrained", "--eval_only", "--visualize", "2"],
     "--visualize: the token grid is drawn for timm models only"),
    (["--arch", "no_such_vit"], "other families: hf:FOLDER_OR_HUB_ID, open_clip:NAME"),
])
def test_one_line_errors(argv, message, folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("engine.hub.hub_unreachable", lambda: "huggingface.co cannot be reached (offline)")
    fill = dict(root=folders["root"], vit=folders["vit"])
    line = fails(capsys, *[a.format(**fill) for a in argv], "--benchmark", "--output_dir", str(tmp_path / "out"))
    assert message.format(**fill) in line
    assert not os.path.exists(tmp_path / "out")


def test_a_checkpoint_of_another_arch_is_not_called_another_class_count(tmp_path):
    """A pico checkpoint loaded as nano: the same 10 classes, so the message names the arch, not the classes."""
    pico = timm.create_model("vit_pico_patch4_28", num_classes=10, in_chans=1)
    nano = timm.create_model("vit_nano_patch4_28", num_classes=10, in_chans=1)
    torch.save(pico.state_dict(), tmp_path / "pico.pt")
    for new_head_ok in (False, True):
        with pytest.raises(CLIError, match="does not fit --arch vit_nano_patch4_28") as err:
            load_weights(nano, str(tmp_path / "pico.pt"), new_head_ok=new_head_ok)
        assert "classes" not in str(err.value)
    twenty = timm.create_model("vit_pico_patch4_28", num_classes=20, in_chans=1)
    with pytest.raises(CLIError, match="has a classifier head for 10 classes, the dataset has 20"):
        load_weights(twenty, str(tmp_path / "pico.pt"), new_head_ok=False)


@pytest.mark.parametrize("family", ["vit", "open_clip"])
def test_benchmark_tool(family, folders, capsys):
    assert bench_tool.main(["--arch", folders[family], "--pool_k", "2", "--rounds", "1", "--batch_size", "2",
                            "--methods", "tk_n"]) == 0
    out = capsys.readouterr().out
    assert "32x32 px, 3 channel(s), 17 tokens" in out and "\ntk_n " in out
    assert bench_tool.main(["--arch", "open_clip:ViT-Nope"]) == 2
    assert "benchmark.py: error: --arch open_clip:ViT-Nope: unknown OpenCLIP model" in capsys.readouterr().err
