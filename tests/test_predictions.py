"""main.py --save_predictions, --prop_attn and the environment in results.json (issue 15)."""
import json

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

import main
from engine import distributed, train
from engine.distributed import Processes
from engine.errors import CLIError
from engine.sampling import ShardSampler

TINY = ["--train_subset", "64", "--test_subset", "40", "--batch_size", "16", "--bench_steps", "1", "--bench_warmup",
        "0"]


def run(tmp_path, name, *argv):
    out = tmp_path / name
    return main.run(main.parse_args([*TINY, "--output_dir", str(out), *argv])), out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tome run trained for one epoch with --save_predictions (its checkpoint is evaluated below)."""
    tmp_path = tmp_path_factory.mktemp("trained")
    results, out = run(tmp_path, "train", "--epochs", "1", "--model", "tome", "--save_predictions")
    return results, out


def test_training_writes_the_final_models_predictions(trained):
    results, out = trained
    saved = np.load(out / "predictions.npz")
    assert results["predictions"] == str(out / "predictions.npz")
    assert len(saved["labels"]) == len(saved["predicted"]) == len(saved["indices"]) == 40
    assert 100 * (saved["predicted"] == saved["labels"]).mean() == pytest.approx(results["accuracy"])
    # the test subset's images, in test-set order: the same fixed subset as data._subset draws
    order = torch.randperm(360, generator=torch.Generator().manual_seed(0))[:40].tolist()
    assert saved["indices"].tolist() == order


def test_eval_only_predictions_agree_with_the_accuracy(tmp_path, trained):
    _, out = trained
    results, eval_out = run(tmp_path, "eval", "--eval_only", "--checkpoint", str(out / "last.pt"), "--model", "tk",
                            "--save_predictions")
    saved = np.load(eval_out / "predictions.npz")
    assert 100 * (saved["predicted"] == saved["labels"]).mean() == pytest.approx(results["accuracy"])
    assert saved["labels"].tolist() == np.load(out / "predictions.npz")["labels"].tolist()
    written = json.loads((eval_out / "results.json").read_text())
    assert written["predictions"] == str(eval_out / "predictions.npz")


def test_without_the_option_no_predictions_are_written(tmp_path, trained):
    _, out = trained
    results, eval_out = run(tmp_path, "plain", "--eval_only", "--checkpoint", str(out / "last.pt"))
    assert results["predictions"] is None and not (eval_out / "predictions.npz").exists()


def test_save_predictions_needs_test_images():
    with pytest.raises(CLIError, match="--save_predictions needs test images"):
        main.run(main.parse_args(["--benchmark", "--save_predictions"]))


def test_prop_attn_auto_is_off_when_training_and_on_off_the_shelf(tmp_path, trained):
    results, out = trained
    assert results["prop_attn"] == "off"
    assert yaml.safe_load((out / "config.yaml").read_text())["prop_attn"] == "off"
    evaluated = {}
    for choice in ("auto", "on", "off"):
        found, folder = run(tmp_path, f"eval_{choice}", "--eval_only", "--checkpoint", str(out / "last.pt"),
                            "--model", "tome", "--reduce_token", "3", "--prop_attn", choice, "--save_predictions")
        evaluated[choice] = found
        assert yaml.safe_load((folder / "config.yaml").read_text())["prop_attn"] == found["prop_attn"]
    assert evaluated["auto"]["prop_attn"] == "on" and evaluated["off"]["prop_attn"] == "off"
    assert evaluated["auto"]["accuracy"] == evaluated["on"]["accuracy"]


def test_compress_passes_prop_attn_to_the_patch(monkeypatch):
    import argparse

    import timm

    import pruning.models  # noqa: F401
    from engine import model as engine_model

    seen = []
    monkeypatch.setattr(engine_model, "apply_patch", lambda *a, **k: seen.append(k["prop_attn"]))
    vit = timm.create_model("vit_pico_patch2_8", num_classes=10, in_chans=1)
    for choice, expected in (("on", True), ("off", False), ("auto", True)):
        engine_model.compress(vit, argparse.Namespace(method="tome", schedule=2, reduce_at=None,
                                                      prop_attn=choice))
        assert seen[-1] is expected


def test_prop_attn_changes_what_tome_computes():
    """Proportional attention is not a no-op: ToMe's logits differ with it on and off."""
    import copy

    import timm

    import pruning.models  # noqa: F401
    from pruning.patch import apply_patch

    torch.manual_seed(0)
    model = timm.create_model("vit_pico_patch2_8", num_classes=10, in_chans=1).eval()
    images = torch.randn(4, 1, 8, 8)
    on = apply_patch(copy.deepcopy(model), "tome", 3, prop_attn=True)(images)
    off = apply_patch(copy.deepcopy(model), "tome", 3, prop_attn=False)(images)
    assert not torch.allclose(on, off)


def test_results_record_the_environment(trained):
    results, out = trained
    environment = json.loads((out / "results.json").read_text())["environment"]
    import platform

    import timm

    assert environment["torch"] == torch.__version__ and environment["timm"] == timm.__version__
    assert environment["numpy"] == np.__version__ and environment["python"] == platform.python_version()
    assert environment["device"] and environment["threads"] == torch.get_num_threads()
    assert results["analytic_gflops"] > 0
    assert results["schedule_per_block"] == results["removed_per_block"] == [2, 2, 2, 2]


def test_evaluate_gathers_the_shards_of_every_rank_in_test_set_order(monkeypatch):
    """Under torchrun each rank predicts its shard (rank, rank + world_size, ...); rank 0 puts them back in order."""
    torch.manual_seed(0)
    images, labels = torch.randn(11, 3), torch.arange(11) % 3
    model = torch.nn.Linear(3, 3)
    full = train.evaluate(model, DataLoader(TensorDataset(images, labels), batch_size=4), torch.device("cpu"), None,
                          predictions=True)
    assert full["labels"] == labels.tolist()
    assert full["predicted"] == model(images).argmax(-1).tolist()

    world = 2
    dataset = TensorDataset(images, labels)
    shards = []
    for rank in range(world):
        loader = DataLoader(dataset, batch_size=4, sampler=ShardSampler(11, rank, world))
        shards.append((list(loader.sampler), model(images[list(loader.sampler)]).argmax(-1).tolist(),
                       labels[list(loader.sampler)].tolist()))
    monkeypatch.setattr(distributed, "sum_over_ranks", lambda values, processes, device: values)
    monkeypatch.setattr(distributed, "gather", lambda obj, processes: [obj, shards[1]])
    loader = DataLoader(dataset, batch_size=4, sampler=ShardSampler(11, 0, world))
    gathered = train.evaluate(model, loader, torch.device("cpu"), None, Processes(rank=0, world_size=world),
                              predictions=True)
    assert gathered["predicted"] == full["predicted"] and gathered["labels"] == full["labels"]
