"""Sweep: compression methods × reduction levels × seeds through main.py, resumable.

    python tools/sweep.py --config configs/sweep_fashionmnist.yaml

For every seed the baseline (method ``none``) is trained first; its checkpoint is then
- ``offtheshelf``: evaluated with each method and level, no training (``main.py --eval_only``), and
- ``finetune``: trained further with each method and level in the loop.
With ``baseline_checkpoint: PATH`` (a main.py checkpoint trained once) no baseline is trained: the
``baseline`` row evaluates that checkpoint (``--eval_only --benchmark``), the off-the-shelf runs
evaluate it compressed (once: evaluation does not depend on the seed; but once per seed for a stochastic
method such as ``random``, whose seed draws the kept tokens) and the fine-tune runs start from it, once
per seed (the seed changes the fine-tune's data order and augmentation).
``--jobs N`` runs N runs at once, each in a process of its own (a baseline before the runs that use it).
Each finished run becomes one row of ``<out_dir>/runs.csv`` (with the ``python main.py ...`` command
that reproduces it); rows already there are skipped, so an interrupted sweep continues where it
stopped, and a training run stopped part-way (or before its results.json) resumes from its own last.pt. At the end ``summary.md`` (mean ± std over seeds) and ``pareto.png`` are rebuilt from
runs.csv. Each run's options are data (``{dest: value}``) handed to
``main.run(main.parse_args([], settings=options))`` in this process; the sweep, as their caller, sets
the CPU threads (``threads``, else main.py's own rule for the model).

A level says how many tokens each block removes, in one of three ways (YAML ``levels`` entries):
- ``{name: light, schedule: 2}`` (or a list with one value per block; ``reduce_token:`` is the old name): the
  same for every method;
- ``{name: r70, keep_rate: 0.7, at_blocks: [3, 6, 9]}``: EViT-style, keep 70% of the patch tokens at
  those blocks;
- ``{name: f60, flops_ratio: 0.6}``: matched FLOPs, a per-method schedule landing at 60% of the
  baseline's analytic FLOPs.
Any level may add ``methods: [tk, tk_n]``: only those methods run at it.
"""
import argparse
import contextlib
import difflib
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # ``python tools/sweep.py`` puts tools/ first on the path, not the repo
    sys.path.insert(0, str(ROOT))

from engine.options import read_yaml_mapping  # noqa: E402
from pruning import METHOD_NAMES, get_method  # noqa: E402
from tools.sweep_report import BEST, write_reports  # noqa: E402
from tools.sweep_rows import (BASELINE, ENVIRONMENT_FIELDS, NO_LEVEL, PREDICTIONS_DIR, PROTOCOLS, Key,  # noqa: E402
                              derive_speedups, read_rows, row_key, write_rows)
RESULTS_NAME = "results.json"  # written last: a run folder without it did not finish
CHECKPOINT_NAME = "last.pt"  # the baseline weights reused by the other protocols (not best.pt: no test-set choice)

Results = Dict[str, Any]
RunFn = Callable[[Dict[str, Any]], Results]  # main.py options by dest -> results
Schedule = Union[int, List[int]]
Options = Union[Dict[str, Any], List[str]]  # main.py options in YAML: {epochs: 3} or ["--epochs", "3"]


# ----------------------------------------------------------------------------------------------
# configuration

@dataclass(frozen=True)
class Level:
    """One reduction level; exactly one of ``schedule``, ``keep_rate`` or ``flops_ratio`` is set."""
    name: str
    schedule: Optional[Schedule] = None
    keep_rate: Optional[float] = None
    at_blocks: Tuple[int, ...] = ()
    flops_ratio: Optional[float] = None
    methods: Tuple[str, ...] = ()  # only these methods run at this level (empty: every method)
    protocols: Tuple[str, ...] = ()  # only under these protocols (empty: every protocol)

    def runs(self, method: str, protocol: str) -> bool:
        return (not self.methods or method in self.methods) and (not self.protocols or protocol in self.protocols)

    @classmethod
    def from_dict(cls, entry: Dict[str, Any]) -> "Level":
        if not isinstance(entry, dict):
            raise ValueError(f"levels: each entry must be a mapping such as {{name: light, schedule: 2}}, "
                             f"got {entry!r}")
        entry = {OLD_LEVEL_KEYS.get(key, key): value for key, value in entry.items()}
        unknown = [key for key in entry if key not in LEVEL_KEYS]
        if unknown:
            raise ValueError(f"levels: {entry.get('name', entry)}: unknown key {_unknown(unknown[0], LEVEL_KEYS)}")
        modes = [m for m in ("schedule", "keep_rate", "flops_ratio") if entry.get(m) is not None]
        if "name" not in entry or len(modes) != 1:
            raise ValueError(f"levels: each entry needs a name and exactly one of schedule, keep_rate, "
                             f"flops_ratio; got {entry}")
        if "keep_rate" in modes and not entry.get("at_blocks"):
            raise ValueError(f"levels: {entry['name']}: keep_rate needs at_blocks (the blocks that reduce)")
        methods = entry.get("methods") or ()
        if isinstance(methods, str) or any(m not in METHOD_NAMES for m in methods):
            raise ValueError(f"levels: {entry['name']}: methods must be a list of {', '.join(METHOD_NAMES)}, "
                             f"got {methods!r}")
        protocols = entry.get("protocols") or ()
        if isinstance(protocols, str) or any(p not in PROTOCOLS for p in protocols):
            raise ValueError(f"levels: {entry['name']}: protocols must be a list of {', '.join(PROTOCOLS)}, "
                             f"got {protocols!r}")
        return cls(name=str(entry["name"]), schedule=entry.get("schedule"), keep_rate=entry.get("keep_rate"),
                   at_blocks=tuple(entry.get("at_blocks") or ()), flops_ratio=entry.get("flops_ratio"),
                   methods=tuple(methods), protocols=tuple(protocols))


LEVEL_KEYS = ("name", "schedule", "keep_rate", "at_blocks", "flops_ratio", "methods", "protocols")
OLD_LEVEL_KEYS = {"reduce_token": "schedule"}  # sweep YAMLs written before the rename
# the keys of a sweep YAML; anything else (a typo such as ``method:``) is refused
CONFIG_KEYS = ("out_dir", "work_dir", "seeds", "methods", "levels", "protocols", "main_args", "baseline_args",
               "finetune_args", "offtheshelf_args", "compare", "threads", "baseline_checkpoint", "jobs")
MAIN_OPTION_KEYS = ("main_args", "baseline_args", "finetune_args", "offtheshelf_args")


def _unknown(key: Any, known: Sequence[str]) -> str:
    """``'method' (did you mean 'methods'?); the keys are ...``"""
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key!r}{hint}; the keys are {', '.join(known)}"


def check_main_options(name: str, layer: Any) -> None:
    """A ``*_args`` layer of the YAML holds main.py options, checked as main.py checks them."""
    import main
    from engine.errors import CLIError

    if not isinstance(layer, (dict, list)):
        raise ValueError(f"{name}: expected a mapping of main.py options ({{epochs: 3}}), got {layer!r}")
    try:
        main.parse_args([], settings=merge_options(layer))
    except CLIError as err:
        raise ValueError(f"{name}: {str(err).removeprefix('options: ')}") from None


@dataclass
class SweepConfig:
    """What to run and where to write it."""
    out_dir: Path
    work_dir: Path  # run folders and checkpoints (not results)
    seeds: List[int]
    methods: List[str]
    levels: List[Level]
    protocols: List[str] = field(default_factory=lambda: list(PROTOCOLS))
    main_args: Options = field(default_factory=dict)  # main.py options for every run
    baseline_args: Options = field(default_factory=dict)  # ... for training the baseline (they win over main_args)
    finetune_args: Options = field(default_factory=dict)  # ... for the finetune protocol
    offtheshelf_args: Options = field(default_factory=dict)  # ... for the off-the-shelf protocol
    compare: List[Tuple[str, str]] = field(default_factory=lambda: [("tk_n", "tk")])  # paired differences
    threads: Optional[int] = None  # torch CPU threads (None: main.py's rule, 1 for models under 5 M parameters)
    # with a fixed baseline, the seed of its evaluations (baseline, off the shelf), which run once: the YAML's
    # first seed, so that ``--seeds 1,2`` adds fine-tunes without evaluating the same checkpoint again
    evaluation_seed: int = 0
    baseline_checkpoint: Optional[str] = None  # a fixed, trained baseline: no baseline is trained
    jobs: int = 1  # runs at once, each in a process of its own

    @property
    def runs_csv(self) -> Path:
        return self.out_dir / "runs.csv"


def merge_options(*layers: Options) -> Dict[str, Any]:
    """main.py options by dest (``model`` is ``method``, ``reduce_token`` is ``schedule``) from YAML layers,
    later ones winning key by key (so a protocol's ``epochs`` replaces the common one). A list layer is taken as
    command-line tokens."""
    import main
    from engine import options

    merged: Dict[str, Any] = {}
    for layer in layers:
        if isinstance(layer, dict):
            merged.update(options.dests({str(k).lstrip("-").replace("-", "_"): v for k, v in layer.items()}))
        elif layer:
            merged.update(options.given(main.build_parser(), [str(token) for token in layer]))
    return merged


def options_to_argv(values: Dict[str, Any]) -> List[str]:
    """main.py command-line tokens of options by dest: ``{epochs: 3, amp: True, download: False}`` ->
    ``--epochs 3 --amp --no-download`` (None is left out, lists are comma-joined)."""
    from engine import options

    argv: List[str] = []
    for name, value in options.flag_names(values).items():
        if value is None:
            continue
        argv.append(f"--{name}" if value is not False else f"--no-{name}")
        if not isinstance(value, bool):
            argv.append(",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
    return argv


def command_line(values: Dict[str, Any]) -> str:
    """The ``python main.py ...`` command of a run's options (the runs.csv ``command`` column)."""
    return "python main.py " + shlex.join(options_to_argv(values))


def load_config(path: Optional[str], overrides: Dict[str, Any], data_root: Optional[str] = None) -> SweepConfig:
    """The YAML file at ``path`` (if any) with ``overrides`` (command-line values) on top; ``data_root``
    (``--data_root``) replaces every run's ``data_root``."""
    raw: Dict[str, Any] = {}
    if path:
        raw = read_yaml_mapping(path, "out_dir: ..., levels: ...")
        unknown = [key for key in raw if key not in CONFIG_KEYS]
        if unknown:
            raise ValueError(f"--config {path}: unknown key {_unknown(unknown[0], CONFIG_KEYS)}")
    file_seeds = raw.get("seeds")
    if overrides.get("out_dir") and not overrides.get("work_dir"):
        raw.pop("work_dir", None)  # --out_dir moves everything the sweep writes, run folders included
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if data_root:
        raw["main_args"] = {**merge_options(raw.get("main_args") or {}), "data_root": data_root}
    for name in MAIN_OPTION_KEYS:
        if raw.get(name):
            check_main_options(name, raw[name])
    for required in ("out_dir", "levels"):
        if not raw.get(required):
            raise ValueError(f"{required}: missing; give it in the --config YAML or on the command line")
    out_dir = Path(raw["out_dir"])
    methods = list(raw.get("methods") or METHOD_NAMES)
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; choose from {', '.join(METHOD_NAMES)}")
    protocols = list(raw.get("protocols") or PROTOCOLS)
    if any(p not in PROTOCOLS for p in protocols):
        raise ValueError(f"protocols: choose from {', '.join(PROTOCOLS)}, got {protocols}")
    compare = [tuple(pair) for pair in raw.get("compare", [("tk_n", "tk")])]
    if any(len(pair) != 2 or any(m not in (*METHOD_NAMES, BEST) for m in pair) for pair in compare):
        raise ValueError(f"compare: pairs of methods [a, b] (b may be {BEST}: the most accurate pruning method), "
                         f"got {raw.get('compare')}")
    jobs = 1 if raw.get("jobs") is None else raw["jobs"]
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs: a number of runs at once >= 1, got {jobs!r}")
    return SweepConfig(
        out_dir=out_dir, work_dir=Path(raw.get("work_dir") or out_dir / "runs"),
        seeds=[int(s) for s in raw.get("seeds", [0])], methods=methods,
        evaluation_seed=int((file_seeds or raw.get("seeds") or [0])[0]),
        levels=[Level.from_dict(entry) for entry in raw["levels"]], protocols=protocols,
        main_args=raw.get("main_args") or {}, baseline_args=raw.get("baseline_args") or {},
        finetune_args=raw.get("finetune_args") or {}, offtheshelf_args=raw.get("offtheshelf_args") or {},
        compare=compare, threads=raw.get("threads"),
        baseline_checkpoint=str(raw["baseline_checkpoint"]) if raw.get("baseline_checkpoint") else None, jobs=jobs)


# ----------------------------------------------------------------------------------------------
# levels -> schedules

class LevelResolver:
    """Turns a :class:`Level` into main.py's schedule (``--reduce_token``) for one method, for one model shape.

    ``model``: what main.py builds for ``--arch`` (a timm model, or the engine's wrapper of a transformers /
    OpenCLIP one); its sizes are the library's (``model_shape`` of the module that is patched), whatever the
    family."""

    def __init__(self, model, reduce_at: Optional[str] = None):
        from engine.zoo import backbone_of

        self.model = backbone_of(model).module  # the module apply_patch patches: FLOPs are matched on it
        self.reduce_at = reduce_at  # None: each method's own placement, as main.py does
        shape = backbone_of(model).shape
        self.depth, self.num_prefix, self.num_tokens = shape.depth, shape.num_prefix, shape.num_tokens

    def schedule(self, method: str, level: Level) -> Schedule:
        from pruning import schedules
        from pruning.flops import analytic_flops

        if level.schedule is not None:
            return level.schedule
        if level.keep_rate is not None:
            return schedules.keep_rate_schedule(self.num_tokens, self.depth, level.keep_rate, level.at_blocks,
                                                num_prefix=self.num_prefix)
        if not hasattr(schedules, "matched_flops_schedule"):
            raise RuntimeError("levels: flops_ratio needs pruning.schedules.matched_flops_schedule, "
                               "which this version of the library does not have")
        target = level.flops_ratio * analytic_flops(self.model)  # the unpatched model's FLOPs
        return schedules.matched_flops_schedule(self.model, method, target, reduce_at=self.reduce_at)


def schedule_text(schedule: Schedule) -> str:
    """A schedule as ``--reduce_token`` takes it and runs.csv keeps it: ``4`` or ``0,0,12,0,8,0``."""
    if isinstance(schedule, int):
        return str(schedule)
    return ",".join(str(int(k)) for k in schedule)


def reference_args(main_args: Options) -> argparse.Namespace:
    """main.py's options of the runs, as far as every run shares them."""
    import main

    return main.parse_args([], settings=merge_options(main_args))


def reference_resolver(main_args: Options) -> LevelResolver:
    """A resolver for the model the runs will build (only its shape matters), from main.py's settings."""
    import main

    args = reference_args(main_args)
    return LevelResolver(main.reference_model(args), reduce_at=args.reduce_at)


# ----------------------------------------------------------------------------------------------
# the plan: one RunSpec per row of runs.csv

@dataclass(frozen=True)
class RunSpec:
    """One run of main.py and the row it becomes."""
    protocol: str
    method: str
    level: str
    schedule: str  # as main.py's --reduce_token takes it
    seed: int
    options: Dict[str, Any]  # main.py options by dest, handed to main.run
    needs: Optional[str] = None  # the checkpoint this run starts from

    @property
    def key(self) -> Key:
        return (self.protocol, self.method, self.level, self.schedule, str(self.seed))

    @property
    def command(self) -> str:
        return command_line(self.options)

    @property
    def name(self) -> str:
        """``finetune tk_n level light seed 0``: which run it is."""
        return f"{self.protocol} {self.method} level {self.level} seed {self.seed}"


def baseline_dir(config: SweepConfig, seed: int) -> Path:
    return config.work_dir / BASELINE / f"seed{seed}"


def baseline_checkpoint(config: SweepConfig, seed: int) -> str:
    return str(baseline_dir(config, seed) / CHECKPOINT_NAME)


def baseline_checkpoint_of(spec: RunSpec) -> str:
    """The checkpoint a baseline run writes (in its --output_dir)."""
    return str(Path(spec.options["output_dir"]) / CHECKPOINT_NAME)


def _spec(config: SweepConfig, protocol: str, method: str, level: str, schedule: str, seed: int) -> RunSpec:
    """The options of one run: common options, the protocol's options, then what this run varies."""
    fixed = config.baseline_checkpoint
    needs = fixed if fixed else (None if protocol == BASELINE else baseline_checkpoint(config, seed))
    if protocol == BASELINE and fixed:  # the fixed baseline evaluated (and benchmarked) as it is
        options, out = {**merge_options(config.offtheshelf_args), "benchmark": True}, config.work_dir / BASELINE / "eval"
    elif protocol == BASELINE:
        options, out = config.baseline_args, baseline_dir(config, seed)
    else:
        options = config.finetune_args if protocol == "finetune" else config.offtheshelf_args
        out = config.work_dir / protocol / (method if level == NO_LEVEL else f"{method}-{level}") / f"seed{seed}"
    values = merge_options(config.main_args, options)
    values.setdefault("save_predictions", True)  # per-image statistics in summary.md
    if needs:
        values.update(checkpoint=needs, **({"eval_only": True} if protocol in ("offtheshelf", BASELINE) else {}))
    values.update(method=method, schedule=schedule, seed=seed, output_dir=str(out))
    return RunSpec(protocol, method, level, schedule, seed, values, needs)


def run_seeds(config: SweepConfig, protocol: str, method: str) -> List[int]:
    """The seeds ``method`` runs with under ``protocol``: every seed, but an evaluation of a fixed baseline runs
    once (with ``config.evaluation_seed``) unless the method is stochastic (``random``), whose every evaluation
    draws other tokens: it runs once per seed, and the seeds are its draws."""
    if config.baseline_checkpoint and protocol == "offtheshelf" and not get_method(method).stochastic:
        return [config.evaluation_seed]
    return config.seeds


def plan_runs(config: SweepConfig, schedule: Callable[[str, Level], Schedule]) -> List[RunSpec]:
    """Every run of the sweep: the baselines of all seeds first, then per protocol and seed each
    method × level (so an interrupted sweep has whole seeds). ``schedule(method, level)`` gives the
    per-block reduction; method ``none`` runs once per protocol and seed (level ``-``), the
    uncompressed control. With a fixed baseline checkpoint the baseline and off-the-shelf runs
    (evaluations) run once, with ``config.evaluation_seed``, except those of a stochastic method
    (:func:`run_seeds`).
    """
    once = [config.evaluation_seed]  # a fixed baseline: evaluations do not depend on the seed
    plan = [_spec(config, BASELINE, "none", NO_LEVEL, "0", seed)
            for seed in (once if config.baseline_checkpoint else config.seeds)]
    for protocol in config.protocols:
        seeds = dict.fromkeys(s for method in config.methods for s in run_seeds(config, protocol, method))
        for seed in seeds:
            for method in config.methods:
                if seed not in run_seeds(config, protocol, method):
                    continue
                if method == "none":
                    plan.append(_spec(config, protocol, method, NO_LEVEL, "0", seed))
                    continue
                for level in config.levels:
                    if not level.runs(method, protocol):
                        continue
                    plan.append(_spec(config, protocol, method, level.name, schedule_text(schedule(method, level)),
                                      seed))
    return plan


def _number(value: Any, digits: int) -> Any:
    return "" if value is None else round(float(value), digits)


def make_row(spec: RunSpec, results: Results, seconds: float) -> Dict[str, Any]:
    """A runs.csv row from main.run's results (``speedup`` only where main.py measured one:
    ``--benchmark``, against the uncompressed model in the same run; see :func:`derive_speedups`)."""
    per_block, removed = results.get("schedule_per_block"), results.get("removed_per_block")
    environment = results.get("environment") or {}
    return {
        "schedule_per_block": schedule_text(list(per_block)) if per_block is not None else "",
        "removed_per_block": schedule_text(list(removed)) if removed is not None else "",
        "analytic_gflops": _number(results.get("analytic_gflops"), 6), "prop_attn": results.get("prop_attn") or "",
        **{name: environment.get(name, "") for name in ENVIRONMENT_FIELDS},
        "protocol": spec.protocol, "method": spec.method, "level": spec.level, "schedule": spec.schedule,
        "seed": spec.seed, "accuracy": _number(results.get("accuracy"), 3),
        "best_accuracy": _number(results.get("best_accuracy"), 3), "gflops": _number(results.get("gflops"), 6),
        "gmacs_thop": _number(results.get("gmacs_thop"), 6), "throughput": _number(results.get("throughput"), 1),
        "speedup": _number(results.get("speedup"), 3), "params_m": _number(results.get("params_m"), 4),
        "seconds": round(seconds, 1), "command": spec.command,
    }


def only_levels(plan: List[RunSpec], names: Sequence[str], levels: Sequence[Level]) -> List[RunSpec]:
    """The runs of ``plan`` at the levels named, and those at no level (baselines, method none)."""
    known = [level.name for level in levels]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"--levels: unknown level {unknown[0]!r}; the config's levels are {', '.join(known)}")
    return [spec for spec in plan if spec.level == NO_LEVEL or spec.level in names]


# ----------------------------------------------------------------------------------------------
# running

def run_main(options: Dict[str, Any]) -> Results:
    """One main.py run in this process (the threads as the sweep set them). Each run has its own folder: a
    training run that was stopped there (Ctrl-C, SIGTERM: its last.pt mid-epoch, or after its last epoch but
    before its results) with these same options is resumed exactly; anything else the folder holds (a failed
    attempt, other options) is replaced."""
    import main

    stopped = stopped_run_to_resume(options)
    if stopped:
        return main.run(main.parse_args([], settings={**options, "resume": stopped}))
    return main.run(main.parse_args([], settings={**options, "overwrite": True}))


def stopped_run_to_resume(options: Dict[str, Any]) -> Optional[str]:
    """The last.pt in the run's folder when it is a main.py training stopped before its results were written
    (with epochs left, or while evaluating after the last one) that ``--resume`` would continue with
    ``options`` (its saved settings are these); else None."""
    import main
    from engine.checkpoint import saved_run_settings
    from engine.errors import CLIError
    from engine.options import restored

    path = str(Path(options["output_dir"]) / CHECKPOINT_NAME)
    finished = (Path(options["output_dir"]) / RESULTS_NAME).exists()
    if options.get("eval_only") or finished or saved_run_settings(path) is None:
        return None
    values = vars(main.parse_args([], settings=options))
    try:
        restored(values, frozenset(options), saved_run_settings(path), path)
    except CLIError:  # other settings: not this run's
        return None
    return path


def pending_runs(plan: List[RunSpec], rows: List[Dict[str, str]]) -> List[RunSpec]:
    """Runs not yet in runs.csv, plus any baseline whose checkpoint a pending run needs but is gone."""
    done = {row_key(r) for r in rows}
    todo = [spec for spec in plan if spec.key not in done]
    missing = {spec.needs for spec in todo if spec.needs and not os.path.exists(spec.needs)}
    retrain = [spec for spec in plan if spec.protocol == BASELINE and spec.key in done
               and baseline_checkpoint_of(spec) in missing]
    return [spec for spec in plan if spec in todo or spec in retrain]


class RunFailed(Exception):
    """A run in a worker process failed: ``Type: one line`` (exceptions cross processes as text)."""


class RunInterrupted(Exception):
    """A run in a worker process was stopped by SIGINT/SIGTERM."""


def _init_worker(sweep_pid: int) -> None:
    """A worker process ignores Ctrl-C between runs (the sweep process decides when to stop) and ends when
    the sweep process is gone (killed outright: nothing would read its results, and it would wait forever)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(sweep_pid,), daemon=True).start()


def _exit_when_orphaned(sweep_pid: int, poll_seconds: float = 1.0) -> None:
    while os.getppid() == sweep_pid:
        time.sleep(poll_seconds)
    os._exit(1)


@contextlib.contextmanager
def sigterm_interrupts():
    """While inside, SIGTERM (``kill``, a scheduler) stops the sweep as Ctrl-C does: the runs in flight are told
    to stop and write their checkpoints, the finished rows stay in runs.csv."""
    from engine.errors import Interrupted

    def interrupt(signum, frame):
        raise Interrupted("SIGTERM", signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_in_worker(run_fn: RunFn, threads: int, options: Dict[str, Any], log_path: Optional[str]
                  ) -> Tuple[Results, float]:
    """One run in a worker process with ``threads`` torch threads, its output into ``log_path``;
    returns (results, seconds)."""
    import torch

    from engine.errors import one_line

    torch.set_num_threads(threads)
    in_main_thread = threading.current_thread() is threading.main_thread()  # a thread pool (tests) keeps its signals
    previous = signal.signal(signal.SIGINT, signal.default_int_handler) if in_main_thread else None  # runs stop on Ctrl-C
    try:
        with contextlib.ExitStack() as stack:
            if log_path:
                Path(log_path).parent.mkdir(parents=True, exist_ok=True)
                log = stack.enter_context(open(log_path, "w"))
                stack.enter_context(contextlib.redirect_stdout(log))
                stack.enter_context(contextlib.redirect_stderr(log))
            start = time.perf_counter()
            results = run_fn(options)
            return results, time.perf_counter() - start
    except KeyboardInterrupt as err:
        raise RunInterrupted(one_line(err) or "interrupted") from None
    except BaseException as err:  # noqa: B902 (main.py exits with a message on bad input)
        raise RunFailed(f"{type(err).__name__}: {one_line(err)}") from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)


def ordered_rows(rows: List[Dict[str, Any]], order: Sequence[Key]) -> List[Dict[str, Any]]:
    """Rows in the order of the run keys ``order`` (rows of other runs last, as they were), whatever order the
    runs ended in."""
    rank = {key: index for index, key in enumerate(order)}
    return [r for _, r in sorted(enumerate(rows), key=lambda item: (rank.get(row_key(item[1]), len(rank)), item[0]))]


def keep_predictions(spec: RunSpec, results: Results, out_dir: Path) -> str:
    """Copy the run's predictions.npz under ``out_dir/predictions`` (committed with runs.csv, unlike the run
    folders); returns its path relative to ``out_dir`` ('' when the run wrote none)."""
    source = results.get("predictions")
    if not source or not os.path.isfile(source):
        return ""
    name = "_".join([spec.protocol, spec.method, spec.level if spec.level != NO_LEVEL else "none",
                     f"seed{spec.seed}"]) + ".npz"
    target = out_dir / PREDICTIONS_DIR / name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".npz.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return str(target.relative_to(out_dir))


class RunQueue:
    """The runs of one :func:`execute` call still waiting, those running, those that failed, and runs.csv's rows;
    a run that needs a baseline checkpoint waits until the run that writes it has finished."""

    def __init__(self, plan: List[RunSpec], runs_csv: Path, order: List[Key], log: Callable[[str], None]):
        self.runs_csv, self.order, self.log = runs_csv, order, log
        self.rows = read_rows(runs_csv)
        in_order = ordered_rows(self.rows, order)
        if in_order != self.rows:  # written by a run of a part of the sweep
            self.rows = in_order
            write_rows(runs_csv, self.rows)
        self.todo = pending_runs(plan, self.rows)
        self.waiting: List[RunSpec] = list(self.todo)
        self.running: Dict[Any, RunSpec] = {}  # future -> its run (a process pool's)
        self.failed: List[Tuple[RunSpec, str]] = []  # (run, why it failed or was skipped)
        self.started = 0
        # checkpoint -> the baseline run that writes it, while that run is still to do
        self.producers = {baseline_checkpoint_of(spec): spec for spec in self.todo
                          if spec.protocol == BASELINE and not spec.needs}

    def _state(self, spec: RunSpec) -> str:
        """``wait`` for the baseline it needs, ``skip`` (that checkpoint is missing for good) or ``run``."""
        producer = self.producers.get(spec.needs) if spec.needs else None
        if producer is not None and (producer in self.waiting or producer in self.running.values()):
            return "wait"
        return "skip" if spec.needs and not os.path.exists(spec.needs) else "run"

    def next_runs(self, free: int) -> List[RunSpec]:
        """Up to ``free`` runs that can start now, in plan order; runs whose checkpoint is missing are failed."""
        chosen: List[RunSpec] = []
        for spec in list(self.waiting):
            if len(chosen) == free:
                break
            state = self._state(spec)
            if state == "wait":
                continue
            self.waiting.remove(spec)
            if state == "skip":
                self.log(f"skipped {spec.name}: {spec.needs} is missing: {spec.command}")
                self.failed.append((spec, f"{spec.needs} is missing"))
            else:
                chosen.append(spec)
                self.started += 1
                self.log(f"[{self.started}/{len(self.todo)}] {spec.command}")
        return chosen

    def finished(self, spec: RunSpec, results: Results, seconds: float) -> None:
        """The run's row into runs.csv, written at once."""
        row = make_row(spec, results, seconds)
        row["predictions"] = keep_predictions(spec, results, self.runs_csv.parent)
        self.rows = ordered_rows(derive_speedups([r for r in self.rows if row_key(r) != spec.key] + [row]), self.order)
        write_rows(self.runs_csv, self.rows)
        self.log(f"  {spec.name}: accuracy {row['accuracy']}  gflops {row['gflops']}  {row['seconds']} s")

    def failed_run(self, spec: RunSpec, why: str) -> None:
        self.log(f"  failed: {spec.name}: {why}")
        self.failed.append((spec, why))


def execute(plan: List[RunSpec], runs_csv: Path, run_fn: RunFn = run_main,
            log: Callable[[str], None] = print, jobs: int = 1, threads: int = 1,
            pool_factory: Optional[Callable[[], Any]] = None, log_dir: Optional[Path] = None,
            row_order: Sequence[Key] = ()) -> List[RunSpec]:
    """Run what runs.csv lacks, saving each row as soon as its run ends; returns the runs that failed, each
    with why (one line).

    A failed run is logged and left out of runs.csv (the next sweep retries it); runs that need a
    checkpoint that failed to appear are skipped. ``jobs`` > 1: that many runs at once, each in a
    process of its own (spawned, ``threads`` torch threads, its output in ``log_dir/<run>.log``), a run
    that needs a baseline checkpoint starting once the baseline has finished; runs.csv is written by
    this process, in plan order, as runs finish, so an interruption loses only the runs in flight.
    ``row_order``: the keys of the whole sweep's runs, when ``plan`` is part of it (``--methods``, ``--levels``):
    runs.csv keeps their order, whichever part ran last. ``pool_factory`` (tests): the executor to use instead
    of a process pool.
    """
    whole = set(row_order)
    queue = RunQueue(plan, runs_csv, list(row_order) + [spec.key for spec in plan if spec.key not in whole], log)
    log(f"sweep: {len(plan)} runs planned, {len(plan) - len(queue.todo)} already in {runs_csv}, "
        f"{len(queue.todo)} to run" + (f", {jobs} at once" if jobs > 1 else ""))
    if jobs <= 1 and pool_factory is None:
        run_one_by_one(queue, run_fn)
    else:
        run_in_pool(queue, run_fn, jobs, threads, pool_factory, log_dir)
    return queue.failed


def run_one_by_one(queue: RunQueue, run_fn: RunFn) -> None:
    """The runs in this process, one after the other."""
    from engine.errors import one_line

    while queue.waiting:
        for spec in queue.next_runs(1):
            start = time.perf_counter()
            try:
                results = run_fn(dict(spec.options))
            except (Exception, SystemExit) as err:  # main.py exits with a message on bad input
                queue.failed_run(spec, f"{type(err).__name__}: {one_line(err)}")
                continue
            queue.finished(spec, results, time.perf_counter() - start)


def run_in_pool(queue: RunQueue, run_fn: RunFn, jobs: int, threads: int,
                pool_factory: Optional[Callable[[], Any]], log_dir: Optional[Path]) -> None:
    """``jobs`` runs at once in worker processes (or ``pool_factory``'s executor); Ctrl-C stops those in flight."""
    import concurrent.futures as futures
    import multiprocessing

    pool = pool_factory() if pool_factory else futures.ProcessPoolExecutor(
        max_workers=jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
        initargs=(os.getpid(),))
    try:
        while queue.waiting or queue.running:
            for spec in queue.next_runs(jobs - len(queue.running)):
                log_path = None if log_dir is None else str(
                    log_dir / f"{spec.protocol}_{spec.method}_{spec.level}_seed{spec.seed}.log")
                queue.running[pool.submit(run_in_worker, run_fn, threads, dict(spec.options), log_path)] = spec
            if queue.running:
                done, _ = futures.wait(queue.running, return_when=futures.FIRST_COMPLETED)
                for future in done:
                    collect(queue, future)
    except KeyboardInterrupt:
        stop_workers(pool)
        raise
    pool.shutdown(wait=True)


def collect(queue: RunQueue, future) -> None:
    """A finished worker's run: its row, or its failure; a run stopped by Ctrl-C stops the sweep."""
    from engine.errors import one_line

    spec = queue.running.pop(future)
    try:
        results, seconds = future.result()
    except RunInterrupted as err:
        raise KeyboardInterrupt(f"{spec.name}: {err}") from None
    except Exception as err:
        queue.failed_run(spec, str(err) if isinstance(err, RunFailed) else one_line(err, named=True))
        return
    queue.finished(spec, results, seconds)


def stop_workers(pool) -> None:
    """The runs in flight stop too (a Ctrl-C in the terminal reaches them already; a signal sent to this process
    alone is passed on); rows of finished runs are in runs.csv, a rerun continues from there."""
    workers = getattr(pool, "_processes", None) or {}  # the pool's own processes, by id
    for process in list(workers.values()):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.kill(process.pid, signal.SIGINT)
    pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# command line

def parse_cli(argv: Optional[List[str]] = None) -> argparse.Namespace:
    def csv_list(cast):
        return lambda text: [cast(item) for item in text.split(",") if item]

    parser = argparse.ArgumentParser(prog="tools/sweep.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", help="sweep YAML (out_dir, work_dir, seeds, methods, levels, protocols, "
                                         "main_args, baseline_args, finetune_args, offtheshelf_args, compare, "
                                         "threads, baseline_checkpoint, jobs); the options below override it")
    parser.add_argument("--out_dir", help="where runs.csv, summary.md and pareto.png go, and the run folders "
                                          "(<out_dir>/runs unless --work_dir is given)")
    parser.add_argument("--work_dir", help="run folders and checkpoints (default <out_dir>/runs)")
    parser.add_argument("--data_root", metavar="DIR", help="where every run reads its dataset (main.py's "
                                                           "--data_root), replacing the config's")
    parser.add_argument("--seeds", type=csv_list(int), help="e.g. 0,1,2")
    parser.add_argument("--methods", type=csv_list(str), help="e.g. none,tk,tk_n")
    parser.add_argument("--levels", type=csv_list(str), help="run only the config's levels of these names, e.g. "
                                                             "f80,f50 (summary.md still shows every level)")
    parser.add_argument("--protocols", type=csv_list(str), help="finetune,offtheshelf")
    parser.add_argument("--threads", type=int, help="torch CPU threads for the runs (default: main.py's rule: 1 "
                                                    "for models under 5 M parameters, else torch's own)")
    parser.add_argument("--jobs", type=int, help="runs at once, each in a process of its own with --threads threads "
                                                 "(default 1 thread with --jobs > 1); a baseline runs before the "
                                                 "runs that use it (default: the config's jobs, else 1)")
    parser.add_argument("--baseline_checkpoint", help="a trained main.py checkpoint: no baseline is trained, it is "
                                                      "evaluated, evaluated compressed and fine-tuned from")
    parser.add_argument("--dry_run", action="store_true", help="print the runs still to do, run nothing")
    parser.add_argument("--report_only", action="store_true", help="rebuild summary.md and pareto.png only")
    return parser.parse_args(argv)


def check_baseline_ready(config: SweepConfig, todo: Sequence[RunSpec]) -> None:
    """A fixed baseline checkpoint that pending runs need must be there, its training finished, before
    anything runs."""
    from engine.checkpoint import unfinished_training

    path = config.baseline_checkpoint
    if not path or not any(spec.needs == path for spec in todo):
        return
    if not os.path.isfile(path):
        raise ValueError(f"baseline_checkpoint: {path} not found (relative paths are read from the folder you run "
                         f"the sweep in, {os.getcwd()}): run from the repository root, or give --baseline_checkpoint "
                         f"FILE")
    stopped_at = unfinished_training(path)
    if stopped_at:
        raise ValueError(f"baseline_checkpoint: {path} is a training run stopped after {stopped_at}: finish it "
                         f"first with python main.py --resume {path}")


def main(argv: Optional[List[str]] = None, run_fn: RunFn = run_main,
         schedule: Optional[Callable[[str, Level], Schedule]] = None) -> int:
    """The sweep; ``run_fn`` and ``schedule`` stand in for main.py and the model's shape in tests.
    Returns 1 if some runs failed (run the sweep again to retry them), else 0."""
    opts = parse_cli(argv)
    from engine.errors import CLIError, report_error

    try:  # bad input ends as one line and exit code 2, as in main.py
        settings = {"out_dir": opts.out_dir, "work_dir": opts.work_dir, "threads": opts.threads, "jobs": opts.jobs,
                    "baseline_checkpoint": opts.baseline_checkpoint}
        parts = {"seeds": opts.seeds, "methods": opts.methods, "protocols": opts.protocols}
        config = load_config(opts.config, {**settings, **parts}, data_root=opts.data_root)
        if not opts.report_only:
            import main

            threads = config.threads or (1 if config.jobs > 1 else main.choose_threads(reference_args(config.main_args)))
            schedule = schedule or reference_resolver(config.main_args).schedule
            plan = plan_runs(config, schedule)
            whole_plan = plan_runs(load_config(opts.config, settings), schedule) if any(parts.values()) else plan
            if opts.levels:
                plan = only_levels(plan, opts.levels, config.levels)
            if not opts.dry_run:
                check_baseline_ready(config, pending_runs(plan, read_rows(config.runs_csv)))
    except (ValueError, TypeError, CLIError) as err:
        return report_error("sweep.py", err)
    failed: List[Tuple[RunSpec, str]] = []
    if not opts.report_only:
        import torch

        torch.set_num_threads(threads)
        if opts.dry_run:
            todo = pending_runs(plan, read_rows(config.runs_csv))
            for spec in todo:
                print(spec.command)
            if not todo:
                print(f"sweep: nothing left to do: all {len(plan)} runs are in {config.runs_csv}")
            return 0
        failed = execute(plan, config.runs_csv, run_fn, jobs=config.jobs,
                         threads=threads, log_dir=config.work_dir / "logs", row_order=[spec.key for spec in whole_plan])
        if failed and not read_rows(config.runs_csv):
            print(f"sweep: error: none of the {len(plan)} runs finished, so there is nothing to summarise (no "
                  f"summary.md or pareto.png written); the first failure: {failed[0][0].name}: {failed[0][1]}; fix "
                  f"that (a dataset elsewhere: --data_root DIR) and run the same command again", file=sys.stderr)
            return 1
        if failed:
            names = "; ".join(spec.name for spec, _ in failed[:5]) + ("; ..." if len(failed) > 5 else "")
            print(f"sweep: {len(failed)} runs failed or were skipped ({names}); run the sweep again to retry them",
                  file=sys.stderr)
    write_reports(config.runs_csv, [level.name for level in config.levels], config.compare)
    print(f"sweep: wrote {config.out_dir / 'summary.md'} and {config.out_dir / 'pareto.png'}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        with sigterm_interrupts():
            sys.exit(main())
    except KeyboardInterrupt as stopped:
        print("sweep: interrupted; the finished runs are in runs.csv: run the same command again to continue",
              file=sys.stderr)
        sys.exit(getattr(stopped, "exit_code", 130))
