"""What a deployed user sees: compressed ViTs against the uncompressed one, in each runtime, and how much of the
gap to the ideal is the runtime's and how much the method's.

    python tools/deploy_benchmark.py --arch vit_small_patch16_224 --reduce_token 10 \\
        --json results/deployment/vit_small.json

For every runtime (PyTorch eager, ``torch.compile``, onnxruntime CPU), thread count and batch size, three models
are timed in one interleaved run: the uncompressed model, the *schedule-only bound* of each method (the plain
blocks run at the token counts the method leaves, each reduction a free slice: ``pruning.benchmark.schedule_only``)
and the compressed model. Each round calls every model once, in turn (the order rotates), so that drift in the
machine's speed (other jobs on a shared machine) hits all alike. The decomposition, per method:

    ideal        FLOPs ratio (uncompressed / compressed)
    bound        uncompressed time / bound time: what the token counts buy in this runtime
    bound/ideal  how much of the ideal the runtime turns into time at these matrix sizes
    speedup      uncompressed time / compressed time
    of bound     bound time / compressed time: what the method's own work (scores, gathers, merging) leaves
    of ideal     speedup / ideal
    method ms    compressed time - bound time: the method's own work per call, in milliseconds (unlike the
                 ratios it can be compared across thread counts: work that does not use a second thread keeps
                 its milliseconds while the bound's halve)

Times are medians over the rounds; ``of bound`` and ``of ideal`` come with a 95 % bootstrap interval in which the
rounds are resampled as pairs (the two models' times of one round saw the same machine), so drift cancels.

One run's interval covers that run only: runs of the same command can differ by more than it. ``--repeats N``
runs every cell N times, the repeats spread over the whole run, the models rebuilt before each repeat (new memory
for every weight, as a new process gets; ``--keep_models`` times the same ones again). A table then gives each
method's ``of bound``, ``of ideal``, ``bound/ideal``, the share of the ideal lost to the method and ``method ms``
across the repeats: their mean with a 95 % t-interval over the repeats (which covers the run-to-run spread) and
the lowest and highest repeat. ``--from_json`` prints the tables of a saved report again, summarised as the
current version does, without measuring.

Batch 1 reports latency (median and p90 ms over the rounds), larger batches throughput (images/s from the
median time). A training step (forward, backward and AdamW step, eager) is timed the same way at
``--train_batch_size``.

Output: a markdown table on stdout (and ``--md``), all figures with the machine and its load in ``--json``. Both
files are rewritten after every cell, so an interrupted run keeps the cells it measured (``complete`` false).
Random weights: speed does not depend on them.
"""
import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import timm  # noqa: E402
import torch  # noqa: E402

from engine import model as engine_model  # noqa: E402
from engine.checkpoint import replace_file  # noqa: E402
from engine.zoo import backbone_of  # noqa: E402
from engine.errors import CLIError, report_error  # noqa: E402
from engine.options import AMP_DTYPES, ArgumentParser, check_autocast, resolve_device  # noqa: E402
from export_onnx import (compress, exported_session, input_shape, ort_run, refuse_stochastic,  # noqa: E402
                         reduce_token_type)
from pruning import METHOD_NAMES, METHODS  # noqa: E402
from pruning.benchmark import bound_token_counts, schedule_only, synchronize, time_interleaved  # noqa: E402
from pruning.flops import analytic_flops  # noqa: E402
from stats import bootstrap_ratio_of_medians, t_interval  # noqa: E402

PROG = "deploy_benchmark.py"
RUNTIMES = ("eager", "compile", "onnxruntime")
BASELINE = "none"
BOUND = "bound:"  # the prefix of a schedule-only bound's name: bound:tk_n is tk_n's bound
QUICK = dict(batch_sizes="1,2", rounds=1, latency_rounds=2, warmup=0, train_batch_size=2, train_rounds=1)


def machine(device: torch.device) -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def loadavg() -> Optional[List[float]]:
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None


def csv_list(text: str) -> List[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_model_options(parser: ArgumentParser) -> None:
    """The model and its compression: --arch, --img_size, --methods, --reduce_token (``args.schedule``)."""
    parser.add_argument("--arch", default="vit_small_patch16_224", help="timm ViT name (default: %(default)s)")
    parser.add_argument("--img_size", type=int, default=None)
    parser.add_argument("--methods", default=",".join(m for m in METHOD_NAMES[1:] if not METHODS[m].control),
                        help="comma list (default: every method but the controls)")
    parser.add_argument("--reduce_token", dest="schedule", type=reduce_token_type, default=10,
                        help="tokens removed per block: an int or one value per block (default: %(default)s)")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.add_argument("--batch_sizes", default="1,32", help="comma list; 1 = latency (default: %(default)s)")
    parser.add_argument("--runtimes", default="eager,onnxruntime",
                        help="comma list from eager, compile, onnxruntime (default: %(default)s)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda or cuda:N; onnxruntime runs on the CPU only (default: %(default)s)")
    parser.add_argument("--amp_dtype", default="none", choices=("none", *AMP_DTYPES),
                        help="autocast type of the eager and compiled runs (none = float32); float16 needs "
                             "--device cuda (default: %(default)s)")
    parser.add_argument("--threads", default="1,all",
                        help="comma list of thread counts, each a separate run; all = every core (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds at batch > 1 (default: 10)")
    parser.add_argument("--latency_rounds", type=int, default=30,
                        help="interleaved rounds at batch 1 (median and p90 over them) (default: 30)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of every cell, the models rebuilt before each; > 1 adds the spread across "
                             "repeats (default: 1)")
    parser.add_argument("--keep_models", action="store_true",
                        help="with --repeats: time the same models in every repeat, not rebuilt ones "
                             "(default: off)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per model first (default: 2)")
    parser.add_argument("--train_batch_size", type=int, default=32,
                        help="batch of the training-step timing, at the first thread count; 0 skips it (default: 32)")
    parser.add_argument("--train_rounds", type=int, default=5, help="interleaved training rounds (default: 5)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: batches 1,2, one or two rounds, no warm-up (default: off)")
    parser.add_argument("--json", metavar="OUT.json", default=None)
    parser.add_argument("--md", metavar="OUT.md", default=None, help="also write the markdown table here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from_json", metavar="REPORT.json", default=None,
                        help="measure nothing: print (and --md) the tables of a report this tool saved, the "
                             "repeats summarised as this version does; the other options are ignored")
    return parser


def thread_counts(text: str) -> List[int]:
    counts = []
    for value in csv_list(text):
        count = (os.cpu_count() or 1) if value == "all" else int(value) if value.isdigit() else 0
        if count < 1:
            raise CLIError(f"--threads: expected a comma list of thread counts >= 1 or 'all', got {text!r}")
        counts.append(count)
    return list(dict.fromkeys(counts)) or [os.cpu_count() or 1]


def check(args: argparse.Namespace) -> None:
    if args.quick:
        for option, value in QUICK.items():
            setattr(args, option, value)
    args.methods = csv_list(args.methods)
    args.runtimes = csv_list(args.runtimes)
    for m in args.methods:
        if m not in METHOD_NAMES:
            raise CLIError(f"--methods: unknown method {m!r}; choose from {', '.join(METHOD_NAMES)}")
    args.methods = [m for m in dict.fromkeys(args.methods) if m != BASELINE]
    for r in args.runtimes:
        if r not in RUNTIMES:
            raise CLIError(f"--runtimes: unknown runtime {r!r}; choose from {', '.join(RUNTIMES)}")
    for m in args.methods if "onnxruntime" in args.runtimes else ():
        refuse_stochastic(m, "--methods")
    args.device = resolve_device(args.device)
    args.amp_dtype = AMP_DTYPES.get(args.amp_dtype)
    if "onnxruntime" in args.runtimes and (args.device.type != "cpu" or args.amp_dtype is not None):
        raise CLIError("--runtimes onnxruntime: measured on the CPU in float32 only; drop it from --runtimes "
                       "with --device cuda or --amp_dtype")
    check_autocast(args.amp_dtype, args.device)
    args.threads = thread_counts(args.threads)
    try:
        args.batch_sizes = [int(b) for b in csv_list(args.batch_sizes)]
    except ValueError:
        raise CLIError(f"--batch_sizes: expected a comma list of ints, got {args.batch_sizes!r}") from None
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        raise CLIError("--batch_sizes: give one or more batch sizes >= 1")
    for option in ("rounds", "latency_rounds", "repeats"):
        if getattr(args, option) < 1:
            raise CLIError(f"--{option}: must be >= 1")
    if args.keep_models and args.repeats == 1:
        raise CLIError("--keep_models: only with --repeats 2 or more")
    for option in ("json", "md"):
        check_folder(option, getattr(args, option))


def check_folder(option: str, path: Optional[str]) -> None:
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise CLIError(f"--{option}: the folder of {path} does not exist")


def build_models(args: argparse.Namespace) -> Tuple[Dict[str, torch.nn.Module], Dict[str, str]]:
    """(every model to time by name: the uncompressed one, each method and each distinct schedule-only bound;
    the bound's name of each method). Methods that leave the same token counts share one bound."""
    plain = engine_model.create_model(args.arch, None, None, img_size=args.img_size).eval()
    engine_model.check_schedule_length(args.schedule, backbone_of(plain).shape.depth, args.arch)
    models, bound_of, bounds = {BASELINE: plain}, {}, {}
    for method in args.methods:
        models[method] = compress(plain, method, args.schedule, None)
        counts = tuple(bound_token_counts(models[method]))
        if counts not in bounds:
            try:
                bounds[counts] = (f"{BOUND}{method}", schedule_only(plain, models[method]).eval())
            except ValueError as err:
                raise CLIError(f"--arch: {args.arch}: {err}") from None
        bound_of[method] = bounds[counts][0]
    models.update(dict(bounds.values()))
    return models, bound_of


def on_device(call: Callable[[], Any], device: torch.device, dtype: Optional[torch.dtype]) -> Callable[[], None]:
    """``call`` under autocast to ``dtype`` (None: float32), returning once the device has finished its work
    (CUDA runs asynchronously: without the wait a timer would read the launch, not the run). On the CPU in
    float32 it is ``call`` itself, so nothing is added to what is timed."""
    if device.type == "cpu" and dtype is None:
        return call

    def run() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            call()
        synchronize(device)
    return run


def allow_compiles(count: int):
    """A context in which dynamo may compile ``count`` versions of one function, and fails rather than falls back
    to eager beyond that; dynamo's settings are restored on leaving it.

    The models share timm's ``VisionTransformer.forward``, so each model (and each thread count and batch) is a
    recompilation of that one function; past dynamo's limit (8 by default) it would run the rest in eager without
    a word, and their "compiled" times would be eager times."""
    config = torch._dynamo.config
    return config.patch(recompile_limit=max(config.recompile_limit, count), fail_on_recompile_limit_hit=True)


def inference_callables(runtime: str, models: Dict[str, torch.nn.Module], batch: int, tmp: str,
                        args: argparse.Namespace, threads: int) -> Dict[str, Callable[[], Any]]:
    """One zero-argument call per model that runs a forward pass of ``batch`` random images on ``args.device``
    (onnxruntime: on the CPU)."""
    images = torch.randn(batch, *input_shape(models[BASELINE]), device=args.device)
    calls: Dict[str, Callable[[], Any]] = {}
    for name, model in models.items():
        if runtime == "eager":
            calls[name] = on_device(lambda m=model: m(images), args.device, args.amp_dtype)
        elif runtime == "compile":
            compiled = torch.compile(model, dynamic=False)
            calls[name] = on_device(lambda m=compiled: m(images), args.device, args.amp_dtype)
            calls[name]()  # compile now, not in the first timed round
        else:
            session = exported_session(model, os.path.join(tmp, f"{name.replace(':', '_')}.onnx"), threads)
            array = images.numpy()
            calls[name] = lambda s=session: ort_run(s, array)
    return calls


def train_callables(models: Dict[str, torch.nn.Module], batch: int,
                    args: argparse.Namespace) -> Dict[str, Callable[[], Any]]:
    """Forward, cross-entropy backward and an AdamW step, eager, on copies of the models; the forward under
    ``--amp_dtype`` autocast (no loss scaling: the step's time, not its result, is what is measured)."""
    images = torch.randn(batch, *input_shape(models[BASELINE]), device=args.device)
    labels = torch.randint(0, max(1, models[BASELINE].num_classes), (batch,), device=args.device)
    calls = {}
    for name, model in models.items():
        if name.startswith(BOUND):
            continue
        model = copy.deepcopy(model).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def step(m=model, opt=optimizer):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(args.device.type, dtype=args.amp_dtype, enabled=args.amp_dtype is not None):
                loss = torch.nn.functional.cross_entropy(m(images), labels)
            loss.backward()
            opt.step()
            synchronize(args.device)
        calls[name] = step
    return calls


def summarise(times: List[float], batch: int) -> Dict[str, float]:
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    median = statistics.median(times)
    return {"median_ms": median * 1e3, "p90_ms": p90 * 1e3, "images_per_s": batch / median, "rounds": len(times)}


def decompose(times: Dict[str, List[float]], runtime: str, threads: int, batch: int, ideal: Dict[str, float],
              bound_of: Dict[str, str]) -> List[Dict[str, Any]]:
    """One row per model (the uncompressed one and each method) of one interleaved run: its time, and for a
    method the decomposition against the uncompressed model and its schedule-only bound."""
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name in [BASELINE, *bound_of]:
        row = {"runtime": runtime, "threads": threads, "method": name, "batch": batch, **summarise(times[name], batch),
               "ideal": ideal[name], "speedup": median[BASELINE] / median[name]}
        row["of_ideal"] = row["speedup"] / row["ideal"]
        if name in bound_of:
            bound = median[bound_of[name]]
            row.update(bound_ms=bound * 1e3, bound_speedup=median[BASELINE] / bound,
                       bound_of_ideal=median[BASELINE] / bound / ideal[name], of_bound=bound / median[name])
            # 95 % intervals, the rounds resampled as pairs (both times of a round saw the same machine)
            _, low, high = bootstrap_ratio_of_medians(times[BASELINE], times[name])
            row["of_ideal_ci"] = [low / ideal[name], high / ideal[name]]
            row["of_bound_ci"] = list(bootstrap_ratio_of_medians(times[bound_of[name]], times[name])[1:])
        rows.append(row)
    return rows


def run_inference(args: argparse.Namespace, models: Dict[str, torch.nn.Module], bound_of: Dict[str, str],
                  ideal: Dict[str, float], tmp: str) -> Iterator[List[Dict[str, Any]]]:
    """Every (runtime, thread count, batch): one interleaved run of every model, decomposed; one cell's rows at a
    time, so that each can be saved as soon as it is measured."""
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batch_sizes:
            for runtime in args.runtimes:
                calls = inference_callables(runtime, models, batch, tmp, args, threads)
                rounds = args.latency_rounds if batch == 1 else args.rounds
                times = time_interleaved(calls, rounds, args.warmup)
                yield decompose(times, runtime, threads, batch, ideal, bound_of)


def run_training(args: argparse.Namespace, models: Dict[str, torch.nn.Module],
                 ideal: Dict[str, float]) -> List[Dict[str, Any]]:
    """The training step of every model but the bounds, at the first thread count."""
    if args.train_batch_size <= 0:
        return []
    torch.set_num_threads(args.threads[0])
    times = time_interleaved(train_callables(models, args.train_batch_size, args), args.train_rounds, 1)
    rows = []
    for name, t in times.items():
        speedup = statistics.median(times[BASELINE]) / statistics.median(t)
        # a training step costs about 3x the forward FLOPs in every model, so the ideal is the same ratio
        rows.append({"runtime": "eager (train step)", "threads": args.threads[0], "method": name,
                     "batch": args.train_batch_size, **summarise(t, args.train_batch_size), "speedup": speedup,
                     "ideal": ideal[name], "of_ideal": speedup / ideal[name]})
    return rows


def lost_to_method(row: Dict[str, Any]) -> float:
    """The share of the ideal speedup the method's own work costs: bound/ideal minus what it keeps of the ideal
    (0.03 means the method sits 0.03 of the ideal below its bound)."""
    return row["bound_of_ideal"] - row["of_ideal"]


def method_ms(row: Dict[str, Any]) -> float:
    """The method's own time per call: the compressed model's median minus its schedule-only bound's, in ms."""
    return row["median_ms"] - row["bound_ms"]


# each figure summarised across the repeats, and how to read it from one repeat's row (read, not stored, so that
# a report saved by an earlier version is summarised the same way)
ACROSS_REPEATS: Dict[str, Callable[[Dict[str, Any]], float]] = {
    "of_bound": lambda row: row["of_bound"], "of_ideal": lambda row: row["of_ideal"],
    "bound_of_ideal": lambda row: row["bound_of_ideal"], "lost_to_method": lost_to_method, "method_ms": method_ms}


def across_repeats(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (runtime, threads, batch, method): each of ``ACROSS_REPEATS`` over the repeats, as their mean, its
    95 % t-interval over the repeats (``_ci``) and the lowest and highest repeat (``_range``)."""
    cells: Dict[Tuple[str, int, int, str], List[Dict[str, Any]]] = {}
    for r in rows:
        if r["method"] != BASELINE:
            cells.setdefault((r["runtime"], r["threads"], r["batch"], r["method"]), []).append(r)
    summary = []
    for (runtime, threads, batch, method), repeats in cells.items():
        if len(repeats) < 2:  # an interrupted run's last repeat: no spread to give yet
            continue
        row: Dict[str, Any] = {"runtime": runtime, "threads": threads, "batch": batch, "method": method,
                               "repeats": len(repeats)}
        for key, figure in ACROSS_REPEATS.items():
            values = [figure(r) for r in repeats]
            mean, low, high = t_interval(values)
            row.update({key: mean, f"{key}_ci": [low, high], f"{key}_range": [min(values), max(values)]})
        summary.append(row)
    return summary


def run(args: argparse.Namespace, save: Callable[[Dict[str, Any]], None] = lambda report: None) -> Dict[str, Any]:
    """The whole benchmark as a report; ``save`` gets the report so far after every cell, so an interrupted run
    keeps what it measured (``complete`` is set at the end)."""
    check(args)
    started = time.time()
    report: Dict[str, Any] = {"machine": machine(args.device), "loadavg_start": loadavg()}
    torch.manual_seed(args.seed)
    models, bound_of = build_models(args)
    flops = {name: analytic_flops(model) for name, model in models.items() if not name.startswith(BOUND)}
    ideal = {name: flops[BASELINE] / f for name, f in flops.items()}
    report.update(settings=settings(args, models, bound_of), gflops={name: f / 1e9 for name, f in flops.items()},
                  inference=[], training=[], across_repeats=[], complete=False)

    def measured(**update: Any) -> None:
        report.update(update, loadavg_end=loadavg(), seconds=time.time() - started)
        report["across_repeats"] = across_repeats(report["inference"]) if args.repeats > 1 else []
        save(report)

    compiles = len(models) * len(args.threads) * len(args.batch_sizes) * args.repeats
    with tempfile.TemporaryDirectory() as tmp, allow_compiles(compiles):
        for repeat in range(args.repeats):
            if repeat and not args.keep_models:  # built while the last ones hold their memory: the weights move
                torch.manual_seed(args.seed)
                models, bound_of = build_models(args)
            for model in models.values():
                model.to(args.device)
            with torch.inference_mode():
                for rows in run_inference(args, models, bound_of, ideal, tmp):
                    measured(inference=report["inference"] + [{**row, "repeat": repeat} for row in rows])
    measured(training=run_training(args, models, ideal), complete=True)
    return report


def settings(args: argparse.Namespace, models: Dict[str, torch.nn.Module], bound_of: Dict[str, str]
             ) -> Dict[str, Any]:
    return {"arch": args.arch, "img_size": input_shape(models[BASELINE])[1], "methods": args.methods,
            "schedule": args.schedule, "batch_sizes": args.batch_sizes, "runtimes": args.runtimes,
            "threads": args.threads, "device": str(args.device), "precision": precision(args.amp_dtype),
            "rounds": args.rounds, "latency_rounds": args.latency_rounds, "repeats": args.repeats,
            "keep_models": args.keep_models, "warmup": args.warmup, "train_batch_size": args.train_batch_size,
            "train_rounds": args.train_rounds, "bounds": bound_of,
            "command": " ".join(["python", "tools/deploy_benchmark.py"] + sys.argv[1:])}


def precision(amp_dtype: Optional[torch.dtype]) -> str:
    return "float32" if amp_dtype is None else f"{str(amp_dtype).split('.')[-1]} autocast"


def with_interval(value: float, interval: Optional[List[float]]) -> str:
    return f"{value:.2f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def markdown(report: Dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    load = lambda v: "n/a" if v is None else " ".join(f"{x:.2f}" for x in v)  # noqa: E731
    gpu = f"GPU: {m['gpu']}" if m["gpu"] else "no GPU"
    lines = [f"### {s['arch']} @ {s['img_size']}px, schedule {s['schedule']}, {s['precision']}",
             "",
             f"{m['cpu']} ({m['logical_cpus']} logical CPUs), {gpu}; torch {m['torch']}, onnxruntime "
             f"{m['onnxruntime']}, timm {m['timm']}; load average {load(report['loadavg_start'])} (start) / "
             f"{load(report['loadavg_end'])} (end); batch 1: median (p90) of {s['latency_rounds']} interleaved "
             f"rounds, larger batches: median of {s['rounds']}; ideal = FLOPs ratio, bound = the plain blocks at "
             f"the method's token counts, each reduction a free slice; [95 % interval, rounds resampled in pairs]",
             ""]
    if not report["complete"]:
        lines += [f"Interrupted after {report['seconds']:.0f} s: the cells measured until then.", ""]
    repeats = s["repeats"]
    for repeat in sorted({r["repeat"] for r in report["inference"]}):
        rows = [r for r in report["inference"] if r["repeat"] == repeat]
        if repeat == repeats - 1:
            rows += report["training"]  # timed once, after every repeat
        if repeats > 1:
            lines += [f"#### Repeat {repeat + 1} of {repeats}", ""]
        lines += [*rows_table(rows, report["gflops"]), ""]
    if report["across_repeats"]:
        lines += [*repeats_table(report), ""]
    return "\n".join(lines[:-1]) + "\n"


def repeats_table(report: Dict[str, Any]) -> List[str]:
    """The markdown table of each method's figures across the repeats, with its heading."""
    s = report["settings"]
    rebuilt = "the same models in each" if s["keep_models"] else "the models rebuilt before each"
    lines = [f"#### Across the {s['repeats']} repeats ({rebuilt})", "",
             "mean [95 % t-interval over the repeats] (lowest, highest repeat); lost to the method = bound/ideal "
             "- of ideal, the share of the ideal speedup the method's own work costs; method ms = compressed - "
             "bound time per call", "",
             "| runtime | threads | batch | method | of bound | of ideal | bound/ideal | lost to the method | "
             "method ms |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in report["across_repeats"]:
        spread = [f"{r[k]:.3f} [{r[k + '_ci'][0]:.3f}, {r[k + '_ci'][1]:.3f}] ({r[k + '_range'][0]:.3f}, "
                  f"{r[k + '_range'][1]:.3f})" for k in ACROSS_REPEATS]
        lines.append(f"| {r['runtime']} | {r['threads']} | {r['batch']} | {r['method']} | {' | '.join(spread)} |")
    return lines


def rows_table(rows: List[Dict[str, Any]], gflops: Dict[str, float]) -> List[str]:
    """The markdown table of one run's rows: time, ideal, bound and the method's share of each."""
    lines = ["| runtime | threads | batch | method | GFLOPs | latency ms (p90) / img/s | ideal | bound | "
             "bound/ideal | speedup | of bound | of ideal | method ms |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["batch"] == 1 and r["runtime"] in RUNTIMES:
            figure = f"{r['median_ms']:.3g} ({r['p90_ms']:.3g}) ms"
        else:
            figure = f"{r['images_per_s']:.4g} img/s"
        bound = (f"{r['bound_speedup']:.2f}x | {r['bound_of_ideal']:.2f} | " if "bound_speedup" in r else "| | ")
        of_bound = with_interval(r["of_bound"], r.get("of_bound_ci")) if "of_bound" in r else ""
        of_ideal = with_interval(r["of_ideal"], r.get("of_ideal_ci"))
        own = f"{method_ms(r):.2f}" if "bound_ms" in r else ""
        lines.append(f"| {r['runtime']} | {r['threads']} | {r['batch']} | {r['method']} | "
                     f"{gflops[r['method']]:.3g} | {figure} | {r['ideal']:.2f}x | {bound}"
                     f"{r['speedup']:.2f}x | {of_bound} | {of_ideal} | {own} |")
    return lines


def saved_tables(path: str) -> str:
    """The markdown of a report written by ``--json``, its summary across repeats recomputed. Versions before
    repeats, autocast and incremental saving wrote one complete float32 run, without the keys for them."""
    try:
        report = json.loads(Path(path).read_text())
        report.setdefault("complete", True)
        settings = report["settings"]
        for key, value in (("repeats", 1), ("keep_models", False), ("precision", "float32")):
            settings.setdefault(key, value)
        for row in report["inference"]:
            row.setdefault("repeat", 0)
        report["across_repeats"] = across_repeats(report["inference"]) if settings["repeats"] > 1 else []
        return markdown(report)  # a report of an older layout (before the decomposition) fails here
    except OSError as err:
        raise CLIError(f"--from_json: cannot read {path}: {err.strerror}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CLIError(f"--from_json: {path} is not a report this version reads (one written by --json): "
                       f"{type(err).__name__}: {err}") from None


def write_report(option: str, path: Optional[str], text: Callable[[], str]) -> None:
    """Replace the file of ``--option`` (if given) with ``text()``, whole or not at all; a failure is one line."""
    if not path:
        return
    try:
        replace_file(text(), path)
    except OSError as err:
        raise CLIError(f"--{option}: could not write {path} ({err.strerror or err}); the file as it was before is "
                       f"kept") from None


def report_saver(args: argparse.Namespace, render: Callable[[Dict[str, Any]], str]
                 ) -> Callable[[Dict[str, Any]], None]:
    """The ``save`` of a run that saves as it measures: the report to --json and its tables (``render``) to --md,
    each file replaced whole, so that an interrupted run leaves its last complete report."""
    def save(report: Dict[str, Any]) -> None:
        write_report("json", args.json, lambda: json.dumps(report, indent=2) + "\n")
        write_report("md", args.md, lambda: render(report))
    return save


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.from_json:  # only --md is written: the saved report stays as it was
            check_folder("md", args.md)
            tables = saved_tables(args.from_json)
            write_report("md", args.md, lambda: tables)
        else:
            tables = markdown(run(args, report_saver(args, markdown)))
    except CLIError as err:
        return report_error(PROG, err)
    print(tables, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
