"""One benchmark script from two checkouts, run alternately in one invocation, so that a change's
cost is measured under the same machine load: before, after, before, after, ... (--repeats each).

Each run is `python <checkout>/scripts/<script> <args> --json <file>` with PYTHONPATH=<checkout>/src,
in that checkout, with TMPDIR in a scratch folder of its own (deleted at the end unless --keep).
Prints a markdown table: for every number the script's JSON holds in every run of both sides
(nested keys joined by dots; numbers inside lists, such as per-run samples, are left out), the
median before, the median after, and after / before; plus the wall time of each script process
as this runner measured it, the machine, the date, the load average at the start and the end,
and the exact command. A script that would append a row to BENCHMARKS.md (--no-record,
--no-append) is given that flag, so neither checkout is written to.

    git worktree add --detach ../before <commit>     # the checkout to compare against
    python scripts/bench_before_after.py --before ../before --after . --repeats 3 -- \\
        bench_sweep.py --rates 0,0.5 --seeds 2 --epochs 200 --no-cli
    python scripts/bench_before_after.py --before ../before --after . -- bench_study.py --repeats 1
    python scripts/bench_before_after.py --before ../before --after . --json-flag=--out -- \\
        bench.py --epochs 1 --repeats 1 --n-train 512 --val-size 128 --n-test 128 --skip-tutorial

bench_sweep.py and bench_study.py write their JSON with --json; bench.py with --out (hence
--json-flag=--out). Exit status: 0, 2 for a bad argument, 1 when a run fails (its log is kept).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchlib import cpu_name

# The options by which the benchmark scripts skip appending their row to BENCHMARKS.md.
NO_RECORD_FLAGS = ("--no-record", "--no-append")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--before", type=Path, required=True, help="the checkout to compare against")
    parser.add_argument("--after", type=Path, required=True, help="the checkout with the change")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each checkout, alternating (default 3)")
    parser.add_argument("--json-flag", default="--json",
                        help="the script's option for its JSON file, given as --json-flag=OPTION (default --json)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, JSON, run dirs)")
    parser.add_argument("script", help="a file in <checkout>/scripts/, e.g. bench_sweep.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, not {args.repeats}")
    for side in ("before", "after"):
        checkout = getattr(args, side).resolve()
        script = checkout / "scripts" / args.script
        if not script.is_file():
            parser.error(f"--{side} {getattr(args, side)}: no scripts/{args.script} there")
        if f'"{args.json_flag}"' not in script.read_text():
            parser.error(f"--{side}: scripts/{args.script} takes no {args.json_flag} option; --json-flag=OPTION "
                         "names the one it writes its JSON result with (bench.py: --json-flag=--out)")
        setattr(args, side, checkout)
    return args


def revision(checkout: Path) -> str:
    """The checkout's commit, and whether tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True)
    if head.returncode != 0:
        return "not a git checkout"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=checkout,
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")


def numbers(value: object, prefix: str = "") -> dict[str, float]:
    """Every number in a JSON object outside lists, by its dotted key path; booleans are not numbers."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in numbers(item, f"{prefix}{key}.").items()}
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return {prefix.rstrip("."): float(value)}
    return {}


def run_once(side: str, checkout: Path, args: argparse.Namespace, extra: list[str], work: Path) -> dict[str, float]:
    """One run of the script in `checkout`; the numbers of its JSON and its process's wall time."""
    here = work / side
    here.mkdir(parents=True)
    (here / "tmp").mkdir()
    result = here / "result.json"
    command = [sys.executable, str(checkout / "scripts" / args.script), *args.args, *extra,
               args.json_flag, str(result)]
    env = {**os.environ, "TMPDIR": str(here / "tmp"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout / "src"), os.environ.get("PYTHONPATH")]))}
    with open(here / "output.log", "w") as log:
        started = time.perf_counter()
        code = subprocess.run(command, cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - started
    if code != 0 or not result.is_file():
        tail = "".join((here / "output.log").read_text().splitlines(keepends=True)[-20:])
        sys.exit(f"bench_before_after: {side} failed (exit {code}): {shlex.join(command)}\n{tail}"
                 f"(the whole log: {here / 'output.log'})")
    if not args.keep:
        shutil.rmtree(here / "tmp", ignore_errors=True)  # its run dirs; output.log and result.json stay
    return {**numbers(json.loads(result.read_text())), "(script process wall s)": wall}


def cell(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3e}"


def main() -> None:
    args = parse_args()
    script_text = (args.after / "scripts" / args.script).read_text()
    extra = [f for f in NO_RECORD_FLAGS if f'"{f}"' in script_text and f not in args.args]
    command = shlex.join(["python", "scripts/bench_before_after.py", *sys.argv[1:]])
    work = Path(tempfile.mkdtemp(prefix="bench-before-after-"))
    revisions = {side: revision(getattr(args, side)) for side in ("before", "after")}  # as they are measured
    load_start, started = os.getloadavg(), datetime.now(timezone.utc)
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for i in range(args.repeats):
        for side in ("before", "after"):
            runs[side].append(run_once(side, getattr(args, side), args, extra, work / f"{i + 1}"))
            print(f"{side} {i + 1}/{args.repeats}: {runs[side][-1]['(script process wall s)']:.1f} s",
                  file=sys.stderr)
    load_end = os.getloadavg()

    keys = [k for k in runs["before"][0] if all(k in r for side in runs.values() for r in side)]
    missing = sorted({k for side in runs.values() for r in side for k in r} - set(keys))
    runs_each = f"{args.repeats} run{'s' if args.repeats > 1 else ''} each"
    print(f"## {args.script}: before vs after ({runs_each}, alternating)\n", flush=True)
    print(f"- command: `{command}`")
    print(f"- before: {args.before} ({revisions['before']})")
    print(f"- after: {args.after} ({revisions['after']})")
    print(f"- machine: {cpu_name()}, {os.cpu_count()} cores")
    print(f"- date (UTC): {started:%Y-%m-%d %H:%M} to {datetime.now(timezone.utc):%H:%M}")
    print("- load average (1, 5, 15 min): start {:.2f} {:.2f} {:.2f}, end {:.2f} {:.2f} {:.2f}".format(
        *load_start, *load_end))
    if extra:
        print(f"- added to the script's arguments: {' '.join(extra)} (no row appended to BENCHMARKS.md)")
    print("\n| metric | before (median) | after (median) | after / before | before runs | after runs |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for key in keys:
        before = [r[key] for r in runs["before"]]
        after = [r[key] for r in runs["after"]]
        b, a = statistics.median(before), statistics.median(after)
        ratio = f"{a / b:.3f}" if b else "-"
        print(f"| {key} | {cell(b)} | {cell(a)} | {ratio} | {', '.join(map(cell, before))} "
              f"| {', '.join(map(cell, after))} |")
    if missing:
        print(f"\nnot in every run of both (left out): {', '.join(missing)}")
    if args.keep:
        print(f"\nlogs, JSON and run dirs: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
