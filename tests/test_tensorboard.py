"""TensorBoard export: every value read back equals the store's, and a second export adds only
what is new (never a second copy of an epoch)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.plugins.hparams import metadata

from fastres.grid.command import main as grid_main
from fastres.grid.plan import register
from fastres.report.command import main as report_main
from fastres.report.tensorboard import INDEX, ExportBusy, TensorBoardExport, export
from fastres.run.cell import Cell, GridProtocol
from fastres.run.records import EpochMetrics, RunResult, best_of
from fastres.run.results import ResultsDB, new_owner
from fastres.study.structures import STRUCTURES

from .test_grid import grid_args, grid_data  # noqa: F401  (module fixture)

# What each tag must hold, written out here rather than taken from the module under test.
TAGS = {"loss/train": "train_loss", "loss/test": "test_loss", "accuracy/train": "train_acc",
        "accuracy/test": "test_acc", "learning_rate": "lr", "seconds_per_epoch": "seconds"}


def epochs_of(seed: int, first: int, n: int) -> list[EpochMetrics]:
    """Made-up but varied metrics (fixed seed), with a diverged NaN where asked."""
    rng = np.random.default_rng(seed)
    return [EpochMetrics(e, float(rng.uniform(0.01, 0.1)), float(rng.uniform(0.5, 2)),
                         float(rng.uniform(0.1, 0.9)), float(rng.uniform(0.5, 2)),
                         float(rng.uniform(0.1, 0.9)), float(rng.uniform(0.5, 3)))
            for e in range(first, first + n)]


class Writer:
    """Runs written through the store's real API."""

    def __init__(self, folder: Path):
        self.db = ResultsDB(folder)
        self.protocol = GridProtocol(epochs=6, data="d", data_kind="test")
        self.owner = new_owner()

    def start(self, cell: Cell) -> str:
        rid = register(self.db, cell, self.protocol, "test")
        assert self.db.acquire(rid, self.owner) == "acquired"
        return rid

    def epochs(self, rid: str, eps: list[EpochMetrics]) -> None:
        ckpt = self.db.folder / "checkpoints" / rid / "epoch.pt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_bytes(b"")
        for m in eps:
            self.db.commit_epoch(rid, self.owner, m, ckpt, "0")

    def finish(self, rid: str, status: str = "completed") -> None:
        eps = self.db.epochs(rid)
        self.db.finish(rid, self.owner, RunResult({}, status, eps, *best_of(eps), None, {}, {}))


def raw_steps(folder: Path, tag: str) -> list[int]:
    """Every event of `tag` in a folder's files, duplicates included (EventAccumulator would
    purge an out-of-order repeat and hide it)."""
    return [ev.step for p in sorted(folder.glob("events.out.tfevents.*"))
            for ev in LegacyEventFileLoader(str(p)).Load()
            for v in ev.summary.value if v.tag == tag]


def check_against_store(tb: Path, results: Path) -> dict[str, EventAccumulator]:
    """Every exported scalar equals the store's value (as float32), each epoch exactly once,
    and each run's hparams are its own."""
    folders = json.loads((tb / INDEX).read_text())["runs"]
    db = ResultsDB(results, readonly=True)
    accs = {}
    try:
        runs = db.runs()
        assert set(folders) == {r["run_id"] for r in runs}
        for run in runs:
            folder = tb / folders[run["run_id"]]
            ea = EventAccumulator(str(folder), purge_orphaned_data=False)
            ea.Reload()
            rows = db.epochs(run["run_id"])
            for tag, col in TAGS.items():
                got = ea.Scalars(tag) if rows else []
                assert [s.step for s in got] == [m.epoch for m in rows], (folder.name, tag)
                assert raw_steps(folder, tag) == [m.epoch for m in rows], "duplicated epochs"
                for s, m in zip(got, rows, strict=True):
                    want = getattr(m, col)
                    if math.isnan(want):
                        assert math.isnan(s.value), (folder.name, tag, s.step)
                    else:
                        assert s.value == pytest.approx(want, rel=1e-6), (folder.name, tag)
            hp = ea.PluginTagToContent(metadata.PLUGIN_NAME)
            start = metadata.parse_session_start_info_plugin_data(
                hp[metadata.SESSION_START_INFO_TAG])
            assert start.hparams["optimizer"].string_value == run["optimizer"]
            assert start.hparams["structure"].string_value == (
                str(run["structure"]) if run["structure"] else "custom")
            assert start.hparams["augment"].bool_value == bool(run["augment"])
            assert start.hparams["tmax"].number_value == run["tmax"]
            assert start.hparams["protocol"].string_value == run["protocol_id"]
            assert start.hparams["opt.lr"].number_value == pytest.approx(
                json.loads(run["optimizer_settings"])["lr"])
            finished = run["status"] in ("completed", "diverged")
            assert (metadata.SESSION_END_INFO_TAG in hp) == finished
            if finished and run["best_epoch"] is not None:
                best = ea.Scalars("best/test_accuracy")
                assert [(b.step, b.value) for b in best] == [
                    (run["best_epoch"], pytest.approx(run["best_acc"], rel=1e-6))]
            accs[folders[run["run_id"]]] = ea
    finally:
        db.close()
    return accs


def test_export_matches_the_store_and_a_second_export_adds_only_new_epochs(tmp_path):
    results, tb = tmp_path / "runs", tmp_path / "tb"
    w = Writer(results)
    s1 = STRUCTURES[1]
    done = w.start(Cell(s1, 1, "sgd", True))
    w.epochs(done, epochs_of(1, 1, 6))
    w.finish(done)
    running = w.start(Cell(s1, 1, "adam", False, tmax=100))
    w.epochs(running, epochs_of(2, 1, 3))
    diverged = w.start(Cell(STRUCTURES[6], 6, "adagrad", True))
    bad = epochs_of(3, 1, 2)
    bad[-1] = EpochMetrics(2, 0.01, math.nan, 0.1, math.inf, 0.1, 1.0)
    w.epochs(diverged, bad)
    w.finish(diverged, "diverged")
    w.start(Cell(s1, 1, "nesterov", True))  # registered, no epoch yet

    assert export(tb, results) == (4, 6 + 3 + 2)
    accs = check_against_store(tb, results)
    assert set(accs) == {"s1 sgd aug=on tmax=200 seed=0", "s1 adam aug=off tmax=100 seed=0",
                         "s6 adagrad aug=on tmax=200 seed=0", "s1 nesterov aug=on tmax=200 seed=0"}

    assert export(tb, results) == (4, 0)  # nothing new: nothing written
    w.epochs(running, epochs_of(4, 4, 2))  # the running run goes on
    assert export(tb, results) == (4, 2)
    check_against_store(tb, results)

    # A run restarted from epoch 1 (a corrupt checkpoint) and regrown past its old count: its
    # folder holds the new values only.
    w.db.reset(running, w.owner)
    w.epochs(running, epochs_of(5, 1, 6))
    assert export(tb, results) == (4, 6)
    check_against_store(tb, results)
    w.db.close()


def test_one_exporter_per_folder_and_read_only_results(tmp_path):
    results, tb = tmp_path / "runs", tmp_path / "tb"
    w = Writer(results)
    rid = w.start(Cell(STRUCTURES[2], 2, "sgd", True))
    w.epochs(rid, epochs_of(6, 1, 2))
    w.db.close()
    (results / "results.sqlite").chmod(0o444)  # the export only reads
    with TensorBoardExport(tb, results) as first:
        assert first.update() == 2
        with pytest.raises(ExportBusy, match="another process is exporting"):
            TensorBoardExport(tb, results)
    check_against_store(tb, results)


def test_report_cli_exports(tmp_path, capsys):
    results, tb = tmp_path / "runs", tmp_path / "tb"
    w = Writer(results)
    rid = w.start(Cell(STRUCTURES[3], 3, "adadelta", True))
    w.epochs(rid, epochs_of(7, 1, 4))
    w.finish(rid)
    w.db.close()
    assert report_main(["--results", str(results), "--tensorboard", str(tb)]) == 0
    assert "1 run(s), 4 new epoch(s)" in capsys.readouterr().out
    assert report_main(["--results", str(results), "--tensorboard", str(tb)]) == 0
    assert "1 run(s), 0 new epoch(s)" in capsys.readouterr().out
    check_against_store(tb, results)


def test_grid_keeps_tensorboard_current(grid_data, tmp_path):  # noqa: F811
    results, tb = tmp_path / "runs", tmp_path / "tb"
    args = grid_args(grid_data, results, "--optimizers", "sgd", "--augment", "on,off",
                     "--quiet", "--tensorboard", str(tb))
    assert grid_main(args) == 0
    accs = check_against_store(tb, results)
    assert len(accs) == 2
    assert all(len(ea.Scalars("accuracy/test")) == 2 for ea in accs.values())
    assert grid_main(args) == 0  # a rerun (nothing to train) writes nothing twice
    check_against_store(tb, results)
