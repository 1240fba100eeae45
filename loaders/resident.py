"""A whole beton split resident on the device: read once, then every batch is an index slice
of it, gathered, cropped, flipped and normalised in one device pass (DeviceAugment's index=).

ResidentLoader yields exactly the stream loader's batches (CifarLoader: same seed, same order
from fastres.loaders.order, same generator draws), so the placement changes speed, not results.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastres.loaders.augment import DeviceAugment
from fastres.loaders.cifar import beton_loader
from fastres.loaders.order import permutation

READ_BATCH = 2048  # one sequential pass in big batches: few Python steps, small FFCV buffers
FREE_SHARE = 4  # resident only if the data takes under 1/FREE_SHARE of the free device memory


@dataclass(frozen=True)
class ResidentData:
    """uint8 images (N, H, W, C) and int64 labels (N,) of one split, on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_beton(cls, beton: str | Path, device: torch.device,
                   indices: Sequence[int] | None = None, num_workers: int = 0) -> ResidentData:
        """Read `beton` (only `indices`, in that order, when given) in one sequential FFCV pass
        on the host, then copy it to `device` once."""
        loader = beton_loader(beton, READ_BATCH, torch.device("cpu"), False, 0, indices,
                              num_workers)
        n = len(loader.indices)
        images: torch.Tensor | None = None
        labels = torch.empty(n, dtype=torch.int64)
        start = 0
        for x, y in loader:
            if images is None:
                images = torch.empty((n, *x.shape[1:]), dtype=torch.uint8)
            # FFCV reuses its batch buffers: copy each batch out before the next one comes.
            images[start:start + len(x)] = x
            labels[start:start + len(y)] = y
            start += len(x)
        if images is None or start != n:
            raise ValueError(f"{beton}: read {start} of {n} samples")
        device = torch.device(device)
        return cls(images.to(device), labels.to(device))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.labels.nbytes

    @property
    def device(self) -> torch.device:
        return self.images.device


def resident_bytes(beton: str | Path, indices: Sequence[int] | None = None) -> int:
    """Bytes ResidentData.from_beton would take, from the beton's header alone (for fits())."""
    from ffcv.reader import Reader

    meta = Reader(str(beton)).metadata
    n = len(meta) if indices is None else len(indices)
    h, w = int(meta["f0"]["height"].max()), int(meta["f0"]["width"].max())
    return n * (h * w * 3 + 8)  # uint8 RGB image + int64 label


def fits(data_bytes: int, device: torch.device) -> bool:
    """Whether `data_bytes` of resident data leaves room to train: on a GPU, under a quarter of
    its free memory (activations, the model, cuDNN workspaces and the allocator's slack need
    the rest); elsewhere the data sits in host memory, which the stream loader needs too."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(device)
    return data_bytes * FREE_SHARE < free


class ResidentLoader:
    """CifarLoader's interface over ResidentData: iterates (augmented float images, int64
    labels) on `device`.

    train=True: epoch e visits permutation(n, seed, e) (copied to the device once per epoch),
    last partial batch kept. train=False: sequential. No host synchronisation inside an epoch:
    batches are slices of the device-side order, and the batch sizes are known on the host.
    """

    def __init__(self, data: ResidentData, batch_size: int, train: bool, device: torch.device,
                 augment: DeviceAugment, seed: int = 0):
        self.device = torch.device(device)
        self.images = data.images.to(self.device)  # no copy when already there
        self.labels = data.labels.to(self.device)
        self.batch_size, self.train, self.augment, self.seed = batch_size, train, augment, seed
        self.epoch = 0  # the epoch the next iteration will use (it sets the shuffle order)
        # Seeded as CifarLoader's, and drawn from per batch the same way: the same crops.
        self.generator = torch.Generator(device=self.device).manual_seed(seed + 1)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A generator, like CifarLoader's: the epoch advances when the first batch is drawn.
        order = None
        if self.train:
            order = torch.from_numpy(permutation(self.num_samples, self.seed, self.epoch))
            if self.device.type == "cuda":  # from pinned memory: a copy from pageable syncs
                order = order.pin_memory().to(self.device, non_blocking=True)
            else:
                order = order.to(self.device)
        self.epoch += 1
        for start in range(0, self.num_samples, self.batch_size):
            if order is None:
                # A slice of the contiguous dataset is itself a contiguous batch: no gather.
                yield (self.augment(self.images[start:start + self.batch_size], self.generator),
                       self.labels[start:start + self.batch_size])
            else:
                index = order[start:start + self.batch_size]
                yield self.augment(self.images, self.generator, index=index), self.labels[index]
