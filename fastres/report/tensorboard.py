"""TensorBoard event files from the results store: one folder per run, named by its label.

    python -m fastres.report --results runs --tensorboard tb    # export (again: only what is new)
    python -m fastres.grid ... --tensorboard tb                 # kept current while it runs
    tensorboard --logdir tb

Each run folder holds its hyper-parameters (the hparams plugin's session start, so runs can be
filtered by optimizer and structure), one event per epoch carrying all its scalars (so an epoch
is written whole or not at all), and when the run has finished its best accuracy and a session
end. Written from the store, it is the same for local and Ray runs.

Idempotent: what a folder already holds is read back from its event files when an export
starts, so a second export adds only new epochs, even after a crash in the middle of one. The
mapping of runs to folders is kept in `fastres-tensorboard.json` (labels repeat across
protocols). A run restarted from epoch 1 (corrupt checkpoint) has its folder rewritten. One
exporter at a time holds a folder (a lock file), so a grid and a report cannot both append.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from fastres.run.results import DONE, ResultsDB, ResultsError
from fastres.study.data import write_json_atomic

INDEX = "fastres-tensorboard.json"
LOCK = ".fastres-tensorboard.lock"
# Per-epoch scalars: tag -> column of the epochs table.
EPOCH_TAGS = {
    "loss/train": "train_loss", "loss/test": "test_loss",
    "accuracy/train": "train_acc", "accuracy/test": "test_acc",
    "learning_rate": "lr", "seconds_per_epoch": "seconds",
}
BEST_TAGS = ("best/test_accuracy", "best/epoch")
END_STATUS = {"completed": api_pb2.STATUS_SUCCESS, "diverged": api_pb2.STATUS_FAILURE}


class ExportBusy(ResultsError):
    """Another process (a running grid, or a report) is exporting into the same folder."""


@dataclass
class _Exported:
    """What one run's folder holds."""

    folder: str
    epochs: int = 0  # epochs 1..epochs are written
    last: dict[str, float] = field(default_factory=dict)  # scalars of that last epoch
    started: bool = False
    ended: bool = False


def folder_name(label: str) -> str:
    """A run's folder: its label, with path separators and a leading dot made harmless."""
    return re.sub(r"[/\\\x00]", "_", label).lstrip(".") or "run"


def hparams_of(run: dict) -> dict[str, bool | int | float | str]:
    """The hparams plugin's view of a run: strings and booleans become filterable choices."""
    protocol = json.loads(run["protocol"])
    hp: dict[str, bool | int | float | str] = {
        "structure": str(run["structure"]) if run["structure"] else "custom",
        "spec": run["spec"], "optimizer": run["optimizer"],
        "augment": bool(run["augment"]), "normalize": bool(run["normalize"]),
        "tmax": run["tmax"], "seed": run["seed"], "epochs": run["epochs"],
        "protocol": run["protocol_id"], "data": protocol.get("data_kind", ""),
    }
    for k, v in sorted(json.loads(run["optimizer_settings"]).items()):
        hp[f"opt.{k}"] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
    return hp


def _same(a: float, b: float) -> bool:
    """Equal as stored in an event file (float32), NaN equal to NaN."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return summary_pb2.Summary.Value(simple_value=a).simple_value == \
        summary_pb2.Summary.Value(simple_value=b).simple_value


def read_back(folder: Path, name: str) -> _Exported:
    """What the event files in `folder` hold (a truncated last record is ignored). The legacy
    loader gives events as written (the other one turns simple_value into tensors)."""
    state = _Exported(name)
    by_step: dict[int, dict[str, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for ev in LegacyEventFileLoader(str(path)).Load():
            values = {v.tag: v.simple_value for v in ev.summary.value}
            if "loss/test" in values:
                by_step[ev.step] = values
            state.started |= metadata.SESSION_START_INFO_TAG in values
            state.ended |= metadata.SESSION_END_INFO_TAG in values
    # Epochs are exported in order, so they are 1..n; anything else is a folder to rebuild.
    if sorted(by_step) == list(range(1, len(by_step) + 1)):
        state.epochs = len(by_step)
        state.last = by_step.get(state.epochs, {})
    else:
        state.epochs, state.last = -1, {}
    return state


class TensorBoardExport:
    """Keeps `out` in step with the results folder `results`; update() writes what is new."""

    def __init__(self, out: str | os.PathLike, results: str | os.PathLike):
        self.out = Path(out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.out / LOCK, "a")  # held (locked) for our lifetime
        except OSError as e:
            raise ResultsError(f"--tensorboard {self.out}: cannot write ({e.strerror or e})"
                               ) from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ExportBusy(f"--tensorboard {self.out}: another process is exporting there "
                             "(a running grid keeps it current)") from None
        self.db = ResultsDB(results, readonly=True)  # an export never writes the results
        index = self.out / INDEX
        self.folders: dict[str, str] = (json.loads(index.read_text())["runs"]
                                        if index.is_file() else {})
        self.state: dict[str, _Exported] = {}
        self.writers: dict[str, EventFileWriter] = {}

    def __enter__(self) -> TensorBoardExport:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()
        self.db.close()
        self._lock.close()  # releases the lock

    def _run_state(self, run: dict) -> _Exported:
        rid = run["run_id"]
        if rid in self.state:
            return self.state[rid]
        if rid not in self.folders:  # a new run: its label, unless another run has it
            name = base = folder_name(run["label"])
            taken = set(self.folders.values())
            if name in taken:
                name = f"{base} p={run['protocol_id'][:8]}"
            n = 2
            while name in taken:
                name, n = f"{base} p={run['protocol_id'][:8]} ({n})", n + 1
            self.folders[rid] = name
            write_json_atomic(self.out / INDEX, {"runs": self.folders})
        state = read_back(self.out / self.folders[rid], self.folders[rid])
        if state.epochs < 0:
            state = self._rebuild(rid)
        self.state[rid] = state
        return state

    def _rebuild(self, rid: str) -> _Exported:
        """Start a run's folder again (its epochs in the store were restarted)."""
        w = self.writers.pop(rid, None)
        if w is not None:
            w.close()
        shutil.rmtree(self.out / self.folders[rid], ignore_errors=True)
        self.state[rid] = _Exported(self.folders[rid])
        return self.state[rid]

    def _writer(self, rid: str) -> EventFileWriter:
        if rid not in self.writers:
            self.writers[rid] = EventFileWriter(str(self.out / self.folders[rid]),
                                                filename_suffix=".fastres")
        return self.writers[rid]

    def _new_epochs(self, rid: str, after: int) -> list[dict]:
        # committed_at is not in ResultsDB.epochs(); it gives each point its real wall time.
        cols = ", ".join(EPOCH_TAGS.values())
        rows = self.db.conn.execute(
            f"SELECT epoch, committed_at, {cols} FROM epochs WHERE run_id = ? AND epoch >= ? "
            "ORDER BY epoch", (rid, after)).fetchall()
        return [{k: (math.nan if r[k] is None else r[k]) for k in r.keys()} for r in rows]

    def update(self) -> int:
        """Write what is new since the last update; returns the number of epochs written."""
        written = 0
        running = set()
        for run in self.db.runs():
            if run["status"] == "running":
                running.add(run["run_id"])
            rid = run["run_id"]
            state = self._run_state(run)
            if run["epochs_done"] < state.epochs:  # restarted from epoch 1
                state = self._rebuild(rid)
            if state.ended and run["epochs_done"] == state.epochs:
                continue  # finished and exported
            if not state.started:
                self._event(rid, run["started_at"] or run["created_at"], 0,
                            hparams_summary.hparams_pb(hparams_of(run), trial_id=rid,
                                                       start_time_secs=run["created_at"]))
                state.started = True
            if run["epochs_done"] > state.epochs:
                rows = self._new_epochs(rid, max(state.epochs, 1))
                if state.epochs and (not rows or rows[0]["epoch"] != state.epochs or not all(
                        _same(rows[0][col], state.last.get(tag, math.nan))
                        for tag, col in EPOCH_TAGS.items())):
                    # The last exported epoch is not the store's any more: restarted, regrown.
                    state = self._rebuild(rid)
                    self._event(rid, run["created_at"], 0, hparams_summary.hparams_pb(
                        hparams_of(run), trial_id=rid, start_time_secs=run["created_at"]))
                    state.started = True
                    rows = self._new_epochs(rid, 1)
                for r in rows:
                    if r["epoch"] <= state.epochs:
                        continue
                    s = summary_pb2.Summary(value=[
                        summary_pb2.Summary.Value(tag=tag, simple_value=r[col])
                        for tag, col in EPOCH_TAGS.items()])
                    self._event(rid, r["committed_at"], r["epoch"], s)
                    state.epochs = r["epoch"]
                    state.last = {tag: r[col] for tag, col in EPOCH_TAGS.items()}
                    written += 1
            if run["status"] in DONE and run["epochs_done"] == state.epochs and not state.ended:
                self._end(rid, run)
                state.ended = True
        for w in self.writers.values():
            w.flush()
        # A writer is a file and a thread: kept open only for runs in flight.
        for rid in [r for r in self.writers if r not in running]:
            self.writers.pop(rid).close()
        return written

    def _end(self, rid: str, run: dict) -> None:
        when = run["finished_at"] or run["updated_at"] or run["created_at"]
        if run["best_epoch"] is not None:
            self._event(rid, when, run["best_epoch"], summary_pb2.Summary(value=[
                summary_pb2.Summary.Value(tag=BEST_TAGS[0], simple_value=run["best_acc"]),
                summary_pb2.Summary.Value(tag=BEST_TAGS[1], simple_value=run["best_epoch"])]))
        end = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(
            status=END_STATUS[run["status"]], end_time_secs=when))
        s = summary_pb2.Summary()
        s.value.add(tag=metadata.SESSION_END_INFO_TAG, tensor=metadata.NULL_TENSOR,
                    metadata=metadata.create_summary_metadata(end))
        self._event(rid, when, run["epochs_done"], s)

    def _event(self, rid: str, wall_time: float, step: int, summary: summary_pb2.Summary
               ) -> None:
        self._writer(rid).add_event(event_pb2.Event(wall_time=wall_time, step=step,
                                                    summary=summary))


def export(out: str | os.PathLike, results: str | os.PathLike) -> tuple[int, int]:
    """One export of a results folder: (runs, epochs newly written)."""
    with TensorBoardExport(out, results) as tb:
        written = tb.update()
        return len(tb.state), written
