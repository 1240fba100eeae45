"""The grid's live display on a terminal: one line per run in flight, totals and the ETA.

A rich Live table redrawn a few times a second; lines printed meanwhile (a cell finished, a
warning) scroll above it. Used only when standard output is a terminal and --quiet is off, so
logs and CI keep their plain lines.
"""

from __future__ import annotations

import io
import os
import socket
import sqlite3
import threading
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text


def use_live(stream: TextIO, quiet: bool) -> bool:
    """The live display only where someone watches: a terminal, and not --quiet."""
    isatty = getattr(stream, "isatty", None)
    return not quiet and bool(isatty and isatty())


def worker_name(lease_owner: str | None) -> str:
    """host:pid of a lease owner (host:pid:nonce)."""
    return ":".join((lease_owner or "?").split(":")[:2])


def last_epochs(conn: sqlite3.Connection, run_ids: list[str]) -> dict[str, tuple[float, float]]:
    """(test accuracy, seconds) of each run's last committed epoch, for runs other processes
    train (Ray workers): the runs table holds only the count."""
    if not run_ids:
        return {}
    marks = ", ".join("?" for _ in run_ids)
    rows = conn.execute(
        f"SELECT e.run_id, e.test_acc, e.seconds FROM epochs e JOIN (SELECT run_id, "
        f"MAX(epoch) AS last FROM epochs WHERE run_id IN ({marks}) GROUP BY run_id) m "
        "ON e.run_id = m.run_id AND e.epoch = m.last", run_ids).fetchall()
    return {r[0]: (float("nan") if r[1] is None else r[1], r[2]) for r in rows}


@dataclass
class ActiveRun:
    label: str
    epochs: int
    worker: str
    epoch: int = 0
    test_acc: float | None = None
    seconds: float | None = None


class LiveBoard:
    """What the display shows. Updated from the grid's thread, drawn from rich's (a lock)."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.runs: dict[str, ActiveRun] = {}
        self.totals = ""
        self._lock = threading.Lock()
        self._live: Live | None = None

    def begin(self, rid: str, label: str, epochs: int, worker: str, epoch: int = 0) -> None:
        with self._lock:
            self.runs.setdefault(rid, ActiveRun(label, epochs, worker, epoch))

    def update(self, rid: str, epoch: int, test_acc: float | None, seconds: float | None,
               worker: str | None = None) -> None:
        with self._lock:
            r = self.runs.get(rid)
            if r is None:
                return
            r.epoch, r.test_acc, r.seconds = epoch, test_acc, seconds
            if worker:
                r.worker = worker

    def end(self, rid: str) -> None:
        with self._lock:
            self.runs.pop(rid, None)

    def set_totals(self, text: str) -> None:
        """The totals line; also redraws now (called after every change), not at the next tick."""
        with self._lock:
            self.totals = text
        if self._live is not None:
            self._live.refresh()

    def render(self, height: int | None = None, width: int | None = None) -> Group:
        """The table of runs in flight and the totals line, within `height` x `width` (the
        console's): one line per run, labels and workers cut with an ellipsis in a narrow
        terminal, and runs past the height counted in one row, so the totals and ETA always
        show."""
        height = height or self.console.size.height
        width = width or self.console.size.width
        with self._lock:
            runs = list(self.runs.values())
            # The figures keep their width (rich would shrink every column alike); the worker,
            # then the label, give way. 14: the borders and the cells' padding; 22: the figures.
            room_w = width - 14 - 22
            idle = "(no run in flight)"
            label_w = max(12, min(max((len(r.label) for r in runs), default=len(idle)),
                                  room_w - 6))
            worker_w = max(6, min(24, room_w - label_w))
            table = Table(expand=False, header_style="bold", pad_edge=False)
            table.add_column("run", no_wrap=True, max_width=label_w)
            table.add_column("epoch", justify="right", no_wrap=True, min_width=7)
            table.add_column("test acc", justify="right", no_wrap=True, min_width=8)
            table.add_column("s/epoch", justify="right", no_wrap=True, min_width=7)
            table.add_column("worker", no_wrap=True, overflow="ellipsis", max_width=worker_w)
            room = max(1, height - 6)  # header and borders (4), totals (1), the cursor's line
            shown = runs if len(runs) <= room else runs[:room - 1]
            for r in shown:
                # Cut from the left: the runs of an array differ in the label's end (optimizer,
                # augmentation, seed), not in the structure it begins with.
                label = r.label if len(r.label) <= label_w else "…" + r.label[1 - label_w:]
                table.add_row(
                    label, f"{r.epoch}/{r.epochs}",
                    "—" if r.test_acc is None else f"{100 * r.test_acc:.2f}%",
                    "—" if r.seconds is None else f"{r.seconds:.1f}", r.worker)
            if len(shown) < len(runs):
                table.add_row(f"+{len(runs) - len(shown)} more", "", "", "", "")
            if not runs:
                table.add_row(idle, "", "", "", "")
            totals = self.totals
        return Group(table, Text(totals, style="bold"))

    def __enter__(self) -> LiveBoard:
        # transient: the table goes when the grid ends; the lines printed above it stay.
        self._live = Live(get_renderable=self.render, console=self.console,
                          refresh_per_second=4, transient=True, redirect_stdout=True,
                          redirect_stderr=True)
        self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None


def local_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def render_text(board: LiveBoard, width: int = 120, height: int = 50) -> str:
    """The board as a terminal of `width` x `height` shows it, without colour codes."""
    buf = io.StringIO()
    Console(file=buf, force_terminal=True, width=width, height=height,
            color_system=None).print(board.render(height, width))
    return buf.getvalue()

