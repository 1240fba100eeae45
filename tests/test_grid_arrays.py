"""The grid with run arrays (--array): results do not depend on how cells are grouped, a killed
array resumes (in arrays of another size) as if never stopped, and SIGTERM saves every run.

On the CPU an array computes each run with the solo model's ops in the same order (the per-run
path, fastres/study/array_model.py), so grouping changes no bit: these tests compare with ==, the
strongest form of "equal within fp32 round-off". (The grouped path, with its own tolerance,
is held to the solo runs in tests/test_train_array.py.)
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np

from .conftest import stable_seed
from .test_fast_path import epochs_recorded, rows, spawn
from .test_grid import grid_data  # noqa: F401  (module fixture)

CELLS = 4  # sgd, adam x augmentation on, off


def cmd(data: str, results: Path, *extra: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "fastres.grid", "--preset", "smoke", "--data", data,
            "--results", str(results), "--device", "cpu", "--optimizers", "sgd,adam",
            "--augment", "on,off", "--train-subset", "256", "--test-subset", "100",
            "--loader-workers", "1", "--epochs", "6", *extra]


def curves(results: Path) -> list[tuple]:
    return rows(results, "SELECT r.optimizer, r.augment, e.epoch, e.lr, e.train_loss, "
                "e.train_acc, e.test_loss, e.test_acc FROM epochs e JOIN runs r USING (run_id) "
                "ORDER BY r.optimizer, r.augment, e.epoch")


def runs(results: Path) -> list[tuple]:
    return rows(results, "SELECT optimizer, augment, status, epochs_done, lease_owner, "
                "best_acc, best_epoch, loss_at_best FROM runs ORDER BY optimizer, augment")


def test_array_off_and_array_4_give_the_same_results(grid_data, tmp_path):  # noqa: F811
    off, arr = tmp_path / "off", tmp_path / "arr"
    out_off, _ = spawn(cmd(grid_data, off, "--array", "off")).communicate(timeout=300)
    out_arr, _ = spawn(cmd(grid_data, arr, "--array", "4")).communicate(timeout=300)
    assert "its runs in arrays of up to 4" in out_arr and "arrays of" not in out_off
    assert "4 runs as one array" in out_arr, out_arr
    assert [r[2:4] for r in runs(arr)] == [("completed", 6)] * CELLS, out_arr
    assert all(r[4] is None for r in runs(arr))  # every lease given back
    assert len(curves(arr)) == CELLS * 6
    assert curves(arr) == curves(off)
    assert runs(arr) == runs(off)


def test_killed_array_resumes_regrouped_as_if_never_stopped(grid_data, tmp_path):  # noqa: F811
    """kill -9 of an array of 4 at moments drawn from a stable seed (each run saves its state
    on its own 1.5 s cadence, so runs may stop at different epochs), then a rerun with
    --array 3 (two arrays of 2): every run's curve and best equal an uninterrupted --array off
    grid's, bit for bit."""
    cadence = ["--checkpoint-every", "1.5"]
    clean = tmp_path / "clean"
    out, _ = spawn(cmd(grid_data, clean, "--array", "off", *cadence)).communicate(timeout=300)
    assert len(curves(clean)) == CELLS * 6, out
    killed = tmp_path / "killed"
    rng = np.random.default_rng(stable_seed("array-sigkill"))
    kills = 0
    for _ in range(2):
        before = epochs_recorded(killed)
        p = spawn(cmd(grid_data, killed, "--array", "4", *cadence))
        deadline = time.time() + 120
        while epochs_recorded(killed) <= before and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(float(rng.uniform(0.5, 2.5)))
        if p.poll() is not None:
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
    assert kills >= 1, "the grid finished before its kill: the test killed nothing"
    done = [r[3] for r in runs(killed)]
    out, _ = spawn(cmd(grid_data, killed, "--array", "3", *cadence)).communicate(timeout=300)
    assert [r[2:4] for r in runs(killed)] == [("completed", 6)] * CELLS, out
    # Arrays of up to 3 for 4 cells: two arrays of 2 (as few arrays as the size allows, even).
    assert "2 runs as one array" in out or min(done) == 6, out
    assert curves(killed) == curves(clean)
    assert runs(killed) == runs(clean)


def test_sigterm_saves_every_run_of_the_array_and_releases_its_leases(grid_data,  # noqa: F811
                                                                      tmp_path):
    results = tmp_path / "r"
    p = spawn(cmd(grid_data, results, "--array", "4"))  # default cadence: 60 s
    deadline = time.time() + 120
    while epochs_recorded(results) < 2 * CELLS and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 143, out
    assert "Traceback" not in out
    state = rows(results, "SELECT status, lease_owner, epochs_done, checkpoint FROM runs")
    for status, owner, done, ckpt in state:
        assert (status, owner) == ("interrupted", None) and 2 <= done < 6, out
        assert ckpt.endswith(f"epoch-{done:04d}.pt")  # saved on the signal
    out, _ = spawn(cmd(grid_data, results, "--array", "4")).communicate(timeout=300)
    assert [r[2:4] for r in runs(results)] == [("completed", 6)] * CELLS, out
    assert out.count("resuming after epoch") == CELLS, out
