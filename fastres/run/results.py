"""The results folder: one SQLite database (runs, epochs, leases) and per-run checkpoints.

Every epoch commits its checkpoint file first (temp file, fsync, rename) and then, in one
transaction, its metrics row and the reference to that file. A `kill -9` at any moment therefore
loses at most the epoch in flight: the database never points at a file that is not whole, and a
file that is whole but unreferenced is simply written again. Leases with a heartbeat keep two
grid processes from training the same run; a dead owner's lease is taken over. In Ray mode only
the driver opens this folder (fastres/grid/cluster.py): a Ray worker that tries gets a ResultsError.
"""

from __future__ import annotations

import errno
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
from urllib.parse import quote

from fastres.run.records import EpochMetrics, ResultsError, RunResult, refuse_in_ray_worker

SCHEMA_VERSION = 2
# Schema 1 lacked best_sha (best.pt arrived with schema 2): opened for writing, it gains it.
MIGRATIONS = {"1": ["ALTER TABLE runs ADD COLUMN best_sha TEXT"]}
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
    checkpoint TEXT, checkpoint_sha TEXT,  -- the last saved state (epoch-NNNN.pt)
    best_sha TEXT,                         -- best.pt beside it: the best epoch's weights
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


class DiskFull(ResultsError):
    """The results folder's filesystem is full: the grid stops rather than fail every cell."""


# Errors a full filesystem (or quota) gives: the write cannot succeed until space is freed.
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _sqlite_full(e: BaseException) -> bool:
    return isinstance(e, sqlite3.OperationalError) and "disk is full" in str(e)  # SQLITE_FULL


def folder_full(folder: Path, reason: object) -> DiskFull:
    return DiskFull(f"results folder is full: cannot write to {folder} ({reason}); free some "
                    "space or choose another folder with --results DIR, then rerun to resume")


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


LOCK_WAIT = 60.0  # seconds to wait for another process's write lock before saying so


class StoreLocked(ResultsError):
    """Another program has held a write lock on the database for longer than LOCK_WAIT."""


def _locked(e: BaseException) -> bool:
    return isinstance(e, sqlite3.OperationalError) and "locked" in str(e)


def store_locked(path: Path) -> StoreLocked:
    return StoreLocked(f"{path} is locked: another program has held a write transaction on it "
                       f"for over {LOCK_WAIT:g} s (an sqlite3 shell or database browser with "
                       "uncommitted changes, say); commit or close it there, then rerun (nothing "
                       "recorded so far is lost; a rerun resumes)")


def _when_unlocked(op, seconds: float | None = None):
    """op(), retried while SQLite says the database is locked (another process is creating or
    converting it), for up to `seconds` (LOCK_WAIT)."""
    deadline = time.monotonic() + (LOCK_WAIT if seconds is None else seconds)
    pause = 0.01
    while True:
        try:
            return op()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.5)


class ResultsDB:
    """A results folder. Each instance holds its own connection (one per process or thread).
    readonly=True (reports) opens the database with SQLite's mode=ro and writes nothing."""

    def __init__(self, folder: str | os.PathLike, readonly: bool = False):
        self.folder = Path(folder)
        refuse_in_ray_worker(self.folder)
        self.path = self.folder / DB_NAME
        self.readonly = readonly
        if readonly:
            self._open_readonly()
            return
        self._probe()
        # Never open() the database file ourselves: closing any descriptor of it drops every
        # POSIX lock this process holds on it, including those of live SQLite connections.
        self.conn = sqlite3.connect(self.path, timeout=LOCK_WAIT, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        try:
            self.conn.execute(f"PRAGMA busy_timeout = {int(LOCK_WAIT * 1000)}")
            _when_unlocked(self._check_foreign)
            # Switching to WAL takes an exclusive lock, and SQLite may answer a process creating
            # the same database at the same moment with "database is locked" at once, without
            # its busy handler: wait for the other process instead.
            _when_unlocked(lambda: self.conn.execute("PRAGMA journal_mode = WAL"))
            self.conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.DatabaseError as e:  # "file is not a database"
            self.conn.close()
            if _locked(e):
                raise store_locked(self.path) from None
            if _sqlite_full(e):
                raise folder_full(self.folder, e) from None
            raise ResultsError(f"{self.path} is not an SQLite database ({e}); refusing to touch "
                               "it (choose another folder with --results DIR)") from None
        except ResultsError:
            self.conn.close()
            raise
        try:
            # Tables and their meta rows in one transaction: a process opening the folder at the
            # same moment sees either nothing or a whole fastres database (IF NOT EXISTS and
            # OR IGNORE throughout: safe to race).
            _when_unlocked(self._create)
        except (sqlite3.OperationalError, DiskFull) as e:
            self.conn.close()
            if _sqlite_full(e):
                raise folder_full(self.folder, e) from None
            if _locked(e):
                raise store_locked(self.path) from None
            raise

    def _create(self) -> None:
        try:
            self.conn.executescript(
                f"BEGIN IMMEDIATE; {SCHEMA} INSERT OR IGNORE INTO meta VALUES ('app', 'fastres'); "
                f"INSERT OR IGNORE INTO meta VALUES ('schema', '{SCHEMA_VERSION}'); COMMIT;")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    def _probe(self) -> None:
        """Fail early, naming the folder, where it cannot be written."""
        probe = self.folder / f".write-test-{os.getpid()}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
        except OSError as e:
            if e.errno in FULL_ERRNOS:
                raise folder_full(self.folder, e.strerror or e) from None
            raise ResultsError(f"results folder {self.folder} is not writable: {e.strerror or e}"
                               " (choose another with --results DIR)") from None
        finally:  # also when the write failed half-way (a full disk creates, then cannot write)
            try:
                probe.unlink(missing_ok=True)
            except OSError:
                pass

    def _open_readonly(self) -> None:
        if not self.path.is_file():
            raise ResultsError(f"{self.folder} holds no fastres results ({DB_NAME} is missing)")
        uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        for extra in ("", "&immutable=1"):
            self.conn = sqlite3.connect(uri + extra, uri=True, timeout=60, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            try:
                self._check_foreign()
                break
            except sqlite3.OperationalError as e:
                self.conn.close()
                # A WAL database in a read-only folder whose -shm file is gone (the last writer
                # closed cleanly) cannot be opened shared; nobody can write there, so reading it
                # as immutable is safe.
                if extra or "unable to open" not in str(e):
                    raise ResultsError(f"cannot read {self.path}: {e}") from None
            except sqlite3.DatabaseError as e:
                self.conn.close()
                raise ResultsError(f"{self.path} is not an SQLite database ({e})") from None
            except ResultsError:
                self.conn.close()
                raise
        if "runs" not in {r[0] for r in self.conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}:
            self.conn.close()
            raise ResultsError(f"{self.folder} holds no fastres results yet")

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
        if meta.get("schema") in MIGRATIONS and not self.readonly:
            with self.transaction(immediate=True):
                if dict(self.conn.execute("SELECT key, value FROM meta").fetchall()).get(
                        "schema") in MIGRATIONS:  # not migrated by another process meanwhile
                    for statement in MIGRATIONS[meta["schema"]]:
                        self.conn.execute(statement)
                    self.conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'",
                                      (str(SCHEMA_VERSION),))
            return
        if meta.get("schema") not in (str(SCHEMA_VERSION), *(MIGRATIONS if self.readonly else ())):
            raise ResultsError(f"{self.path} has fastres schema {meta.get('schema')}, this "
                               f"version reads schema {SCHEMA_VERSION}")

    def transaction(self, immediate: bool = False) -> _Transaction:
        return _Transaction(self.conn, immediate, self.folder)

    def close(self) -> None:
        self.conn.close()

    def note(self, key: str, value: dict) -> None:
        """Keep a decision the grid made (say, how it sized a structure's arrays) beside the
        runs, as JSON under `key` in the meta table; a later grid replaces it."""
        with self.transaction(immediate=True):
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                              (f"note:{key}", json.dumps(value, sort_keys=True)))

    def notes(self) -> dict[str, dict]:
        rows = self.conn.execute("SELECT key, value FROM meta WHERE key LIKE 'note:%'")
        return {k[len("note:"):]: json.loads(v) for k, v in rows.fetchall()}

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
        """'acquired', 'done' (finished), 'failed' (failed max_attempts times: it stays failed
        until retry_failed) or 'busy' (a live owner has it)."""
        now = time.time()
        with self.transaction(immediate=True):
            r = self.run(run_id)
            if r is None:
                raise ResultsError(f"run {run_id} is not registered")
            if r["status"] in DONE:
                return "done"
            if r["status"] == "failed" and max_attempts is not None \
                    and r["attempts"] >= max_attempts:
                return "failed"
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

    def commit_epoch(self, run_id: str, owner: str, m: EpochMetrics,
                     checkpoint: Path | None = None, sha: str | None = None,
                     ttl: float = LEASE_TTL) -> None:
        """Record one epoch's metrics (and, if given, make `checkpoint` the run's state).
        Idempotent per (run, epoch): a run resumed from an earlier checkpoint replaces the rows
        from this epoch on, so no epoch is ever recorded twice."""
        now = time.time()
        with self.transaction(immediate=True):
            self._check_owner(run_id, owner)
            self.conn.execute("DELETE FROM epochs WHERE run_id = ? AND epoch >= ?",
                              (run_id, m.epoch))
            self.conn.execute("INSERT INTO epochs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                              (run_id, m.epoch, m.lr, m.train_loss, m.train_acc, m.test_loss,
                               m.test_acc, m.seconds, now))
            self.conn.execute(
                "UPDATE runs SET epochs_done = ?, "
                "train_seconds = (SELECT SUM(seconds) FROM epochs WHERE run_id = ?), "
                "lease_expires = ?, updated_at = ? WHERE run_id = ?",
                (m.epoch, run_id, now + ttl, now, run_id))
            if checkpoint is not None:
                self._point(run_id, checkpoint, sha, None)

    def set_checkpoint(self, run_id: str, owner: str, checkpoint: Path, sha: str,
                       best_sha: str | None) -> None:
        """Make `checkpoint` (and best.pt, when best_sha is given) the run's saved state."""
        with self.transaction(immediate=True):
            self._check_owner(run_id, owner)
            self._point(run_id, checkpoint, sha, best_sha)

    def _point(self, run_id: str, checkpoint: Path, sha: str | None,
               best_sha: str | None) -> None:
        self.conn.execute(
            "UPDATE runs SET checkpoint = ?, checkpoint_sha = ?, "
            "best_sha = COALESCE(?, best_sha), updated_at = ? WHERE run_id = ?",
            (str(checkpoint.relative_to(self.folder)), sha, best_sha, time.time(), run_id))

    def truncate(self, run_id: str, owner: str, epochs: int) -> None:
        """Forget the epoch rows after `epochs` (recorded after the last saved state): the
        resumed run computes them again."""
        with self.transaction(immediate=True):
            self._check_owner(run_id, owner)
            self.conn.execute("DELETE FROM epochs WHERE run_id = ? AND epoch > ?",
                              (run_id, epochs))
            self.conn.execute(
                "UPDATE runs SET epochs_done = ?, train_seconds = COALESCE((SELECT SUM(seconds) "
                "FROM epochs WHERE run_id = ?), 0), updated_at = ? WHERE run_id = ?",
                (epochs, run_id, time.time(), run_id))

    def note_attempt(self, run_id: str, owner: str, where: dict, retry: bool) -> None:
        """Record where the run's current attempt runs (its Ray node, host and pid, kept in
        `environment` until the result replaces it); a retry (Ray rerunning the task of a dead
        worker or node, under this owner's lease) counts as one more attempt."""
        with self.transaction(immediate=True):
            self._check_owner(run_id, owner)
            self.conn.execute(
                "UPDATE runs SET environment = ?, attempts = attempts + ?, updated_at = ? "
                "WHERE run_id = ?", (json.dumps(where), int(retry), time.time(), run_id))

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

    def release(self, run_id: str, owner: str, status: str = "interrupted") -> None:
        """Give a run back unfinished (interrupted, or stopped by a full disk): no lease, and the
        attempt not counted, so a rerun resumes it from its last committed epoch."""
        with self.transaction(immediate=True):
            self.conn.execute(
                "UPDATE runs SET status = ?, lease_owner = NULL, lease_expires = NULL, "
                "attempts = MAX(attempts - 1, 0), updated_at = ? "
                "WHERE run_id = ? AND lease_owner = ?", (status, time.time(), run_id, owner))

    def retry_failed(self, run_ids: list[str]) -> int:
        """Forget the attempts of these runs where they failed; returns how many there were."""
        with self.transaction(immediate=True):
            return self.conn.executemany(
                "UPDATE runs SET attempts = 0 WHERE run_id = ? AND status = 'failed'",
                [(r,) for r in run_ids]).rowcount

    def reset(self, run_id: str, owner: str) -> None:
        """Forget a run's epochs (its checkpoint is unusable): it starts again from epoch 1."""
        with self.transaction(immediate=True):
            self._check_owner(run_id, owner)
            self.conn.execute("DELETE FROM epochs WHERE run_id = ?", (run_id,))
            self.conn.execute("UPDATE runs SET epochs_done = 0, checkpoint = NULL, "
                              "checkpoint_sha = NULL, best_sha = NULL, train_seconds = 0 "
                              "WHERE run_id = ?",
                              (run_id,))


class _Transaction:
    def __init__(self, conn: sqlite3.Connection, immediate: bool, folder: Path):
        self.conn, self.immediate, self.folder = conn, immediate, folder

    def __enter__(self) -> None:
        # IMMEDIATE takes the write lock up front, so read-then-write is atomic across processes.
        try:
            self.conn.execute("BEGIN IMMEDIATE" if self.immediate else "BEGIN")
        except sqlite3.OperationalError as e:
            if _locked(e):
                raise store_locked(self.folder / DB_NAME) from None
            raise

    def __exit__(self, exc_type, exc, _tb) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
            except sqlite3.OperationalError as e:
                if not (_sqlite_full(e) or _locked(e)):
                    raise
                exc = e
            else:
                return
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        if exc is not None and _sqlite_full(exc):  # "database or disk is full"
            raise folder_full(self.folder, exc) from None
        # A deferred BEGIN takes the write lock at its first write: locked there, or at COMMIT.
        if exc is not None and _locked(exc):
            raise store_locked(self.folder / DB_NAME) from None


class RunCheckpointer:
    """The trainer's Checkpointer (fastres.run.records) for one leased run of a ResultsDB: metrics
    rows through this connection, saved states through a connection of the writer thread's
    own (an SQLite connection belongs to its thread)."""

    def __init__(self, db: ResultsDB, run_id: str, owner: str, log=print):
        self.db, self.run_id, self.owner, self.log = db, run_id, owner, log
        self.folder = db.folder / "checkpoints" / run_id
        # db belongs to the thread that made this object (the Ray driver saves there); a writer
        # thread opens a connection of its own, dropped (and closed) with this object or thread.
        self._home = threading.get_ident()
        self._local = threading.local()

    def _restart(self, label: str, why: str) -> None:
        msg = f"run {label}: {why}; restarting it from epoch 1"
        warnings.warn(msg, stacklevel=3)
        self.log(f"[grid] warning: {msg}")
        self.db.reset(self.run_id, self.owner)
        for old in self.folder.glob("*.pt"):  # none is usable any more
            old.unlink(missing_ok=True)

    def load(self) -> tuple[dict, list[EpochMetrics]] | None:
        from fastres.run.checkpoints import load_checkpoint  # torch: not for readers of results

        r = self.db.run(self.run_id)
        if r is None or (r["epochs_done"] == 0 and r["checkpoint"] is None):
            return None
        history = self.db.epochs(self.run_id)
        if r["checkpoint"] is None:  # metrics recorded, but killed before the first save
            self._restart(r["label"], f"no state was saved yet ({len(history)} epoch(s) "
                          "recorded before the first checkpoint)")
            return None
        try:
            state = load_checkpoint(self.db.folder / r["checkpoint"], r["checkpoint_sha"])
            k = state.get("epoch")
            # Exactly epochs 1..n: a count alone misses a gap, which would fail every rerun.
            recorded = [m.epoch for m in history]
            if recorded != list(range(1, len(recorded) + 1)):
                raise ResultsError(f"its epoch rows in the database are "
                                   f"{_epoch_list(recorded)}, not 1..{len(recorded)}")
            if not isinstance(k, int) or not 1 <= k <= len(recorded):
                raise ResultsError(f"its checkpoint is of epoch {k}, while the database "
                                   f"records epochs 1..{len(recorded)}")
        except ResultsError as e:
            self._restart(r["label"], str(e))
            return None
        if len(history) > k:  # recorded after the last saved state: computed again
            self.db.truncate(self.run_id, self.owner, k)
            history = history[:k]
        for old in self.folder.glob("epoch-*.pt"):  # strays of a write that was never committed
            if old != self.db.folder / r["checkpoint"]:
                old.unlink(missing_ok=True)
        return state, history

    def record(self, metrics: EpochMetrics) -> None:
        self.db.commit_epoch(self.run_id, self.owner, metrics)

    def save(self, epoch: int, state: bytes, best: bytes | None) -> None:
        """Write the state (and best.pt), then point the run at it; from the writer thread."""
        from fastres.run.checkpoints import save_checkpoint

        db = self.db if threading.get_ident() == self._home else getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = ResultsDB(self.db.folder)
        path = self.folder / f"epoch-{epoch:04d}.pt"
        try:
            sha = save_checkpoint(path, state)
            best_sha = save_checkpoint(self.folder / "best.pt", best) if best else None
        except OSError as e:
            try:
                path.unlink(missing_ok=True)
            except OSError:  # e.g. the run's folder is not a folder: the write's error says so
                pass
            if e.errno in FULL_ERRNOS:
                label = (db.run(self.run_id) or {}).get("label", self.run_id)
                raise DiskFull(f"no space left writing the checkpoint of {label} (run "
                               f"{self.run_id}) in {self.folder}: {e.strerror or e}; free some "
                               "space, then rerun to resume") from None
            raise
        try:
            db.set_checkpoint(self.run_id, self.owner, path, sha, best_sha)
        except LeaseLost:
            raise  # the file at this path may now be the new owner's
        except BaseException:
            # Not recorded: the file would be a stray (the database still names the last one).
            path.unlink(missing_ok=True)
            raise
        for old in self.folder.glob("epoch-*.pt"):  # only the referenced one is worth keeping
            if old != path:
                old.unlink(missing_ok=True)


def _epoch_list(epochs: list[int], most: int = 8) -> str:
    shown = ", ".join(map(str, epochs[:most]))
    return (shown + (f", ... ({len(epochs)} rows)" if len(epochs) > most else "")) or "none"


class Heartbeat:
    """Keeps a lease alive from a thread with its own connection while a run trains."""

    def __init__(self, folder: Path, run_id: str, owner: str, ttl: float = LEASE_TTL):
        self.args = (folder, run_id, owner, ttl)
        self.stop = threading.Event()
        self.lost = False
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        folder, run_id, owner, ttl = self.args
        try:
            db = ResultsDB(folder)
        except ResultsError:  # e.g. a full disk: the run itself will meet it and say so
            return
        try:
            while not self.stop.wait(ttl / 4):
                try:
                    if not db.heartbeat(run_id, owner, ttl):
                        self.lost = True
                        return
                except (sqlite3.OperationalError, DiskFull):
                    continue  # busy or full for now: the next beat tries again
        finally:
            db.close()

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop.set()
        self.thread.join()
