"""Does a library change cost speed? The library at a git revision against the working tree's, in one interleaved run.

    python tools/revision_compare.py --against 2e06447 --json results/deployment/regression.json

The ``pruning`` package of ``--against`` is read from git (``git archive``) into a temporary folder and imported
beside the working tree's under a name of its own (the package imports itself only relatively), so both versions
run in one process on copies of one uncompressed model. Each method is applied by the seed's call
(``apply_patch(model, select_method=..., pool_k=...)``), which every revision keeps.

Timed, in interleaved rounds with the uncompressed model (the order rotates; ``pruning.benchmark.time_interleaved``):
the forward at ``--batch_size`` (eager in inference mode, or with ``--runtime onnxruntime`` each model exported to ONNX
and run in onnxruntime, as ``tools/deploy_benchmark.py`` does) and the eager training step (forward, backward, AdamW
step) at ``--train_batch_size``. Reported per method and phase: the working tree's median time over the revision's,
with a 95 % bootstrap interval in which the rounds are resampled as pairs (both versions' times of one round saw the
same machine), each version's speedup over the uncompressed model, and the largest difference between the two
versions' outputs on the same images in the forward's runtime (0 for a change that keeps results bit-identical).

Output: a markdown table on stdout (and ``--md``); every time with the machine and its load in ``--json``, written
after each phase, so an interrupted run keeps what it measured.
"""
import argparse
import copy
import importlib.util
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import torch  # noqa: E402

import pruning  # noqa: E402
from benchmark import create_model, parse_methods  # noqa: E402
from deploy_benchmark import (BASELINE, add_model_options, loadavg, machine, report_saver,  # noqa: E402
                              train_callables)
from engine.errors import CLIError, report_error  # noqa: E402
from engine.options import ArgumentParser  # noqa: E402
from export_onnx import ExportFailed, exported_session, input_shape, ort_run, refuse_stochastic  # noqa: E402
from pruning.benchmark import time_interleaved  # noqa: E402
from stats import bootstrap_ratio_of_medians  # noqa: E402

PROG = "revision_compare.py"
TREE = "tree"  # the working tree's library, as the tables name it
RUNTIMES = ("eager", "onnxruntime")
QUICK = dict(batch_size=2, rounds=2, train_batch_size=2, train_rounds=2, warmup=0)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, metavar="REVISION",
                        help="the git revision whose library the working tree's is compared with (a commit, tag, "
                             "branch)")
    parser.add_argument("--repo", default=str(ROOT), help="the git repository to read it from (default: this one)")
    add_model_options(parser)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch (and onnxruntime) threads (default: %(default)s)")
    parser.add_argument("--runtime", default="eager", choices=RUNTIMES,
                        help="where the forward runs: eager PyTorch, or each model exported to ONNX and run in "
                             "onnxruntime; the training step is always eager (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=32, help="forward batch; 0 skips it (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved forward rounds (default: %(default)s)")
    parser.add_argument("--train_batch_size", type=int, default=8,
                        help="training-step batch; 0 skips it (default: %(default)s)")
    parser.add_argument("--train_rounds", type=int, default=20,
                        help="interleaved training rounds (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per model first (default: 2)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: batch 2, two rounds (default: off)")
    parser.add_argument("--json", metavar="OUT.json", default=None)
    parser.add_argument("--md", metavar="OUT.md", default=None, help="also write the markdown table here")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def check(args: argparse.Namespace) -> None:
    if args.quick:
        for option, value in QUICK.items():
            setattr(args, option, value)
    args.methods = parse_methods(args.methods)
    if BASELINE in args.methods:
        raise CLIError(f"--methods: {BASELINE!r} is the uncompressed model, timed in every run; name methods only")
    for method in args.methods if args.runtime == "onnxruntime" else ():
        refuse_stochastic(method, "--methods")
    for option in ("threads", "rounds", "train_rounds"):
        if getattr(args, option) < 1:
            raise CLIError(f"--{option}: must be >= 1, got {getattr(args, option)}")
    if args.warmup < 0:
        raise CLIError(f"--warmup: must be >= 0, got {args.warmup}")
    if args.batch_size < 0 or args.train_batch_size < 0 or not (args.batch_size or args.train_batch_size):
        raise CLIError("--batch_size, --train_batch_size: each >= 0 and not both 0 (0 skips that phase)")
    for option in ("json", "md"):
        path = getattr(args, option)
        if path and not Path(path).resolve().parent.is_dir():
            raise CLIError(f"--{option}: the folder of {path} does not exist")


class GitFailed(Exception):
    """git ran and failed; the message is its last line on stderr."""


def git(repo: str, *command: str, binary: bool = False):
    """The output of ``git -C repo command``."""
    try:
        done = subprocess.run(["git", "-C", repo, *command], capture_output=True, check=True, text=not binary)
    except FileNotFoundError:
        raise CLIError("--against: git is not installed; install it, or compare two checkouts by hand") from None
    except subprocess.CalledProcessError as err:
        message = (err.stderr if isinstance(err.stderr, str) else err.stderr.decode(errors="replace")).strip()
        raise GitFailed(message.splitlines()[-1] if message else f"exit status {err.returncode}") from None
    return done.stdout


def extract_library(revision: str, repo: str, folder: str) -> str:
    """The full commit of ``revision``, whose ``pruning`` folder is now in ``folder``."""
    try:
        commit = git(repo, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}").strip()
    except GitFailed:
        raise CLIError(f"--against: {revision!r} is not a commit in {repo} (or that is no git repository); give a "
                       f"commit, tag or branch (git log --oneline lists them)") from None
    try:
        archive = git(repo, "archive", "--format=tar", commit, "--", "pruning", binary=True)
    except GitFailed as err:
        raise CLIError(f"--against: {revision} has no pruning package (git: {err})") from None
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    if not (Path(folder) / "pruning" / "__init__.py").is_file():
        raise CLIError(f"--against: {revision} has no pruning package (no pruning/__init__.py)")
    return commit


def library_at(revision: str, repo: str, folder: str) -> ModuleType:
    """The ``pruning`` package as it is at ``revision``, extracted under ``folder`` and imported as
    ``pruning_at_<commit>``. Its modules import one another relatively, so they bind to this copy, not to the
    working tree's ``pruning``."""
    commit = extract_library(revision, repo, folder)
    name = f"pruning_at_{commit[:12]}"
    if name in sys.modules:  # imported before: a commit's files never change
        return sys.modules[name]
    package = Path(folder) / "pruning"
    spec = importlib.util.spec_from_file_location(name, package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    module.commit = commit
    return module


def build_models(args: argparse.Namespace, libraries: Dict[str, ModuleType]) -> Dict[str, torch.nn.Module]:
    """The uncompressed model, and each method compressed by each library (``method@label``), all copies of it."""
    torch.manual_seed(args.seed)
    plain = create_model(args.arch, args.img_size)
    models = {BASELINE: plain}
    for method in args.methods:
        for label, library in libraries.items():
            try:
                models[f"{method}@{label}"] = library.patch.apply_patch(
                    copy.deepcopy(plain), select_method=method, pool_k=args.schedule).eval()
            except ValueError as err:
                raise CLIError(f"--methods/--reduce_token: the library at {label}: {err}") from None
    return models


def forwards(models: Dict[str, torch.nn.Module], runtime: str, threads: int) -> Dict[str, Callable[[Any], Any]]:
    """Each model's forward on a batch of images, as a tensor, in ``runtime``: the module itself, or an onnxruntime
    session of its ONNX export (the files are read into the sessions, then removed)."""
    if runtime == "eager":
        return {name: (lambda images, m=model: m(images)) for name, model in models.items()}
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, model in models.items():
            try:
                session = exported_session(model, str(Path(folder) / f"{len(runs)}.onnx"), threads)
            except ExportFailed as err:
                raise CLIError(f"--runtime onnxruntime: {name}: {err}") from None
            runs[name] = lambda images, s=session: torch.from_numpy(ort_run(s, images.numpy()))
    return runs


def output_differences(run: Dict[str, Callable[[Any], Any]], shape: Sequence[int], methods: List[str],
                       labels: List[str], batch: int) -> Dict[str, float]:
    """Each method's largest absolute difference between the two libraries' outputs on the same images."""
    images = torch.randn(max(1, batch), *shape)
    with torch.inference_mode():
        return {m: (run[f"{m}@{labels[0]}"](images) - run[f"{m}@{labels[1]}"](images)).abs().max().item()
                for m in methods}


def forward_callables(run: Dict[str, Callable[[Any], Any]], shape: Sequence[int], batch: int
                      ) -> Dict[str, Callable[[], Any]]:
    images = torch.randn(batch, *shape)
    return {name: (lambda r=forward: r(images)) for name, forward in run.items()}


def compare(times: Dict[str, List[float]], phase: str, batch: int, methods: List[str], labels: List[str],
            differences: Dict[str, float]) -> List[Dict[str, Any]]:
    """One row per method: the working tree's time over the revision's, and each one's speedup."""
    median_ms = {name: statistics.median(series) * 1e3 for name, series in times.items()}
    rows = []
    for method in methods:
        tree, revision = (f"{method}@{label}" for label in labels)
        ratio, low, high = bootstrap_ratio_of_medians(times[tree], times[revision])
        rows.append({"phase": phase, "batch": batch, "method": method, "baseline_ms": median_ms[BASELINE],
                     "tree_ms": median_ms[tree], "revision_ms": median_ms[revision],
                     "tree_over_revision": ratio, "tree_over_revision_ci": [low, high], "verdict": verdict(low, high),
                     "tree_speedup": median_ms[BASELINE] / median_ms[tree],
                     "revision_speedup": median_ms[BASELINE] / median_ms[revision],
                     "output_difference": differences[method]})
    return rows


def verdict(low: float, high: float) -> str:
    return "slower" if low > 1 else "faster" if high < 1 else "no difference shown"


def run(args: argparse.Namespace, save: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
    check(args)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:  # kept to the end: a module may import a sibling lazily
        return measure(args, library_at(args.against, args.repo, folder), save)


def measure(args: argparse.Namespace, old: ModuleType, save: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
    """Both libraries' models timed phase by phase; the report saved after each phase."""
    labels = [TREE, old.commit[:12]]
    models = build_models(args, dict(zip(labels, (pruning, old))))
    shape = input_shape(models[BASELINE])
    run_forward = forwards(models, args.runtime, args.threads) if args.batch_size else {}
    differences = output_differences(run_forward or forwards(models, "eager", args.threads), shape, args.methods,
                                     labels, args.batch_size)
    report = {"machine": machine(torch.device("cpu")), "loadavg_start": loadavg(), "started": time.time(),
              "settings": {**{k: v for k, v in vars(args).items() if k not in ("json", "md", "quick")},
                           "revision_commit": old.commit,
                           "command": " ".join(["python", "tools/revision_compare.py"] + sys.argv[1:])},
              "rows": [], "times": {}}
    phases = [("forward", args.batch_size, args.rounds, lambda: forward_callables(run_forward, shape, args.batch_size)),
              ("train step", args.train_batch_size, args.train_rounds,
               lambda: train_callables(models, args.train_batch_size,
                                       argparse.Namespace(device=torch.device("cpu"), amp_dtype=None)))]
    for phase, batch, rounds, callables in phases:
        if batch:
            with torch.inference_mode(phase == "forward"):
                times = time_interleaved(callables(), rounds, args.warmup)
            report["times"][phase] = times
            report["rows"] += compare(times, phase, batch, args.methods, labels, differences)
            report.update(loadavg_end=loadavg(), seconds=time.time() - report["started"])
            save(report)
    return report


def markdown(report: Dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    load = lambda v: "n/a" if v is None else " ".join(f"{x:.2f}" for x in v)  # noqa: E731
    lines = [f"### The library at {s['revision_commit'][:12]} ({s['against']}) against the working tree: "
             f"{s['arch']}, schedule {s['schedule']}, {s['threads']} thread(s), forward in {s.get('runtime', 'eager')}",
             "",
             f"{m['cpu']} ({m['logical_cpus']} logical CPUs); torch {m['torch']}, timm {m['timm']}; load average "
             f"{load(report['loadavg_start'])} (start) / {load(report['loadavg_end'])} (end); medians of "
             f"{s['rounds']} (forward) / {s['train_rounds']} (train step) interleaved rounds; [95 % interval, rounds "
             f"resampled in pairs]; output difference: largest |tree - revision| on the same images",
             "",
             "| phase | batch | method | tree ms | revision ms | tree / revision | verdict | speedup tree | "
             "speedup revision | output difference |",
             "|---|---:|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in report["rows"]:
        low, high = r["tree_over_revision_ci"]
        lines.append(f"| {r['phase']} | {r['batch']} | {r['method']} | {r['tree_ms']:.4g} | "
                     f"{r['revision_ms']:.4g} | {r['tree_over_revision']:.3f} [{low:.3f}, {high:.3f}] | "
                     f"{r['verdict']} | {r['tree_speedup']:.3f}x | {r['revision_speedup']:.3f}x | "
                     f"{r['output_difference']:.3g} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        report = run(args, report_saver(args, markdown))
    except CLIError as err:
        return report_error(PROG, err)
    print(markdown(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
