"""The study as one command: every cell of the grid, resumable, reported, over many workers.

    python -m fastres.grid                                   # the paper's 90 runs
    python -m fastres.grid --structures 1,6 --optimizers sgd,nesterov --augment on
    python -m fastres.grid --preset smoke --data synthetic   # seconds, no CIFAR-10 needed
    python -m fastres.grid --workers 4 --runs-per-gpu 2      # through a local Ray cluster

Results go to `--results DIR` (default ./runs): an SQLite database and checkpoints. Rerunning
the same command resumes; finished runs are skipped. See fastres/run/results.py for the guarantees.
A cell that failed --max-retries + 1 times stays failed (exit 1) until a rerun with
--retry-failed. Ctrl-C or SIGTERM stops at once and gives the run back (exit 130/143).

This module is the command: its flags and their checks, the plan (fastres/grid/plan.py: cells,
presets, the selection flags), array sizes, the estimate, then the run itself
(fastres/grid/runner.py: locally or through Ray).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from fastres.grid.live import LiveBoard, local_worker, use_live
from fastres.grid.plan import (
    PRESETS,
    GridError,
    Plan,
    effective_subset,
    epoch_flop,
    plan_from_args,
    print_plan,
    register,
)
from fastres.grid.runner import Job, Progress, run_local, run_ray
from fastres.kernels.choice import KernelsUnavailable
from fastres.run.cell import Cell, GridProtocol
from fastres.run.config import (
    add_run_arguments,
    check_storable,
    compute_settings,
)
from fastres.run.signals import Interrupted, stop_on_signals
from fastres.study.data import (
    SYNTHETIC,
    SYNTHETIC_WARNING,
    DataError,
    DataUnavailable,
    silence_conversion_bars,
)
from fastres.study.protocol import CIFAR_SIZES, OPTIMIZER_SETTINGS
from fastres.study.structures import SpecError

if TYPE_CHECKING:
    from fastres.report.tensorboard import TensorBoardExport

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

