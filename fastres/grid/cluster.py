"""The grid on a Ray cluster, with the results folder on the driver's machine only.

SQLite's locking is unreliable on network filesystems, so in Ray mode no worker opens the
results folder (a worker that tries gets a ResultsError: RAY_WORKER_ENV is set in its
runtime_env). Instead:

- The driver holds every run's lease in the database (as one local grid process would) and
  submits each cell as a Ray task, which Ray retries at once on another node when its worker or
  node dies (`max_retries`): no lease TTL to wait out.
- A RunStore actor pinned to the driver's node relays between tasks and driver. A task asks it
  for the run's last saved state (bytes, and the epoch history up to it) when it starts; after
  each epoch it sends the metrics, and on the trainer's checkpoint cadence (from its writer
  thread) the state's bytes, and waits until the driver has written them, exactly as in local
  mode. A retry therefore resumes from the last saved state, never from a file on the dead
  node, and a re-recorded epoch replaces its rows (ResultsDB.commit_epoch).
- The task returns the RunResult (or the error of a failed run); the driver records it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fastres.run.checkpoints import from_bytes, to_bytes
from fastres.run.config import TrainConfig, device_or_default
from fastres.run.records import RAY_WORKER_ENV, EpochMetrics, RunResult
from fastres.run.results import LEASE_TTL, LeaseLost, ResultsDB, RunCheckpointer, new_owner
from fastres.study.data import BetonPair

# Every task and actor of the grid runs with it: ResultsDB and save_checkpoint refuse there.
WORKER_RUNTIME_ENV = {"env_vars": {RAY_WORKER_ENV: "1"}}


@dataclass(frozen=True)
class RayCell:
    """What a Ray task needs to train one cell: no path into the results folder."""

    run_id: str
    label: str
    config: TrainConfig
    data: BetonPair  # the betons must be at this path on every node
    max_attempts: int
    quiet: bool


class StoreRefused(RuntimeError):
    """The driver did not record an epoch (the run is no longer this task's to train)."""


@ray.remote(num_cpus=0)
class RunStore:
    """The driver-side relay: last committed checkpoint per run in flight, and a queue of
    events (attempt started, epoch to commit) that the driver takes, records and acknowledges.
    Async: calls waiting for acknowledgement do not block the others."""

    def __init__(self) -> None:
        # Per run: the last saved state's bytes and every epoch recorded (maybe past that state).
        self.latest: dict[str, tuple[bytes | None, list[EpochMetrics]]] = {}
        self.saved_epoch: dict[str, int] = {}
        self.attempt: dict[str, int] = {}
        self.outbox: list[tuple] = []
        self.waiting: dict[int, asyncio.Future] = {}
        self.ready = asyncio.Event()
        self.next_key = 0

    def open(self, run_id: str, blob: bytes | None, history: list[EpochMetrics]) -> None:
        """The driver: the run's checkpoint as the database holds it, before its task starts."""
        self.latest[run_id] = (blob, history)
        self.saved_epoch[run_id] = len(history)
        self.attempt[run_id] = 0

    def close(self, run_id: str) -> None:
        self.latest.pop(run_id, None)
        self.saved_epoch.pop(run_id, None)
        self.attempt.pop(run_id, None)

    async def _recorded(self, event: tuple) -> Any:
        key, self.next_key = self.next_key, self.next_key + 1
        future = asyncio.get_running_loop().create_future()
        self.waiting[key] = future
        self.outbox.append((key, *event))
        self.ready.set()
        return await future

    async def begin(self, run_id: str, where: dict) -> tuple[int, bytes | None,
                                                             list[EpochMetrics]]:
        """A task (first try or Ray's retry) starts: its attempt number, the run's last saved
        state and the history up to it, once the driver has recorded the attempt (and all
        before it)."""
        attempt = self.attempt[run_id] = self.attempt[run_id] + 1
        await self._recorded(("begin", run_id, attempt, where))
        blob, history = self.latest[run_id]
        return attempt, blob, history[:self.saved_epoch.get(run_id, 0)] if blob else []

    async def _relay(self, run_id: str, attempt: int, event: tuple) -> None:
        if self.attempt.get(run_id) != attempt:
            raise StoreRefused(f"attempt {attempt} of run {run_id} was superseded")
        error = await self._recorded(event)
        if error:
            raise StoreRefused(error)

    async def record(self, run_id: str, attempt: int, metrics: EpochMetrics) -> None:
        """Returns once the driver has recorded the epoch; raises if it did not."""
        await self._relay(run_id, attempt, ("epoch", run_id, attempt, metrics))
        blob, history = self.latest[run_id]
        self.latest[run_id] = (blob, [*history[:metrics.epoch - 1], metrics])

    async def save(self, run_id: str, attempt: int, epoch: int, blob: bytes,
                   best: bytes | None) -> None:
        """Returns once the driver has written the state; raises if it did not."""
        await self._relay(run_id, attempt, ("save", run_id, attempt, epoch, blob, best))
        self.latest[run_id] = (blob, self.latest[run_id][1])
        self.saved_epoch[run_id] = epoch

    async def take(self, timeout: float) -> list[tuple]:
        """The driver: the events so far (waiting up to `timeout` for one)."""
        if not self.outbox:
            try:
                await asyncio.wait_for(self.ready.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        events, self.outbox = self.outbox, []
        self.ready.clear()
        return events

    def ack(self, outcomes: list[tuple[int, str | None]]) -> None:
        """The driver recorded these events (or, with a message, refused them)."""
        for key, error in outcomes:
            future = self.waiting.pop(key, None)
            if future is not None and not future.done():
                future.set_result(error)


class RemoteCheckpointer:
    """train()'s Checkpointer in a Ray task: loads, records and saves through the RunStore."""

    def __init__(self, store: Any, run_id: str, where: dict):
        self.store, self.run_id, self.where = store, run_id, where
        self.attempt = 0

    def load(self) -> tuple[dict, list[EpochMetrics]] | None:
        self.attempt, blob, history = ray.get(self.store.begin.remote(self.run_id, self.where))
        return None if blob is None else (from_bytes(blob), history)

    def record(self, metrics: EpochMetrics) -> None:
        ray.get(self.store.record.remote(self.run_id, self.attempt, metrics))

    def save(self, epoch: int, state: bytes, best: bytes | None) -> None:
        ray.get(self.store.save.remote(self.run_id, self.attempt, epoch, state, best))


def _refused_or_failed(e: BaseException) -> tuple[str, str]:
    cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
    if isinstance(cause, StoreRefused):
        return "refused", str(cause)
    return "failed", f"{type(cause).__name__}: {cause}"


def run_unit(cells: list[RayCell], store: Any, threads: int
             ) -> list[tuple[str, RunResult | str]]:
    """The Ray task: train one cell (fastres.run.train), or the cells of one spec as one run array
    (fastres.run.train_array), through the store. Per cell (status, RunResult), ('failed', error)
    for a run that raised, or ('refused', why) when the driver refused it (in an array, that
    run leaves alone); ('split', why) for every cell when an array ran out of device memory
    (the driver retries it in halves)."""
    import torch

    from fastres.run.train import train
    from fastres.run.train_array import train_array
    from fastres.run.workbench import for_device

    torch.set_num_threads(threads)
    where = {"ray_node_id": ray.get_runtime_context().get_node_id(),
             "host": socket.gethostname(), "pid": os.getpid()}

    def log(message: str) -> None:  # epoch lines reach the driver through the store
        if not cells[0].quiet and not message.startswith("epoch"):
            print(message, flush=True)

    stores = [RemoteCheckpointer(store, c.run_id, where) for c in cells]
    # Ray reuses a worker process for later tasks: its workbench stays warm across cells.
    bench = for_device(device_or_default(cells[0].config.device))
    try:
        if len(cells) == 1:
            results = [train(cells[0].config, data=cells[0].data, on_epoch=None, log=log,
                             checkpoint=stores[0], bench=bench)]
        else:
            results = train_array([c.config for c in cells], data=cells[0].data, log=log,
                                  checkpoints=stores, bench=bench,
                                  isolate=(StoreRefused, ray.exceptions.RayTaskError))
    except torch.cuda.OutOfMemoryError as e:
        if len(cells) == 1:
            return [_refused_or_failed(e)]
        return [("split", str(e).splitlines()[0])] * len(cells)
    except Exception as e:  # the grid goes on; the error is recorded with each run
        return [_refused_or_failed(e)] * len(cells)
    out: list[tuple[str, RunResult | str]] = []
    for result in results:
        if isinstance(result, BaseException):
            out.append(_refused_or_failed(result))
        else:
            result.environment["ray"] = where
            out.append((result.status, result))
    return out


def run_cells(units: list[list[RayCell]], results: str, progress: Any, workers: int,
              threads: int, num_gpus: float, max_retries: int,
              failed_detail: Callable[[dict, int], str], poll: float = 1.0) -> None:
    """The driver's loop (ray.init done): lease, submit at most `workers` tasks at once (one
    run_unit task per unit: a cell or an array of cells), record the
    events the store relays, record each cell's outcome. `progress` has the grid's
    Progress.epoch(run_id, metrics) and .cell(run_id, outcome, detail)."""
    db = ResultsDB(results)
    owner = new_owner()  # this driver's: a rerun after it is killed takes its leases over
    here = ray.get_runtime_context().get_node_id()
    store = RunStore.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        runtime_env=WORKER_RUNTIME_ENV).remote()
    task = ray.remote(run_unit).options(
        num_cpus=threads, num_gpus=num_gpus, max_retries=max_retries, retry_exceptions=False,
        runtime_env=WORKER_RUNTIME_ENV)

    def warn(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    by_id = {c.run_id: c for unit in units for c in unit}
    queue, later = deque(units), []  # later: (when, unit) held by another grid process
    inflight: dict[Any, list[RayCell]] = {}
    beat = time.monotonic()
    events = store.take.remote(poll)
    try:
        while queue or inflight or later:
            now = time.monotonic()
            queue.extend(u for t, u in later if t <= now)
            later = [(t, u) for t, u in later if t > now]
            while queue and len(inflight) < workers:
                unit, got_cells, busy = queue.popleft(), [], []
                for cell in unit:
                    got = db.acquire(cell.run_id, owner, max_attempts=cell.max_attempts)
                    if got == "acquired":
                        saved = RunCheckpointer(db, cell.run_id, owner, warn).load()
                        blob, history = (None, []) if saved is None else \
                            (to_bytes(saved[0]), saved[1])
                        ray.get(store.open.remote(cell.run_id, blob, history))
                        got_cells.append(cell)
                        continue
                    detail = failed_detail(db.run(cell.run_id), cell.max_attempts) \
                        if got == "failed" else ""
                    progress.cell(cell.run_id, got, detail)
                    if got == "busy":  # a live process elsewhere has it: look again later
                        busy.append(cell)
                if busy:
                    later.append((now + 2.0, busy))
                if got_cells:
                    inflight[task.remote(got_cells, store, threads)] = got_cells
            ready, _ = ray.wait([events, *inflight], num_returns=1,
                                timeout=None if inflight else poll)
            if events in ready:
                acks = [_record(db, owner, event, by_id, progress, warn)
                        for event in ray.get(events)]
                store.ack.remote(acks)  # before the next take: an actor runs a caller's
                events = store.take.remote(poll)  # calls in order
            for ref in ready:
                if ref is events or ref not in inflight:
                    continue
                unit = inflight.pop(ref)
                outcomes = _outcomes(ref, len(unit))
                if any(o == "split" for o, _ in outcomes):
                    print(f"[grid] an array of {len(unit)} runs ran out of device memory "
                          f"({outcomes[0][1]}); splitting it", file=sys.stderr, flush=True)
                    for cell in unit:
                        store.close.remote(cell.run_id)
                        db.release(cell.run_id, owner)
                    half = len(unit) // 2
                    queue.extendleft([unit[half:], unit[:half]])
                    continue
                busy = []
                for cell, (outcome, value) in zip(unit, outcomes, strict=True):
                    outcome, detail = _finish(db, owner, cell, outcome, value, failed_detail)
                    store.close.remote(cell.run_id)
                    progress.cell(cell.run_id, outcome, detail)
                    if outcome == "busy":
                        busy.append(cell)
                if busy:
                    later.append((time.monotonic() + 2.0, busy))
            if time.monotonic() - beat > LEASE_TTL / 4:  # keep the leases of runs in flight
                beat = time.monotonic()
                for unit in inflight.values():
                    for cell in unit:
                        db.heartbeat(cell.run_id, owner)
    except BaseException:  # Ctrl-C, SIGTERM, a full disk: give the runs back unfinished
        for unit in inflight.values():
            for cell in unit:
                try:
                    db.release(cell.run_id, owner)
                except Exception:
                    pass  # a dead driver's leases are taken over by the next grid anyway
        raise
    finally:
        db.close()


def _record(db: ResultsDB, owner: str, event: tuple, by_id: dict[str, RayCell], progress: Any,
            warn: Callable[[str], None]) -> tuple[int, str | None]:
    """Write one relayed event; returns its acknowledgement (key, None or why not)."""
    key, kind, run_id, attempt, *rest = event
    try:
        if kind == "begin":
            (where,) = rest
            db.note_attempt(run_id, owner, where, retry=attempt > 1)
            if hasattr(progress, "start"):  # the live display names each run's worker
                progress.start(run_id, f"{where['host']}:{where['pid']}")
            if attempt > 1:
                done = db.run(run_id)["epochs_done"]
                print(f"[grid] {by_id[run_id].label}: retried by Ray (attempt {attempt}) on node "
                      f"{where['ray_node_id'][:12]} ({where['host']}), resuming after epoch "
                      f"{done}", flush=True)
        elif kind == "epoch":
            (metrics,) = rest
            RunCheckpointer(db, run_id, owner, warn).record(metrics)
            progress.epoch(run_id, metrics)
        else:
            epoch, blob, best = rest
            RunCheckpointer(db, run_id, owner, warn).save(epoch, blob, best)
    except LeaseLost as e:
        return key, str(e)
    return key, None


def _outcomes(ref: Any, cells: int) -> list[tuple[str, Any]]:
    """A task's (outcome, value) per cell; a task whose worker or node died more than
    max_retries times fails all its cells."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:
        return [("failed", f"worker lost ({type(e).__name__}); a rerun resumes it")] * cells


def _finish(db: ResultsDB, owner: str, cell: RayCell, outcome: str, value: Any,
            failed_detail: Callable[[dict, int], str]) -> tuple[str, str]:
    """Record a cell's outcome; returns (outcome, detail) for the grid's display."""
    if outcome == "refused":  # another process took the run over: its lease is no longer ours
        return "busy", ""
    if outcome == "failed":
        db.fail(cell.run_id, owner, value)
        return outcome, failed_detail(db.run(cell.run_id), cell.max_attempts)
    try:
        db.finish(cell.run_id, owner, value)
    except LeaseLost:
        return "busy", ""
    return outcome, ""
