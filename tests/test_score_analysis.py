"""tools/score_analysis.py: the pure statistics against plain references, the block-by-block pass against the
model's own forward, and the tool end to end on a tiny untrained checkpoint."""
import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import pruning.models  # noqa: F401  (registers the vit_pico_* models)
from pruning.core.scoring import token_norm
from tools import score_analysis as sa

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = ROOT.parent / "shared" / "datasets"
PROG = "score_analysis.py"


# --- pure computations ---------------------------------------------------------------------------

def _top_set(row, k):
    return set(sorted(range(len(row)), key=lambda i: -row[i])[:k])


@pytest.mark.parametrize("k", [1, 5, 12, 24, 47, 49])
def test_topk_iou_matches_python_sets(k):
    rng = np.random.default_rng(k)
    a, b = rng.normal(size=(30, 49)), rng.normal(size=(30, 49))
    ia, ib = sa.topk_indices(a, k), sa.topk_indices(b, k)
    got = sa.set_iou(ia, ib, 49)
    for row in range(30):
        sa_set, sb_set = _top_set(a[row], k), _top_set(b[row], k)
        assert set(ia[row].tolist()) == sa_set
        assert got[row] == pytest.approx(len(sa_set & sb_set) / len(sa_set | sb_set), abs=1e-12)


def test_kept_patches_is_the_librarys_topk():
    scores = torch.from_numpy(np.random.default_rng(1).normal(size=(8, 49)))
    kept = sa.kept_patches(scores, 12)
    for row in range(8):
        assert set(kept[row].tolist()) == _top_set(scores[row].tolist(), 12)


def test_set_iou_of_identical_and_disjoint_sets():
    a = np.array([[0, 1, 2], [0, 1, 2]])
    b = np.array([[2, 1, 0], [3, 4, 5]])
    assert sa.set_iou(a, b, 6).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("k", range(1, 7))
def test_chance_iou_is_the_mean_over_all_pairs_of_subsets(k):
    subsets = [set(c) for c in itertools.combinations(range(6), k)]
    brute = np.mean([len(a & b) / len(a | b) for a in subsets for b in subsets])
    assert sa.chance_iou(6, k) == pytest.approx(brute, abs=1e-12)


def test_spearman_matches_scipy_with_and_without_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(20, 49)), rng.normal(size=(20, 49))
    b[:5] = a[:5] + 0.3 * b[:5]  # some strongly correlated rows
    tied_a, tied_b = rng.integers(0, 4, size=(20, 49)), rng.integers(0, 4, size=(20, 49))
    for x, y in ((a, b), (tied_a, tied_b)):
        got = sa.spearman_rows(x, y)
        want = [stats.spearmanr(x[i], y[i])[0] for i in range(len(x))]
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_average_ranks_of_ties():
    assert sa.average_ranks(np.array([10.0, 20.0, 10.0, 5.0])).tolist() == [2.5, 4.0, 2.5, 1.0]


def test_spearman_of_a_constant_row_is_nan():
    got = sa.spearman_rows(np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]]), np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]))
    assert np.isnan(got[0]) and got[1] == pytest.approx(-1.0)


def test_bootstrap_ci_holds_the_mean_narrows_with_more_samples_and_is_seeded():
    rng = np.random.default_rng(3)
    few, many = rng.normal(size=50), rng.normal(size=5000)
    mean, low, high = sa.bootstrap_ci(few, seed=7)
    assert mean == pytest.approx(few.mean()) and low < mean < high
    m2, l2, h2 = sa.bootstrap_ci(many, seed=7)
    assert l2 < m2 < h2 and (h2 - l2) < (high - low)
    assert sa.bootstrap_ci(few, seed=7) == (mean, low, high)
    assert sa.bootstrap_ci(np.array([np.nan, 1.0, 3.0]), seed=0)[0] == pytest.approx(2.0)
    assert all(np.isnan(sa.bootstrap_ci(np.array([np.nan]))))


def test_norm_outliers_against_loops():
    rng = np.random.default_rng(4)
    norms = rng.uniform(1.0, 2.0, size=(10, 49))
    norms[2, 7] = 10.0
    norms[5, [0, 1]] = [7.0, 8.0]
    got = sa.norm_outliers(norms, 3.0)
    for i, row in enumerate(norms):
        median = sorted(row)[24]
        count = sum(v > 3.0 * median for v in row)
        assert got["max_over_median"][i] == pytest.approx(max(row) / median)
        assert got["count"][i] == count and got["has_outlier"][i] == (count > 0)
    assert got["count"].tolist() == [0, 0, 1, 0, 0, 2, 0, 0, 0, 0]


def test_position_frequency_and_patch_intensity_against_loops():
    indices = np.array([3, 3, 0, 48, 3])
    counts = Counter(indices.tolist())
    assert sa.position_frequency(indices, 49).tolist() == [counts.get(i, 0) / 5 for i in range(49)]
    pixels = np.random.default_rng(5).uniform(size=(2, 1, 28, 28))
    got = sa.patch_intensity(pixels, 4)
    for b in range(2):
        for r in range(7):
            for c in range(7):
                assert got[b, r * 7 + c] == pytest.approx(pixels[b, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4].mean())
    mask = np.array([[True, False, True]])
    assert sa.fraction_on(mask, np.array([[True, True, False]])) == 0.5
    assert np.isnan(sa.fraction_on(mask, np.zeros((1, 3), dtype=bool)))


# --- the block-by-block pass ---------------------------------------------------------------------

@pytest.mark.parametrize("reduce_at", ["block", "attn"])
def test_block_scores_are_the_models_own_norms_and_attention(reduce_at):
    torch.manual_seed(0)
    model = timm.create_model("vit_pico_patch4_28").eval()
    images = torch.randn(3, 1, 28, 28)
    seen = []
    hooks = [block.register_forward_hook(lambda module, args, out: seen.append(out)) for block in model.blocks]
    with torch.no_grad():
        reference = model(images)
    for hook in hooks:
        hook.remove()
    norms, attn, logits = sa.block_scores(model, images, reduce_at, batch_size=2)
    assert norms.shape == attn.shape == (6, 3, 49)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)
    if reduce_at == "block":
        torch.testing.assert_close(norms, torch.stack([token_norm(out)[:, 1:] for out in seen]), rtol=1e-4, atol=1e-5)
    # the class-token row of block 1's attention, from timm's own materialised attention
    block = model.blocks[1]
    attn_module = block.attn
    x = block.norm1(seen[0])
    qkv = attn_module.qkv(x).reshape(3, 50, 3, 4, 16).permute(2, 0, 3, 1, 4)
    weights = ((qkv[0] * attn_module.scale) @ qkv[1].transpose(-2, -1)).softmax(-1)
    torch.testing.assert_close(attn[1], weights[:, :, 0, 1:].mean(1).detach(), rtol=1e-4, atol=1e-6)
    assert torch.all(attn[1].sum(-1) < 1)  # the class token's attention to itself is left out


def test_block_scores_on_a_rope_model_are_its_own_rotated_attention_and_norms():
    """The RoPE ViT-Nano (timm Eva, class token + 4 registers): the pass rotates as timm does, so its logits are the
    model's, its norms are the blocks' outputs and its class-token row is timm's own materialised attention."""
    torch.manual_seed(0)
    model = timm.create_model("vit_nano_rope_patch4_28").eval()
    prefix = model.num_prefix_tokens
    images = torch.randn(3, 1, 28, 28)
    outputs, weights = [], []
    hooks = [block.register_forward_hook(lambda module, args, out: outputs.append(out)) for block in model.blocks]
    for block in model.blocks:
        block.attn.fused_attn = False  # timm then materialises the softmax and passes it through attn_drop
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda module, args, out: weights.append(out)))
    with torch.no_grad():
        reference = model(images)
    for hook in hooks:
        hook.remove()
    norms, attn, logits = sa.block_scores(model, images, "block")
    assert prefix == 5 and norms.shape == attn.shape == (6, 3, 49)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norms, torch.stack([token_norm(out)[:, prefix:] for out in outputs]),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attn, torch.stack([w[:, :, 0, prefix:].mean(1) for w in weights]), rtol=1e-4,
                               atol=1e-6)


def test_keep_levels_count_as_the_library_does():
    levels = sa.keep_levels(49, 2, [0.5, 0.25])
    assert [level["keep"] for level in levels] == [47, 24, 12]
    assert sa.keep_levels(49, 100, [])[0]["keep"] == 1  # never fewer than one patch token


# --- the tool ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pico_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_pico_patch4_28")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


needs_fashion = pytest.mark.skipif(not (DATA_ROOT / "FashionMNIST").is_dir(), reason="Fashion-MNIST not in shared/")


@needs_fashion
def test_the_tool_end_to_end_as_a_script(pico_checkpoint, tmp_path):
    out = tmp_path / "analysis"
    env = dict(os.environ, PYTHONPATH="")  # the tool itself must find the repository
    done = subprocess.run([sys.executable, "tools/score_analysis.py", "--checkpoint", str(pico_checkpoint),
                           "--arch", "vit_pico_patch4_28", "--data_name", "FashionMNIST", "--data_root",
                           str(DATA_ROOT), "--images", "20", "--reduce_token", "3", "--bootstrap", "200",
                           "--examples", "2", "--out_dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "score_analysis.json").read_text())
    depth = 6
    assert report["images"] == 20 and report["num_patches"] == 49 and report["depth"] == depth
    assert report["sanity"]["max_abs_logit_diff"] < 1e-3
    assert [level["keep"] for level in report["keep_sets"]] == [46, 24, 12]
    for level in report["keep_sets"]:
        iou = level["iou"]
        assert all(len(iou[key]) == depth for key in ("mean", "ci_low", "ci_high"))
        assert all(lo <= m <= hi and 0 <= m <= 1 for lo, m, hi in zip(iou["ci_low"], iou["mean"], iou["ci_high"]))
        assert 0 < level["chance_iou"] < 1
    assert len(report["spearman"]["mean"]) == depth and report["spearman"]["images_used"] == [20] * depth
    outliers = report["norm_outliers"]
    assert outliers["factor"] == 3.0 and all(r >= 1 for r in outliers["max_over_median"]["mean"])
    assert len(outliers["images_with_outlier"]) == len(outliers["outliers_per_image"]) == depth
    positions = report["positions"]
    for key in ("top_norm_frequency", "top_attn_frequency"):
        maps = np.array(positions[key])
        assert maps.shape == (depth, 7, 7) and np.allclose(maps.sum(axis=(1, 2)), 1.0)
    background = report["background"]
    assert 0 < background["patch_fraction"] < 1
    for key in ("top_norm", "top_attn", "outlier_tokens", "kept_norm", "kept_attn"):
        assert len(background[key]) == depth
    png = (out / "score_analysis.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    text = (out / "score_analysis.md").read_text()
    assert "| block |" in text and sa.in_short(report) in text


def test_in_short_states_the_ranges_after_block_0():
    nan = float("nan")
    report = {
        "depth": 3,
        "keep_sets": [{"label": "K=45 (reduce_token 4)", "iou": {"mean": [0.9, 0.8, 0.85]}, "chance_iou": 0.85},
                      {"label": "K=12 (keep 0.25)", "iou": {"mean": [0.5, 0.07, 0.14]}, "chance_iou": 0.144}],
        "spearman": {"mean": [0.4, -0.29, 0.02]},
        "background": {"top_norm": [0.1, 0.81, 0.86], "top_attn": [0.3, 0.22, 0.11], "kept_keep": 12,
                       "kept_norm": [0.5, 0.73, 0.77], "kept_attn": [0.5, 0.26, 0.16], "patch_fraction": 0.4},
        "norm_outliers": {"factor": 3.0, "images_with_outlier": [0.0, 0.0, nan],
                          "max_over_median": {"mean": [2.0, 1.8, 1.49]}},
    }
    assert sa.in_short(report) == (
        "After block 0, the kept sets of norm and attention overlap with IoU 0.07 to 0.14 at K=12 (random sets: "
        "0.14) and the scores' rank correlation is -0.29 to 0.02. The top-norm token is a background patch in "
        "81 to 86 % of the images, the top-attention token in 11 to 22 %; of the K=12 tokens each keeps, 73 to 77 % "
        "are background by norm and 16 to 26 % by attention (40 % of all patches are background). Images with an "
        "outlying norm (over 3× the median): 0 %; the largest norm is 1.49 to 1.80× the median.")


def one_error_line(capsys, argv):
    code = sa.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_bad_input_is_one_line(pico_checkpoint, tmp_path, capsys):
    common = ["--data_root", DATA_ROOT, "--images", "2", "--out_dir", tmp_path / "out"]
    line = one_error_line(capsys, ["--checkpoint", tmp_path / "nowhere.pt", "--arch", "vit_pico_patch4_28", *common])
    assert line == f"{PROG}: error: --checkpoint: {tmp_path / 'nowhere.pt'}: no such file"
    line = one_error_line(capsys, ["--checkpoint", pico_checkpoint, "--arch", "vit_nano_patch4_28", *common])
    assert "--checkpoint" in line and "does not fit" in line
    line = one_error_line(capsys, ["--checkpoint", pico_checkpoint, "--arch", "no_such_vit", *common])
    assert "--arch" in line
    line = one_error_line(capsys, ["--checkpoint", pico_checkpoint, "--arch", "vit_nano_map_patch4_28", *common])
    assert line.startswith(f"{PROG}: error: --arch vit_nano_map_patch4_28: ") and "class token" in line
    assert "--images" in one_error_line(capsys, ["--checkpoint", pico_checkpoint, "--arch", "vit_pico_patch4_28",
                                                 *common, "--images", "0"])
    assert "--keep_fractions" in one_error_line(capsys, ["--checkpoint", pico_checkpoint, "--arch",
                                                         "vit_pico_patch4_28", *common, "--keep_fractions", "1.5"])
    assert not (tmp_path / "out").exists()
