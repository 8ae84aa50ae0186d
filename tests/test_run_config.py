"""The run configuration (engine/config.py): every setting resolved once, from defaults, the dataset's recipe,
``--config``, the command line and, on ``--resume``, the checkpoint; frozen; one name per setting."""
import dataclasses

import pytest
import yaml

import main
from engine import options
from engine.config import RunConfig
from engine.distributed import Processes
from engine.errors import CLIError


def resolve(*argv, processes=Processes()):
    return main.resolve(main.parse_args(list(argv)), processes)


def test_the_configuration_has_one_field_per_option_and_is_frozen():
    dests = {action.dest for action in main.build_parser()._actions if action.dest != "help"}
    assert {field.name for field in dataclasses.fields(RunConfig)} == dests
    config = resolve()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0


def test_what_is_not_given_comes_from_the_recipe_the_method_and_the_model():
    config = resolve()
    recipe = main.RECIPES["digits"]
    assert (config.arch, config.augment, config.lr_base) == (recipe.arch, recipe.augment, recipe.lr_base)
    assert config.lr == pytest.approx(recipe.lr_base * 64 / 512)
    assert (config.img_size, config.patch_size) == (8, 2)  # vit_pico_patch2_8's own
    assert (config.method, config.schedule, config.reduce_at, config.prop_attn) == ("tk_n", 2, "block", "off")
    tome = resolve("--model", "tome", "--eval_only", "--pretrained")
    assert (tome.reduce_at, tome.prop_attn) == ("attn", "on")  # ToMe's placement; its off-the-shelf protocol
    assert resolve("--model", "tome", "--benchmark").prop_attn == "on"


def test_given_settings_win_and_the_rate_follows_the_global_batch():
    config = resolve("--arch", "vit_pico_patch4_32", "--data_name", "CIFAR10", "--augment", "light", "--lr_base",
                     "0.001", "--reduce_at", "attn", "--prop_attn", "on", "--img_size", "16", "--batch_size", "32")
    assert (config.arch, config.augment, config.reduce_at, config.prop_attn) == \
        ("vit_pico_patch4_32", "light", "attn", "on")
    assert (config.img_size, config.patch_size, config.lr) == (16, 4, pytest.approx(0.001 * 32 / 512))
    four = resolve("--batch_size", "32", "--lr_base", "0.001", processes=Processes(0, 4, 0))
    assert four.lr == pytest.approx(0.001 * 32 * 4 / 512)
    assert resolve("--lr", "0.3", processes=Processes(0, 4, 0)).lr == 0.3


def test_a_per_block_schedule_of_the_wrong_length_is_refused_before_anything_runs():
    assert resolve("--reduce_token", "0,1,2,3").schedule == (0, 1, 2, 3)
    with pytest.raises(CLIError, match="--reduce_token: 3 values given, but --arch vit_pico_patch2_8 has 4 blocks"):
        resolve("--reduce_token", "1,2,3")
    with pytest.raises(CLIError, match="--img_size 9 is not a multiple of --patch_size 2"):
        resolve("--img_size", "9")


def test_the_saved_settings_resolve_to_the_same_configuration(tmp_path):
    config = resolve("--model", "evit", "--reduce_token", "0,3,3,2", "--epochs", "3", "--lr", "0.01")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.settings(str(tmp_path))))
    saved = yaml.safe_load(path.read_text())
    assert saved["method"] == "evit" and saved["schedule"] == [0, 3, 3, 2] and "model" not in saved
    again = resolve("--config", str(path))
    assert dataclasses.replace(again, config=None) == dataclasses.replace(config, output_dir=str(tmp_path))


def test_resume_takes_the_checkpoints_settings_by_either_name():
    parser = main.build_parser()
    args = main.parse_args(["--resume", "last.pt", "--threads", "2"])
    given = options.given_dests(args, parser)
    for settings in ({"method": "tome", "schedule": [1, 2, 3, 4], "epochs": 5, "threads": 1},
                     {"model": "tome", "reduce_token": [1, 2, 3, 4], "epochs": 5, "threads": 1}):  # before the rename
        values = options.restored(vars(args), given, {"settings": settings}, "last.pt")
        assert (values["method"], values["schedule"], values["epochs"]) == ("tome", [1, 2, 3, 4], 5)
        assert values["threads"] == 2  # where and how it runs may be given anew
    changed = main.parse_args(["--resume", "last.pt", "--model", "tk"])
    with pytest.raises(CLIError, match=r"--model tk \(the run's: tome\)"):
        options.restored(vars(changed), options.given_dests(changed, parser), {"settings": {"model": "tome"}},
                         "last.pt")


def test_results_record_what_each_block_really_removed(tmp_path):
    """Issue 20: 10 per block asked of a 50-token model; a block cannot remove more tokens than it has."""
    results = main.run(main.parse_args(["--benchmark", "--arch", "vit_pico_patch4_28", "--data_name", "FashionMNIST",
                                        "--reduce_token", "10", "--bench_steps", "1", "--bench_warmup", "0",
                                        "--batch_size", "2", "--output_dir", str(tmp_path / "out")]))
    assert results["tokens_per_block"] == [50, 40, 30, 20, 10, 2, 2]
    assert results["schedule"] == 10 and results["schedule_per_block"] == [10] * 6
    assert results["removed_per_block"] == [10, 10, 10, 10, 8, 0]
