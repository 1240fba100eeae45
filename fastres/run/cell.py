"""A run as the study names it: its cell (structure, optimizer, augmentation, normalisation,
T_max, seed), the protocol it shares with the rest of its grid, its run id, and Cell.config, the
one way a run is configured (the grid's cells and `python -m fastres.train` alike). No torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from fastres.run.config import TrainConfig
from fastres.study.protocol import EPOCHS, TEST_BATCH, TMAX, TRAIN_BATCH, WEIGHT_DECAY
from fastres.study.structures import ResNetSpec


@dataclass(frozen=True)
class GridProtocol:
    """What every cell shares and results must not be mixed across."""

    epochs: int = EPOCHS
    lr: float | None = None
    weight_decay: float = WEIGHT_DECAY
    batch_size: int = TRAIN_BATCH
    test_batch_size: int = TEST_BATCH
    train_subset: int | None = None
    test_subset: int | None = None
    data: str = ""  # identity of the prepared data (BetonPair.identity)
    data_kind: str = ""

    @property
    def id(self) -> str:
        return _digest(asdict(self))


@dataclass(frozen=True)
class Cell:
    """What varies across the grid."""

    spec: ResNetSpec
    structure: int | None  # Table 1 number, None for a custom spec
    optimizer: str
    augment: bool = True
    normalize: bool = True
    tmax: int = TMAX
    seed: int = 0

    @property
    def label(self) -> str:
        name = f"s{self.structure}" if self.structure else f"[{self.spec}]"
        return (f"{name} {self.optimizer} aug={'on' if self.augment else 'off'}"
                f"{'' if self.normalize else ' norm=off'} tmax={self.tmax} seed={self.seed}")

    def to_dict(self) -> dict:
        return {**asdict(self), "spec": self.spec.to_dict()}

    def config(self, protocol: GridProtocol, compute: dict) -> TrainConfig:
        """This cell's run under `protocol`, computed as `compute` (TrainConfig keywords: device,
        precision, kernels, ...) says: how every worker, the grid's up-front check and
        `python -m fastres.train` build a run."""
        p = protocol
        return TrainConfig(spec=self.spec, structure=self.structure, optimizer=self.optimizer,
                           augment=self.augment, normalize=self.normalize, epochs=p.epochs,
                           tmax=self.tmax, lr=p.lr, weight_decay=p.weight_decay, seed=self.seed,
                           batch_size=p.batch_size, test_batch_size=p.test_batch_size,
                           train_subset=p.train_subset, test_subset=p.test_subset, **compute)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def run_id(cell: Cell, protocol: GridProtocol) -> str:
    return _digest({"cell": cell.to_dict(), "protocol": asdict(protocol)})
