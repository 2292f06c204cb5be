"""Where a run executes and how it is seeded: device selection, seeds, deterministic algorithms."""

from __future__ import annotations

import os
import random
import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

from dropstudy.config import ConfigError


def select_device(requested: str) -> torch.device:
    """`auto` is CUDA if available, else MPS, else CPU; an explicit request must be satisfiable."""
    requested = str(requested)
    cuda_ok = torch.cuda.is_available()
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        if cuda_ok:
            return torch.device("cuda")
        if mps_ok:
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not cuda_ok:
            raise ConfigError(
                f"device={requested}: CUDA is not available on this machine "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). "
                "Use device=auto or device=cpu."
            )
        index = int(requested.split(":", 1)[1]) if ":" in requested else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"device={requested}: this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}.")
        return torch.device("cuda", index)
    if requested == "mps":
        if not mps_ok:
            raise ConfigError("device=mps: Apple's MPS backend is not available here. Use device=auto or device=cpu.")
        return torch.device("mps")
    raise ConfigError(f"device={requested!r}: use auto, cpu, cuda, cuda:N or mps.")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels where the device has them; a warning (not an error) where it does not."""
    if enabled:
        # cuBLAS needs a fixed workspace to be deterministic; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (what SLURM sends before it kills a job) during training."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as shells report them


@contextmanager
def signals_interrupt_training() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into `Interrupted` while training, so the loop can checkpoint
    and say so. Also undoes a SIG_IGN for SIGINT inherited from a non-interactive shell."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        # Restore only what is still ours: after an interruption the trainer installs an
        # exit-at-once handler for a second Ctrl-C, which must outlive the loop.
        for s, h in previous.items():
            if signal.getsignal(s) is handler:
                signal.signal(s, h)
