"""`dropstudy demo NAME`: small, seeded demonstrations of dropout's mechanics, printed and plotted.

Each demo runs the package's own dropout sites (dropout.make_dropout) on tiny inputs, so what
it shows is what training uses. A demo returns the lines to print and the figures it wrote;
the same seed gives the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # each demo imports these itself, so that `dropstudy demo --list` and a bad name need neither
    import matplotlib.pyplot as plt
    import torch

Z95 = 1.959964  # two-sided 95% quantile of the standard normal


@dataclass
class DemoResult:
    lines: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)

    def say(self, line: str = "") -> None:
        self.lines.append(line)


def _figure(**kwargs: Any) -> tuple[plt.Figure, Any]:
    """A demo's figure and axes, laid out as the package's other figures are (no label cut)."""
    from dropstudy.report.plots import FIGURE_DPI, plt

    return plt.subplots(layout="constrained", dpi=FIGURE_DPI, **kwargs)


def _save(fig: plt.Figure, path: Path) -> Path:
    from dropstudy.report.plots import plt, save_figure

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def _normal_pdf(xs: torch.Tensor, mean: float, sd: float) -> torch.Tensor:
    import torch

    return torch.exp(-0.5 * ((xs - mean) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))


# --------------------------------------------------------------------------- scaling


def scaling(out: Path, seed: int) -> DemoResult:
    """Dropout(0.5) -> Linear(10000 -> 1, no bias, weights 1) -> ReLU on 10,000 ones, inverted
    and vanilla: the training-mode output around its expectation, the evaluation output exact."""
    import torch
    from torch import nn

    from dropstudy.model.dropout import make_dropout

    n, p, draws = 10_000, 0.5, 1_000
    keep = 1.0 - p
    x = torch.ones(1, n)
    r = DemoResult()
    r.say(f"Dropout(p={p:g}) -> Linear({n} -> 1, no bias, weights 1) -> ReLU, on a vector of {n:,} ones "
          f"(seed {seed})")
    samples: dict[str, torch.Tensor] = {}
    exact: dict[str, float] = {}
    for kind, expected, sd, how in (
        ("inverted", n, math.sqrt(n * p * keep) / keep,
         f"(torch.nn.Dropout) kept units scaled by 1/(1-p) = {1 / keep:g} in training, identity at evaluation"),
        ("vanilla", n * keep, math.sqrt(n * p * keep),
         f"(the original) no rescaling in training; at evaluation the weights are scaled by the keep probability 1-p = {keep:g}"),
    ):
        drop = make_dropout(kind, p, "on the inputs")
        linear = nn.Linear(n, 1, bias=False)
        nn.init.ones_(linear.weight)
        layer = nn.Sequential(drop, linear, nn.ReLU())
        torch.manual_seed(seed)
        with torch.no_grad():
            one = layer.train()(x).item()
            samples[kind] = layer(x.repeat(draws, 1)).squeeze(1)
            evaluation = layer.eval()(x).item()
            if kind == "vanilla":
                # The original paper's form: no dropout at test time, outgoing weights times 1-p.
                # model.dropout_kind=vanilla scales the activations instead; the output is the same.
                by_weights = torch.relu(x @ (linear.weight * keep).T).item()
                assert by_weights == evaluation, (by_weights, evaluation)
        exact[kind] = evaluation
        z = (one - expected) / sd
        r.say()
        r.say(f"{kind} {how}")
        r.say(f"  training mode, one draw: {one:>9,.0f}   expected {expected:,.0f}, binomial sd {sd:,.0f} "
              f"(z = {z:+.2f})")
        r.say(f"  evaluation mode:         {evaluation:>9,.0f}   exactly"
              + (" (weights x keep probability)" if kind == "vanilla" else ""))
        r.say(f"  {draws:,} training draws:    mean {samples[kind].mean().item():,.1f}, "
              f"sd {samples[kind].std().item():,.1f}")
    r.say()
    r.say("Both formulations agree between training and evaluation: each evaluation output is the "
          f"expectation of its training output (inverted {exact['inverted']:,.0f}, vanilla {exact['vanilla']:,.0f}).")

    fig, axes = _figure(nrows=1, ncols=2, figsize=(10.4, 3.8))
    for ax, (kind, values), color in zip(axes, samples.items(), ("tab:blue", "tab:red")):
        mean = n if kind == "inverted" else n * keep
        sd = math.sqrt(n * p * keep) / (keep if kind == "inverted" else 1.0)
        ax.hist(values.tolist(), bins=40, density=True, color=color, alpha=0.5, label=f"{draws:,} training draws")
        grid = torch.linspace(mean - 4 * sd, mean + 4 * sd, 200)
        ax.plot(grid.tolist(), _normal_pdf(grid, mean, sd).tolist(), color="k", lw=1,
                label=f"binomial: mean {mean:,.0f}, sd {sd:,.0f}")
        ax.axvline(exact[kind], color=color, lw=2, ls="--", label=f"evaluation output {exact[kind]:,.0f}")
        ax.set_title(f"{kind} dropout, p = {p:g}")
        ax.set_xlabel("layer output")
        ax.set_ylabel("density (per unit of output)")
        ax.legend(fontsize=8)
    fig.suptitle(f"Dropout({p:g}) -> Linear({n}->1, weights 1) -> ReLU on {n:,} ones")
    r.figures.append(_save(fig, out / "scaling.png"))
    return r


# --------------------------------------------------------------------------- masks


def masks(out: Path, seed: int) -> DemoResult:
    """The masks inverted dropout draws for a layer of 12 units over a few steps, and the
    empirical drop rate against p over many steps."""
    import torch

    from dropstudy.model.dropout import make_dropout

    units, shown, steps = 12, 8, 10_000
    rates = (0.1, 0.2, 0.5, 0.8)
    p = 0.5
    r = DemoResult()
    site = make_dropout("inverted", p, "demo").train()
    torch.manual_seed(seed)
    with torch.no_grad():
        picture = site(torch.ones(40, units))
    r.say(f"masks: inverted dropout, p={p:g}, on a layer of {units} units, one row per training step (seed {seed})")
    r.say(f"  # kept (its value scaled to 1/(1-p) = {1 / (1 - p):g}), . dropped")
    for step, row in enumerate(picture[:shown], start=1):
        kept = int((row != 0).sum())
        r.say(f"  step {step}  " + " ".join("#" if v != 0 else "." for v in row.tolist())
              + f"   kept {kept:>2}/{units}")
    r.say()
    r.say(f"empirical drop rate over {steps:,} steps of {units} units ({steps * units:,} draws each):")
    r.say(f"  {'p':>5}  {'dropped':>8}  {'rate':>7}  {'binomial sd':>11}  {'z':>6}")
    running: dict[float, torch.Tensor] = {}
    worst = 0.0
    for rate in rates:
        site.p = rate
        torch.manual_seed(seed)
        with torch.no_grad():
            dropped = (site(torch.ones(steps, units)) == 0).float()
        n = dropped.numel()
        sd = math.sqrt(rate * (1 - rate) / n)
        empirical = dropped.mean().item()
        z = (empirical - rate) / sd
        worst = max(worst, abs(z))
        r.say(f"  {rate:>5g}  {int(dropped.sum()):>8,}  {empirical:>7.4f}  {sd:>11.4f}  {z:>+6.2f}")
        running[rate] = dropped.sum(1).cumsum(0) / (torch.arange(1, steps + 1) * units)
    r.say(f"every empirical rate is within {math.ceil(worst * 10) / 10:g} binomial standard deviations of its p"
          if worst < 3 else f"largest deviation {worst:.2f} sd: more than chance would usually give")

    fig, (mx, rx) = _figure(nrows=1, ncols=2, figsize=(10.4, 4.0), gridspec_kw={"width_ratios": [1, 1.6]})
    mx.imshow((picture != 0).float().numpy(), cmap="Greys", aspect="auto", interpolation="nearest")
    mx.set_xlabel("unit")
    mx.set_ylabel("training step")
    mx.set_title(f"masks, p = {p:g} (black = kept)")
    steps_axis = torch.arange(1, steps + 1)
    for rate, color in zip(rates, ("tab:blue", "tab:orange", "tab:red", "tab:purple")):
        band = 2 * torch.sqrt(rate * (1 - rate) / (steps_axis * units))
        rx.fill_between(steps_axis.tolist(), (rate - band).tolist(), (rate + band).tolist(), color=color, alpha=0.15)
        rx.plot(steps_axis.tolist(), running[rate].tolist(), color=color, lw=1, label=f"p = {rate:g}")
        rx.axhline(rate, color=color, lw=0.8, ls=":")
    rx.set_xscale("log")
    rx.set_xlabel("training steps")
    rx.set_ylabel("fraction of units dropped so far")
    rx.set_title("empirical drop rate (band: p ± 2 binomial sd)")
    rx.legend(fontsize=8)
    rx.grid(alpha=0.3)
    r.figures.append(_save(fig, out / "masks.png"))
    return r


# --------------------------------------------------------------------------- equivalence


def equivalence(out: Path, seed: int) -> DemoResult:
    """Inverted dropout with weights w and vanilla dropout with weights w/(1-p) (the weights a
    vanilla network learns to give the same training signal) have the same expected output:
    Monte Carlo estimates with 95% confidence intervals."""
    import torch
    from torch import nn

    from dropstudy.model.dropout import make_dropout

    d, p, draws = 50, 0.5, 20_000
    keep = 1.0 - p
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, d, generator=g)
    w = torch.randn(1, d, generator=g) / math.sqrt(d)
    target = (x @ w.T).item()

    def layer(kind: str, weights: torch.Tensor) -> nn.Sequential:
        linear = nn.Linear(d, 1, bias=False)
        linear.weight.data.copy_(weights)
        return nn.Sequential(make_dropout(kind, p, "on the inputs"), linear)

    rows = {
        "inverted, weights w": layer("inverted", w),
        "vanilla, weights w/(1-p)": layer("vanilla", w / keep),
        "vanilla, same weights w": layer("vanilla", w),
    }
    r = DemoResult()
    r.say(f"equivalence: Dropout(p={p:g}) -> Linear({d} -> 1) on a fixed random input; {draws:,} training-mode "
          f"draws per row (seed {seed})")
    r.say(f"  exact expected output of inverted dropout: w.x = {target:.4f}")
    r.say(f"  {'':<28}{'training mean':>14}  {'95% CI':<21}  {'evaluation output':>17}")
    estimates: dict[str, tuple[float, float, torch.Tensor]] = {}
    for i, (name, net) in enumerate(rows.items()):
        torch.manual_seed(seed + i)  # independent draws for each row, so their CIs combine
        with torch.no_grad():
            values = net.train()(x.repeat(draws, 1)).squeeze(1)
            evaluation = net.eval()(x).item()
        mean, half = values.mean().item(), Z95 * values.std().item() / math.sqrt(draws)
        estimates[name] = (mean, half, values)
        r.say(f"  {name:<28}{mean:>14.4f}  [{mean - half:.4f}, {mean + half:.4f}]  {evaluation:>17.4f}")
    (m1, h1, _), (m2, h2, _) = estimates["inverted, weights w"], estimates["vanilla, weights w/(1-p)"]
    diff, half = m1 - m2, math.sqrt(h1**2 + h2**2)
    covers = diff - half <= 0.0 <= diff + half
    r.say(f"  {'difference of the first two':<28}{diff:>14.4f}  [{diff - half:.4f}, {diff + half:.4f}]  "
          + ("contains 0: the same expected output" if covers else "excludes 0"))
    r.say(f"  with the same weights, vanilla's expectation is (1-p)·w.x = {keep * target:.4f}, and so is its "
          "evaluation output: each formulation's evaluation matches its own training expectation.")
    r.say("  95% CI: mean ± 1.96·sd/√n (normal approximation)")

    fig, ax = _figure(figsize=(7.2, 4.2))
    n_axis = torch.arange(1, draws + 1)
    for (name, (_, _, values)), color in zip(estimates.items(), ("tab:blue", "tab:red", "tab:gray")):
        running = values.cumsum(0) / n_axis
        band = Z95 * values.std().item() / torch.sqrt(n_axis.float())
        ax.fill_between(n_axis.tolist(), (running - band).tolist(), (running + band).tolist(), color=color, alpha=0.15)
        ax.plot(n_axis.tolist(), running.tolist(), color=color, lw=1.2, label=name)
    ax.axhline(target, color="k", lw=1, ls="--", label=f"w.x = {target:.3f}")
    ax.axhline(keep * target, color="tab:gray", lw=1, ls=":", label=f"(1-p)·w.x = {keep * target:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("training-mode draws")
    ax.set_ylabel("running mean of the output (95% CI)")
    ax.set_title(f"inverted vs vanilla dropout, p = {p:g}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    r.figures.append(_save(fig, out / "equivalence.png"))
    return r


@dataclass(frozen=True)
class Demo:
    summary: str
    run: Callable[[Path, int], DemoResult]


DEMOS: dict[str, Demo] = {
    "scaling": Demo("training vs evaluation output of Dropout(0.5) -> Linear(10000->1) -> ReLU on ones, "
                    "inverted and vanilla", scaling),
    "masks": Demo("the masks drawn for a small layer over a few steps, and the empirical drop rate vs p", masks),
    "equivalence": Demo("inverted and vanilla dropout give the same expected output (Monte Carlo, 95% CI)",
                        equivalence),
}
