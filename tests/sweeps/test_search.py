"""`dropstudy sweep hydra/sweeper=optuna`: a small Optuna search whose trials are complete runs in
the sweep's W&B group, ranked by the objective each run's own metrics give, its best parameters
saved, `dropstudy report` on it; and the bad input it refuses before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import read_jsonl
from test_sweep import invoke
from wandb_offline import load_run

SEARCH = ["hydra/sweeper=optuna", "model.dropout=interval(0,0.8)", "hydra.sweeper.n_trials=4",
          "hydra.sweeper.sampler.seed=0", "trainer.epochs=30", "trainer.eval_every=10", "trainer.threads=1"]


def assert_ranked_search(sweep_dir: Path, stdout: str, n_trials: int) -> dict:
    """Every trial is a complete run with its own W&B run in the group; the table ranks the
    finished ones by the lowest val/loss in their metrics.jsonl (read here, not from the
    summary); best.json and Optuna's optimization_results.yaml name the first."""
    table = json.loads((sweep_dir / "sweep.json").read_text())
    assert table["search"]["objective"] == "val/loss" and table["search"]["direction"] == "minimize"
    assert sorted(j["num"] for j in table["jobs"]) == list(range(n_trials))
    lowest = {}
    for job in table["jobs"]:
        run = sweep_dir.parent / job["run_dir"]
        dropout = float(job["overrides"][0].removeprefix("model.dropout="))
        assert 0 <= dropout < 0.8
        wb = load_run(run)
        assert wb.group == table["group"] and wb.config["model.dropout"] == pytest.approx(dropout)
        if job["status"] == "finished":
            lowest[job["num"]] = min(r["val/loss"] for r in read_jsonl(run / "metrics.jsonl") if "val/loss" in r)
            assert job["objective"] == lowest[job["num"]]
        else:
            assert job["objective"] is None and job["rank"] is None
    assert lowest, "at least one trial finished"
    ranked = sorted(lowest, key=lambda num: lowest[num])
    assert [j["num"] for j in table["jobs"] if j["rank"]] == ranked
    assert [j["rank"] for j in table["jobs"] if j["rank"]] == list(range(1, len(ranked) + 1))
    # The printed table lists the trials in that order.
    printed = [int(line.split("│")[2]) for line in stdout.splitlines() if line.startswith("│")]
    assert printed[:len(ranked)] == ranked

    best = json.loads((sweep_dir / "best.json").read_text())
    optuna = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    best_job = next(j for j in table["jobs"] if j["num"] == ranked[0])
    assert best["trial"] == ranked[0] and best["value"] == optuna["best_value"] == lowest[ranked[0]]
    assert best["params"] == optuna["best_params"] == {"model.dropout": pytest.approx(
        float(best_job["overrides"][0].removeprefix("model.dropout=")))}
    return table


def test_an_optuna_search_ranks_its_trials_by_their_runs_objective(dropstudy, tmp_path):
    result = dropstudy("sweep", *SEARCH, "hydra.sweep.dir=sw")
    assert result.code == 0, result.output
    assert "Traceback" not in result.output
    assert_ranked_search(tmp_path / "sw", result.stdout, 4)
    assert "best: #" in result.stdout

    report = dropstudy("report", "sw")
    assert report.code == 0, report.output
    assert (tmp_path / "sw" / "report" / "report.csv").is_file()


def test_a_search_is_checked_before_anything_runs(clean_env, tmp_path):
    def refused(*args: str) -> str:
        result = invoke("sweep", *args, "hydra.sweep.dir=sw")
        assert result.exit_code == 2, result.output
        assert not (tmp_path / "sw").exists() and "Traceback" not in result.output
        return " ".join(result.output.split())

    # The interval's ends are checked as grid points: 1.5 is not a dropout probability.
    assert "model.dropout=1.49" in refused("hydra/sweeper=optuna", "model.dropout=interval(0.2,1.5)")
    assert "sweep.objective='val/f1'" in refused("hydra/sweeper=optuna", "model.dropout=interval(0,0.5)",
                                                 "sweep.objective=val/f1")
    assert "regression experiment logs no acc" in refused("hydra/sweeper=optuna", "model.dropout=interval(0,0.5)",
                                                          "sweep.objective=val/acc")
    assert "hydra.sweeper.direction=maximize" in refused("hydra/sweeper=optuna", "model.dropout=interval(0,0.5)",
                                                         "hydra.sweeper.direction=maximize")
    assert "nothing to search" in refused("hydra/sweeper=optuna", "model.dropout=0.5")
    assert "hydra.sweeper.n_trials=0" in refused("hydra/sweeper=optuna", "model.dropout=interval(0,0.5)",
                                                 "hydra.sweeper.n_trials=0")
    assert "choose basic (a grid) or optuna" in refused("hydra/sweeper=nevergrad", "model.dropout=0,0.5")


def test_the_objective_sets_the_direction_optuna_is_told(clean_env):
    from dropstudy.sweeps.search import plan_sweep

    cifar = ["experiment=cifar10", "data.synthetic=true", "hydra/sweeper=optuna", "model.dropout=interval(0,0.5)"]
    for objective, direction in (("val/acc", "maximize"), ("val/loss", "minimize"), ("test/acc", "maximize")):
        plan = plan_sweep([*cifar, f"sweep.objective={objective}"], new=False)
        assert plan.master.hydra.sweeper.direction == direction and plan.search.direction == direction


@pytest.mark.slow
def test_an_optuna_search_on_joblib_runs_its_trials_in_parallel(dropstudy, tmp_path):
    result = dropstudy("sweep", *SEARCH, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweep.dir=sw",
                       timeout=600)
    assert result.code == 0, result.output
    assert_ranked_search(tmp_path / "sw", result.stdout, 4)
