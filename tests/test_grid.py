"""The grid: kill -9 and resume, concurrent processes, Ray workers, bad input."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastres.grid.command import main
from fastres.run.results import DB_NAME, ResultsDB
from fastres.study.data import write_beton

from .conftest import random_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grid_data(tmp_path_factory) -> str:
    """Ready betons of random images (the tests' own data): 256 train, 100 test."""
    folder = tmp_path_factory.mktemp("griddata")
    write_beton(folder / "train.beton", random_images(256, 3), np.arange(256) % 10)
    write_beton(folder / "test.beton", random_images(100, 4), np.arange(100) % 10)
    return str(folder)


def grid_args(data: str, results: Path, *extra: str) -> list[str]:
    return ["--preset", "smoke", "--data", data, "--results", str(results), "--device", "cpu",
            "--train-subset", "256", "--test-subset", "100", "--loader-workers", "1", *extra]


def spawn(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # both processes get the same math
    return subprocess.Popen([sys.executable, "-m", "fastres.grid", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(p: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out
    return out


def table(results: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(results / DB_NAME)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def curves(results: Path) -> dict[str, list[tuple]]:
    rows = table(results, "SELECT run_id, epoch, lr, train_loss, train_acc, test_loss, test_acc "
                 "FROM epochs ORDER BY run_id, epoch")
    out: dict[str, list[tuple]] = {}
    for r in rows:
        out.setdefault(r[0], []).append(r[1:])
    return out


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(grid_data, tmp_path):
    args = ["--optimizers", "sgd", "--augment", "on,off", "--epochs", "4", "--quiet"]
    clean = tmp_path / "clean"
    finish(spawn(grid_args(grid_data, clean, *args)))

    killed = tmp_path / "killed"
    p = spawn(grid_args(grid_data, killed, *args))
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until the second epoch of the first run is committed
        if (killed / DB_NAME).exists():
            try:
                n = table(killed, "SELECT COUNT(*) FROM epochs")[0][0]
            except sqlite3.OperationalError:
                n = 0
            if n >= 2:
                break
        time.sleep(0.05)
    else:
        p.kill()
        pytest.fail("the grid never committed two epochs")
    time.sleep(0.3)  # into the next epoch
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = table(killed, "SELECT COUNT(*) FROM epochs")[0][0]
    assert 2 <= before < 8, "the kill should land mid-grid"

    finish(spawn(grid_args(grid_data, killed, *args)))
    # The run that was killed was taken over (a second attempt) and continued, not restarted.
    assert table(killed, "SELECT MAX(attempts) FROM runs") == [(2,)]
    runs = table(killed, "SELECT status, epochs_done FROM runs")
    assert sorted(runs) == [("completed", 4), ("completed", 4)]
    assert table(killed, "SELECT run_id, COUNT(*) FROM epochs GROUP BY run_id "
                 "HAVING COUNT(*) != 4") == []
    assert curves(killed) == curves(clean)  # bit for bit, on the CPU with a fixed seed
    best = "SELECT run_id, best_acc, best_epoch, loss_at_best FROM runs ORDER BY run_id"
    assert table(killed, best) == table(clean, best)


def test_two_processes_train_each_cell_once(grid_data, tmp_path):
    results = tmp_path / "shared"
    args = grid_args(grid_data, results, "--epochs", "2", "--quiet")
    a, b = spawn(args), spawn(args)
    out = finish(a) + finish(b)
    rows = table(results, "SELECT label, status, attempts, epochs_done FROM runs")
    assert len(rows) == 4
    for label, status, attempts, done in rows:
        assert (status, attempts, done) == ("completed", 1, 2), label
        assert out.count(f"{label}: completed") == 1
    assert table(results, "SELECT COUNT(*) FROM epochs")[0][0] == 8


def test_ray_workers_two_cells(grid_data, tmp_path):
    pytest.importorskip("ray")
    results = tmp_path / "ray"
    out = finish(spawn(grid_args(grid_data, results, "--optimizers", "sgd", "--epochs", "2",
                                 "--workers", "2")), timeout=400)
    assert "Ray: 2 worker(s)" in out
    rows = table(results, "SELECT status, attempts, epochs_done FROM runs")
    assert sorted(rows) == [("completed", 1, 2), ("completed", 1, 2)]


def test_finished_runs_are_skipped_and_other_protocols_kept_apart(grid_data, tmp_path, capsys):
    results = tmp_path / "r"
    base = grid_args(grid_data, results, "--optimizers", "sgd", "--augment", "on", "--quiet")
    assert main([*base, "--epochs", "1"]) == 0
    assert main([*base, "--epochs", "1"]) == 0
    assert "1 cells (1 already finished)" in capsys.readouterr().out
    assert table(results, "SELECT COUNT(*), SUM(attempts) FROM runs") == [(1, 1)]
    assert main([*base, "--epochs", "2"]) == 0  # another protocol: a run of its own
    rows = table(results, "SELECT epochs, epochs_done, protocol_id FROM runs ORDER BY epochs")
    assert [r[:2] for r in rows] == [(1, 1), (2, 2)] and rows[0][2] != rows[1][2]


def test_diverged_run_is_recorded_and_grid_goes_on(grid_data, tmp_path):
    results = tmp_path / "d"
    assert main(grid_args(grid_data, results, "--epochs", "2", "--lr", "1e30", "--quiet")) == 0
    rows = table(results, "SELECT status, diverged_at, epochs_done FROM runs")
    assert len(rows) == 4 and all(r == ("diverged", 1, 1) for r in rows)


def test_corrupt_checkpoint_restarts_the_run(grid_data, tmp_path, capsys):
    results = tmp_path / "c"
    base = grid_args(grid_data, results, "--optimizers", "sgd", "--augment", "on",
                     "--epochs", "2", "--quiet")
    assert main(base) == 0
    (rid, ckpt), = table(results, "SELECT run_id, checkpoint FROM runs")
    conn = sqlite3.connect(results / DB_NAME)
    with conn:  # as if killed after epoch 2 was committed but before the run was marked done
        conn.execute("UPDATE runs SET status = 'running' WHERE run_id = ?", (rid,))
    conn.close()
    (results / ckpt).write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="restarting it from epoch 1"):
        assert main(base) == 0
    assert "restarting it from epoch 1" in capsys.readouterr().err
    assert table(results, "SELECT status, epochs_done, attempts FROM runs") == [
        ("completed", 2, 2)]
    assert table(results, "SELECT COUNT(*) FROM epochs") == [(2,)]


@pytest.mark.parametrize("extra, message", [
    (["--structures", "12"], "unknown structure 12"),
    (["--structures", "x"], "'x' is not an integer"),
    (["--optimizers", "sgd,rmsprop"], "unknown optimizer 'rmsprop'"),
    (["--optimizers", ","], "selects nothing"),
    (["--augment", "maybe"], "'maybe' is not on or off"),
    (["--spec", "N=3 B=1 C_in=8 F0=3 P0=1 F1=3 P1=1"], "len(B)"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--precision", "fp32", "--kernels", "eager", "--device", "cpu", "--train-subset", "0"],
     "--train-subset must be at least 1"),
])
def test_bad_selection(extra, message, grid_data, tmp_path, capsys):
    assert main([*grid_args(grid_data, tmp_path / "r"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_unwritable_results_folder(grid_data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(grid_args(grid_data, tmp_path / "file" / "runs")) == 2
    assert "is not writable" in capsys.readouterr().err


def test_foreign_databases_are_refused(grid_data, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    conn = sqlite3.connect(other / DB_NAME)
    conn.execute("CREATE TABLE invoices (id INTEGER)")
    conn.commit()
    conn.close()
    assert main(grid_args(grid_data, other)) == 2
    assert "database of another program (tables: invoices)" in capsys.readouterr().err
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / DB_NAME).write_text("hello")
    assert main(grid_args(grid_data, junk)) == 2
    assert "is not an SQLite database" in capsys.readouterr().err
    assert (junk / DB_NAME).read_text() == "hello"  # nothing already written is lost


def test_dry_run_of_the_paper_grid(capsys):
    assert main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "90 cells, 45000 epochs" in out
    total = float(out.split("epochs, ")[1].split(" EFLOP")[0])
    assert 13.5 < total < 14.5  # protocol.md: about 14 EFLOP


def test_presets_plan(capsys):
    from fastres.grid.plan import PRESETS

    assert len(PRESETS["paper"].cells()) == 90
    fig7 = PRESETS["fig7"].cells()
    assert len(fig7) == 4 and {(c.augment, c.normalize) for c in fig7} == {
        (True, True), (True, False), (False, True), (False, False)}
    assert [c.tmax for c in PRESETS["fig8"].cells()] == [0, 100, 200, 300]
    assert main(["--preset", "fig8", "--dry-run"]) == 0
    assert "4 cells, 2000 epochs" in capsys.readouterr().out


def test_no_data_offers_the_smoke_preset(tmp_path, offline, capsys):
    assert main(["--results", str(tmp_path / "r"), "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "could not be downloaded" in err and "--data PATH" in err
    assert "--preset smoke --data synthetic" in err


def test_synthetic_data_is_labelled(tmp_path, capsys):
    assert main(["--preset", "smoke", "--data", "synthetic", "--cache", str(tmp_path / "c"),
                 "--results", str(tmp_path / "r"), "--optimizers", "sgd", "--augment", "off",
                 "--epochs", "1", "--quiet"]) == 0
    assert "SYNTHETIC DATA" in capsys.readouterr().out
    (protocol,) = table(tmp_path / "r", "SELECT protocol FROM runs")[0]
    assert json.loads(protocol)["data_kind"] == "synthetic"
    db = ResultsDB(tmp_path / "r")
    assert db.runs()[0]["status"] == "completed"


def test_workers_without_ray_says_how_to_install(grid_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    assert main([*grid_args(grid_data, tmp_path / "r"), "--workers", "2"]) == 2
    assert "pip install 'fastres[cluster]'" in capsys.readouterr().err


def test_ray_worker_killed_mid_run_is_retried_and_resumes(grid_data, tmp_path):
    """SIGKILL the worker process training a run: Ray retries its task at once, the new worker
    resumes from the last checkpoint the driver committed; the other cell goes on."""
    pytest.importorskip("ray")
    results = tmp_path / "ray-kill"
    p = spawn(grid_args(grid_data, results, "--optimizers", "sgd", "--epochs", "6",
                        "--workers", "2", "--max-retries", "2"))
    deadline, victim = time.time() + 300, None
    while time.time() < deadline and victim is None:
        time.sleep(0.2)
        if not (results / DB_NAME).exists():
            continue
        try:
            rows = table(results, "SELECT run_id, environment, epochs_done FROM runs "
                         "WHERE lease_owner IS NOT NULL AND epochs_done >= 1 AND epochs_done < 5")
        except sqlite3.OperationalError:
            continue
        if rows:
            victim = rows[0]
    if victim is None:
        p.kill()
        pytest.fail("no worker was ever mid-run")
    run, where, _ = victim
    os.kill(json.loads(where)["pid"], signal.SIGKILL)  # the worker of the run's attempt
    out = finish(p, timeout=400)
    rows = dict(((r, (s, a, d)) for r, s, a, d in table(
        results, "SELECT run_id, status, attempts, epochs_done FROM runs")))
    assert rows[run] == ("completed", 2, 6), out
    assert all(v[0] == "completed" and v[2] == 6 for v in rows.values())
    epochs = [e for (e,) in table(results, f"SELECT epoch FROM epochs WHERE run_id = '{run}' "
                                  "ORDER BY epoch")]
    assert epochs == [1, 2, 3, 4, 5, 6]  # continuous, no duplicates
    assert "restarting it from epoch 1" not in out  # resumed from its checkpoint


def test_triton_kernels_where_they_cannot_run_fail_before_any_cell(grid_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastres.grid",
                           *grid_args(grid_data, tmp_path / "r"), "--kernels", "triton"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--kernels triton:" in proc.stderr and "TRITON_INTERPRET=1" in proc.stderr
    assert not (tmp_path / "r").exists()  # refused before the results folder is opened
