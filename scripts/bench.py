"""CIFAR-10 training throughput: the tutorial loop users would write vs dropstudy, side by side.

One invocation, one device, the same data, model, batch size and epochs for every contender:

  tutorial     torchvision CIFAR10 + ToTensor() + Normalize, DataLoader(batch_size=64,
               shuffle=True), the tutorial CNN, Adam, wandb.log every step, wandb.watch(model)
               with its defaults, W&B offline
  tracked      `dropstudy train experiment=cifar10` with full tracking (W&B offline, gradient
               and parameter histograms, figures)
  untracked    the same with tracker.mode=disabled
  bf16         (with --bf16) untracked with trainer.amp=bf16: bf16 autocast, on a CPU too

Each contender runs in its own process (so peak RSS is its own), `--repeats` times, interleaved
so that a change in machine load hits them alike; the median is reported. Training images/s
counts training steps only (each side's own epoch timer; evaluation excluded); the end-to-end
wall time of each process is reported too. The FLOP rate uses the CNN's FLOP count (measured
with torch's FlopCounterMode: 10.68 MFLOP forward per image, x3 for forward + backward) against
a matmul peak measured on the same device in the same invocation.

The data are synthetic CIFAR-shaped images (dropstudy's data.synthetic generator) written to
disk in the real cifar-10-batches-py format, so torchvision reads them as it reads CIFAR-10.
torchvision checks the MD5 of each batch file, which a generated copy cannot pass: the tutorial
side reads it through a CIFAR10 subclass without checksums, dropstudy with data.verify=false.
`--data-root` points both at a real CIFAR-10 instead (checksums on).

`--study` also times a whole `dropstudy study experiment=cifar10` (both arms, evaluation,
figures, W&B offline) end to end and reports where its time went (summary.json's timings_s).

`--bf16` adds the bf16 contender and a bf16 matmul peak, and writes its row to the table of bf16
against fp32 and of the tracking overhead (targets: bf16 >= 1.5x fp32 images/s where the CPU has
native bf16, avx512_bf16 or amx_bf16; tracking within 2% of untracked), with the CPU's bf16 flags.

Results go to a JSON file (--out) and, unless --no-append, as a dated row to BENCHMARKS.md.

    python scripts/bench.py --epochs 2 --repeats 3            # what `make bench` runs
    python scripts/bench.py --device cuda --study              # the H100 target: a 15-epoch study
    python scripts/bench.py --epochs 1 --repeats 1 --n-train 512 --val-size 128 --n-test 128 --no-append
    python scripts/bench.py --skip-tutorial --bf16 --epochs 1 --repeats 3      # bf16 vs fp32, tracking overhead
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchlib import cpu_bf16_flags, cpu_name

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "BENCHMARKS.md"
HEADING = "## CIFAR-10 training throughput (scripts/bench.py)"
BF16_HEADING = "## CIFAR-10 on a CPU: bf16 against fp32, and what tracking costs (scripts/bench.py --bf16)"
CONTENDERS = ("tutorial", "tracked", "untracked", "bf16")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # what the tutorials normalise with (= dropstudy's)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
TRAIN_FLOP_FACTOR = 3  # backward costs about twice the forward pass


# --------------------------------------------------------------------------- data


def write_synthetic_cifar(root: Path, n_train: int, n_test: int, seed: int) -> None:
    """dropstudy's synthetic CIFAR-shaped images, as torchvision's cifar-10-batches-py files."""
    import numpy as np

    from dropstudy.data.datasets import synthetic_cifar10
    from dropstudy.data.files import CIFAR10_CLASSES

    tensors = synthetic_cifar10(n_train, n_test, seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, images, labels) -> None:
        # The release stores each image as 3072 bytes: the R plane, then G, then B (= CHW).
        entry = {"batch_label": name, "labels": [int(v) for v in labels],
                 "data": images.reshape(len(images), 3072).numpy(),
                 "filenames": [f"{name}_{i}.png" for i in range(len(images))]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    chunks = np.array_split(np.arange(n_train), 5)
    for i, idx in enumerate(chunks, start=1):
        dump(f"data_batch_{i}", tensors["train_images"][idx], tensors["train_labels"][idx])
    dump("test_batch", tensors["test_images"], tensors["test_labels"])
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": len(chunks[0]),
                     "num_vis": 3072}, f)


# --------------------------------------------------------------------------- workers


def tutorial_worker(spec: dict) -> dict:
    """The loop of the W&B/PyTorch dropout tutorial, written as users write it."""
    import torch
    import torch.nn.functional as F
    import torchvision.transforms as T
    import wandb
    from torch import nn
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import CIFAR10

    class UncheckedCIFAR10(CIFAR10):
        # A generated copy cannot pass torchvision's MD5 check; md5=None asks only that the files exist.
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    class Net(nn.Module):
        def __init__(self, p: float):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 32, 3)
            self.conv2 = nn.Conv2d(32, 64, 3)
            self.conv3 = nn.Conv2d(64, 128, 3)
            self.pool = nn.MaxPool2d(2, 2)
            self.dropout = nn.Dropout(p)
            self.fc1 = nn.Linear(128 * 2 * 2, 512)
            self.fc2 = nn.Linear(512, 10)

        def forward(self, x):
            x = self.pool(F.relu(self.conv1(x)))
            x = self.pool(F.relu(self.conv2(x)))
            x = self.pool(F.relu(self.conv3(x)))
            x = x.view(-1, 128 * 2 * 2)
            x = self.dropout(x)
            x = F.relu(self.fc1(x))
            x = self.dropout(x)
            return self.fc2(x)

    device = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    transform = T.Compose([T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    dataset_class = CIFAR10 if spec["verify"] else UncheckedCIFAR10
    full = dataset_class(spec["root"], train=True, download=False, transform=transform)
    # The same held-out validation images as dropstudy (drawn with data.seed), so both sides
    # train on the same images.
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(spec["seed"]))
    val_idx, train_idx = order[: spec["val_size"]], order[spec["val_size"]:].sort().values
    trainloader = DataLoader(Subset(full, train_idx.tolist()), batch_size=spec["batch_size"], shuffle=True)
    valloader = DataLoader(Subset(full, val_idx.tolist()), batch_size=spec["batch_size"])

    model = Net(spec["dropout"]).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    wandb.init(project="dropstudy-bench", mode="offline", dir=spec["out"], config=spec,
               settings=wandb.Settings(silent=True, console="off"))
    wandb.watch(model)

    train_seconds, images = 0.0, 0
    for epoch in range(spec["epochs"]):
        model.train()
        start = time.perf_counter()
        for inputs, labels in trainloader:
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(model(inputs), labels)
            loss.backward()
            optimizer.step()
            wandb.log({"epoch": epoch, "loss": loss.item()})
            images += len(labels)
        train_seconds += time.perf_counter() - start
        model.eval()
        correct, total, val_loss = 0, 0, 0.0
        with torch.no_grad():
            for inputs, labels in valloader:
                inputs, labels = inputs.to(device), labels.to(device)
                outputs = model(inputs)
                val_loss += criterion(outputs, labels).item() * len(labels)
                correct += (outputs.argmax(1) == labels).sum().item()
                total += len(labels)
        wandb.log({"epoch": epoch, "val_loss": val_loss / total, "val_acc": correct / total})
    wandb.finish()
    out = {"images": images, "train_s": train_seconds}
    if device.type == "cuda":
        out["gpu_memory_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def peak_worker(spec: dict) -> dict:
    """The model's FLOPs per image and a matmul peak on the device (the best of a few timed runs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dropstudy.model.networks import CNN

    model = CNN([32, 64, 128], 512, 10, [0.25, 0.25]).eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 32, 32))
    device = torch.device(spec["device"])
    out = {"forward_flop_per_image": counter.get_total_flops()}
    dtypes = {"fp32": torch.float32} | ({"bf16": torch.bfloat16} if device.type == "cuda" or spec["bf16"] else {})
    for name, dtype in dtypes.items():
        n = 8192 if device.type == "cuda" else 1024
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        best = float("inf")
        for _ in range(6):
            torch.cuda.synchronize(device) if device.type == "cuda" else None
            start = time.perf_counter()
            for _ in range(4):
                a @ b
            torch.cuda.synchronize(device) if device.type == "cuda" else None
            best = min(best, (time.perf_counter() - start) / 4)
        out[f"matmul_peak_{name}_gflops"] = 2 * n**3 / best / 1e9
    out["threads"] = torch.get_num_threads()
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


WORKERS = {"tutorial": tutorial_worker, "peak": peak_worker}


# --------------------------------------------------------------------------- running


def run_process(command: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MiB, exit code) of one child process, its RSS alone (wait4)."""
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, proc.returncode  # ru_maxrss is in KiB on Linux


def worker(name: str, spec: dict, work: Path, env: dict[str, str]) -> dict:
    result_file = work / f"{name}-{time.monotonic_ns()}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name,
               "--spec", json.dumps({**spec, "out": str(work), "result": str(result_file)})]
    wall, rss, code = run_process(command, work / f"{name}.log", env, work)
    if code != 0:
        sys.exit(f"bench: the {name} worker failed (exit {code}); see {work / f'{name}.log'}")
    return {**json.loads(result_file.read_text()), "wall_s": wall, "peak_rss_mib": rss}


def dropstudy_run(command: str, overrides: list[str], run_dir: Path, work: Path, env: dict[str, str]) -> dict:
    """`python -m dropstudy COMMAND ...` as a user runs it; its summaries say where time went."""
    cmd = [sys.executable, "-m", "dropstudy", command, *overrides, f"hydra.run.dir={run_dir}"]
    wall, rss, code = run_process(cmd, work / f"{run_dir.name}.log", env, work)
    if code != 0:
        sys.exit(f"bench: `{shlex.join(cmd)}` failed (exit {code}); see {work / f'{run_dir.name}.log'}")
    summaries = [json.loads(p.read_text()) for p in sorted(run_dir.glob("**/summary.json"))]
    timings: dict[str, float] = {}
    for s in summaries:
        for key, value in s.get("timings_s", {}).items():
            timings[key] = timings.get(key, 0.0) + value
    out = {"wall_s": wall, "peak_rss_mib": rss, "timings_s": timings, "runs": len(summaries)}
    gpu = [s["gpu_memory_peak_mib"] for s in summaries if "gpu_memory_peak_mib" in s]
    if gpu:
        out["gpu_memory_peak_mib"] = max(gpu)
    # Each epoch's own training rate (perf/samples_per_s): from the second epoch on, a run is past
    # everything that starts once (W&B's start overlaps the first epoch of a tracked run).
    rows = [json.loads(line) for p in sorted(run_dir.glob("**/metrics.jsonl")) for line in p.read_text().splitlines()]
    out["epoch_images_per_s"] = [row["perf/samples_per_s"] for row in rows if "perf/samples_per_s" in row]
    return out


def paired_rate(run: dict, steady: bool) -> float | None:
    """A run's training images/s: over all its epochs, or (steady) the mean of its epochs after the first."""
    if not steady:
        return run["images_per_s"]
    later = run.get("epoch_images_per_s", [])[1:]
    return statistics.fmean(later) if later else None


def median(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else None


def machine() -> str:
    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--epochs", type=int, default=2, help="training epochs per contender (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per contender; the median counts (default 3)")
    parser.add_argument("--n-train", type=int, default=45_000, help="training images (default 45,000: CIFAR-10's 50,000 minus validation)")
    parser.add_argument("--val-size", type=int, default=5000, help="held-out validation images (default 5,000)")
    parser.add_argument("--n-test", type=int, default=10_000, help="test images (default 10,000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    parser.add_argument("--data-root", type=Path, help="a real CIFAR-10 (cifar-10-batches-py) instead of synthetic data")
    parser.add_argument("--study", action="store_true", help="also time a whole `dropstudy study experiment=cifar10`")
    parser.add_argument("--study-epochs", type=int, default=15, help="epochs of the --study run (default 15, the study's own)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra override for the dropstudy runs, e.g. --set trainer.channels_last=false (repeatable)")
    parser.add_argument("--skip-tutorial", action="store_true", help="only the dropstudy contenders (the tutorial is slow on CPU)")
    parser.add_argument("--bf16", action="store_true",
                        help="also train untracked with trainer.amp=bf16, and write the bf16 / tracking-overhead row")
    parser.add_argument("--out", type=Path, help="JSON results file (default runs/bench/<time>.json)")
    parser.add_argument("--no-append", action="store_true", help="do not add a row to BENCHMARKS.md")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))  # the checkout's dropstudy, installed or not

    if args.worker:
        spec = json.loads(args.spec)
        Path(spec["result"]).write_text(json.dumps(WORKERS[args.worker](spec)))
        return

    import torch  # only to resolve the device name; every measurement runs in a child process

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    started = datetime.now(timezone.utc)
    work = args.work or Path(tempfile.mkdtemp(prefix="dropstudy-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    synthetic = args.data_root is None
    root = work / "data" if synthetic else args.data_root.expanduser().resolve()
    if synthetic:
        write_synthetic_cifar(root, args.n_train + args.val_size, args.n_test, seed=0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "WANDB_SILENT": "true", "MPLCONFIGDIR": str(work / "mpl")}
    env.pop("WANDB_MODE", None)
    spec = {"root": str(root), "verify": not synthetic, "val_size": args.val_size, "batch_size": args.batch_size,
            "epochs": args.epochs, "dropout": 0.25, "seed": 0, "device": device, "bf16": args.bf16}
    common = ["experiment=cifar10", f"data.root={root}", f"data.verify={str(not synthetic).lower()}",
              f"data.val_size={args.val_size}", f"trainer.batch_size={args.batch_size}", f"device={device}",
              "model.dropout=0.25", "seed=0", *args.set]
    if synthetic and args.n_train + args.val_size > 50_000:
        sys.exit("bench: --n-train + --val-size is at most 50,000 (CIFAR-10's training set)")
    load = {"before": os.getloadavg()}

    print(f"bench: {device}, {'synthetic CIFAR-shaped data' if synthetic else root}, {args.n_train:,} training "
          f"images, batch {args.batch_size}, {args.epochs} epoch(s), {args.repeats} repeat(s); scratch {work}")
    # Decode the files into dropstudy's tensor cache once, outside the timed runs (as any second run finds it).
    dropstudy_run("train", [*common, "trainer.epochs=1", "data.subset=2", "tracker.mode=disabled"],
                  work / "warm-cache", work, env)
    peak = worker("peak", spec, work, env)
    results: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    contenders = [c for c in CONTENDERS if not (args.skip_tutorial and c == "tutorial") and (args.bf16 or c != "bf16")]
    for r in range(args.repeats):
        # Each repeat starts with the next contender, so that no contender always runs right after
        # the same other one (a position effect on a shared machine then falls on all alike).
        for name in contenders[r % len(contenders):] + contenders[:r % len(contenders)]:
            if name == "tutorial":
                res = worker("tutorial", spec, work, env)
            else:
                mode = "offline" if name == "tracked" else "disabled"
                amp = ["trainer.amp=bf16"] if name == "bf16" else []
                res = dropstudy_run("train", [*common, f"trainer.epochs={args.epochs}", f"tracker.mode={mode}", *amp],
                                    work / f"{name}-{r}", work, env)
                res["images"] = args.n_train * args.epochs
                res["train_s"] = res["timings_s"]["train"]
            res["images_per_s"] = res["images"] / res["train_s"]
            results[name].append(res)
            print(f"  {name:10s} repeat {r + 1}: {res['images_per_s']:8,.0f} images/s  "
                  f"(train {res['train_s']:.1f}s, process {res['wall_s']:.1f}s, peak RSS {res['peak_rss_mib']:,.0f} MiB)")
    study = None
    if args.study:
        study = dropstudy_run("study", [*common, f"trainer.epochs={args.study_epochs}", "tracker.mode=offline"],
                              work / "study", work, env)
        print(f"  study ({args.study_epochs} epochs, both arms): {study['wall_s']:.1f}s end to end; "
              + ", ".join(f"{k} {v:.1f}s" for k, v in study["timings_s"].items()))
    load["after"] = os.getloadavg()

    summary = summarize(results, peak, device)
    report = {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine() + (f", {peak['gpu']}" if "gpu" in peak else ""),
        "cpu_bf16": cpu_bf16_flags(),
        "command": shlex.join(["python", "scripts/bench.py", *sys.argv[1:]]),
        "device": device,
        "data": "synthetic CIFAR-shaped random data (not CIFAR-10), cifar-10-batches-py format" if synthetic else str(root),
        "settings": {"epochs": args.epochs, "repeats": args.repeats, "n_train": args.n_train,
                     "val_size": args.val_size, "batch_size": args.batch_size, "threads": peak["threads"]},
        "load_average": load,
        "peak": peak,
        "summary": summary,
        "study": study,
        "runs": results,
    }
    out = args.out or REPO / "runs" / "bench" / f"{started:%Y-%m-%d_%H-%M-%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_summary(report)
    print(f"results: {out}")
    if not args.no_append:
        if args.bf16:
            append_bf16_row(report)
        else:
            append_row(report)
        print(f"row added to {BENCHMARKS}")


def summarize(results: dict[str, list[dict]], peak: dict, device: str) -> dict:
    s: dict = {}
    for name, runs in results.items():
        if runs:
            s[name] = {k: median(runs, k) for k in ("images_per_s", "train_s", "wall_s", "peak_rss_mib",
                                                   "gpu_memory_peak_mib")}
    speed = {name: v["images_per_s"] for name, v in s.items()}
    if "tutorial" in speed:
        s["speedup_vs_tutorial"] = speed["tracked"] / speed["tutorial"]
        s["speedup_untracked_vs_tutorial"] = speed["untracked"] / speed["tutorial"]
    s["tracking_overhead"] = 1 - speed["tracked"] / speed["untracked"]
    if "bf16" in speed:
        s["bf16_vs_fp32"] = speed["bf16"] / speed["untracked"]
    # Paired: the runs of one repeat ran back to back, so their ratio is less exposed to the
    # machine's drift than the ratio of two medians; the median over repeats is reported.
    # Steady: the same from each run's epochs after the first (training alone, past start-up).
    for key, name, steady in (("tracking_overhead", "tracked", False), ("bf16_vs_fp32", "bf16", False),
                              ("steady_tracking_overhead", "tracked", True), ("steady_bf16_vs_fp32", "bf16", True)):
        pairs = [(paired_rate(run, steady), paired_rate(base, steady))
                 for run, base in zip(results.get(name, []), results.get("untracked", []))]
        ratios = [rate / base for rate, base in pairs if rate and base]
        if ratios:
            values = [1 - x for x in ratios] if key.endswith("overhead") else ratios
            s.setdefault("paired", {})[key] = {"median": statistics.median(values), "per_repeat": values}
    train_flop = TRAIN_FLOP_FACTOR * peak["forward_flop_per_image"]
    # On CUDA dropstudy trains under bf16 autocast by default, so its ceiling is the bf16 peak.
    ceiling = peak["matmul_peak_bf16_gflops"] if device.startswith("cuda") else peak["matmul_peak_fp32_gflops"]
    s["flop_per_trained_image"] = train_flop
    for name, rate in speed.items():
        gflops = rate * train_flop / 1e9
        s[name]["gflops"] = gflops
        s[name]["fraction_of_matmul_peak"] = gflops / ceiling
    s["matmul_peak_gflops"] = ceiling
    return s


def print_summary(report: dict) -> None:
    s = report["summary"]
    print(f"\n{report['machine']}; device {report['device']}; load average {report['load_average']['before'][0]:.2f} "
          f"-> {report['load_average']['after'][0]:.2f}")
    print(f"{'':12s}{'images/s':>10s}{'GFLOP/s':>10s}{'of peak':>9s}{'RSS MiB':>9s}{'process s':>11s}")
    for name in CONTENDERS:
        if name in s:
            v = s[name]
            print(f"{name:12s}{v['images_per_s']:10,.0f}{v['gflops']:10.1f}{v['fraction_of_matmul_peak']:9.1%}"
                  f"{v['peak_rss_mib']:9,.0f}{v['wall_s']:11.1f}"
                  + (f"  GPU {v['gpu_memory_peak_mib']:,.0f} MiB" if v.get("gpu_memory_peak_mib") else ""))
    if "speedup_vs_tutorial" in s:
        print(f"dropstudy (tracked) vs tutorial: {s['speedup_vs_tutorial']:.2f}x; "
              f"untracked vs tutorial: {s['speedup_untracked_vs_tutorial']:.2f}x")
    print(f"tracking overhead: {s['tracking_overhead']:+.1%}; matmul peak {s['matmul_peak_gflops']:.0f} GFLOP/s; "
          f"{s['flop_per_trained_image'] / 1e6:.1f} MFLOP per trained image")
    if "bf16_vs_fp32" in s:
        flags = ", ".join(report["cpu_bf16"]) or "no native bf16"
        print(f"bf16 / fp32 (untracked): {s['bf16_vs_fp32']:.2f}x; CPU: {flags}; bf16 matmul peak "
              f"{report['peak'].get('matmul_peak_bf16_gflops', 0):.0f} GFLOP/s")
    for key, value in s.get("paired", {}).items():
        shown = (lambda x: f"{x:+.1%}") if key.endswith("overhead") else (lambda x: f"{x:.2f}x")
        print(f"paired {key.replace('_', ' ')}: {shown(value['median'])} (median; per repeat "
              + ", ".join(shown(x) for x in value["per_repeat"]) + ")")


def append_row(report: dict) -> None:
    """One dated row under this script's heading in BENCHMARKS.md (created if missing)."""
    s = report["summary"]
    header = ("| date (UTC) | machine | command | load avg | tutorial img/s | dropstudy tracked img/s | untracked img/s "
              "| tracked / tutorial | tracking overhead | dropstudy GFLOP/s (of matmul peak) | peak RSS tutorial / dropstudy |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    tut = s.get("tutorial")
    tracked, untracked = s["tracked"], s["untracked"]
    cells = [
        report["date"][:16].replace("T", " "),
        f"{report['machine']}; {report['device']}",
        f"`{report['command']}`",
        f"{report['load_average']['before'][0]:.2f}",
        f"{tut['images_per_s']:,.0f}" if tut else "-",
        f"{tracked['images_per_s']:,.0f}",
        f"{untracked['images_per_s']:,.0f}",
        f"{s['speedup_vs_tutorial']:.2f}x" if tut else "-",
        f"{s['tracking_overhead']:+.1%}",
        f"{tracked['gflops']:.0f} ({tracked['fraction_of_matmul_peak']:.0%} of {s['matmul_peak_gflops']:.0f})",
        (f"{tut['peak_rss_mib']:,.0f}" if tut else "-") + f" / {tracked['peak_rss_mib']:,.0f} MiB",
    ]
    row = "| " + " | ".join(cells) + " |\n"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    if HEADING not in text:
        text = text.rstrip("\n") + f"\n\n{HEADING}\n\n{header}"
    # The row goes at the end of this section's table, before any later section.
    start = text.index(HEADING)
    nxt = text.find("\n## ", start + len(HEADING))
    section, rest = (text[:nxt], text[nxt:]) if nxt != -1 else (text, "")
    if not section.rstrip("\n").endswith("|"):
        section = section.rstrip("\n") + "\n\n" + header
    BENCHMARKS.write_text(section.rstrip("\n") + "\n" + row + rest)


def append_bf16_row(report: dict) -> None:
    """One dated row under BF16_HEADING: fp32 tracked and untracked, bf16 untracked, per repeat too."""
    s, runs = report["summary"], report["runs"]
    header = ("| date (UTC) | machine (native bf16) | command | load avg (start -> end) | fp32 tracked img/s "
              "| fp32 untracked img/s | tracking overhead | bf16 untracked img/s | bf16 / fp32 "
              "| per repeat: tracked / untracked / bf16 | matmul peak fp32 / bf16 GFLOP/s |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    peak, load = report["peak"], report["load_average"]

    def repeats(name: str) -> str:
        return ", ".join(f"{r['images_per_s']:,.0f}" for r in runs[name])

    def paired(key: str, fmt: str) -> str:
        """The median of the per-repeat ratios, over whole runs and over epochs after the first."""
        both = s.get("paired", {})
        if key not in both:
            return ""
        text = f" (paired {fmt.format(both[key]['median'])}"
        if f"steady_{key}" in both:
            text += f"; epochs 2+ {fmt.format(both[f'steady_{key}']['median'])}"
        return text + ")"

    cells = [
        report["date"][:16].replace("T", " "),
        f"{report['machine']} ({', '.join(report['cpu_bf16']) or 'none'}); {report['device']}",
        f"`{report['command']}`",
        f"{load['before'][0]:.2f} -> {load['after'][0]:.2f}",
        f"{s['tracked']['images_per_s']:,.0f}",
        f"{s['untracked']['images_per_s']:,.0f}",
        f"{s['tracking_overhead']:+.1%}" + paired("tracking_overhead", "{:+.1%}"),
        f"{s['bf16']['images_per_s']:,.0f}",
        f"{s['bf16_vs_fp32']:.2f}x" + paired("bf16_vs_fp32", "{:.2f}x"),
        f"{repeats('tracked')} / {repeats('untracked')} / {repeats('bf16')}",
        f"{peak['matmul_peak_fp32_gflops']:.0f} / {peak.get('matmul_peak_bf16_gflops', 0):.0f}",
    ]
    row = "| " + " | ".join(cells) + " |\n"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    if BF16_HEADING not in text:
        # A new section right after the throughput table's section.
        start = text.index(HEADING) if HEADING in text else len(text)
        nxt = text.find("\n## ", start + 1)
        nxt = len(text) if nxt == -1 else nxt + 1
        text = text[:nxt].rstrip("\n") + f"\n\n{BF16_HEADING}\n\n{header}\n" + text[nxt:]
    start = text.index(BF16_HEADING)
    table_end = text.index("\n\n", text.index("| --- |", start))
    BENCHMARKS.write_text(text[:table_end] + "\n" + row.rstrip("\n") + text[table_end:])


if __name__ == "__main__":
    main()
