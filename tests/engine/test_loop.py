"""The one run engine: a batched sweep interrupted and resumed as the batch it was (exactly,
on CPU), the dropout kinds implemented once (single sites and stacked members draw through
dropout.apply_dropout), batches of sweep.max_members, typed choice keys, and the Hydra
internals behind one version check."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import read_jsonl
from typer.testing import CliRunner

from dropstudy.cli import app
from dropstudy.config import hydra_internals
from dropstudy.model.dropout import make_dropout

GRID = ["model.dropout=0.2,0.5", "seed=0,1", "trainer.epochs=60", "trainer.eval_every=20", "trainer.log_every=5",
        "model.hidden=[32,32]", "tracker.mode=disabled"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def results(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock measurements, which no two runs share."""
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in read_jsonl(run / "metrics.jsonl")]


# --------------------------------------------------------------------------- interrupt and resume


def test_a_sigtermed_batched_sweep_resumes_as_one_batch_and_equals_one_never_stopped(
        clean_env, tmp_path, monkeypatch, own_signal_handlers):
    """SIGTERM arrives during epoch 27 (sent to this process from inside the loop, so the epoch
    is the same on any machine); the epochs are short, so the signal is held to the end of epoch
    27: exit 143, every member interrupted with its checkpoint at epoch 27, one resume command. `dropstudy resume SWEEP_DIR` then continues all four members together,
    with the masks' generator from the checkpoints, and every row equals an uninterrupted sweep's."""
    from dropstudy.engine.backend import Backend

    real_set_epoch = Backend.set_epoch

    def set_epoch(self, epoch):
        if epoch == 27:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_set_epoch(self, epoch)

    with monkeypatch.context() as mp:
        mp.setattr(Backend, "set_epoch", set_epoch)
        stopped = invoke("sweep", *GRID, "hydra.sweep.dir=sw")
    assert stopped.exit_code == 143, stopped.output
    assert stopped.output.count("dropstudy resume") == 1
    assert "to continue every member from its last checkpoint: dropstudy resume sw" in stopped.output
    for num in range(4):
        run = tmp_path / "sw" / str(num)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "interrupted" and summary["epoch"] == 27, summary
        assert summary["reason"] == "SIGTERM during epoch 27 of 60", summary
        state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
        assert state["epoch"] == 27 and "masks" in state["rng"]
        assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [5, 10, 15, 20, 25]
    assert invoke("resume", "sw/1").exit_code == 2, "a member alone cannot continue: its masks are the chunk's"

    resumed = invoke("resume", "sw")
    assert resumed.exit_code == 0, resumed.output
    assert invoke("sweep", *GRID, "hydra.sweep.dir=ref").exit_code == 0
    for num in range(4):
        ours, theirs = results(tmp_path / "sw" / str(num)), results(tmp_path / "ref" / str(num))
        assert [r["epoch"] for r in ours] == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 60]
        assert ours == theirs, num
        assert json.loads((tmp_path / "sw" / str(num) / "summary.json").read_text())["status"] == "finished"
    table = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert not table["interrupted"] and {job["status"] for job in table["jobs"]} == {"finished"}
    # Members with p > 0 drew masks: the rows are not equal merely because nothing was random.
    assert results(tmp_path / "sw" / "0")[-1] != results(tmp_path / "sw" / "1")[-1]


@pytest.mark.slow  # its path is covered fast in-process; this one runs the real thing end to end
def test_sigterm_to_a_real_batched_sweep_process_exits_143_with_every_members_checkpoint(dropstudy, clean_env, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "dropstudy", "sweep", "model.dropout=0,0.5", "seed=0,1", "trainer.epochs=1000000",
         "trainer.eval_every=50", "trainer.log_every=50", "model.hidden=[16]", "tracker.mode=disabled",
         "hydra.sweep.dir=my sweep"],
        cwd=tmp_path, env=clean_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "my sweep" / "3" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 180
    while not first.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stdout + stderr
    lines = [line for line in (stdout + stderr).splitlines() if "dropstudy resume" in line]
    assert lines == [f"to continue every member from its last checkpoint: dropstudy resume {shlex.quote('my sweep')}"]
    epochs = set()
    for num in range(4):
        run = tmp_path / "my sweep" / str(num)
        assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
        epochs.add(torch.load(run / "checkpoints" / "last.pt", weights_only=False)["epoch"])
    assert len(epochs) == 1 and epochs.pop() >= 50, "one epoch boundary for the whole batch"
    member = dropstudy("resume", "my sweep/2")
    assert member.code == 2 and "resume the sweep" in member.output, member.output


def test_a_grid_larger_than_max_members_trains_in_batches(clean_env, tmp_path):
    """Three members with sweep.max_members=2: batch 0 holds jobs 0 and 1, batch 1 job 2. A
    dropout-0 member computes the same in either batch (up to float rounding of the batch)."""
    grid = ["model.dropout=0", "seed=0,1,2", "trainer.epochs=20", "trainer.eval_every=10", "tracker.mode=disabled"]
    assert invoke("sweep", *grid, "sweep.max_members=2", "hydra.sweep.dir=a").exit_code == 0
    assert invoke("sweep", *grid, "hydra.sweep.dir=b").exit_code == 0
    batches = [json.loads((tmp_path / "a" / str(n) / "provenance.json").read_text())["batch"] for n in range(3)]
    assert [(b["number"], b["members"], b["index"]) for b in batches] == [(0, 2, 0), (0, 2, 1), (1, 1, 0)]
    for num in range(3):
        a, b = results(tmp_path / "a" / str(num)), results(tmp_path / "b" / str(num))
        assert [r["epoch"] for r in a] == [r["epoch"] for r in b] and a, num
        for ours, theirs in zip(a, b):
            assert ours.keys() == theirs.keys()
            for key in ours:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), (num, key)
    assert "sweep.max_members=0" in invoke("sweep", "seed=0,1", "sweep.max_members=0").output


@pytest.mark.slow
def test_a_cnn_batch_member_with_dropout_0_equals_dropstudy_train(clean_env, tmp_path):
    """A CIFAR-10 sweep trains as one batch (engine/backend.Backend, driven by the loop); its
    dropout-0 member logs what `dropstudy train` logs for the same config: every metric at every
    step, to 1e-5 relative (synthetic data, 128 images, 2 epochs)."""
    quick = ["experiment=cifar10", "data.synthetic=true", "data.subset=128", "data.val_size=40", "trainer.epochs=2",
             "trainer.batch_size=32", "data.seed=0", "seed=3", "tracker.mode=disabled"]
    swept = invoke("sweep", *quick, "model.dropout=0,0.25", "hydra.sweep.dir=sw")
    assert swept.exit_code == 0, swept.output
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["mode"] == "batched"
    assert invoke("train", *quick, "model.dropout=0", "hydra.run.dir=single").exit_code == 0
    ours, theirs = results(tmp_path / "sw" / "0"), results(tmp_path / "single")
    assert [sorted(r) for r in ours] == [sorted(r) for r in theirs] and len(ours) == 3
    for a, b in zip(ours, theirs):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["epoch"], key)
    assert results(tmp_path / "sw" / "1") != ours, "the other member trained with its own p"


# --------------------------------------------------------------------------- dropout, implemented once


@pytest.mark.parametrize("kind", ["inverted", "vanilla", "gaussian", "spatial"])
def test_a_float_p_draws_exactly_what_the_torch_kernels_draw(kind):
    """Single runs are unchanged: with the same generator state a float-p site gives what
    nn.Dropout / nn.Dropout2d (or the kind's own formula) gives, bit for bit."""
    x = torch.randn(8, 4, 5, 5)
    site = make_dropout(kind, 0.3, "test", feature_maps=True).train()
    torch.manual_seed(0)
    ours = site(x)
    torch.manual_seed(0)
    expected = {"inverted": lambda: F.dropout(x, 0.3, True), "spatial": lambda: F.dropout2d(x, 0.3, True),
                "vanilla": lambda: x * torch.empty_like(x).bernoulli_(0.7),
                "gaussian": lambda: x * (1.0 + math.sqrt(0.3 / 0.7) * torch.randn_like(x))}[kind]()
    assert torch.equal(ours, expected)


# --------------------------------------------------------------------------- configuration


def test_an_unknown_optimizer_is_exit_2_and_make_optimizer_refuses_it_too(clean_env):
    result = invoke("train", "optim.name=adamw")
    assert result.exit_code == 2 and "optim.name" in result.output and "sgd" in result.output, result.output
    from omegaconf import OmegaConf

    from dropstudy.engine.steps import make_optimizer

    with pytest.raises(ValueError, match="optim.name='adamw'"):
        make_optimizer(OmegaConf.create({"name": "adamw", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}),
                       torch.nn.Linear(2, 2))


def test_hydra_internals_are_those_of_the_supported_hydra():
    """dropstudy sweep plans multiruns with a few private Hydra functions; a Hydra release
    that moves or renames them must fail here, naming the version, not in a user's sweep."""
    hydra_internals.check_api()
    with pytest.raises(hydra_internals.UnsupportedHydra, match="hydra-core 1.4.0 is installed"):
        hydra_internals.check_version("1.4.0")
