"""The controls of issue 22: ``random`` (a uniformly random kept set) and ``low_norm`` (the smallest norms kept).

Their outputs follow the reference rules with every other method (``test_pruning``, ``test_families``: for
``random`` the reference keeps the tokens the model drew). Here: ``random``'s draws are a function of the seed
alone, differ between the images of a batch and between forwards, keep the prefix tokens, and are uniform;
evaluation passes restart them; main.py seeds them from --seed; ``low_norm`` keeps what ``tk_n`` drops."""
import argparse
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import main
from engine.model import compress
from engine.train import evaluate
from pruning import CONTROL_NAMES, METHODS, apply_patch, evaluation_draws, get_state, remove_patch, seed_draws
from reference_vit import kept_ids
from test_pruning import make_vit

POOL_K = 9  # of 64 patches + the class token, per block


@pytest.fixture
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def draw(model, images):
    """(logits, per image and block the original indices of the tokens kept) of one forward."""
    with torch.no_grad():
        logits = model(images)
    return logits, kept_ids(get_state(model).block_sources)


def random_model(seed=None, **overrides):
    model = apply_patch(make_vit(**overrides), "random", POOL_K, trace_source=True)
    if seed is not None:
        seed_draws(model, seed)
    return model


def binomial_bounds(trials, p, tail=1e-7):
    """Counts (low, high) with P(X < low) <= tail and P(X > high) <= tail for X ~ Binomial(trials, p)."""
    pmf = [math.exp(math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1)
                    + k * math.log(p) + (trials - k) * math.log(1 - p)) for k in range(trials + 1)]
    low, below = 0, 0.0
    while below + pmf[low] <= tail:
        below += pmf[low]
        low += 1
    high, above = trials, 0.0
    while above + pmf[high] <= tail:
        above += pmf[high]
        high -= 1
    return low, high


def test_the_controls_are_rows_of_the_table_marked_as_controls():
    assert CONTROL_NAMES == ("random", "low_norm")
    assert [name for name, method in METHODS.items() if method.stochastic] == ["random"]
    assert all(METHODS[name].reduction == "prune" and not METHODS[name].fuses for name in CONTROL_NAMES)
    help_text = " ".join(main.build_parser().format_help().split())
    assert "random and low_norm are controls" in help_text


# --- random: a function of the seed ---------------------------------------------------------------------

def test_the_same_seed_keeps_the_same_tokens_and_gives_the_same_logits(images):
    logits, kept = draw(random_model(seed=7), images)
    other_logits, other_kept = draw(random_model(seed=7), images)  # another model, seeded alike
    assert kept == other_kept
    torch.testing.assert_close(logits, other_logits, atol=0, rtol=0)
    model = random_model(seed=7)
    draw(model, images)
    seed_draws(model, 7)  # reseeding restarts the stream
    assert draw(model, images)[1] == kept


def test_another_seed_keeps_other_tokens(images):
    kept = {seed: draw(random_model(seed=seed), images)[1] for seed in (7, 8, 9)}
    for image in range(len(images)):
        first_blocks = {seed: tuple(kept[seed][image][0]) for seed in kept}
        assert len(set(first_blocks.values())) == 3, image


def test_each_image_of_a_batch_gets_its_own_draw(images):
    same_image = images[:1].expand(4, -1, -1, -1)
    logits, kept = draw(random_model(seed=1), same_image)
    assert len({tuple(per_image[0]) for per_image in kept}) == 4
    assert not torch.allclose(logits[0], logits[1])


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_every_forward_draws_afresh(mode, images):
    model = random_model(seed=2)
    getattr(model, mode)()
    first, second = draw(model, images)[1], draw(model, images)[1]
    assert all(a[0] != b[0] for a, b in zip(first, second))


def test_prefix_tokens_are_always_kept_and_first(images):
    model = apply_patch(make_vit(reg_tokens=3), "random", 20, trace_source=True)  # class + 3 registers
    _, kept = draw(model, images)
    for per_image in kept:
        for block_kept in per_image:
            assert block_kept[:4] == [0, 1, 2, 3]
            assert len(set(block_kept)) == len(block_kept) and min(block_kept[4:]) >= 4
    assert get_state(model).tokens_per_block == [48, 28, 8, 5]  # 68 → down to the prefix + 1


def test_the_kept_set_is_uniform():
    """4 patches, 2 kept: each of the 6 possible sets has probability 1/6. Over 6000 draws (one batch of
    6000 images) every set's count lies inside the binomial's central 1 - 2e-7."""
    model = apply_patch(make_vit(img_size=8, patch_size=4), "random", [2, 0, 0, 0], trace_source=True)
    seed_draws(model, 11)
    draws = 6000
    _, kept = draw(model, torch.randn(draws, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    counts = {}
    for per_image in kept:
        assert per_image[0][0] == 0
        chosen = frozenset(per_image[0][1:])
        counts[chosen] = counts.get(chosen, 0) + 1
    low, high = binomial_bounds(draws, 1 / 6)
    assert len(counts) == 6 and all(len(chosen) == 2 for chosen in counts)
    assert all(low <= count <= high for count in counts.values()), (counts, low, high)


def test_every_token_is_kept_equally_often():
    """64 patches, 16 kept: each patch is kept with probability 1/4; over 2000 draws every patch's count lies
    inside the binomial's central 1 - 2e-7 (a draw favouring low or high positions would leave it)."""
    model = apply_patch(make_vit(), "random", [48, 0, 0, 0], trace_source=True)
    seed_draws(model, 12)
    draws = 2000
    _, kept = draw(model, torch.randn(draws, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    counts = [0] * 65
    for per_image in kept:
        for token in per_image[0][1:]:
            counts[token] += 1
    low, high = binomial_bounds(draws, 16 / 64)
    assert counts[0] == 0 and sum(counts) == 16 * draws
    assert all(low <= count <= high for count in counts[1:]), (min(counts[1:]), max(counts[1:]), low, high)


# --- random: where the generator lives ----------------------------------------------------------------

def test_an_evaluation_pass_restarts_from_the_seed_and_leaves_the_stream_where_it_was(images):
    reference = random_model(seed=3)
    first, second = draw(reference, images)[1], draw(reference, images)[1]
    model = random_model(seed=3)
    draw(model, images)
    with evaluation_draws(torch.nn.Sequential(model)):  # found inside a wrapper too
        assert draw(model, images)[1] == first
        assert draw(model, images)[1] == second
    assert draw(model, images)[1] == second  # the stream continues after its one forward before the pass


def test_evaluation_draws_of_an_unpatched_model_does_nothing(images):
    model = make_vit()
    with evaluation_draws(model):
        model(images)


def test_a_re_applied_patch_starts_from_the_default_seed(images):
    fresh = draw(random_model(), images)[1]
    model = random_model(seed=5)
    assert draw(model, images)[1] != fresh
    remove_patch(model)
    apply_patch(model, "random", POOL_K, trace_source=True)
    assert draw(model, images)[1] == fresh
    seed_draws(model, 0)
    assert draw(model, images)[1] == fresh


@pytest.mark.parametrize("seed, message", [(True, "seed: expected an int, got True"), (1.5, "seed: expected an int"),
                                           (2 ** 70, "seed: 1180591620717411303424 is outside")])
def test_bad_seeds_are_refused(seed, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        seed_draws(random_model(), seed)


def test_seeding_an_unpatched_model_is_refused():
    with pytest.raises(ValueError, match="^model: not patched"):
        seed_draws(make_vit(), 0)


# --- main.py: --seed, evaluation ----------------------------------------------------------------------

def _options(seed):
    return argparse.Namespace(method="random", schedule=POOL_K, reduce_at=None, prop_attn="auto", seed=seed)


def test_main_seeds_the_draws_from_its_seed(images):
    model = compress(make_vit(), _options(seed=4), trace_source=True)
    assert draw(model, images)[1] == draw(random_model(seed=4), images)[1]


def test_every_evaluation_pass_of_main_keeps_the_same_tokens(images):
    loader = DataLoader(TensorDataset(torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(5)),
                                      torch.arange(12) % 5), batch_size=4)
    cpu = torch.device("cpu")
    model = compress(make_vit(), _options(seed=4))
    first = evaluate(model, loader, cpu, None, predictions=True)
    model.train()
    model(images)  # a training step between the passes draws too
    second = evaluate(model, loader, cpu, None, predictions=True)
    assert first == second
    other_seed = evaluate(compress(make_vit(), _options(seed=5)), loader, cpu, None, predictions=True)
    assert other_seed["test_loss"] != first["test_loss"]


# --- low_norm -------------------------------------------------------------------------------------------

def test_low_norm_keeps_the_patches_tk_n_drops(images):
    """At the first block, with half of the 64 patches removed, the two kept sets are complements."""
    kept = {}
    for method in ("tk_n", "low_norm"):
        model = apply_patch(make_vit(), method, [32, 0, 0, 0], trace_source=True)
        kept[method] = draw(model, images)[1]
    for tk_n, low_norm in zip(kept["tk_n"], kept["low_norm"]):
        assert tk_n[0][0] == low_norm[0][0] == 0
        assert sorted(tk_n[0][1:] + low_norm[0][1:]) == list(range(1, 65))
