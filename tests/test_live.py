"""The grid's live display: what it draws, when it is used, and plain lines everywhere else."""

import io
import os
import select
import subprocess
import sys

import pytest
from rich.console import Console

from fastres.grid.command import main
from fastres.grid.live import LiveBoard, render_text, use_live, worker_name
from fastres.grid.runner import Progress
from fastres.run.cell import Cell
from fastres.run.records import EpochMetrics
from fastres.study.structures import STRUCTURES

from .test_grid import ROOT, grid_args, grid_data  # noqa: F401  (module fixture)

BOX = ("┃", "━", "│", "─")  # rich's table rules: never in plain output


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_board_shows_each_run_in_flight_and_the_totals():
    board = LiveBoard(Console(file=io.StringIO(), force_terminal=True, width=140))
    board.begin("a", "s1 sgd aug=on tmax=200 seed=0", 500, "node1:4242")
    board.begin("b", "s6 adam aug=off tmax=200 seed=0", 500, "node2:77", epoch=40)
    board.update("a", 12, 0.81234, 3.44)
    board.set_totals("3/90 cells done, 2 running | epochs 1552/45000 | ETA 5h07m")
    text = render_text(board, width=140)
    lines = text.splitlines()
    a = next(line for line in lines if "s1 sgd aug=on" in line)
    assert "12/500" in a and "81.23%" in a and "3.4" in a and "node1:4242" in a
    b = next(line for line in lines if "s6 adam aug=off" in line)
    assert "40/500" in b and "—" in b and "node2:77" in b  # no epoch of it seen yet
    assert "s/epoch" in text and "worker" in text and "test acc" in text
    assert "3/90 cells done" in text and "ETA 5h07m" in text
    assert any(ch in text for ch in BOX)

    board.end("a")
    text = render_text(board, width=140)
    assert "s1 sgd" not in text and "s6 adam" in text
    board.end("b")
    assert "no run in flight" in render_text(board)


def test_progress_drives_the_board_instead_of_epoch_lines(capsys):
    cells = [Cell(STRUCTURES[1], 1, "sgd"), Cell(STRUCTURES[1], 1, "adam")]
    ids = ["r1", "r2"]
    board = LiveBoard(Console(file=io.StringIO(), force_terminal=True, width=140))
    p = Progress(cells, ids, {"r1": 1e12, "r2": 1e12}, {"r1": 0, "r2": 0}, set(), 4, 1,
                 quiet=False, board=board, worker="host:1")
    p.start("r1")
    assert "0/4" in render_text(board) and "ETA --" in render_text(board)
    p.epoch("r1", EpochMetrics(1, 0.1, 2.0, 0.3, 1.9, 0.35, 2.0))
    text = render_text(board)
    assert "1/4" in text and "35.00%" in text and "2.0" in text and "host:1" in text
    assert "0/2 cells done, 1 running | epochs 1/8 | ETA 0m14s" in text  # 7 epochs x 2 s
    assert capsys.readouterr().out == ""  # the board, not a line per epoch
    p.cell("r1", "completed")
    assert "s1 sgd" not in render_text(board) and "1/2 cells done" in render_text(board)
    assert "completed" in capsys.readouterr().out  # finished cells still get their line


def test_live_only_on_a_terminal_and_not_quiet():
    assert use_live(FakeTTY(), quiet=False)
    assert not use_live(FakeTTY(), quiet=True)
    assert not use_live(io.StringIO(), quiet=False)
    assert worker_name("node7:123:ab12cd34") == "node7:123"


def test_grid_not_on_a_terminal_prints_plain_lines(grid_data, tmp_path, capsys):  # noqa: F811
    assert main(grid_args(grid_data, tmp_path / "runs", "--optimizers", "sgd",
                          "--augment", "on")) == 0
    out = capsys.readouterr().out
    assert "epoch 1/2 test acc" in out and "epoch 2/2 test acc" in out
    assert not any(ch in out for ch in BOX) and "\x1b[" not in out


def read_pty(cmd: list[str], timeout: float = 240) -> tuple[int, str]:
    """Run with a pseudo-terminal as stdout and stderr; returns (exit code, all it wrote)."""
    master, slave = os.openpty()
    env = {**os.environ, "COLUMNS": "150", "LINES": "40", "TERM": "xterm-256color",
           "OMP_NUM_THREADS": "1"}
    env.pop("TQDM_DISABLE", None)
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=slave,
                         stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                p.kill()
                pytest.fail("the grid on a terminal wrote nothing for too long")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    return p.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def test_grid_on_a_terminal_shows_the_live_table(grid_data, tmp_path):  # noqa: F811
    code, out = read_pty([sys.executable, "-m", "fastres.grid",
                          *grid_args(grid_data, tmp_path / "runs", "--optimizers", "sgd",
                                     "--augment", "on")])
    assert code == 0, out
    assert "s/epoch" in out and "worker" in out and "cells done" in out  # the table was drawn
    assert any(ch in out for ch in BOX)
    assert "epoch 1/2 test acc" not in out  # no plain epoch lines under the table
    assert "1/1 cells finished" in out  # the closing lines are still printed


def test_a_small_terminal_keeps_one_line_per_run_and_the_totals():
    """Issue 19: in 60x20 each label wrapped to 5 lines and the totals/ETA line was cut."""
    board = LiveBoard()
    labels = [f"[N=2 B=1,1 C_in=8 F0=3 P0=1 F1=3 P1=1 K=1] sgd aug=on tmax=200 seed={i}"
              for i in range(30)]
    for i, label in enumerate(labels):
        board.begin(f"r{i}", label, 12, "a-rather-long-host-name:123456")
    totals = "0/30 cells done, 30 running | epochs 0/360 | ETA 1h05m"
    board.set_totals(totals)
    lines = render_text(board, width=60, height=20).splitlines()
    assert len(lines) <= 20 and max(len(line) for line in lines) <= 60
    assert lines[-1] == totals
    rows = [line for line in lines if "seed=" in line]
    assert len(rows) == 13  # one line each, cut at the left: the seed still shows
    assert all(f"seed={i} " in row and "…" in row for i, row in enumerate(rows))
    assert all(row.split("│")[2].strip() == "0/12" for row in rows)
    assert "+17 more" in "\n".join(lines)
