"""The study as one command: every cell of the grid, resumable, reported, over many workers.

    python -m fastres.grid                                   # the paper's 90 runs
    python -m fastres.grid --structures 1,6 --optimizers sgd,nesterov --augment on
    python -m fastres.grid --preset smoke --data synthetic   # seconds, no CIFAR-10 needed
    python -m fastres.grid --workers 4 --runs-per-gpu 2      # through a local Ray cluster

Results go to `--results DIR` (default ./runs): an SQLite database and checkpoints. Rerunning
the same command resumes; finished runs are skipped. See fastres/run/results.py for the guarantees.
A cell that failed --max-retries + 1 times stays failed (exit 1) until a rerun with
--retry-failed. Ctrl-C or SIGTERM stops at once and gives the run back (exit 130/143).

This module runs a plan (locally or through Ray); fastres/grid/plan.py makes it: cells, presets,
run ids and the selection flags.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastres.grid.live import LiveBoard, local_worker, use_live
from fastres.grid.plan import (
    PRESETS,
    GridError,
    Plan,
    effective_subset,
    epoch_flop,
    fmt_time,
    plan_from_args,
    print_plan,
    register,
)
from fastres.kernels.choice import KernelsUnavailable
from fastres.run.cell import Cell, GridProtocol
from fastres.run.config import (
    add_run_arguments,
    check_storable,
    compute_settings,
    device_or_default,
)
from fastres.run.records import EpochMetrics
from fastres.run.signals import Interrupted, stop_on_signals
from fastres.study.data import (
    SYNTHETIC,
    SYNTHETIC_WARNING,
    BetonPair,
    DataError,
    DataUnavailable,
    silence_conversion_bars,
)
from fastres.study.protocol import CIFAR_SIZES, OPTIMIZER_SETTINGS
from fastres.study.structures import SpecError

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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fastres.grid", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=tuple(PRESETS), default="paper")
    ap.add_argument("--structures", help="Table 1 structures, e.g. 1,6")
    ap.add_argument("--spec", action="append", help="a custom structure (repeatable)")
    ap.add_argument("--optimizers", help=f"from {','.join(OPTIMIZER_SETTINGS)}")
    ap.add_argument("--augment", help="on,off")
    ap.add_argument("--normalize", help="on,off")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--tmax", help="cosine T_max values, e.g. 0,100,200,300")
    ap.add_argument("--seeds", help="e.g. 0,1,2")
    ap.add_argument("--lr", type=float, help="override Table 2's rate for every cell")
    ap.add_argument("--results", default="runs", help="results folder (default ./runs)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--measure", action="store_true", help="with --dry-run: time a few steps "
                    "of each structure on the device and print how long the grid would take")
    ap.add_argument("--quiet", action="store_true", help="one line per cell, for logs")
    ap.add_argument("--workers", type=int, help="cells at once, through Ray")
    ap.add_argument("--runs-per-gpu", type=int, default=1)
    ap.add_argument("--ray", metavar="ADDRESS", help="run on an existing Ray cluster")
    ap.add_argument("--max-retries", type=int, default=2,
                    help="retries of a cell whose worker dies or whose run fails")
    ap.add_argument("--retry-failed", action="store_true",
                    help="give runs that failed --max-retries + 1 times that many attempts again")
    ap.add_argument("--array", default="auto", metavar="auto|off|N",
                    help="train the cells of one structure together as arrays of up to N runs "
                    "(fastres/run/train_array.py); auto: as many as the device's memory holds, at "
                    f"most {AUTO_ARRAY_CAP}; off: one at a time")
    ap.add_argument("--tensorboard", metavar="DIR", help="keep TensorBoard event files of every "
                    "run in DIR current while the grid runs (tensorboard --logdir DIR)")
    add_run_arguments(ap)
    return ap


def check_flags(args: argparse.Namespace) -> None:
    """The grid's own flags, before anything runs; flags that would do nothing are said."""
    if args.workers is not None and args.workers < 1:
        raise GridError(f"--workers must be at least 1, got {args.workers}")
    if args.runs_per_gpu < 1:
        raise GridError(f"--runs-per-gpu must be at least 1, got {args.runs_per_gpu}")
    if args.max_retries < 0:
        raise GridError(f"--max-retries must be 0 or more, got {args.max_retries}")
    try:  # attempts are counted in the store, up to --max-retries + 1
        check_storable(args.max_retries + 1, "--max-retries + 1")
    except ValueError as e:
        raise GridError(str(e)) from None
    if not args.results.strip():
        raise GridError("--results '' names no folder; give one, e.g. --results runs")
    if os.path.isfile(args.results):
        from fastres.run.results import DB_NAME

        hint = (f"; give the folder that holds it: --results {os.path.dirname(args.results) or '.'}"
                if os.path.basename(args.results) == DB_NAME else "")
        raise GridError(f"--results {args.results} is a file, not a folder{hint}")
    if args.runs_per_gpu != 1 and args.ray is None and (args.workers or 1) == 1:
        print("[grid] note: --runs-per-gpu applies to Ray workers only (--workers N > 1 or "
              "--ray ADDRESS); one process trains here, so it is ignored", file=sys.stderr,
              flush=True)
    if args.measure and not args.dry_run:
        print("[grid] note: --measure applies to --dry-run only; a real run times its "
              "structures anyway", file=sys.stderr, flush=True)


RAY_CONNECT_TIMEOUT = 5.0  # seconds: Ray itself retries an unreachable head for minutes


def check_ray(args: argparse.Namespace) -> None:
    """Ray installed where the grid needs it, and --ray's head reachable (a TCP connection to its
    port), within seconds and before any data is prepared or step timed; GridError naming --ray
    otherwise. `auto` (Ray's own lookup of a local cluster) is left to Ray."""
    import importlib.util
    import socket
    from urllib.parse import urlsplit

    if args.ray is None and (args.workers or 1) == 1:
        return
    if importlib.util.find_spec("ray") is None:
        raise GridError("--workers > 1 and --ray need Ray: pip install 'fastres[cluster]'")
    if args.ray is None or args.ray == "auto":
        return
    forms = "HOST:PORT, ray://HOST:PORT or auto"
    rest = args.ray[len("ray://"):] if args.ray.startswith("ray://") else args.ray
    try:
        parts = urlsplit(f"//{rest}")
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number, a bad [IPv6] literal
        host = port = None
    if not host or port is None or parts.path or parts.query:
        raise GridError(f"--ray {args.ray!r} is not an address; expected {forms}")
    try:
        socket.create_connection((host, port), timeout=RAY_CONNECT_TIMEOUT).close()
    except socket.gaierror as e:
        raise GridError(f"--ray {args.ray}: no such host {host!r} ({e.strerror})") from None
    except OSError as e:
        why = e.strerror or type(e).__name__  # a timeout has no strerror
        raise GridError(f"--ray {args.ray}: cannot reach {host}:{port} ({why}); is a Ray head "
                        "running there (ray start --head), and is the port open from here?"
                        ) from None


def check_run(args: argparse.Namespace, plan: Plan, cells: list[Cell]) -> tuple[int | None, dict]:
    """Every check that needs no data, made alike by a dry run and a real one: the grid's flags,
    --array, and the run settings of every cell, built as the cell builds them, before any is
    registered (a cell that can never train would stay in the store, unfinished, for good).
    Returns the --array asked for and the compute settings."""
    check_flags(args)
    array_asked = parse_array(args.array)
    compute = compute_settings(args)
    asked = GridProtocol(epochs=plan.epochs, lr=args.lr, train_subset=plan.train_subset,
                         test_subset=plan.test_subset)
    try:
        for c in cells:
            c.config(asked, compute).check()
        # The device-dependent settings are the same for every cell: resolved once.
        resolved = cells[0].config(asked, compute).resolved(log=lambda _m: None)
    except ValueError as e:
        raise GridError(str(e)) from None
    if resolved.kernels == "triton":
        from fastres.kernels._common import triton_available, unavailable_reason

        if not triton_available(resolved.device):
            raise KernelsUnavailable(f"--kernels triton: {unavailable_reason(resolved.device)}"
                                     "; use --kernels eager")
    if resolved.precision == "fp16" and array_asked not in (None, 1):
        raise GridError(FP16_ARRAY)
    return array_asked, compute


AUTO_ARRAY_CAP = 10  # the paper's runs per structure
FP16_ARRAY = ("--array with --precision fp16: one loss scale would couple the runs of an array; "
              "use bf16 or --array off")


def parse_array(value: str) -> int | None:
    """--array: None for auto, else the most runs per array (off = 1)."""
    if value == "auto":
        return None
    if value == "off":
        return 1
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise GridError(f"--array must be auto, off or a number of runs >= 1, got {value!r}")
    return n


def array_sizes(asked: int | None, configs: dict[str, object], log=print,
                records: dict[str, dict] | None = None) -> dict[str, int]:
    """Runs per array for each spec (configs: spec -> one of its resolved TrainConfigs). On a
    GPU `auto` measures (fastres.run.train_array.choose_array) and puts what it measured and chose
    in `records` (spec -> record)."""
    sizes = {}
    for spec, cfg in configs.items():
        if cfg.precision == "fp16":
            if asked not in (None, 1):
                raise GridError(FP16_ARRAY)
            sizes[spec] = 1
        elif asked is not None:
            sizes[spec] = asked
        elif not cfg.device.startswith("cuda"):
            from fastres.run.train_array import fit_host_array

            sizes[spec] = fit_host_array(cfg, AUTO_ARRAY_CAP, log)
        else:
            from fastres.run.train_array import choose_array
            from fastres.run.workbench import for_device

            # One run at a time is timed on this process's workbench: its warm engine is the
            # one the first of those runs trains on.
            sizes[spec], record = choose_array(cfg, AUTO_ARRAY_CAP, log,
                                               bench=for_device(cfg.device))
            if records is not None:
                records[spec] = record
    return sizes


def _subset_flag(args: argparse.Namespace, which: str) -> str:
    flag = f"--{which}-subset"
    return flag if getattr(args, f"{which}_subset") is not None else \
        f"{flag} (of --preset {args.preset})"


def _tensorboard(out: str | None, results: str) -> TensorBoardExport | None:
    """The --tensorboard exporter; where another process exports there already, none."""
    if out is None:
        return None
    from fastres.report.tensorboard import ExportBusy, TensorBoardExport

    try:
        return TensorBoardExport(out, results)
    except ExportBusy as e:
        print(f"[grid] warning: {e}; this grid leaves it to that process", file=sys.stderr,
              flush=True)
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with stop_on_signals():  # SIGINT, SIGTERM: stop at once, give the run back
            return _run(args)
    except KeyboardInterrupt as e:  # Interrupted, or Ctrl-C before the handlers were set
        # A dry run trains nothing: there is nothing to resume.
        print("[grid] interrupted" + ("" if args.dry_run else "; rerun to resume"),
              file=sys.stderr, flush=True)
        return e.exit_code if isinstance(e, Interrupted) else 130


def print_estimate(configs: list, epochs_left: list[int], n_train: int, n_test: int,
                   workers: int) -> None:
    """How long the cells will take here, from a few timed steps of each structure."""
    from fastres.grid.estimate import estimate_lines

    resolved = [c.resolved(log=lambda _m: None) for c in configs]
    for line in estimate_lines(resolved, epochs_left, n_train, n_test, workers):
        print(line, flush=True)


def _run(args: argparse.Namespace) -> int:
    from fastres.run.results import DONE, ResultsDB, ResultsError
    from fastres.study.data import prepare

    try:
        plan = plan_from_args(args)
        cells = plan.cells()
        # Checked here, not in every cell (each using up its attempts): a NaN --lr, say, would
        # reach the epochs table as NULL (SQLite has no NaN) and fail each cell there.
        array_asked, compute = check_run(args, plan, cells)
        if args.dry_run:
            print_plan(cells, plan)
            if args.measure:
                protocol = GridProtocol(epochs=plan.epochs, lr=args.lr)
                print_estimate([c.config(protocol, compute) for c in cells],
                               [plan.epochs] * len(cells), plan.train_subset or CIFAR_SIZES[0],
                               plan.test_subset or CIFAR_SIZES[1], args.workers or 1)
            return 0
        check_ray(args)  # seconds, not Ray's minutes of retries after the data is ready
        db = ResultsDB(args.results)  # fail on a bad folder before spending time on data
        live = use_live(sys.stdout, args.quiet)  # the live display: a terminal only
        if live or args.quiet:  # bars would tear the display, or fill a log with \r lines
            silence_conversion_bars()
        data = prepare(args.data, args.cache)
        train_subset = effective_subset(plan.train_subset, data.num_train, "training",
                                        _subset_flag(args, "train"))
        test_subset = effective_subset(plan.test_subset, data.num_test, "test",
                                       _subset_flag(args, "test"))
        protocol = GridProtocol(epochs=plan.epochs, lr=args.lr, train_subset=train_subset,
                                test_subset=test_subset, data=data.identity, data_kind=data.kind)
        n_train, n_test = train_subset or data.num_train, test_subset or data.num_test
        max_attempts = args.max_retries + 1
        jobs, flop, epochs_done, done = [], {}, {}, set()
        for c in cells:
            rid = register(db, c, protocol, data.source)
            jobs.append(Job(c, protocol, rid, str(db.folder), data, compute, max_attempts,
                            args.quiet))
        if args.retry_failed:
            n = db.retry_failed([j.run_id for j in jobs])
            print(f"[grid] --retry-failed: {n} failed run(s) get {max_attempts} more "
                  f"attempt(s)", flush=True)
        for j in jobs:
            row = db.run(j.run_id)
            flop[j.run_id] = epoch_flop(j.cell.spec, n_train, n_test)
            epochs_done[j.run_id] = row["epochs_done"]
            if row["status"] in DONE:
                done.add(j.run_id)
        db.close()
        use_ray = args.ray is not None or (args.workers or 1) > 1
        workers = args.workers if use_ray else 1
        progress = Progress(cells, [j.run_id for j in jobs], flop, epochs_done, done,
                            plan.epochs, workers or 1, args.quiet,
                            board=LiveBoard() if live else None,
                            tensorboard=_tensorboard(args.tensorboard, str(db.folder)),
                            worker="ray" if use_ray else local_worker())
        print(f"[grid] {len(cells)} cells ({len(done)} already finished), {plan.epochs} epochs "
              f"each, results in {db.folder}", flush=True)
        todo = [j for j in jobs if j.run_id not in done]
        print_estimate([j.cell.config(j.protocol, j.compute) for j in todo],
                       [plan.epochs - epochs_done[j.run_id] for j in todo], n_train, n_test,
                       workers or 1)
        configs: dict[str, object] = {}
        for j in todo:
            configs.setdefault(str(j.cell.spec), j.cell.config(j.protocol, j.compute)
                               .resolved(log=lambda _m: None))
        chosen: dict[str, dict] = {}
        sizes = array_sizes(array_asked, configs, records=chosen)
        if chosen:  # kept beside the runs: how this grid sized each structure's arrays
            db = ResultsDB(args.results)
            for spec, record in chosen.items():
                db.note(f"array size {spec}", record)
            db.close()
        for spec, n in sizes.items():
            if n > 1:
                print(f"[grid] {spec}: its runs in arrays of up to {n}", flush=True)
        if max(sizes.values(), default=1) > 1 and args.compile:
            print("[grid] note: --compile on does not apply to run arrays yet (they run "
                  "uncompiled, their whole step in CUDA graphs on a GPU); --array off trains "
                  "each run compiled", file=sys.stderr, flush=True)
        with progress:
            if use_ray:
                run_ray(jobs, progress, workers, args.runs_per_gpu, args.ray, args.max_retries,
                        sizes)
            else:
                run_local(jobs, progress, sizes=sizes)
    except DataUnavailable as e:
        print(f"\nerror: no CIFAR-10 data.\n{e}\nTo see the grid work without it: "
              f"python -m fastres.grid --preset smoke --data {SYNTHETIC}", file=sys.stderr)
        return 2
    except (GridError, ResultsError, DataError, SpecError, ValueError, KernelsUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)  # ResultsError includes a full disk (DiskFull)
        return 2
    failed = [j.cell.label for j in jobs if j.run_id in progress.failed]
    unfinished = [j.cell.label for j in jobs
                  if j.run_id not in progress.done and j.run_id not in progress.failed]
    print(f"[grid] {len(progress.done)}/{len(jobs)} cells finished"
          + (f", {len(failed)} failed" if failed else "")
          + f"; report: python -m fastres.report --results {args.results}", flush=True)
    if data.kind == SYNTHETIC:
        print(f"[grid] WARNING: {SYNTHETIC_WARNING}", flush=True)
    if failed:
        print(f"[grid] failed: {', '.join(failed)} (errors above; a cell that has used up its "
              "attempts stays failed: rerun with --retry-failed to try again)", file=sys.stderr)
    if unfinished:
        print(f"[grid] not finished: {', '.join(unfinished)}", file=sys.stderr)
    return 1 if failed or unfinished else 0

