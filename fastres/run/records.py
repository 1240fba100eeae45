"""What a run produces, and where a resumable run keeps its state: plain records with no torch,
so results stores, reports and live displays read them without the training stack or FFCV; and
the results folder's error and its one rule for Ray workers, shared by the store
(fastres.run.results) and the checkpoint files it points at (fastres.run.checkpoints).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# Set in the runtime_env of every Ray task and actor of the grid: SQLite's locking is unreliable
# on network filesystems, so in Ray mode the results folder belongs to the driver alone.
RAY_WORKER_ENV = "FASTRES_RAY_WORKER"


class ResultsError(RuntimeError):
    """A results folder that cannot be used as asked; the message says why."""


def refuse_in_ray_worker(folder: Path) -> None:
    """A Ray worker of the grid never touches the results folder (a bug if it tries)."""
    if os.environ.get(RAY_WORKER_ENV):
        raise ResultsError(f"a Ray worker may not open the results folder {folder}: in Ray mode "
                           "only the driver writes results (epochs and checkpoints go through "
                           "the driver's run store)")


@dataclass
class EpochMetrics:
    epoch: int  # 1-based
    lr: float  # the rate used during this epoch
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    seconds: float


@dataclass
class RunResult:
    config: dict
    status: str  # "completed" or "diverged"
    epochs: list[EpochMetrics]
    best_acc: float | None
    best_epoch: int | None  # 1-based
    loss_at_best: float | None
    diverged_at: int | None
    environment: dict
    data: dict

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["epochs"] = [dataclasses.asdict(e) for e in self.epochs]
        return d


def finite(m: EpochMetrics) -> bool:
    return math.isfinite(m.train_loss) and math.isfinite(m.test_loss)


def best_of(epochs: list[EpochMetrics]) -> tuple[float | None, int | None, float | None]:
    """Best test accuracy, its 1-based epoch (the first if tied) and the test loss there."""
    candidates = [e for e in epochs if math.isfinite(e.test_loss)]
    if not candidates:
        return None, None, None
    best = max(candidates, key=lambda e: (e.test_acc, -e.epoch))
    return best.test_acc, best.epoch, best.test_loss


class Checkpointer(Protocol):
    """Where a resumable run keeps its metrics and state (fastres.run.results implements it on
    SQLite, fastres.grid.cluster through the Ray driver). Metrics are recorded every epoch; the
    state only on the trainer's time cadence, so the state may lag the metrics by a few epochs."""

    def load(self) -> tuple[dict, list[EpochMetrics]] | None:
        """The last saved state (after epoch k, state["epoch"] == k) and the metrics of epochs
        1..k, or None to start afresh. Metrics recorded after epoch k are dropped: the resumed
        run computes them again."""

    def record(self, metrics: EpochMetrics) -> None:
        """Commit one epoch's metrics (replacing any row of that epoch or later)."""

    def save(self, epoch: int, state: bytes, best: bytes | None) -> None:
        """Make `state` (fastres.run.checkpoints.to_bytes of the state after `epoch`) the run's
        checkpoint, atomically and checked by sha256; with `best` (the best epoch's model
        weights, same encoding) also its best.pt. Called from the background writer thread, at
        most one call at a time."""
