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
`train_run` writes) and its own W&B run, with its histograms at the `tracker.log_freq` cadence
(`Tracker.log_histograms`, as for a single run).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dropstudy import plots
from dropstudy.config import dropout_site_count
from dropstudy.data import Dataset, TrainBatches, load_dataset
from dropstudy.dropout import apply_dropout, arm_label, describe_sites, site_rates, sites
from dropstudy.engine import Engine, MemberRun
from dropstudy.failures import describe
from dropstudy.models import build_model
from dropstudy.rundir import RunDir, RunDirError, check_fits, collect_provenance, now_iso
from dropstudy.runner import RunResult, conclude_run, draw_run_figures, make_run_tracker
from dropstudy.runtime import FastPaths, describe_device, seed_everything, set_up_process, usable_cpus
from dropstudy.tracking import NullTracker
from dropstudy.train import conclude, make_optimizer, rng_states

log = logging.getLogger("dropstudy")

# What members may differ in; everything else must be the same for all. tracker.* only says
# where a run is logged (each member has its own W&B run anyway).
VARYING_KEYS = ("seed", "data.seed", "model.dropout")
VARYING_PREFIXES = ("tracker.",)
KINDS = ("inverted", "vanilla", "gaussian", "none")


@dataclass
class Member:
    cfg: DictConfig  # the member's fully composed + validated config
    run_dir: Path  # its own run directory (every file a single run writes)
    overrides: list[str]  # the member's own Hydra overrides (saved to .hydra/overrides.yaml)


def batched_backend(cfgs: list[DictConfig]) -> tuple[str | None, str | None]:
    """Which backend trains these members as one ensemble, "stacked_mlp" (the regression MLP,
    hand-batched here) or "ensemble" (any model, ensemble.Ensemble: the CNN), or why none can."""
    if cfgs and all(cfg.model.name == "cnn" for cfg in cfgs):
        from dropstudy.ensemble import why_not

        reason = why_not(cfgs)
        if reason is None and cfgs[0].sweep.member_execution == "stacked":
            for key, on in (("trainer.on_nan=skip", cfgs[0].trainer.on_nan == "skip"),
                            ("trainer.compile=true", cfgs[0].trainer.compile)):
                if on:
                    reason = f"sweep.member_execution=stacked cannot train with {key}"
        return (None, reason) if reason else ("ensemble", None)
    reason = why_not_stacked_mlp(cfgs)
    return (None, reason) if reason else ("stacked_mlp", None)


def why_not_vectorizable(cfgs: list[DictConfig]) -> str | None:
    """None when these configs can be trained as one ensemble; else a short reason."""
    return batched_backend(cfgs)[1]


def why_not_stacked_mlp(cfgs: list[DictConfig]) -> str | None:
    """None when these configs can be trained as one StackedMLP; else a short reason."""
    if not cfgs:
        return "there are no members to train"
    for cfg in cfgs:
        if cfg.model.name != "mlp":
            return f"model.name={cfg.model.name}: members of one ensemble are all MLPs or all CNNs"
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
    from dropstudy.ensemble import config_difference

    difference = config_difference(cfgs, VARYING_KEYS, VARYING_PREFIXES)
    if difference is not None:
        return f"members differ in {difference}; only {', '.join(VARYING_KEYS)} may differ"
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
        its own, with the member's p, in the member's kind (dropout.apply_dropout)."""
        return apply_dropout(self.kind, x, self.rates[:, site].view(-1, 1, 1), self.training, self.generator)

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



# --------------------------------------------------------------------------- the backend


class StackedMLPBackend:
    """The members as one StackedMLP behind the engine's Backend interface (backends.py): one
    full-batch step per epoch for all of them, one optimizer over the stacked tensors, and the
    masks from one generator of their own (`shared_state`, saved with every member's checkpoint,
    so that a resumed ensemble draws the masks it would have drawn)."""

    steps_per_epoch = 1

    def __init__(self, cfgs: list[DictConfig], datas: list[Dataset], models: list[nn.Module],
                 device: torch.device):
        self.cfgs, self.datas = cfgs, datas
        self.models = [model.to(device) for model in models]  # each member's own shape, for its state
        self.members = len(cfgs)
        rates = torch.tensor([site_rates(c.model.dropout, dropout_site_count(c.model)) for c in cfgs])
        self.generator = torch.Generator(device=device).manual_seed(mask_seed(cfgs))
        self.stacked = StackedMLP(models, rates, str(cfgs[0].model.dropout_kind), self.generator).to(device)
        self.optimizer = make_optimizer(cfgs[0].optim, self.stacked)
        self.splits = {name: stack_splits(datas, name) for name in ("train", "val", "test", "train_eval")}
        self.rates = [{f"dropout/p/{name}": site.p for name, site in sites(model)} for model in models]

    def set_epoch(self, epoch: int) -> list[dict[str, float]]:
        return self.rates  # a constant p (why_not_vectorizable)

    def train_epoch(self, progress: Any) -> list[dict[str, float]]:
        x, y = self.splits["train"]
        self.stacked.train()
        losses = member_losses(self.stacked(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # member i's loss depends on member i's weights alone
        self.optimizer.step()
        progress.advance()
        return [{"train/loss": v} for v in losses.detach().tolist()]  # one sync per epoch

    def evaluate(self, split: str) -> list[dict[str, float]]:
        x, y = self.splits[split]
        self.stacked.eval()
        with torch.no_grad():
            return [{f"{split}/loss": v} for v in member_losses(self.stacked(x), y).tolist()]

    def weight_norms(self) -> list[dict[str, float]]:
        return self.stacked.weight_norms()

    def histogram_tensors(self, i: int) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, param in zip(self.stacked.names, self.stacked.params):
            # A histogram does not depend on the layout: the transposed weight slices serve as they are.
            tensors[f"parameters/{name}"] = param[i]
            if param.grad is not None:
                tensors[f"gradients/{name}"] = param.grad[i]
        return tensors

    def _optimizer_states(self) -> list[dict[str, Any]]:
        return [self.optimizer.state.get(p, {}) for p in self.stacked.params]

    def member_state_from(self, params: list[torch.Tensor], opt_states: list[dict[str, Any]],
                          i: int) -> dict[str, Any]:
        """Member i's checkpoint body from stacked tensors: its weights as build_model lays them
        out and its slice of the optimizer as the state_dict make_optimizer's would hold."""
        stacked, model, cfg = self.stacked, self.models[i], self.cfgs[i]
        own = make_optimizer(cfg.optim, model)
        for k, (state, param) in enumerate(zip(opt_states, model.parameters())):
            own.state[param] = {key: stacked.own_layout(k, v[i]) if torch.is_tensor(v) and v.dim() > 0 else v
                                for key, v in state.items()}
        return {
            "model": {name: stacked.own_layout(k, p[i]) for k, (name, p) in enumerate(zip(stacked.names, params))},
            "optimizer": own.state_dict(),
            "scheduler": None,
            # Full-batch training never draws from the shuffle generator: its state is the seed's.
            "rng": rng_states(TrainBatches(self.datas[i].train, None, cfg.seed)),
            "skipped_steps": 0,
        }

    def member_state(self, i: int) -> dict[str, Any]:
        return self.member_state_from(list(self.stacked.params), self._optimizer_states(), i)

    def snapshot(self) -> "StackedSnapshot":
        """Every member's state as a few stacked clones (taken every epoch, so it stays cheap:
        the per-member layouts are made only when a checkpoint is written)."""
        return StackedSnapshot(self, [p.detach().clone() for p in self.stacked.params],
                               [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                                for s in self._optimizer_states()], self.shared_state())

    @torch.no_grad()
    def load_member_state(self, i: int, state: dict[str, Any]) -> None:
        stacked, model = self.stacked, self.models[i]
        model.load_state_dict(state["model"])
        own = make_optimizer(self.cfgs[i].optim, model)
        own.load_state_dict(state["optimizer"])
        for k, (name, param) in enumerate(zip(stacked.names, stacked.params)):
            mine = state["model"][name]
            param[i].copy_(mine.transpose(0, 1) if stacked.transposed[k] else mine)
        for k, (param, own_param) in enumerate(zip(stacked.params, model.parameters())):
            theirs = own.state.get(own_param, {})
            if not theirs:
                continue
            ours = self.optimizer.state.setdefault(param, {})
            for key, v in theirs.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    if ours.get(key) is None:
                        ours[key] = torch.zeros_like(param)
                    ours[key][i].copy_(v.transpose(0, 1) if stacked.transposed[k] else v)
                else:  # Adam's step count (the same for every member) or SGD's absent buffer
                    ours[key] = v.clone() if torch.is_tensor(v) else v

    def shared_state(self) -> dict[str, Any]:
        return {"masks": self.generator.get_state()}

    def load_shared_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["masks"])

    def member_model(self, i: int) -> nn.Module:
        self.models[i].load_state_dict(self.stacked.member_state(i))
        return self.models[i]


class StackedSnapshot:
    def __init__(self, backend: StackedMLPBackend, params: list[torch.Tensor], opt_states: list[dict[str, Any]],
                 shared: dict[str, Any]):
        self.backend, self.params, self.opt_states, self.shared = backend, params, opt_states, shared

    def member_state(self, i: int) -> dict[str, Any]:
        return self.backend.member_state_from(self.params, self.opt_states, i)

    def shared_state(self) -> dict[str, Any]:
        return self.shared


def mask_seed(cfgs: list[DictConfig]) -> int:
    """The dropout masks' generator seed: from every member's seed and rates, so it is
    reproducible, and two chunks of one sweep (or two sweeps) draw different masks."""
    text = ",".join(f"{cfg.seed}:{OmegaConf.to_container(cfg.model, resolve=True)['dropout']}" for cfg in cfgs)
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def stack_splits(datas: list[Dataset], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [getattr(d, split) for d in datas]
    return torch.stack([p.inputs for p in parts]), torch.stack([p.targets for p in parts])


def member_losses(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each member's mean squared error, [M] (F.mse_loss per member)."""
    return ((out - targets) ** 2).mean(dim=(1, 2))


# --------------------------------------------------------------------------- training


@dataclass
class MemberRecord:
    """What one member owns while the batch trains, beside the engine's MemberRun."""

    member: Member
    run: MemberRun
    result: RunResult
    label: str
    dropout_sites: list[str]
    group: str | None
    job_type: str
    trained: bool = True  # False: set aside before a resume (diverged), its run dir stays as it is


def train_members(members: list[Member], *, group: str, extra_tags: tuple[str, ...] = (),
                  chunk: tuple[int, Path] | None = None) -> list[RunResult]:
    """Train every member at once as one batched model; each gets its own complete run directory
    and W&B run (in `group`). `chunk` (its number, the sweep dir) says which part of a sweep
    this is, for `dropstudy resume` of the sweep. Every W&B run is finished whatever happens."""
    reason = why_not_vectorizable([m.cfg for m in members])
    if reason is not None:
        raise ValueError(f"these members cannot be trained as one batched model: {reason}")
    for member in members:
        if RunDir.existing(member.run_dir).holds_rows():
            raise ValueError(f"{member.run_dir} already holds a run; vectorized training starts new runs only "
                             "(continue that one with `dropstudy resume`)")
    return _guarded(members, group, extra_tags, chunk, states=None)


def resume_members(run_dirs: list[Path]) -> list[RunResult]:
    """Continue an interrupted batched chunk as the ensemble it was: every member from its
    checkpoint (one epoch boundary for all, with the masks' generator), the diverged ones along
    but off the record, so the result equals a chunk that never stopped. RunDirError when a
    member's directory or checkpoint cannot be used (nothing is changed then)."""
    members, states = [], []
    for run_dir in run_dirs:
        run = RunDir.existing(run_dir)
        cfg = run.read_config()
        members.append(Member(cfg, run_dir, run.read_overrides()))
        status = run.read_status()[0]
        states.append(None if status in ("diverged", "finished") else run.read_checkpoint(cfg))
    live = [s for s in states if s is not None]
    if not live:
        raise RunDirError(f"{run_dirs[0].parent}: every member of this chunk finished or diverged; nothing to resume.")
    if len({s["epoch"] for s in live}) > 1:
        raise RunDirError(f"{run_dirs[0].parent}: the members' checkpoints are of different epochs "
                          f"({sorted({s['epoch'] for s in live})}); they cannot continue as one ensemble.")
    if "ensemble" not in live[0] and len(members) > 1:
        raise RunDirError(f"{run_dirs[0] / 'checkpoints' / 'last.pt'}: written before batched sweeps saved their "
                          "masks' generator; it cannot be resumed as an ensemble, start the sweep again.")
    for member, state in zip(members, states):
        if state is not None:
            check_fits(RunDir.existing(member.run_dir).checkpoint_path, state, build_model(member.cfg.model))
    previous = RunDir(run_dirs[0]).read_provenance().get("vectorized", {})
    group = RunDir.existing(run_dirs[0]).read_status()[1].get("wandb", {}).get("group") or previous.get("group")
    return _guarded(members, group, ("sweep",), (previous.get("chunk", 0), None), states=states)


def _guarded(members: list[Member], group: str | None, extra_tags: tuple[str, ...], chunk: tuple[int, Path] | None,
             states: list[dict[str, Any] | None] | None) -> list[RunResult]:
    records: list[MemberRecord] = []
    try:
        return _train_members(members, records, group, extra_tags, chunk, states)
    except BaseException as exc:
        for rec in records:
            if not rec.trained or rec.result.outcome is not None:  # set aside, or concluded already
                continue
            rec.result.outcome = None  # W&B gets a non-zero exit code too
            # Each member names its own file that could not be written; one whose write went
            # through stopped with the batch, for the reason the batch stopped.
            if rec.run.write_error is not None:
                reason = describe(rec.run.write_error)
            elif isinstance(exc, OSError):
                reason = f"stopped with its batch: {describe(exc)}"
            else:
                reason = f"{type(exc).__name__}: {exc}"
            try:
                rec.run.rd.write_summary({
                    "status": "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                    "reason": reason,
                    "epoch": rec.run.outcome.epoch,
                })
            except OSError as summary_exc:  # the disk that stopped the batch may refuse this too
                exc.add_note(f"{rec.run.rd.summary_path} still says running: {describe(summary_exc)}")
        raise
    finally:
        for rec in records:
            rec.run.tracker.finish(exit_code=rec.result.exit_code)
            rec.result.tracker_url = rec.run.tracker.url
            rec.run.rd.close()


def _train_members(members: list[Member], records: list[MemberRecord], group: str | None,
                   extra_tags: tuple[str, ...], chunk: tuple[int, Path] | None,
                   states: list[dict[str, Any] | None] | None) -> list[RunResult]:
    cfg0 = members[0].cfg
    clock = time.perf_counter()
    device = set_up_process(cfg0)  # trainer.*, device and deterministic are the same for every member
    kind, reason = batched_backend([m.cfg for m in members])
    if kind is None:
        raise ValueError(f"these members cannot be trained as one batched model: {reason}")
    if states is None:
        for member in members:
            RunDir(member.run_dir).write_config(member.cfg, member.overrides)
    if kind == "stacked_mlp":
        datas, models = [], []
        for member in members:
            datas.append(load_dataset(member.cfg.data, device, log.debug))
            seed_everything(member.cfg.seed)  # the member's initial weights: those of its single run
            models.append(build_model(member.cfg.model))
        backend: Any = StackedMLPBackend([m.cfg for m in members], datas, models, device)
    else:
        from dropstudy.ensemble import Ensemble

        # One copy of the data on the device for every member (ensemble.why_not: same data keys).
        data = load_dataset(cfg0.data, device, log.info)
        datas = [data] * len(members)
        backend = Ensemble([m.cfg for m in members], data, FastPaths.resolve(cfg0.trainer, device))
        models = backend.models
    how = "hand-batched MLP" if kind == "stacked_mlp" else f"torch.func ensemble, {backend.execution} members"
    # Where the whole batch's time went, the same for every member (summary.json timings_s):
    # data and models, then W&B runs and provenance, then the engine's own split of the loop.
    timings = {"data": time.perf_counter() - clock}
    clock = time.perf_counter()
    log.info(f"vectorized: {len(members)} members as one batched model ({how}) on {describe_device(device)}")

    for i, (member, data, model) in enumerate(zip(members, datas, models)):
        rd = RunDir(member.run_dir)
        label = arm_label(member.cfg.model.dropout, member.cfg.model.dropout_kind)
        state = states[i] if states is not None else None
        if states is None:
            provenance = collect_provenance(describe_device(device), member.overrides, data.describe(),
                                            data.fingerprint(), rd)
            provenance["vectorized"] = {"members": len(members), "index": i, "backend": kind, "group": group,
                                         "execution": getattr(backend, "execution", "stacked")}
            if kind == "stacked_mlp":
                provenance["vectorized"]["mask_seed"] = backend.generator.initial_seed()
            if chunk is not None:
                provenance["vectorized"].update(chunk=chunk[0], run_dirs=[os.path.relpath(m.run_dir, chunk[1])
                                                                          for m in members])
            rd.write_provenance(provenance)
        else:
            provenance = rd.read_provenance()
            if state is not None:
                if provenance.get("data_sha256") not in (None, data.fingerprint()):
                    raise RunDirError(f"{rd.path / 'provenance.json'}: the data has changed since this run started "
                                      "(data_sha256 differs), so it cannot be resumed exactly; start a new run.")
                resumes = [*provenance.get("resumed", []), {"at": now_iso(), "command": shlex.join(sys.orig_argv),
                                                            "from_epoch": state["epoch"]}]
                rd.update_provenance(resumed=resumes)
        job_type = member.cfg.tracker.job_type or label
        tracker = NullTracker() if states is not None and state is None else make_run_tracker(
            member.cfg, rd, data, label, describe_sites(model), provenance, group=group, job_type=job_type,
            extra_tags=extra_tags, shared_process=True, resume_id=state.get("tracker_run_id") if state else None)
        run = MemberRun(rd, tracker, OmegaConf.to_container(member.cfg, resolve=True), n_train=len(data.train),
                        lr=float(member.cfg.optim.lr))
        records.append(MemberRecord(member, run, RunResult(rd.path, label, "failed", None,
                                                           sync_command=tracker.sync_command,
                                                           resumed_from=state["epoch"] if state else None),
                                    label, describe_sites(model), group, job_type,
                                    trained=states is None or state is not None))

    engine = Engine(backend, [rec.run for rec in records], cfg0.trainer, label=f"{len(members)} members",
                    histograms=cfg0.tracker.watch, log_freq=cfg0.tracker.log_freq)
    timings["setup"] = time.perf_counter() - clock
    if states is not None:
        engine.resume(states)
    concluding = [i for i, rec in enumerate(records) if rec.trained]
    started = time.time()
    engine.run()
    duration = time.time() - started
    timings.update(engine.timings)
    # Every member's figures are started before any member concludes, so that they draw side by
    # side on worker processes (one per CPU) while this process logs and writes summaries.
    with plots.Drawer(figure_workers(len(concluding))) as drawer:
        started_figures = [draw_run_figures(records[i].member.cfg, records[i].run.rd, backend.member_model(i), datas[i],
                                            conclude(records[i].run.outcome), records[i].result, drawer)
                           for i in concluding]
        for i, figures in zip(concluding, started_figures):
            rec = records[i]
            conclude_run(rec.member.cfg, rec.run.rd, backend.member_model(i), datas[i], rec.run.outcome,
                         rec.run.tracker, rec.result, rec.dropout_sites, rec.group, rec.job_type,
                         duration_s=duration,
                         extra_summary={"vectorized": {"members": len(records), "index": i}},
                         timings=dict(timings),  # the whole batch's, shared
                         figures=figures)
    for rec in records:
        if not rec.trained:  # set aside before this resume: its summary stands
            rec.result.outcome = rec.run.outcome
            rec.result.status = RunDir(rec.run.rd.path).read_summary().get("status", "failed")
    return [rec.result for rec in records]


def figure_workers(members: int) -> int:
    """Processes for the members' figures: one per usable CPU (at most 16), none for a few
    members, where starting the workers (an import of matplotlib each) costs more than it saves."""
    if members < 8:
        return 1
    return max(1, min(usable_cpus(), 16, members))


# --------------------------------------------------------------------------- resuming a sweep


def batched_chunks(sweep_dir: Path) -> list[list[Path]]:
    """The chunks of a batched sweep under `sweep_dir`, each its members' run dirs in order
    (from each member's provenance.json); [] when it holds no batched members."""
    chunks: dict[int, list[Path]] = {}
    for provenance in sorted(sweep_dir.glob("*/provenance.json")):
        vec = RunDir(provenance.parent).read_provenance().get("vectorized")
        if vec and "run_dirs" in vec:
            chunks.setdefault(vec["chunk"], [sweep_dir / d for d in vec["run_dirs"]])
    return [chunks[c] for c in sorted(chunks)]


def batched_member_of(run_dir: Path) -> Path | None:
    """The sweep dir when `run_dir` is a member of a batched sweep chunk, else None."""
    vec = RunDir.existing(run_dir).read_provenance().get("vectorized")
    if not vec or "run_dirs" not in vec:
        return None
    sweep_dir = run_dir
    for _ in Path(vec["run_dirs"][vec["index"]]).parts:
        sweep_dir = sweep_dir.parent
    return sweep_dir


def resume_sweep(sweep_dir: Path) -> list[RunResult]:
    """`dropstudy resume SWEEP_DIR` of a batched sweep: every chunk with a member that has not
    finished continues as the ensemble it was; a chunk that finished is left alone."""

    results: list[RunResult] = []
    for run_dirs in batched_chunks(sweep_dir):
        if all(RunDir.existing(d).read_status()[0] in ("finished", "diverged") for d in run_dirs):
            continue
        chunk_results = resume_members(run_dirs)
        results.extend(chunk_results)
        if any(r.status == "interrupted" for r in chunk_results):
            break
    return results
