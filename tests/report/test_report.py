"""`dropstudy report DIR` on a real 2x2 sweep: its numbers against ones computed here from each
run's metrics.jsonl, its files and figures, the W&B report run, and what it skips or refuses."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import read_figure, read_jsonl
from typer.testing import CliRunner
from wandb_offline import load_run

from dropstudy.cli import app


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), prog_name="dropstudy")


def expected_rows(sweep_dir: Path) -> dict[float, dict[str, tuple[float, float]]]:
    """Per dropout rate: (mean, sample std) over seeds of the last logged value of each loss and
    of the lowest val/loss and its epoch, straight from metrics.jsonl."""
    per_rate: dict[float, dict[str, list[float]]] = {}
    for config_path in sweep_dir.glob("*/.hydra/config.yaml"):
        run = config_path.parent.parent
        rate = yaml.safe_load(config_path.read_text())["model"]["dropout"]
        rows = read_jsonl(run / "metrics.jsonl")
        values = per_rate.setdefault(float(rate), {})
        for key in ("train/loss", "train_eval/loss", "val/loss", "test/loss", "gap/loss"):
            values.setdefault(key, []).append([r[key] for r in rows if key in r][-1])
        best = min((r["val/loss"], r["epoch"]) for r in rows if "val/loss" in r)
        values.setdefault("val/loss_epoch", []).append(best[1])
        values.setdefault("val/loss_best", []).append(best[0])

    def mean_std(xs: list[float]) -> tuple[float, float]:
        mean = sum(xs) / len(xs)
        return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))

    return {rate: {k: mean_std(v) for k, v in values.items()} for rate, values in per_rate.items()}


def test_report_on_a_sweep_matches_numbers_computed_from_the_runs(regression_sweep, clean_env):
    sweep_dir, sweep = regression_sweep
    assert sweep.code == 0, sweep.output
    result = invoke("report", str(sweep_dir))
    assert result.exit_code == 0, result.output
    out = sweep_dir / "report"

    expected = expected_rows(sweep_dir)
    with (out / "report.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["experiment"], r["metric"], float(r["model.dropout"]), r["n"]) for r in rows[:2]] == [
        ("regression", "train/loss", 0.0, "2"), ("regression", "train/loss", 0.5, "2")]
    assert "seed" not in rows[0], "the seed is what a row averages over, not a setting"
    assert {(r["metric"], float(r["model.dropout"])) for r in rows} == {
        (m, p) for p, values in expected.items() for m in values}
    for row in rows:
        mean, std = expected[float(row["model.dropout"])][row["metric"]]
        assert float(row["mean"]) == pytest.approx(mean, rel=1e-9), row["metric"]
        assert float(row["std"]) == pytest.approx(std, rel=1e-9), row["metric"]

    table = (out / "report.md").read_text()
    mean, std = expected[0.5]["val/loss"]
    assert f"| val/loss | 0.5 | 2 | {mean:.3g} ± {std:.3g} |" in table
    assert f"{mean:.3g} ± {std:.3g}" in " ".join(result.output.split())
    for name in ("regression_vs_dropout", "regression_learning_curves", "regression_fit"):
        read_figure((out / name).with_suffix(".png"))
        for suffix in (".pdf", ".svg"):
            assert (out / name).with_suffix(suffix).stat().st_size > 10_000, name + suffix

    # The runs were tracked (offline): one report run in the sweep's group, tables and figures.
    wb = load_run(out)
    assert wb.job_type == "report" and wb.group == json.loads((sweep_dir / "sweep.json").read_text())["group"]
    assert {"report/regression_vs_dropout", "report/regression_learning_curves", "report/regression_fit"} <= wb.images()
    assert "report/regression" in wb.history_keys()


def test_report_skips_unfinished_runs_and_refuses_an_empty_directory(regression_sweep, clean_env, tmp_path):
    sweep_dir, _ = regression_sweep
    for job in ("0", "1"):
        shutil.copytree(sweep_dir / job, tmp_path / "runs" / job, ignore=shutil.ignore_patterns("wandb"))
    summary_path = tmp_path / "runs" / "1" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["status"] = "interrupted"
    summary_path.write_text(json.dumps(summary))
    summary_path = tmp_path / "runs" / "0" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["wandb"]["run_id"] = None  # as if untracked: no W&B report run
    summary_path.write_text(json.dumps(summary))

    result = invoke("report", "runs")
    assert result.exit_code == 0, result.output
    assert "skipped runs/1: interrupted, not finished" in result.output
    assert "Skipped (not finished): runs/1 (interrupted)" in (tmp_path / "runs" / "report" / "report.md").read_text()

    (tmp_path / "empty").mkdir()
    result = invoke("report", "empty")
    assert result.exit_code == 2 and "no finished runs" in result.output
    result = invoke("report", "missing")
    assert result.exit_code == 2 and "no such directory" in result.output
