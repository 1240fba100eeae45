"""Running a grid's cells: leasing each cell (or an array of cells of one structure) in the
store, training it (fastres.run.train, fastres.run.train_array), recording its outcome, and the
progress display with its ETA; on this machine's devices (run_local) or through Ray (run_ray).
fastres.grid.command decides what to run and calls these.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastres.grid.live import LiveBoard
from fastres.grid.plan import (
    GridError,
    fmt_time,
)
from fastres.run.cell import Cell, GridProtocol
from fastres.run.config import (
    device_or_default,
)
from fastres.run.records import EpochMetrics
from fastres.run.signals import Interrupted
from fastres.study.data import (
    BetonPair,
)

if TYPE_CHECKING:
    from fastres.report.tensorboard import TensorBoardExport

class Progress:
    """One display for the whole grid: cells done of total, current cell and epoch, and an ETA
    from the measured seconds per FLOP so far (so big and small structures mix fairly).

    Plain lines by default; with a LiveBoard (a terminal) a table of the runs in flight instead
    of the epoch lines. With a TensorBoardExport, the event files follow every committed epoch.
    As a context manager it shows the board and closes the export at the end."""

    def __init__(self, cells: list[Cell], ids: list[str], flop: dict[str, float],
                 epochs_done: dict[str, int], done: set[str], epochs: int, workers: int,
                 quiet: bool, board: LiveBoard | None = None,
                 tensorboard: TensorBoardExport | None = None, worker: str = ""):
        self.labels = {i: c.label for i, c in zip(ids, cells, strict=True)}
        self.flop, self.epochs_done, self.done = flop, epochs_done, done
        self.epochs, self.workers, self.quiet = epochs, workers, quiet
        self.failed: set[str] = set()
        self.seconds = 0.0
        self.flop_seen = 0.0
        self.board, self.tensorboard, self.worker = board, tensorboard, worker

    def __enter__(self) -> Progress:
        if self.board is not None:
            self.board.set_totals(self.totals())
            self.board.__enter__()
        self.export()  # what the store holds already
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.board is not None:
                self.board.__exit__(*exc)
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
                self.tensorboard = None

    def totals(self) -> str:
        running = len(self.board.runs) if self.board is not None else 0
        epochs = sum(self.epochs_done.values())
        return (f"{len(self.done)}/{len(self.labels)} cells done"
                + (f", {len(self.failed)} failed" if self.failed else "")
                + f", {running} running | epochs {epochs}/{self.epochs * len(self.labels)} | "
                + self.eta())

    def start(self, rid: str, worker: str | None = None) -> None:
        """A run begins: the live display shows it from now on."""
        if self.board is not None:
            self.board.begin(rid, self.labels[rid], self.epochs, worker or self.worker,
                             self.epochs_done[rid])
            self.board.set_totals(self.totals())

    def export(self) -> None:
        """Bring the TensorBoard folder up to date; a failure there stops the export with a
        warning, never the grid."""
        if self.tensorboard is None:
            return
        from fastres.run.results import ResultsError

        try:
            self.tensorboard.update()
        except (OSError, sqlite3.Error, ResultsError) as e:
            print(f"[grid] warning: TensorBoard export stopped ({e}); export later with "
                  f"python -m fastres.report --tensorboard {self.tensorboard.out}",
                  file=sys.stderr, flush=True)
            self.tensorboard.close()
            self.tensorboard = None

    def eta(self) -> str:
        if not self.flop_seen:
            return "ETA --"
        left = sum(self.flop[i] * (self.epochs - self.epochs_done[i])
                   for i in self.labels if i not in self.done and i not in self.failed)
        return f"ETA {fmt_time(left * self.seconds / self.flop_seen / self.workers)}"

    def head(self) -> str:
        return f"[{len(self.done)}/{len(self.labels)} {self.eta()}]"

    def epoch(self, rid: str, m: EpochMetrics) -> None:
        self.seconds += m.seconds
        self.flop_seen += self.flop[rid]
        self.epochs_done[rid] = m.epoch
        if self.board is not None:
            self.start(rid)  # shown already unless it began elsewhere (a Ray worker)
            self.board.update(rid, m.epoch, m.test_acc, m.seconds)
            self.board.set_totals(self.totals())
        elif not self.quiet:
            print(f"{self.head()} {self.labels[rid]}: epoch {m.epoch}/{self.epochs} "
                  f"test acc {100 * m.test_acc:.2f}% loss {m.test_loss:.4f} ({m.seconds:.1f}s)",
                  flush=True)
        self.export()

    def poll(self, rows: list[dict]) -> None:
        """Progress of runs in other processes (Ray workers), read from the results database."""
        self.seconds = self.flop_seen = 0.0
        for r in rows:
            if r["run_id"] not in self.labels:
                continue
            rid, n = r["run_id"], r["epochs_done"]
            self.seconds += r["train_seconds"]
            self.flop_seen += self.flop[rid] * n
            if n > self.epochs_done[rid] and not self.quiet:
                print(f"{self.head()} {self.labels[rid]}: epoch {n}/{self.epochs}", flush=True)
            self.epochs_done[rid] = n

    def cell(self, rid: str, outcome: str, detail: str = "") -> None:
        if outcome in ("completed", "diverged", "done"):
            self.done.add(rid)
        elif outcome == "failed":
            self.failed.add(rid)
        if self.board is not None:
            self.board.end(rid)
            self.board.set_totals(self.totals())
        self.export()  # a finished run's best accuracy and end
        if outcome != "busy":
            print(f"{self.head()} {self.labels[rid]}: {detail or outcome}", flush=True,
                  file=sys.stderr if outcome == "failed" else sys.stdout)


@dataclass
class Job:
    """Everything a worker needs to run one cell (picklable, for Ray)."""

    cell: Cell
    protocol: GridProtocol
    run_id: str
    results: str
    data: BetonPair
    compute: dict  # config.compute_settings: device, precision, kernels, placement, ...
    max_attempts: int
    quiet: bool


RETRY_HINT = "rerun with --retry-failed to try it again"


def failed_detail(row: dict, max_attempts: int) -> str:
    """What a failed cell's line says: the attempts, the last error, and what a rerun does."""
    n = row["attempts"]
    then = (RETRY_HINT if n >= max_attempts
            else f"a rerun tries it again ({max_attempts - n} attempt(s) left)")
    return f"failed after {n} attempt{'s' if n != 1 else ''}: {row['error']}; {then}"


def run_unit(jobs: list[Job], on_epoch=None) -> list[tuple[str, str, str]]:
    """Lease the cells of one unit (one cell, or an array of cells of one spec and protocol),
    train those it got (one alone through fastres.run.train, several as one run array through
    fastres.run.train_array) and record each. Returns (run_id, outcome, detail) per cell: outcome
    'completed', 'diverged', 'failed' (detail: why), 'done' (finished before), 'busy' (another
    live process has it), or 'split' for the cells of an array that ran out of device memory
    (given back unfinished, their attempts not counted: the caller retries them in halves).
    A full disk (DiskFull) or a signal (Interrupted) gives the runs back unfinished, their
    attempts not counted, and is raised: the grid stops."""
    import contextlib

    import torch

    from fastres.run.results import (
        DiskFull,
        Heartbeat,
        LeaseLost,
        ResultsDB,
        ResultsError,
        RunCheckpointer,
        StoreLocked,
        new_owner,
    )
    from fastres.run.train import train
    from fastres.run.train_array import train_array
    from fastres.run.workbench import for_device

    db = ResultsDB(jobs[0].results)
    owner = new_owner()
    out: dict[str, tuple[str, str]] = {}
    acquired: list[Job] = []
    try:
        for job in jobs:
            got = db.acquire(job.run_id, owner, max_attempts=job.max_attempts)
            if got == "acquired":
                acquired.append(job)
            elif got == "failed":  # at the retry cap: failed, never "done"
                out[job.run_id] = got, failed_detail(db.run(job.run_id), job.max_attempts)
            else:
                out[job.run_id] = got, ""
        if acquired:
            quiet = acquired[0].quiet

            def quiet_epochs(message: str) -> None:  # epoch lines are the grid's to show
                if not quiet and not message.startswith("epoch"):
                    print(message, flush=True)

            def warn(message: str) -> None:  # printed even when quiet
                print(message, file=sys.stderr, flush=True)

            cfgs = [j.cell.config(j.protocol, j.compute) for j in acquired]
            stores = [RunCheckpointer(db, j.run_id, owner, warn) for j in acquired]
            # The process's workbench: data resident and engines warm across its cells.
            bench = for_device(device_or_default(cfgs[0].device))
            with contextlib.ExitStack() as stack:
                beats = [stack.enter_context(Heartbeat(db.folder, j.run_id, owner))
                         for j in acquired]
                results: list = []  # empty after an error that ended the unit (recorded here)
                try:
                    if len(acquired) == 1:
                        rid = acquired[0].run_id
                        try:
                            results = [train(cfgs[0], data=acquired[0].data, bench=bench,
                                             on_epoch=None if on_epoch is None else
                                             (lambda m: on_epoch(rid, m)),
                                             log=quiet_epochs, checkpoint=stores[0])]
                        except LeaseLost as e:
                            results = [e]
                    else:
                        results = train_array(
                            cfgs, data=acquired[0].data, log=quiet_epochs, bench=bench,
                            on_epoch=None if on_epoch is None else
                            (lambda i, m: on_epoch(acquired[i].run_id, m)),
                            # A run's own I/O (its checkpoint folder, say) fails that run
                            # alone; a full disk (DiskFull, not an OSError) stops them all.
                            checkpoints=stores, isolate=(LeaseLost, OSError))
                except (DiskFull, StoreLocked):
                    raise  # every other cell would fail the same way
                except Exception as e:  # the grid goes on; the error is recorded with each run
                    split = isinstance(e, torch.cuda.OutOfMemoryError) and len(acquired) > 1
                    if split:
                        print(f"[grid] an array of {len(acquired)} runs ran out of device "
                              f"memory ({str(e).splitlines()[0]}); splitting it",
                              file=sys.stderr, flush=True)
                    for j in acquired:
                        if split:
                            db.release(j.run_id, owner)
                            out[j.run_id] = "split", ""
                        else:
                            db.fail(j.run_id, owner, f"{type(e).__name__}: {e}")
                            out[j.run_id] = "failed", failed_detail(db.run(j.run_id),
                                                                    j.max_attempts)
            for j, beat, result in zip(acquired, beats, results, strict=False):
                if isinstance(result, LeaseLost) or beat.lost:
                    out[j.run_id] = "busy", ""
                elif isinstance(result, BaseException):
                    db.fail(j.run_id, owner, f"{type(result).__name__}: {result}")
                    out[j.run_id] = "failed", failed_detail(db.run(j.run_id), j.max_attempts)
                else:
                    db.finish(j.run_id, owner, result)
                    out[j.run_id] = result.status, ""
        return [(j.run_id, *out[j.run_id]) for j in jobs]
    except (KeyboardInterrupt, DiskFull, StoreLocked):  # Interrupted is a KeyboardInterrupt
        for j in acquired:
            try:
                db.release(j.run_id, owner)  # a no-op unless this owner holds the lease
            except (sqlite3.Error, ResultsError):
                pass  # the lease of a dead owner is taken over by the next grid anyway
        raise
    finally:
        db.close()


def array_units(jobs: list[Job], sizes: dict[str, int]) -> list[list[Job]]:
    """The cells as units of work: runs of one spec and protocol (the grid's cells share the
    protocol) in arrays of at most sizes[str(spec)] (1 where absent), in plan order; size 1
    is one cell per unit."""
    groups: dict[str, list[Job]] = {}
    for j in jobs:
        groups.setdefault(str(j.cell.spec), []).append(j)
    units = []
    for spec, group in groups.items():
        # As few arrays as the size allows, of near-equal sizes.
        n = -(-len(group) // max(1, sizes.get(spec, 1)))
        units.extend(group[i * len(group) // n:(i + 1) * len(group) // n] for i in range(n))
    return units


def run_local(jobs: list[Job], progress: Progress, poll: float = 2.0,
              sizes: dict[str, int] | None = None) -> None:
    """In this process, one unit after another: a cell, or an array of up to sizes[str(spec)]
    cells of one structure (see array_units); cells another process holds are revisited after
    each pass until their owner finishes them (or dies and they are taken over). An array
    that runs out of device memory is split in two and retried."""
    sizes = sizes or {}
    pending = array_units(jobs, sizes)
    while pending:
        busy: list[Job] = []
        queue = list(pending)
        while queue:
            unit = queue.pop(0)
            for job in unit:
                progress.start(job.run_id)
            outcomes = run_unit(unit, on_epoch=progress.epoch)
            if any(o == "split" for _, o, _ in outcomes):
                half = len(unit) // 2
                queue[:0] = [unit[:half], unit[half:]]
                continue
            for job, (rid, outcome, detail) in zip(unit, outcomes, strict=True):
                progress.cell(rid, outcome, detail)
                if outcome == "busy":
                    busy.append(job)
        pending = array_units(busy, sizes)
        if pending:
            time.sleep(poll)


def run_ray(jobs: list[Job], progress: Progress, workers: int | None, runs_per_gpu: int,
            address: str | None, max_retries: int, sizes: dict[str, int] | None = None
            ) -> None:
    """Cells as Ray tasks (a local cluster unless --ray ADDRESS), each on 1/runs_per_gpu GPU;
    with sizes (see array_units), an array of cells of one structure is one task.
    Only this process (the driver) opens the results folder; tasks report epochs and
    checkpoints back through Ray. A task whose worker or node dies is retried by Ray up to
    max_retries times and resumes from its last committed checkpoint (fastres/grid/cluster.py)."""
    try:
        import ray
    except ImportError:
        raise GridError("--workers > 1 and --ray need Ray: pip install 'fastres[cluster]'"
                        ) from None
    from fastres.grid.cluster import RayCell, run_cells

    # ray.init replaces the SIGTERM handler with sys.exit (exit 15, or Ray's C++ abort at
    # shutdown): the grid's own (stop, give the runs back, "interrupted", 143) is put back, and
    # a SIGTERM during ray.init itself reads as one.
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if address:
            ray.init(address=address, log_to_driver=not progress.quiet)
        else:
            import torch

            gpus = torch.cuda.device_count()
            # address="local": a Ray of our own, even where another cluster runs on this
            # machine (`ray start` leaves an address that a bare ray.init() would join, then
            # refuse num_cpus).
            ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=gpus,
                     include_dashboard=False, log_to_driver=not progress.quiet)
    except SystemExit as e:
        if e.code != signal.SIGTERM:
            raise
        ray.shutdown()
        raise Interrupted(signal.SIGTERM) from None
    finally:
        if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        if workers is None:
            workers = max(1, gpus * runs_per_gpu) if gpus else 1
        threads = max(1, min(cpus // workers, cpus))
        print(f"[grid] Ray: {workers} worker(s) over {gpus} GPU(s), {cpus} CPU(s)", flush=True)
        # One Ray task per unit: a cell, or an array of cells of one structure.
        units = [[RayCell(j.run_id, j.cell.label, j.cell.config(j.protocol, j.compute),
                          j.data, j.max_attempts, j.quiet) for j in unit]
                 for unit in array_units(jobs, sizes or {})]
        run_cells(units, jobs[0].results, progress, workers, threads,
                  (1 / runs_per_gpu) if gpus else 0, max_retries, failed_detail)
    finally:
        ray.shutdown()
