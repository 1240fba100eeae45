"""Issue 8: bad input to the grid. Each case is a clear error (exit 2 for the command line, no
traceback), loses nothing already written, and never calls a failed run finished."""

import errno
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
import torch

from fastres.grid.command import main
from fastres.report.command import main as report_main
from fastres.run.results import DB_NAME, DiskFull, ResultsDB, RunCheckpointer
from fastres.study.data import BetonPair, DataError

from .test_grid import spawn, table


def args(data: BetonPair, results: Path, *extra: str) -> list[str]:
    """The smoke preset, one optimizer, on tiny_betons (300 train, 120 test images)."""
    return ["--preset", "smoke", "--data", str(data.train.parent), "--results", str(results),
            "--device", "cpu", "--loader-workers", "1", "--optimizers", "sgd",
            "--train-subset", "300", "--test-subset", "120", "--quiet", *extra]


def runs(results: Path) -> list[tuple]:
    return table(results, "SELECT label, status, attempts, epochs_done, lease_owner FROM runs "
                 "ORDER BY label")


def epochs(results: Path) -> list[int]:
    return [e for (e,) in table(results, "SELECT epoch FROM epochs ORDER BY epoch")]


# ---------------------------------------------------------------- 1: failed is never finished

@pytest.mark.parametrize("array", ["off", "2"], ids=["one-at-a-time", "array"])
def test_failed_cells_are_reported_failed_until_retried(array, tiny_betons, tmp_path,
                                                        monkeypatch, capsys):
    """As with --device cuda on a machine without a GPU: every cell fails three times; then the
    fixed command must not say "done" but name the failure, and --retry-failed runs it again.
    Run alone or as one array of both cells: a failed array fails each of its runs."""
    results = tmp_path / "r"
    base = args(tiny_betons, results, "--augment", "on,off", "--epochs", "1", "--array", array)

    def broken(*_a, **_k):
        raise RuntimeError("CUDA error: no kernel image is available")

    monkeypatch.setattr("fastres.run.train.train", broken)
    monkeypatch.setattr("fastres.run.train_array.train_array", broken)
    for attempt in (1, 2, 3):
        assert main(base) == 1
        err = capsys.readouterr().err
        assert f"failed after {attempt} attempt" in err and "no kernel image" in err
    monkeypatch.undo()  # the cause is fixed, but the cells are at the retry cap

    assert main(base) == 1
    captured = capsys.readouterr()
    assert captured.err.count("failed after 3 attempts: RuntimeError: CUDA error") == 2
    assert "--retry-failed" in captured.err
    assert "0/2 cells finished, 2 failed" in captured.out and ": done" not in captured.out
    assert [r[1:4] for r in runs(results)] == [("failed", 3, 0)] * 2 and epochs(results) == []

    assert main([*base, "--retry-failed"]) == 0
    assert "2/2 cells finished;" in capsys.readouterr().out
    assert [r[1:4] for r in runs(results)] == [("completed", 1, 1)] * 2
    assert table(results, "SELECT COUNT(*) FROM runs WHERE error IS NOT NULL") == [(0,)]


@pytest.mark.parametrize("extra, message", [
    (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (["--lr", "inf"], "--lr must be a positive finite number, got inf"),
    (["--lr", "0"], "--lr must be a positive finite number"),
    (["--lr", "-0.1"], "--lr must be a positive finite number"),
    (["--max-retries", "-1"], "--max-retries must be 0 or more"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
    pytest.param(["--device", "cuda"], "no CUDA GPU is visible", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a GPU is here")),
], ids=["lr-nan", "lr-inf", "lr-zero", "lr-negative", "max-retries", "device-tpu",
        "device-cuda-without-gpu"])
def test_run_settings_are_checked_before_any_cell(extra, message, tiny_betons, tmp_path,
                                                  capsys):
    results = tmp_path / "r"
    assert main(args(tiny_betons, results, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if (results / DB_NAME).exists():  # no cell registered, no attempt used
        assert table(results, "SELECT COUNT(*) FROM runs") == [(0,)]


# ---------------------------------------------------------------- 6: subset above the data

def test_subset_above_the_data_is_clamped_warned_and_recorded(tiny_betons, tmp_path, capsys):
    results = tmp_path / "r"
    base = args(tiny_betons, results, "--augment", "on", "--epochs", "1")
    assert main([*base, "--train-subset", "5000", "--test-subset", "1000"]) == 0
    err = capsys.readouterr().err
    assert "--train-subset 5000 is more than the 300 training images" in err
    assert "--test-subset 1000 is more than the 120 test images" in err
    (protocol,), = table(results, "SELECT protocol FROM runs")
    assert (json.loads(protocol)["train_subset"], json.loads(protocol)["test_subset"]) == (300, 120)
    # Keyed by what was used: the same run as asking for exactly the data's size.
    assert main(base) == 0
    assert "1 cells (1 already finished)" in capsys.readouterr().out
    assert report_main(["--results", str(results), "--no-figures"]) == 0
    assert "train subset 300, test subset 120" in capsys.readouterr().out


# ---------------------------------------------------------------- 11: epoch rows not 1..n

def _fail_at_epoch_three(monkeypatch) -> None:
    record = RunCheckpointer.record

    def stop_before_three(self, metrics):
        if metrics.epoch == 3:
            raise RuntimeError("stopped before recording epoch 3")
        record(self, metrics)

    monkeypatch.setattr(RunCheckpointer, "record", stop_before_three)


@pytest.mark.parametrize("edit, why", [
    ("UPDATE epochs SET epoch = 3 WHERE epoch = 2",
     "its epoch rows in the database are 1, 3, not 1..2"),
    ("DELETE FROM epochs WHERE epoch = 2",
     "its checkpoint is of epoch 2, while the database records epochs 1..1"),
], ids=["gap", "deleted-row"])
def test_epoch_rows_other_than_1_to_n_restart_the_run(edit, why, tiny_betons, tmp_path,
                                                      monkeypatch, capsys):
    results = tmp_path / "r"
    # Every epoch's state saved: the run fails with rows 1..2 and the state of epoch 2.
    base = args(tiny_betons, results, "--augment", "on", "--epochs", "3",
                "--checkpoint-every", "0")
    _fail_at_epoch_three(monkeypatch)
    assert main(base) == 1
    monkeypatch.undo()
    assert [r[1:4] for r in runs(results)] == [("failed", 1, 2)]
    conn = sqlite3.connect(results / DB_NAME)
    with conn:
        conn.execute(edit)
    conn.close()
    capsys.readouterr()

    with pytest.warns(UserWarning, match="restarting it from epoch 1"):
        assert main(base) == 0
    err = capsys.readouterr().err
    assert f"{why}; restarting it" in err
    assert "UNIQUE" not in err
    assert [r[1:4] for r in runs(results)] == [("completed", 2, 3)]
    assert epochs(results) == [1, 2, 3]
    (rid, ckpt), = table(results, "SELECT run_id, checkpoint FROM runs")
    assert sorted(p.name for p in (results / "checkpoints" / rid).iterdir()) == \
        ["best.pt", Path(ckpt).name]


# ---------------------------------------------------------------- 12: SIGINT and SIGTERM

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_cleanly_and_the_rerun_resumes(signum, tiny_betons, tmp_path):
    results = tmp_path / "r"
    cmd = [a for a in args(tiny_betons, results, "--augment", "on", "--epochs", "12")
           if a != "--quiet"]  # epoch lines, to signal after the first
    p = spawn(cmd)
    out = []
    for line in p.stdout:
        out.append(line)
        if "epoch 1/12" in line:
            p.send_signal(signum)
            break
    rest, _ = p.communicate(timeout=60)
    out = "".join(out) + rest
    assert p.returncode == 128 + signum, out
    assert "interrupted; rerun to resume" in out and "Traceback" not in out
    (label, status, attempts, done, owner), = runs(results)
    assert (status, attempts, owner) == ("interrupted", 0, None) and 1 <= done < 12, out
    assert epochs(results) == list(range(1, done + 1))

    p = spawn(cmd)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    assert f"resuming after epoch {done}" in out and "restarting" not in out
    assert [r[1:4] for r in runs(results)] == [("completed", 1, 12)]
    assert epochs(results) == list(range(1, 13))


# ---------------------------------------------------------------- 13: a full disk

def _enospc(*_a):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("array", ["off", "2"], ids=["one-at-a-time", "array"])
def test_disk_full_while_checkpointing_stops_the_grid(array, tiny_betons, tmp_path, monkeypatch,
                                                      capsys):
    results = tmp_path / "r"
    base = args(tiny_betons, results, "--augment", "on,off", "--epochs", "2", "--array", array)
    fsync = os.fsync

    def full_for_checkpoints(fd):  # the write of a checkpoint file finds the disk full
        if "/checkpoints/" in os.readlink(f"/proc/self/fd/{fd}"):
            _enospc()
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_for_checkpoints)
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "no space left writing the checkpoint of" in err and str(results) in err
    assert "Traceback" not in err and "inline_container" not in err
    # The grid stopped at the first cell (its epoch recorded, its state not saved), or at the
    # end of the array of both; no cell used up an attempt or was marked failed.
    second = ("pending", 0, 0, None) if array == "off" else ("interrupted", 0, 2, None)
    assert sorted(r[1:] for r in runs(results)) == [("interrupted", 0, 2, None), second]
    assert not [p for p in (results / "checkpoints").rglob("*") if p.is_file()]

    monkeypatch.undo()  # space freed
    with pytest.warns(UserWarning, match="no state was saved yet"):
        assert main(base) == 0
    assert [r[1:4] for r in runs(results)] == [("completed", 1, 2)] * 2


class _FullConnection(sqlite3.Connection):
    """A connection whose database cannot grow: SQLite's own SQLITE_FULL error on insert."""

    def execute(self, sql, *params):
        if sql.startswith("INSERT OR IGNORE INTO runs"):
            raise sqlite3.OperationalError("database or disk is full")
        return super().execute(sql, *params)


def test_disk_full_at_registration(tiny_betons, tmp_path, monkeypatch, capsys):
    results = tmp_path / "r"
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect",
                        lambda *a, **k: connect(*a, **k, factory=_FullConnection))
    assert main(args(tiny_betons, results)) == 2
    err = capsys.readouterr().err
    assert "error: results folder is full" in err and "Traceback" not in err
    monkeypatch.undo()
    assert table(results, "SELECT COUNT(*) FROM runs") == [(0,)]


def test_write_probe_leaves_no_file_on_a_full_disk(tiny_betons, tmp_path, monkeypatch, capsys):
    results = tmp_path / "r"
    results.mkdir()

    def create_then_fail(self, *_a, **_k):  # a full disk: the file is made, its data is not
        self.touch()
        _enospc()

    monkeypatch.setattr(Path, "write_text", create_then_fail)
    with pytest.raises(DiskFull, match="results folder is full"):
        ResultsDB(results)
    assert main(args(tiny_betons, results)) == 2
    assert "error: results folder is full" in capsys.readouterr().err
    assert list(results.iterdir()) == []


# ---------------------------------------------------------------- arrays: out of device memory

def test_an_array_out_of_memory_is_split_never_a_crash(tiny_betons, tmp_path, monkeypatch,
                                                       capsys):
    """An array that does not fit (here: any of more than 2 runs, after its first epoch is
    recorded) is given back, attempts not counted, and retried as two halves; the grid
    finishes every cell and the results are those of the runs alone."""
    import fastres.run.train_array

    real = fastres.run.train_array.train_array
    tried: list[int] = []

    def small_gpu(cfgs, *a, **k):
        tried.append(len(cfgs))
        if len(cfgs) > 2:
            on_epoch = k.get("on_epoch")

            def oom_after_first_epoch(i, m):
                if on_epoch is not None:
                    on_epoch(i, m)
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

            return real(cfgs, *a, **{**k, "on_epoch": oom_after_first_epoch})
        return real(cfgs, *a, **k)

    monkeypatch.setattr(fastres.run.train_array, "train_array", small_gpu)
    results = tmp_path / "r"
    base = args(tiny_betons, results, "--optimizers", "sgd,adam", "--augment", "on,off",
                "--epochs", "2", "--checkpoint-every", "0")
    assert main([*base, "--array", "4"]) == 0
    err = capsys.readouterr().err
    assert "an array of 4 runs ran out of device memory" in err and "splitting it" in err
    assert tried == [4, 2, 2]
    assert [r[1:5] for r in runs(results)] == [("completed", 1, 2, None)] * 4
    alone = tmp_path / "alone"
    monkeypatch.undo()
    assert main(args(tiny_betons, alone, "--optimizers", "sgd,adam", "--augment", "on,off",
                     "--epochs", "2", "--array", "off")) == 0
    curve = "SELECT r.label, e.epoch, e.train_loss, e.test_loss FROM epochs e JOIN runs r " \
        "USING (run_id) ORDER BY r.label, e.epoch"
    assert table(results, curve) == table(alone, curve)


# ---------------------------------------------------------------- issue 19, 9: every cell checked

# Where no data is read: the flags are refused first (a path that is never prepared).
NO_DATA = BetonPair(Path("/nonexistent/train.beton"), Path("/nonexistent/test.beton"), "beton",
                    "/nonexistent", 300, 120, "none")

@pytest.mark.parametrize("extra, message", [
    (["--seeds", "0,4294967296"], "--seeds: 4294967296 must be at most 4294967295"),
    (["--seeds", "1,,2"], "--seeds '1,,2' has an empty item"),
    (["--tmax", "0," + "1" * 20], f"--tmax: {'1' * 20} must be at most 9223372036854775807"),
    (["--epochs", "1" * 20], f"--epochs must be at most 9223372036854775807 (2**63 - 1, "
                             f"the largest integer the results store holds), got {'1' * 20}"),
    (["--max-retries", "1" * 20], "--max-retries + 1 must be at most"),
    (["--loader-workers", "-1"], "--loader-workers must be 0 (torch's thread count) or more"),
    (["--train-subset", "0"], "--train-subset must be at least 1, got 0"),
    (["--checkpoint-every", "nan"], "--checkpoint-every must be 0 (every epoch) or a positive"),
    (["--array", "abc"], "--array must be auto, off or a number of runs >= 1, got 'abc'"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--device", "gpu"], "--device must be cpu, cuda or cuda:N, got 'gpu'"),
    (["--precision", "fp16", "--array", "2"], "--array with --precision fp16"),
    (["--results", ""], "--results '' names no folder"),
], ids=["seeds-past-2**32", "seeds-empty-item", "tmax-past-int64", "epochs-past-int64",
        "max-retries-past-int64", "loader-workers", "train-subset-0", "checkpoint-every-nan",
        "array-abc", "workers-0", "device-gpu", "fp16-array", "results-empty"])
@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
def test_every_flag_of_every_cell_is_checked_before_anything_is_registered(
        extra, message, dry, tmp_path, monkeypatch, capsys):
    """Before any data is prepared or cell registered, and alike in a dry run: the error names
    the flag as typed (--seeds, not --seed), exit 2, no traceback, the store untouched."""
    def no_data(*_a, **_k):
        raise AssertionError("data was prepared before the bad flag was caught")

    monkeypatch.setattr("fastres.study.data.prepare", no_data)
    results = tmp_path / "r"
    base = args(NO_DATA, results, "--augment", "on", "--epochs", "1")
    assert main([*base, *extra, *(["--dry-run"] if dry else [])]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not results.exists()


def test_param_budget_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(args(NO_DATA, tmp_path / "r", "--param-budget", "-5", "--dry-run"))
    assert e.value.code == 2
    assert "argument --param-budget: must be at least 1, got -5" in capsys.readouterr().err


def test_flags_that_would_do_nothing_are_said(tmp_path, capsys):
    assert main(args(NO_DATA, tmp_path / "r", "--runs-per-gpu", "2", "--dry-run")) == 0
    assert "--runs-per-gpu applies to Ray workers only" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / DB_NAME).write_text("")
    assert main(args(NO_DATA, tmp_path / "r" / DB_NAME, "--dry-run")) == 2
    assert f"is a file, not a folder; give the folder that holds it: --results {tmp_path / 'r'}" \
        in capsys.readouterr().err


def test_quiet_logs_get_no_progress_bars(tmp_path, monkeypatch, capsys):
    silenced = []
    monkeypatch.setattr("fastres.grid.command.silence_conversion_bars",
                        lambda: silenced.append(True))

    def prepare(*_a, **_k):  # as far as the conversion: the bars are off by then
        raise DataError("stop here")

    monkeypatch.setattr("fastres.study.data.prepare", prepare)
    assert main(args(NO_DATA, tmp_path / "r")) == 2  # --quiet
    assert silenced == [True]


def test_ctrl_c_in_a_dry_run_offers_no_resume(tmp_path, monkeypatch, capsys):
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr("fastres.grid.command.print_plan", interrupted)
    assert main(args(NO_DATA, tmp_path / "r", "--dry-run")) == 130
    err = capsys.readouterr().err
    assert "[grid] interrupted" in err and "resume" not in err


# ---------------------------------------------------------------- issue 19, 3: a cell given twice

def test_a_cell_given_twice_runs_once(tiny_betons, tmp_path, capsys):
    """Merged in the plan, before either way of running (one at a time, or the array of two
    that leased one run twice), so the array is the case tested."""
    results = tmp_path / "r"
    base = args(tiny_betons, results, "--augment", "on", "--epochs", "1", "--seeds", "0,0",
                "--array", "2")
    assert main([*base, "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "--seeds gives 0 more than once; each cell runs once" in captured.err
    assert "1 cells, 1 epochs" in captured.out
    assert not results.exists()
    assert main(base) == 0
    captured = capsys.readouterr()
    assert "--seeds gives 0 more than once" in captured.err and "Traceback" not in captured.err
    assert "1/1 cells finished;" in captured.out
    assert [r[1:4] for r in runs(results)] == [("completed", 1, 1)]


def test_one_spec_given_twice_is_one_structure(tmp_path, capsys):
    spec = "N=2 B=1,1 C_in=8 F0=3 P0=1 F1=3 P1=1 K=1"
    assert main(["--preset", "smoke", "--spec", spec, "--spec", spec.replace(" ", "  "),
                 "--results", str(tmp_path / "r"), "--dry-run", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "--spec gives" in captured.err and "more than once" in captured.err
    assert "4 cells, 8 epochs" in captured.out  # 2 optimizers x augment on/off, once


# ---------------------------------------------------------------- issue 19, 6: a locked store

def test_a_locked_store_is_named_exit_2_and_nothing_lost(tmp_path, monkeypatch, capsys):
    """Another program holds a write transaction on results.sqlite: after the wait (shortened
    here from 60 s), one line naming the file and what to do, exit 2, the store as it was."""
    monkeypatch.setattr("fastres.run.results.LOCK_WAIT", 0.3)
    results = tmp_path / "r"
    db = ResultsDB(results)
    db.register("earlier", {"label": "an earlier run", "cell": "{}", "protocol_id": "p",
                            "protocol": "{}", "structure": 1, "spec": "s", "optimizer": "sgd",
                            "optimizer_settings": "{}", "augment": 1, "normalize": 1,
                            "tmax": 200, "epochs": 1, "seed": 0})
    db.close()
    other = sqlite3.connect(results / DB_NAME, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # e.g. an sqlite3 shell with uncommitted changes
    try:
        assert main(args(NO_DATA, results, "--augment", "on", "--epochs", "1")) == 2
        err = capsys.readouterr().err
        assert f"error: {results / DB_NAME} is locked: another program has held a write " \
            "transaction on it" in err and "commit or close it there, then rerun" in err
        assert "Traceback" not in err and "OperationalError" not in err
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert runs(results) == [("an earlier run", "pending", 0, 0, None)]


# ---------------------------------------------------------------- issue 19, 2: a run's own fault

def test_one_runs_unwritable_checkpoint_folder_fails_that_run_alone(tiny_betons, tmp_path,
                                                                    monkeypatch, capsys):
    """In an array of two, the first run to save finds its checkpoint folder taken by a file:
    that run is failed with its own error (one attempt), the other finishes."""
    real = RunCheckpointer.save
    blocked: list[str] = []

    def folder_is_a_file(self, epoch, state, best):
        if not blocked:
            blocked.append(self.run_id)
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            self.folder.write_text("not a folder")
        return real(self, epoch, state, best)

    monkeypatch.setattr(RunCheckpointer, "save", folder_is_a_file)
    results = tmp_path / "r"
    assert main(args(tiny_betons, results, "--augment", "on,off", "--epochs", "1",
                     "--checkpoint-every", "0", "--array", "2")) == 1
    err = capsys.readouterr().err
    assert "failed after 1 attempt" in err and blocked[0] in err and "Traceback" not in err
    rows = table(results, "SELECT run_id, status, attempts, epochs_done, error FROM runs")
    assert {r[0]: r[1:4] for r in rows} == {
        rid: ("failed" if rid == blocked[0] else "completed", 1, 1)
        for rid, *_ in rows}
    (error,), = [r[4:] for r in rows if r[0] == blocked[0]]
    assert str(results / "checkpoints" / blocked[0]) in error


# ---------------------------------------------------------------- issue 19, 4: Ray not reachable

@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:1", "--ray 127.0.0.1:1: cannot reach 127.0.0.1:1 (Connection refused)"),
    ("ray://nosuchhost.invalid:10001", "--ray ray://nosuchhost.invalid:10001: no such host "
     "'nosuchhost.invalid'"),
    ("::not an address::", "--ray '::not an address::' is not an address; expected HOST:PORT, "
     "ray://HOST:PORT or auto"),
], ids=["refused", "no-such-host", "not-an-address"])
def test_a_ray_head_that_cannot_be_reached_fails_first_and_fast(address, message, tmp_path,
                                                                 monkeypatch, capsys):
    pytest.importorskip("ray")

    def no_data(*_a, **_k):
        raise AssertionError("data was prepared before --ray was checked")

    monkeypatch.setattr("fastres.study.data.prepare", no_data)
    t0 = time.monotonic()
    assert main(args(NO_DATA, tmp_path / "r", "--ray", address)) == 2
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_sigterm_of_a_ray_driver_is_the_usual_interrupt(tiny_betons, tmp_path):
    """ray.init put its own SIGTERM handler (sys.exit) in place of the grid's: exit 15 or
    Ray's C++ abort (134), leases held. Now: "interrupted; rerun to resume", 143, released."""
    pytest.importorskip("ray")
    results = tmp_path / "r"
    p = spawn([a for a in args(tiny_betons, results, "--augment", "on,off", "--epochs", "50",
                               "--workers", "2", "--array", "off") if a != "--quiet"])
    out = []
    try:
        for line in p.stdout:
            out.append(line)
            if line.startswith("[grid] Ray:"):  # ray.init has returned
                p.send_signal(signal.SIGTERM)
                break
        rest, _ = p.communicate(timeout=120)
    finally:
        p.kill()
    out = "".join(out) + rest
    assert p.returncode == 143, out
    assert "interrupted; rerun to resume" in out and "Traceback" not in out
    assert [r[4] for r in runs(results)] == [None, None]  # no lease left held
