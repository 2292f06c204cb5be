"""The one backend (backend.Backend), built directly from composed configs: M members of the MLP or
the CNN, each what `dropstudy train` gives it (its own data, batch order, random stream, optimizer
state and p), executed stacked or sequentially; its members' state in the single run's layout;
dropout drawing each unit with its member's p; and the rules for which members may batch.

Statistical checks allow Z = 6 standard deviations of the estimator under the definition: a
correct implementation falls outside with probability 2e-9 per check (and the seeds are fixed, so
a pass is a pass every time), while a wrong rate or a shared mask is off by dozens of them.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.func import functional_call, vmap

from dropstudy.config.checks import ConfigError
from dropstudy.config.compose import compose
from dropstudy.engine.backend import Backend
from dropstudy.engine.batching import member_execution, why_not
from dropstudy.engine.runtime import FastPaths, set_up_process
from dropstudy.engine.steps import evaluate, make_optimizer
from dropstudy.model.dropout import make_dropout
from dropstudy.model.networks import build_model
from dropstudy.runs.execute import Member, load_member_data

# Stacked, a member's matmuls (and the CNN's convolutions) are batched and sum in another order
# than its single model's: float32 rounding, well under 1e-5 here.
RTOL, ATOL = 1e-5, 1e-7
Z = 6.0
MODES = ["stacked", "sequential"]

# Every path a member has of its own: shuffled minibatches (a short last batch too), max-norm that
# bites, MC-dropout evaluation; the CNN also augments.
MLP = ["device=cpu", "trainer.epochs=10", "trainer.eval_every=5", "trainer.log_every=5", "trainer.batch_size=4",
       "optim.max_norm=0.5", "eval.mc_samples=4"]
CNN = ["experiment=cifar10", "device=cpu", "data.synthetic=true", "data.subset=128", "data.val_size=32",
       "trainer.batch_size=32", "trainer.epochs=2", "data.seed=0", "data.augment=true", "optim.max_norm=0.5",
       "eval.mc_samples=2"]
BASES = {"mlp": MLP, "cnn": CNN}
# Member 1 (seed 1, dropout 0) is the one whose numbers stacked and sequential execution share;
# member 0 drops beside it.
MEMBERS = [["seed=0", "model.dropout=0.5"], ["seed=1", "model.dropout=0.0"]]
# The CNN's runs take about a minute of CPU between them: slow; the MLP's cover the same code.
MODELS = ["mlp", pytest.param("cnn", marks=pytest.mark.slow)]


class NoProgress:
    def advance(self, steps: int = 1) -> None:
        pass


def configs(model: str, members=MEMBERS, extra=()):
    return [compose([*BASES[model], *extra, *m]) for m in members]


def make_backend(cfgs, execution: str | None = None, **kwargs) -> Backend:
    """The backend as execute.train_members builds it for these members."""
    device = set_up_process(cfgs[0])
    datas = load_member_data([Member(cfg, Path("unused"), []) for cfg in cfgs], device)
    return Backend(cfgs, datas, FastPaths.resolve(cfgs[0].trainer, device), execution=execution, **kwargs)


def train_rows(backend: Backend, trainer) -> list[list[dict]]:
    """Each member's metric rows as the run engine assembles them (its cadence)."""
    rows: list[list[dict]] = [[] for _ in range(backend.members)]
    for epoch in range(1, trainer.epochs + 1):
        rates = backend.set_epoch(epoch)
        train = backend.train_epoch(NoProgress())
        evaluated = epoch % trainer.eval_every == 0 or epoch == trainer.epochs
        val = backend.evaluate("val") if evaluated else [{}] * backend.members
        train_eval = backend.evaluate("train_eval") if evaluated else [{}] * backend.members
        norms = backend.weight_norms() if evaluated else [{}] * backend.members
        if evaluated or epoch % trainer.log_every == 0:
            for i in range(backend.members):
                rows[i].append({"epoch": epoch, **train[i], **rates[i], **val[i], **train_eval[i], **norms[i]})
    for i, test in enumerate(backend.evaluate("test")):
        rows[i].append({"epoch": trainer.epochs, **test})
    return rows


@pytest.fixture(scope="module")
def batch_rows():
    """The two members trained as one batch, and each alone (M=1, as `dropstudy train` builds
    it): their rows, once per model and execution."""
    runs: dict[tuple, list[list[dict]]] = {}

    def run(model: str, mode: str, alone: int | None = None) -> list[list[dict]]:
        key = (model, mode, alone)
        if key not in runs:
            cfgs = configs(model)
            if alone is not None:
                cfgs = [cfgs[alone]]
            runs[key] = train_rows(make_backend(cfgs, mode), cfgs[0].trainer)
        return runs[key]

    return run


def assert_rows_match(ours: list[dict], theirs: list[dict], what: str, rtol: float = RTOL) -> None:
    assert [r["epoch"] for r in ours] == [r["epoch"] for r in theirs], what
    for mine, other in zip(ours, theirs):
        assert mine.keys() == other.keys(), (what, sorted(mine.keys() ^ other.keys()))
        for key in other.keys() - {"epoch"}:
            assert mine[key] == pytest.approx(other[key], rel=rtol, abs=ATOL), (what, mine["epoch"], key)


# --------------------------------------------------------------------------- a member is its single run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", MODELS)
def test_each_member_gives_every_metric_of_its_single_run(batch_rows, model, mode):
    """Initial weights, batch order and crops from the member's seed, its own masks, optimizer
    state and max-norm, evaluation with MC dropout and the weight norms: every row, for the
    dropping member and the p=0 one, as a backend of its config alone (what `train` builds)."""
    batch = batch_rows(model, mode)
    # vmap's masks (the CNN stacked) come from one global stream the members share: there only
    # the p=0 member is its single run.
    for i in [1] if (model, mode) == ("cnn", "stacked") else [0, 1]:
        assert_rows_match(batch[i], batch_rows(model, mode, alone=i)[0], f"{model} {mode} member {i}")
    assert any("val_mc/loss" in r for r in batch[0]) and any("test_mc/loss" in r for r in batch[0])


@pytest.mark.parametrize("model", MODELS)
def test_stacked_and_sequential_execution_agree_for_a_p0_member(batch_rows, model):
    stacked, sequential = batch_rows(model, "stacked")[1], batch_rows(model, "sequential")[1]
    assert_rows_match(stacked, sequential, model)
    # The dropping member beside it trained with its own masks: another curve than member 1's.
    assert batch_rows(model, "stacked")[0][0]["train/loss"] != stacked[0]["train/loss"]


@pytest.mark.parametrize("kind", ["vanilla", "inverted", "gaussian"])
def test_the_stacked_mlp_evaluates_each_member_as_its_own_module(kind):
    """The hand-written stacked forward against each member's plain module in evaluation mode:
    every site its own p (the input site too), vanilla's scaling by 1-p. A train-against-batch
    comparison cannot see a mistake here, since `train` of the MLP runs this same forward."""
    extra = [f"model.dropout_kind={kind}", "model.hidden=[32,32]"]
    members = [["seed=0", "model.dropout=[0.5,0.1]", "model.input_dropout=0.2"],
               ["seed=1", "model.dropout=[0.2,0.4]", "model.input_dropout=0.3"]]
    backend = make_backend(configs("mlp", members, extra), "stacked")
    assert backend.hand_mlp
    backend.set_epoch(1)
    x = torch.linspace(-1, 1, 7).unsqueeze(1)
    with torch.no_grad():
        stacked = backend._forward(x.expand(2, -1, -1), training=False)
        for i in range(2):
            assert torch.allclose(stacked[i], backend.member_model(i).eval()(x), rtol=1e-5, atol=1e-6), (kind, i)


@pytest.mark.parametrize("optim", ["optim.momentum=0.9", "optim=adam"])
def test_a_stacked_mlp_member_draws_the_masks_of_its_own_single_run(optim):
    """Per-member random streams: member i of a stacked batch (input dropout, dropout, a warmup,
    max-norm, minibatches) ends 3 epochs with the weights an M=1 backend of its own config ends
    with, whatever the members beside it; a member on another's stream would not."""
    extra = ["trainer.epochs=3", optim, "model.input_dropout=0.2", "model.dropout_schedule.kind=warmup",
             "model.dropout_schedule.epochs=2", "model.hidden=[32,32]"]
    members = [["seed=0", "model.dropout=0.5"], ["seed=1", "model.dropout=0.3"], ["seed=2", "model.dropout=0.5"]]
    cfgs = configs("mlp", members, extra)
    batch = make_backend(cfgs)
    assert batch.execution == "stacked" and batch.hand_mlp
    train_rows(batch, cfgs[0].trainer)
    weights = []
    for i, cfg in enumerate(cfgs):
        alone = make_backend([cfg])
        assert alone.execution == "stacked" and alone.hand_mlp, "`dropstudy train` of the MLP"
        train_rows(alone, cfg.trainer)
        ours, theirs = batch.member_state(i)["model"], alone.member_state(0)["model"]
        for name in theirs:
            assert torch.allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-7), (i, name)
        weights.append(ours["net.fc1.weight"])
    assert not torch.allclose(weights[0], weights[2], rtol=1e-3), "the same p, their own masks"


# --------------------------------------------------------------------------- dropout: p per member


KINDS = ["inverted", "vanilla", "gaussian", "spatial"]
RATES = [0.0, 0.3, 0.5, 0.5, 0.25]  # members 2 and 3 share p: their masks must still be their own
UNITS = 40_000  # per member


def site_masks(kind: str) -> torch.Tensor:
    """Single runs: one site module per member with its float p, drawn in turn."""
    torch.manual_seed(0)
    shape = (UNITS // 4, 1, 2, 2) if kind == "spatial" else (UNITS, 1)
    return torch.stack([make_dropout(kind, p, "test", feature_maps=True).train()(torch.ones(shape)) for p in RATES])


def vmap_masks(kind: str) -> torch.Tensor:
    """Stacked members under vmap, as the backend's template site draws them: its stacked `rate`
    buffers through functional_call, one draw per member (randomness="different")."""
    torch.manual_seed(0)
    site = make_dropout(kind, 0.5, "test", feature_maps=True).train()
    site.rate_from_buffer = True
    shape = (UNITS // 4, 1, 2, 2) if kind == "spatial" else (UNITS, 1)
    ones = torch.ones(shape)
    return vmap(lambda r: functional_call(site, {"rate": r}, (ones,)), randomness="different")(torch.tensor(RATES))


def hand_mlp_masks(kind: str) -> torch.Tensor:
    """The backend's hand-written stacked MLP forward, each member's p from its config (the last
    warmed up to half its 0.5 at epoch 2) and masks from its own stream. With fc1 = 0 weights and
    1 biases every hidden unit is 1 before its site and out = sum of the site's outputs, so the
    output weights' gradient is the site's output unit by unit: [M, UNITS, 1]."""
    members = [[f"seed={i}", f"model.dropout={p}"] for i, p in enumerate(RATES[:-1])]
    members.append([f"seed={len(RATES) - 1}", "model.dropout=0.5", "model.dropout_schedule.kind=warmup",
                    "model.dropout_schedule.epochs=2"])
    cfgs = [compose(["device=cpu", f"model.hidden=[{UNITS}]", f"model.dropout_kind={kind}", *m]) for m in members]
    backend = make_backend(cfgs)
    assert backend.hand_mlp
    assert [r["dropout/p/net.drop1"] for r in backend.set_epoch(2)] == RATES
    params = backend.params
    with torch.no_grad():
        params["net.fc1.weight"].zero_()
        params["net.fc1.bias"].fill_(1.0)
    with torch.enable_grad():
        backend._forward(torch.ones(len(RATES), 1, 1), training=True).sum().backward()
    return params["net.out.weight"].grad.clone()  # stored [M, in, out]


MASK_FORMS = {"site": site_masks, "vmap": vmap_masks, "hand_mlp": hand_mlp_masks}
# The MLP's sites see vectors, where `spatial` is inverted dropout (models.make_dropout).
MASK_CASES = [(kind, form) for kind in KINDS for form in MASK_FORMS if (kind, form) != ("spatial", "hand_mlp")]


@pytest.mark.parametrize("kind,form", MASK_CASES)
def test_each_member_drops_each_unit_with_its_own_p_and_its_own_masks(kind, form):
    """Per member, the fraction of dropped units (whole feature maps, for spatial) is
    Binomial(n, p)/n around its p, kept units carry the kind's scale (1/(1-p) inverted, 1 vanilla),
    and two members with the same p agree on a unit with probability p² + (1-p)² = 1/2, as
    independent masks do. For gaussian the multiplier's sample variance is within Z·σ²·sqrt(2/n)
    of σ² = p/(1-p), and two members' noises are uncorrelated (|r| within Z/sqrt(n))."""
    with torch.no_grad():
        out = MASK_FORMS[form](kind)
    assert out.shape[0] == len(RATES)
    if kind == "spatial":
        assert torch.equal(out.amax(dim=(2, 3)), out.amin(dim=(2, 3))), "whole feature maps"
    units = out.reshape(len(RATES), -1, *out.shape[-2:])[..., 0, 0] if kind == "spatial" else out.reshape(len(RATES), -1)
    n = units.shape[1]
    assert n >= UNITS // 4
    for i, p in enumerate(RATES):
        if kind == "gaussian":
            var = p / (1 - p)
            assert not (units[i] == 0).any(), "gaussian drops no unit"
            assert abs(units[i].var().item() - var) <= Z * var * math.sqrt(2 / (n - 1)) + 1e-12, (i, p)
            assert abs(units[i].mean().item() - 1) <= Z * math.sqrt(var / n) + 1e-12, (i, p)
            continue
        dropped = (units[i] == 0).float().mean().item()
        assert abs(dropped - p) <= Z * math.sqrt(p * (1 - p) / n) + 1e-12, (kind, form, i, p, dropped)
        kept = units[i][units[i] != 0]
        scale = 1.0 if kind == "vanilla" else 1 / (1 - p)
        assert torch.allclose(kept, torch.full_like(kept, scale)), (kind, form, i)
    a, b = units[2], units[3]
    if kind == "gaussian":
        r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(r) <= Z / math.sqrt(n), r
    else:
        agree = ((a == 0) == (b == 0)).float().mean().item()
        assert abs(agree - 0.5) <= Z * math.sqrt(0.25 / n), agree


@pytest.mark.parametrize("kind", KINDS)
def test_the_tensor_p_form_evaluates_as_the_float_p_form_and_p0_is_the_input(kind):
    site = make_dropout(kind, 0.3, "test", feature_maps=True)
    x = torch.randn(4, 3, 5, 5)
    site.eval()
    assert torch.equal(site.drop_rate(x, site.rate), site.drop(x))
    site.train()
    assert torch.equal(site.drop_rate(x, torch.tensor(0.0)), x), "p=0 draws a mask of ones and scales by 1"


def test_the_rate_buffer_follows_p_and_stays_out_of_checkpoints():
    model = build_model(compose(["model.dropout=0.5"]).model)
    site = model.net.drop1
    site.p = 0.2
    assert site.rate.item() == pytest.approx(0.2)
    assert not any(key.endswith("rate") for key in model.state_dict())


@pytest.mark.parametrize("mode", MODES)
def test_mc_dropout_evaluation_of_a_cifar10_member_scores_its_own_rows(mode):
    """CIFAR-10's validation split is rows (Split.index) of the shared training images: MC
    dropout's predictions must be scored against those rows' labels, not the whole tensor's."""
    cfgs = configs("cnn", extra=["data.subset=64", "data.val_size=16", "data.augment=false"])
    backend = make_backend(cfgs, mode)
    assert backend.datas[0].val.index is not None
    val = backend.evaluate("val")
    for i, metrics in enumerate(val):
        split = backend.datas[i].val
        assert not torch.equal(split.targets, split.base_targets[:16]), "the case bites: rows, not the first 16"
        pred = backend.mc_predictions["val"][i]
        assert len(pred.targets) == len(pred.mean) == len(split) == 16
        assert torch.equal(pred.targets, split.targets)
        accuracy = (pred.mean.argmax(1) == split.targets).float().mean().item()
        assert metrics["val_mc/acc"] == pytest.approx(accuracy), (i, metrics)
        assert math.isfinite(metrics["val_mc/loss"]), (i, metrics)


# --------------------------------------------------------------------------- members' state


def assert_equal_trees(a, b) -> None:
    if torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal_trees(a[key], b[key])
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal_trees(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", MODELS)
def test_member_state_loads_into_the_single_model_and_resumes_exactly(model, mode, tmp_path):
    """After an epoch, each member's checkpoint body (through torch.save and load):
    - loads into build_model and its optimizer into make_optimizer as `dropstudy resume` loads
      them, and evaluates as the member did;
    - a batch restored from them (and the shared state) trains on exactly as the batch never
      stopped, and hands back the same state (masks' generators included);
    - an M=1 backend of the dropping member's config restored from its state trains its next
      epoch as the batch does (its own stream: it needs none of the others')."""
    cfgs = configs(model, extra=["trainer.epochs=3"])
    batch = make_backend(cfgs, mode)
    batch.set_epoch(1)
    batch.train_epoch(NoProgress())
    snapshot = batch.snapshot()
    states = [snapshot.member_state(i) for i in range(batch.members)]
    torch.save({"states": states, "shared": snapshot.shared_state()}, tmp_path / "last.pt")
    saved = torch.load(tmp_path / "last.pt", weights_only=False)
    val = batch.evaluate("val")

    fast = FastPaths.resolve(cfgs[0].trainer, torch.device("cpu"))
    single = fast.prepare_model(build_model(cfgs[0].model))
    single.load_state_dict(saved["states"][0]["model"])
    make_optimizer(cfgs[0].optim, single).load_state_dict(saved["states"][0]["optimizer"])
    data = batch.datas[0]
    alone = evaluate(single, data, data.val, cfgs[0].trainer.eval_batch_size, fast)
    assert alone["loss"] == pytest.approx(val[0]["val/loss"], rel=RTOL)

    restored = make_backend(cfgs, mode)
    for i, state in enumerate(saved["states"]):
        restored.load_member_state(i, state)
    restored.load_shared_state(saved["shared"])
    for i in range(batch.members):
        again = restored.member_state(i)
        assert_equal_trees(again["model"], states[i]["model"])
        assert_equal_trees(again["optimizer"], states[i]["optimizer"])
    one = make_backend(cfgs[:1], mode)
    one.load_member_state(0, saved["states"][0])
    # vmap's masks (the CNN stacked) come from the one global stream the members share: each
    # backend continues its own copy of it.
    streams = [saved["shared"], saved["shared"]]
    for epoch in (2, 3):
        metrics = []
        for k, backend in enumerate((batch, restored)):
            backend.load_shared_state(streams[k])
            backend.set_epoch(epoch)
            metrics.append(backend.train_epoch(NoProgress()))
            streams[k] = backend.shared_state()
        assert metrics[0] == metrics[1], epoch
        if epoch == 2 and not saved["shared"]:
            one.set_epoch(epoch)
            assert one.train_epoch(NoProgress())[0]["train/loss"] == pytest.approx(metrics[0][0]["train/loss"], rel=RTOL)
    assert batch.evaluate("val") == restored.evaluate("val")
    for i in range(batch.members):
        assert_equal_trees(restored.member_state(i), batch.member_state(i))
    if batch.hand_mlp:
        assert all("masks" in s["rng"] for s in states), "the stacked MLP's mask generators are saved"


@pytest.mark.parametrize("hand_mlp", [True, False], ids=["hand MLP", "vmap"])
def test_mc_evaluation_leaves_the_stacked_members_training_as_it_was(hand_mlp):
    """Evaluating with MC dropout between epochs draws from forks of the members' streams: the
    training that follows is that of the same members without it (also vmap's shared stream)."""
    train = []
    for mc in (0, 4):
        torch.manual_seed(0)
        backend = make_backend(configs("mlp", extra=[f"eval.mc_samples={mc}"]), "stacked", hand_mlp=hand_mlp)
        losses = []
        for epoch in (1, 2, 3):
            backend.set_epoch(epoch)
            losses.append([row["train/loss"] for row in backend.train_epoch(NoProgress())])
            assert ("val_mc/loss" in backend.evaluate("val")[0]) == bool(mc)
        train.append(losses)
    assert train[0] == train[1]


@pytest.mark.parametrize("mode", MODES)
def test_histogram_tensors_carry_the_single_models_names(mode):
    cfgs = configs("mlp")
    backend = make_backend(cfgs, mode)
    backend.set_epoch(1)
    backend.train_epoch(NoProgress())
    tensors = backend.histogram_tensors(1)
    names = [name for name, _ in build_model(cfgs[1].model).named_parameters()]
    assert set(tensors) == {f"{kind}/{name}" for kind in ("parameters", "gradients") for name in names}
    state = backend.member_state(1)["model"]
    for name in names:
        # The values of the member's tensor (a histogram does not depend on the layout).
        assert torch.equal(tensors[f"parameters/{name}"].flatten().sort().values, state[name].flatten().sort().values)
        assert tensors[f"gradients/{name}"].numel() == state[name].numel(), name
    assert tensors["gradients/net.fc1.weight"].abs().sum() > 0
    for kind in ("parameters", "gradients"):  # member 1's own, not member 0's
        assert not torch.equal(tensors[f"{kind}/net.fc1.weight"], backend.histogram_tensors(0)[f"{kind}/net.fc1.weight"])


# --------------------------------------------------------------------------- a member that goes wrong


def with_nan_weights(backend: Backend, i: int) -> None:
    state = backend.member_state(i)
    state["model"] = {k: torch.full_like(v, float("nan")) for k, v in state["model"].items()}
    backend.load_member_state(i, state)


@pytest.mark.parametrize("mode", MODES)
def test_a_diverged_member_is_reported_alone_and_the_others_train_on(mode):
    """Member 0's weights are made NaN: its loss is NaN (on_nan=stop: the engine sees it per
    member) while member 1 trains exactly as in a batch without the broken member."""
    cfgs = configs("mlp", extra=["trainer.epochs=2"])
    clean, broken = make_backend(cfgs, mode), make_backend(cfgs, mode)
    with_nan_weights(broken, 0)
    for backend in (clean, broken):
        backend.set_epoch(1)
    ours, theirs = broken.train_epoch(NoProgress()), clean.train_epoch(NoProgress())
    assert math.isnan(ours[0]["train/loss"]) and math.isfinite(theirs[0]["train/loss"])
    assert ours[1] == theirs[1]
    assert broken.evaluate("val")[1] == clean.evaluate("val")[1]


def test_on_nan_skip_skips_only_the_bad_members_steps():
    cfgs = configs("mlp", extra=["trainer.on_nan=skip", "optim.momentum=0.9"])
    backend = make_backend(cfgs)
    assert backend.execution == "sequential"
    with_nan_weights(backend, 0)
    backend.set_epoch(1)
    metrics = backend.train_epoch(NoProgress())
    assert [m["train/skipped_steps"] for m in metrics] == [backend.steps_per_epoch, 0]
    assert math.isnan(metrics[0]["train/loss"]) and math.isfinite(metrics[1]["train/loss"])
    # A skipped step leaves the optimizer alone: member 0's never stepped (no momentum buffers).
    assert not backend.optimizers[0].state and backend.optimizers[1].state


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


# --------------------------------------------------------------------------- which members batch, and how


def test_why_not_says_why():
    assert why_not(configs("cnn")) is None
    assert why_not(configs("mlp")) is None
    # data.seed picks each member's rows of one shared copy of the data: members may differ in it.
    seeds = [compose(["experiment=cifar10", "data.synthetic=true", f"seed={s}"]) for s in (0, 1)]
    assert seeds[0].data.seed != seeds[1].data.seed and why_not(seeds) is None
    assert why_not(configs("mlp", [["seed=0", "data.seed=7"], ["seed=1"]])) is None
    cases = {
        "optim.lr": configs("cnn", [["seed=0"], ["seed=1", "optim.lr=0.1"]]),
        "model.dropout_kind": configs("cnn", [["seed=0"], ["seed=1", "model.dropout_kind=vanilla"]]),
        "dropout sites": configs("cnn", [["seed=0"], ["seed=1", "model.conv_dropout=0.1"]]),
        "trainer.batch_size": configs("mlp", [["seed=0"], ["seed=1", "trainer.batch_size=5"]]),
        "trainer.epochs": configs("mlp", [["seed=0"], ["seed=1", "trainer.epochs=30"]]),
        "members differ in": [compose(["seed=0"]), compose(["experiment=cifar10", "data.synthetic=true", "seed=1"])],
    }
    for needle, members in cases.items():
        reason = why_not(members)
        assert reason is not None and needle in reason, (needle, reason)
    assert "no members" in why_not([])
    # Members that may differ: seed, data.seed, the dropout settings (same sites), tracker.*.
    assert why_not(configs("cnn", [["seed=0", "model.conv_dropout=0.2", "model.dropout_schedule.kind=anneal"],
                                   ["seed=1", "model.conv_dropout=0.1", "tracker.group=x"]])) is None
    with pytest.raises(ValueError, match="optim.lr"):
        Backend(cases["optim.lr"], [None, None])


def test_member_execution_auto_and_its_limits():
    cnn, cpu, cuda = configs("cnn"), torch.device("cpu"), torch.device("cuda")
    assert member_execution("auto", cnn, cpu) == "sequential"
    assert member_execution("auto", cnn, cuda) == "stacked"
    assert member_execution("auto", cnn[:1], cuda) == "sequential", "one CNN: nothing to stack"
    assert member_execution("auto", configs("mlp"), cpu) == "stacked"
    assert member_execution("auto", configs("mlp")[:1], cpu) == "stacked", "`train` of the MLP"
    assert member_execution("stacked", cnn, cpu) == "stacked"
    for key in ("trainer.on_nan=skip", "trainer.compile=true"):
        for model in ("mlp", "cnn"):
            limited = configs(model, extra=[key])
            assert member_execution("auto", limited, cuda) == "sequential", key
            assert member_execution("auto", limited, cpu) == "sequential", key
            with pytest.raises(ValueError, match=key):
                member_execution("stacked", limited, cuda)
    with pytest.raises(ConfigError, match="sweep.member_execution"):
        compose(["sweep.member_execution=vmap"])
    stacked = [copy.deepcopy(cfg) for cfg in cnn]
    for cfg in stacked:
        OmegaConf.update(cfg, "sweep.member_execution", "stacked")
    assert make_backend(stacked).execution == "stacked", "the config key is honoured"
    assert make_backend(cnn).execution == "sequential"
