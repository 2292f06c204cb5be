"""`dropstudy study experiment=regression` against the same two arms written by hand, end to end,
on the same machine in one invocation, W&B offline in both:

  hand loop   one plain PyTorch script (this file, --hand-loop): the classic regression demo's data,
              MLP 1->200->200->200->1 with dropout, SGD lr 0.01 momentum 0.9, full batch, 2000 epochs,
              validation every 400; per arm `wandb.init` (offline), `run.watch` (gradients and
              parameters, every 400 steps), `run.log` every 10th step, `run.finish`
  dropstudy   `python -m dropstudy study experiment=regression` (the same model, data, optimiser,
              epochs and cadences, plus what dropstudy adds: run directories, checkpoints,
              provenance, figures and the study's comparison)

Each runs in its own process, alternating, --repeats times each; the medians are compared. Also
times `dropstudy --help`. Prints JSON (with where each study's time went: the `time:` line it
ends with) and appends a dated row to BENCHMARKS.md.

    python scripts/bench_study.py                 # 3 runs each
    python scripts/bench_study.py --repeats 1 --no-record
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchlib import add_row, cpu_name, load_average, print_result

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Regression study end to end: `dropstudy study` vs the hand-written loop (scripts/bench_study.py)"
TABLE = (
    "| date (UTC) | machine | command | hand loop s | `dropstudy study` s | study / hand loop "
    "| `dropstudy --help` s | where the study's time went | load avg (start -> end) |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
)

# The regression study's config (conf/experiment/regression.yaml and the schema's defaults).
EPOCHS, EVAL_EVERY, LOG_EVERY, ARMS, SEED = 2000, 400, 10, (0.0, 0.5), 0


def hand_loop(out: Path, threads: int | None) -> None:
    """Both arms as a user writes them without dropstudy."""
    import torch
    import wandb
    from torch import nn

    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(SEED)
    x = torch.linspace(-1.0, 1.0, 10).unsqueeze(1)
    y_train = 1.5 * x + 0.5 * torch.randn(x.shape, generator=g)
    y_test = 1.5 * x + 0.3 * torch.randn(x.shape, generator=g)
    mse = nn.MSELoss()
    for p in ARMS:
        torch.manual_seed(SEED)
        model = nn.Sequential(nn.Linear(1, 200), nn.ReLU(), nn.Dropout(p), nn.Linear(200, 200), nn.ReLU(),
                              nn.Dropout(p), nn.Linear(200, 200), nn.ReLU(), nn.Dropout(p), nn.Linear(200, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        run = wandb.init(project="bench-study", group="hand-loop", job_type=f"dropout-{p:g}", dir=str(out),
                         mode="offline", config={"dropout": p, "lr": 0.01, "momentum": 0.9, "epochs": EPOCHS},
                         reinit="finish_previous")
        run.watch(model, log="all", log_freq=EVAL_EVERY)
        for epoch in range(1, EPOCHS + 1):
            model.train()
            optimizer.zero_grad()
            loss = mse(model(x), y_train)
            loss.backward()
            optimizer.step()
            row = {"epoch": epoch, "train/loss": loss.item()}
            if epoch % EVAL_EVERY == 0:
                model.eval()
                with torch.no_grad():
                    row["val/loss"] = mse(model(x), y_test).item()
            if epoch % LOG_EVERY == 0:
                run.log(row)
        run.finish()


def timed(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> float:
    with open(log, "w") as out:
        start = time.perf_counter()
        code = subprocess.run(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - start
    if code != 0:
        sys.exit(f"bench_study: `{shlex.join(command)}` failed (exit {code}); see {log}")
    return wall


def time_line(log: Path) -> str:
    """The study's own account of where its time went: the `time: ...` line it ends with."""
    lines = [line for line in log.read_text().splitlines() if line.startswith("time: ")]
    return lines[-1] if lines else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternating (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads in both (default: each one's own default)")
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--no-record", action="store_true", help="do not append the row to BENCHMARKS.md")
    parser.add_argument("--hand-loop", type=Path, default=None, metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hand_loop:
        return hand_loop(args.hand_loop, args.threads)

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-study-"))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    threads = [f"--threads={args.threads}"] if args.threads else []
    study_threads = [f"trainer.threads={args.threads}"] if args.threads else []
    load_start = load_average()
    help_s, hand_s, study_s, where = [], [], [], []  # where: each study's time line
    for i in range(args.repeats):
        work = out / str(i)
        work.mkdir(parents=True, exist_ok=True)
        help_s.append(timed([sys.executable, "-m", "dropstudy", "--help"], env, work, work / "help.log"))
        hand_s.append(timed([sys.executable, str(Path(__file__).resolve()), "--hand-loop", str(work / "hand"),
                             *threads], env, work, work / "hand.log"))
        study_dir = work / "study"
        study_s.append(timed([sys.executable, "-m", "dropstudy", "study", "experiment=regression", *study_threads,
                              f"hydra.run.dir={study_dir}"], env, work, work / "study.log"))
        where.append(time_line(work / "study.log"))
        print(f"run {i + 1}/{args.repeats}: hand loop {hand_s[-1]:.1f} s, dropstudy study {study_s[-1]:.1f} s, "
              f"--help {help_s[-1]:.2f} s", file=sys.stderr)
    median_study = statistics.median(study_s)
    # The account of the study whose wall time is the median one.
    account = where[study_s.index(sorted(study_s)[len(study_s) // 2])]
    import torch

    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {args.threads or torch.get_num_threads()} threads",
        "command": shlex.join(["python", "scripts/bench_study.py", *sys.argv[1:]]),
        "hand_loop_s": [round(s, 2) for s in hand_s],
        "study_s": [round(s, 2) for s in study_s],
        "help_s": [round(s, 3) for s in help_s],
        "hand_loop_median_s": round(statistics.median(hand_s), 2),
        "study_median_s": round(median_study, 2),
        "help_median_s": round(statistics.median(help_s), 3),
        "study_over_hand_loop": round(median_study / statistics.median(hand_s), 2),
        "study_time_line": account,
        "study_time_lines": where,
        "load_start": load_start,
        "load_end": load_average(),
        "runs": str(out),
    }
    print_result(result, args.json)
    if not args.no_record:
        add_row(HEADING, TABLE,
                f"| {result['date']} | {result['machine']} | `{result['command']}` | {result['hand_loop_median_s']:.1f} "
                f"| {result['study_median_s']:.1f} | {result['study_over_hand_loop']:.2f}x "
                f"| {result['help_median_s']:.2f} | {account} | {load_start} -> {result['load_end']} |\n")


if __name__ == "__main__":
    main()
