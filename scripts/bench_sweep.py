"""A sweep (dropout rates x seeds) trained two ways, on the same machine in one invocation, W&B
offline in both: the regression study at full length, or with --experiment cifar10 the CNN on
synthetic data (8 members: 2 rates x 4 seeds, 1 epoch, --subset training images, one shared
data.seed so that the members share one copy of the data):

  vectorized   every member at once as one batched model (dropstudy.execute.train_members)
  per-member   one member after another through the single path (runner.train_run), in this
               one process, as Hydra's basic launcher runs a sweep's jobs

and, end to end as users run them (unless --no-cli), the same grid as one `dropstudy sweep`
command (vectorized) against one `dropstudy train` process per member, one after another (what
a shell loop or a process-per-job launcher such as submitit does): each process pays its own
start-up (imports, W&B service) on top of the run.

Prints the wall time of each and their ratio as JSON, and appends a dated row to BENCHMARKS.md.
With --baseline-members K only the first K per-member runs are trained and the per-member time
is extrapolated from their mean (the runs are independent and equally long); the JSON says so.

    python scripts/bench_sweep.py                                  # 6 rates x 8 seeds x 2000 epochs
    python scripts/bench_sweep.py --rates 0,0.5 --seeds 2 --epochs 200 --no-record   # a quick check
    python scripts/bench_sweep.py --experiment cifar10 --subset 2000                 # CNN ensemble
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

from benchlib import add_row, cpu_name, load_average, print_result

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

HEADING = "## Regression sweep: vectorized vs one run per member (scripts/bench_sweep.py)"
CIFAR_HEADING = "## CIFAR-10 sweep: one ensemble vs one run per member (scripts/bench_sweep.py --experiment cifar10)"
CIFAR_TABLE = (
    "| date (UTC) | machine | command | members x images x epochs | ensemble s | per-member s "
    "| ensemble member-img/s | per-member member-img/s | per-member / ensemble | `dropstudy sweep` s "
    "| `dropstudy train` processes s | processes / sweep | load avg (start -> end) |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
)
LOOP_HEADING = "## CIFAR-10 sweep: the training loop alone, one ensemble vs one run per member (scripts/bench_sweep.py --experiment cifar10)"
LOOP_TABLE = (
    "| date (UTC) | machine | command | members x images x epochs | member execution | ensemble loop s "
    "| per-member loops s | ensemble loop member-img/s | per-member loop member-img/s | ensemble / per-member "
    "| load avg (start -> end) |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
)
# The engine's loop as summary.json's timings_s splits it: training epochs, evaluation, metric
# rows and histograms, checkpoints, each epoch's bookkeeping; no data loading, W&B start or figures.
LOOP_KEYS = ("train", "eval", "log", "checkpoint", "bookkeeping")
CLI_HEADING = "## Regression sweep end to end: `dropstudy sweep` vs one `dropstudy train` process per member"
CLI_TABLE = (
    "| date (UTC) | machine | command | members x epochs | `dropstudy sweep` s | `dropstudy train` processes s "
    "| processes / sweep | sweep / one `train` |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
)
TABLE = (
    "| date (UTC) | machine | command | members x epochs | vectorized s | per-member s | per-member / vectorized "
    "| vectorized / one run | load avg (start -> end) |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="regression", choices=("regression", "cifar10"))
    parser.add_argument("--rates", default=None, help="dropout rates, comma-separated "
                        "(default: 0,0.1,0.2,0.3,0.4,0.5; cifar10: 0,0.25)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 per rate (default 8; cifar10: 4)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="trainer.epochs (default: the study's 2000; cifar10: 1)")
    parser.add_argument("--subset", type=int, default=2000, help="cifar10: data.subset, the training images")
    parser.add_argument("--device", default="auto", help="device key for both ways")
    parser.add_argument("--baseline-members", type=int, default=None,
                        help="train only this many per-member runs and extrapolate (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="where the run directories go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--no-record", action="store_true", help="do not append the row to BENCHMARKS.md")
    parser.add_argument("--no-cli", action="store_true",
                        help="skip the end-to-end commands (`dropstudy sweep` vs a `dropstudy train` process per member)")
    args = parser.parse_args()
    cifar = args.experiment == "cifar10"
    args.rates = args.rates or ("0,0.25" if cifar else "0,0.1,0.2,0.3,0.4,0.5")
    args.seeds = args.seeds or (4 if cifar else 8)
    args.epochs = args.epochs or (1 if cifar else 2000)
    # The CNN on synthetic images (no download), a fixed data.seed: one copy of the data for all.
    args.extra = (["experiment=cifar10", "data.synthetic=true", f"data.subset={args.subset}", "data.val_size=500",
                   "data.seed=0"] if cifar else [])
    return args


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads (CPU only)"


def record(result: dict) -> None:
    if result["experiment"] == "cifar10":
        cli = result.get("cli", {})
        add_row(CIFAR_HEADING, CIFAR_TABLE,
                f"| {result['date']} | {result['machine']} | `{result['command']}` | {result['members']} x "
                f"{result['train_images']} x {result['epochs']} | {result['vectorized_s']:.0f} "
                f"| {result['per_member_s']:.0f} | {result['vectorized_member_images_per_s']:.0f} "
                f"| {result['per_member_member_images_per_s']:.0f} | {result['speedup']:.2f}x "
                f"| {cli.get('sweep_s', float('nan')):.0f} | {cli.get('train_processes_s', float('nan')):.0f} "
                f"| {cli.get('speedup', float('nan')):.2f}x | {result['load_start']} -> {result['load_end']} |\n")
        add_row(LOOP_HEADING, LOOP_TABLE,
                f"| {result['date']} | {result['machine']} | `{result['command']}` | {result['members']} x "
                f"{result['train_images']} x {result['epochs']} | {result['member_execution']} "
                f"| {result['ensemble_loop_s']:.2f} | {result['per_member_loop_s']:.2f} "
                f"| {result['ensemble_loop_member_images_per_s']:.0f} | {result['per_member_loop_member_images_per_s']:.0f} "
                f"| {result['per_member_loop_s'] / result['ensemble_loop_s']:.2f}x "
                f"| {result['load_start']} -> {result['load_end']} |\n")
        return
    per_member = f"{result['per_member_s']:.0f}" + (" (extrapolated from " + str(result["per_member_measured"]) + ")"
                                                   if result["per_member_extrapolated"] else "")
    row = (f"| {result['date']} | {result['machine']} | `{result['command']}` | {result['members']} x {result['epochs']} "
           f"| {result['vectorized_s']:.0f} | {per_member} | {result['speedup']:.1f}x "
           f"| {result['vectorized_over_one_run']:.1f}x | {result['load_start']} -> {result['load_end']} |\n")
    add_row(HEADING, TABLE, row)
    if "cli" in result:
        cli = result["cli"]
        processes = f"{cli['train_processes_s']:.0f}" + (f" (extrapolated from {cli['train_measured']})"
                                                        if cli["train_measured"] < result["members"] else "")
        add_row(CLI_HEADING, CLI_TABLE,
                f"| {result['date']} | {result['machine']} | `{result['command']}` | {result['members']} x "
                f"{result['epochs']} | {cli['sweep_s']:.0f} | {processes} | {cli['speedup']:.1f}x "
                f"| {cli['sweep_over_one_train']:.1f}x |\n")


def loop_seconds(summary: dict) -> float:
    return sum(summary.get("timings_s", {}).get(k, 0.0) for k in LOOP_KEYS)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    import logging

    logging.basicConfig(level=logging.WARNING)  # the per-epoch progress lines would drown the result

    import torch

    from dropstudy.config.compose import compose
    from dropstudy.data.datasets import load_dataset
    from dropstudy.engine.batching import why_not
    from dropstudy.runs.execute import Batch, Member, train_members, train_run
    from dropstudy.store.rundir import RunDir

    rates = [float(r) for r in args.rates.split(",")]
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    members = []
    for p in rates:
        for seed in range(args.seeds):
            overrides = [*args.extra, f"model.dropout={p}", f"seed={seed}", f"trainer.epochs={args.epochs}",
                         f"device={args.device}", "tracker.mode=offline"]
            members.append((overrides, compose(overrides)))
    reason = why_not([cfg for _, cfg in members])
    if reason:
        sys.exit(f"bench_sweep: {reason}")
    # One short run first, untimed: the process's first-use costs (lazy imports, first kernels,
    # synthetic data) would otherwise fall on whichever way runs first.
    warm_overrides = [*members[0][0], "trainer.epochs=1"]
    warm_cfg = compose(warm_overrides)
    RunDir(out / "warm-up").write_config(warm_cfg, warm_overrides)
    train_run(warm_cfg, out / "warm-up", warm_overrides, group="bench-warm-up")
    load_start = load_average()

    started = time.perf_counter()
    results = train_members([Member(cfg, out / "vectorized" / f"{i}", o) for i, (o, cfg) in enumerate(members)],
                            Batch(group="bench-vectorized"))
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

    cli = None if args.no_cli else run_commands(args, rates, members, out)

    train_images = len(load_dataset(members[0][1].data, torch.device("cpu"), lambda _: None).train)
    member_images = len(members) * train_images * args.epochs
    # One summary of the ensemble holds the whole batch's loop time; each single run its own.
    ensemble_loop_s = loop_seconds(RunDir.existing(out / "vectorized" / "0").read_summary())
    measured_loop_s = sum(loop_seconds(RunDir.existing(out / "per-member" / f"{i}").read_summary())
                          for i in range(len(measured)))
    per_member_loop_s = measured_loop_s / len(measured) * len(members)
    execution = RunDir.existing(out / "vectorized" / "0").read_provenance().get("batch", {}).get("execution")
    result = {
        "experiment": args.experiment,
        "train_images": train_images,
        "vectorized_member_images_per_s": round(member_images / vectorized_s, 1),
        "member_execution": execution,
        "ensemble_loop_s": round(ensemble_loop_s, 2),
        "per_member_loop_s": round(per_member_loop_s, 2),
        "ensemble_loop_member_images_per_s": round(member_images / ensemble_loop_s, 1),
        "per_member_loop_member_images_per_s": round(member_images / per_member_loop_s, 1),
        "per_member_member_images_per_s": round(member_images / per_member_s, 1),
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
        **({"cli": cli} if cli else {}),
    }
    print_result(result, args.json)
    if not args.no_record:
        record(result)


def run_commands(args: argparse.Namespace, rates: list[float], members: list, out: Path) -> dict:
    """The grid as users run it: one `dropstudy sweep` (vectorized by default), then one
    `dropstudy train` process per member (the first --baseline-members of them), timed end to end."""
    import subprocess

    env = {**os.environ, "WANDB_SILENT": "true",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    common = [*args.extra, f"trainer.epochs={args.epochs}", f"device={args.device}", "tracker.mode=offline"]
    sweep = [sys.executable, "-m", "dropstudy", "sweep", "model.dropout=" + ",".join(str(r) for r in rates),
             f"seed=range(0,{args.seeds})", *common, f"hydra.sweep.dir={out / 'cli-sweep'}"]
    started = time.perf_counter()
    proc = subprocess.run(sweep, env=env, capture_output=True, text=True)
    sweep_s = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"bench_sweep: `dropstudy sweep` failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    table = json.loads((out / "cli-sweep" / "sweep.json").read_text())
    print(f"dropstudy sweep ({table.get('mode')}): {len(members)} members in {sweep_s:.1f} s", file=sys.stderr)

    measured = members[: args.baseline_members] if args.baseline_members else members
    started = time.perf_counter()
    for i, (overrides, _) in enumerate(measured):
        train = [sys.executable, "-m", "dropstudy", "train", *overrides, f"hydra.run.dir={out / 'cli-train' / str(i)}"]
        proc = subprocess.run(train, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench_sweep: `dropstudy train` failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        print(f"dropstudy train: {i + 1}/{len(measured)} after {time.perf_counter() - started:.1f} s", file=sys.stderr)
    one_train_s = (time.perf_counter() - started) / len(measured)
    return {
        "sweep_command": shlex.join(["dropstudy", *sweep[3:]]),
        "sweep_mode": table.get("mode"),
        "sweep_s": round(sweep_s, 2),
        "one_train_s": round(one_train_s, 2),
        "train_measured": len(measured),
        "train_processes_s": round(one_train_s * len(members), 2),
        "speedup": round(one_train_s * len(members) / sweep_s, 2),
        "sweep_over_one_train": round(sweep_s / one_train_s, 2),
    }


if __name__ == "__main__":
    main()
