"""The training run: schedule, optimizers, divergence, JSON, and real learning on CIFAR-10."""

import json
import math

import pytest
import torch

from fastres.run.config import PRECISIONS, TrainConfig
from fastres.run.records import best_of
from fastres.run.steps import make_optimizer, make_scheduler
from fastres.run.train import main, train
from fastres.study.protocol import OPTIMIZER_SETTINGS
from fastres.study.structures import ResNetSpec

TINY = ResNetSpec.parse("N=2 B=1,1 C_in=8 F0=3 P0=1 F1=3 P1=1 K=1")
QUIET = {"log": lambda _m: None}


def lr_sequence(tmax: int, epochs: int, base: float = 0.1) -> list[float]:
    opt = make_optimizer("sgd", [torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = make_scheduler(opt, tmax)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_lr_sequence_over_500_epochs_equals_cosine_annealing():
    ours = lr_sequence(200, 500)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200)
    expected = []
    for _ in range(500):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert ours == expected
    # And the shape the paper describes: minimum at epoch 200, back at the base at 400, falling
    # again by 500 (index e is the rate used in 1-based epoch e + 1).
    for e in (0, 57, 200, 333, 400, 499):
        assert ours[e] == pytest.approx(0.05 * (1 + math.cos(math.pi * e / 200)), abs=1e-9)
    assert ours[200] < 1e-9 and ours[400] == pytest.approx(0.1) and ours[499] < ours[450]


def test_tmax_zero_is_constant():
    assert lr_sequence(0, 500) == [0.1] * 500


@pytest.mark.parametrize("name", sorted(OPTIMIZER_SETTINGS))
def test_optimizer_settings_match_table_2(name):
    opt = make_optimizer(name, [torch.nn.Parameter(torch.zeros(1))])
    g = opt.param_groups[0]
    expected = {"sgd": (torch.optim.SGD, 0.1), "nesterov": (torch.optim.SGD, 0.1),
                "adam": (torch.optim.Adam, 1e-3), "adadelta": (torch.optim.Adadelta, 1.0),
                "adagrad": (torch.optim.Adagrad, 0.01)}[name]
    assert type(opt) is expected[0] and g["lr"] == expected[1] and g["weight_decay"] == 5e-4
    if type(opt) is torch.optim.SGD:
        assert g["momentum"] == 0.9 and g["nesterov"] == (name == "nesterov")
    if name == "adam":
        assert g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8


def test_every_precision_name_has_a_dtype():
    """fastres.run.config names the precisions (no torch there); the trainer maps each to a
    dtype."""
    from fastres.run.steps import AMP_DTYPES as DTYPES

    assert tuple(DTYPES) == PRECISIONS


def test_run_reports_every_epoch_and_its_rate(tiny_betons, tmp_path):
    cfg = TrainConfig(spec=TINY, structure=None, epochs=3, tmax=2, device="cpu")
    seen = []
    result = train(cfg, data=tiny_betons, on_epoch=seen.append, **QUIET)
    assert result.status == "completed" and [e.epoch for e in result.epochs] == [1, 2, 3]
    assert seen == result.epochs
    assert [e.lr for e in result.epochs] == pytest.approx(lr_sequence(2, 3))
    for e in result.epochs:
        assert 0 <= e.test_acc <= 1 and e.seconds > 0 and math.isfinite(e.train_loss)
    acc, epoch, loss = best_of(result.epochs)
    assert (result.best_acc, result.best_epoch, result.loss_at_best) == (acc, epoch, loss)
    assert result.epochs[epoch - 1].test_acc == max(e.test_acc for e in result.epochs)
    assert result.config["precision"] == "fp32" and result.config["compile"] is False


def test_best_epoch_is_first_of_ties_and_one_based():
    from fastres.run.records import EpochMetrics

    eps = [EpochMetrics(i + 1, 0.1, 1.0, 0.5, loss, acc, 1.0)
           for i, (acc, loss) in enumerate([(0.3, 2.0), (0.6, 1.5), (0.6, 1.2), (0.5, 1.0)])]
    assert best_of(eps) == (0.6, 2, 1.5)


def test_divergence_stops_and_reports(tiny_betons):
    cfg = TrainConfig(spec=TINY, structure=None, epochs=5, device="cpu", lr=1e30)
    result = train(cfg, data=tiny_betons, **QUIET)
    assert result.status == "diverged" and result.diverged_at == 1
    assert len(result.epochs) == 1 and not math.isfinite(result.epochs[0].train_loss)


def test_cli_json_and_divergence_exit_code(tiny_betons, tmp_path):
    folder = str(tiny_betons.train.parent)
    spec = "N=2 B=1,1 C_in=8 F0=3 P0=1 F1=3 P1=1 K=1"
    out = tmp_path / "r.json"
    assert main(["--spec", spec, "--epochs", "2", "--data", folder, "--device", "cpu",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["status"] == "completed" and len(r["epochs"]) == 2
    assert set(r) >= {"config", "epochs", "best_acc", "best_epoch", "loss_at_best", "status",
                      "environment", "data"}
    assert r["config"]["spec"]["C_in"] == 8 and r["environment"]["torch"] == torch.__version__
    assert main(["--spec", spec, "--epochs", "2", "--data", folder, "--lr", "1e30",
                 "--json", str(out)]) == 3
    assert json.loads(out.read_text())["status"] == "diverged"


@pytest.mark.parametrize("args, message", [
    (["--structure", "10"], "one of 1..9"),
    (["--structure", "1", "--spec", "N=1 B=1 C_in=8 F0=3 P0=1 F1=3 P1=1"], "not both"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--tmax", "-1"], "--tmax must be 0"),
])
def test_cli_bad_arguments(args, message, capsys, tiny_betons):
    assert main([*args, "--data", str(tiny_betons.train.parent)]) == 2
    assert message in capsys.readouterr().err


def test_short_training_on_cifar10_learns(jpeg_betons):
    """A small custom spec on 8,000 real training images: clearly better than chance (10%)."""
    cfg = TrainConfig(spec=ResNetSpec.parse("N=2 B=1,1 C_in=16 F0=3 P0=1 F1=3 P1=1 K=1"),
                      structure=None, epochs=4, device="cpu", train_subset=8000,
                      test_subset=2000)
    result = train(cfg, data=jpeg_betons, **QUIET)
    assert result.status == "completed"
    assert result.best_acc > 0.30, [e.test_acc for e in result.epochs]
    assert result.epochs[-1].train_loss < result.epochs[0].train_loss


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_and_channels_last_on_cpu(tiny_betons, precision):
    cfg = TrainConfig(spec=TINY, structure=None, epochs=2, device="cpu", precision=precision,
                      channels_last=True)
    result = train(cfg, data=tiny_betons, **QUIET)
    assert result.status == "completed" and result.config["precision"] == precision
    assert result.config["channels_last"] is False  # switched off on the CPU (issue 8)
    assert all(math.isfinite(e.train_loss) for e in result.epochs)


def test_compiled_loop_matches_eager_on_cpu(tiny_betons):
    """torch.compile changes how the step is computed, not what: same curve within fp32 noise."""
    base = {"spec": TINY, "structure": None, "epochs": 2, "device": "cpu"}
    eager = train(TrainConfig(**base, compile=False), data=tiny_betons, **QUIET)
    compiled = train(TrainConfig(**base, compile=True), data=tiny_betons, **QUIET)
    for a, b in zip(eager.epochs, compiled.epochs, strict=True):
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-3)
        assert b.test_loss == pytest.approx(a.test_loss, rel=1e-3)


def test_triton_kernels_where_they_cannot_run_is_a_clear_error(tiny_betons):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastres.train", "--spec", str(TINY), "--epochs", "1",
         "--device", "cpu", "--kernels", "triton", "--data", str(tiny_betons.train.parent)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "kernels='triton' is not available" in proc.stderr
    assert "TRITON_INTERPRET=1" in proc.stderr and "Traceback" not in proc.stderr
