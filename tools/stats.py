"""The statistics of the sweep's summary: mean ± std, t-intervals over seeds, the bootstrap over test images,
McNemar's exact test; and the deployment benchmark's interval of a ratio of median times. Plain functions of
lists of numbers, each checked in the tests against scipy or a straightforward loop."""
import math
import statistics
from typing import Sequence, Tuple

RESAMPLES = 2000  # bootstrap resamples of the test images
BOOTSTRAP_SEED = 0


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the deviation of one value is NaN."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def paired_t(diffs: Sequence[float]) -> float:
    """Paired t statistic: mean / (std / sqrt(n)); NaN for fewer than two values or no spread."""
    mean, std = mean_std(diffs)
    if math.isnan(std) or std == 0:
        return math.nan
    return mean / (std / math.sqrt(len(diffs)))


# two-sided 95% quantiles of Student's t by degrees of freedom (beyond 30: the normal's 1.96 plus a little)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_95(df: int) -> float:
    return T95[df - 1] if df <= len(T95) else 1.960 + 2.5 / df


def t_interval(values: Sequence[float]) -> Tuple[float, float, float]:
    """(mean, low, high): the 95% t-interval of the mean, mean ± t(0.975, n-1) · std / sqrt(n); NaN bounds for
    fewer than two values."""
    mean, std = mean_std(values)
    if math.isnan(std):
        return mean, math.nan, math.nan
    half = t_quantile_95(len(values) - 1) * std / math.sqrt(len(values))
    return mean, mean - half, mean + half


def bootstrap_ci(values: Sequence[float], resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED
                 ) -> Tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap 95% interval of the mean of ``values`` (NaNs left out; NaN
    for none), ``resamples`` times drawing n of the n values with replacement, ``numpy.random.default_rng(seed)``'s
    ``integers(0, n, n)`` each time. Per-image correctness (0/1) gives the accuracy's interval; the difference of
    two models' correctness on the same images the paired interval of their difference. The one bootstrap of
    the tools (the sweep's summary, tools/score_analysis.py)."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[~np.isnan(values)]
    if values.size == 0:
        return math.nan, math.nan, math.nan
    rng, n = np.random.default_rng(seed), len(values)
    means = np.array([values[rng.integers(0, n, n)].mean() for _ in range(resamples)])
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


def bootstrap_ratio_of_medians(numerator: Sequence[float], denominator: Sequence[float],
                               resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Tuple[float, float, float]:
    """(ratio, low, high): median(numerator) / median(denominator) and its percentile bootstrap 95% interval, the
    two series resampled as pairs (``numerator[i]`` and ``denominator[i]`` were timed in the same round, so
    drift in the machine's speed moves both): ``resamples`` times drawing n of the n rounds with replacement,
    ``numpy.random.default_rng(seed)``'s ``integers(0, n, n)`` each time."""
    import numpy as np

    top, bottom = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if top.shape != bottom.shape or top.ndim != 1 or top.size == 0:
        raise ValueError(f"two series of the same non-zero length, got {top.shape} and {bottom.shape}")
    rng, n = np.random.default_rng(seed), top.size
    ratios = []
    for _ in range(resamples):
        rounds = rng.integers(0, n, n)
        ratios.append(np.median(top[rounds]) / np.median(bottom[rounds]))
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(np.median(top) / np.median(bottom)), float(low), float(high)


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> Tuple[int, int, float]:
    """(a right where b is wrong, b right where a is wrong, two-sided exact p): McNemar's test, the binomial
    test of the discordant images against 1/2."""
    a_only = sum(1 for a, b in zip(correct_a, correct_b) if a and not b)
    b_only = sum(1 for a, b in zip(correct_a, correct_b) if b and not a)
    n = a_only + b_only
    if n == 0:
        return a_only, b_only, 1.0
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1))
    return a_only, b_only, min(1.0, 2 * tail / 2 ** n)
