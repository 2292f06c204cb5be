"""What one training step costs in operators, and that every saving leaves the results as they
were: deterministic mode without filling uninitialised memory, images normalised once, bf16
casts reused across an evaluation, the progress bar moved in strides."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from dropstudy.config.compose import compose
from dropstudy.data import datasets
from dropstudy.data.datasets import load_dataset
from dropstudy.engine.backend import Backend
from dropstudy.engine.runtime import FastPaths, set_up_process
from dropstudy.engine.steps import evaluate
from dropstudy.tracking.console import TrainingProgress

# One batch of 64 images is the whole training split, so an epoch is exactly one step.
CNN_STEP = ["experiment=cifar10", "data.synthetic=true", "data.subset=64", "data.val_size=16",
            "trainer.batch_size=64", "trainer.threads=1"]
MLP_STEP = ["trainer.threads=1"]  # the regression MLP: full batch, one step an epoch


class NoProgress:
    def advance(self, steps: int = 1) -> None:
        pass


@pytest.fixture
def restore_torch_settings():
    """The process-wide settings set_up_process changes, put back after the test."""
    fill = torch.utils.deterministic.fill_uninitialized_memory
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    yield
    torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


def single_backend(overrides: list[str], data_hook=None) -> Backend:
    """What `dropstudy train OVERRIDES` trains, built as train_run builds it: the backend of one member."""
    cfg = compose(overrides)
    device = set_up_process(cfg)
    fast = FastPaths.resolve(cfg.trainer, device)
    data = load_dataset(cfg.data, device, lambda line: None)
    if data_hook is not None:
        data = data_hook(data)
    return Backend([cfg], [data], fast)


def step_operators(overrides: list[str]) -> Counter:
    """The aten operators (nested ones included) of one training step, after two warm-up steps
    (Adam creates its state in the first)."""
    backend = single_backend(overrides)
    assert backend.steps_per_epoch == 1
    backend.set_epoch(1)
    for _ in range(2):
        backend.train_epoch(NoProgress())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        backend.train_epoch(NoProgress())
    return Counter(e.name for e in prof.events() if e.name.startswith("aten::"))


# Measured with torch 2.14.1 on CPU (fp32, deterministic=true, the defaults): before this change
# (filled uninitialised memory, per-parameter Adam, five bookkeeping ops a step and three host
# syncs an epoch) and after. The bounds leave 6-10% for torch's own changes; a step that grows
# past it has gained work that belongs elsewhere.
STEP_OPERATORS = {
    # name: (overrides, measured before, measured now, bound)
    # `dropstudy train` of the MLP: the backend's hand-written stacked forward with one member
    # (one draw of masks and one multiplier for all its sites, the full batch stacked once).
    "mlp": (MLP_STEP, 274, 245, 270),
    "mlp one module": ([*MLP_STEP, "sweep.member_execution=sequential"], 303, 274, 290),
    "cnn": (CNN_STEP, 624, 339, 370),
    "cnn bf16": ([*CNN_STEP, "trainer.amp=bf16"], 745, 437, 480),
}


@pytest.mark.parametrize("name", STEP_OPERATORS)
def test_one_training_step_stays_within_its_operator_count(restore_torch_settings, name):
    overrides, _, _, bound = STEP_OPERATORS[name]
    ops = step_operators(overrides)
    assert sum(ops.values()) <= bound, (sum(ops.values()), ops.most_common(12))
    assert ops["aten::_local_scalar_dense"] <= (10 if "cnn" in name else 0), "host syncs in the step"


def trained(overrides: list[str], fill: bool, epochs: int = 3, data_hook=None) -> tuple[list, dict]:
    """Per-epoch train metrics and evaluation, then the final weights, with deterministic mode's
    filling of uninitialised memory on or off."""
    backend = single_backend(overrides, data_hook)
    torch.utils.deterministic.fill_uninitialized_memory = fill
    metrics = []
    for epoch in range(1, epochs + 1):
        backend.set_epoch(epoch)
        metrics += backend.train_epoch(NoProgress()) + backend.evaluate("val")
    return metrics, backend.member_state(0)["model"]


CNN_EPOCHS = ["experiment=cifar10", "data.synthetic=true", "data.subset=192", "data.val_size=64",
              "trainer.batch_size=64", "model.dropout=0.25", "trainer.threads=1"]


@pytest.mark.parametrize("overrides", [MLP_STEP, CNN_EPOCHS, [*CNN_EPOCHS, "data.augment=true"]],
                         ids=["mlp", "cnn", "cnn augmented"])
def test_not_filling_uninitialised_memory_changes_no_bit_of_a_cpu_run(restore_torch_settings, overrides):
    filled, filled_weights = trained(overrides, fill=True)
    assert torch.utils.deterministic.fill_uninitialized_memory is True
    plain, plain_weights = trained(overrides, fill=False)
    assert torch.utils.deterministic.fill_uninitialized_memory is False
    assert plain == filled
    assert all(torch.equal(plain_weights[k], filled_weights[k]) for k in filled_weights)


def test_a_run_does_not_fill_uninitialised_memory(restore_torch_settings):
    single_backend(MLP_STEP)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory is False


def test_images_normalised_once_train_exactly_as_batches_normalised_each_step(restore_torch_settings,
                                                                             monkeypatch):
    """What an accelerator runs (the images normalised once when loaded), here on the CPU: the same
    bits as uint8 images normalised batch by batch, augmentation (padded with black) included."""
    overrides = [*CNN_EPOCHS, "data.augment=true"]
    per_batch, per_batch_weights = trained(overrides, fill=False)
    kept = {}
    before = load_dataset(compose(overrides).data, torch.device("cpu"), lambda line: None)
    monkeypatch.setattr(datasets, "normalises_once", lambda device: True)
    once, once_weights = trained(overrides, fill=False, data_hook=lambda data: kept.setdefault("after", data))
    after = kept["after"]
    assert before.train.inputs.dtype == torch.uint8 and after.train.inputs.dtype == torch.float32
    assert torch.equal(after.val.inputs, before.prepare(before.val.inputs))
    assert torch.equal(after.prepare(after.val.inputs), after.val.inputs), "nothing normalised twice"
    assert after.fingerprint() == before.fingerprint(), "provenance names the data, not how it is held"
    assert once == per_batch
    assert all(torch.equal(once_weights[k], per_batch_weights[k]) for k in per_batch_weights)


def test_bf16_evaluation_casts_each_weight_once_not_once_per_batch(restore_torch_settings):
    backend = single_backend([*CNN_EPOCHS, "trainer.amp=bf16"])
    assert backend.execution == "sequential"
    data, net, model = backend.datas[0], backend.nets[0], backend.models[0]
    assert len(data.val) == 64
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        result = evaluate(net, data, data.val, 16, backend.fast)  # 4 batches
    # The same model evaluated in float32: bf16 agrees within its precision (as in training).
    fp32 = evaluate(net, data, data.val, 16, FastPaths(backend.fast.device, channels_last=True))
    assert result["loss"] == pytest.approx(fp32["loss"], rel=2e-2) and result["loss"] != fp32["loss"]
    casts = Counter(tuple(e.input_shapes[0]) for e in prof.events() if e.name == "aten::_to_copy")
    # Every weight and bias (distinct shapes in this CNN) cast to bf16 once for the whole evaluation.
    assert {tuple(p.shape): casts[tuple(p.shape)] for p in model.parameters()} == {
        tuple(p.shape): 1 for p in model.parameters()}
    assert casts[(16, 3, 32, 32)] == 2 * 4, "each batch: uint8 to float32, float32 to bf16"


def test_the_progress_bar_moves_in_strides_and_ends_on_the_total():
    progress = TrainingProgress("run", total_steps=100, epochs=2, interactive=True)
    advanced = []
    with progress:
        rich_advance = progress._progress.advance
        progress._progress.advance = lambda task, steps: (advanced.append(steps), rich_advance(task, steps))
        for epoch in range(2):
            for _ in range(50):
                progress.advance()
            progress.epoch_done({"epoch": epoch + 1, "train/loss": 1.0}, evaluated=False)
        total = progress._progress.tasks[0].completed
    assert sum(advanced) == total == 100
    assert advanced == [16, 16, 16, 2] * 2  # every 16 steps, and the rest at the epoch's end


FAULTS_PROBE = """
import json, resource, sys
import torch
from dropstudy.engine.backend import Backend
from dropstudy.config.compose import compose
from dropstudy.data import datasets
from dropstudy.data.datasets import load_dataset
from dropstudy.model.networks import build_model
from dropstudy.engine.runtime import FastPaths, retain_freed_memory, seed_everything, set_up_process
from dropstudy.engine.steps import make_optimizer

class NoProgress:
    def advance(self, steps=1):
        pass

cfg = compose(sys.argv[1:])
device = set_up_process(cfg)
data = load_dataset(cfg.data, device, lambda *a: None)
backend = Backend([cfg], [data], FastPaths.resolve(cfg.trainer, device))
for _ in range(3):  # warm-up: Adam's state, oneDNN's kernels, the heap grown to a step's size
    backend.train_epoch(NoProgress())
faults = []
for _ in range(21):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    backend.train_epoch(NoProgress())
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median step: a one-off growth of the heap (a late, larger temporary) shows in one step, not in all.
print(json.dumps({"retained": retain_freed_memory(), "faults_per_step": sorted(faults)[10], "faults": faults}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page faults as Linux counts them")
@pytest.mark.parametrize("malloc_env", [{}, {"MALLOC_TOP_PAD_": "131072"}], ids=["retained", "glibc-defaults"])
def test_a_cnn_step_reuses_the_memory_the_last_one_freed(clean_env, tmp_path, malloc_env):
    """runtime.retain_freed_memory: after warm-up a CPU training step of the CNN (fp32, batch 64)
    takes its temporaries from memory the step before freed, instead of mapping fresh pages
    (thousands of page faults a step with glibc's defaults, which a user gets back by setting any
    of malloc's environment variables: the second case, which shows what the first one saves)."""
    proc = subprocess.run([sys.executable, "-c", FAULTS_PROBE, *CNN_STEP], cwd=tmp_path,
                          env={**clean_env, **malloc_env}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if malloc_env:
        assert not report["retained"] and report["faults_per_step"] > 1000, report
    else:
        assert report["retained"] and report["faults_per_step"] < 100, report
