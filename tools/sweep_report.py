"""summary.md and pareto.png of a sweep, from its runs.csv and the runs' predictions: accuracy with intervals,
the best method at each cost, tk_n against tk, paired differences, the environments, accuracy against cost."""
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from pruning import METHOD_NAMES, METHODS
from tools.stats import BOOTSTRAP_SEED, RESAMPLES, bootstrap_ci, mcnemar_exact, mean_std, paired_t, t_interval
from tools.sweep_rows import (BASELINE, ENVIRONMENT_FIELDS, NO_LEVEL, PROTOCOLS, Key, derive_speedups, read_rows,
                              write_rows)

BEST = "best"  # in ``compare``: the most accurate pruning method at that protocol and level


@dataclass
class Group:
    """The rows of one (protocol, method, level) over seeds."""
    protocol: str
    method: str
    level: str
    schedule: str
    accuracy: List[float]
    gflops: List[float]
    throughput: List[float]
    speedup: List[float]

    @property
    def n(self) -> int:
        return len(self.accuracy)


def _floats(rows: List[Dict[str, str]], name: str) -> List[float]:
    return [float(r[name]) for r in rows if r.get(name) not in (None, "")]


def group_rows(rows: List[Dict[str, str]]) -> List[Group]:
    """Rows grouped by (protocol, method, level, schedule), in the order they first appear."""
    groups: Dict[Key, List[Dict[str, str]]] = {}
    for row in rows:
        groups.setdefault((row["protocol"], row["method"], row["level"], row["schedule"]), []).append(row)
    return [Group(*key, accuracy=_floats(members, "accuracy"), gflops=_floats(members, "gflops"),
                  throughput=_floats(members, "throughput"), speedup=_floats(members, "speedup"))
            for key, members in groups.items()]


def sort_groups(groups: List[Group], level_order: Sequence[str]) -> List[Group]:
    """Baseline first, then by protocol, level (as configured) and method (library order)."""
    protocols = [BASELINE, *PROTOCOLS]
    levels = [NO_LEVEL, *level_order]

    def rank(g: Group) -> Tuple:
        return (protocols.index(g.protocol) if g.protocol in protocols else len(protocols),
                levels.index(g.level) if g.level in levels else len(levels),
                METHOD_NAMES.index(g.method) if g.method in METHOD_NAMES else len(METHOD_NAMES), g.schedule)

    return sorted(groups, key=rank)


def method_label(method: str) -> str:
    """A method's name in the tables: controls (random keep, lowest norm) marked as such."""
    return f"{method} (control)" if method in METHODS and METHODS[method].control else method


def fmt_mean_std(values: Sequence[float], digits: int) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary_table(groups: List[Group]) -> List[str]:
    lines = ["| protocol | method | level | schedule | top-1 % | GFLOPs | img/s | speedup | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        lines.append(f"| {g.protocol} | {method_label(g.method)} | {g.level} | {g.schedule} "
                     f"| {fmt_mean_std(g.accuracy, 2)} "
                     f"| {fmt_mean_std(g.gflops, 4)} | {fmt_mean_std(g.throughput, 0)} "
                     f"| {fmt_mean_std(g.speedup, 2)} | {g.n} |")
    return lines


def pivot_table(groups: List[Group], level_order: Sequence[str], value: str = "accuracy", digits: int = 2,
                protocols: Sequence[str] = PROTOCOLS, spread: bool = True) -> List[str]:
    """Compact view: one line per method, one column per protocol × level: ``value`` mean (± std over
    seeds with ``spread``). Method ``none`` (level ``-``) fills every column of its protocol."""
    columns = [(p, level) for p in protocols for level in level_order
               if any(g.protocol == p and g.level == level for g in groups)]
    cell = {(g.protocol, g.method, g.level): g for g in groups}
    lines = ["| method | " + " | ".join(f"{p} {level}".strip() for p, level in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for method in METHOD_NAMES:
        found = [cell.get((p, method, level)) or cell.get((p, method, NO_LEVEL)) for p, level in columns]
        if any(found):
            lines.append(f"| {method_label(method)} | " + " | ".join(_cell(g, value, digits, spread) for g in found)
                         + " |")
    return lines


def _cell(group: Optional[Group], value: str, digits: int, spread: bool) -> str:
    if group is None:
        return ""
    values = getattr(group, value)
    return fmt_mean_std(values, digits) if spread else f"{mean_std(values)[0]:.{digits}f}"


def _rows_of(rows: List[Dict[str, str]], protocol: str, method: str, level: str) -> List[Dict[str, str]]:
    level = NO_LEVEL if method == "none" else level
    return [r for r in rows if r["protocol"] == protocol and r["method"] == method and r["level"] == level
            and r.get("accuracy") not in (None, "")]


def paired_rows(rows: List[Dict[str, str]], a: str, b: str, protocol: str, level: str
                ) -> List[Tuple[Dict[str, str], Dict[str, str]]]:
    """(row of a, row of b) for each seed both have at ``protocol`` and ``level``, by seed: the same baseline
    checkpoint and the same training seed. Off the shelf, where one method ran once (a fixed baseline evaluated
    once) and the other, a stochastic one, once per seed (its draws of the kept tokens), the one run pairs with
    each of the draws."""
    of_a = {r["seed"]: r for r in _rows_of(rows, protocol, a, level)}
    of_b = {r["seed"]: r for r in _rows_of(rows, protocol, b, level)}
    by_seed = lambda runs: [runs[seed] for seed in sorted(runs, key=int)]  # noqa: E731
    if protocol == "offtheshelf" and _one_against_draws(a, len(of_a), b, len(of_b)):
        return [(row_a, row_b) for row_a in by_seed(of_a) for row_b in by_seed(of_b)]
    return [(of_a[seed], of_b[seed]) for seed in sorted(of_a.keys() & of_b.keys(), key=int)]


def _one_against_draws(a: str, runs_a: int, b: str, runs_b: int) -> bool:
    """One run of one method against several of the other, which draws at random."""
    draws = lambda method, runs, other: runs > 1 and other == 1 and METHODS[method].stochastic  # noqa: E731
    return draws(a, runs_a, runs_b) or draws(b, runs_b, runs_a)


def paired_differences(rows: List[Dict[str, str]], method_a: str, method_b: str, protocol: str,
                       level: str) -> List[float]:
    """accuracy(a) - accuracy(b) for each seed that has both."""
    return [float(row_a["accuracy"]) - float(row_b["accuracy"])
            for row_a, row_b in paired_rows(rows, method_a, method_b, protocol, level)]


def load_correct(out_dir: Path, row: Dict[str, str]):
    """(per-image correctness, the images' identity) of a row's predictions.npz, or None without one."""
    import numpy as np

    name = row.get("predictions") or ""
    if not name or not (out_dir / name).is_file():
        return None
    with np.load(out_dir / name) as saved:
        labels = saved["labels"]
        identity = (len(labels), saved["indices"].tobytes() if "indices" in saved.files else b"", labels.tobytes())
        return saved["predicted"] == labels, identity


@dataclass
class Interval:
    """An estimate with its 95% interval and how it was made."""
    mean: float
    low: float
    high: float
    how: str  # "bootstrap over N test images", "t over 3 seeds", ...
    test: str = ""  # the test of a difference: McNemar's p, or the t statistic
    ahead: str = ""  # how often a was ahead of b
    p: Optional[float] = None

    def ci(self, digits: int = 2) -> str:
        return "–" if math.isnan(self.low) else f"[{self.low:.{digits}f}, {self.high:.{digits}f}]"


def accuracy_interval(members: List[Dict[str, str]], out_dir: Path) -> Optional[Interval]:
    """Top-1 (%) of one protocol × method × level: over seeds (t-interval) when there are several; one run
    with predictions: the bootstrap over its test images; the off-the-shelf draws of a stochastic method
    (one run per seed, the same weights): the bootstrap over the images of their per-image mean correctness;
    else the value alone."""
    if not members:
        return None
    if _are_draws(members):
        loaded = [load_correct(out_dir, row) for row in members]
        if None not in loaded and len({identity for _, identity in loaded}) == 1:
            import numpy as np

            mean, low, high = bootstrap_ci(np.mean([correct.astype(float) for correct, _ in loaded], axis=0) * 100)
            return Interval(mean, low, high, f"bootstrap over {len(loaded[0][0])} test images, mean of "
                            f"{len(loaded)} draws")
    if len(members) > 1:
        mean, low, high = t_interval([float(r["accuracy"]) for r in members])
        return Interval(mean, low, high, f"t over {len(members)} seeds")
    loaded = load_correct(out_dir, members[0])
    if loaded is None:
        return Interval(float(members[0]["accuracy"]), math.nan, math.nan, "one run")
    mean, low, high = bootstrap_ci(loaded[0].astype(float) * 100)
    return Interval(mean, low, high, f"bootstrap over {len(loaded[0])} test images")


def _are_draws(members: List[Dict[str, str]]) -> bool:
    """Several off-the-shelf runs of a stochastic method: draws of its kept tokens on the same weights."""
    method = members[0]["method"]
    return len(members) > 1 and members[0]["protocol"] == "offtheshelf" and method in METHODS and \
        METHODS[method].stochastic


def pair_interval(rows: List[Dict[str, str]], a: str, b: str, protocol: str, level: str,
                  out_dir: Path) -> Optional[Interval]:
    """Top-1 of a minus b (points) at one protocol and level: several seeds: paired by seed, t-interval;
    one run each with predictions on the same images: paired bootstrap over the images and McNemar's test;
    one run against the draws of a stochastic method (see :func:`paired_rows`): the paired bootstrap over the
    images of the difference with its per-image mean over the draws."""
    pairs = paired_rows(rows, a, b, protocol, level)
    if not pairs:
        return None
    diffs = [float(row_a["accuracy"]) - float(row_b["accuracy"]) for row_a, row_b in pairs]
    against_draws = len({id(row_a) for row_a, _ in pairs}) == 1 or len({id(row_b) for _, row_b in pairs}) == 1
    if len(diffs) > 1 and not against_draws:
        mean, low, high = t_interval(diffs)
        t = paired_t(diffs)
        return Interval(mean, low, high, f"t over {len(diffs)} seeds",
                        test="–" if math.isnan(t) else f"t = {t:.1f}, {len(diffs) - 1} df",
                        ahead=f"{sum(d > 0 for d in diffs)}/{len(diffs)} seeds")
    loaded = {id(row): load_correct(out_dir, row) for pair in pairs for row in pair}  # each run read once
    if None in loaded.values() or len({identity for _, identity in loaded.values()}) > 1:
        return Interval(statistics.fmean(diffs), math.nan, math.nan, "one run" if len(diffs) == 1 else "runs without common predictions")
    correct = {key: found[0] for key, found in loaded.items()}
    if len(pairs) == 1:
        correct_a, correct_b = (correct[id(row)] for row in pairs[0])
        mean, low, high = bootstrap_ci((correct_a.astype(float) - correct_b.astype(float)) * 100)
        a_only, b_only, p = mcnemar_exact(correct_a.tolist(), correct_b.tolist())
        return Interval(mean, low, high, f"paired bootstrap over {len(correct_a)} test images",
                        test=f"McNemar p = {p:.2g}", ahead=f"{a_only} vs {b_only} images", p=p)
    return draws_interval([(correct[id(row_a)], correct[id(row_b)]) for row_a, row_b in pairs])


def draws_interval(pairs) -> Interval:
    """a − b where one of them is several draws of a stochastic method, from the per-image correctness of each
    pair of runs: per image, a's minus b's, each averaged over its runs; the percentile bootstrap over the
    images (the draws are independent from image to image, so resampling images covers the draws too).
    Ahead: images only a gets right vs only b, summed over the pairs."""
    import numpy as np

    def mean_over_runs(side: int):
        runs = {id(pair[side]): pair[side] for pair in pairs}.values()  # the one run of a side counted once
        return np.mean([run.astype(float) for run in runs], axis=0)

    mean, low, high = bootstrap_ci((mean_over_runs(0) - mean_over_runs(1)) * 100)
    a_only = sum(int((correct_a & ~correct_b).sum()) for correct_a, correct_b in pairs)
    b_only = sum(int((correct_b & ~correct_a).sum()) for correct_a, correct_b in pairs)
    return Interval(mean, low, high, f"paired bootstrap over {len(pairs[0][0])} test images, mean of {len(pairs)} "
                    f"draws", ahead=f"{a_only} vs {b_only} images ({len(pairs)} draws)")


PRUNING = ("tk", "tk_n", "evit", "evit_n", "n_wa", "a_wn")  # what ``best`` in ``compare`` picks from


def best_method(rows: List[Dict[str, str]], protocol: str, level: str, among: Sequence[str]) -> Optional[str]:
    """The method of ``among`` with the highest mean top-1 at ``protocol`` and ``level``."""
    means = {m: mean_std([float(r["accuracy"]) for r in _rows_of(rows, protocol, m, level)])[0] for m in among}
    means = {m: v for m, v in means.items() if not math.isnan(v)}
    return max(means, key=lambda m: (means[m], -METHOD_NAMES.index(m))) if means else None


def _levels_of(rows: List[Dict[str, str]], protocol: str, level_order: Sequence[str]) -> List[str]:
    return [level for level in level_order if any(r["protocol"] == protocol and r["level"] == level for r in rows)]


def comparison_table(rows: List[Dict[str, str]], pairs: Sequence[Tuple[str, str]],
                     level_order: Sequence[str], out_dir: Optional[Path] = None) -> List[str]:
    """Per protocol and level: the paired accuracy difference a − b, its 95% interval, the test and how often
    a was ahead (see :func:`pair_interval`); b ``best``: the most accurate pruning method there."""
    out_dir = out_dir or Path(".")
    lines = ["| protocol | level | difference | mean ± std (points) | 95% CI | test | a ahead in |",
             "|---|---|---|---|---|---|---|"]
    for protocol in PROTOCOLS:
        for level in level_order:
            for a, b in pairs:
                if b == BEST:
                    b = best_method(rows, protocol, level, [m for m in PRUNING if m != a]) or BEST
                    label = f"{method_label(a)} − {b} (best pruning)"
                else:
                    label = f"{method_label(a)} − {method_label(b)}"
                found = pair_interval(rows, a, b, protocol, level, out_dir)
                if found is None:
                    continue
                diffs = paired_differences(rows, a, b, protocol, level)
                lines.append(f"| {protocol} | {level} | {label} | {fmt_mean_std(diffs, 2)} | {found.ci()} "
                             f"| {found.test or '–'} | {found.ahead or '–'} |")
    return lines


Intervals = Dict[Tuple[str, str, str], Interval]  # (protocol, method, level) -> top-1 with its interval


def accuracy_intervals(rows: List[Dict[str, str]], out_dir: Path) -> Intervals:
    """:func:`accuracy_interval` of every (protocol, method, level) the rows hold, each computed once (a
    bootstrap over the test images is the slow part of the summary)."""
    intervals = {}
    for key in dict.fromkeys((r["protocol"], r["method"], r["level"]) for r in rows):
        found = accuracy_interval(_rows_of(rows, *key), out_dir)
        if found is not None:
            intervals[key] = found
    return intervals


def interval_at(intervals: Intervals, protocol: str, method: str, level: str) -> Optional[Interval]:
    """The interval of ``method`` at ``level`` (method ``none``: its one level ``-``, whatever the column)."""
    return intervals.get((protocol, method, NO_LEVEL if method == "none" else level))


def interval_table(groups: List[Group], intervals: Intervals) -> List[str]:
    lines = ["| protocol | method | level | top-1 % | 95% CI | interval |", "|---|---|---|---|---|---|"]
    for g in groups:
        found = interval_at(intervals, g.protocol, g.method, g.level)
        if found is not None:
            lines.append(f"| {g.protocol} | {method_label(g.method)} | {g.level} | {found.mean:.2f} | {found.ci()} "
                         f"| {found.how} |")
    return lines


def interval_pivot(rows: List[Dict[str, str]], intervals: Intervals, protocol: str, level_order: Sequence[str]
                   ) -> List[str]:
    """One protocol's top-1 with its 95% interval (as :func:`accuracy_interval`), a line per method and a
    column per level; method ``none`` fills every column."""
    levels = _levels_of(rows, protocol, level_order)
    lines = ["| method | " + " | ".join(levels) + " |", "|---|" + "---|" * len(levels)]
    for method in METHOD_NAMES:
        found = [interval_at(intervals, protocol, method, level) for level in levels]
        if any(found):
            lines.append(f"| {method_label(method)} | " + " | ".join(_with_interval(f) for f in found) + " |")
    return lines


def _with_interval(found: Optional[Interval]) -> str:
    if found is None:
        return ""
    return f"{found.mean:.2f}" if math.isnan(found.low) else f"{found.mean:.2f} {found.ci()}"


def best_table(rows: List[Dict[str, str]], intervals: Intervals, level_order: Sequence[str], out_dir: Path
               ) -> List[str]:
    """At each protocol and cost level: the most accurate compression method (controls aside), its 95% interval,
    and its lead over the next one (paired)."""
    lines = ["| protocol | level | best method | top-1 % | 95% CI | next best | lead (points) | lead 95% CI | test |",
             "|---|---|---|---|---|---|---|---|---|"]
    compressing = [m for m in METHOD_NAMES if m != "none" and not METHODS[m].control]
    for protocol in PROTOCOLS:
        for level in _levels_of(rows, protocol, level_order):
            best = best_method(rows, protocol, level, compressing)
            if best is None:
                continue
            found = interval_at(intervals, protocol, best, level)
            second = best_method(rows, protocol, level, [m for m in compressing if m != best])
            lead = pair_interval(rows, best, second, protocol, level, out_dir) if second else None
            lead_text = "– | – | – | –" if lead is None else \
                f"{second} | {lead.mean:+.2f} | {lead.ci()} | {lead.test or '–'}"
            lines.append(f"| {protocol} | {level} | {best} | {found.mean:.2f} | {found.ci()} | {lead_text} |")
    return lines


def verdict(found: Interval, a: str, b: str) -> str:
    if math.isnan(found.low):
        return "no interval"
    if found.low > 0:
        return f"{a} better"
    if found.high < 0:
        return f"{b} better"
    return "no difference shown"


def tk_n_table(rows: List[Dict[str, str]], level_order: Sequence[str], out_dir: Path) -> List[str]:
    """Does tk_n beat tk? At each protocol and level where both ran."""
    lines = ["| protocol | level | tk_n − tk (points) | 95% CI | test | verdict |", "|---|---|---|---|---|---|"]
    for protocol in PROTOCOLS:
        for level in level_order:
            found = pair_interval(rows, "tk_n", "tk", protocol, level, out_dir)
            if found is not None:
                lines.append(f"| {protocol} | {level} | {found.mean:+.2f} | {found.ci()} | {found.test or '–'} "
                             f"| {verdict(found, 'tk_n', 'tk')} |")
    return lines


def environment_lines(rows: List[Dict[str, str]]) -> List[str]:
    """The environments the rows came from, with how many runs each."""
    seen: Dict[Tuple[str, ...], int] = {}
    for r in rows:
        key = tuple(str(r.get(name) or "") for name in ENVIRONMENT_FIELDS)
        seen[key] = seen.get(key, 0) + 1
    lines = []
    for (torch_v, timm_v, numpy_v, device, threads), n in seen.items():
        if not any((torch_v, timm_v, numpy_v, device, threads)):
            lines.append(f"- not recorded: {n} runs")
        else:
            lines.append(f"- torch {torch_v}, timm {timm_v}, numpy {numpy_v}; {device}; {threads} threads: {n} runs")
    return lines


def timing_lines(rows: List[Dict[str, str]]) -> List[str]:
    """Wall time of the runs per protocol (the ``seconds`` column: run time inside the sweep)."""
    lines = []
    for protocol in (BASELINE, *PROTOCOLS):
        seconds = _floats([r for r in rows if r["protocol"] == protocol], "seconds")
        if seconds:
            lines.append(f"- {protocol}: {len(seconds)} runs, {sum(seconds) / 60:.1f} min in all, "
                         f"{statistics.median(seconds):.0f} s median per run")
    return lines


def write_summary(rows: List[Dict[str, str]], path: Path, level_order: Sequence[str],
                  pairs: Sequence[Tuple[str, str]], out_dir: Optional[Path] = None) -> None:
    """summary.md: the mean ± std table, 95% intervals, the best method per level, tk_n against tk, the paired
    comparisons and the environments; ``out_dir``: where the rows' predictions lie (default: summary.md's folder)."""
    out_dir = path.parent if out_dir is None else out_dir
    groups = sort_groups(group_rows(rows), level_order)
    intervals = accuracy_intervals(rows, out_dir)
    text = ["# Sweep summary", "",
            f"Mean ± sample std over seeds, from {len(rows)} runs in runs.csv. `baseline`: the trained "
            "uncompressed model; `offtheshelf`: the baseline evaluated with compression; `finetune`: the "
            "baseline trained further with compression (method `none`: trained further without). "
            "img/s: inference throughput measured in each run itself. speedup: measured by main.py --benchmark in the "
            "off-the-shelf run, against the uncompressed model in the same run; finetune rows reuse the value of "
            "the same schedule and seed (speed does not depend on the weights). Methods marked (control) are "
            "controls, not methods under test: `random` keeps a uniformly random subset of the tokens (drawn from the "
            "run's seed; off the shelf it runs once per seed, each seed a draw), `low_norm` the smallest norms.",
            "",
            *summary_table(groups), "",
            "## Top-1 % by method and level", "",
            "Mean ± std over seeds (method `none` compresses nothing: the same value in each level's column).", "",
            *pivot_table(groups, level_order), "",
            "## GFLOPs per image by method and level", "",
            *pivot_table(groups, level_order, value="gflops", digits=4, protocols=PROTOCOLS[:1], spread=False), "",
            "## Top-1 % with 95% intervals", "",
            f"Several seeds: the t-interval of the mean over seeds (mean ± t(0.975, n−1) · std / √n); off the shelf, "
            f"the draws of a stochastic control (one run per seed): the percentile bootstrap over the test images of "
            f"the per-image correctness averaged over the draws. One run "
            f"(off the shelf from a fixed baseline, or a fine-tune run with one seed): the percentile bootstrap over "
            f"the test images ({RESAMPLES} resamples, numpy seed {BOOTSTRAP_SEED}), from the run's predictions.npz; "
            f"for a fine-tune it covers the sampling of the test images, not the spread between fine-tune seeds.",
            "",
            *[line for protocol in PROTOCOLS if _levels_of(rows, protocol, level_order)
              for line in (f"{protocol}:", "", *interval_pivot(rows, intervals, protocol, level_order), "")],
            *interval_table(groups, intervals), "",
            "## Best method at each level", "",
            "The most accurate compression method at each protocol and level, its 95% interval, and its lead over "
            "the next best (paired, as below).", "",
            *best_table(rows, intervals, level_order, out_dir), "",
            "## Does tk_n beat tk?", "",
            "tk_n − tk, paired (as below); the verdict says whether the 95% interval excludes 0.", "",
            *tk_n_table(rows, level_order, out_dir), "",
            "## Paired differences", "",
            "Top-1 accuracy of a minus b on the same baseline. Several seeds (fine-tuning): paired by seed (same "
            "baseline checkpoint and seed), mean ± std, the 95% t-interval of the mean difference and the paired "
            "t statistic (with 3 seeds, |t| > 4.30 means p < 0.05, two-sided). One run each (off the shelf from a "
            f"fixed baseline, or fine-tunes with one common seed): the difference on the same test images, its paired bootstrap interval ({RESAMPLES} "
            "resamples of the images) and McNemar's exact test on the images where only one of them is right "
            "(a ahead in: images only a gets right vs only b). Off the shelf against a stochastic control "
            "(`random`, run once per seed: its seeds are draws of the kept tokens, the other method's one run is "
            "paired with each): mean ± std over the draws, and the paired bootstrap over the images of the per-image "
            "difference with the control's correctness averaged over its draws (no McNemar test: the draws are not "
            "one pair of classifiers). `best pruning`: the most accurate of tk, tk_n, evit, evit_n, n_wa, a_wn at that "
            "protocol and level.", "",
            *comparison_table(rows, pairs, level_order, out_dir), "",
            "## Environment", "", "Where the runs ran (runs.csv's torch, timm, numpy, device and threads).", "",
            *environment_lines(rows), "",
            "## Run time", "", *timing_lines(rows), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))


# x axes of pareto.png: (Group field, axis label, title). Throughput is shown as the speedup measured
# against the uncompressed model in the same run: raw img/s of runs made at different times on a
# shared machine mix the machine's load into the comparison.
PARETO_AXES = (("gflops", "GFLOPs / image", "GFLOPs"),
               ("speedup", "throughput speedup over the uncompressed model (same run)", "throughput"))


def plot_pareto(rows: List[Dict[str, str]], path: Path, level_order: Sequence[str]) -> None:
    """Accuracy against GFLOPs (left) and throughput speedup (right), one row of plots per protocol,
    one line per method through its levels in order of cost (matched-FLOPs and equal-k levels on one
    curve; controls dashed); error bars are the std over seeds, the star is the baseline (speedup 1 by
    definition)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sort_groups(group_rows(rows), level_order)
    protocols = [p for p in PROTOCOLS if any(g.protocol == p for g in groups)] or [BASELINE]
    baseline = [g for g in groups if g.protocol == BASELINE]
    fig, axes = plt.subplots(len(protocols), 2, figsize=(11, 4.2 * len(protocols)), squeeze=False)
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(METHOD_NAMES)}
    for axes_row, protocol in zip(axes, protocols):
        for ax, (x_name, x_label, title) in zip(axes_row, PARETO_AXES):
            for method in METHOD_NAMES:
                points = [g for g in groups if g.protocol == protocol and g.method == method]
                _draw_line(ax, points, x_name, method_label(method), colors[method],
                           linestyle="--" if METHODS[method].control else "-")
            for g in baseline:
                x = 1.0 if x_name == "speedup" else mean_std(getattr(g, x_name))[0]
                y, y_std = mean_std(g.accuracy)
                ax.errorbar([x], [y], yerr=None if math.isnan(y_std) else [y_std], marker="*", markersize=13,
                            color="black", linestyle="none", label="baseline")
            ax.set_xlabel(x_label)
            ax.set_ylabel("top-1 accuracy (%)")
            ax.set_title(f"{protocol}: top-1 accuracy vs {title}")
            ax.grid(alpha=0.3)
        axes_row[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _draw_line(ax, points: List[Group], x_name: str, label: str, color, linestyle: str = "-") -> None:
    coords = []
    for g in points:
        x, _ = mean_std(getattr(g, x_name))
        y, y_std = mean_std(g.accuracy)
        if not (math.isnan(x) or math.isnan(y)):
            coords.append((x, y, 0.0 if math.isnan(y_std) else y_std))
    if not coords:
        return
    xs, ys, errs = zip(*sorted(coords))
    ax.errorbar(xs, ys, yerr=errs, marker="o", markersize=4, capsize=2, label=label, color=color, linestyle=linestyle)


def write_reports(runs_csv: Path, level_order: Sequence[str], pairs: Sequence[Tuple[str, str]]) -> None:
    """summary.md and pareto.png beside ``runs_csv`` (whose derived speedups are brought up to date first)."""
    rows = read_rows(runs_csv)
    derived = derive_speedups(rows)
    if derived != rows:
        write_rows(runs_csv, derived)
        rows = read_rows(runs_csv)
    write_summary(rows, runs_csv.parent / "summary.md", level_order, pairs, runs_csv.parent)
    plot_pareto(rows, runs_csv.parent / "pareto.png", level_order)
