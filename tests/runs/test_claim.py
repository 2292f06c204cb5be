"""The regression study's claim, as the classic demo shows it, over 10 seeds (slow: ~2 min).

Without dropout the MLP fits the noise (train MSE -> ~0); with p = 0.5 the mean test MSE over
the seeds is lower than without. Run with `make test-slow`.
"""

from __future__ import annotations

import json
import statistics

import pytest

SEEDS = range(10)


@pytest.mark.slow
def test_dropout_lowers_mean_test_error_over_seeds(dropstudy, tmp_path):
    fits: dict[str, list[dict]] = {"dropout-0": [], "dropout-0.5": []}
    for seed in SEEDS:
        result = dropstudy("study", f"seed={seed}", "tracker.mode=disabled", f"hydra.run.dir=s{seed}")
        assert result.code == 0, result.output
        for arm in fits:
            fits[arm].append(json.loads((tmp_path / f"s{seed}" / arm / "summary.json").read_text())["fit"])
    assert max(f["train_mse"] for f in fits["dropout-0"]) < 1e-3, "without dropout the net fits the noise"
    mean_test = {arm: statistics.mean(f["test_mse"] for f in fs) for arm, fs in fits.items()}
    assert mean_test["dropout-0.5"] < mean_test["dropout-0"], mean_test
