"""The one backend: M >= 1 members of one model (the MLP or the CNN) trained in lockstep in one
process, one epoch at a time, behind the interface the run engine drives. `dropstudy train` is
M = 1; a sweep, a study's arms or a rerun batch several.

Member i is what `dropstudy train` with member i's config trains:
- its initial weights are `build_model` after `seed_everything(member seed)`;
- its data are its own `Dataset` (its data.seed's split and subset, rows of one shared copy of the
  images) and its batch order (and augmentation) come from its own `data.TrainBatches(seed)`;
- its dropout masks come from its own random stream, which starts where its single run's global
  generator stands after the model is built;
- its dropout p (and schedule), optimizer state, max-norm constraint, evaluation (MC dropout too)
  and `trainer.on_nan` are its own.

Two ways to execute the members (`sweep.member_execution`):

    sequential  M plain modules with one optimizer each, each trained through the epoch in turn
                with its random stream lent to the global generator for its turn: exactly its
                single run's step, masks and numbers.
    stacked     every parameter stacked [M, ...] and one optimizer over the stacked tensors (SGD
                and Adam update every element on their own, so that is M optimizers); one forward
                and backward for all members. The MLP's forward is written out with batched
                matmuls over weights stored [M, in, out], so that each member's masks can come
                from its own stream (a generator per member; vmap cannot draw from several) at
                about vmap's speed (BENCHMARKS.md); any other model runs `vmap` over
                `functional_call`, whose masks come from the process's global generator, one
                stream shared by the members (`shared_state`).

`auto` picks stacked for the MLP, and for the CNN on CUDA with several members; sequential for the
CNN on a CPU, where vmap's grouped convolutions are slower than the members in turn."""

from __future__ import annotations

import copy
import math
import random
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from dropstudy.data.datasets import Dataset, batches
from dropstudy.engine.batching import member_execution, why_not
from dropstudy.engine.runtime import FastPaths, seed_everything
from dropstudy.engine.steps import apply_max_norm, clone_tensors, evaluate, loss_function, make_optimizer
from dropstudy.model.dropout import DropoutSchedule, noise_is_normal, noise_multiplier, sites
from dropstudy.model.networks import build_model, weight_layers, weight_norms
from dropstudy.model.uncertainty import Predictions, mc_metrics, predictions
from dropstudy.store.rundir import RunDirError

# The splits MC-dropout evaluation (eval.mc_samples) runs on.
MC_SPLITS = ("val", "test")


def global_stream() -> dict[str, Any]:
    """The process's global torch generators (CPU, and every CUDA device's): a copy."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def lend_stream(stream: dict[str, Any]) -> None:
    """Make `stream` the process's global torch generators."""
    torch.set_rng_state(stream["torch"])
    if stream.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(stream["cuda"])


def mask_generator(stream: dict[str, Any], device: torch.device) -> torch.Generator:
    """A generator on `device` that continues `stream` (the member's random stream as a
    generator of its own, for stacked masks)."""
    generator = torch.Generator(device=device)
    if device.type == "cuda":
        generator.set_state(stream["cuda"][device.index or 0])
    else:
        generator.set_state(stream["torch"])
    return generator


class Backend:
    """M members trained in lockstep (see the module docstring). `cfgs` are the members' composed
    and validated configs; `datas[i]` is member i's dataset (members with the same data config
    share one object, and CIFAR-10 members share the images whatever their data.seed)."""

    def __init__(self, cfgs: list[DictConfig], datas: list[Dataset], fast: FastPaths | None = None,
                 execution: str | None = None, hand_mlp: bool = True):
        reason = why_not(cfgs)
        if reason is not None:
            raise ValueError(reason)
        assert len(datas) == len(cfgs)
        self.cfgs, self.datas = list(cfgs), list(datas)
        cfg = self.cfgs[0]
        device = datas[0].train.device
        self.device = device
        self.fast = fast or FastPaths(device)
        self.execution = member_execution(execution or cfg.sweep.member_execution, self.cfgs, device)
        self.members = len(self.cfgs)
        self.task = datas[0].task
        self.loss_fn = loss_function(self.task)
        self.classification = self.task == "classification"
        self.trainer_cfg = cfg.trainer
        self.max_norm = cfg.optim.max_norm
        self.mc_samples = int(cfg.eval.mc_samples)
        self.shared_data = all(d is datas[0] for d in datas)
        self._fixed: tuple[torch.Tensor, torch.Tensor] | None = None  # the full batch, stacked (_full_batch)
        self._eval_cache: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._constant_rates: list[dict[str, float]] | None = None  # set_epoch's, when no schedule changes p
        # Every member as its single run builds it; its random stream starts where that run's does.
        self.models: list[nn.Module] = []
        self.streams: list[dict[str, Any]] = []
        for member in self.cfgs:
            seed_everything(member.seed)
            self.models.append(self.fast.prepare_model(build_model(member.model).to(device)))
            self.streams.append(global_stream())
        self.sites = [sites(model) for model in self.models]
        self.schedules = [
            DropoutSchedule(m.model.dropout_schedule.kind, m.model.dropout_schedule.epochs or m.trainer.epochs)
            for m in self.cfgs
        ]
        self.loaders = [d.train_batches(m.trainer.batch_size, m.seed) for m, d in zip(self.cfgs, self.datas)]
        self.skipped_steps = [0] * self.members
        self.skip_bad = self.trainer_cfg.on_nan == "skip"  # checked at every sequential step
        self.weight_names = [f"{name}.weight" for name, _ in weight_layers(self.models[0])]
        # The last evaluation's MC-dropout predictions per split and member (the test set's feed
        # the calibration figure).
        self.mc_predictions: dict[str, list[Predictions]] = {}
        # `hand_mlp=False` only for scripts/bench_backend.py, which measures this choice.
        self.hand_mlp = hand_mlp and self.execution == "stacked" and cfg.model.name == "mlp"
        # Stacked weights the hand-written MLP keeps as [M, in, out] (see `own_layout`).
        self.transposed: set[str] = set()
        if self.execution == "stacked":
            # The members' own modules stay as shells: member_state/member_model copy a slice into
            # them, and they hold each member's float p for the schedule.
            self.params, self.buffers = stack_module_state(self.models)
            if self.hand_mlp:
                self.transposed = set(self.weight_names)
                self.params = {name: (p.transpose(1, 2).contiguous().detach().requires_grad_() if name in self.transposed
                                      else p) for name, p in self.params.items()}
                self.masks = [mask_generator(stream, device) for stream in self.streams]
                names = list(self.params)
                self.layers = [(names[k], names[k + 1]) for k in range(0, len(names), 2)]
                kinds = {site.kind for _, site in self.sites[0]}  # one kind at every site of an MLP
                self.site_kind = kinds.pop() if kinds else None
                self.input_site = any(name.endswith("drop_in") for name, _ in self.sites[0])
                # The units of every site side by side: one draw of masks and one multiplier a step.
                widths = ([self.params[names[0]].shape[1]] if self.input_site else []) + [
                    self.params[w].shape[2] for w, _ in self.layers[:-1]] if self.site_kind else []
                self.site_widths = torch.tensor(widths, dtype=torch.long)
                self.site_units = sum(widths)
                bounds = [0, *torch.cumsum(self.site_widths, 0).tolist()]
                self.site_slices = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
            else:
                self.template = copy.deepcopy(self.models[0]).to("meta")
                for _, site in sites(self.template):
                    site.rate_from_buffer = True
            self._rates = self._stacked_rates()
            # make_optimizer takes a module; the stacked tensors in the single model's parameter order.
            stacked = types.SimpleNamespace(parameters=lambda: iter(self.params.values()))
            self.optimizer = make_optimizer(cfg.optim, stacked)
        else:
            self.nets = [self.fast.forward(m) for m in self.models]
            self.optimizers = [make_optimizer(m.optim, model) for m, model in zip(self.cfgs, self.models)]

    @property
    def steps_per_epoch(self) -> int:
        bs = self.trainer_cfg.batch_size
        return 1 if bs is None else math.ceil(len(self.datas[0].train) / bs)

    def describe(self) -> str:
        if self.execution == "sequential":
            return "members in turn" if self.members > 1 else "one model"
        return "stacked, hand-batched MLP" if self.hand_mlp else "stacked, torch.func vmap"

    # -- schedule ---------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> list[dict[str, float]]:
        if self._constant_rates is not None:
            return self._constant_rates
        rates = [schedule.apply_to(named, epoch) for schedule, named in zip(self.schedules, self.sites)]
        if all(s.kind == "constant" for s in self.schedules):  # set once, then the same every epoch
            self._constant_rates = rates
        elif self.execution == "stacked":
            self._rates = self._stacked_rates()
        return rates

    def _stacked_rates(self) -> torch.Tensor | dict[str, torch.Tensor]:
        """Every member's p as the stacked forward takes it: per unit of every site side by side,
        [M, 1, units], for the hand-written MLP; the sites' `rate` buffers stacked for vmap."""
        if self.hand_mlp:
            per_site = torch.tensor([[site.p for _, site in named] for named in self.sites]).reshape(self.members, -1)
            return per_site.repeat_interleave(self.site_widths, dim=1).unsqueeze(1).to(self.device)
        self.buffers = {name: torch.stack([m.get_buffer(name) for m in self.models]) for name in self.buffers}
        return self.buffers

    # -- training ---------------------------------------------------------------------------
    def train_epoch(self, progress: Any) -> list[dict[str, float]]:
        m, device = self.members, self.device
        # Per member, summed on the device (examples and skipped steps counted on the host), read
        # in one host copy per epoch.
        loss_sum = torch.zeros(m, device=device)
        correct = torch.zeros(m, dtype=torch.long, device=device)
        counted, skipped = [0] * m, [0] * m
        if self.execution == "stacked" and self._full_batch():
            # One step an epoch: each member's loss is its epoch's, read in one host copy.
            if self._fixed is None:
                self._fixed = self._stacked_batch(next(iter(zip(*self.loaders))))
            losses, outs = self._stacked_step(*self._fixed)
            progress.advance(1)
            return self._epoch_metrics(losses.detach(), None if not self.classification else
                                       torch.count_nonzero(outs.argmax(-1) == self._fixed[1], dim=-1), self._fixed[1].shape[1])
        if self.execution == "stacked":
            # Every member steps on a batch of the same size (and none skips: member_execution).
            examples = 0
            for member_batches in zip(*self.loaders):
                xs, ys = self._stacked_batch(member_batches)
                losses, outs = self._stacked_step(xs, ys)
                with torch.no_grad():
                    loss_sum.add_(losses.detach(), alpha=ys.shape[1])
                    if self.classification:
                        correct.add_(torch.count_nonzero(outs.argmax(-1) == ys, dim=-1))
                examples += ys.shape[1]
                progress.advance(1)
            counted = [examples] * m
        else:
            # Member after member through the epoch, each as its single run would train it (one
            # model's weights and optimizer state stay in the CPU's caches for a whole epoch).
            done = 0
            for i, loader in enumerate(self.loaders):
                lend_stream(self.streams[i])
                for xb, yb in loader:
                    self._sequential_step(i, xb, yb, loss_sum, correct, counted, skipped)
                    done += 1
                    if done % m == 0:  # the bar counts steps of all members together
                        progress.advance(1)
                self.streams[i] = global_stream()
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

    def _full_batch(self) -> bool:
        """Whether every step is the whole training split, unshuffled and unaugmented: the same
        tensors every epoch, stacked once (`_fixed`)."""
        bs = self.trainer_cfg.batch_size
        return (bs is None or bs >= len(self.datas[0].train)) and not self.datas[0].augment

    def _stacked_batch(self, member_batches) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's batch stacked: inputs [M, B, ...] as the model takes them, targets [M, B, ...]."""
        return (self.datas[0].prepare(torch.stack([xb for xb, _ in member_batches])),
                torch.stack([yb for _, yb in member_batches]))

    def _epoch_metrics(self, losses: torch.Tensor, correct: torch.Tensor | None, n: int) -> list[dict[str, float]]:
        """Per member train/loss (and train/acc) of a one-step epoch, in one host copy."""
        values = (losses if correct is None else torch.stack([losses, correct.to(losses.dtype) / n])).tolist()
        if correct is None:
            return [{"train/loss": v} for v in values]
        return [{"train/loss": loss, "train/acc": acc} for loss, acc in zip(*values)]

    def _stacked_step(self, xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of every member at once; each member's mean loss [M] and the outputs."""
        with self.fast.autocast():
            outs = self._forward(xs, training=True)
            losses = self._member_losses(outs, ys, mean=True)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # members are independent: each gets the gradient of its own loss
        self.optimizer.step()
        if self.max_norm is not None:
            self._stacked_max_norm()
        return losses, outs

    def _member_losses(self, outs: torch.Tensor, ys: torch.Tensor, mean: bool) -> torch.Tensor:
        """[M] per-member losses of stacked outputs: the mean (or the sum over examples, with the
        regression's outputs averaged) as loss_function gives it for one member."""
        m, n = ys.shape[0], ys.shape[1]
        if self.classification:
            per = F.cross_entropy(outs.reshape(m * n, -1).float(), ys.reshape(-1), reduction="none").view(m, n).sum(1)
            return per / n if mean else per
        if mean:
            return ((outs.float() - ys) ** 2).mean(dim=(1, 2))
        return ((outs.float() - ys) ** 2).sum(dim=(1, 2)) / outs.shape[2]

    def _forward(self, xs: torch.Tensor, training: bool) -> torch.Tensor:
        """Every member's output for its inputs xs[i] ([M, N, ...] -> [M, N, out])."""
        if self.hand_mlp:
            return self._mlp_forward(xs, training)

        def member(params, buffers, x):
            return functional_call(self.template, (params, buffers), (x,))

        self.template.train(training)
        try:
            return vmap(member, randomness="different")(self.params, self.buffers, self.fast.inputs(xs))
        finally:
            self.template.train()

    def _mlp_forward(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """networks.MLP for every member at once: x [M, N, in] through `baddbmm` with the weights
        stored [M, in, out], so that `x @ W` needs no transpose and the weight gradient comes out
        in the stored layout; each dropout site with the member's p and the member's own masks,
        applied as one multiplier for all sites (dropout.noise_multiplier)."""
        params, kind = self.params, self.site_kind
        if kind is None:
            multiplier = None
        elif training:
            multiplier = noise_multiplier(kind, self._mlp_noise(x.shape[1], x.dtype), self._rates)
        else:  # evaluation: vanilla scales by the keep probability, the others pass x as it is
            multiplier = 1.0 - self._rates if kind == "vanilla" else None
        sites = iter(self.site_slices)

        def drop(h: torch.Tensor) -> torch.Tensor:
            return h if multiplier is None else h * multiplier[..., next(sites)]

        if self.input_site:
            x = drop(x)
        for weight, bias in self.layers[:-1]:
            x = drop(torch.relu(torch.baddbmm(params[bias].unsqueeze(1), x, params[weight])))
        weight, bias = self.layers[-1]
        return torch.baddbmm(params[bias].unsqueeze(1), x, params[weight])

    def _mlp_noise(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """This step's noise for every unit of every site (uniform; normal for gaussian), [M, n,
        units]: one draw per member from its own generator."""
        noise = torch.empty((self.members, n, self.site_units), device=self.device, dtype=dtype)
        normal = noise_is_normal(self.site_kind)
        for i, generator in enumerate(self.masks):  # in place: a draw into its slice, nothing allocated
            noise[i].normal_(generator=generator) if normal else noise[i].uniform_(generator=generator)
        return noise

    @torch.no_grad()
    def _stacked_max_norm(self) -> None:
        """steps.apply_max_norm on every member: each unit's incoming weights (a row, or a filter,
        of the single model's weight; a column of a weight stored [M, in, out]) scaled back onto
        the ball of radius max_norm, with the factor torch.renorm uses."""
        for name in self.weight_names:
            weight = self.params[name]
            if name in self.transposed:
                norms = weight.norm(dim=1, keepdim=True)
                weight.mul_(torch.where(norms > self.max_norm, self.max_norm / (norms + 1e-7), torch.ones_like(norms)))
            else:
                weight.view(-1, *weight.shape[2:]).renorm_(2, 0, self.max_norm)

    def _sequential_step(self, i, xb, yb, loss_sum, correct, counted, skipped) -> None:
        """Member i's single-run step."""
        fast = self.fast
        with fast.autocast():
            out = self.nets[i](fast.inputs(self.datas[i].prepare(xb)))
            loss = self.loss_fn(out, yb)
        optimizer = self.optimizers[i]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.skip_bad and not torch.isfinite(loss):  # a sync per step (the default `stop` needs none)
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
    def evaluate(self, split: str) -> list[dict[str, float]]:
        """Each member's mean loss (and accuracy) over its `split` in evaluation mode, in batches
        of trainer.eval_batch_size; with eval.mc_samples, for val and test also the MC-dropout
        average as `<split>_mc/*` (not for train_eval, where it would double the cost)."""
        m, bs = self.members, self.trainer_cfg.eval_batch_size
        parts = [getattr(d, split) for d in self.datas]
        if self.execution == "sequential":
            results = [{f"{split}/{k}": v for k, v in evaluate(net, data, part, bs, self.fast).items()}
                       for net, data, part in zip(self.nets, self.datas, parts)]
        else:
            loss_sum = torch.zeros(m, device=self.device)
            correct = torch.zeros(m, device=self.device)
            with self.fast.autocast(reuse_casts=True):  # each weight cast once per evaluation
                for xs, ys in self._eval_batches(split, parts, bs):
                    outs = self._forward(xs, training=False).float()
                    loss_sum += self._member_losses(outs, ys, mean=False)
                    if self.classification:
                        correct += (outs.argmax(-1) == ys).sum(-1)
            values = torch.stack([loss_sum / len(parts[0]), correct / len(parts[0])]).tolist()
            results = []
            for i in range(m):
                metrics = {f"{split}/loss": values[0][i]}
                if self.classification:
                    metrics[f"{split}/acc"] = values[1][i]
                results.append(metrics)
        if self.mc_samples and split in MC_SPLITS:
            self.mc_predictions[split] = []
            training_stream = global_stream()  # stacked members' shared one lives there (vmap)
            for i in range(m):
                # MC dropout on member i's own module, from its own stream, as its single run runs it.
                lend_stream(self.streams[i])
                pred = predictions(self._live_model(i), self.datas[i], parts[i], bs, self.mc_samples)
                self.mc_predictions[split].append(pred)
                results[i].update({f"{split}_mc/{k}": v for k, v in mc_metrics(pred, self.task).items()})
            lend_stream(training_stream)
        return results

    def _eval_batches(self, split: str, parts: list[Any], bs: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The members' batches of `split` stacked, [M, B, ...]: one copy of the inputs seen by
        every member when they share the data. The MLP's (small) are stacked once and kept."""
        if split in self._eval_cache:
            return self._eval_cache[split]
        prepare, m, out = self.datas[0].prepare, self.members, []
        for member_batches in zip(*(batches(part, bs) for part in (parts[:1] if self.shared_data else parts))):
            xs = torch.stack([prepare(xb) for xb, _ in member_batches])
            ys = torch.stack([yb for _, yb in member_batches])
            if self.shared_data:
                xs, ys = xs.expand(m, *xs.shape[1:]), ys.expand(m, *ys.shape[1:])
            out.append((xs, ys))
        if self.hand_mlp:
            self._eval_cache[split] = out
        return out

    @torch.no_grad()
    def weight_norms(self) -> list[dict[str, float]]:
        if self.execution == "sequential":
            return [weight_norms(model) for model in self.models]
        # A layout does not change a Frobenius norm: the stacked weights serve as they are.
        norms = torch.stack([self.params[name].flatten(1).norm(dim=1) for name in self.weight_names], dim=1).tolist()
        layers = [name.rsplit(".", 1)[0] for name in self.weight_names]
        return [{f"weights/l2/{layer}": v for layer, v in zip(layers, row)} for row in norms]

    def histogram_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's parameters and (last step's) gradients under the single model's names, in its
        layout (views of the stacked tensors)."""
        if self.execution == "sequential":
            named = [(name, p.detach(), p.grad) for name, p in self.models[i].named_parameters()]
        else:
            named = [(name, self.stacked_layout(name, p.detach()[i]),
                      None if p.grad is None else self.stacked_layout(name, p.grad[i])) for name, p in self.params.items()]
        out = {f"parameters/{name}": value for name, value, _ in named}
        out.update({f"gradients/{name}": grad for name, _, grad in named if grad is not None})
        return out

    # -- members' state ---------------------------------------------------------------------
    def own_layout(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A member's slice of stacked parameter `name` (or of its optimizer state) in the single
        model's layout, a copy of its own."""
        if name in self.transposed:
            tensor = tensor.transpose(0, 1)
        return tensor.detach().clone(memory_format=torch.contiguous_format)

    def stacked_layout(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.transpose(0, 1) if name in self.transposed else tensor

    @torch.no_grad()
    def _live_model(self, i: int) -> nn.Module:
        """Member i's own module holding its current weights (stacked: copied in from its slice)."""
        model = self.models[i]
        if self.execution == "stacked":
            for name, param in model.named_parameters():
                param.copy_(self.stacked_layout(name, self.params[name][i]))
        return model

    def member_model(self, i: int) -> nn.Module:
        return copy.deepcopy(self._live_model(i))

    def snapshot(self) -> "Snapshot":
        """Every member's state now, detached from the live tensors training goes on mutating.
        Taken at every epoch boundary, so it copies tensors only (stacked: a few stacked clones);
        the per-member checkpoint layout is made when a checkpoint is written."""
        rng = [self._member_rng(i) for i in range(self.members)]
        if self.execution == "stacked":
            optimizer = [{k: v.clone() if torch.is_tensor(v) else v for k, v in self.optimizer.state.get(p, {}).items()}
                         for p in self.params.values()]
            return Snapshot(self, {n: p.detach().clone() for n, p in self.params.items()}, optimizer, rng,
                            list(self.skipped_steps), self.shared_state())
        own = [{"model": clone_tensors(model.state_dict()), "optimizer": clone_tensors(opt.state_dict())}
               for model, opt in zip(self.models, self.optimizers)]
        return Snapshot(self, None, own, rng, list(self.skipped_steps), {})

    def member_state(self, i: int) -> dict[str, Any]:
        return self.snapshot().member_state(i)

    def _member_rng(self, i: int) -> dict[str, Any]:
        """Member i's generators, with its stream in the keys a single run's checkpoint has."""
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), **self.streams[i], **self.loaders[i].state()}
        if self.hand_mlp:
            rng["masks"] = self.masks[i].get_state()
        return rng

    @torch.no_grad()
    def load_member_state(self, i: int, state: dict[str, Any]) -> None:
        # Optimizer.load_state_dict keeps the tensors it is given: training would change the caller's.
        state = copy.deepcopy(state)
        model = self.models[i]
        model.load_state_dict(state["model"])
        rng = state["rng"]
        try:
            self.loaders[i].load_state(rng)
            if self.hand_mlp:
                if "masks" not in rng:
                    raise RunDirError("checkpoints/last.pt has no mask generator for a stacked member: it was "
                                      "trained with sweep.member_execution=sequential; resume it that way")
                self.masks[i].set_state(rng["masks"])
        except RuntimeError as exc:  # a generator state of another kind (CPU vs CUDA): another device type
            raise RunDirError(
                f"checkpoints/last.pt: its generators were drawn on another kind of device than {self.device.type} "
                f"({exc}); resume it on the device type it started on (device=...)."
            ) from exc
        self.streams[i] = {"torch": rng["torch"], "cuda": rng.get("cuda", [])}
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        self.skipped_steps[i] = int(state.get("skipped_steps", 0))
        if self.execution == "sequential":
            self.optimizers[i].load_state_dict(state["optimizer"])
            return
        own = make_optimizer(self.cfgs[i].optim, model)
        own.load_state_dict(state["optimizer"])  # casts to the device as a single run would
        for name, param in model.named_parameters():
            stacked = self.params[name]
            stacked[i].copy_(self.stacked_layout(name, param))
            target = self.optimizer.state[stacked]
            for key, value in own.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() > 0:
                    if key not in target:  # members are loaded one by one; the others' slices follow
                        target[key] = torch.zeros_like(stacked)
                    target[key][i].copy_(self.stacked_layout(name, value))
                elif key in target and not torch.equal(torch.as_tensor(target[key]), torch.as_tensor(value)):
                    raise RunDirError(f"member {i}'s optimizer is at {key}={value}, another member's at "
                                      f"{target[key]}; stacked members share it: use sweep.member_execution=sequential")
                else:
                    target[key] = value.clone() if torch.is_tensor(value) else value

    def shared_state(self) -> dict[str, Any]:
        """What the members share: vmap's masks come from the process's global generator."""
        return global_stream() if self.execution == "stacked" and not self.hand_mlp else {}

    def load_shared_state(self, state: dict[str, Any]) -> None:
        if state:
            lend_stream(state)


@dataclass
class Snapshot:
    """The members' state at one epoch boundary (Backend.snapshot): what a checkpoint is written from."""

    backend: Backend
    params: dict[str, torch.Tensor] | None  # stacked: the stacked parameters' clones
    optimizer: list[Any]  # stacked: each stacked tensor's optimizer state; sequential: per member model + optimizer
    rng: list[dict[str, Any]]
    skipped_steps: list[int]
    shared: dict[str, Any]

    def member_state(self, i: int) -> dict[str, Any]:
        """Member i's checkpoint body, in the layout a single run writes."""
        backend = self.backend
        body: dict[str, Any] = {"execution": backend.execution, "scheduler": None, "rng": self.rng[i],
                                "skipped_steps": self.skipped_steps[i]}
        if self.params is None:
            return {**self.optimizer[i], **body}
        model = backend.models[i]
        own = make_optimizer(backend.cfgs[i].optim, model)
        for (name, param), state in zip(model.named_parameters(), self.optimizer):
            own.state[param] = {key: backend.own_layout(name, v[i]) if torch.is_tensor(v) and v.dim() > 0 else v
                                for key, v in state.items()}
        return {"model": {name: backend.own_layout(name, p[i]) for name, p in self.params.items()},
                "optimizer": own.state_dict(), **body}

    def shared_state(self) -> dict[str, Any]:
        return self.shared
