"""Knowing what you started: the grid's estimate from a few timed steps, before training."""

from fastres.grid import estimate
from fastres.grid.command import main
from fastres.run.config import TrainConfig
from fastres.study.protocol import SMOKE_SPEC
from fastres.study.structures import STRUCTURES, ResNetSpec

from .test_grid import grid_args, grid_data  # noqa: F401  (module fixture)

TINY = ResNetSpec.parse(SMOKE_SPEC)


def test_the_total_is_the_measured_epochs_times_the_epochs_left(monkeypatch):
    """Made-up step times (the arithmetic is what is tested): 0.01 s per training image and
    0.001 s per test image give 1000 * 0.01 + 100 * 0.001 = 10.1 s per epoch."""
    seen = []

    def fake(cfg, **_kw):
        seen.append(str(cfg.spec))
        return estimate.StepTimes(cfg.spec, 0.01, 0.001, 16)

    monkeypatch.setattr(estimate, "time_steps", fake)
    configs = [TrainConfig(spec=s, device="cpu", kernels="eager").resolved()
               for s in (TINY, TINY, STRUCTURES[1])]
    lines = estimate.estimate_lines(configs, [10, 5, 2], 1000, 100, workers=1)
    assert seen == [str(TINY), str(STRUCTURES[1])]  # one measurement per structure
    assert any("10.1 s per epoch" in line for line in lines)
    # (10 + 5 + 2) epochs x 10.1 s = 171.7 s
    assert "17 epochs left in 3 cells: about 2m51s" in "\n".join(lines)
    assert "the paper's grid (90 runs x 500 epochs) would take about" in lines[-1]
    assert "--preset smoke" in lines[-1] and "a GPU" in lines[-1]


def test_real_steps_are_timed_briefly():
    cfg = TrainConfig(spec=TINY, device="cpu", kernels="eager").resolved()
    t = estimate.time_steps(cfg, budget_s=0.5)
    assert t.batch == estimate.CPU_BATCH and t.train_s > t.eval_s > 0


def test_dry_run_measure_prints_the_estimate(capsys):
    assert main(["--preset", "smoke", "--dry-run", "--measure", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "[grid] estimate: 8 epochs left in 4 cells" in out
    assert "the paper's grid (90 runs x 500 epochs) would take about" in out


def test_the_grid_prints_its_estimate_before_the_first_epoch(grid_data, tmp_path,  # noqa: F811
                                                             capsys):
    assert main(grid_args(grid_data, tmp_path / "r", "--optimizers", "sgd", "--augment", "on",
                          "--epochs", "1")) == 0
    out = capsys.readouterr().out
    first_epoch = out.index("epoch 1/1")
    assert 0 <= out.index("[grid] estimate:") < first_epoch
    # A rerun with nothing left to train says so instead of timing anything.
    assert main(grid_args(grid_data, tmp_path / "r", "--optimizers", "sgd", "--augment", "on",
                          "--epochs", "1")) == 0
    assert "[grid] estimate: nothing left to train" in capsys.readouterr().out


def test_measure_checks_the_flags_first(capsys):
    assert main(["--preset", "smoke", "--dry-run", "--measure", "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
