"""Backend throughput: M members trained stacked, in turn (one process, one copy of the data),
and as M single models one after another in the same process (each a one-member backend: the
step a single `dropstudy train` run takes). For the MLP, `stacked` is the hand-batched forward
and `vmap` the generic stacked forward (torch.func) it is measured against.

One training epoch each, on synthetic CIFAR-shaped data (`data.synthetic=true`, sized for
`--steps` steps of `--batch-size`), members = 2 dropout rates x (M/2) seeds sharing data.seed=0.
Only the epoch is timed (model building and the data excluded); the table gives member-images/s
(M x training images / seconds) and the speed relative to the single models. Contenders are run
in turn, `--repeats` times, interleaved so that a change in machine load hits them alike; the
median is reported, with the load average seen.

    python scripts/bench_backend.py                        # 8 members, 200 steps of 64, CPU
    python scripts/bench_backend.py --device cuda --members 16
    python scripts/bench_backend.py --model mlp --steps 100  # the MLP (regression data, full batch)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
from benchlib import cpu_name

from dropstudy.config.compose import compose
from dropstudy.data.datasets import load_dataset
from dropstudy.engine.backend import Backend
from dropstudy.engine.runtime import FastPaths, describe_device, seed_everything, set_up_process


class NoProgress:
    def advance(self, steps: int = 1) -> None:
        pass


def member_configs(args: argparse.Namespace) -> list:
    if args.model == "cnn":
        base = ["experiment=cifar10", "data.synthetic=true", f"data.subset={args.steps * args.batch_size}",
                "data.val_size=64", f"trainer.batch_size={args.batch_size}"]
    else:  # the regression study's MLP: full batch, one step an epoch, so --steps epochs
        base = []
    base += [f"device={args.device}", "data.seed=0", "tracker.mode=disabled", *args.overrides]
    rates = (0.0, 0.5)
    return [compose([*base, f"seed={i // len(rates)}", f"model.dropout={rates[i % len(rates)]}"])
            for i in range(args.members)]


def timed(backends: list[Backend], epochs: int) -> tuple[float, float]:
    """Wall and process CPU seconds for `epochs` training epochs of every backend, one after
    another (CPU seconds count this process's threads alone: less sensitive to other load)."""
    device = backends[0].device
    cpu = time.process_time()
    start = time.perf_counter()
    for ens in backends:
        for epoch in range(1, epochs + 1):
            ens.set_epoch(epoch)
            ens.train_epoch(NoProgress())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("cnn", "mlp"), default="cnn")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200, help="training steps per member")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--contenders", default="stacked,sequential,single", help="also: vmap (the MLP's generic stacked forward)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every member, e.g. trainer.channels_last=false")
    args = parser.parse_args()

    cfgs = member_configs(args)
    device = set_up_process(cfgs[0])
    fast = FastPaths.resolve(cfgs[0].trainer, device)
    seed_everything(0)
    data = load_dataset(cfgs[0].data, device, lambda _: None)
    epochs = 1 if args.model == "cnn" else args.steps

    def build(contender: str) -> list[Backend]:
        if contender == "single":
            return [Backend([cfg], [data], fast, execution="sequential") for cfg in cfgs]
        if contender == "vmap":
            return [Backend(cfgs, [data] * len(cfgs), fast, execution="stacked", hand_mlp=False)]
        return [Backend(cfgs, [data] * len(cfgs), fast, execution=contender)]

    contenders = args.contenders.split(",")
    seconds: dict[str, list[float]] = {c: [] for c in contenders}
    cpu_seconds: dict[str, list[float]] = {c: [] for c in contenders}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for contender in contenders:
            wall, cpu = timed(build(contender), epochs)
            seconds[contender].append(wall)
            cpu_seconds[contender].append(cpu)
            loads.append(os.getloadavg()[0])

    images = args.members * len(data.train) * epochs
    where = describe_device(device) if device.type != "cpu" else f"{cpu_name()}, {describe_device(device)}"
    print(f"{args.model.upper()}, {args.members} members (2 rates x {args.members // 2} seeds), "
          f"{len(data.train) * epochs // (args.batch_size if args.model == 'cnn' else len(data.train))} steps each, "
          f"{'batch ' + str(args.batch_size) if args.model == 'cnn' else 'full batch'}, {fast.describe()}; {where}")
    print(f"load average during the runs: {min(loads):.1f} to {max(loads):.1f} "
          f"({os.cpu_count()} CPUs; other processes share them)")
    print(f"{'contender':<12} {'seconds':>9} {'member-images/s':>16} {'vs single':>10} {'CPU seconds':>12} "
          f"{'vs single':>10}")
    reference = statistics.median(seconds["single"]) if "single" in seconds else None
    cpu_reference = statistics.median(cpu_seconds["single"]) if "single" in seconds else None
    for contender, values in seconds.items():
        median, cpu = statistics.median(values), statistics.median(cpu_seconds[contender])
        ratio = f"{reference / median:.2f}x" if reference else "-"
        cpu_ratio = f"{cpu_reference / cpu:.2f}x" if cpu_reference else "-"
        print(f"{contender:<12} {median:>9.2f} {images / median:>16,.0f} {ratio:>10} {cpu:>12.2f} {cpu_ratio:>10}")


if __name__ == "__main__":
    main()
