"""The one lifecycle of every training run, and of every member of a batch.

`Engine` drives the backend (backend.py) epoch by epoch: dropout schedule, one training pass,
evaluation every `trainer.eval_every` epochs (validation, and the training data in eval mode for
the gap, `gap_metrics`), histograms every `tracker.log_freq` steps, a metrics row every `trainer.log_every` (to
metrics.jsonl first, then the tracker, the row's index as its W&B step), checkpoints every
`trainer.checkpoint_every`, a member whose loss stops being finite set aside (the others go on),
SIGINT/SIGTERM answered with every member's checkpoint at its last epoch boundary, and the test
row at the end. It knows nothing of W&B beyond the `Tracker` interface.

At every epoch boundary it keeps an in-memory copy of every member's training state. A
checkpoint always holds such a boundary state, never a half-done epoch, so a run (or a whole
batch) resumed from it continues exactly as if it had not stopped.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from dropstudy.engine.backend import Backend
from dropstudy.engine.outcome import NonFiniteLoss, Outcome, conclude, logs_row
from dropstudy.engine.runtime import Interrupted, InterruptGate, signals_interrupt_training
from dropstudy.store.rundir import RunDir
from dropstudy.tracking.console import TrainingProgress
from dropstudy.tracking.tracker import Tracker

# A run with fewer evaluations than this says so when it starts: its best epoch is coarse.
MIN_EVALUATIONS = 10
# Epochs shorter than this hold a training signal until their end (see runtime.InterruptGate).
DEFER_SIGNALS_BELOW_S = 0.25

log = logging.getLogger("dropstudy")


@dataclass
class MemberRun:
    """What the engine keeps of one member: where its rows and checkpoints go, and how it is doing."""

    rd: RunDir
    tracker: Tracker
    config: dict[str, Any]  # the resolved config, saved in every checkpoint
    n_train: int  # training examples, for perf/samples_per_s
    lr: float  # constant: there is no learning-rate schedule in these studies
    outcome: Outcome = field(default_factory=lambda: Outcome(status="finished", epoch=0))
    active: bool = True  # still trained on record (not diverged, not interrupted)
    write_error: OSError | None = None  # its checkpoint's write failed (a full disk): what stopped it

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.outcome.rows


class Engine:
    """Trains `backend`'s members, member i into `runs[i]`; `run` returns how each ended.

    `histograms` is tracker.watch: which of each member's gradient/parameter histograms go to
    its tracker (`log_histograms`, computed on the device in one pass), at the end of every epoch
    in which a multiple of `log_freq` optimizer steps (tracker.log_freq; None: once per
    evaluation) was reached, joined to that epoch's row; "none" logs none."""

    def __init__(self, backend: Backend, runs: list[MemberRun], trainer_cfg: Any, *, label: str,
                 histograms: str = "none", log_freq: int | None = None):
        assert len(runs) == backend.members
        self.backend, self.runs, self.cfg, self.label = backend, runs, trainer_cfg, label
        self.histograms = histograms
        # The cadences as plain ints, read every epoch (a config lookup costs microseconds each).
        self.epochs, self.eval_every = int(trainer_cfg.epochs), int(trainer_cfg.eval_every)
        self.log_every = int(trainer_cfg.log_every)
        self.checkpoint_every = int(trainer_cfg.checkpoint_every or trainer_cfg.eval_every)
        self.log_freq = log_freq or backend.steps_per_epoch * self.eval_every
        # Seconds spent in each part of run(), for summary.json: where the time goes; bookkeeping
        # is the loop's time outside the timed parts (each epoch's rows, state snapshot, progress).
        self.timings = {"train": 0.0, "eval": 0.0, "log": 0.0, "checkpoint": 0.0, "bookkeeping": 0.0}
        self.start_epoch = 1
        self._mark_boundary(0)
        self.gate = InterruptGate()  # run() installs the real one
        self.current_epoch = 0
        self._last_epoch_s = math.inf
        # Member i's last complete checkpoint's epoch: what a resume continues from.
        self.checkpointed: dict[int, int] = {}

    # -- state ------------------------------------------------------------------------------
    def _mark_boundary(self, epoch: int) -> None:
        self.boundary = self.backend.snapshot()
        self.boundary_epoch = epoch

    def resume(self, states: list[dict[str, Any] | None]) -> None:
        """Continue from checkpoints, one per member, all of one epoch boundary: each member's
        rows up to that epoch (later ones, written after the checkpoint, are dropped from
        metrics.jsonl too), then its state. A member given None stopped before (diverged) and
        stays out of the record; it still trains along, so the others draw what they drew."""
        epochs = {s["epoch"] for s in states if s is not None}
        assert len(epochs) == 1, f"checkpoints of different epochs: {sorted(epochs)}"
        epoch = epochs.pop()
        for i, (run, state) in enumerate(zip(self.runs, states)):
            if state is None:
                run.active = False
                continue
            self.backend.load_member_state(i, state)
            if "batch" in state:
                self.backend.load_shared_state(state["batch"]["shared"])
            run.outcome.rows[:] = [r for r in run.rd.read_metrics()
                                   if r["epoch"] <= epoch and not any(k.startswith("test/") for k in r)]
            run.rd.rewrite_metrics(run.rows)
            run.outcome.epoch = epoch
            self.checkpointed[i] = epoch
        self.start_epoch = epoch + 1
        self._mark_boundary(epoch)

    def checkpoint(self, i: int) -> None:
        """Write member i's last epoch-boundary state to its checkpoints/last.pt. A failed write
        (disk full) leaves the previous checkpoint as it was and ends the run as failed: training
        on without checkpoints would make an interruption cost the whole run."""
        start = time.perf_counter()
        run = self.runs[i]
        state = {"epoch": self.boundary_epoch, **self.boundary.member_state(i), "tracker_run_id": run.tracker.run_id,
                 "config": run.config}
        shared = self.boundary.shared_state()
        if shared:
            # What the members share (vmap's mask stream) travels with every member, so any
            # one checkpoint of the batch is enough to continue it exactly.
            state["batch"] = {"index": i, "members": self.backend.members, "shared": shared}
        run.rd.save_checkpoint(state)
        self.checkpointed[i] = self.boundary_epoch
        self.timings["checkpoint"] += time.perf_counter() - start

    def checkpoint_all(self) -> None:
        """Every active member's checkpoint. A failed write (disk full) stops them all, but each
        member's write is tried, so that each records the failure of its own file."""
        for i, run in enumerate(self.runs):
            if run.active:
                try:
                    self.checkpoint(i)
                except OSError as exc:
                    run.write_error = exc
        failed = [run.write_error for run in self.runs if run.write_error is not None]
        if failed:
            raise failed[0]

    def log(self, run: MemberRun, row: dict[str, Any]) -> None:
        """The one place a metric row goes: metrics.jsonl first, then the tracker. The row's
        index is its W&B step, so a resumed run continues the same step sequence."""
        start = time.perf_counter()
        step = len(run.rows)
        run.rows.append(row)
        run.rd.append_metrics(row)
        run.tracker.log(row, step=step)
        self.timings["log"] += time.perf_counter() - start

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> list[Outcome]:
        started = time.perf_counter()
        try:
            return self._run()
        finally:
            timed = sum(v for k, v in self.timings.items() if k != "bookkeeping")
            self.timings["bookkeeping"] = max(0.0, time.perf_counter() - started - timed)

    def cadence_note(self) -> str | None:
        """One line when this run's settings resolve its curves poorly: fewer than
        MIN_EVALUATIONS evaluations (so the best epoch is coarse), or histograms asked for
        (tracker.watch) that the cadence never reaches; None when neither."""
        steps = self.backend.steps_per_epoch
        evaluations = -(-self.epochs // self.eval_every)  # the last epoch is always evaluated
        histograms = (self.epochs * steps) // self.log_freq
        problems = []
        if evaluations < MIN_EVALUATIONS:
            problems.append(f"only {evaluations} evaluation{'s' * (evaluations != 1)} "
                            f"(trainer.eval_every={self.eval_every}; the best epoch is one of them)")
        if self.histograms != "none" and histograms == 0:
            problems.append(f"no weight/gradient histogram (tracker.log_freq={self.log_freq} optimizer steps; "
                            f"the run takes {self.epochs * steps})")
        if not problems:
            return None
        return f"[{self.label}] trainer.epochs={self.epochs} gives " + " and ".join(problems) + "."

    def _run(self) -> list[Outcome]:
        epochs, steps = self.epochs, self.backend.steps_per_epoch
        note = self.cadence_note()
        if note:
            log.warning(note)
        with signals_interrupt_training() as self.gate, TrainingProgress(self.label, epochs * steps, epochs) as progress:
            progress.advance((self.start_epoch - 1) * steps)
            try:
                for epoch in range(self.start_epoch, epochs + 1):
                    self.epoch(epoch, progress)
                    if not any(run.active for run in self.runs):
                        break
                self.gate.defer = False
                self.gate.raise_pending()  # one that came with the last epoch
            except KeyboardInterrupt as exc:
                self.interrupted(exc)
                return [conclude(run.outcome) for run in self.runs]
        self.test()
        return [conclude(run.outcome) for run in self.runs]

    def epoch(self, epoch: int, progress: TrainingProgress) -> None:
        backend, epochs = self.backend, self.epochs
        begun = time.perf_counter()
        self.current_epoch = epoch
        # Short epochs (the full-batch regression's are well under a millisecond) hold a signal
        # until their end instead of copying the state at every boundary in case one lands.
        defer = self._last_epoch_s < DEFER_SIGNALS_BELOW_S
        if self.gate.defer and not defer:
            # The epochs that deferred marked no boundary: the one before this epoch is marked now,
            # so that a signal raised at once during it checkpoints that epoch, not an older one.
            self._mark_boundary(epoch - 1)
        self.gate.defer = defer
        rates = backend.set_epoch(epoch)  # the p this epoch trains with
        start = time.perf_counter()
        train = backend.train_epoch(progress)
        seconds = time.perf_counter() - start
        self.timings["train"] += seconds
        evaluated = epoch % self.eval_every == 0 or epoch == epochs
        if evaluated:
            start = time.perf_counter()
            val = backend.evaluate("val")
            train_eval = backend.evaluate("train_eval")
            self.timings["eval"] += time.perf_counter() - start
            norms = backend.weight_norms()
        steps = backend.steps_per_epoch
        histograms = self.histograms != "none" and (epoch * steps) // self.log_freq > ((epoch - 1) * steps) // self.log_freq
        shown = []
        for i, run in enumerate(self.runs):
            if not run.active:
                continue
            row: dict[str, Any] = {"epoch": epoch, **train[i], "lr": run.lr,
                                   "perf/samples_per_s": run.n_train / seconds, **rates[i]}
            if evaluated:
                row.update(val[i])
                row.update(train_eval[i])
                row.update(gap_metrics(row))
                row.update(norms[i])
            bad = [k for k in ("train/loss", "val/loss") if k in row and not math.isfinite(row[k])]
            if histograms:  # joined to the row this epoch logs (or the next one logged)
                run.tracker.log_histograms(self.histogram_tensors(i), len(run.rows))
            if logs_row(epoch, self.log_every, evaluated, diverging=bool(bad)):
                self.log(run, row)
            shown.append(row)
            if bad:
                self.diverged(i, epoch, bad[0], row[bad[0]])
                continue
            run.outcome.epoch = epoch
        if shown:
            progress.epoch_done(shown[0] if len(self.runs) == 1 else mean_row(shown, epoch), evaluated)
        if any(run.active for run in self.runs):
            due = epoch % self.checkpoint_every == 0 or epoch == epochs
            if due or not self.gate.defer or self.gate.pending is not None:
                self._mark_boundary(epoch)
            if due:
                self.checkpoint_all()
        self._last_epoch_s = time.perf_counter() - begun
        self.gate.raise_pending()

    def histogram_tensors(self, i: int) -> dict[str, Any]:
        """Member i's `gradients/*` and/or `parameters/*`, as tracker.watch names them."""
        wanted = {"all": ("gradients/", "parameters/"), "gradients": ("gradients/",),
                  "parameters": ("parameters/",)}[self.histograms]
        return {k: v for k, v in self.backend.histogram_tensors(i).items() if k.startswith(wanted)}

    def diverged(self, i: int, epoch: int, metric: str, value: float) -> None:
        """Set member i aside: status diverged, and its checkpoint is the last good state kept,
        from before the bad epoch (the one before it, or while signals are deferred the last
        checkpoint's; the checkpoint says which). trainer.on_nan=raise stops everything with an exception."""
        run = self.runs[i]
        run.active = False
        outcome = run.outcome
        outcome.status, outcome.exit_code = "diverged", 1
        outcome.reason = f"{metric} became {value} at epoch {epoch}"
        outcome.epoch = epoch
        run.tracker.set_summary({"diverged/epoch": epoch, "diverged/metric": metric})
        self.checkpoint(i)
        if self.cfg.on_nan == "raise":
            raise NonFiniteLoss(outcome.reason)

    def interrupted(self, exc: KeyboardInterrupt) -> None:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        # A second Ctrl-C from here on exits at once; last.pt is only ever replaced by a rename,
        # so it stays the last complete checkpoint whatever happens.
        # Every interrupted member is marked before the second signal can come, so that one that
        # comes at once still finds each of them to record as interrupted (_exit_now).
        interrupted = [i for i, run in enumerate(self.runs) if run.active]
        for i in interrupted:
            run = self.runs[i]
            outcome = run.outcome
            outcome.status, outcome.exit_code = "interrupted", 128 + int(signum)
            outcome.epoch = self.boundary_epoch  # what the checkpoint holds
            # A signal held to the end of a short epoch leaves that epoch in the checkpoint.
            during = max(self.current_epoch, outcome.epoch)
            outcome.reason = f"{signal.Signals(signum).name} during epoch {during} of {self.epochs}"
            run.active = False
        signal.signal(signal.SIGINT, self._exit_now)
        signal.signal(signal.SIGTERM, self._exit_now)
        name = signal.Signals(signum).name
        log.info(f"{name}: writing the last checkpoint; {name} again exits at once (the run stays resumable)")
        for i in interrupted:
            self.checkpoint(i)
            # Said at once, not only when the run concludes (figures take seconds): a launcher that
            # ends this process meanwhile (joblib aborting on another job's interrupt) leaves no
            # `running` behind.
            self._say_interrupted(i, self.runs[i].outcome.reason)

    def _exit_now(self, signum: int, frame: Any) -> None:
        """The second signal: exit at once, but not before each interrupted member's summary.json,
        if it still says running, says interrupted and from which epoch its checkpoint continues
        (a small write each; the checkpoint and the figures are what take long)."""
        name = signal.Signals(signum).name
        os.write(2, f"\n{name} again: exiting now\n".encode())
        for i, run in enumerate(self.runs):
            if run.outcome.status == "interrupted":
                self._say_interrupted(i, f"{run.outcome.reason}; {name} again: exited at once")
        os._exit(128 + signum)

    def _say_interrupted(self, i: int, reason: str | None) -> None:
        """Member i's summary.json, if it still says running, says interrupted and from which epoch
        its checkpoint continues (a small write; the conclusion rewrites it whole)."""
        run = self.runs[i]
        try:
            summary = run.rd.read_summary()
            if summary.get("status") == "running":
                run.rd.write_summary({**summary, "status": "interrupted", "epoch": self.checkpointed.get(i, 0),
                                      "reason": reason})
        except (OSError, ValueError):
            pass  # nothing more can be recorded; the checkpoint is still whole

    def test(self) -> None:
        """The final row of every member that finished: the test split, in evaluation mode."""
        if not any(run.active for run in self.runs):
            return
        start = time.perf_counter()
        test = self.backend.evaluate("test")
        self.timings["eval"] += time.perf_counter() - start
        mc = getattr(self.backend, "mc_predictions", {}).get("test")
        for i, run in enumerate(self.runs):
            if run.active:
                self.log(run, {"epoch": run.outcome.epoch, **test[i]})
                if mc is not None:
                    run.outcome.test_mc = mc[i]


def gap_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The generalisation gap of an evaluated row: gap/loss = val/loss − train_eval/loss and
    gap/acc = val/acc − train_eval/acc, both sides in eval mode (dropout off), so a dropout arm's
    gap is not inflated by the training-mode loss its masks cause. Overfitting shows as a positive
    loss gap and a negative accuracy gap."""
    gap = {"gap/loss": row["val/loss"] - row["train_eval/loss"]}
    if "val/acc" in row:
        gap["gap/acc"] = row["val/acc"] - row["train_eval/acc"]
    return gap


def mean_row(rows: list[dict[str, Any]], epoch: int) -> dict[str, Any]:
    """The members' mean losses (and accuracies), for the progress line."""
    out: dict[str, Any] = {"epoch": epoch}
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = sum(values) / len(values)
    return out
