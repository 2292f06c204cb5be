"""One CIFAR-10 training step in fp32 and in bf16 autocast, alternated in one process.

The step as dropstudy trains it (the tutorial CNN at batch 64, channels_last, fused Adam,
deterministic mode without filling uninitialised memory) on one fixed batch, so that data loading,
tracking and evaluation are out of the measurement; fp32 and bf16 alternate in short rounds so that
a change in the machine's load hits both alike. Prints images/s per round, the medians, their
ratio and the CPU's native bf16 flags; `scripts/bench.py --bf16` measures the same end to end.

    python scripts/bench_step.py                   # torch's default threads
    python scripts/bench_step.py --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from benchlib import cpu_bf16_flags, cpu_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # the checkout's dropstudy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each precision (default 3)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round (default 30)")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from dropstudy.engine.runtime import FastPaths, retain_freed_memory, set_deterministic
    from dropstudy.model.networks import CNN

    if args.threads:
        torch.set_num_threads(args.threads)
    set_deterministic(True)
    retain_freed_memory()  # as every dropstudy process does: no fresh pages for a step's temporaries
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        for name in rates:
            fast = FastPaths(cpu, channels_last=True, amp_dtype=torch.bfloat16 if name == "bf16" else None)
            torch.manual_seed(0)
            model = fast.prepare_model(CNN([32, 64, 128], 512, 10, [0.25, 0.25]))
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
            inputs = fast.inputs(x)

            def step() -> None:
                with fast.autocast():
                    loss = F.cross_entropy(model(inputs), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            for _ in range(3):  # warm-up: Adam's state, oneDNN's kernels
                step()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(64 * args.steps / (time.perf_counter() - start))
    medians = {name: statistics.median(v) for name, v in rates.items()}
    print(f"{cpu_name()}; native bf16: {', '.join(cpu_bf16_flags()) or 'none'}; {torch.get_num_threads()} thread(s)")
    for name, values in rates.items():
        print(f"{name}: {medians[name]:,.0f} images/s (rounds: {', '.join(f'{v:,.0f}' for v in values)})")
    print(f"bf16 / fp32: {medians['bf16'] / medians['fp32']:.2f}x")


if __name__ == "__main__":
    main()
