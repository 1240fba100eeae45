"""FFCV pipelines for CIFAR-10 betons: uint8 images and labels to the device, then the
device-side augmentation. One field, one short list of operations (the FFCV way)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

# Importing FFCV sets torch's intra-op thread count to 1, and every FFCV Loader sets it to its
# own worker count at each epoch. Keep the count torch had, and give the loaders that many
# workers by default, so FFCV's resets leave it where the user put it.
_threads = torch.get_num_threads()
from ffcv.fields.basics import IntDecoder  # noqa: E402
from ffcv.fields.rgb_image import SimpleRGBImageDecoder  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.transforms import Squeeze, ToDevice, ToTensor  # noqa: E402
from ffcv.traversal_order.base import TraversalOrder  # noqa: E402

torch.set_num_threads(_threads)

from fastres.loaders.augment import DeviceAugment  # noqa: E402
from fastres.loaders.order import permutation  # noqa: E402


class EpochPermutation(TraversalOrder):
    """FFCV traversal order: epoch e visits indices[permutation(len(indices), seed, e)] (seed:
    the Loader's), the order the resident loader uses too (fastres.loaders.order).

    ffcv 1.0.2's Loader takes a custom order only as an *instance*: it checks isinstance(order,
    TraversalOrder), then calls order(loader) and keeps the result (a class fails the check). So
    an unbound EpochPermutation() is what Loader(order=...) gets, and calling it returns a copy
    bound to that loader. The prototype stays reusable, as Loader.filter rebuilds from its args.
    Epochs: the Loader asks sample_order(next_epoch) on each iter() and then increments it, so
    setting next_epoch = k (a resume) makes the next pass epoch k.
    """

    def __init__(self, loader: Loader | None = None):
        if loader is not None:
            if loader.distributed:
                raise ValueError("EpochPermutation has no distributed mode")
            super().__init__(loader)  # takes the loader's indices and seed

    def __call__(self, loader: Loader) -> EpochPermutation:
        return EpochPermutation(loader)

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.indices[permutation(len(self.indices), self.seed, epoch)]


def beton_loader(beton: str | Path, batch_size: int, device: torch.device, shuffle: bool,
                 seed: int = 0, indices: Sequence[int] | None = None, num_workers: int = 0
                 ) -> Loader:
    """The FFCV Loader of one beton: uint8 (B, H, W, C) images and (B,) integer labels, copied to
    `device` when it is a GPU (host tensors otherwise), last partial batch kept. shuffle: the
    seeded EpochPermutation; else the stored order (of `indices`, when given)."""
    device = torch.device(device)
    to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    loader = Loader(
        str(beton), batch_size=batch_size, num_workers=num_workers or torch.get_num_threads(),
        order=EpochPermutation() if shuffle else OrderOption.SEQUENTIAL,
        drop_last=False, seed=seed, os_cache=True,
        indices=None if indices is None else np.asarray(indices),
        pipelines={"image": [SimpleRGBImageDecoder(), ToTensor(), *to_device],
                   "label": [IntDecoder(), ToTensor(), Squeeze(-1), *to_device]},
    )
    # FFCV does not bounds-check indices: one past the end reads whatever bytes lie there.
    n = loader.reader.num_samples
    if len(loader.indices) and not (0 <= loader.indices.min() and loader.indices.max() < n):
        raise ValueError(f"{beton}: indices must lie in 0..{n - 1}, got "
                         f"{loader.indices.min()}..{loader.indices.max()}")
    return loader


class CifarLoader:
    """Iterates (images, labels): float NCHW images (channels-last unless augment.channels_last
    is False) and int64 labels on `device`.

    train=True: order reshuffled every epoch (epoch e: fastres.loaders.order.permutation(n,
    seed, e)), last partial batch kept. train=False: sequential. `indices` selects a subset
    (smoke runs, tests).
    """

    def __init__(self, beton: str | Path, batch_size: int, train: bool, device: torch.device,
                 augment: DeviceAugment, seed: int = 0, indices: Sequence[int] | None = None,
                 num_workers: int = 0):
        self.device = torch.device(device)
        self.augment = augment
        self.train = train
        self.loader = beton_loader(beton, batch_size, self.device, train, seed, indices,
                                   num_workers)
        # Seeded per loader so a run's crops and flips are reproducible.
        self.generator = torch.Generator(device=self.device).manual_seed(seed + 1)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_samples(self) -> int:
        return len(self.loader.indices)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will use (it sets the shuffle order)."""
        return self.loader.next_epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.loader.next_epoch = value

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            # FFCV reuses its output buffers for later batches: take our own copy of the labels.
            yield self.augment(images, self.generator), labels.to(torch.long, copy=True)
