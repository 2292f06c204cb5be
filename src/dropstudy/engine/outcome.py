"""How a run ended (`Outcome`), which epochs get a metrics row, and the best values of a run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dropstudy.model.uncertainty import Predictions



@dataclass
class Outcome:
    status: str  # finished | diverged | interrupted
    epoch: int  # last completed epoch
    reason: str | None = None
    exit_code: int = 0  # 0, or 130/143 when interrupted by SIGINT/SIGTERM, 1 when diverged
    final: dict[str, float] = field(default_factory=dict)  # last value of every metric
    best: dict[str, float] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    test_mc: Predictions | None = None  # MC-dropout predictions on the test set, for figures


def logs_row(epoch: int, log_every: int, evaluated: bool, diverging: bool) -> bool:
    """Whether an epoch gets a metrics row (metrics.jsonl and W&B): every `trainer.log_every`-th
    epoch, every evaluation (the last epoch is one) and an epoch whose loss stopped being finite."""
    return evaluated or diverging or epoch % log_every == 0


class NonFiniteLoss(FloatingPointError):
    """trainer.on_nan=raise: a NaN/inf loss stops the run with an exception."""


# The metrics whose best value (and its epoch) the summary keeps: losses lowest, accuracies highest.
BEST = (("val/loss", min), ("val/acc", max), ("train/loss", min), ("train/acc", max), ("train_eval/loss", min),
        ("train_eval/acc", max), ("val_mc/loss", min), ("val_mc/acc", max))


# A gap has no better side of its own; its best is its value where the validation metric is best.
GAP_AT_BEST = {"gap/loss": "val/loss", "gap/acc": "val/acc"}


def conclude(outcome: Outcome) -> Outcome:
    """Fill in the outcome's final value of every metric and the best ones, from its rows. The
    best epochs are evaluation epochs, so their resolution is trainer.eval_every."""
    for row in outcome.rows:
        for key, value in row.items():
            if key != "epoch":
                outcome.final[key] = value
    for key, pick in BEST:
        points = [(row[key], row["epoch"]) for row in outcome.rows if key in row and math.isfinite(row[key])]
        if points:
            value, epoch = pick(points, key=lambda p: p[0])
            outcome.best[key] = value
            outcome.best[f"{key}_epoch"] = epoch
    for gap, val in GAP_AT_BEST.items():
        at = outcome.best.get(f"{val}_epoch")
        row = next((r for r in outcome.rows if r["epoch"] == at and gap in r), None)
        if row is not None:
            outcome.best[gap] = row[gap]
            outcome.best[f"{gap}_epoch"] = at
    return outcome
