"""Bad input to `python -m fastres.train` (issue 8): a clear error naming the flag, exit 2, no
traceback, found before any data is prepared; SIGINT/SIGTERM stop a run cleanly."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import warnings

import pytest
import torch
from PIL import Image

from fastres.run.config import CPU_CHANNELS_LAST, TrainConfig
from fastres.run.signals import Interrupted, stop_on_signals
from fastres.run.train import main, make_loaders
from fastres.study.data import CIFAR10_CLASSES
from fastres.study.structures import ResNetSpec

from .conftest import random_images

SPEC = "N=2 B=1,1 C_in=8 F0=3 P0=1 F1=3 P1=1 K=1"
TINY = ResNetSpec.parse(SPEC)
BASE = ["--spec", SPEC, "--data", "synthetic", "--train-subset", "300", "--test-subset", "100",
        "--epochs", "1"]


@pytest.fixture
def no_data(monkeypatch):
    """Fails the test if the run gets as far as preparing data."""
    def prepare(*_a, **_k):
        raise AssertionError("data was prepared before the bad flag was caught")

    monkeypatch.setattr("fastres.run.train.prepare", prepare)


@pytest.mark.parametrize("args, message", [
    (["--device", "gpu"], "--device must be cpu, cuda or cuda:N, got 'gpu'"),
    (["--device", "cuda:x"], "--device must be cpu, cuda or cuda:N, got 'cuda:x'"),
    (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (["--lr", "inf"], "--lr must be a positive finite number, got inf"),
    (["--lr", "0"], "--lr must be a positive finite number"),
    (["--lr", "-0.1"], "--lr must be a positive finite number"),
    (["--weight-decay", "-1"], "--weight-decay must be zero or a positive finite number"),
    (["--weight-decay", "nan"], "--weight-decay must be zero or a positive finite number"),
    (["--seed", "-1"], "--seed must be in 0..4294967295"),
    (["--seed", str(2**32)], "--seed must be in 0..4294967295"),
    # Issue 19: past what the results store holds, and meaningless worker counts.
    (["--epochs", "1" * 20], f"--epochs must be at most 9223372036854775807 (2**63 - 1, the "
                             f"largest integer the results store holds), got {'1' * 20}"),
    (["--tmax", "1" * 20], "--tmax must be at most 9223372036854775807"),
    (["--loader-workers", "-1"], "--loader-workers must be 0 (torch's thread count) or more"),
])
def test_bad_flags_fail_before_any_data(args, message, capsys, no_data):
    assert main([*BASE, *args]) == 2
    assert message in capsys.readouterr().err


def test_param_budget_must_be_positive(capsys, no_data):
    with pytest.raises(SystemExit) as e:
        main([*BASE, "--param-budget", "0"])
    assert e.value.code == 2
    assert "argument --param-budget: must be at least 1, got 0" in capsys.readouterr().err


def test_cuda_without_a_gpu(monkeypatch, capsys, no_data):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*BASE, "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA GPU is visible" in capsys.readouterr().err


def test_cuda_index_past_the_visible_gpus(monkeypatch, capsys, no_data):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main([*BASE, "--device", "cuda:3"]) == 2
    assert "--device cuda:3: only 1 CUDA GPU visible (cuda:0)" in capsys.readouterr().err


def test_config_checks_are_value_errors_for_the_grid():
    """The grid validates with TrainConfig(...).resolved() before any cell."""
    for bad in ({"device": "gpu"}, {"lr": float("nan")}, {"weight_decay": -1.0}, {"seed": -1}):
        with pytest.raises(ValueError, match="--"):
            TrainConfig(spec=TINY, structure=None, **bad).resolved()
    assert TrainConfig(spec=TINY, device="cpu", seed=2**32 - 1, lr=1e-9).resolved().lr == 1e-9


def test_device_gpu_as_a_command_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "fastres.train", *BASE, "--device", "gpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--device must be" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("where, message", [
    (lambda t: (t / "file").write_text("x") and t / "file" / "r.json", "is not a folder"),
    (lambda t: t, "is a folder"),
])
def test_json_path_checked_before_the_run(tmp_path, where, message, capsys, no_data):
    path = where(tmp_path)
    assert main([*BASE, "--json", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"--json {path}" in err and message in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_json_in_an_unwritable_folder(tmp_path, capsys, no_data):
    (tmp_path / "ro").mkdir(mode=0o555)
    assert main([*BASE, "--json", str(tmp_path / "ro" / "r.json")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_json_that_cannot_be_written_after_the_run_goes_to_stdout(tiny_betons, monkeypatch,
                                                                   capsys):
    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("fastres.run.train.write_json_atomic", disk_full)
    data = str(tiny_betons.train.parent)
    assert main(["--spec", SPEC, "--data", data, "--epochs", "1", "--json", "r.json"]) == 2
    out, err = capsys.readouterr()
    assert "--json r.json: cannot write" in err
    assert json.loads(out[out.index("\n{") + 1:])["status"] == "completed"


def test_truncated_archive_is_exit_2(tmp_path, capsys):
    for split in ("train", "test"):
        for i, name in enumerate(CIFAR10_CLASSES):
            (tmp_path / "tree" / split / name).mkdir(parents=True)
            Image.fromarray(random_images(1, i)[0]).save(tmp_path / "tree" / split / name / "0.png")
    with tarfile.open(tmp_path / "t.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "tree", arcname=".")
    whole = (tmp_path / "t.tar.gz").read_bytes()
    (tmp_path / "t.tar.gz").write_bytes(whole[:len(whole) // 2])
    assert main(["--spec", SPEC, "--epochs", "1", "--data", str(tmp_path / "t.tar.gz"),
                 "--cache", str(tmp_path / "cache")]) == 2
    assert "archive t.tar.gz is truncated" in capsys.readouterr().err
    assert not list((tmp_path / "cache").rglob("*.beton*"))


# ---------------------------------------------------------------------------- channels-last


def test_channels_last_on_the_cpu_is_switched_off_and_said():
    with pytest.warns(UserWarning, match="channels-last on the CPU: oneDNN"):
        c = TrainConfig(spec=TINY, device="cpu", channels_last=True).resolved()
    assert c.channels_last is False and c.to_dict()["channels_last"] is False
    logs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = TrainConfig(spec=TINY, device="cpu", channels_last=True,
                        kernels="eager").resolved(log=logs.append)
    assert c.channels_last is False and logs == [f"[train] {CPU_CHANNELS_LAST}"]
    c.resolved(log=logs.append)  # already resolved: said once, not again
    assert len(logs) == 1


def test_cli_says_channels_last_is_off_and_records_it(tiny_betons, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["--spec", SPEC, "--epochs", "1", "--data", str(tiny_betons.train.parent),
                 "--device", "cpu", "--channels-last", "on", "--json", str(out)]) == 0
    assert capsys.readouterr().out.count(CPU_CHANNELS_LAST) == 1
    assert json.loads(out.read_text())["config"]["channels_last"] is False


def test_cpu_batches_are_contiguous_nchw(tiny_betons):
    """A channels-last batch would send oneDNN down its channels-last path despite the model."""
    cfg = TrainConfig(spec=TINY, device="cpu", channels_last=True).resolved(log=lambda _m: None)
    for placement in ("stream", "resident"):
        cfg.placement = placement
        *loaders, used = make_loaders(cfg, tiny_betons)
        assert used == placement
        for images, _ in (batch for loader in loaders for batch in loader):
            assert images.is_contiguous()
            assert not images.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------- signals


def test_stop_on_signals_raises_interrupted_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as e, stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
    assert e.value.signum == signal.SIGTERM and e.value.exit_code == 143
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before

    def off_main_thread():
        with stop_on_signals():  # cannot set handlers there: does nothing, raises nothing
            pass

    t = threading.Thread(target=off_main_thread)
    t.start()
    t.join()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.fixture(scope="module")
def signal_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("signal-cache")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_stops_cleanly_on_a_signal_mid_training(signum, code, signal_cache, tmp_path):
    err = tmp_path / "stderr"
    with open(err, "w") as ferr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastres.train", "--spec", SPEC, "--data", "synthetic",
             "--cache", str(signal_cache), "--device", "cpu", "--train-subset", "2000",
             "--epochs", "100"],
            stdout=subprocess.PIPE, stderr=ferr, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        watchdog = threading.Timer(300, proc.kill)  # a hung start fails, never blocks the suite
        watchdog.start()
        try:
            for line in proc.stdout:  # the run's header: data prepared, model built
                if line.startswith("[train] N=2"):
                    break
            else:
                pytest.fail(f"no run header; stderr:\n{err.read_text()}")
            time.sleep(1.5)  # into the first epoch
            proc.send_signal(signum)
            t0 = time.monotonic()
            rc = proc.wait(timeout=60)
        finally:
            watchdog.cancel()
            proc.kill()
            proc.stdout.close()
    assert rc == code and time.monotonic() - t0 < 30
    text = err.read_text()
    assert "interrupted" in text and "Traceback" not in text, text
    assert "progress is lost" in text and "fastres.grid" in text, text  # what to do instead
    # stderr is a file, not a terminal: no FFCV bars or batch counter as \r fragments
    assert "\r" not in text, text[:500]
    assert not [p for p in signal_cache.rglob("*") if ".tmp-" in p.name]


def test_a_single_run_offers_no_checkpoint_flag(capsys, no_data):
    """python -m fastres.train keeps no checkpoints, so --checkpoint-every would do nothing."""
    with pytest.raises(SystemExit) as e:
        main([*BASE, "--checkpoint-every", "10"])
    assert e.value.code == 2
    assert "unrecognized arguments: --checkpoint-every" in capsys.readouterr().err


def test_explain_kernels_says_what_eager_runs(tiny_betons):
    from fastres.run.train import train

    said: list[str] = []
    train(TrainConfig(spec=TINY, structure=None, epochs=1, device="cpu", kernels="eager",
                      train_subset=10, test_subset=10), data=tiny_betons, log=said.append,
          explain_kernels=True)
    assert [m for m in said if m.startswith("[kernels] eager: PyTorch's own kernels")], said
