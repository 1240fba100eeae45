"""The product's fast path on the CPU: resident and streamed data give the same run, a warm
engine gives the same run as a fresh one, and checkpoints on a time cadence keep the guarantee
that a killed run resumes to exactly the uninterrupted result."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastres.run.config import TrainConfig
from fastres.run.results import DB_NAME
from fastres.run.workbench import Workbench
from fastres.study.models import from_seed_checkpoint
from fastres.study.protocol import PAPER_OPTIMIZERS, SMOKE_SPEC
from fastres.study.structures import ResNetSpec

from .conftest import stable_seed
from .test_grid import grid_data  # noqa: F401  (module fixture)

ROOT = Path(__file__).resolve().parents[1]
TINY = ResNetSpec.parse(SMOKE_SPEC)
QUIET = {"log": lambda _m: None}


def config(**kw) -> TrainConfig:
    base = dict(spec=TINY, structure=None, epochs=2, tmax=3, device="cpu", kernels="eager",
                loader_workers=1, compile=False)
    return TrainConfig(**{**base, **kw})


def run(cfg: TrainConfig, data, bench=None):
    from fastres.run.train import train

    return train(cfg, data=data, bench=bench, **QUIET)


def metrics(result) -> list[tuple]:
    return [(m.epoch, m.lr, m.train_loss, m.train_acc, m.test_loss, m.test_acc)
            for m in result.epochs]


@pytest.mark.parametrize("augment", [True, False], ids=["aug", "noaug"])
def test_resident_and_stream_give_the_same_run(augment, tiny_betons):
    """One permutation source and one augmentation generator drive both placements: with the
    same seed the batches, crops and flips are the same, so every metric is bit for bit equal
    on the CPU (same arithmetic on the same tensors in the same order)."""
    stream = run(config(augment=augment, seed=3, placement="stream"), tiny_betons)
    resident = run(config(augment=augment, seed=3, placement="resident"), tiny_betons)
    assert stream.data["placement"] == "stream" and resident.data["placement"] == "resident"
    assert metrics(resident) == metrics(stream)
    other = run(config(augment=augment, seed=4, placement="resident"), tiny_betons)
    assert metrics(other) != metrics(resident)  # the seed does reach the order


@pytest.mark.parametrize("optimizer", PAPER_OPTIMIZERS)
def test_warm_engine_gives_the_run_of_a_fresh_one(optimizer, tiny_betons):
    """A grid worker reuses the model, optimizer (and on a GPU the captured graphs) of the run
    before: fresh weights are copied in and the optimizer state zeroed in place. Exactly equal,
    because a zeroed state is what every Table 2 optimizer starts from (SGD's first momentum
    update, 0 * 0.9 + g, is g exactly)."""
    bench = Workbench("cpu")
    first = run(config(optimizer=optimizer, seed=1, tmax=2), tiny_betons, bench)
    second = run(config(optimizer=optimizer, seed=2, lr=None, augment=False), tiny_betons,
                 bench)
    assert len(bench.engines) == 1 and next(iter(bench.engines.values())).runs == 2
    fresh = run(config(optimizer=optimizer, seed=2, augment=False), tiny_betons)
    assert metrics(second) == metrics(fresh) and metrics(first) != metrics(second)


def test_resident_data_is_read_once_per_worker(tiny_betons):
    bench = Workbench("cpu")
    for seed in (0, 1):
        run(config(seed=seed, epochs=1, placement="resident"), tiny_betons, bench)
    assert len(bench.data) == 2  # train and test splits, kept across the two runs


# ------------------------------------------------------------------ checkpoints off the thread

def grid_cmd(data: str, results: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fastres.grid", "--preset", "smoke", "--data", data,
            "--results", str(results), "--device", "cpu", "--optimizers", "adam",
            "--augment", "on", "--train-subset", "256", "--test-subset", "100",
            "--loader-workers", "1", "--epochs", "8", *extra]


def spawn(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # every process gets the same math
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def rows(results: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(results / DB_NAME, timeout=30)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def curve(results: Path) -> list[tuple]:
    return rows(results, "SELECT epoch, lr, train_loss, train_acc, test_loss, test_acc "
                "FROM epochs ORDER BY epoch")


def epochs_recorded(results: Path) -> int:
    try:
        return rows(results, "SELECT COUNT(*) FROM epochs")[0][0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def last_commit(results: Path) -> float:
    try:
        return rows(results, "SELECT COALESCE(MAX(committed_at), 0) FROM epochs")[0][0]
    except sqlite3.OperationalError:  # not created yet
        return 0.0


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(grid_data,  # noqa: F811
                                                                    tmp_path):
    """kill -9 loses at most --checkpoint-every seconds: each rerun resumes from the last saved
    state, replaces the epoch rows recorded after it, and the finished run equals an
    uninterrupted one bit for bit. The kill moments are drawn from a stable seed."""
    cadence = ["--checkpoint-every", "1.5"]
    clean = tmp_path / "clean"
    out, _ = spawn(grid_cmd(grid_data, clean, *cadence)).communicate(timeout=300)
    assert len(curve(clean)) == 8, out

    killed = tmp_path / "killed"
    rng = np.random.default_rng(stable_seed("sigkill-moments"))
    kills = 0
    for _ in range(3):
        started = time.time()
        p = spawn(grid_cmd(grid_data, killed, *cadence))
        deadline = started + 120
        # Until this process has recorded an epoch (it is training again), or has finished.
        while last_commit(killed) < started and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(float(rng.uniform(0.0, 2.5)))  # somewhere in the next few epochs
        if p.poll() is not None:
            break  # finished before the kill
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        saved = rows(killed, "SELECT checkpoint FROM runs")[0][0]
        assert epochs_recorded(killed) <= 8
        if saved:  # the state on disk is of an epoch the database has recorded
            assert int(Path(saved).stem.split("-")[1]) <= epochs_recorded(killed)
    assert kills >= 1, "every run finished before its kill: the test killed nothing"
    out, _ = spawn(grid_cmd(grid_data, killed, *cadence)).communicate(timeout=300)
    assert rows(killed, "SELECT status, epochs_done FROM runs") == [("completed", 8)], out
    assert curve(killed) == curve(clean)
    best = "SELECT best_acc, best_epoch, loss_at_best FROM runs"
    assert rows(killed, best) == rows(clean, best)


def test_sigterm_saves_the_state_releases_the_lease_and_leaves_best(grid_data,  # noqa: F811
                                                                    tmp_path):
    """SIGTERM: the state of the epoch in flight is saved at its end, the lease released, exit
    143; the rerun resumes right there. A finished run leaves its last state and best.pt, both
    loadable by from_seed_checkpoint."""
    results = tmp_path / "r"
    cmd = grid_cmd(grid_data, results)  # the default cadence: 60 s, longer than this run
    p = spawn(cmd)
    deadline = time.time() + 120
    while epochs_recorded(results) < 2 and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 143, out
    assert "interrupted; rerun to resume" in out and "Traceback" not in out
    (status, owner, done, ckpt), = rows(results, "SELECT status, lease_owner, epochs_done, "
                                       "checkpoint FROM runs")
    assert (status, owner) == ("interrupted", None) and 2 <= done < 8, out
    assert ckpt.endswith(f"epoch-{done:04d}.pt")  # saved on the signal, not 60 s later

    out, _ = spawn(cmd).communicate(timeout=300)
    assert f"resuming after epoch {done}" in out, out
    (status, ckpt, best_epoch, best_acc), = rows(results, "SELECT status, checkpoint, "
                                                 "best_epoch, best_acc FROM runs")
    assert status == "completed" and ckpt.endswith("epoch-0008.pt")
    folder = results / Path(ckpt).parent
    final = from_seed_checkpoint(results / ckpt, TINY)
    best = from_seed_checkpoint(folder / "best.pt", TINY)
    # best.pt holds the best epoch's weights: evaluated as the run evaluates (same test batches
    # of 100, fp32, eval mode), it scores the best accuracy recorded, to the image.
    assert accuracy_of(best, grid_data) == best_acc and best_epoch is not None
    assert final.state_dict().keys() == best.state_dict().keys()


def accuracy_of(model, data: str) -> float:
    import torch

    from fastres.loaders.augment import DeviceAugment
    from fastres.loaders.cifar import CifarLoader

    loader = CifarLoader(Path(data) / "test.beton", 100, False, torch.device("cpu"),
                         DeviceAugment(crop=False, flip=False, channels_last=False,
                                       backend="torch"), num_workers=1)
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return correct / loader.num_samples


def test_one_kernels_switch_reaches_the_augmentation_too(tiny_betons, monkeypatch):
    """--kernels decides every kernel, not the device type: eager runs PyTorch's crop/flip/
    normalise, triton fastres's single-pass kernel (here under the Triton interpreter).
    Two training batches (3 images, then the odd 2 left over: the interpreter's time grows with
    the images) and one test batch of 3. Tolerance: fp32 throughout; the implicit-GEMM
    convolutions sum in another order than oneDNN, about 1e-6 relative per layer, which two SGD
    steps leave far below 1e-4 (a loss is a mean of per-image terms over full 32x32 maps, so
    fewer images do not change that); test accuracy within one image, as before."""
    import fastres.kernels.augment as kernel

    calls = []
    real = kernel.augment
    monkeypatch.setattr(kernel, "augment", lambda *a, **k: calls.append(1) or real(*a, **k))
    small = dict(epochs=1, train_subset=5, test_subset=3, batch_size=3, test_batch_size=3)
    eager = run(config(kernels="eager", **small), tiny_betons)
    assert calls == []
    triton = run(config(kernels="triton", **small), tiny_betons)
    assert len(calls) == 3  # two training batches and one test batch
    (e,), (t,) = eager.epochs, triton.epochs
    assert t.train_loss == pytest.approx(e.train_loss, rel=1e-4)
    assert t.test_loss == pytest.approx(e.test_loss, rel=1e-4)
    assert abs(t.test_acc - e.test_acc) <= 1 / 3 + 1e-9  # one image of 3
