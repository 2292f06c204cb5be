"""The orchestrator (execute.train_members) and the CLI around the one backend: members of a
batch are each what `dropstudy train` gives them (the regression MLP stacked, CIFAR-10 members
in turn on one shared copy of the images), each with a complete run directory and its own W&B
run; a member that diverges stops alone; figures draw on worker processes; and a checkpoint of
the earlier batched layout is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from cifar_files import write_torchvision_layout
from conftest import QUICK_REGRESSION, QUICK_REGRESSION_LOGGED, read_figure, read_jsonl
from typer.testing import CliRunner
from wandb_offline import load_run

from dropstudy.cli import app
from dropstudy.config.compose import compose
from dropstudy.data.datasets import make_regression
from dropstudy.engine.backend import Backend
from dropstudy.engine.steps import make_optimizer
from dropstudy.model.networks import build_model
from dropstudy.runs import execute
from dropstudy.runs.execute import Batch, Member, load_member_data, preflight, train_members, train_run
from dropstudy.store.rundir import RunDir, RunDirError

# Stacked, a member's matmuls are batched and sum in another order than its single run's: float32
# rounding, measured at ~2e-6 relative after 40 SGD steps.
RTOL, ATOL = 1e-5, 1e-7
QUICK = [*QUICK_REGRESSION, "tracker.mode=offline"]
# member -> its overrides: a dropout-0 member and a dropping one beside it.
MEMBERS = {"dropout-0-seed3": ["model.dropout=0.0", "seed=3"], "dropout-0.5-seed4": ["model.dropout=0.5", "seed=4"]}


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def results(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock measurements, which no two runs share."""
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in read_jsonl(run / "metrics.jsonl")]


def assert_metrics_match(ours: list[dict], theirs: list[dict], what, rtol: float = RTOL) -> None:
    assert [sorted(r) for r in ours] == [sorted(r) for r in theirs], (what, "same metric names at the same steps")
    for a, b in zip(ours, theirs):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=rtol, abs=ATOL), (what, a["epoch"], key)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One batch of two members (W&B offline), trained as a batched sweep trains them, and each
    member's config trained alone (`train_run`, what `dropstudy train` runs), once for the tests below."""
    root = tmp_path_factory.mktemp("batch")
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("WANDB_")]:
            mp.delenv(key)
        mp.setenv("HOME", str(root))
        mp.setenv("MPLCONFIGDIR", str(root / ".mpl"))
        mp.chdir(root)
        members = [Member(compose([*QUICK, *o]), root / "sweep" / name, [*QUICK, *o]) for name, o in MEMBERS.items()]
        for member in members:  # as a batched sweep writes them before training (sweep.train_batches)
            RunDir(member.run_dir).write_config(member.cfg, member.overrides)
        outcomes = train_members(members, Batch(group="batch-sweep", extra_tags=("sweep",)))
        for member, name in zip(members, MEMBERS):
            quiet = compose([*QUICK, *MEMBERS[name], "tracker.mode=disabled"])
            train_run(quiet, root / "single" / name, member.overrides)
    return members, outcomes, root / "single"


def test_each_member_gives_the_metrics_and_summary_of_its_single_run(sweep):
    members, outcomes, single = sweep
    for member, name in zip(members, MEMBERS):
        assert_metrics_match(results(member.run_dir), results(single / name), name)
        ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (member.run_dir, single / name))
        assert ours.keys() - theirs.keys() == {"batch"} and theirs.keys() <= ours.keys()
        assert ours["fit"]["test_mse"] == pytest.approx(theirs["fit"]["test_mse"], rel=RTOL)
    assert [json.loads((m.run_dir / "summary.json").read_text())["batch"] for m in members] == [
        {"members": 2, "index": 0}, {"members": 2, "index": 1}]
    assert [r.status for r in outcomes] == ["finished", "finished"]


def test_every_member_gets_a_complete_run_directory(sweep):
    members, outcomes, _ = sweep
    for index, (member, result) in enumerate(zip(members, outcomes)):
        run = member.run_dir
        assert result.run_dir == run
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        assert config["seed"] == member.cfg.seed and config["model"]["dropout"] == member.cfg.model.dropout
        assert yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) == member.overrides
        provenance = json.loads((run / "provenance.json").read_text())
        assert {"command", "git", "versions", "device", "host", "data_sha256"} <= provenance.keys()
        assert "vectorized" not in provenance
        assert provenance["batch"] == {"members": 2, "index": index, "execution": "stacked", "shared_stream": False,
                                       "group": "batch-sweep"}
        rows = read_jsonl(run / "metrics.jsonl")
        assert [r["epoch"] for r in rows if "train/loss" in r] == QUICK_REGRESSION_LOGGED
        assert [r["epoch"] for r in rows if "val/loss" in r] == [10, 20, 30, 40]
        assert rows[-1].keys() == {"epoch", "test/loss"}
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["seed"] == member.cfg.seed
        assert summary["final"]["test/loss"] == rows[-1]["test/loss"]
        # The whole batch's time, split as a single run's is (the benchmark reads the loop's share).
        assert set(summary["timings_s"]) == {"data", "setup", "train", "eval", "log", "checkpoint", "bookkeeping",
                                             "wandb", "figures"}
        assert summary["timings_s"]["train"] > 0 and summary["timings_s"]["eval"] > 0
        assert {p.name for p in (run / "plots").iterdir()} == {"learning_curves.png", "regression_fit.png"}
        for figure in (run / "plots").iterdir():
            read_figure(figure)
    # The two members trained on their own data (data.seed follows seed).
    sha = [json.loads((m.run_dir / "provenance.json").read_text())["data_sha256"] for m in members]
    assert sha[0] != sha[1]


def test_a_members_checkpoint_loads_into_its_single_model(sweep):
    members, _, _ = sweep
    for member in members:
        state = torch.load(member.run_dir / "checkpoints" / "last.pt", weights_only=False)
        assert state["epoch"] == 40 and state["config"]["seed"] == member.cfg.seed
        assert state["execution"] == "stacked" and "masks" in state["rng"] and "batch" not in state
        model = build_model(member.cfg.model)
        model.load_state_dict(state["model"])
        optimizer = make_optimizer(member.cfg.optim, model)
        optimizer.load_state_dict(state["optimizer"])  # its own optimizer state, one entry per parameter
        # The loaded model is the member: its test MSE is the one the member logged.
        data = make_regression(member.cfg.data)
        model.eval()
        with torch.no_grad():
            mse = torch.mean((model(data.test.inputs) - data.test.targets) ** 2).item()
        final = json.loads((member.run_dir / "summary.json").read_text())["final"]["test/loss"]
        assert mse == pytest.approx(final, rel=RTOL)


def test_every_member_has_its_own_wandb_run_in_the_sweep_group(sweep):
    members, _, _ = sweep
    ids = set()
    for name, member in zip(MEMBERS, members):
        wb = load_run(member.run_dir)
        ids.add(wb.run_id)
        label = name.rsplit("-seed", 1)[0]
        assert wb.group == "batch-sweep" and wb.job_type == label and {"sweep", label} <= set(wb.tags)
        assert wb.exit_code == 0
        local = [r["train/loss"] for r in read_jsonl(member.run_dir / "metrics.jsonl") if "train/loss" in r]
        assert wb.scalars("train/loss") == local
        assert "test/loss" in wb.history_keys() and wb.config["seed"] == member.cfg.seed
        histograms = wb.histograms()
        for prefix in ("gradients/", "parameters/"):
            assert {prefix + "net.fc1.weight", prefix + "net.out.bias"} <= histograms, sorted(histograms)
        # tracker.log_freq=10: histograms at epochs 10, 20, 30, 40, in the rows of those epochs.
        assert [r["epoch"] for r in wb.history if "gradients/net.fc1.weight" in r] == [10, 20, 30, 40]
        assert {"plots/learning_curves", "plots/regression_fit"} <= wb.images()
    assert len(ids) == 2


def test_a_diverging_member_stops_and_the_others_train_on(tmp_path, clean_env, monkeypatch):
    """Member 1's targets are made 1e20 times larger: its loss overflows within a few steps, while
    member 0 trains to the end. As `train` with on_nan=stop: status diverged, the reason, and a
    checkpoint of the last good epoch."""

    def load_dataset(cfg, device, log, shared=None):
        data = real_load_dataset(cfg, device, log, shared)
        if cfg.seed == 1:
            data.train.base_targets *= 1e20
        return data

    real_load_dataset = execute.load_dataset
    monkeypatch.setattr(execute, "load_dataset", load_dataset)
    base = ["trainer.epochs=30", "trainer.eval_every=10", "tracker.mode=disabled", "model.hidden=[16]"]
    members = [Member(compose([*base, "seed=0"]), tmp_path / "ok", base),
               Member(compose([*base, "seed=1"]), tmp_path / "bad", base)]
    ok, bad = train_members(members, Batch(group="g"))
    assert ok.status == "finished" and bad.status == "diverged"
    summary = json.loads((tmp_path / "bad" / "summary.json").read_text())
    assert summary["status"] == "diverged" and "train/loss became" in summary["reason"]
    rows = read_jsonl(tmp_path / "bad" / "metrics.jsonl")
    assert rows[-1]["epoch"] == summary["epoch"] < 30 and not any("test/loss" in r for r in rows)
    state = torch.load(tmp_path / "bad" / "checkpoints" / "last.pt", weights_only=False)
    assert state["epoch"] < summary["epoch"]
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert read_jsonl(tmp_path / "ok" / "metrics.jsonl")[-1].keys() == {"epoch", "test/loss"}


def test_members_figures_draw_on_worker_processes_and_survive_their_death(tmp_path):
    """A batch's members draw their figures on worker processes (plots.Drawer); a worker that
    dies (killed, out of memory) must not cost a figure: it is drawn in this process instead."""
    from concurrent.futures.process import BrokenProcessPool

    from dropstudy.report import plots

    rows = [{"epoch": e, "train/loss": 1.0 / e, **({"val/loss": 2.0 / e} if e % 5 == 0 else {})} for e in range(1, 21)]
    with plots.Drawer(2) as drawer:
        pending = drawer.submit(plots.learning_curves, rows, tmp_path / "a.png", "on a worker")
        assert pending.result() == tmp_path / "a.png"
        worker_pids = set(drawer._pool._processes)
        assert os.getpid() not in worker_pids and worker_pids
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with plots.Drawer(2) as drawer:
        dead = drawer.submit(os._exit, 1)  # a worker dies; the pool is broken from then on
        assert isinstance(dead.future.exception(timeout=120), BrokenProcessPool)
        late = drawer.submit(plots.learning_curves, rows, tmp_path / "b.png", "after a worker died")
        assert late.result() == tmp_path / "b.png"
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.Drawer(1).submit(plots.learning_curves, rows, tmp_path / "c.png", "inline").result().is_file()
    assert execute.figure_workers(4) == 1 and execute.figure_workers(16) >= 1


# --------------------------------------------------------------------------- the CLI: sweep = train, member by member


def test_a_regression_sweep_with_every_member_path_batches_and_each_member_equals_its_train(clean_env, tmp_path):
    """max-norm, MC dropout, input dropout, a warmup schedule and minibatches of 4: the sweep
    still trains as one stacked batch, and each member (the dropping ones too: their masks come
    from their own streams) logs what `dropstudy train` of its config logs."""
    common = ["optim.max_norm=0.5", "eval.mc_samples=5", "model.input_dropout=0.1", "model.dropout_schedule.kind=warmup",
              "trainer.batch_size=4", "trainer.epochs=6", "trainer.eval_every=3", "model.hidden=[32,32]",
              "tracker.mode=disabled"]
    grid = ["model.dropout=0,0.5", "seed=0,1"]
    swept = invoke("sweep", *common, *grid, "hydra.sweep.dir=sw")
    assert swept.exit_code == 0, swept.output
    table = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert table["mode"] == "batched" and len(table["jobs"]) == 4
    for job in table["jobs"]:
        run = Path(job["run_dir"])
        provenance = json.loads((run / "provenance.json").read_text())
        assert provenance["batch"]["execution"] == "stacked" and provenance["batch"]["members"] == 4
        alone = invoke("train", *common, *job["overrides"][-2:], f"hydra.run.dir=single{job['num']}")
        assert alone.exit_code == 0, alone.output
        ours, theirs = results(run), results(tmp_path / f"single{job['num']}")
        assert any("val_mc/loss" in r for r in ours) and any("dropout/p/net.drop_in" in r for r in ours)
        assert_metrics_match(ours, theirs, job["overrides"])
    assert results(Path(table["jobs"][0]["run_dir"])) != results(Path(table["jobs"][2]["run_dir"]))


def test_a_cifar10_seed_grid_shares_one_copy_of_the_images_and_each_member_equals_its_train(clean_env, tmp_path):
    """Without data.seed each member draws its own validation split and subset (data.seed
    follows seed) from the one copy of the images on disk: the grid still batches (members in
    turn on the CPU), the members' datasets share the image tensor, and each member's
    metrics.jsonl is what `dropstudy train` of its config writes, exactly."""
    write_torchvision_layout(tmp_path / "cifar", n_train=200, n_test=50)
    common = ["experiment=cifar10", f"data.root={tmp_path / 'cifar'}", "data.verify=false", "data.val_size=40",
              "trainer.batch_size=32", "trainer.epochs=2", "tracker.mode=disabled"]
    cfgs = [compose([*common, f"seed={s}"]) for s in (0, 1)]
    assert cfgs[0].data.seed != cfgs[1].data.seed
    datas = load_member_data([Member(cfg, tmp_path / f"m{i}", []) for i, cfg in enumerate(cfgs)], torch.device("cpu"))
    assert datas[0] is not datas[1]
    assert datas[0].train.base_inputs is datas[1].train.base_inputs, "one copy of the training images"
    assert datas[0].test.base_inputs is datas[1].test.base_inputs
    assert not torch.equal(datas[0].train.index, datas[1].train.index), "each member's own rows"
    assert datas[0].fingerprint() != datas[1].fingerprint()

    swept = invoke("sweep", *common, "seed=0,1", "hydra.sweep.dir=sw")
    assert swept.exit_code == 0, swept.output
    table = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert table["mode"] == "batched"
    for seed in (0, 1):
        run = tmp_path / "sw" / str(seed)
        assert json.loads((run / "provenance.json").read_text())["batch"]["execution"] == "sequential"
        alone = invoke("train", *common, f"seed={seed}", f"hydra.run.dir=single{seed}")
        assert alone.exit_code == 0, alone.output
        ours, theirs = results(run), results(tmp_path / f"single{seed}")
        assert len(ours) == 3 and ours == theirs, seed
    assert results(tmp_path / "sw" / "0") != results(tmp_path / "sw" / "1")


def test_an_interrupted_stacked_batch_resumes_exactly(clean_env, tmp_path, monkeypatch, own_signal_handlers):
    """A batched sweep of stacked MLP members stopped by Ctrl-C during epoch 5 (checkpoints of
    epoch 4) and continued with `dropstudy resume SWEEP_DIR`: each member's masks' generator,
    optimizer state and batch order come back from its checkpoint, and every row equals those of
    a sweep never stopped."""
    grid = ["model.dropout=0.2,0.5", "seed=0,1", "trainer.epochs=8", "trainer.eval_every=2", "trainer.checkpoint_every=2",
            "trainer.batch_size=4",
            "optim.momentum=0.9", "model.hidden=[16,16]", "tracker.mode=disabled"]
    real_set_epoch = Backend.set_epoch

    def set_epoch(self, epoch):
        if epoch == 5:
            raise KeyboardInterrupt
        return real_set_epoch(self, epoch)

    with monkeypatch.context() as mp:
        mp.setattr(Backend, "set_epoch", set_epoch)
        stopped = invoke("sweep", *grid, "hydra.sweep.dir=sw")
    assert stopped.exit_code == 130, stopped.output
    for num in range(4):
        state = torch.load(tmp_path / "sw" / str(num) / "checkpoints" / "last.pt", weights_only=False)
        assert state["epoch"] == 4 and state["execution"] == "stacked" and "masks" in state["rng"]
    resumed = invoke("resume", "sw")
    assert resumed.exit_code == 0, resumed.output
    assert invoke("sweep", *grid, "hydra.sweep.dir=ref").exit_code == 0
    for num in range(4):
        ours, theirs = results(tmp_path / "sw" / str(num)), results(tmp_path / "ref" / str(num))
        assert [r["epoch"] for r in ours] == [2, 4, 6, 8, 8]
        assert ours == theirs, num
    assert results(tmp_path / "sw" / "0") != results(tmp_path / "sw" / "1")


# --------------------------------------------------------------------------- records of earlier versions


def test_a_checkpoint_of_the_earlier_batched_layout_is_refused_naming_the_file(clean_env, tmp_path, monkeypatch,
                                                                               own_signal_handlers):
    """A checkpoint with an `ensemble` key (members that drew their masks from one shared stream)
    cannot continue exactly: preflight refuses it with a RunDirError naming the file, before
    anything is written, and `dropstudy resume` says so with exit 2."""
    overrides = ["trainer.epochs=4", "trainer.eval_every=2", "tracker.mode=disabled", "model.hidden=[8]"]
    cfg = compose(overrides)
    run = tmp_path / "run"
    real_set_epoch = Backend.set_epoch

    def set_epoch(self, epoch):
        if epoch == 3:
            raise KeyboardInterrupt  # Ctrl-C: the run stops with its checkpoint of epoch 2
        return real_set_epoch(self, epoch)

    with monkeypatch.context() as mp:
        mp.setattr(Backend, "set_epoch", set_epoch)
        stopped = invoke("train", *overrides, f"hydra.run.dir={run}")
    assert stopped.exit_code == 130, stopped.output
    checkpoint = run / "checkpoints" / "last.pt"
    state = torch.load(checkpoint, weights_only=False)
    assert preflight([Member(cfg, run, overrides)], resume=True)[0].state is not None, "the real one is accepted"
    state["ensemble"] = {"shared": {"masks": torch.get_rng_state()}, "members": 2, "index": 0}
    torch.save(state, checkpoint)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RunDirError, match=str(checkpoint)):
        preflight([Member(cfg, run, overrides)], resume=True)
    with pytest.raises(RunDirError, match="Start the sweep again"):
        train_members([Member(cfg, run, overrides)], resume=True)
    refused = invoke("resume", str(run))
    assert refused.exit_code == 2 and "last.pt" in refused.output, refused.output
    assert "Traceback" not in refused.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before, "nothing written"
