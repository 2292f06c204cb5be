"""Vectorized multi-model training: the members of a sweep (seeds x dropout rates) trained in one
process as one batched model, instead of one run after another.

Member i's weights are slice i of stacked tensors ([M, out, in], the layout nn.Linear keeps,
so a slice is the member's own state_dict). Each member starts from exactly the weights
`build_model` gives after `seed_everything(member seed)`, trains on its own data (the
regression points depend on data.seed), with its own dropout rate and its own dropout masks,
and its own optimizer state: SGD and Adam update every element on its own, so one optimizer
over the stacked tensors is the same as one per member. With dropout 0 a member computes
what `dropstudy train` computes, up to float rounding (batched matmuls sum in another order).

The forward pass is hand-written with `torch.baddbmm` rather than `torch.func.vmap` over
`functional_call`: the members differ in p, and torch's dropout takes p as a Python float,
which vmap cannot batch. Masks are drawn here (`StackedMLP.drop`), one independent draw per
member, unit and example, from a generator of their own.

Every member still gets a complete run directory (the same files, metric names and steps as
`train_run` writes) and its own W&B run; several W&B runs are alive together, so histograms
are logged by hand (`Tracker.log_histograms`) at the `tracker.log_freq` cadence, not `watch`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dropstudy.console import TrainingProgress
from dropstudy.data import Dataset, TrainBatches, load_dataset
from dropstudy.dropout import arm_label, describe_sites, site_rates, sites
from dropstudy.models import build_model
from dropstudy.config import dropout_site_count
from dropstudy.rundir import RunDir, collect_provenance
from dropstudy import plots
from dropstudy.runner import RunResult, conclude_run, draw_run_figures, make_run_tracker
from dropstudy.runtime import (
    Interrupted, describe_device, seed_everything, set_up_process, signals_interrupt_training, usable_cpus,
)
from dropstudy.tracking import flatten
from dropstudy.train import Outcome, conclude, logs_row, make_optimizer, rng_states

log = logging.getLogger("dropstudy")

# What members may differ in; everything else must be the same for all. tracker.* only says
# where a run is logged (each member has its own W&B run anyway).
VARYING_KEYS = ("seed", "data.seed", "model.dropout")
VARYING_PREFIXES = ("tracker.",)
KINDS = ("inverted", "vanilla", "gaussian", "none")


@dataclass
class Member:
    cfg: DictConfig  # the member's fully composed + validated config
    run_dir: Path  # its own run directory (complete run dir per DESIGN.md)
    overrides: list[str]  # the member's own Hydra overrides (saved to .hydra/overrides.yaml)


def why_not_vectorizable(cfgs: list[DictConfig]) -> str | None:
    """None when these configs can be trained as one batched model; else a short reason."""
    if not cfgs:
        return "there are no members to train"
    for cfg in cfgs:
        if cfg.model.name != "mlp":
            return f"model.name={cfg.model.name}: only the MLP is trained vectorized"
        if cfg.data.name != "regression":
            return f"data.name={cfg.data.name}: only the regression data is trained vectorized"
        if cfg.model.dropout_kind not in KINDS:
            return f"model.dropout_kind={cfg.model.dropout_kind}: vectorized training supports {', '.join(KINDS)}"
        if cfg.model.input_dropout:
            return "model.input_dropout is set: vectorized training has no input dropout site"
        if cfg.model.dropout_schedule.kind != "constant":
            return f"model.dropout_schedule.kind={cfg.model.dropout_schedule.kind}: only a constant p is vectorized"
        if cfg.optim.max_norm is not None:
            return "optim.max_norm is set: the max-norm constraint is not vectorized"
        if cfg.eval.mc_samples:
            return "eval.mc_samples is set: MC-dropout evaluation is not vectorized"
        if cfg.trainer.batch_size is not None and cfg.trainer.batch_size < cfg.data.n_points:
            return "trainer.batch_size is set: only full-batch training is vectorized"
        if cfg.trainer.on_nan != "stop":
            return f"trainer.on_nan={cfg.trainer.on_nan}: only `stop` is vectorized"
    first = flatten(OmegaConf.to_container(cfgs[0], resolve=True))
    for cfg in cfgs[1:]:
        other = flatten(OmegaConf.to_container(cfg, resolve=True))
        for key in sorted(set(first) | set(other)):
            if key in VARYING_KEYS or key.startswith(VARYING_PREFIXES):
                continue
            if first.get(key) != other.get(key):
                return (f"members differ in {key} ({first.get(key)!r} vs {other.get(key)!r}); only "
                        f"{', '.join(VARYING_KEYS)} may differ")
    return None


# --------------------------------------------------------------------------- the batched model


class StackedMLP(nn.Module):
    """M copies of models.MLP evaluated at once on inputs [M, N, in] -> [M, N, out].

    `params[k]` stacks the members' k-th parameter (in `MLP.named_parameters` order, `names[k]`);
    weights are stored transposed, [M, in, out], so that `x @ W` needs no transpose and the
    weight gradient (x^T @ grad) comes out in the parameter's own layout (with nn.Linear's
    [M, out, in] autograd copied every weight gradient back from the transposed layout, about
    half of each step on a 2-core CPU). `member_state(i)` is member i's state_dict in
    nn.Linear's layout. `rates` is [M, sites]: each member's p at each dropout site (one after
    each hidden layer)."""

    def __init__(self, models: list[nn.Module], rates: torch.Tensor, kind: str, generator: torch.Generator):
        super().__init__()
        self.names = [name for name, _ in models[0].named_parameters()]
        stacked, _ = torch.func.stack_module_state(models)
        self.transposed = [stacked[name].dim() == 3 for name in self.names]  # the weights
        self.params = nn.ParameterList([nn.Parameter(stacked[name].transpose(1, 2).contiguous() if t else stacked[name])
                                        for name, t in zip(self.names, self.transposed)])
        self.kind = kind
        self.register_buffer("rates", rates)
        self.generator = generator

    @property
    def members(self) -> int:
        return self.params[0].shape[0]

    def layers(self) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
        """(layer name, transposed weight [M, in, out], bias [M, out]) in forward order."""
        return [(self.names[k].rsplit(".", 1)[0], self.params[k], self.params[k + 1]) for k in range(0, len(self.names), 2)]

    def drop(self, x: torch.Tensor, site: int) -> torch.Tensor:
        """Dropout site `site` on activations [M, N, H]: every member, example and unit draws on
        its own, with the member's p, in the member's kind (see dropout.py for the kinds)."""
        if self.kind == "none":
            return x
        p = self.rates[:, site].view(-1, 1, 1)
        if not self.training:
            return x * (1.0 - p) if self.kind == "vanilla" else x
        if self.kind == "gaussian":
            noise = torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
            return x * (1.0 + torch.sqrt(p / (1.0 - p)) * noise)
        # u >= p keeps a unit with probability 1-p, as torch's Bernoulli(1-p) mask does.
        keep = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype) >= p
        return x * keep / (1.0 - p) if self.kind == "inverted" else x * keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = self.layers()
        for site, (_, weight, bias) in enumerate(layers[:-1]):
            x = self.drop(torch.relu(torch.baddbmm(bias.unsqueeze(1), x, weight)), site)
        _, weight, bias = layers[-1]
        return torch.baddbmm(bias.unsqueeze(1), x, weight)

    @torch.no_grad()
    def weight_norms(self) -> list[dict[str, float]]:
        """Per member, `weights/l2/<layer>` as models.weight_norms gives it: one sync for all."""
        layers = self.layers()
        norms = torch.stack([w.flatten(1).norm(dim=1) for _, w, _ in layers], dim=1).tolist()
        return [{f"weights/l2/{name}": v for (name, _, _), v in zip(layers, row)} for row in norms]

    def own_layout(self, k: int, tensor: torch.Tensor) -> torch.Tensor:
        """Member slice `tensor` of parameter k (or of its optimizer state) in nn.Linear's layout."""
        return (tensor.transpose(0, 1) if self.transposed[k] else tensor).detach().clone(memory_format=torch.contiguous_format)

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        return {name: self.own_layout(k, p[i]) for k, (name, p) in enumerate(zip(self.names, self.params))}


def member_optimizer_state(optimizer: torch.optim.Optimizer, stacked: StackedMLP, i: int,
                           model: nn.Module, cfg: DictConfig) -> dict[str, Any]:
    """Member i's slice of the batched optimizer, as the state_dict of the optimizer the single
    path makes for `model` (make_optimizer), so `resume` can load it."""
    own = make_optimizer(cfg.optim, model)
    for k, (stacked_param, param) in enumerate(zip(stacked.params, model.parameters())):
        state = optimizer.state.get(stacked_param, {})
        own.state[param] = {key: stacked.own_layout(k, v[i]) if torch.is_tensor(v) and v.dim() > 0 else v
                            for key, v in state.items()}
    return own.state_dict()


# --------------------------------------------------------------------------- one member's run


class MemberRun:
    """What one member owns while the batch trains: its run directory, its W&B run, its rows,
    a model of its own shape (for checkpoints and figures) and how it is doing."""

    def __init__(self, member: Member, index: int, data: Dataset, model: nn.Module, tracker: Any,
                 group: str | None, job_type: str):
        self.member, self.cfg, self.index = member, member.cfg, index
        self.rd = RunDir(member.run_dir)
        self.data, self.model, self.tracker = data, model, tracker
        self.group, self.job_type = group, job_type
        self.label = arm_label(member.cfg.model.dropout, member.cfg.model.dropout_kind)
        self.dropout_sites = describe_sites(model)
        self.rates = {f"dropout/p/{name}": site.p for name, site in sites(model)}
        self.outcome = Outcome(status="finished", epoch=0)
        self.active = True  # still training (not diverged)
        self.result = RunResult(self.rd.path, self.label, "failed", None, sync_command=tracker.sync_command)

    def log(self, row: dict[str, Any]) -> None:
        """metrics.jsonl first, then W&B; the row's index is its W&B step (as Trainer.log)."""
        step = len(self.outcome.rows)
        self.outcome.rows.append(row)
        self.rd.append_metrics(row)
        self.tracker.log(row, step=step)

    def load(self, stacked: StackedMLP) -> nn.Module:
        self.model.load_state_dict(stacked.member_state(self.index))
        return self.model

    def checkpoint(self, epoch: int, stacked: StackedMLP, optimizer: torch.optim.Optimizer) -> None:
        """checkpoints/last.pt as the single path writes it. Masks come from the batch's own
        generator, so the RNG states saved are the process's and a member-seeded shuffle
        generator: a resumed member trains on correctly, though not with the masks it would
        have drawn here."""
        self.load(stacked)
        state = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": member_optimizer_state(optimizer, stacked, self.index, self.model, self.cfg),
            "scheduler": None,
            # Full-batch training never draws from the shuffle generator: its state is the seed's.
            "rng": rng_states(TrainBatches(self.data.train, None, self.cfg.seed)),
            "skipped_steps": 0,
            "tracker_run_id": self.tracker.run_id,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }
        try:
            self.rd.save_checkpoint(state)
        except OSError as exc:
            log.warning(f"could not write checkpoint {self.rd.checkpoints / 'last.pt'} ({exc}); training goes on")


def mask_seed(cfgs: list[DictConfig]) -> int:
    """The dropout masks' generator seed: from every member's seed, so it is reproducible and
    differs between sweeps over different seeds."""
    text = ",".join(str(cfg.seed) for cfg in cfgs)
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def stack_splits(datas: list[Dataset], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [getattr(d, split) for d in datas]
    return torch.stack([p.inputs for p in parts]), torch.stack([p.targets for p in parts])


def member_losses(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each member's mean squared error, [M] (F.mse_loss per member)."""
    return ((out - targets) ** 2).mean(dim=(1, 2))


# --------------------------------------------------------------------------- training


def train_members(members: list[Member], *, group: str, extra_tags: tuple[str, ...] = ()) -> list[RunResult]:
    """Train every member at once as one batched model; each gets its own complete run directory
    and W&B run (in `group`). Every W&B run is finished whatever happens."""
    reason = why_not_vectorizable([m.cfg for m in members])
    if reason is not None:
        raise ValueError(f"these members cannot be trained as one batched model: {reason}")
    for member in members:
        if (member.run_dir / "metrics.jsonl").exists():
            raise ValueError(f"{member.run_dir} already holds a run; vectorized training starts new runs only "
                             "(continue that one with `dropstudy resume`)")
    runs: list[MemberRun] = []
    try:
        return _train_members(members, runs, group, extra_tags)
    except BaseException as exc:
        for run in runs:
            if not run.rd.summary_path.exists():
                run.result.outcome = None  # W&B gets a non-zero exit code too
                run.rd.write_summary({
                    "status": "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                    "reason": f"{type(exc).__name__}: {exc}",
                    "epoch": run.outcome.epoch,
                })
        raise
    finally:
        for run in runs:
            run.tracker.finish(exit_code=run.result.exit_code)
            run.result.tracker_url = run.tracker.url
            run.rd.close()


def _train_members(members: list[Member], runs: list[MemberRun], group: str,
                   extra_tags: tuple[str, ...]) -> list[RunResult]:
    cfg0 = members[0].cfg
    device = set_up_process(cfg0)  # trainer.*, device and deterministic are the same for every member
    log.info(f"vectorized: {len(members)} members as one batched model on {describe_device(device)}")

    datas, models = [], []
    for member in members:
        RunDir(member.run_dir).write_config(member.cfg, member.overrides)
        datas.append(load_dataset(member.cfg.data, device, log.debug))
        seed_everything(member.cfg.seed)  # the member's initial weights: those of its single run
        models.append(build_model(member.cfg.model))
    rates = torch.tensor([site_rates(m.cfg.model.dropout, dropout_site_count(m.cfg.model)) for m in members])
    generator = torch.Generator(device=device).manual_seed(mask_seed([m.cfg for m in members]))
    stacked = StackedMLP(models, rates, cfg0.model.dropout_kind, generator).to(device)
    optimizer = make_optimizer(cfg0.optim, stacked)

    for i, (member, data, model) in enumerate(zip(members, datas, models)):
        rd = RunDir(member.run_dir)
        label = arm_label(member.cfg.model.dropout, member.cfg.model.dropout_kind)
        provenance = collect_provenance(describe_device(device), member.overrides, data.describe(),
                                        data.fingerprint(), rd)
        provenance["vectorized"] = {"members": len(members), "index": i, "mask_seed": generator.initial_seed()}
        rd.write_provenance(provenance)
        job_type = member.cfg.tracker.job_type or label
        tracker = make_run_tracker(member.cfg, rd, data, label, describe_sites(model), provenance, group=group,
                                   job_type=job_type, extra_tags=extra_tags, shared_process=True)
        runs.append(MemberRun(member, i, data, model.to(device), tracker, group, job_type))

    started = time.time()
    fit(stacked, optimizer, runs, datas, cfg0)
    duration = time.time() - started
    # Every member's figures are started before any member concludes, so that they draw side by
    # side on worker processes (one per CPU) while this process logs and writes summaries.
    with plots.Drawer(figure_workers(len(runs))) as drawer:
        started_figures = [draw_run_figures(run.cfg, run.rd, run.load(stacked), run.data, conclude(run.outcome),
                                            run.result, drawer) for run in runs]
        for run, figures in zip(runs, started_figures):
            conclude_run(run.cfg, run.rd, run.model, run.data, run.outcome, run.tracker, run.result,
                         run.dropout_sites, run.group, run.job_type, duration_s=duration,
                         extra_summary={"vectorized": {"members": len(runs), "index": run.index}},
                         timings={"train": duration},  # the whole batch's training time, shared
                         figures=figures)
    return [run.result for run in runs]


def figure_workers(members: int) -> int:
    """Processes for the members' figures: one per usable CPU (at most 16), none for a few
    members, where starting the workers (an import of matplotlib each) costs more than it saves."""
    if members < 8:
        return 1
    return max(1, min(usable_cpus(), 16, members))


def fit(stacked: StackedMLP, optimizer: torch.optim.Optimizer, runs: list[MemberRun], datas: list[Dataset],
        cfg: DictConfig) -> None:
    """The epoch loop of Trainer.fit for the whole batch: one full-batch step per epoch, evaluation
    every eval_every epochs, histograms every log_freq, checkpoints, test at the end. A member
    whose loss is no longer finite stops there (status diverged); the others train on. Loop
    settings (trainer.*, tracker.watch/log_freq) are the first member's: why_not_vectorizable
    has checked that trainer.* is the same for all."""
    epochs, eval_every = cfg.trainer.epochs, cfg.trainer.eval_every
    checkpoint_every = cfg.trainer.checkpoint_every or eval_every
    log_freq = cfg.tracker.log_freq or eval_every  # one step per epoch
    log_every = cfg.trainer.log_every
    watch = cfg.tracker.watch
    train_x, train_y = stack_splits(datas, "train")
    val_x, val_y = stack_splits(datas, "val")
    n_train = train_x.shape[1]
    with signals_interrupt_training(), TrainingProgress(f"{len(runs)} members", epochs, epochs) as progress:
        try:
            for epoch in range(1, epochs + 1):
                start = time.perf_counter()
                stacked.train()
                losses = member_losses(stacked(train_x), train_y)
                optimizer.zero_grad(set_to_none=True)
                losses.sum().backward()  # member i's loss depends on member i's weights alone
                train_loss = losses.detach().tolist()  # one sync per epoch, as the single path's .item()
                for run in runs:
                    if run.active and not math.isfinite(train_loss[run.index]):
                        # Its weights are still those after the last good epoch: that is its checkpoint.
                        run.checkpoint(epoch - 1, stacked, optimizer)
                optimizer.step()
                elapsed = time.perf_counter() - start
                evaluated = epoch % eval_every == 0 or epoch == epochs
                val_loss = norms = None
                if evaluated:
                    stacked.eval()
                    with torch.no_grad():
                        val_loss = member_losses(stacked(val_x), val_y).tolist()
                    norms = stacked.weight_norms()
                histograms = watch != "none" and epoch % log_freq == 0
                for run in runs:
                    if not run.active:
                        continue
                    i = run.index
                    if histograms:  # joined to the member's next row, as `watch` does
                        run.tracker.log_histograms(member_histograms(stacked, i, watch), len(run.outcome.rows))
                    if logs_row(epoch, log_every, evaluated, diverging=not math.isfinite(train_loss[i])):
                        row: dict[str, Any] = {"epoch": epoch, "train/loss": train_loss[i],
                                               "lr": optimizer.param_groups[0]["lr"],
                                               "perf/samples_per_s": n_train / elapsed, **run.rates}
                        if evaluated:
                            row["val/loss"] = val_loss[i]
                            row["gap/loss"] = val_loss[i] - train_loss[i]
                            row.update(norms[i])
                        run.log(row)
                        bad = [k for k in ("train/loss", "val/loss") if k in row and not math.isfinite(row[k])]
                        if bad:
                            if bad[0] == "val/loss":  # trained this epoch without a bad loss: keep that state
                                run.checkpoint(epoch, stacked, optimizer)
                            diverged(run, epoch, bad[0], row[bad[0]])
                            continue
                    run.outcome.epoch = epoch
                    if epoch % checkpoint_every == 0 or epoch == epochs:
                        run.checkpoint(epoch, stacked, optimizer)
                progress.advance()
                if evaluated:
                    progress.epoch_done(mean_row(runs, epoch, train_loss, val_loss), evaluated)
                if not any(run.active for run in runs):
                    break
        except KeyboardInterrupt as exc:
            signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
            for run in runs:
                if run.active:
                    # The checkpoint on disk is the last complete one; resume continues from it.
                    run.outcome.status, run.outcome.exit_code = "interrupted", 128 + int(signum)
                    run.outcome.reason = f"{signal.Signals(signum).name} during epoch {run.outcome.epoch + 1} of {epochs}"
                    run.active = False
            return
    test_x, test_y = stack_splits(datas, "test")
    stacked.eval()
    with torch.no_grad():
        test_loss = member_losses(stacked(test_x), test_y).tolist()
    for run in runs:
        if run.active:
            run.log({"epoch": run.outcome.epoch, "test/loss": test_loss[run.index]})


def diverged(run: MemberRun, epoch: int, metric: str, value: float) -> None:
    """Stop a member whose `metric` is no longer finite, as Trainer.fit does for on_nan=stop."""
    run.active = False
    run.outcome.status, run.outcome.exit_code = "diverged", 1
    run.outcome.reason = f"{metric} became {value} at epoch {epoch}"
    run.outcome.epoch = epoch
    run.tracker.set_summary({"diverged/epoch": epoch, "diverged/metric": metric})


def member_histograms(stacked: StackedMLP, i: int, watch: str) -> dict[str, torch.Tensor]:
    """`gradients/<param>` and/or `parameters/<param>` of member i, as `watch` names them."""
    tensors = {}
    for name, param in zip(stacked.names, stacked.params):
        # A histogram does not depend on the layout: the transposed weight slices serve as they are.
        if watch in ("parameters", "all"):
            tensors[f"parameters/{name}"] = param[i]
        if watch in ("gradients", "all") and param.grad is not None:
            tensors[f"gradients/{name}"] = param.grad[i]
    return tensors


def mean_row(runs: list[MemberRun], epoch: int, train_loss: list[float], val_loss: list[float]) -> dict[str, Any]:
    """The members' mean losses, for the progress line."""
    active = [run.index for run in runs if run.active] or [0]
    return {"epoch": epoch, "train/loss": sum(train_loss[i] for i in active) / len(active),
            "val/loss": sum(val_loss[i] for i in active) / len(active)}
