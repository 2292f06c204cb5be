"""Ensembles: M members of one model (the MLP or the CNN) trained in lockstep in one process, on
one copy of the data, behind the backend interface the run engine drives.

Member i is what `dropstudy train` with member i's config trains:
- its initial weights are `build_model` after `seed_everything(member seed)`, as `train_run` builds them;
- its batch order (and augmentation) comes from its own `data.TrainBatches(seed)`, indexing the one
  copy of the training split on the device;
- its dropout sites drop with its own p (its schedule applied each epoch), with the kinds of dropout.py;
- its optimizer state, max-norm constraint, evaluation (MC dropout too) and `trainer.on_nan` are its own.

Two ways to execute the members on a device (`sweep.member_execution`), with the same results:

    stacked     every parameter stacked [M, ...] (torch.func.stack_module_state); one forward and
                backward for all members, vmap over functional_call with randomness="different";
                one optimizer over the stacked tensors, which is M optimizers because SGD and Adam
                update every element on its own. The dropout sites drop with their tensor p
                (`SiteDropout.drop_rate`), stacked like the weights, so each member has its own.
    sequential  M plain modules with one optimizer each (`make_optimizer`), each trained
                through the epoch in turn: the single path's own step, one process and one copy
                of the data.

`auto` picks by measurement (`member_execution`; scripts/bench_ensemble.py, 8 members): stacked
on CUDA, and for the MLP everywhere (its small matmuls are bound by per-op overhead, which
stacking divides by M: 1.4x the single models' speed on one CPU thread); for the CNN on a CPU,
the members in turn (vmap turns its convolutions into grouped ones, which ran at 0.43x the
single models' speed on one CPU thread).

Dropout masks are drawn from the process's global torch generator (as a single run draws them),
so `shared_state` carries it: a resumed ensemble continues exactly.
"""

from __future__ import annotations

import copy
import math
import types
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from dropstudy.backends import MC_SPLITS
from dropstudy.data import Dataset, batches
from dropstudy.dropout import DropoutSchedule, sites
from dropstudy.models import build_model, weight_layers, weight_norms
from dropstudy.runtime import FastPaths, seed_everything
from dropstudy.tracking import flatten
from dropstudy.train import apply_max_norm, loss_function, make_optimizer, rng_states
from dropstudy.uncertainty import Predictions, mc_metrics, predictions

EXECUTIONS = ("stacked", "sequential")
# What members may differ in; everything else must be the same for all. tracker.* only says where
# a run is logged. The data (data.seed included) is shared: one copy of it on the device.
VARYING_KEYS = (
    "seed",
    "model.dropout",
    "model.input_dropout",
    "model.conv_dropout",
    "model.dropout_schedule.kind",
    "model.dropout_schedule.epochs",
)
VARYING_PREFIXES = ("tracker.",)


def _site_layout(model: DictConfig) -> tuple[bool, bool]:
    """Which optional dropout sites a model has (input site, conv sites): members must agree, since
    their parameters and rates are stacked site by site."""
    if model.dropout_kind == "none":
        return False, False
    conv = model.get("conv_dropout", 0.0)
    conv_values = list(conv) if OmegaConf.is_list(conv) or isinstance(conv, (list, tuple)) else [conv]
    return float(model.input_dropout) > 0, model.name == "cnn" and any(float(p) > 0 for p in conv_values)


def why_not(cfgs: list[DictConfig]) -> str | None:
    """None when these configs can train as one ensemble; else a short reason naming the key."""
    if not cfgs:
        return "there are no members to train"
    layout = _site_layout(cfgs[0].model)
    for cfg in cfgs[1:]:
        if _site_layout(cfg.model) != layout:
            return ("members have different dropout sites (model.input_dropout or model.conv_dropout is 0 for some "
                    "and not for others); an ensemble stacks its members site by site")
    difference = config_difference(cfgs, VARYING_KEYS, VARYING_PREFIXES)
    if difference is not None:
        hint = " (one copy of the data is shared: set data.seed explicitly)" if difference.startswith("data.seed ") else ""
        return f"members differ in {difference}; only {', '.join(VARYING_KEYS)} may differ{hint}"
    return None


def config_difference(cfgs: list[DictConfig], varying: tuple[str, ...], prefixes: tuple[str, ...]) -> str | None:
    """`key (a vs b)` for the first config key, other than `varying` and `prefixes`, in which a
    member differs from the first one; None when they agree on all of them."""
    first = flatten(OmegaConf.to_container(cfgs[0], resolve=True))
    for cfg in cfgs[1:]:
        other = flatten(OmegaConf.to_container(cfg, resolve=True))
        for key in sorted(set(first) | set(other)):
            if key not in varying and not key.startswith(prefixes) and first.get(key) != other.get(key):
                return f"{key} ({first.get(key)!r} vs {other.get(key)!r})"
    return None


def member_execution(requested: str, cfgs: list[DictConfig], device: torch.device) -> str:
    """`sweep.member_execution` resolved for these members on this device: stacked or sequential."""
    cfg = cfgs[0]
    # A skipped step must leave one member's optimizer alone (Adam's step count is per tensor, one
    # for all stacked members), and torch.compile wraps a module, not the vmap'd step.
    needs_sequential = {"trainer.on_nan=skip": cfg.trainer.on_nan == "skip", "trainer.compile=true": cfg.trainer.compile}
    if requested == "auto":
        if any(needs_sequential.values()):
            return "sequential"
        # Measured (see the module docstring): the CNN's grouped convolutions lose on a CPU.
        return "stacked" if device.type == "cuda" or cfg.model.name == "mlp" else "sequential"
    if requested == "stacked":
        for key, needs in needs_sequential.items():
            if needs:
                raise ValueError(f"sweep.member_execution=stacked cannot train with {key}; use sequential or auto")
    if requested not in EXECUTIONS:
        raise ValueError(f"sweep.member_execution={requested!r}: use auto, stacked or sequential")
    return requested


def _cloned(tree: Any) -> Any:
    """`tree` (a state_dict) with its tensors copied: nothing in it aliases the live state."""
    return copy.deepcopy(tree)


class Ensemble:
    """M members trained in lockstep, one epoch at a time (see the module docstring). `cfgs` are
    the members' composed and validated configs; `data` is the one dataset they share."""

    def __init__(self, cfgs: list[DictConfig], data: Dataset, fast: FastPaths | None = None,
                 execution: str | None = None):
        reason = why_not(cfgs)
        if reason is not None:
            raise ValueError(reason)
        self.cfgs = list(cfgs)
        cfg = self.cfgs[0]
        self.data = data
        device = data.train.targets.device
        self.fast = fast or FastPaths(device)
        self.execution = member_execution(execution or cfg.sweep.member_execution, self.cfgs, device)
        self.members = len(self.cfgs)
        self.loss_fn = loss_function(data.task)
        self.classification = data.task == "classification"
        self.trainer_cfg = cfg.trainer
        self.max_norm = cfg.optim.max_norm
        self.mc_samples = int(cfg.eval.mc_samples)
        # Every member as `train_run` builds it: its weights depend on its seed alone.
        self.models: list[nn.Module] = []
        for member in self.cfgs:
            seed_everything(member.seed)
            self.models.append(self.fast.prepare_model(build_model(member.model).to(device)))
        self.schedules = [
            DropoutSchedule(m.model.dropout_schedule.kind, m.model.dropout_schedule.epochs or m.trainer.epochs)
            for m in self.cfgs
        ]
        self.loaders = [data.train_batches(m.trainer.batch_size, m.seed) for m in self.cfgs]
        self.skipped_steps = [0] * self.members
        self.skip_bad = self.trainer_cfg.on_nan == "skip"  # checked at every sequential step
        self.weight_names = [f"{name}.weight" for name, _ in weight_layers(self.models[0])]
        # The last evaluation's MC-dropout predictions per split and member (the test set's feed
        # the calibration figure).
        self.mc_predictions: dict[str, list[Predictions]] = {}
        if self.execution == "stacked":
            # The members' own modules stay as shells: member_state/member_model copy a slice into
            # them, and they hold each member's float p for the schedule.
            self.params, self.buffers = stack_module_state(self.models)
            self.template = copy.deepcopy(self.models[0]).to("meta")
            for _, site in sites(self.template):
                site.rate_from_buffer = True
            # make_optimizer takes a module; the stacked tensors in the single model's parameter order.
            stacked = types.SimpleNamespace(parameters=lambda: iter(self.params.values()))
            self.optimizer = make_optimizer(cfg.optim, stacked)
        else:
            self.nets = [self.fast.forward(m) for m in self.models]
            self.optimizers = [make_optimizer(m.optim, model) for m, model in zip(self.cfgs, self.models)]

    @property
    def steps_per_epoch(self) -> int:
        bs = self.trainer_cfg.batch_size
        return 1 if bs is None else math.ceil(len(self.data.train) / bs)

    # -- schedule ---------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> list[dict[str, float]]:
        rates = [schedule.apply(model, epoch) for schedule, model in zip(self.schedules, self.models)]
        if self.execution == "stacked":
            # The sites' `rate` buffers follow p; restacked, member i's site draws with its p.
            self.buffers = {name: torch.stack([m.get_buffer(name) for m in self.models]) for name in self.buffers}
        return rates

    # -- training ---------------------------------------------------------------------------
    def train_epoch(self, progress: Any) -> list[dict[str, float]]:
        m, device = self.members, self.data.train.targets.device
        # Per member, summed on the device as Single.train_epoch sums them (examples and skipped
        # steps counted on the host), read in one host copy per epoch.
        loss_sum = torch.zeros(m, device=device)
        correct = torch.zeros(m, dtype=torch.long, device=device)
        counted, skipped = [0] * m, [0] * m
        if self.execution == "stacked":
            # Every member steps on a batch of the same size (and none skips: why_not), so one count serves all.
            examples = 0
            for member_batches in zip(*self.loaders):
                examples += self._stacked_step(member_batches, loss_sum, correct)
                progress.advance(1)
            counted = [examples] * m
        else:
            # Member after member through the epoch, each as its single run would train it: one
            # model's weights and optimizer state stay in the CPU's caches for a whole epoch
            # (interleaving the members step by step measured 20% slower on the 2-core EPYC).
            done = 0
            for i, loader in enumerate(self.loaders):
                for xb, yb in loader:
                    self._sequential_step(i, xb, yb, loss_sum, correct, counted, skipped)
                    done += 1
                    if done % m == 0:  # the bar counts steps of all members together
                        progress.advance(1)
        divisor = torch.tensor([max(n, 1) for n in counted], dtype=loss_sum.dtype)
        values = (torch.stack([loss_sum, correct.to(loss_sum.dtype)]).cpu() / divisor).tolist()
        out = []
        for i in range(m):
            metrics = {"train/loss": values[0][i] if counted[i] else float("nan")}
            if self.classification:
                metrics["train/acc"] = values[1][i]
            if self.skip_bad:
                self.skipped_steps[i] += skipped[i]
                metrics["train/skipped_steps"] = self.skipped_steps[i]
            out.append(metrics)
        return out

    def _stacked_step(self, member_batches, loss_sum, correct) -> int:
        """One step of every member at once; returns the examples each member trained on."""
        xs = self.data.prepare(torch.stack([xb for xb, _ in member_batches]))
        ys = torch.stack([yb for _, yb in member_batches])

        def member_loss(params, buffers, x, y):
            out = functional_call(self.template, (params, buffers), (x,))
            return self.loss_fn(out, y), out

        if not self.template.training:  # every evaluation puts it back as it found it
            self.template.train()
        with self.fast.autocast():
            losses, outs = vmap(member_loss, randomness="different")(self.params, self.buffers, xs, ys)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # members are independent: each gets the gradient of its own loss
        self.optimizer.step()
        if self.max_norm is not None:
            self._stacked_max_norm()
        with torch.no_grad():
            loss_sum.add_(losses, alpha=ys.shape[1])
            if self.classification:
                correct.add_(torch.count_nonzero(outs.argmax(-1) == ys, dim=-1))
        return ys.shape[1]

    @torch.no_grad()
    def _stacked_max_norm(self) -> None:
        """train.apply_max_norm on every member: each unit's row (or filter) of every member's
        weight is one sub-tensor along dim 0 of the [M*out, ...] view."""
        for name in self.weight_names:
            weight = self.params[name]
            weight.view(-1, *weight.shape[2:]).renorm_(2, 0, self.max_norm)

    def _sequential_step(self, i, xb, yb, loss_sum, correct, counted, skipped) -> None:
        """Single.train_epoch's step, for member i."""
        fast = self.fast
        with fast.autocast():
            out = self.nets[i](fast.inputs(self.data.prepare(xb)))
            loss = self.loss_fn(out, yb)
        optimizer = self.optimizers[i]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.skip_bad and not torch.isfinite(loss):  # a sync per step, as the single path
            skipped[i] += 1
            return
        optimizer.step()
        if self.max_norm is not None:
            apply_max_norm(self.models[i], self.max_norm)
        with torch.no_grad():
            loss_sum[i].add_(loss, alpha=len(yb))
            if self.classification:
                correct[i].add_(torch.count_nonzero(out.argmax(1) == yb))
        counted[i] += len(yb)

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()  # autocast reuses casts across batches here, not under inference_mode
    def _outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every member's output for the same inputs, in evaluation mode."""
        if self.execution == "stacked":
            def member(params, buffers):
                return functional_call(self.template, (params, buffers), (x,))

            self.template.eval()
            with self.fast.autocast(reuse_casts=True):
                outs = vmap(member, randomness="different")(self.params, self.buffers).float()
            self.template.train()
            return list(outs.unbind(0))
        outs = []
        for model, net in zip(self.models, self.nets):
            model.eval()
            with self.fast.autocast(reuse_casts=True):
                outs.append(net(self.fast.inputs(x)).float())
            model.train()
        return outs

    @torch.no_grad()  # autocast reuses casts across batches here, not under inference_mode
    def evaluate(self, split: str) -> list[dict[str, float]]:
        """Each member's mean loss (and accuracy) over `split` in evaluation mode, summed as
        train.evaluate sums them, in batches of trainer.eval_batch_size; one host sync."""
        data, m = self.data, self.members
        part = getattr(data, split)
        device = part.targets.device
        loss_sum = torch.zeros(m, device=device)
        correct = torch.zeros(m, device=device)
        with self.fast.autocast(reuse_casts=True):  # each weight cast once per evaluation (FastPaths.autocast)
            for xb, yb in batches(part, self.trainer_cfg.eval_batch_size):
                for i, out in enumerate(self._outputs(data.prepare(xb))):
                    loss_sum[i] += self.loss_fn(out, yb, reduction="sum") / (out.shape[1] if data.task == "regression" else 1)
                    if self.classification:
                        correct[i] += (out.argmax(1) == yb).sum()
        values = torch.stack([loss_sum / len(part), correct / len(part)]).tolist()
        results = []
        for i in range(m):
            metrics = {f"{split}/loss": values[0][i]}
            if self.classification:
                metrics[f"{split}/acc"] = values[1][i]
            results.append(metrics)
        if self.mc_samples and split in MC_SPLITS:
            self.mc_predictions[split] = []
            for i in range(m):
                # MC dropout on member i's own module, as the single path runs it (uncertainty.py).
                pred = predictions(self._live_model(i), data, part, self.trainer_cfg.eval_batch_size, self.mc_samples)
                self.mc_predictions[split].append(pred)
                results[i].update({f"{split}_mc/{k}": v for k, v in mc_metrics(pred, data.task).items()})
        return results

    @torch.no_grad()
    def weight_norms(self) -> list[dict[str, float]]:
        if self.execution == "sequential":
            return [weight_norms(model) for model in self.models]
        norms = torch.stack([self.params[name].flatten(1).norm(dim=1) for name in self.weight_names], dim=1).tolist()
        layers = [name.rsplit(".", 1)[0] for name in self.weight_names]
        return [{f"weights/l2/{layer}": v for layer, v in zip(layers, row)} for row in norms]

    def histogram_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's parameters and (last step's) gradients under the single model's names."""
        if self.execution == "sequential":
            named = [(name, p.detach(), p.grad) for name, p in self.models[i].named_parameters()]
        else:
            named = [(name, p.detach()[i], None if p.grad is None else p.grad[i]) for name, p in self.params.items()]
        out = {f"parameters/{name}": value for name, value, _ in named}
        out.update({f"gradients/{name}": grad for name, _, grad in named if grad is not None})
        return out

    # -- members' state ---------------------------------------------------------------------
    @torch.no_grad()
    def _live_model(self, i: int) -> nn.Module:
        """Member i's own module holding its current weights (stacked: copied in from its slice)."""
        model = self.models[i]
        if self.execution == "stacked":
            for name, param in model.named_parameters():
                param.copy_(self.params[name][i])
        return model

    def member_model(self, i: int) -> nn.Module:
        return copy.deepcopy(self._live_model(i))

    def member_state(self, i: int) -> dict[str, Any]:
        model = self._live_model(i)
        if self.execution == "sequential":
            optimizer = _cloned(self.optimizers[i].state_dict())
        else:
            optimizer = self._member_optimizer_state(i, model)
        return {
            "model": _cloned(model.state_dict()),
            "optimizer": optimizer,
            # The member's own batch-order (and crop) generators, with the process's in the keys
            # train.rng_states writes, so the single path can resume this member by itself.
            "rng": rng_states(self.loaders[i]),
            "skipped_steps": self.skipped_steps[i],
        }

    @torch.no_grad()
    def _member_optimizer_state(self, i: int, model: nn.Module) -> dict[str, Any]:
        """Member i's slice of the stacked optimizer, as the state_dict of make_optimizer(model)."""
        own = make_optimizer(self.cfgs[i].optim, model)
        for name, param in model.named_parameters():
            state = self.optimizer.state.get(self.params[name], {})
            own.state[param] = {
                key: torch.empty_like(param).copy_(v[i]) if torch.is_tensor(v) and v.dim() > 0
                else v.clone() if torch.is_tensor(v) else v
                for key, v in state.items()
            }
        return own.state_dict()

    @torch.no_grad()
    def load_member_state(self, i: int, state: dict[str, Any]) -> None:
        # Optimizer.load_state_dict keeps the tensors it is given: training would change the caller's.
        state = _cloned(state)
        model = self.models[i]
        model.load_state_dict(state["model"])
        self.loaders[i].load_state(state["rng"])
        self.skipped_steps[i] = int(state.get("skipped_steps", 0))
        if self.execution == "sequential":
            self.optimizers[i].load_state_dict(state["optimizer"])
            return
        own = make_optimizer(self.cfgs[i].optim, model)
        own.load_state_dict(state["optimizer"])  # casts to the device as a single run would
        for name, param in model.named_parameters():
            stacked = self.params[name]
            stacked[i].copy_(param)
            target = self.optimizer.state[stacked]
            for key, value in own.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() > 0:
                    if key not in target:  # members are loaded one by one; the others' slices follow
                        target[key] = torch.zeros_like(stacked)
                    target[key][i].copy_(value)
                elif key in target and not torch.equal(torch.as_tensor(target[key]), torch.as_tensor(value)):
                    raise ValueError(f"member {i}'s optimizer is at {key}={value}, another member's at "
                                     f"{target[key]}; stacked members share it: use sweep.member_execution=sequential")
                else:
                    target[key] = value.clone() if torch.is_tensor(value) else value

    def shared_state(self) -> dict[str, Any]:
        """The global generators every member's dropout masks are drawn from."""
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_shared_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
