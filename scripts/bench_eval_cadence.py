"""What evaluating more often costs the regression run: `dropstudy train` (2000 full-batch epochs,
W&B off) at several `trainer.eval_every` values, run in turn `--repeats` times so that a change
in machine load hits them alike. Each evaluation runs the validation set and the training data
in eval mode (for the unbiased gap). Reports, per cadence, the median wall time of the process,
the run's own training and evaluation seconds (summary.json's timings) and the best epoch it
found, and appends a row to BENCHMARKS.md unless --no-record.

    python scripts/bench_eval_cadence.py                       # eval_every 1, 10, 400; 3 repeats
    python scripts/bench_eval_cadence.py --every 1,5,10 --repeats 5 --no-record
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchlib import add_row, cpu_name, load_average, print_result

HEADING = "## Regression: what the evaluation cadence costs (scripts/bench_eval_cadence.py)"
TABLE = ("| when (UTC) | machine | load | repeats | eval_every | wall s (median) | train s | eval s | best epoch |\n"
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")


def one_run(every: int, where: Path) -> dict:
    run_dir = where / f"e{every}-{time.monotonic_ns()}"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dropstudy", "train", f"trainer.eval_every={every}",
                           "tracker.mode=disabled", f"hydra.run.dir={run_dir}"], capture_output=True, text=True, cwd=where)
    if proc.returncode != 0:
        sys.exit(f"eval_every={every} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    wall = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    timings = summary["timings_s"]
    return {"wall": wall, "train": timings["train"], "eval": timings["eval"], "best": summary["best"]["val/loss_epoch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", default="1,10,400", help="comma-separated eval_every values")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="do not append a row to BENCHMARKS.md")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    cadences = [int(x) for x in args.every.split(",")]
    runs: dict[int, list[dict]] = {e: [] for e in cadences}
    load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = cadences[repeat % len(cadences):] + cadences[:repeat % len(cadences)]
            for every in order:
                runs[every].append(one_run(every, Path(tmp)))
    result = {"machine": cpu_name(), "load": load, "repeats": args.repeats, "cadences": {}}
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    for every, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("wall", "train", "eval")}
        best = sorted({r["best"] for r in rs})
        result["cadences"][every] = {**med, "best_epoch": best}
        if not args.no_record:
            add_row(HEADING, TABLE, f"| {when} | {cpu_name()} | {load} | {args.repeats} | {every} | {med['wall']:.1f} | "
                                    f"{med['train']:.1f} | {med['eval']:.2f} | {', '.join(map(str, best))} |\n")
    print_result(result, args.json)


if __name__ == "__main__":
    main()
