"""Vectorized multi-model training: members of a sweep trained as one batched model must be what
`dropstudy train` gives them (exactly, with dropout 0; in distribution, with dropout), each with
a complete run directory and its own W&B run."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import QUICK_REGRESSION, QUICK_REGRESSION_LOGGED, python_path, read_figure, read_jsonl
from dropstudy.config import compose
from dropstudy.models import build_model
from dropstudy.train import make_optimizer
from dropstudy.vectorized import Member, StackedMLP, train_members, why_not_vectorizable
from wandb_offline import load_run

# With dropout 0 a member computes what the single path computes, but its matmuls are batched
# and sum in another order: float32 rounding, measured at ~2e-6 relative after 40 SGD steps.
RTOL, ATOL = 1e-5, 1e-7
QUICK = [*QUICK_REGRESSION, "tracker.mode=offline"]
# member -> its overrides: a dropout-0 member to compare with `train`, a dropout one beside it.
MEMBERS = {"dropout-0-seed3": ["model.dropout=0.0", "seed=3"], "dropout-0.5-seed4": ["model.dropout=0.5", "seed=4"]}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One vectorized sweep of two members (W&B offline), and `dropstudy train` of the dropout-0
    member's config through the CLI, trained once for the tests below."""
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("vectorized")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(root), MPLCONFIGDIR=str(root / ".mpl"), DROPSTUDY_DATA=str(root / "data"),
               PYTHONPATH=python_path())
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("WANDB_")]:
            mp.delenv(key)
        mp.setenv("HOME", str(root))
        mp.chdir(root)
        members = [Member(compose([*QUICK, *o]), root / "sweep" / name, [*QUICK, *o]) for name, o in MEMBERS.items()]
        results = train_members(members, group="vec-sweep", extra_tags=("sweep",))
    single = subprocess.run(
        [sys.executable, "-m", "dropstudy", "train", *QUICK, *MEMBERS["dropout-0-seed3"], "tracker.mode=disabled",
         "hydra.run.dir=single"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert single.returncode == 0, single.stdout + single.stderr
    return members, results, root / "single"


def test_dropout_0_member_gives_the_metrics_of_dropstudy_train(sweep):
    members, results, single = sweep
    vectorized = read_jsonl(members[0].run_dir / "metrics.jsonl")
    alone = read_jsonl(single / "metrics.jsonl")
    assert [sorted(r) for r in vectorized] == [sorted(r) for r in alone], "same metric names at the same steps"
    for ours, theirs in zip(vectorized, alone):
        for key in ours.keys() - {"perf/samples_per_s"}:
            assert ours[key] == pytest.approx(theirs[key], rel=RTOL, abs=ATOL), (ours["epoch"], key)
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (members[0].run_dir, single))
    assert ours.keys() - theirs.keys() == {"vectorized"} and theirs.keys() <= ours.keys()
    assert ours["fit"]["test_mse"] == pytest.approx(theirs["fit"]["test_mse"], rel=RTOL)
    assert [r.status for r in results] == ["finished", "finished"]


def test_every_member_gets_a_complete_run_directory(sweep):
    members, results, single = sweep
    for member, result in zip(members, results):
        run = member.run_dir
        assert result.run_dir == run
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        assert config["seed"] == member.cfg.seed and config["model"]["dropout"] == member.cfg.model.dropout
        assert yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) == member.overrides
        provenance = json.loads((run / "provenance.json").read_text())
        assert {"command", "git", "versions", "device", "host", "data_sha256"} <= provenance.keys()
        assert provenance["batch"]["members"] == 2
        rows = read_jsonl(run / "metrics.jsonl")
        assert [r["epoch"] for r in rows if "train/loss" in r] == QUICK_REGRESSION_LOGGED
        assert [r["epoch"] for r in rows if "val/loss" in r] == [10, 20, 30, 40]
        assert rows[-1].keys() == {"epoch", "test/loss"}
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["seed"] == member.cfg.seed
        assert summary["final"]["test/loss"] == rows[-1]["test/loss"]
        # The whole batch's time, split as a single run's is (the benchmark reads the loop's share).
        assert set(summary["timings_s"]) == {"data", "setup", "train", "eval", "log", "checkpoint", "bookkeeping",
                                             "figures"}
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
        model = build_model(member.cfg.model)
        model.load_state_dict(state["model"])
        optimizer = make_optimizer(member.cfg.optim, model)
        optimizer.load_state_dict(state["optimizer"])  # its own momentum, one buffer per parameter
        assert all(s["momentum_buffer"].shape == p.shape for p, s in zip(model.parameters(), optimizer.state.values()))
        # The loaded model is the member: its test MSE is the one the member logged.
        from dropstudy.data import make_regression

        data = make_regression(member.cfg.data)
        model.eval()
        with torch.no_grad():
            mse = torch.mean((model(data.test.inputs) - data.test.targets) ** 2).item()
        final = json.loads((member.run_dir / "summary.json").read_text())["final"]["test/loss"]
        assert mse == pytest.approx(final, rel=RTOL)


def test_every_member_has_its_own_wandb_run_in_the_sweep_group(sweep):
    members, results, _ = sweep
    ids = set()
    for name, member in zip(MEMBERS, members):
        wb = load_run(member.run_dir)
        ids.add(wb.run_id)
        label = name.rsplit("-seed", 1)[0]
        assert wb.group == "vec-sweep" and wb.job_type == label and {"sweep", label} <= set(wb.tags)
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


def test_dropout_masks_drop_each_unit_with_probability_p_independently_per_member():
    rates = [0.1, 0.3, 0.5, 0.5, 0.0]
    model_cfg = compose(["model.hidden=[8]"]).model
    models = [build_model(model_cfg) for _ in rates]
    stacked = StackedMLP(models, torch.tensor([[p] for p in rates]), "inverted", torch.Generator().manual_seed(0))
    n = 20_000
    out = stacked.drop(torch.ones(len(rates), n, 1), site=0)
    for i, p in enumerate(rates):
        dropped = (out[i] == 0).float().mean().item()
        # Binomial(n, p): 5 standard deviations (a fair test fails about once in 3.5 million).
        assert abs(dropped - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12, (p, dropped)
        kept = out[i][out[i] != 0]
        assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p))), "inverted: kept units scaled by 1/(1-p)"
    # Two members with p=0.5: independent masks agree on a unit with probability 1/2.
    agree = (out[2] == out[3]).float().mean().item()
    assert abs(agree - 0.5) <= 5 * math.sqrt(0.25 / n)


@pytest.mark.parametrize("kind", ["inverted", "vanilla", "gaussian"])
def test_train_mode_loss_of_a_member_is_distributed_as_the_single_models(kind):
    """The same network (seed 0, p=0.5; narrower than the study's, to be quick) in training mode, K times: as K members of the batch and
    as K forward passes of the single model. Every pass draws new masks, so the loss is a random
    variable; its mean must agree (Welch z within 5) and evaluation mode must agree exactly."""
    cfg = compose(["model.dropout=0.5", f"model.dropout_kind={kind}", "model.hidden=[50,50,50]"])
    x = torch.linspace(-1, 1, 10).unsqueeze(1)
    y = 1.5 * x
    torch.manual_seed(0)
    model = build_model(cfg.model)
    k = 200
    stacked = StackedMLP([model] * k, torch.full((k, 3), 0.5), kind, torch.Generator().manual_seed(1))
    with torch.no_grad():
        batched = ((stacked(x.expand(k, 10, 1)) - y) ** 2).mean(dim=(1, 2))
        model.train()
        torch.manual_seed(2)
        single = torch.stack([((model(x) - y) ** 2).mean() for _ in range(k)])
        stacked.eval(), model.eval()
        assert ((stacked(x.expand(k, 10, 1))[0] - model(x)).abs().max().item()) < 1e-6
    z = (batched.mean() - single.mean()) / math.sqrt(batched.var() / k + single.var() / k)
    assert abs(z.item()) < 5, (kind, batched.mean().item(), single.mean().item())
    assert batched.std() > 0, "every member drew its own masks"


def test_why_not_vectorizable_says_why():
    base = compose([])

    def member(**changes):
        cfg = copy.deepcopy(base)
        for key, value in changes.items():
            OmegaConf.update(cfg, key.replace("__", "."), value)
        return cfg

    assert why_not_vectorizable([member(**{"model__dropout": 0.0, "seed": 0}), member(**{"model__dropout": 0.5, "seed": 1}),
                                 member(**{"model__dropout": 0.2, "seed": 2, "data__seed": 7})]) is None
    cases = {
        "model.name=cnn": [member(), compose(["experiment=cifar10", "data.synthetic=true"])],
        "optim.lr": [member(), member(optim__lr=0.1)],
        "trainer.epochs": [member(), member(trainer__epochs=10)],
        "device": [member(), member(device="cpu")],
        "model.dropout_kind=spatial": [member(model__dropout_kind="spatial")],
        "model.input_dropout": [member(model__input_dropout=0.2)],
        "model.dropout_schedule.kind=warmup": [member(model__dropout_schedule__kind="warmup")],
        "optim.max_norm": [member(optim__max_norm=3.0)],
        "eval.mc_samples": [member(eval__mc_samples=10)],
        "trainer.batch_size": [member(trainer__batch_size=4)],
        "trainer.on_nan=skip": [member(trainer__on_nan="skip")],
    }
    for needle, members in cases.items():
        reason = why_not_vectorizable(members)
        assert reason is not None and needle in reason, (needle, reason)
    assert "no members" in why_not_vectorizable([])
    with pytest.raises(ValueError, match="optim.lr"):
        train_members([Member(c, Path("unused"), []) for c in cases["optim.lr"]], group="g")


@pytest.mark.slow
def test_final_mse_over_seeds_matches_single_runs(tmp_path, clean_env):
    """Dropout 0.5 over 8 seeds: the mean final train and test MSE of the vectorized members and
    of single runs of the same configs agree within the standard error of their difference (the
    masks differ, so single seeds do not agree; their average does)."""
    from dropstudy.execute import train_run

    seeds = range(8)
    base = ["trainer.epochs=300", "trainer.eval_every=100", "tracker.mode=disabled", "model.dropout=0.5"]
    members = [Member(compose([*base, f"seed={s}"]), tmp_path / f"v{s}", [*base, f"seed={s}"]) for s in seeds]
    vec = [r.fit for r in train_members(members, group="g")]
    single = [train_run(m.cfg, tmp_path / f"s{m.cfg.seed}", m.overrides).fit for m in members]
    for metric in ("train_mse", "test_mse"):
        a = torch.tensor([getattr(f, metric) for f in vec])
        b = torch.tensor([getattr(f, metric) for f in single])
        bound = 4 * math.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) <= bound, (metric, a.tolist(), b.tolist())


@pytest.mark.slow
def test_adam_members_match_single_runs(tmp_path, clean_env):
    """Adam is elementwise too (its step count is the same for every member): one Adam over the
    stacked weights is one Adam per member."""
    from dropstudy.execute import train_run

    base = ["trainer.epochs=40", "trainer.eval_every=10", "tracker.mode=disabled", "optim=adam", "optim.lr=0.001",
            "model.dropout=0.0"]
    members = [Member(compose([*base, f"seed={s}"]), tmp_path / f"v{s}", [*base, f"seed={s}"]) for s in (0, 1)]
    train_members(members, group="g")
    train_run(members[1].cfg, tmp_path / "single", members[1].overrides)
    for ours, theirs in zip(read_jsonl(tmp_path / "v1" / "metrics.jsonl"), read_jsonl(tmp_path / "single" / "metrics.jsonl")):
        for key in ours.keys() - {"perf/samples_per_s"}:
            assert ours[key] == pytest.approx(theirs[key], rel=RTOL, abs=ATOL), (ours["epoch"], key)


def test_a_diverging_member_stops_and_the_others_train_on(tmp_path, clean_env, monkeypatch):
    """Member 1's targets are made 1e20 times larger: its loss overflows within a few steps, while
    member 0 trains to the end. As `train` with on_nan=stop: status diverged, the reason, and a
    checkpoint of the last good epoch."""
    from dropstudy import vectorized

    def load_dataset(cfg, device, log):
        data = real_load_dataset(cfg, device, log)
        if cfg.seed == 1:
            data.train.targets *= 1e20
        return data

    real_load_dataset = vectorized.load_dataset
    monkeypatch.setattr(vectorized, "load_dataset", load_dataset)
    base = ["trainer.epochs=30", "trainer.eval_every=10", "tracker.mode=disabled", "model.hidden=[16]"]
    members = [Member(compose([*base, "seed=0"]), tmp_path / "ok", base),
               Member(compose([*base, "seed=1"]), tmp_path / "bad", base)]
    ok, bad = train_members(members, group="g")
    assert ok.status == "finished" and bad.status == "diverged"
    summary = json.loads((tmp_path / "bad" / "summary.json").read_text())
    assert summary["status"] == "diverged" and "train/loss became" in summary["reason"]
    rows = read_jsonl(tmp_path / "bad" / "metrics.jsonl")
    assert rows[-1]["epoch"] == summary["epoch"] < 30 and not any("test/loss" in r for r in rows)
    state = torch.load(tmp_path / "bad" / "checkpoints" / "last.pt", weights_only=False)
    assert state["epoch"] == summary["epoch"] - 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert read_jsonl(tmp_path / "ok" / "metrics.jsonl")[-1].keys() == {"epoch", "test/loss"}


def test_members_figures_draw_on_worker_processes_and_survive_their_death(tmp_path):
    """A sweep's members draw their figures on worker processes (plots.Drawer); a worker that
    dies (killed, out of memory) must not cost a figure: it is drawn in this process instead."""
    import os

    from dropstudy import plots

    rows = [{"epoch": e, "train/loss": 1.0 / e, **({"val/loss": 2.0 / e} if e % 5 == 0 else {})} for e in range(1, 21)]
    with plots.Drawer(2) as drawer:
        pending = drawer.submit(plots.learning_curves, rows, tmp_path / "a.png", "on a worker")
        assert pending.result() == tmp_path / "a.png"
        worker_pids = set(drawer._pool._processes)
        assert os.getpid() not in worker_pids and worker_pids
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with plots.Drawer(2) as drawer:
        from concurrent.futures.process import BrokenProcessPool

        dead = drawer.submit(os._exit, 1)  # a worker dies; the pool is broken from then on
        assert isinstance(dead.future.exception(timeout=120), BrokenProcessPool)
        late = drawer.submit(plots.learning_curves, rows, tmp_path / "b.png", "after a worker died")
        assert late.result() == tmp_path / "b.png"
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.Drawer(1).submit(plots.learning_curves, rows, tmp_path / "c.png", "inline").result().is_file()
