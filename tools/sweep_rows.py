"""runs.csv, the sweep's record: its columns, one row per finished run, read and written whole."""
import csv
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple

PROTOCOLS = ("offtheshelf", "finetune")
BASELINE = "baseline"
NO_LEVEL = "-"  # the level of rows that compress nothing (the baseline, method none)

# schedule: tokens removed per block as main.py was asked (``--reduce_token``: ``4`` or ``0,0,12,0,8,0``);
# schedule_per_block: the same, one value per block; removed_per_block: what each block really removed (fewer
# where too few tokens were left; empty in rows written before it was recorded); analytic_gflops:
# pruning.flops' count (equal at a flops_ratio level for every method); predictions: the run's predictions.npz,
# copied under out_dir; torch ... threads: where the run ran (results.json's environment)
FIELDS = ("protocol", "method", "level", "schedule", "seed", "accuracy", "best_accuracy", "gflops",
          "gmacs_thop", "throughput", "speedup", "params_m", "schedule_per_block", "removed_per_block",
          "analytic_gflops", "prop_attn", "predictions", "torch", "timm", "numpy", "device", "threads", "seconds",
          "command")
# the columns of runs.csv files written before the rename, by today's name (their ``schedule`` column was
# the per-block one); read_rows takes either
OLD_COLUMNS = {"reduce_token": "schedule", "schedule": "schedule_per_block"}
ENVIRONMENT_FIELDS = ("torch", "timm", "numpy", "device", "threads")
TIMING_FIELDS = ("throughput", "speedup", "seconds")  # measured times: differ between two runs of one command
PREDICTIONS_DIR = "predictions"  # under out_dir: each run's predictions.npz, kept with runs.csv
KEY_FIELDS = ("protocol", "method", "level", "schedule", "seed")
Key = Tuple[str, ...]


def read_rows(path: Path) -> List[Dict[str, str]]:
    """The rows of runs.csv by today's column names, whichever names the file has (see OLD_COLUMNS)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "reduce_token" in rows[0]:  # the old names: renamed all at once (old schedule is today's per block)
        rows = [{OLD_COLUMNS.get(name, name): value for name, value in row.items()} for row in rows]
    return rows


def write_rows(path: Path, rows: Iterable[Dict[str, Any]]) -> None:
    """Write all rows at once through a temporary file, so an interruption never leaves half a row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def row_key(row: Dict[str, Any]) -> Key:
    return tuple(str(row[k]) for k in KEY_FIELDS)


def derive_speedups(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Fill ``speedup`` of the rows whose run could not measure it (training runs: main.py's
    --benchmark does not train). Speed depends on the model's shape and token schedule, not on its
    weights, so a finetune row takes the speedup of the off-the-shelf run with the same method,
    level, schedule and seed (measured against the uncompressed model in that same run); without
    one, its throughput over the baseline run's of its seed (measured at another time: less reliable).
    """
    measured = {row_key(r)[1:]: r["speedup"] for r in rows if r["protocol"] == "offtheshelf" and r["speedup"] != ""}
    any_seed = {key[:-1]: value for key, value in measured.items()}  # a fixed baseline: off the shelf once
    baseline = {str(r["seed"]): r["throughput"] for r in rows if r["protocol"] == BASELINE and r["throughput"] != ""}
    filled = []
    for row in rows:
        row = dict(row)
        if row["protocol"] == "finetune":
            key = row_key(row)[1:]
            base = baseline.get(str(row["seed"])) or next(iter(baseline.values()), None)
            if key in measured:
                row["speedup"] = measured[key]
            elif key[:-1] in any_seed:
                row["speedup"] = any_seed[key[:-1]]
            elif base and row["throughput"] != "":
                row["speedup"] = str(round(float(row["throughput"]) / float(base), 3))
        filled.append(row)
    return filled
