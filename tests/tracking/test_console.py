"""What a run prints where there is no terminal (CI, SLURM logs, `make run | tee`)."""

import logging

from dropstudy.tracking.console import TrainingProgress


def test_a_run_without_a_terminal_prints_a_bounded_number_of_evaluation_lines(caplog):
    """A regression run evaluates 200 times; its log shows about 20 of them, evenly spread,
    always the last; rows that were not evaluated print nothing."""
    progress = TrainingProgress("run", total_steps=2000, epochs=2000, interactive=False)
    with caplog.at_level(logging.INFO, logger="dropstudy"), progress:
        for epoch in range(1, 2001):
            row = {"epoch": epoch, "train/loss": 1.0}
            evaluated = epoch % 10 == 0
            if evaluated:
                row["val/loss"] = 2.0
            progress.epoch_done(row, evaluated)
    epochs = [int(r.getMessage().split("epoch ")[1].split("/")[0]) for r in caplog.records]
    assert 15 <= len(epochs) <= 21, epochs
    assert epochs[-1] == 2000 and all(e % 10 == 0 for e in epochs)
    gaps = {b - a for a, b in zip(epochs, epochs[1:])}
    assert max(gaps) <= 110, epochs


def test_a_short_run_prints_every_evaluation(caplog):
    progress = TrainingProgress("run", total_steps=5, epochs=5, interactive=False)
    with caplog.at_level(logging.INFO, logger="dropstudy"), progress:
        for epoch in range(1, 6):
            progress.epoch_done({"epoch": epoch, "train/loss": 1.0, "val/loss": 1.0}, True)
    assert len(caplog.records) == 5
