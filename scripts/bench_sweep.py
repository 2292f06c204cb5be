"""The regression sweep (dropout rates x seeds, full length) trained two ways, on the same machine
in one invocation, W&B offline in both:

  vectorized   every member at once as one batched model (dropstudy.vectorized.train_members)
  per-member   one member after another through the single path (runner.train_run), in this
               one process, as Hydra's basic launcher runs a sweep's jobs

Prints the wall time of each and their ratio as JSON, and appends a dated row to BENCHMARKS.md.
With --baseline-members K only the first K per-member runs are trained and the per-member time
is extrapolated from their mean (the runs are independent and equally long); the JSON says so.

    python scripts/bench_sweep.py                                  # 6 rates x 8 seeds x 2000 epochs
    python scripts/bench_sweep.py --rates 0,0.5 --seeds 2 --epochs 200 --no-record   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchlib import cpu_name

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

HEADING = "## Regression sweep: vectorized vs one run per member (scripts/bench_sweep.py)"
TABLE = (
    "| date (UTC) | machine | command | members x epochs | vectorized s | per-member s | per-member / vectorized "
    "| vectorized / one run | load avg (start -> end) |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="0,0.1,0.2,0.3,0.4,0.5", help="dropout rates, comma-separated")
    parser.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1 per rate")
    parser.add_argument("--epochs", type=int, default=2000, help="trainer.epochs (the study's length: 2000)")
    parser.add_argument("--device", default="auto", help="device key for both ways")
    parser.add_argument("--baseline-members", type=int, default=None,
                        help="train only this many per-member runs and extrapolate (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="where the run directories go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--no-record", action="store_true", help="do not append the row to BENCHMARKS.md")
    return parser.parse_args()


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads (CPU only)"


def load_average() -> str:
    try:
        return "{:.1f}".format(os.getloadavg()[0])
    except OSError:
        return "?"


def record(result: dict) -> None:
    path = REPO / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    per_member = f"{result['per_member_s']:.0f}" + (" (extrapolated from " + str(result["per_member_measured"]) + ")"
                                                   if result["per_member_extrapolated"] else "")
    row = (f"| {result['date']} | {result['machine']} | `{result['command']}` | {result['members']} x {result['epochs']} "
           f"| {result['vectorized_s']:.0f} | {per_member} | {result['speedup']:.1f}x "
           f"| {result['vectorized_over_one_run']:.1f}x | {result['load_start']} -> {result['load_end']} |\n")
    if HEADING not in text:
        text = text.rstrip("\n") + f"\n\n{HEADING}\n\n" + TABLE + row
    else:
        # Append the row at the end of this section's table (the next heading starts another section).
        start = text.index(HEADING)
        end = text.find("\n## ", start + len(HEADING))
        section = text[start:] if end < 0 else text[start:end]
        section = section.rstrip("\n") + "\n" + row
        text = text[:start] + section + ("" if end < 0 else "\n" + text[end:])
    path.write_text(text)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    import logging

    logging.basicConfig(level=logging.WARNING)  # the per-epoch progress lines would drown the result

    from dropstudy.config import compose
    from dropstudy.rundir import RunDir
    from dropstudy.runner import train_run
    from dropstudy.vectorized import Member, train_members, why_not_vectorizable

    rates = [float(r) for r in args.rates.split(",")]
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    members = []
    for p in rates:
        for seed in range(args.seeds):
            overrides = [f"model.dropout={p}", f"seed={seed}", f"trainer.epochs={args.epochs}",
                         f"device={args.device}", "tracker.mode=offline"]
            members.append((overrides, compose(overrides)))
    reason = why_not_vectorizable([cfg for _, cfg in members])
    if reason:
        sys.exit(f"bench_sweep: {reason}")
    load_start = load_average()

    started = time.perf_counter()
    results = train_members([Member(cfg, out / "vectorized" / f"{i}", o) for i, (o, cfg) in enumerate(members)],
                            group="bench-vectorized")
    vectorized_s = time.perf_counter() - started
    assert all(r.status == "finished" for r in results), [r.status for r in results]
    print(f"vectorized: {len(members)} members in {vectorized_s:.1f} s", file=sys.stderr)

    measured = members[: args.baseline_members] if args.baseline_members else members
    started = time.perf_counter()
    for i, (overrides, cfg) in enumerate(measured):
        run_dir = out / "per-member" / f"{i}"
        RunDir(run_dir).write_config(cfg, overrides)  # what Hydra writes for each job
        result = train_run(cfg, run_dir, overrides, group="bench-per-member")
        assert result.status == "finished", result.status
        print(f"per-member: {i + 1}/{len(measured)} after {time.perf_counter() - started:.1f} s", file=sys.stderr)
    measured_s = time.perf_counter() - started
    one_run_s = measured_s / len(measured)
    per_member_s = one_run_s * len(members)

    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "command": shlex.join(["python", "scripts/bench_sweep.py", *sys.argv[1:]]),
        "members": len(members),
        "rates": rates,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "tracking": "W&B offline (one run per member in both ways)",
        "per_member_way": "runner.train_run for each member in sequence, in one process (Hydra's basic launcher)",
        "vectorized_s": round(vectorized_s, 2),
        "per_member_s": round(per_member_s, 2),
        "per_member_measured": len(measured),
        "per_member_extrapolated": len(measured) < len(members),
        "one_run_s": round(one_run_s, 2),
        "speedup": round(per_member_s / vectorized_s, 2),
        "vectorized_over_one_run": round(vectorized_s / one_run_s, 2),
        "load_start": load_start,
        "load_end": load_average(),
        "run_dirs": str(out),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_record:
        record(result)


if __name__ == "__main__":
    main()
