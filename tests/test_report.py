"""Reports: Tables 3/4 analogs against the paper, partial grids, formats and figures."""

import contextlib
import csv
import io
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from fastres.grid.command import main as grid_main
from fastres.grid.plan import register
from fastres.report.command import main
from fastres.run.cell import Cell, GridProtocol
from fastres.run.records import EpochMetrics, RunResult, best_of
from fastres.run.results import ResultsDB, new_owner
from fastres.study.structures import STRUCTURES

from .test_grid import grid_args, grid_data  # noqa: F401  (module fixture)

PNG = b"\x89PNG\r\n\x1a\n"


def record(db: ResultsDB, cell: Cell, protocol: GridProtocol, accs: list[float] | None) -> str:
    """A run through the store's real API; accs=None leaves it registered but not run."""
    rid = register(db, cell, protocol, "test")
    if accs is None:
        return rid
    owner = new_owner()
    assert db.acquire(rid, owner) == "acquired"
    ckpt = db.folder / "checkpoints" / rid / "epoch.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(b"")
    eps = [EpochMetrics(i + 1, 0.1, 1.0, a, 2.0 - a, a, 1.0) for i, a in enumerate(accs)]
    for m in eps:
        db.commit_epoch(rid, owner, m, ckpt, "0")
    db.finish(rid, owner, RunResult({}, "completed", eps, *best_of(eps), None, {}, {}))
    return rid


@pytest.fixture
def paper_like(tmp_path):
    """Structure 1 with three optimizers finished (one missing), augmentation on and off, and
    the Figure 7 and 8 variants, on a 3-epoch protocol."""
    db = ResultsDB(tmp_path / "runs")
    p = GridProtocol(epochs=3, data="d", data_kind="test")
    s1 = STRUCTURES[1]
    for aug in (True, False):
        record(db, Cell(s1, 1, "sgd", aug), p, [0.5, 0.9510, 0.94])
        record(db, Cell(s1, 1, "adam", aug), p, [0.80, 0.85, 0.93])
        record(db, Cell(s1, 1, "adagrad", aug), p, None)  # still pending
    record(db, Cell(s1, 1, "sgd", True, normalize=False), p, [0.4, 0.6, 0.7])
    record(db, Cell(s1, 1, "sgd", False, normalize=False), p, [0.3, 0.5, 0.6])
    for tmax in (0, 100, 300):
        record(db, Cell(s1, 1, "sgd", True, tmax=tmax), p, [0.2, 0.4, 0.6])
    db.close()
    return tmp_path / "runs"


def test_markdown_tables_against_the_paper(paper_like, capsys):
    assert main(["--results", str(paper_like), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "Table 3 analog: best test accuracy (%), augmentation on, T_max 200" in out
    assert "95.10 (95.03, +0.07)" in out  # ours, paper (Table 3), difference
    assert "93.00 (93.10, -0.10)" in out  # adam, augmented
    assert "missing (pending 0/3) (paper 92.56)" in out  # the partial cell is marked
    # Row average over what finished, beside the paper's mean over the same two optimizers.
    assert f"94.05* ({(93.10 + 95.03) / 2:.2f})" in out
    assert "2 (212, -210)" in out  # Table 4: best epoch 2 against the paper's 212
    assert "T_max 100" in out and "7/10 runs finished" not in out


def test_csv_and_json(paper_like, capsys):
    assert main(["--results", str(paper_like), "--no-figures", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    sgd = [r for r in rows if r["optimizer"] == "sgd" and r["augment"] == "True"
           and r["tmax"] == "200"]
    assert len(sgd) == 1 and float(sgd[0]["best_acc"]) == pytest.approx(95.10)
    assert float(sgd[0]["paper_acc"]) == 95.03 and sgd[0]["paper_epoch"] == "212"
    assert main(["--results", str(paper_like), "--no-figures", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    pending = [c for c in data["cells"] if c["optimizer"] == "adagrad"]
    assert len(pending) == 2 and all(c["best_acc"] is None for c in pending)


def test_figures_are_written(paper_like, tmp_path, capsys):
    figs = tmp_path / "figs"
    assert main(["--results", str(paper_like), "--figures", str(figs)]) == 0
    out = capsys.readouterr().out
    for name in ("fig5_optimizers_augmented", "fig6_optimizers_not_augmented",
                 "fig7_augment_normalize", "fig8_tmax"):
        png = figs / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
        assert f"{name}: {png}" in out


def test_report_on_a_real_tiny_grid(grid_data, tmp_path, capsys):  # noqa: F811
    results = tmp_path / "r"
    assert grid_main(grid_args(grid_data, results, "--epochs", "2", "--quiet")) == 0
    capsys.readouterr()
    assert main(["--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "4/4 runs finished" in out and "| [N=2 B=1,1 C_in=8" in out
    assert (results / "figures" / "fig5_optimizers_augmented.png").stat().st_size > 10_000


def test_protocols_are_not_mixed(tmp_path, capsys):
    db = ResultsDB(tmp_path / "runs")
    s1 = STRUCTURES[1]
    record(db, Cell(s1, 1, "sgd"), GridProtocol(epochs=3, data="d"), [0.5, 0.6, 0.7])
    record(db, Cell(s1, 1, "adam"), GridProtocol(epochs=3, data="d"), [0.5, 0.6, 0.7])
    other = GridProtocol(epochs=2, data="d")
    record(db, Cell(s1, 1, "sgd"), other, [0.1, 0.2])
    db.close()
    assert main(["--results", str(tmp_path / "runs"), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "3 epochs" in out and f"other protocols in this folder (not mixed in): {other.id}" in out
    assert "70.00" in out and "20.00" not in out
    assert main(["--results", str(tmp_path / "runs"), "--no-figures", "--protocol",
                 other.id]) == 0
    assert "20.00" in capsys.readouterr().out


def test_report_errors(tmp_path, capsys):
    assert main(["--results", str(tmp_path / "nothing")]) == 2
    assert "holds no fastres results" in capsys.readouterr().err
    ResultsDB(tmp_path / "empty").close()
    assert main(["--results", str(tmp_path / "empty")]) == 2
    assert "holds no runs yet" in capsys.readouterr().err


@contextlib.contextmanager
def read_only(folder: Path):
    """The folder and everything in it made read-only, for root too: chmod, and as root the
    immutable attribute (chattr +i); skips where neither stops a write here."""
    entries = [folder, *folder.rglob("*")]
    modes = {p: p.stat().st_mode for p in entries}
    for p in entries:
        p.chmod(0o555 if p.is_dir() else 0o444)
    immutable = os.geteuid() == 0 and subprocess.run(
        ["chattr", "-R", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        try:
            (folder / "probe").touch()
        except OSError:
            yield
        else:
            (folder / "probe").unlink()
            pytest.skip("cannot make a folder read-only here (root without chattr +i)")
    finally:
        if immutable:
            subprocess.run(["chattr", "-R", "-i", str(folder)], check=True)
        for p, mode in modes.items():
            p.chmod(mode)


def snapshot(folder: Path) -> dict[str, tuple]:
    """Each entry's size and mtime, the folders' included: a file written, created or deleted
    (even created and deleted again) changes it."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in [folder, *folder.rglob("*")]}


def test_report_on_a_read_only_results_folder(paper_like, tmp_path, capsys):
    figs = tmp_path / "figs"
    with read_only(paper_like):
        before = snapshot(paper_like)
        assert main(["--results", str(paper_like), "--no-figures"]) == 0
        assert "95.10 (95.03, +0.07)" in capsys.readouterr().out
        assert main(["--results", str(paper_like)]) == 0  # its default figures folder
        out = capsys.readouterr().out
        assert "figures: not written" in out and "--figures DIR" in out
        assert "95.10 (95.03, +0.07)" in out
        assert main(["--results", str(paper_like), "--figures", str(figs)]) == 0
        assert (figs / "fig5_optimizers_augmented.png").read_bytes()[:8] == PNG
        assert snapshot(paper_like) == before


def test_report_reads_a_live_grid_read_only(paper_like, capsys):
    """With a grid writing (its WAL not yet checkpointed), a report sees its commits through
    SQLite's mode=ro, and its connection cannot write."""
    writer = ResultsDB(paper_like)
    record(writer, Cell(STRUCTURES[1], 1, "nesterov"), GridProtocol(epochs=3, data="d",
                                                                 data_kind="test"),
           [0.5, 0.6, 0.7])
    reader = ResultsDB(paper_like, readonly=True)
    try:
        assert "nesterov" in {r["optimizer"] for r in reader.runs()}
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.conn.execute("DELETE FROM runs")
        assert main(["--results", str(paper_like), "--no-figures"]) == 0
        assert "70.00 (95.02, -25.02)" in capsys.readouterr().out  # nesterov, augmented
    finally:
        reader.close()
        writer.close()


@pytest.mark.parametrize("structure, message", [
    ("99", "--structure 99: there is no such Table 1 structure (1..9); the results hold 1"),
    ("6", "--structure 6: no runs of it in these results; the results hold 1"),
], ids=["no-such-structure", "not-in-the-results"])
def test_a_structure_the_results_lack_is_said(structure, message, paper_like, tmp_path, capsys):
    """Issue 19: never four figures "skipped" for a structure that is not there."""
    figs = tmp_path / "figs"
    assert main(["--results", str(paper_like), "--figures", str(figs),
                 "--structure", structure]) == 2
    assert message in capsys.readouterr().err
    assert not figs.exists()


def test_report_flags_an_export_would_drop_are_refused(paper_like, tmp_path, capsys):
    """Issue 19: --out with --tensorboard wrote no report, without a word."""
    assert main(["--results", str(paper_like), "--tensorboard", str(tmp_path / "tb"),
                 "--out", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err
    assert "--tensorboard only exports event files; --out belongs to a report" in err
    assert not (tmp_path / "tb").exists() and not (tmp_path / "r.md").exists()
