"""`dropstudy sweep`: Hydra multiruns on the basic, joblib and submitit_local launchers (complete
run dirs, one W&B run each in the sweep's group), failing jobs, bad grid points, Ctrl-C, and the
W&B sweep YAML run the way an agent runs it."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SWEEP_GRID, Child, read_figure, read_jsonl
from typer.testing import CliRunner
from wandb_offline import load_run

from dropstudy.cli import app

RUN_FILES = (".hydra/config.yaml", ".hydra/overrides.yaml", "provenance.json", "metrics.jsonl", "summary.json",
             "checkpoints/last.pt", "plots/learning_curves.png", "plots/regression_fit.png")


def assert_complete_sweep(sweep_dir: Path, expected: dict[str, tuple[float, int]]) -> None:
    """Every job's run dir is complete, its config has the job's values, and its W&B offline
    run is in the sweep's group with job_type per dropout rate and the `sweep` tag."""
    table = json.loads((sweep_dir / "sweep.json").read_text())
    assert table["failed"] == [] and not table["interrupted"]
    assert (sweep_dir / "multirun.yaml").is_file()
    group = table["group"]
    assert group == f"regression-{sweep_dir.name}"
    seen = {}
    for job in table["jobs"]:
        run = Path(job["run_dir"])
        run = run if run.is_absolute() else sweep_dir.parent / run
        for name in RUN_FILES:
            assert (run / name).is_file(), (run, name)
            if name.endswith(".png"):
                read_figure(run / name)
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        summary = json.loads((run / "summary.json").read_text())
        assert job["status"] == summary["status"] == "finished"
        assert job["final"]["val/loss"] == summary["final"]["val/loss"]
        assert summary["wandb"]["group"] == group
        wb = load_run(run)
        assert wb.group == group and wb.job_type == f"dropout-{config['model']['dropout']:g}"
        assert "sweep" in wb.tags and wb.exit_code == 0, "the W&B run finished, and cleanly"
        assert wb.config["model.dropout"] == config["model"]["dropout"] and wb.config["seed"] == config["seed"]
        assert wb.scalars("val/loss")[-1] == [r["val/loss"] for r in read_jsonl(run / "metrics.jsonl")
                                               if "val/loss" in r][-1]
        seen[" ".join(job["overrides"][:2])] = (config["model"]["dropout"], config["seed"])
    assert seen == expected


GRID_2x2 = {f"model.dropout={p} seed={s}": (float(p), s) for p, s in itertools.product(("0", "0.5"), (0, 1))}


def test_basic_launcher_sweep_writes_one_complete_run_per_grid_point(regression_sweep):
    sweep_dir, result = regression_sweep
    assert result.code == 0, result.output
    assert_complete_sweep(sweep_dir, GRID_2x2)
    # The final table: every job with its overrides and status.
    for overrides in GRID_2x2:
        assert overrides in result.stdout
    assert result.stdout.count("finished") == 4 and "sweep.json" in result.stdout


def invoke(*args: str):
    """The CLI in this process (cheap checks; the launchers' tests run it as a subprocess)."""
    return CliRunner().invoke(app, list(args), prog_name="dropstudy")


def test_a_failing_job_does_not_stop_the_others_and_the_exit_code_says_which(clean_env, tmp_path):
    # lr=1e9 blows the loss up at once; on_nan=raise turns that into an exception in the job.
    result = invoke("sweep", "optim.lr=1e9,0.01", "trainer.on_nan=raise", "trainer.epochs=3",
                    "trainer.eval_every=3", "tracker.mode=disabled", "sweep.vectorize=false", "hydra.sweep.dir=sw")
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())
    assert "1 of 2 sweep jobs did not finish: #0 (optim.lr=1000000000.0) diverged" in output
    assert "│ 0 │ optim.lr=1000000000.0 │ diverged" in output and "│ 1 │ optim.lr=0.01 │ finished" in output
    table = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [j["status"] for j in table["jobs"]] == ["diverged", "finished"] and table["failed"] == [0]
    assert "NonFiniteLoss" in table["jobs"][0]["reason"]
    assert json.loads((tmp_path / "sw" / "1" / "summary.json").read_text())["epoch"] == 3


def test_every_grid_point_is_checked_before_anything_runs(clean_env, tmp_path):
    result = invoke("sweep", "model.dropout=0,0.5,1.5", "seed=0,1", "hydra.sweep.dir=sw")
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "sweep job 4 (model.dropout=1.5 seed=0): model.dropout=1.5" in output and "[0, 1)" in output
    assert not (tmp_path / "sw").exists()

    result = invoke("sweep", "model.dropot=0,0.5")
    assert result.exit_code == 2 and "model.dropot" in result.output and "valid keys" in result.output
    result = invoke("sweep", "hydra/launcher=nope", "seed=0,1")
    assert result.exit_code == 2 and "basic, joblib, submitit_local, submitit_slurm" in " ".join(result.output.split())


@pytest.mark.parametrize("plugin, args, package", [
    ("hydra_plugins.hydra_joblib", ("hydra/launcher=joblib", "seed=0,1"), "hydra-joblib-launcher"),
    ("hydra_plugins.hydra_optuna", ("hydra/sweeper=optuna", "model.dropout=interval(0,0.5)"), "hydra-optuna-sweeper"),
], ids=["launcher", "sweeper"])
def test_a_launcher_or_sweeper_whose_plugin_is_missing_says_what_to_install(clean_env, monkeypatch, plugin, args,
                                                                            package):
    from dropstudy.sweeps import plan as sweep

    real = sweep.importlib.util.find_spec
    monkeypatch.setattr(sweep.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith(plugin) else real(name, *a))
    result = invoke("sweep", *args)
    assert result.exit_code == 2
    assert package in result.output and "pip install 'dropstudy[cluster]'" in " ".join(result.output.split())


# conf/hydra/launcher/slurm.yaml's defaults, as submitit_slurm's keys.
SLURM_DEFAULTS = {"partition": None, "timeout_min": 60, "gpus_per_node": 1, "cpus_per_task": 4, "mem_gb": 16,
                  "array_parallelism": 32, "signal_delay_s": 120, "max_num_timeout": 3}


def test_dry_run_lists_jobs_and_the_slurm_launcher_config(clean_env, tmp_path):
    from dropstudy.sweeps.search import plan_sweep

    args = ["model.dropout=0,0.5", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
            "hydra.launcher.mem_gb=64", "hydra.sweep.dir=sw"]
    result = invoke("sweep", "--dry-run", *args)
    assert result.exit_code == 0, result.output
    assert "launcher: slurm" in result.output and "#1 model.dropout=0.5 -> sw/1" in result.output
    assert not (tmp_path / "sw").exists()
    # The launcher config the multirun hands Hydra: slurm.yaml's values, the overrides on top.
    launcher = plan_sweep(args).master.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert {k: launcher[k] for k in SLURM_DEFAULTS} == {**SLURM_DEFAULTS, "partition": "gpu", "mem_gb": 64}


def test_a_slurm_sweep_hands_submitit_the_launcher_config_and_its_jobs_run(clean_env, tmp_path, monkeypatch):
    """`dropstudy sweep hydra/launcher=slurm` for real, with SLURM itself replaced at submitit's
    door: the executor records what it is given and runs the job array here, as submitit's
    debug executor does."""
    import submitit

    seen = {}
    real_executor = submitit.AutoExecutor

    class RecordingSlurm:
        def __init__(self, cluster, folder, **params):
            seen.update(cluster=cluster, folder=str(folder), init=params)
            self.here = real_executor(cluster="debug", folder=folder)

        def update_parameters(self, **params):
            seen["params"] = params

        def map_array(self, fn, *args):
            seen["jobs"] = len(args[0])
            return self.here.map_array(fn, *args)

    monkeypatch.setattr(submitit, "AutoExecutor", RecordingSlurm)
    result = invoke("sweep", "model.dropout=0,0.5", "trainer.epochs=3", "trainer.eval_every=3", "tracker.mode=disabled",
                    "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30",
                    "hydra.launcher.gpus_per_node=0", "hydra.sweep.dir=sw")
    assert result.exit_code == 0, result.output
    assert seen["cluster"] == "slurm" and seen["jobs"] == 2 and seen["init"] == {"slurm_max_num_timeout": 3}
    assert seen["folder"] == str(Path("sw") / ".submitit" / "%j")
    expected = {"slurm_partition": "gpu", "timeout_min": 30, "gpus_per_node": 0, "cpus_per_task": 4, "mem_gb": 16,
                "slurm_array_parallelism": 32, "slurm_signal_delay_s": 120}
    assert {k: seen["params"].get(k) for k in expected} == expected
    table = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert table["launcher"] == "slurm" and [j["status"] for j in table["jobs"]] == ["finished", "finished"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_process_launchers_run_the_same_sweep(dropstudy, tmp_path, launcher):
    """Each job in its own process owns and finishes its W&B run (no loky/wandb crash)."""
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    result = dropstudy("sweep", *SWEEP_GRID, f"hydra/launcher={launcher}", *extra, "sweep.vectorize=false",
                       "hydra.sweep.dir=sw", timeout=600)
    assert result.code == 0, result.output
    assert "Traceback" not in result.output and "TerminatedWorkerError" not in result.output
    assert_complete_sweep(tmp_path / "sw", GRID_2x2)
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["launcher"] == launcher


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_with_a_table_and_exit_130(clean_env, tmp_path):
    metrics = tmp_path / "sw" / "0" / "metrics.jsonl"
    with Child(["sweep", "model.dropout=0,0.5", "trainer.epochs=100000", "tracker.mode=disabled",
                "sweep.vectorize=false", "hydra.sweep.dir=sw"], tmp_path, clean_env) as proc:
        proc.wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, "job 0's first metrics row")
        proc.send_signal(signal.SIGINT)
        result = proc.finish()
    out, err = result.stdout, result.stderr
    assert result.code == 130, out + err
    table = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert table["interrupted"] and [j["status"] for j in table["jobs"]] == ["interrupted", "not run"]
    assert "interrupted" in out and "not run" in out


def agent_args(parameters: dict) -> list[list[str]]:
    """What a W&B grid agent hands `${args_no_hyphens}` for each point (wandb's own code)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    swept = {k: v["values"] for k, v in parameters.items() if "values" in v}
    fixed = {k: v["value"] for k, v in parameters.items() if "value" in v}
    points = [dict(zip(swept, combo)) for combo in itertools.product(*swept.values())]
    return [create_sweep_command_args({"args": {k: {"value": v} for k, v in {**fixed, **p}.items()}})["args_no_hyphens"]
            for p in points]


@pytest.mark.slow
def test_wandb_sweep_yaml_runs_as_an_agent_would(dropstudy, clean_env, tmp_path):
    result = dropstudy("sweep", "--wandb", "model.dropout=0,0.5", "seed=range(3,5)", "trainer.epochs=3",
                       "trainer.eval_every=3", "tracker.mode=disabled", "hydra.sweep.dir=sw")
    assert result.code == 0, result.output
    path = tmp_path / "sw" / "wandb_sweep.yaml"
    assert f"wandb sweep {Path('sw') / 'wandb_sweep.yaml'}" in result.stdout
    assert "wandb agent ENTITY/dropstudy/SWEEP_ID" in result.stdout
    config = yaml.safe_load(path.read_text())
    assert config["method"] == "grid" and config["metric"] == {"name": "val/loss", "goal": "minimize"}
    assert config["parameters"]["model.dropout"] == {"values": [0, 0.5]}
    assert config["parameters"]["seed"] == {"values": [3, 4]}
    assert config["parameters"]["trainer.epochs"] == {"value": 3}
    assert config["command"] == ["${env}", "${interpreter}", "-m", "dropstudy", "train", "${args_no_hyphens}"]

    points = agent_args(config["parameters"])
    assert len(points) == 4
    for args in points:
        command = [sys.executable if c == "${interpreter}" else c for c in config["command"] if c != "${env}"]
        command = [part for c in command for part in (args if c == "${args_no_hyphens}" else [c])]
        before = set((tmp_path / "runs").glob("regression/*-train-*"))
        proc = subprocess.run(command, cwd=tmp_path, env=clean_env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (run_dir,) = set((tmp_path / "runs").glob("regression/*-train-*")) - before
        saved = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        values = dict(a.split("=", 1) for a in args)
        assert saved["model"]["dropout"] == float(values["model.dropout"]) and saved["seed"] == int(values["seed"])
        assert saved["trainer"]["epochs"] == 3


def test_wandb_sweep_rejects_what_an_agent_cannot_run(clean_env):
    result = invoke("sweep", "--wandb", "model.dropout=interval(0,0.5)")
    assert result.exit_code == 2 and "--method random or bayes" in " ".join(result.output.split())
    result = invoke("sweep", "--wandb", "--method", "bayes", "model.dropout=0,2")
    assert result.exit_code == 2 and "model.dropout=2" in result.output


def fake_batches(monkeypatch, reason):
    """Stand-ins for the batching rule and the orchestrator, recording calls: how the sweep hands a
    grid over, apart from what the batched training does (test_execute.py covers that)."""
    from dropstudy.store.rundir import RunDir
    from dropstudy.sweeps import plan
    from dropstudy.sweeps import run as sweep

    calls = []

    def train_members(members, batch):
        calls.append((members, batch.group, batch.extra_tags))
        for m in members:
            RunDir(m.run_dir).write_summary({"status": "finished", "final": {"val/loss": float(m.cfg.seed)}})
        return []

    monkeypatch.setattr(sweep, "train_members", train_members)
    monkeypatch.setattr(plan, "why_not", lambda cfgs: reason)
    return calls


def test_a_batchable_grid_goes_to_train_members_in_the_launchers_run_dirs(clean_env, tmp_path, monkeypatch):
    calls = fake_batches(monkeypatch, None)
    result = invoke("sweep", "model.dropout=0,0.5", "seed=0,1", "hydra.sweep.dir=sw")
    assert result.exit_code == 0, result.output
    ((members, group, tags),) = calls
    assert group == "regression-sw" and tags == ("sweep",)
    assert [str(m.run_dir) for m in members] == ["sw/0", "sw/1", "sw/2", "sw/3"]
    assert [m.overrides for m in members][1] == ["model.dropout=0", "seed=1"]
    assert [(m.cfg.model.dropout, m.cfg.seed) for m in members] == [(0, 0), (0, 1), (0.5, 0), (0.5, 1)]
    saved = yaml.safe_load((tmp_path / "sw" / "3" / ".hydra" / "overrides.yaml").read_text())
    assert saved == ["model.dropout=0.5", "seed=1"]
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["mode"] == "batched"


def test_a_grid_that_cannot_batch_falls_back_and_says_why(clean_env, monkeypatch):
    fake_batches(monkeypatch, "model.name=cnn: only MLPs are batched")
    result = invoke("sweep", "--dry-run", "model.dropout=0,0.5")
    assert result.exit_code == 0, result.output
    assert "sweep.vectorize: one job per member (model.name=cnn: only MLPs are batched)" in result.output
    assert "launcher: basic" in result.output
    result = invoke("sweep", "--dry-run", "model.dropout=0,0.5", "sweep.vectorize=false")
    assert "sweep.vectorize:" not in result.output


def test_a_real_batched_sweep_writes_a_finished_run_per_member(clean_env, tmp_path):
    """The real orchestrator behind `dropstudy sweep`: one batch, one complete run
    dir per grid point with the metrics of its own rate and seed."""
    result = invoke("sweep", "model.dropout=0,0.5", "seed=0,1", "trainer.epochs=20", "trainer.eval_every=10",
                    "tracker.mode=disabled", "hydra.sweep.dir=sw")
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert table["mode"] == "batched"
    for num, (rate, seed) in enumerate([(0, 0), (0, 1), (0.5, 0), (0.5, 1)]):
        run = tmp_path / "sw" / str(num)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["batch"] == {"members": 4, "index": num}
        assert (summary["dropout"], summary["seed"]) == (rate, seed)
        # Epochs 10 and 20 (the regression logs every 10th epoch and every evaluation), then the test row.
        assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [10, 20, 20]
        assert (run / "checkpoints" / "last.pt").is_file() and (run / "plots" / "regression_fit.png").is_file()
    finals = [json.loads((tmp_path / "sw" / str(n) / "summary.json").read_text())["final"]["train/loss"]
              for n in range(4)]
    assert len(set(finals)) == 4, "every member trained on its own seed and rate"


def test_a_grid_the_real_batching_rule_cannot_batch_falls_back(clean_env):
    result = invoke("sweep", "--dry-run", "experiment=cifar10", "data.synthetic=true", "model.dropout=0,0.25",
                    "optim.lr=0.1,0.01")
    assert result.exit_code == 0, result.output
    assert "sweep.vectorize: one job per member (members differ in optim.lr" in result.output
    assert "launcher: basic" in result.output
    # Seeds alone are batched, each member with its own data.seed's rows of the one copy of the data.
    result = invoke("sweep", "--dry-run", "experiment=cifar10", "data.synthetic=true", "model.dropout=0,0.25",
                    "seed=0,1")
    assert result.exit_code == 0 and "launcher: batched" in result.output, result.output


@pytest.mark.parametrize("grid, copied", [
    (["model.dropout=0,0.5", "seed=range(0,3)", "trainer.epochs=7", "tracker.mode=disabled"], 5),
    (["model.dropout=[0.1,0.2,0.3],[0.5,0.5,0.5]", "data.seed=1,2", "experiment=regression", "optim.lr=0.1,0.01"], 7),
    # A config group swept: the jobs with another optimizer are composed from scratch; only
    # job 1 (sgd, seed 1) differs from job 0 in a value alone.
    (["optim=sgd,adam", "seed=0,1"], 1),
], ids=["values", "lists-and-a-fixed-group", "group-swept"])
def test_planned_jobs_equal_what_composing_each_from_scratch_gives(clean_env, tmp_path, monkeypatch, grid, copied):
    """plan_sweep sets the values that differ on job 0's config instead of composing every grid
    point again; the jobs must be exactly those Hydra's own per-job composition gives."""
    from omegaconf import OmegaConf

    from dropstudy.sweeps import plan as sweep

    args = [*grid, f"hydra.sweep.dir={tmp_path / 'sw'}"]
    calls = {"n": 0}
    real = sweep.value_changes

    def counted(*a):
        changed = real(*a)
        calls["n"] += changed is not None
        return changed

    monkeypatch.setattr(sweep, "value_changes", counted)
    fast = sweep.plan_grid(args)
    monkeypatch.setattr(sweep, "jobs_differ_in_values_only", lambda *a: False)
    slow = sweep.plan_grid(args)
    assert calls["n"] == copied
    assert len(fast.jobs) == len(slow.jobs) > 1
    for ours, theirs in zip(fast.jobs, slow.jobs):
        assert (ours.num, ours.overrides, ours.run_dir) == (theirs.num, theirs.overrides, theirs.run_dir)
        assert OmegaConf.to_container(ours.cfg) == OmegaConf.to_container(theirs.cfg), ours.overrides
        assert OmegaConf.to_yaml(ours.cfg) == OmegaConf.to_yaml(theirs.cfg)  # the same types too


def test_a_bad_value_in_the_grid_names_its_job_on_the_fast_path_too(clean_env, tmp_path):
    result = invoke("sweep", "--dry-run", "model.dropout=0.5,1.5", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sw'}")
    assert result.exit_code == 2, result.output
    assert "sweep job 2 (model.dropout=1.5 seed=0)" in result.output and "model.dropout" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "sw").exists()
