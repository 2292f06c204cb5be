"""The ensemble backend: M members of the MLP or the CNN trained in one process must each be what
`dropstudy train` gives them (exactly, up to float rounding, with dropout 0; their own masks with
their own p, with dropout), executed stacked (vmap) or sequentially with the same results, with
checkpoints in the single run's layout that round-trip exactly.

Statistical checks allow Z = 5 standard deviations of a binomial count: a correct
implementation falls outside with probability 5.7e-7 per check (and the seeds are fixed, so a
pass is a pass every time).
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import read_jsonl
from omegaconf import OmegaConf
from torch.func import functional_call, vmap

from dropstudy.config import ConfigError, compose
from dropstudy.data import TrainBatches, load_dataset
from dropstudy.dropout import make_dropout
from dropstudy.ensemble import Ensemble, member_execution, why_not
from dropstudy.models import build_model
from dropstudy.runtime import FastPaths, seed_everything, set_up_process
from dropstudy.train import apply_max_norm, evaluate, make_optimizer

# A dropout-0 member computes what the single path computes; stacked, its matmuls and convolutions
# are batched (grouped) and sum in another order: float32 rounding, well under 1e-5 here.
RTOL, ATOL = 1e-5, 1e-7
Z = 5.0
# What the engine adds to a row beside the backend's metrics (timings, lr, the gap).
ENGINE_KEYS = {"perf/samples_per_s", "lr", "gap/loss", "gap/acc"}
MODES = ["stacked", "sequential"]

# Every path a member has of its own: shuffled minibatches (a short last batch too), max-norm that
# bites, MC-dropout evaluation; the CNN also augments. Both members train on data.seed=0.
MLP = ["device=cpu", "data.seed=0", "trainer.epochs=20", "trainer.eval_every=5", "trainer.log_every=5",
       "trainer.batch_size=4", "optim.max_norm=0.5", "eval.mc_samples=4"]
CNN = ["experiment=cifar10", "device=cpu", "data.synthetic=true", "data.subset=128", "data.val_size=32",
       "trainer.batch_size=32", "trainer.epochs=2", "data.seed=0", "data.augment=true", "optim.max_norm=0.5",
       "eval.mc_samples=2"]
BASES = {"mlp": MLP, "cnn": CNN}
# Member 1 (seed 1, dropout 0) is the one compared with `dropstudy train`; member 0 drops beside it.
MEMBERS = [["seed=0", "model.dropout=0.5"], ["seed=1", "model.dropout=0.0"]]


class NoProgress:
    def advance(self, steps: int = 1) -> None:
        pass


def configs(model: str, members=MEMBERS, extra=()):
    return [compose([*BASES[model], *extra, *m]) for m in members]


def make_ensemble(cfgs, execution: str) -> Ensemble:
    device = set_up_process(cfgs[0])
    seed_everything(cfgs[0].seed)
    data = load_dataset(cfgs[0].data, device, lambda _: None)
    return Ensemble(cfgs, data, FastPaths.resolve(cfgs[0].trainer, device), execution=execution)


def train_rows(ens: Ensemble, trainer) -> list[list[dict]]:
    """Each member's metric rows as the run engine assembles them (Trainer.fit's cadence)."""
    rows: list[list[dict]] = [[] for _ in range(ens.members)]
    for epoch in range(1, trainer.epochs + 1):
        rates = ens.set_epoch(epoch)
        train = ens.train_epoch(NoProgress())
        evaluated = epoch % trainer.eval_every == 0 or epoch == trainer.epochs
        val = ens.evaluate("val") if evaluated else [{}] * ens.members
        train_eval = ens.evaluate("train_eval") if evaluated else [{}] * ens.members
        norms = ens.weight_norms() if evaluated else [{}] * ens.members
        if evaluated or epoch % trainer.log_every == 0:
            for i in range(ens.members):
                rows[i].append({"epoch": epoch, **train[i], **rates[i], **val[i], **train_eval[i], **norms[i]})
    for i, test in enumerate(ens.evaluate("test")):
        rows[i].append({"epoch": trainer.epochs, **test})
    return rows


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """`dropstudy train` of member 1's config through the CLI (its metrics.jsonl), once per model."""
    root = tmp_path_factory.mktemp("single")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(root), MPLCONFIGDIR=str(root / ".mpl"), DROPSTUDY_DATA=str(root / "data"))
    runs: dict[str, list[dict]] = {}

    def run(model: str) -> list[dict]:
        if model not in runs:
            proc = subprocess.run(
                [sys.executable, "-m", "dropstudy", "train", *BASES[model], *MEMBERS[1], "tracker.mode=disabled",
                 f"hydra.run.dir={model}"],
                check=False, cwd=root, env=env, capture_output=True, text=True, timeout=600,
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
            runs[model] = read_jsonl(root / model / "metrics.jsonl")
        return runs[model]

    return run


@pytest.fixture(scope="module")
def ensemble_run():
    """The two members trained as an ensemble: their rows, once per model and execution."""
    runs: dict[tuple[str, str], list[list[dict]]] = {}

    def run(model: str, mode: str) -> list[list[dict]]:
        if (model, mode) not in runs:
            cfgs = configs(model)
            runs[model, mode] = train_rows(make_ensemble(cfgs, mode), cfgs[0].trainer)
        return runs[model, mode]

    return run


def assert_rows_match(ours: list[dict], theirs: list[dict], what: str) -> None:
    assert [r["epoch"] for r in ours] == [r["epoch"] for r in theirs], what
    for mine, single in zip(ours, theirs):
        assert single.keys() - ENGINE_KEYS <= mine.keys(), (what, sorted(single.keys() - mine.keys()))
        for key in single.keys() - ENGINE_KEYS - {"epoch"}:
            assert mine[key] == pytest.approx(single[key], rel=RTOL, abs=ATOL), (what, mine["epoch"], key)


# The CNN's runs take about a minute of CPU between them: slow; the MLP's cover the same code.
MODELS = ["mlp", pytest.param("cnn", marks=pytest.mark.slow)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", MODELS)
def test_dropout_0_member_gives_every_metric_of_dropstudy_train(single_run, ensemble_run, model, mode):
    """Initial weights, batch order and crops from the member's seed, its own optimizer state and
    max-norm, evaluation with MC dropout and the weight norms: every row `train` logs."""
    ours = ensemble_run(model, mode)[1]
    assert_rows_match(ours, single_run(model), f"{model} {mode}")
    assert any("val_mc/loss" in r for r in ours) and any("test_mc/loss" in r for r in ours)


@pytest.mark.parametrize("model", MODELS)
def test_stacked_and_sequential_execution_agree(ensemble_run, model):
    stacked, sequential = ensemble_run(model, "stacked")[1], ensemble_run(model, "sequential")[1]
    assert_rows_match(stacked, sequential, model)
    # The dropping member beside it trained with its own masks: another curve than member 1's.
    assert ensemble_run(model, "stacked")[0][0]["train/loss"] != stacked[0]["train/loss"]


@pytest.mark.parametrize("mode", MODES)
def test_each_member_drops_with_its_own_p_and_its_own_masks(mode):
    """Four MLP members, p = 0.5, 0, 0.5 and 0.5 warmed up over 2 epochs (0.25 at epoch 2): at a
    site, each member's fraction of dropped units is binomial around its p in force, and the two
    p=0.5 members' masks are independent (they agree on a unit with probability 1/2)."""
    members = [["seed=0", "model.dropout=0.5"], ["seed=1", "model.dropout=0.0"], ["seed=2", "model.dropout=0.5"],
               ["seed=3", "model.dropout=0.5", "model.dropout_schedule.kind=warmup", "model.dropout_schedule.epochs=2"]]
    ens = make_ensemble(configs("mlp", members), mode)
    rates = ens.set_epoch(2)
    expected = [0.5, 0.0, 0.5, 0.25]
    assert [r["dropout/p/net.drop2"] for r in rates] == expected
    n = 40_000
    ones = torch.ones(n, 1)
    with torch.no_grad():
        if mode == "stacked":
            # The ensemble's own site and its stacked rates, as its training forward calls them.
            site = ens.template.net.drop2.train()
            masks = vmap(lambda r: functional_call(site, {"rate": r}, (ones,)), randomness="different")(
                ens.buffers["net.drop2.rate"])
        else:
            masks = torch.stack([m.net.drop2.train()(ones) for m in ens.models])
    dropped = (masks == 0).float().mean((1, 2))  # n independent units per member
    for i, p in enumerate(expected):
        assert abs(dropped[i].item() - p) <= Z * math.sqrt(p * (1 - p) / n), (i, p, dropped[i].item())
        kept = masks[i][masks[i] != 0]
        assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p))), "inverted: kept units scaled by 1/(1-p)"
    agree = (masks[0, :, 0] == masks[2, :, 0]).float().mean().item()
    assert abs(agree - 0.5) <= Z * math.sqrt(0.25 / n), agree
    # In the training step too: twins (same seed, same p) draw their own masks and part ways.
    twins = make_ensemble(configs("mlp", [["seed=0", "model.dropout=0.5"]] * 2), mode)
    twins.set_epoch(1)
    first, second = twins.train_epoch(NoProgress())
    assert first["train/loss"] != second["train/loss"]


@pytest.mark.parametrize("kind", ["inverted", "vanilla", "gaussian", "spatial"])
def test_tensor_p_form_of_each_kind_matches_its_float_p_form(kind):
    """dropout.py's `drop_rate` (what stacked members use) against `drop` (what a single run
    uses): the same evaluation-mode output, p=0 exactly the input, and in training the same drop
    fraction (binomial bound) or, for gaussian, the same multiplier variance p/(1-p) (the sample
    variance of n normals is within Z·sqrt(2/n) of it, relatively)."""
    p, n = 0.3, 50_000
    site = make_dropout(kind, p, "test", feature_maps=True)
    x = torch.randn(4, 3, 5, 5)
    site.eval()
    assert torch.equal(site.drop_rate(x, site.rate), site.drop(x))
    site.train()
    assert torch.equal(site.drop_rate(x, torch.tensor(0.0)), x), "p=0 draws a mask of ones and scales by 1"
    ones = torch.ones(n, 1, 1, 1) if kind != "spatial" else torch.ones(1, n, 2, 2)
    out = site.drop_rate(ones, site.rate)
    if kind == "gaussian":
        var = out.var().item()
        assert abs(var / (p / (1 - p)) - 1) <= Z * math.sqrt(2 / n), var
    else:
        dropped = (out == 0).float().mean().item()
        assert abs(dropped - p) <= Z * math.sqrt(p * (1 - p) / n), dropped
    if kind == "spatial":
        assert torch.equal(out.amin((2, 3)), out.amax((2, 3))), "whole feature maps"


def test_the_rate_buffer_follows_p_and_stays_out_of_checkpoints():
    model = build_model(compose(["model.dropout=0.5"]).model)
    site = model.net.drop1
    site.p = 0.2
    assert site.rate.item() == pytest.approx(0.2)
    assert not any(key.endswith("rate") for key in model.state_dict())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", MODELS)
def test_member_state_loads_into_the_single_model_and_round_trips(model, mode, tmp_path):
    """After an epoch: member 0's (dropping) checkpoint body loads into build_model and its
    optimizer into make_optimizer as `dropstudy resume` loads them, and evaluates as the member
    did; member 1's lets the single path's training step go on exactly as the ensemble does. An
    ensemble restored from every member's state and the shared state trains on identically."""
    cfgs = configs(model, extra=["trainer.epochs=3"])
    ens = make_ensemble(cfgs, mode)
    ens.set_epoch(1)
    ens.train_epoch(NoProgress())
    states = [ens.member_state(i) for i in range(ens.members)]
    shared = ens.shared_state()
    torch.save({"states": states, "shared": shared}, tmp_path / "last.pt")  # a checkpoint's round trip
    saved = torch.load(tmp_path / "last.pt", weights_only=False)
    val = ens.evaluate("val")

    fast = FastPaths.resolve(cfgs[0].trainer, torch.device("cpu"))
    single = fast.prepare_model(build_model(cfgs[0].model))
    single.load_state_dict(saved["states"][0]["model"])
    make_optimizer(cfgs[0].optim, single).load_state_dict(saved["states"][0]["optimizer"])
    alone = evaluate(single, ens.data, ens.data.val, cfgs[0].trainer.eval_batch_size, fast)
    assert alone["loss"] == pytest.approx(val[0]["val/loss"], rel=RTOL)

    # Member 1 (dropout 0) by the single path's step from its checkpoint: its epoch 2 loss.
    single = fast.prepare_model(build_model(cfgs[1].model))
    single.load_state_dict(saved["states"][1]["model"])
    optimizer = make_optimizer(cfgs[1].optim, single)
    optimizer.load_state_dict(copy.deepcopy(saved["states"][1]["optimizer"]))  # it would train the saved tensors
    loader = TrainBatches(ens.data.train, cfgs[1].trainer.batch_size, cfgs[1].seed, augment=ens.data.augment)
    loader.load_state(saved["states"][1]["rng"])
    losses = []
    for xb, yb in loader:
        loss = ens.loss_fn(single(fast.inputs(ens.data.prepare(xb))), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        apply_max_norm(single, cfgs[1].optim.max_norm)
        losses.append(loss.detach() * len(yb))
    single_loss = (torch.stack(losses).sum() / len(ens.data.train)).item()

    restored = make_ensemble(cfgs, mode)
    for i, state in enumerate(saved["states"]):
        restored.load_member_state(i, state)
    restored.load_shared_state(saved["shared"])
    for i in range(ens.members):
        again = restored.member_state(i)
        for key, tensor in states[i]["model"].items():
            assert torch.equal(again["model"][key], tensor), key
        assert_equal_trees(again["optimizer"], states[i]["optimizer"])
    # Both ensembles draw their masks from the one global generator: each continues its own stream.
    streams = [shared, shared]
    for epoch in (2, 3):
        metrics = []
        for k, e in enumerate((ens, restored)):
            e.load_shared_state(streams[k])
            e.set_epoch(epoch)
            metrics.append(e.train_epoch(NoProgress()))
            streams[k] = e.shared_state()
        assert metrics[0] == metrics[1], epoch
        if epoch == 2:
            assert single_loss == pytest.approx(metrics[0][1]["train/loss"], rel=RTOL)
    assert torch.equal(streams[0]["torch"], streams[1]["torch"])
    assert ens.evaluate("val") == restored.evaluate("val")


def assert_equal_trees(a, b) -> None:
    if torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal_trees(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal_trees(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("mode", MODES)
def test_histogram_tensors_carry_the_single_models_names(mode):
    cfgs = configs("mlp")
    ens = make_ensemble(cfgs, mode)
    ens.set_epoch(1)
    ens.train_epoch(NoProgress())
    tensors = ens.histogram_tensors(1)
    names = [name for name, _ in build_model(cfgs[1].model).named_parameters()]
    assert set(tensors) == {f"{kind}/{name}" for kind in ("parameters", "gradients") for name in names}
    state = ens.member_state(1)["model"]
    for name in names:
        assert torch.equal(tensors[f"parameters/{name}"], state[name])
    assert tensors["gradients/net.fc1.weight"].abs().sum() > 0
    assert not torch.equal(tensors["parameters/net.fc1.weight"], ens.histogram_tensors(0)["parameters/net.fc1.weight"])


@pytest.mark.parametrize("mode", MODES)
def test_a_diverged_member_is_reported_alone_and_the_others_train_on(mode):
    """Member 0's weights are made NaN: its loss is NaN (on_nan=stop: the engine sees it per
    member) while member 1 trains exactly as in an ensemble without the broken member."""
    cfgs = configs("mlp", extra=["trainer.epochs=2"])
    clean = make_ensemble(cfgs, mode)
    broken = make_ensemble(cfgs, mode)
    state = broken.member_state(0)
    state["model"] = {k: torch.full_like(v, float("nan")) for k, v in state["model"].items()}
    broken.load_member_state(0, state)
    for ens in (clean, broken):
        ens.set_epoch(1)
    ours, theirs = broken.train_epoch(NoProgress()), clean.train_epoch(NoProgress())
    assert math.isnan(ours[0]["train/loss"]) and math.isfinite(theirs[0]["train/loss"])
    assert ours[1] == theirs[1]
    assert broken.evaluate("val")[1] == clean.evaluate("val")[1]


def test_on_nan_skip_skips_only_the_bad_members_steps():
    cfgs = configs("mlp", extra=["trainer.on_nan=skip"])
    ens = make_ensemble(cfgs, "auto")
    assert ens.execution == "sequential"
    state = ens.member_state(0)
    state["model"] = {k: torch.full_like(v, float("nan")) for k, v in state["model"].items()}
    ens.load_member_state(0, state)
    ens.set_epoch(1)
    metrics = ens.train_epoch(NoProgress())
    assert [m["train/skipped_steps"] for m in metrics] == [ens.steps_per_epoch, 0]
    assert math.isnan(metrics[0]["train/loss"]) and math.isfinite(metrics[1]["train/loss"])


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_one_optimizer_over_stacked_tensors_is_one_optimizer_per_member(name):
    """SGD (momentum, weight decay) and Adam update every element on its own: stepping stacked
    [M, ...] tensors gives each member's slice what its own optimizer gives it."""
    cfg = compose([f"optim={name}", "optim.weight_decay=0.01", *(["optim.momentum=0.9"] if name == "sgd" else [])]).optim
    torch.manual_seed(0)
    members = [torch.nn.Parameter(torch.randn(7, 5)) for _ in range(3)]
    stacked = torch.nn.Parameter(torch.stack([m.detach() for m in members]))
    own = [make_optimizer(cfg, torch.nn.ParameterList([m])) for m in members]
    together = make_optimizer(cfg, torch.nn.ParameterList([stacked]))
    for _ in range(4):
        grads = torch.randn(3, 7, 5)
        stacked.grad = grads.clone()
        together.step()
        for m, opt, g in zip(members, own, grads):
            m.grad = g.clone()
            opt.step()
    for i, m in enumerate(members):
        assert torch.allclose(stacked[i], m, rtol=1e-6, atol=0), (name, i)


def test_why_not_says_why():
    cfgs = configs("cnn")
    assert why_not(cfgs) is None
    assert why_not(configs("mlp")) is None
    seeds = [compose(["experiment=cifar10", "data.synthetic=true", f"seed={s}"]) for s in (0, 1)]
    assert "data.seed" in why_not(seeds)
    cases = {
        "optim.lr": configs("cnn", [["seed=0"], ["seed=1", "optim.lr=0.1"]]),
        "model.dropout_kind": configs("cnn", [["seed=0"], ["seed=1", "model.dropout_kind=vanilla"]]),
        "dropout sites": configs("cnn", [["seed=0"], ["seed=1", "model.conv_dropout=0.1"]]),
        "trainer.batch_size": configs("mlp", [["seed=0"], ["seed=1", "trainer.batch_size=5"]]),
    }
    for needle, members in cases.items():
        reason = why_not(members)
        assert reason is not None and needle in reason, (needle, reason)
    assert "no members" in why_not([])
    # Members that may differ: seed, the dropout settings (same sites), tracker.*.
    assert why_not(configs("cnn", [["seed=0", "model.conv_dropout=0.2", "model.dropout_schedule.kind=anneal"],
                                   ["seed=1", "model.conv_dropout=0.1", "tracker.group=x"]])) is None
    with pytest.raises(ValueError, match="optim.lr"):
        Ensemble(cases["optim.lr"], None)


def test_member_execution_auto_and_its_limits():
    cnn, cpu, cuda = configs("cnn"), torch.device("cpu"), torch.device("cuda")
    assert member_execution("auto", cnn, cpu) == "sequential"
    assert member_execution("auto", cnn, cuda) == "stacked"
    assert member_execution("auto", configs("mlp"), cpu) == "stacked"
    assert member_execution("stacked", cnn, cpu) == "stacked"
    skip = configs("cnn", extra=["trainer.on_nan=skip"])
    assert member_execution("auto", skip, cuda) == "sequential"
    with pytest.raises(ValueError, match="on_nan=skip"):
        member_execution("stacked", skip, cuda)
    with pytest.raises(ConfigError, match="sweep.member_execution"):
        compose(["sweep.member_execution=vmap"])
    stacked = [copy.deepcopy(cfg) for cfg in cnn]
    for cfg in stacked:
        OmegaConf.update(cfg, "sweep.member_execution", "stacked")
    assert make_ensemble(stacked, None).execution == "stacked", "the config key is honoured"
    assert make_ensemble(cnn, None).execution == "sequential"
