"""The results folder: one SQLite database (runs, epochs, leases) and per-run checkpoints.

Every epoch commits its checkpoint file first (temp file, fsync, rename) and then, in one
transaction, its metrics row and the reference to that file. A `kill -9` at any moment therefore
loses at most the epoch in flight: the database never points at a file that is not whole, and a
file that is whole but unreferenced is simply written again. Leases with a heartbeat keep two
grid processes (or Ray workers) from training the same run; a dead owner's lease is taken over.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

from fastres.train import EpochMetrics, RunResult

SCHEMA_VERSION = 1
DB_NAME = "results.sqlite"
LEASE_TTL = 120.0  # seconds without a heartbeat before another process may take a run over
DONE = ("completed", "diverged")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    cell TEXT NOT NULL,            -- JSON: structure, spec, optimizer, augment, normalize, ...
    protocol_id TEXT NOT NULL,
    protocol TEXT NOT NULL,        -- JSON: epochs, batch sizes, data identity, subsets, ...
    structure INTEGER,
    spec TEXT NOT NULL,
    optimizer TEXT NOT NULL,
    optimizer_settings TEXT NOT NULL,
    augment INTEGER NOT NULL,
    normalize INTEGER NOT NULL,
    tmax INTEGER NOT NULL,
    epochs INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    epochs_done INTEGER NOT NULL DEFAULT 0,
    best_acc REAL, best_epoch INTEGER, loss_at_best REAL, diverged_at INTEGER,
    checkpoint TEXT, checkpoint_sha TEXT,
    lease_owner TEXT, lease_expires REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    train_seconds REAL NOT NULL DEFAULT 0,
    environment TEXT, error TEXT,
    created_at REAL NOT NULL, started_at REAL, updated_at REAL, finished_at REAL
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    epoch INTEGER NOT NULL,
    lr REAL NOT NULL,
    train_loss REAL, train_acc REAL,    -- NULL is NaN: SQLite stores no NaN
    test_loss REAL, test_acc REAL,
    seconds REAL NOT NULL,
    committed_at REAL NOT NULL,
    PRIMARY KEY (run_id, epoch)
);
"""


class ResultsError(RuntimeError):
    """A results folder that cannot be used as asked; the message says why."""


class LeaseLost(RuntimeError):
    """Another process took this run over (our heartbeat stopped for too long)."""


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_is_dead(owner: str) -> bool:
    """True when the owner is a process of this host that no longer exists."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: Path, state: dict) -> str:
    """Write atomically and durably; return the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        sha = _sha256(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return sha


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(path: Path, sha: str | None) -> dict:
    """The state in `path`, after checking it is the file the database recorded."""
    if not path.is_file():
        raise ResultsError(f"checkpoint {path} is missing")
    if sha is not None and _sha256(path) != sha:
        raise ResultsError(f"checkpoint {path} does not match its recorded sha256")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise ResultsError(f"checkpoint {path} cannot be read: {e}") from None


class ResultsDB:
    """A results folder. Each instance holds its own connection (one per process or thread)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ResultsError(f"results folder {self.folder} is not writable: {e.strerror or e}"
                               " (choose another with --results DIR)") from None
        self.path = self.folder / DB_NAME
        # Never open() the database file ourselves: closing any descriptor of it drops every
        # POSIX lock this process holds on it, including those of live SQLite connections.
        self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        try:
            self.conn.execute("PRAGMA busy_timeout = 60000")
            self._check_foreign()
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.DatabaseError as e:  # "file is not a database"
            self.conn.close()
            raise ResultsError(f"{self.path} is not an SQLite database ({e}); refusing to touch "
                               "it (choose another folder with --results DIR)") from None
        except ResultsError:
            self.conn.close()
            raise
        self.conn.executescript(SCHEMA)  # IF NOT EXISTS throughout: safe to race
        with self.transaction(immediate=True):
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('app', 'fastres')")
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)",
                              (str(SCHEMA_VERSION),))

    def _check_foreign(self) -> None:
        tables = {r[0] for r in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return  # an empty database file: ours to initialise
        if "meta" not in tables:
            raise ResultsError(f"{self.path} is an SQLite database of another program (tables: "
                               f"{', '.join(sorted(tables))}); refusing to mix fastres results "
                               "into it (choose another folder with --results DIR)")
        meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("app") != "fastres":
            raise ResultsError(f"{self.path} belongs to {meta.get('app')!r}, not fastres")
        if meta.get("schema") != str(SCHEMA_VERSION):
            raise ResultsError(f"{self.path} has fastres schema {meta.get('schema')}, this "
                               f"version reads schema {SCHEMA_VERSION}")

    def transaction(self, immediate: bool = False) -> _Transaction:
        return _Transaction(self.conn, immediate)

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------------ runs

    def register(self, run_id: str, row: dict[str, Any]) -> None:
        """Add a run as pending unless it is already known (then nothing changes)."""
        cols = ["run_id", "created_at", *row]
        with self.transaction():
            self.conn.execute(
                f"INSERT OR IGNORE INTO runs ({', '.join(cols)}) "
                f"VALUES ({', '.join('?' for _ in cols)})",
                [run_id, time.time(), *row.values()])

    def run(self, run_id: str) -> dict | None:
        r = self.conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return dict(r) if r else None

    def runs(self) -> list[dict]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM runs ORDER BY created_at")]

    def epochs(self, run_id: str) -> list[EpochMetrics]:
        rows = self.conn.execute(
            "SELECT epoch, lr, train_loss, train_acc, test_loss, test_acc, seconds FROM epochs "
            "WHERE run_id = ? ORDER BY epoch", (run_id,)).fetchall()
        nan = float("nan")
        return [EpochMetrics(*(nan if v is None else v for v in r)) for r in rows]

    def acquire(self, run_id: str, owner: str, ttl: float = LEASE_TTL,
                max_attempts: int | None = None) -> str:
        """'acquired', 'done' (finished, or failed too often) or 'busy' (a live owner has it)."""
        now = time.time()
        with self.transaction(immediate=True):
            r = self.run(run_id)
            if r is None:
                raise ResultsError(f"run {run_id} is not registered")
            if r["status"] in DONE:
                return "done"
            if r["status"] == "failed" and max_attempts is not None \
                    and r["attempts"] >= max_attempts:
                return "done"
            held = r["lease_owner"] not in (None, owner)
            if held and r["lease_expires"] > now and not _owner_is_dead(r["lease_owner"]):
                return "busy"
            self.conn.execute(
                "UPDATE runs SET lease_owner = ?, lease_expires = ?, status = 'running', "
                "attempts = attempts + 1, started_at = COALESCE(started_at, ?), updated_at = ? "
                "WHERE run_id = ?", (owner, now + ttl, now, now, run_id))
        return "acquired"

    def heartbeat(self, run_id: str, owner: str, ttl: float = LEASE_TTL) -> bool:
        with self.transaction(immediate=True):
            cur = self.conn.execute(
                "UPDATE runs SET lease_expires = ? WHERE run_id = ? AND lease_owner = ?",
                (time.time() + ttl, run_id, owner))
        return cur.rowcount == 1

    def _check_owner(self, run_id: str, owner: str) -> None:
        r = self.conn.execute("SELECT lease_owner FROM runs WHERE run_id = ?",
                              (run_id,)).fetchone()
        if r is None or r[0] != owner:
            raise LeaseLost(f"run {run_id} is now leased by {r[0] if r else 'nobody'}")

    def commit_epoch(self, run_id: str, owner: str, m: EpochMetrics, checkpoint: Path,
                     sha: str, ttl: float = LEASE_TTL) -> None:
        now = time.time()
        with self.transaction(immediate=True):
            self._check_owner(run_id, owner)
            self.conn.execute("INSERT INTO epochs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                              (run_id, m.epoch, m.lr, m.train_loss, m.train_acc, m.test_loss,
                               m.test_acc, m.seconds, now))
            self.conn.execute(
                "UPDATE runs SET epochs_done = ?, checkpoint = ?, checkpoint_sha = ?, "
                "train_seconds = train_seconds + ?, lease_expires = ?, updated_at = ? "
                "WHERE run_id = ?",
                (m.epoch, str(checkpoint.relative_to(self.folder)), sha, m.seconds, now + ttl,
                 now, run_id))

    def finish(self, run_id: str, owner: str, result: RunResult) -> None:
        with self.transaction(immediate=True):
            self._check_owner(run_id, owner)
            self.conn.execute(
                "UPDATE runs SET status = ?, best_acc = ?, best_epoch = ?, loss_at_best = ?, "
                "diverged_at = ?, environment = ?, error = NULL, lease_owner = NULL, "
                "lease_expires = NULL, finished_at = ?, updated_at = ? WHERE run_id = ?",
                (result.status, result.best_acc, result.best_epoch, result.loss_at_best,
                 result.diverged_at, json.dumps(result.environment), time.time(), time.time(),
                 run_id))

    def fail(self, run_id: str, owner: str, error: str) -> None:
        with self.transaction(immediate=True):
            self.conn.execute(
                "UPDATE runs SET status = 'failed', error = ?, lease_owner = NULL, "
                "lease_expires = NULL, updated_at = ? WHERE run_id = ? AND lease_owner = ?",
                (error, time.time(), run_id, owner))

    def reset(self, run_id: str, owner: str) -> None:
        """Forget a run's epochs (its checkpoint is unusable): it starts again from epoch 1."""
        with self.transaction(immediate=True):
            self._check_owner(run_id, owner)
            self.conn.execute("DELETE FROM epochs WHERE run_id = ?", (run_id,))
            self.conn.execute("UPDATE runs SET epochs_done = 0, checkpoint = NULL, "
                              "checkpoint_sha = NULL, train_seconds = 0 WHERE run_id = ?",
                              (run_id,))


class _Transaction:
    def __init__(self, conn: sqlite3.Connection, immediate: bool):
        self.conn, self.immediate = conn, immediate

    def __enter__(self) -> None:
        # IMMEDIATE takes the write lock up front, so read-then-write is atomic across processes.
        self.conn.execute("BEGIN IMMEDIATE" if self.immediate else "BEGIN")

    def __exit__(self, exc_type, *_exc) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


class RunCheckpointer:
    """train()'s Checkpointer for one leased run of a ResultsDB."""

    def __init__(self, db: ResultsDB, run_id: str, owner: str, log=print):
        self.db, self.run_id, self.owner, self.log = db, run_id, owner, log
        self.folder = db.folder / "checkpoints" / run_id

    def load(self) -> tuple[dict, list[EpochMetrics]] | None:
        r = self.db.run(self.run_id)
        if r is None or r["epochs_done"] == 0:
            return None
        history = self.db.epochs(self.run_id)
        try:
            state = load_checkpoint(self.db.folder / r["checkpoint"], r["checkpoint_sha"])
            if state.get("epoch") != r["epochs_done"] or len(history) != r["epochs_done"]:
                raise ResultsError(f"checkpoint is of epoch {state.get('epoch')}, the database "
                                   f"records {r['epochs_done']} epochs")
        except ResultsError as e:
            msg = f"run {r['label']}: {e}; restarting it from epoch 1"
            warnings.warn(msg, stacklevel=2)
            self.log(f"[grid] warning: {msg}")
            self.db.reset(self.run_id, self.owner)
            return None
        return state, history

    def commit(self, metrics: EpochMetrics, state: dict) -> None:
        path = self.folder / f"epoch-{metrics.epoch:04d}.pt"
        sha = save_checkpoint(path, state)
        self.db.commit_epoch(self.run_id, self.owner, metrics, path, sha)
        for old in self.folder.glob("epoch-*.pt"):  # only the referenced one is worth keeping
            if old != path:
                old.unlink(missing_ok=True)


class Heartbeat:
    """Keeps a lease alive from a thread with its own connection while a run trains."""

    def __init__(self, folder: Path, run_id: str, owner: str, ttl: float = LEASE_TTL):
        self.args = (folder, run_id, owner, ttl)
        self.stop = threading.Event()
        self.lost = False
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        folder, run_id, owner, ttl = self.args
        db = ResultsDB(folder)
        try:
            while not self.stop.wait(ttl / 4):
                if not db.heartbeat(run_id, owner, ttl):
                    self.lost = True
                    return
        finally:
            db.close()

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop.set()
        self.thread.join()
