"""The fast paths are correct, not just fast: the device-resident loader's epochs, seeded
augmentation, channels_last and bf16 autocast against the plain path, checkpointed generator
state, the new config keys' error messages, and scripts/bench.py end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from omegaconf import OmegaConf
from typer.testing import CliRunner

from dropstudy.cli import app
from dropstudy.config.compose import compose
from dropstudy.data.datasets import Split, TrainBatches, augment_images
from dropstudy.engine.runtime import FastPaths
from dropstudy.engine.steps import make_optimizer
from dropstudy.model.networks import CNN

CPU = torch.device("cpu")


def index_split(n: int) -> Split:
    """A split whose inputs are their own indices, so a batch says which examples it holds."""
    return Split(torch.arange(n).view(n, 1), torch.arange(n))


def epoch_orders(loader: TrainBatches, epochs: int) -> list[list[int]]:
    return [torch.cat([xb.view(-1) for xb, _ in loader]).tolist() for _ in range(epochs)]


# --------------------------------------------------------------------------- the loader


def test_every_training_index_exactly_once_per_epoch_in_a_seed_determined_order():
    n, batch = 1000, 64  # 1000 is not a multiple of 64: the last batch is short
    orders = epoch_orders(TrainBatches(index_split(n), batch, seed=7), epochs=3)
    for order in orders:
        assert sorted(order) == list(range(n))
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch
    assert orders == epoch_orders(TrainBatches(index_split(n), batch, seed=7), epochs=3)
    assert orders[0] != epoch_orders(TrainBatches(index_split(n), batch, seed=8), epochs=1)[0]
    sizes = [len(yb) for _, yb in TrainBatches(index_split(n), batch, seed=7)]
    assert sizes == [64] * 15 + [40]
    # Inputs and targets stay paired through the shuffle.
    assert all(torch.equal(xb.view(-1), yb) for xb, yb in TrainBatches(index_split(n), batch, seed=7))


def test_turning_augmentation_on_keeps_the_batch_order():
    split = Split(torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8), torch.arange(100))
    plain = [yb.tolist() for _, yb in TrainBatches(split, 16, seed=3)]
    augmented = [yb.tolist() for _, yb in TrainBatches(split, 16, seed=3, augment=True)]
    assert plain == augmented


def test_loader_state_resumes_the_same_orders_and_crops():
    split = Split(torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8), torch.arange(96))
    loader = TrainBatches(split, 32, seed=5, augment=True)
    list(loader)  # one epoch done, as at a checkpoint
    state = {k: v.clone() for k, v in loader.state().items()}
    assert set(state) == {"shuffle", "augment"}
    expected = [(x.clone(), y.clone()) for x, y in loader]
    fresh = TrainBatches(split, 32, seed=5, augment=True)
    fresh.load_state(state)
    got = list(fresh)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got))


# --------------------------------------------------------------------------- augmentation


def crops_of(image: torch.Tensor, pad: int = 4) -> list[torch.Tensor]:
    """Every crop (and its mirror image) that RandomCrop(32, padding=4) + flip can produce."""
    padded = F.pad(image, (pad, pad, pad, pad))
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + 32, dx : dx + 32]
            out += [crop, crop.flip(-1)]
    return out


def test_augmentation_crops_and_flips_each_image_keeping_shape_dtype_and_labels():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)  # no zeros: padding shows
    labels = torch.randint(0, 10, (64,), generator=g)
    split = Split(images, labels)
    (xb, yb), = TrainBatches(split, None, seed=1, augment=True)
    assert xb.shape == images.shape and xb.dtype == torch.uint8
    assert torch.equal(yb, labels)
    for i in range(0, 64, 8):  # each output is one of its own image's crops/flips
        assert any(torch.equal(xb[i], c) for c in crops_of(images[i]))
    changed = sum(not torch.equal(xb[i], images[i]) for i in range(64))
    assert changed > 48  # 1 in 162 draws is the identity; almost every image moves
    flipped = sum(any(torch.equal(xb[i], c) for c in crops_of(images[i])[1::2]) for i in range(64))
    assert 16 < flipped < 48  # about half are mirrored


def test_augmentation_is_seeded():
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)

    def draw(seed: int) -> torch.Tensor:
        return augment_images(images, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


# --------------------------------------------------------------------------- fast paths vs plain


def fixed_batch_losses(fast: FastPaths) -> tuple[float, float]:
    """Training loss on one fixed batch, then after one Adam step: the plain model vs `fast`."""
    torch.manual_seed(0)
    model = fast.prepare_model(CNN([32, 64, 128], 512, 10, [0.0, 0.0]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    losses = []
    for _ in range(2):
        with fast.autocast():
            loss = F.cross_entropy(model(fast.inputs(x)), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses[0], losses[1]


def test_channels_last_matches_the_plain_path():
    fast_paths = FastPaths(CPU, channels_last=True)
    model = fast_paths.prepare_model(CNN([32, 64, 128], 512, 10, [0.0, 0.0]))
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert fast_paths.inputs(torch.randn(2, 3, 32, 32)).is_contiguous(memory_format=torch.channels_last)
    plain = fixed_batch_losses(FastPaths(CPU))
    fast = fixed_batch_losses(FastPaths(CPU, channels_last=True))
    # Float32 either way; only the order of the additions differs: agreement to 1e-5 relative.
    assert fast == pytest.approx(plain, rel=1e-5)


def test_bf16_autocast_matches_the_plain_path_within_bf16_precision():
    plain = fixed_batch_losses(FastPaths(CPU))
    bf16 = fixed_batch_losses(FastPaths(CPU, channels_last=True, amp_dtype=torch.bfloat16))
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-8 = 0.4%); through 4 layers: within 2%.
    assert bf16 == pytest.approx(plain, rel=2e-2)
    assert bf16 != plain  # autocast really ran in bf16


@pytest.mark.parametrize("fast", [FastPaths(CPU), FastPaths(CPU, channels_last=True),
                                  FastPaths(CPU, channels_last=True, amp_dtype=torch.bfloat16)],
                         ids=["fp32", "channels_last", "bf16"])
def test_the_cnn_pools_before_its_relu_with_the_same_outputs_and_gradients(fast):
    """CNN.forward runs each block's max-pool before its ReLU (a quarter of the values to ReLU):
    the outputs and every gradient equal, bit for bit, those of the blocks in their written order
    (conv, ReLU, pool, dropout), with dropout on the input, after each conv block and in the head."""
    torch.manual_seed(0)
    model = fast.prepare_model(CNN([8, 16, 32], 64, 10, [0.25, 0.25], input_p=0.1, conv_rates=[0.1, 0.2, 0.3]))
    assert model._feature_order[:5] == ("drop_in", "conv1", "pool1", "relu1", "drop1")
    assert [name for name, _ in model.features.named_children()][:5] == ["drop_in", "conv1", "relu1", "pool1", "drop1"]
    g = torch.Generator().manual_seed(1)
    # Half the pre-activations negative, and whole windows of equal values (ties decide max-pool's pick).
    x = fast.inputs(torch.randn(16, 3, 32, 32, generator=g).round())
    y = torch.randint(0, 10, (16,), generator=g)

    def outputs_and_grads(forward):
        torch.manual_seed(2)  # the same dropout masks both ways
        with fast.autocast():
            out = forward(x)
            loss = F.cross_entropy(out, y)
        model.zero_grad(set_to_none=True)
        loss.backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    written = outputs_and_grads(lambda x: model.head(torch.flatten(model.features(x), 1)))
    relu_inputs = []
    hook = model.features.relu1.register_forward_pre_hook(lambda m, args: relu_inputs.append(args[0].shape[-2:]))
    pooled_first = outputs_and_grads(model)
    hook.remove()
    assert relu_inputs == [(15, 15)], "model(x) runs the first ReLU on the pooled 15x15 maps, not on 30x30"
    assert torch.equal(pooled_first[0], written[0])
    assert all(torch.equal(a, b) for a, b in zip(pooled_first[1], written[1]))
    assert any(bool((grad == 0).any()) for grad in written[1]), "ReLU and dropout zeroed some gradients"


def adam_losses(fused: bool | None, steps: int = 5) -> list[float]:
    """The CNN's loss on a fixed batch over `steps` Adam steps, Adam fused or per parameter."""
    torch.manual_seed(0)
    model = CNN([32, 64, 128], 512, 10, [0.0, 0.0])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.01, fused=fused)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def test_fused_adam_matches_the_per_parameter_loop():
    try:
        torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True)
    except RuntimeError as exc:
        pytest.skip(f"torch {torch.__version__} has no fused Adam on a CPU ({exc}); dropstudy uses it on CUDA only")
    model = CNN([32, 64, 128], 512, 10, [0.0, 0.0])
    assert make_optimizer(compose(["experiment=cifar10"]).optim, model).defaults["fused"], "dropstudy's Adam is fused"
    plain, fused = adam_losses(fused=None), adam_losses(fused=True)
    # The same update in another order of float32 operations: within 1e-5 relative after 5 steps.
    assert fused == pytest.approx(plain, rel=1e-5)
    assert fused[-1] < fused[0], "it trains"


def test_resolving_the_switches_on_cpu():
    cfg = OmegaConf.create({"amp": "auto", "channels_last": True, "compile": False})
    assert FastPaths.resolve(cfg, CPU) == FastPaths(CPU, channels_last=True)  # auto: no bf16 on CPU
    cfg.amp = "bf16"
    assert FastPaths.resolve(cfg, CPU).amp_dtype == torch.bfloat16
    cfg.amp, cfg.channels_last = "off", False
    assert FastPaths.resolve(cfg, CPU) == FastPaths(CPU)


# --------------------------------------------------------------------------- the real CLI


CIFAR_RUN = ["train", "experiment=cifar10", "data.synthetic=true", "data.subset=128", "data.val_size=64",
             "trainer.batch_size=64", "trainer.epochs=1", "tracker.mode=disabled"]


def test_an_augmented_bf16_run_trains_and_reports_where_its_time_went(dropstudy, tmp_path):
    result = dropstudy(*CIFAR_RUN, "data.augment=true", "trainer.amp=bf16", "trainer.threads=1", "hydra.run.dir=r")
    assert result.code == 0, result.output
    assert "bf16 autocast" in result.output and "augmented: crop + flip" in result.output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert set(summary["timings_s"]) == {"data", "setup", "train", "eval", "log", "checkpoint", "bookkeeping",
                                         "wandb", "figures"}
    assert summary["timings_s"]["train"] > 0
    assert summary["timings_s"]["figures"] > 0, "drawing the learning curves is counted"
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=False)
    assert {"shuffle", "augment"} <= set(state["rng"])


@pytest.mark.parametrize(
    "override, names",
    [
        ("trainer.amp=fp16", ["trainer.amp", "auto", "bf16", "off"]),
        ("trainer.threads=0", ["trainer.threads", "null"]),
        ("trainer.channels_last=maybe", ["trainer.channels_last"]),
        ("data.augment=sometimes", ["data.augment"]),
    ],
)
def test_bad_values_of_the_speed_keys_exit_2_naming_key_and_choices(clean_env, tmp_path, override, names):
    args = ["experiment=cifar10", "data.synthetic=true"] if override.startswith("data.") else []
    result = CliRunner().invoke(app, ["train", *args, override], prog_name="dropstudy")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for name in names:
        assert name in result.output
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- scripts/bench.py


@pytest.mark.slow
def test_bench_runs_all_three_contenders_and_a_study_and_writes_json(clean_env, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--epochs", "1", "--repeats", "1", "--n-train", "256",
         "--val-size", "64", "--n-test", "64", "--device", "cpu", "--study", "--study-epochs", "1", "--no-append",
         "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=tmp_path, env=clean_env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    s = report["summary"]
    for name in ("tutorial", "tracked", "untracked"):
        assert s[name]["images_per_s"] > 0 and s[name]["peak_rss_mib"] > 0
        assert len(report["runs"][name]) == 1
    assert report["peak"]["forward_flop_per_image"] == 10_679_040  # the CNN's 10.68 MFLOP
    assert s["flop_per_trained_image"] == 3 * 10_679_040
    assert s["speedup_vs_tutorial"] == pytest.approx(s["tracked"]["images_per_s"] / s["tutorial"]["images_per_s"])
    assert "synthetic" in report["data"]
    assert report["study"]["runs"] == 2 and report["study"]["timings_s"]["train"] > 0  # both arms
    assert "tracking overhead" in proc.stdout
    # The tutorial side really logged to W&B offline: a .wandb file with its steps.
    assert list((tmp_path / "work").glob("wandb/offline-run-*/run-*.wandb"))
