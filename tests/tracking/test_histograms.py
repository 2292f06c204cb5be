"""Gradient and parameter histograms without hooks: the counts are torch.histc's, all tensors are
done in one pass with one host copy, `tracker.watch` picks which, and a run's W&B file holds them
under wandb's keys at the rows of the epochs they describe."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from conftest import QUICK_REGRESSION, read_jsonl
from recording_tracker import recording_trackers
from torch.profiler import ProfilerActivity, profile
from wandb_offline import load_run

from dropstudy.config.compose import compose
from dropstudy.model.networks import build_model
from dropstudy.runs.execute import train_run
from dropstudy.tracking.histograms import BINS, histograms


def some_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "wide": torch.randn(300, 70, generator=g),
        "narrow": 0.1 + 1e-6 * torch.rand(50, generator=g),  # a range near float32's resolution
        "skewed": torch.randn(100_000, generator=g).exp(),
        "grid": torch.linspace(-1, 1, 129),  # values exactly on the bin edges
        "with nan and inf": torch.tensor([float("nan"), 1.0, float("inf"), -2.0, 5.0, -float("inf"), 0.5]),
        "constant": torch.full((7,), 3.0),
        "no finite value": torch.tensor([float("nan"), float("inf")]),
        "integer-valued": torch.arange(64.0).view(8, 8),
    }


def test_counts_are_those_of_torch_histc_over_the_finite_values_with_the_same_edges():
    tensors = some_tensors()
    drawn = histograms(tensors)
    assert "no finite value" not in drawn, "nothing to draw, as wandb's watch skips it"
    for name, tensor in tensors.items():
        if name in ("no finite value", "constant"):
            continue
        counts, edges = drawn[name]
        finite = tensor[torch.isfinite(tensor)].float()
        assert len(counts) == BINS and len(edges) == BINS + 1, name
        assert (edges[0], edges[-1]) == (finite.min().item(), finite.max().item()), name
        expected = torch.histc(finite, bins=BINS, min=edges[0], max=edges[-1])
        assert counts.tolist() == expected.tolist(), name
    # All values equal: one bin holding all of them, as wandb's watch draws it.
    counts, edges = drawn["constant"]
    assert counts.tolist() == [7] and edges.tolist() == [3.0, 3.0]


def test_one_pass_for_all_tensors_without_histc_or_a_host_sync_per_tensor():
    tensors = some_tensors()
    histograms(tensors)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        histograms(tensors)
    ops = [e.name for e in prof.events() if e.name.startswith("aten::")]
    # histc is refused by deterministic mode on CUDA; .item()/.tolist() per tensor (what `watch`
    # does, ~60 host syncs per log) would show as _local_scalar_dense.
    assert "aten::histc" not in ops and "aten::_local_scalar_dense" not in ops, ops
    # The counting is one set of operators for all tensors together: twice the tensors add only
    # views (each one flattened, and its place in the concatenation), no reduction of its own.
    assert ops.count("aten::scatter_add_") == 1 and ops.count("aten::scatter_reduce_") == 2, ops
    doubled = {**tensors, **{f"copy {i}": t for i, t in enumerate(tensors.values())}}
    histograms(doubled)  # warm-up: which tensor each element belongs to is built once per model
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        histograms(doubled)
    more = Counter(e.name for e in prof.events() if e.name.startswith("aten::")) - Counter(ops)
    assert set(more) <= {"aten::reshape", "aten::view", "aten::narrow", "aten::slice", "aten::as_strided"}, more


def one_run(tmp_path, monkeypatch, watch: str):
    recorded = recording_trackers(monkeypatch)
    overrides = [*QUICK_REGRESSION, f"tracker.watch={watch}"]
    cfg = compose(overrides)
    assert train_run(cfg, tmp_path / watch, overrides).status == "finished"
    (tracker,) = recorded
    return cfg, tracker


@pytest.mark.parametrize("watch, kinds", [("all", {"parameters", "gradients"}), ("gradients", {"gradients"}),
                                          ("parameters", {"parameters"}), ("none", set())])
def test_tracker_watch_picks_which_histograms_a_run_logs(clean_env, tmp_path, monkeypatch, watch, kinds):
    cfg, tracker = one_run(tmp_path, monkeypatch, watch)
    names = [name for name, _ in build_model(cfg.model).named_parameters()]
    logged = tracker.of("log_histograms")
    assert len(logged) == (0 if watch == "none" else 4)
    for h in logged:
        assert set(h["tensors"]) == {f"{kind}/{name}" for kind in kinds for name in names}


# The keys wandb.watch(model, log="all") logged for the regression MLP before the histograms were
# computed in one pass (read from the W&B file of a run made with wandb.watch).
WATCHED_KEYS = {f"{kind}/net.{layer}.{p}" for kind in ("gradients", "parameters")
                for layer in ("fc1", "fc2", "fc3", "out") for p in ("weight", "bias")}


def test_the_wandb_file_holds_every_histogram_at_the_row_of_its_epoch(dropstudy, tmp_path):
    result = dropstudy("train", *QUICK_REGRESSION, "trainer.threads=1", "hydra.run.dir=run")
    assert result.code == 0, result.output
    run = load_run(tmp_path / "run")
    assert run.histograms() == WATCHED_KEYS
    # tracker.log_freq=10 optimizer steps, one per epoch: at epochs 10, 20, 30 and 40, every key,
    # in the row of that epoch (wandb.watch joined them to whichever row was open, e.g. epoch 8's).
    rows = [row for row in run.history if WATCHED_KEYS & row.keys()]
    assert [(row["epoch"], WATCHED_KEYS <= row.keys()) for row in rows] == [(e, True) for e in (10, 20, 30, 40)]
    local = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [row["_step"] for row in rows] == [i for i, r in enumerate(local) if r["epoch"] in (10, 20, 30, 40)
                                              and "train/loss" in r]
    # The last one shows the final weights: histc of the checkpoint's, with the logged edges.
    final = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["model"]["net.fc2.weight"]
    logged = rows[-1]["parameters/net.fc2.weight"]
    expected = torch.histc(final, bins=BINS, min=logged["bins"][0], max=logged["bins"][-1])
    assert logged["values"] == expected.tolist() and len(logged["bins"]) == BINS + 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "finished"
