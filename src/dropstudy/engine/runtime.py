"""Where a run executes and how: device selection, seeds, deterministic algorithms, CPU threads,
and the speed switches of `trainer.*` (`FastPaths`)."""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator

import numpy as np
import torch
from torch import nn

from dropstudy.config.checks import ConfigError


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


def set_deterministic(enabled: bool, compiled: bool = False) -> None:
    """Deterministic kernels where the device has them; a warning (not an error) where it does not."""
    if enabled:
        # cuBLAS needs a fixed workspace to be deterministic; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    use_deterministic_algorithms(enabled, compiled)
    # Deterministic mode also fills every uninitialised tensor with NaN (dozens of extra fill_ a
    # training step); nothing here reads memory before writing it, so results are the same without.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def use_deterministic_algorithms(enabled: bool, compiled: bool) -> None:
    """`torch.use_deterministic_algorithms(enabled, warn_only=True)`, without importing the
    inductor compiler unless this process compiles. The public call imports
    `torch._inductor.config` only to pass the flag on to it: 1.5 s of every process's start on a
    2-core CPU. Without trainer.compile (and with inductor not loaded) the flag itself is all
    there is to set; where torch lacks the private setter, the public call does it all."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if compiled or setter is None or "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(enabled, warn_only=True)
    else:
        setter(enabled, warn_only=True)


# torch's own choice (one per physical core, or OMP_NUM_THREADS), read before anything changes it.
TORCH_DEFAULT_THREADS = torch.get_num_threads()


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (which SLURM and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def set_threads(requested: int | None) -> int:
    """torch's intra-op CPU threads: `requested`, or (null) the CPUs this process may use (its
    affinity mask, which SLURM and taskset narrow) capped at torch's own default of one per
    physical core: hyperthreads only slow these small convolutions down, and more threads than
    allowed CPUs thrash."""
    if requested is None:
        requested = max(1, min(usable_cpus(), TORCH_DEFAULT_THREADS))
    if torch.get_num_threads() != requested:
        torch.set_num_threads(requested)
    return requested


# glibc's malloc tunables (mallopt's parameter numbers) and the environment variables that set
# them at start; a user who sets any of these keeps glibc's behaviour as they asked for it.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
# Blocks up to this size come from the heap and stay there once freed: a CIFAR-10 training
# step's activations and an evaluation batch's, whatever trainer.eval_batch_size; the heap is not
# trimmed below its peak.
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1


def retain_freed_memory() -> bool:
    """Keep the memory training frees for the next step instead of handing it back to the
    kernel. With glibc's defaults every CPU training step of the CNN maps its large temporaries
    afresh and unmaps them when freed: about 5,000 page faults a step at batch 64 in fp32, a
    third of the step's time spent in the kernel (tests/engine/test_step_cost.py counts them). Raising
    the mmap and trim thresholds makes freed blocks reusable, with the same peak memory.
    Linux with glibc only; a no-op elsewhere, or where the environment sets malloc's tunables."""
    if any(name in os.environ for name in MALLOC_ENV):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt  # glibc's; musl and macOS have none
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def set_up_process(cfg: Any) -> torch.device:
    """The process-wide settings a run asks for, for a single run and a batched sweep
    alike: its device, torch's CPU threads (trainer.threads), deterministic algorithms, and
    freed memory kept for reuse (`retain_freed_memory`)."""
    retain_freed_memory()
    device = select_device(cfg.device)
    set_threads(cfg.trainer.threads)
    set_deterministic(cfg.deterministic, compiled=bool(cfg.trainer.get("compile", False)))
    return device


@dataclass(frozen=True)
class FastPaths:
    """The speed switches of `trainer.*`, resolved for one device; the trainer asks it how to lay
    out the model and its inputs and what to run the forward pass under.

    None of them changes what is computed beyond float rounding (the tests bound the difference),
    so every one can be turned off to rule it out. cudnn.benchmark is not here: it picks kernels by
    timing them, which is nondeterministic, so `set_deterministic` owns it (on only when
    deterministic=false).
    """

    device: torch.device
    channels_last: bool = False
    amp_dtype: torch.dtype | None = None
    compile: bool = False

    @classmethod
    def resolve(cls, trainer_cfg: Any, device: torch.device) -> "FastPaths":
        amp = str(trainer_cfg.amp)
        dtype = None
        if amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16
        elif amp == "bf16":
            if not torch.amp.is_autocast_available(device.type):
                raise ConfigError(f"trainer.amp=bf16: torch has no autocast for {device.type} devices; use auto or off.")
            dtype = torch.bfloat16
        return cls(device, bool(trainer_cfg.channels_last), dtype, bool(trainer_cfg.compile))

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model in the memory format the switches ask for (in place; a no-op for models
        without 4-D weights, such as the MLP)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def forward(self, model: nn.Module) -> nn.Module:
        """What the trainer calls: the model itself, or with trainer.compile its compiled wrapper,
        which shares the parameters (state_dict and checkpoints keep using the plain model)."""
        return torch.compile(model) if self.compile else model

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self, reuse_casts: bool = False) -> ContextManager[Any]:
        """bf16 autocast around forward and loss (no GradScaler: bf16 has float32's range).

        Autocast can keep each weight's bf16 copy until its block exits. A training step uses each
        weight once and then changes it, so there the cache only costs lookups (and kept across
        steps it would hand out stale weights); an evaluation (`reuse_casts`) runs every batch in
        one block with fixed weights, so each weight is cast once per evaluation, not per batch."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=reuse_casts)

    def describe(self) -> str:
        parts = [
            "channels_last" if self.channels_last else "contiguous",
            "bf16 autocast" if self.amp_dtype is not None else "fp32",
        ]
        if self.compile:
            parts.append("torch.compile")
        if self.device.type == "cuda":
            parts.append("cudnn.benchmark" if torch.backends.cudnn.benchmark else "cudnn deterministic")
        return ", ".join(parts)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM (what SLURM sends before it kills a job) or SIGUSR2 (what SLURM sends
    `--signal=USR2@N` seconds before a job's time limit, as submitit asks it to) during training."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, 140 for SIGUSR2, as shells report them

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        # Rebuilt from the signal's number when a worker process (joblib's loky) sends it back.
        return Interrupted, (self.signum,)


class InterruptGate:
    """Where a training signal goes: raised at once as `Interrupted`, or, while `defer` is on,
    held in `pending` until the loop reaches its next epoch boundary and raises it there. The loop
    defers only while its epochs are short, so the wait is imperceptible, and then it need not
    copy the training state at every boundary in case a signal lands mid-epoch. A second signal
    while one is held is raised at once."""

    def __init__(self) -> None:
        self.defer = False
        self.pending: int | None = None

    def raise_pending(self) -> None:
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise Interrupted(signum)


@contextmanager
def signals_interrupt_training() -> Iterator[InterruptGate]:
    """Turn SIGINT, SIGTERM and SIGUSR2 into `Interrupted` while training (through the gate it
    yields), so the loop can checkpoint and say so. Also undoes a SIG_IGN for SIGINT inherited
    from a non-interactive shell."""
    gate = InterruptGate()
    if threading.current_thread() is not threading.main_thread():
        yield gate
        return

    def handler(signum: int, frame: Any) -> None:
        if gate.defer and gate.pending is None:
            gate.pending = signum
            return
        raise Interrupted(signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield gate
    finally:
        # Restore only what is still ours: after an interruption the trainer installs an
        # exit-at-once handler for a second Ctrl-C, which must outlive the loop.
        for s, h in previous.items():
            if signal.getsignal(s) is handler:
                signal.signal(s, h)
