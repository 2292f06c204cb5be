"""Each dropout kind against its definition, with bounds taken from the binomial or normal
distribution; where the sites sit; schedules; the max-norm constraint; MC dropout on a linear
model (where its expectation is exact); and the calibration arithmetic.

Statistical checks allow Z standard deviations of the estimator under the definition: a correct
implementation falls outside with probability 7e-6 per check (and the seeds are fixed, so a
pass is a pass every time), while a wrong scale or rate is off by hundreds of deviations.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import reliability
from torch import nn

from dropstudy.config.compose import compose
from dropstudy.config.schema import DropoutKind
from dropstudy.data.datasets import Dataset, Split
from dropstudy.engine.steps import apply_max_norm
from dropstudy.model.dropout import (
    FORMULATIONS,
    DropoutSchedule,
    describe_sites,
    drops_anything,
    make_dropout,
    mc_dropout,
    sites,
)
from dropstudy.model.networks import CNN, MLP, build_model, weight_layers, weight_norms
from dropstudy.model.uncertainty import (
    Predictions,
    calibration,
    mc_forward,
    mc_metrics,
    predictions,
    predictive_entropy,
)

Z = 4.5
N = 200_000  # units per statistical check


def site(kind: str, p: float, feature_maps: bool = False) -> nn.Module:
    return make_dropout(kind, p, "test", feature_maps)


def test_every_configurable_kind_has_an_implementation():
    assert set(FORMULATIONS) | {"none"} == set(DropoutKind)
    assert make_dropout("none", 0.5, "test") is None


# --------------------------------------------------------------------------- definitions


def test_inverted_is_torch_dropout_for_the_same_generator_state():
    x = torch.randn(64, 300, requires_grad=True)
    torch.manual_seed(7)
    ours = site("inverted", 0.3).train()(x)
    torch.manual_seed(7)
    theirs = nn.Dropout(0.3).train()(x)
    assert torch.equal(ours, theirs)
    maps = torch.randn(16, 8, 5, 5)
    torch.manual_seed(7)
    ours = site("spatial", 0.3, feature_maps=True).train()(maps)
    torch.manual_seed(7)
    assert torch.equal(ours, nn.Dropout2d(0.3).train()(maps))


def test_vanilla_draws_the_same_mask_as_inverted_without_the_rescaling():
    x = torch.randn(64, 300)
    torch.manual_seed(3)
    inverted = site("inverted", 0.4).train()(x)
    torch.manual_seed(3)
    vanilla = site("vanilla", 0.4).train()(x)
    assert torch.equal(inverted == 0, vanilla == 0)
    assert torch.allclose(inverted, vanilla / 0.6)


@pytest.mark.parametrize("p", [0.2, 0.5])
@pytest.mark.parametrize(
    "kind,mean,var",
    [
        ("inverted", lambda p: 1.0, lambda p: p / (1 - p)),  # m/(1-p), m ~ Bernoulli(1-p)
        ("vanilla", lambda p: 1 - p, lambda p: p * (1 - p)),  # m
        ("gaussian", lambda p: 1.0, lambda p: p / (1 - p)),  # 1 + N(0, p/(1-p))
    ],
)
def test_training_mode_expectation(kind, mean, var, p):
    """inverted and gaussian preserve the expectation; vanilla scales it by the keep probability."""
    torch.manual_seed(1)
    x = torch.full((N,), 2.5)
    out = site(kind, p).train()(x)
    sd_of_mean = 2.5 * math.sqrt(var(p) / N)
    assert abs(out.mean().item() - 2.5 * mean(p)) <= Z * sd_of_mean


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_gaussian_noise_is_normal_with_variance_p_over_1_minus_p(p):
    torch.manual_seed(2)
    multiplier = site("gaussian", p).train()(torch.ones(N))
    sigma2 = p / (1 - p)
    # Sample variance of N normal draws: sd σ²·sqrt(2/(N-1)).
    assert abs(multiplier.var().item() - sigma2) <= Z * sigma2 * math.sqrt(2 / (N - 1))
    # Normal, not two-valued: no unit is dropped, and 68.27% lie within one σ of the mean.
    assert not (multiplier == 0).any()
    within = ((multiplier - 1).abs() <= math.sqrt(sigma2)).float().mean().item()
    q = math.erf(1 / math.sqrt(2))
    assert abs(within - q) <= Z * math.sqrt(q * (1 - q) / N)


@pytest.mark.parametrize("kind,scale", [("inverted", 1.0), ("gaussian", 1.0), ("spatial", 1.0), ("vanilla", 0.7)])
def test_evaluation_is_identity_or_the_keep_probability(kind, scale):
    x = torch.randn(32, 8, 4, 4)
    out = site(kind, 0.3, feature_maps=True).eval()(x)
    assert torch.equal(out, x) if scale == 1.0 else torch.equal(out, x * scale)


@pytest.mark.parametrize("kind,kept_grad", [("inverted", 1 / 0.6), ("vanilla", 1.0), ("spatial", 1 / 0.6)])
def test_no_gradient_flows_through_dropped_units(kind, kept_grad):
    torch.manual_seed(4)
    x = torch.randn(32, 16, 5, 5, requires_grad=True)
    out = site(kind, 0.4, feature_maps=True).train()(x)
    out.sum().backward()
    dropped = out == 0
    assert dropped.any() and (~dropped).any()
    assert (x.grad[dropped] == 0).all()
    assert torch.allclose(x.grad[~dropped], torch.tensor(kept_grad))


def test_p_zero_draws_nothing_so_every_kind_equals_no_dropout():
    x = torch.randn(8, 10)
    for kind in ("inverted", "vanilla", "gaussian"):
        state = torch.get_rng_state()
        assert torch.equal(site(kind, 0.0).train()(x), x)
        assert torch.equal(torch.get_rng_state(), state), kind


# --------------------------------------------------------------------------- sites


def test_mlp_sites_follow_the_config(clean_env):
    cfg = compose(["model.dropout_kind=vanilla", "model.dropout=[0.1,0.2,0.3]", "model.input_dropout=0.2"])
    assert describe_sites(build_model(cfg.model)) == [
        "net.drop_in (on the inputs): vanilla p=0.2",
        "net.drop1 (after fc1): vanilla p=0.1",
        "net.drop2 (after fc2): vanilla p=0.2",
        "net.drop3 (after fc3): vanilla p=0.3",
    ]
    assert sites(build_model(compose(["model.dropout_kind=none"]).model)) == []


def test_cnn_sites_spatial_on_feature_maps_only(clean_env):
    cfg = compose(["experiment=cifar10", "model.dropout_kind=spatial", "model.conv_dropout=[0.0,0.1,0.2]"])
    assert describe_sites(build_model(cfg.model)) == [
        "features.drop1 (after conv block 1): spatial p=0",
        "features.drop2 (after conv block 2): spatial p=0.1",
        "features.drop3 (after conv block 3): spatial p=0.2",
        "head.drop1 (before fc1): inverted p=0.25",
        "head.drop2 (before fc2): inverted p=0.25",
    ]


def test_adding_dropout_sites_does_not_change_the_initial_weights():
    """Arms compared in a study start from the same weights whatever their dropout sites."""
    torch.manual_seed(0)
    plain = CNN([4, 8, 8], 16, 10, [0.0, 0.0]).state_dict()
    torch.manual_seed(0)
    more = CNN([4, 8, 8], 16, 10, [0.5, 0.5], "spatial", 0.2, [0.3, 0.3, 0.3]).state_dict()
    assert plain.keys() == more.keys() and all(torch.equal(plain[k], more[k]) for k in plain)


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("constant", {1: 0.4, 6: 0.4, 11: 0.4, 40: 0.4}),
        ("warmup", {1: 0.0, 3: 0.08, 6: 0.2, 10: 0.36, 11: 0.4, 40: 0.4}),
        ("anneal", {1: 0.4, 3: 0.32, 6: 0.2, 10: 0.04, 11: 0.0, 40: 0.0}),
    ],
)
def test_schedule_values_at_given_epochs(kind, expected):
    schedule = DropoutSchedule(kind, epochs=10)
    assert {e: schedule.rate(0.4, e) for e in expected} == pytest.approx(expected)


def test_schedule_sets_every_site_and_reports_it():
    model = MLP(1, [4, 4], 1, [0.5, 0.2], "inverted", input_p=0.1)
    rates = DropoutSchedule("warmup", epochs=4).apply(model, epoch=3)
    assert rates == pytest.approx({"dropout/p/net.drop_in": 0.05, "dropout/p/net.drop1": 0.25,
                                   "dropout/p/net.drop2": 0.1})
    assert [s.p for _, s in sites(model)] == pytest.approx([0.05, 0.25, 0.1])
    assert [s.base_p for _, s in sites(model)] == [0.1, 0.5, 0.2], "the configured rate is kept"


# --------------------------------------------------------------------------- max-norm


def test_max_norm_holds_after_a_step_and_leaves_small_units_alone():
    torch.manual_seed(0)
    model = CNN([4, 8, 8], 16, 10, [0.0, 0.0])
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)  # a large step pushes many rows past c
    loss = nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,)))
    loss.backward()
    optimizer.step()
    c = 0.8
    before = {name: layer.weight.detach().clone().flatten(1) for name, layer in weight_layers(model)}
    assert any((w.norm(dim=1) > c).any() for w in before.values()), "the test needs rows above c"
    apply_max_norm(model, c)
    for name, layer in weight_layers(model):
        w, old = layer.weight.detach().flatten(1), before[name]
        norms, old_norms = w.norm(dim=1), old.norm(dim=1)
        assert (norms <= c * (1 + 1e-6)).all(), name
        small = old_norms <= c
        assert torch.equal(w[small], old[small]), "units within the ball are left alone"
        assert torch.allclose(norms[~small], torch.tensor(c), rtol=1e-5)
        assert torch.allclose(w[~small] / norms[~small, None], old[~small] / old_norms[~small, None], atol=1e-6)


def test_weight_norms_are_per_layer():
    model = MLP(2, [3], 1, [0.0])
    with torch.no_grad():
        model.net.fc1.weight.fill_(1.0)  # 3x2 ones: norm sqrt(6)
        model.net.out.weight.fill_(2.0)  # 1x3 twos: norm sqrt(12)
    assert weight_norms(model) == pytest.approx({"weights/l2/net.fc1": math.sqrt(6), "weights/l2/net.out": math.sqrt(12)})


# --------------------------------------------------------------------------- MC dropout


@pytest.mark.parametrize("kind,multiplier_var", [
    ("inverted", lambda p: p / (1 - p)), ("vanilla", lambda p: p * (1 - p)), ("gaussian", lambda p: p / (1 - p)),
])
def test_mc_mean_converges_to_the_deterministic_prediction_of_a_linear_model(kind, multiplier_var):
    """For dropout -> Linear, the expectation over masks is exactly the evaluation-mode output,
    so the MC mean must approach it at the rate its variance predicts."""
    p, d, samples = 0.4, 20, 4000
    torch.manual_seed(0)
    model = nn.Sequential(make_dropout(kind, p, "inputs"), nn.Linear(d, 3))
    x = torch.randn(6, d)
    with torch.no_grad():
        deterministic = model.eval()(x)
    mean, std = mc_forward(model, x, samples)
    assert not model.training, "the model's mode is restored"
    w = model[1].weight.detach()
    # One pass: Σ_j W_kj² x_j² Var(multiplier) around the deterministic output.
    sd = ((x**2) @ (w**2).T * multiplier_var(p)).sqrt()
    assert ((mean - deterministic).abs() <= Z * sd / math.sqrt(samples)).all()
    # The reported spread estimates that sd: a sample sd's relative error has sd sqrt((κ-1)/4T),
    # κ the kurtosis of one pass, a weighted sum of multipliers whose excess kurtosis is at most
    # the Bernoulli's |1 - 6pq|/pq (0 for the Gaussian's).
    pq = p * (1 - p)
    kurtosis = 3 + abs(1 - 6 * pq) / pq
    assert torch.allclose(std, sd, rtol=Z * math.sqrt((kurtosis - 1) / (4 * samples)))


def test_mc_dropout_switches_only_the_sites_and_restores_modes():
    model = MLP(3, [5], 1, [0.5])
    model.eval()
    with mc_dropout(model, one_draw_per_batch=True):
        assert model.net.drop1.training and not model.net.fc1.training
        torch.manual_seed(0)
        out = model.net.drop1(torch.ones(6, 5))
        assert (out == out[:1]).all(), "one thinned network for the whole batch"
    assert not model.training and not model.net.drop1.training and not model.net.drop1.one_draw_per_batch


def test_mc_passes_leave_the_training_random_stream_alone():
    model = MLP(3, [50], 1, [0.5])
    x = torch.randn(4, 3)
    torch.manual_seed(0)
    _, std = mc_forward(model, x, 20)
    after = torch.get_rng_state()
    torch.manual_seed(0)
    assert (std > 0).any(), "the passes did draw masks"
    assert torch.equal(after, torch.get_rng_state())


def test_mc_predictions_draw_new_masks_for_every_batch_of_a_split():
    """Batches of one split continue one random stream: the same inputs in two batches get
    different masks (not example j of every batch the same T masks)."""
    model = MLP(1, [50], 1, [0.5])
    split = Split(torch.ones(8, 1), torch.zeros(8, 1))
    data = Dataset("regression", split, split, split, source="ones")
    torch.manual_seed(0)
    pred = predictions(model, data, split, batch_size=4, samples=3)
    assert not torch.equal(pred.mean[:4], pred.mean[4:])
    torch.manual_seed(0)
    assert torch.equal(predictions(model, data, split, batch_size=4, samples=3).mean, pred.mean), "seeded"
    assert torch.equal(predictions(model, data, split, batch_size=4).mean[:4], model.eval()(torch.ones(4, 1)))


def test_mc_forward_without_stochastic_sites_is_the_deterministic_output():
    model = MLP(3, [5], 1, [0.0])
    assert not drops_anything(model)
    x = torch.randn(4, 3)
    mean, std = mc_forward(model, x, 50)
    assert torch.equal(mean, model.eval()(x).detach()) and (std == 0).all()


def test_calibration_bins_and_ece():
    probs = torch.tensor([[0.95, 0.05], [0.25, 0.75], [0.65, 0.35], [0.62, 0.38]])
    targets = torch.tensor([0, 0, 0, 0])  # correct, wrong, correct, correct
    cal = calibration(probs, targets, bins=10)
    assert cal.count == [0, 0, 0, 0, 0, 0, 2, 1, 0, 1]
    assert cal.accuracy[6] == 1.0 and cal.accuracy[7] == 0.0 and math.isnan(cal.accuracy[0])
    # ECE = (|1 - 0.95| + |0 - 0.75| + |2 - (0.65 + 0.62)|) / 4
    assert cal.ece == pytest.approx((0.05 + 0.75 + 0.73) / 4, abs=1e-6)
    entropy = predictive_entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    assert entropy.tolist() == pytest.approx([math.log(2), 0.0])


def test_ece_over_every_bin_equals_a_hand_computation():
    """Predictions from near-uniform to near-certain, right about 60% of the time: the ECE and the
    reliability points (15 bins, the metric's default) agree with a plain per-bin computation."""
    g = torch.Generator().manual_seed(0)
    n = 3000
    probs = (torch.randn(n, 10, generator=g) * torch.linspace(0.2, 8, n).unsqueeze(1)).softmax(-1)
    right = torch.rand(n, generator=g) < 0.6
    targets = torch.where(right, probs.argmax(1), torch.randint(0, 10, (n,), generator=g))
    ece, points = reliability(probs.double().numpy(), targets.numpy())
    assert len(points) >= 12, "the predictions fill most bins"
    cal = calibration(probs, targets)
    assert cal.ece == pytest.approx(ece, abs=1e-6)
    drawn = [(c, a) for c, a, k in zip(cal.confidence, cal.accuracy, cal.count) if k]
    assert drawn == [(pytest.approx(c, abs=1e-6), pytest.approx(a, abs=1e-9)) for c, a in points]
    assert mc_metrics(Predictions(probs, None, targets, 5), "classification")["ece"] == cal.ece
