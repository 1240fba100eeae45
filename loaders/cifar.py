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

torch.set_num_threads(_threads)

from fastres.loaders.augment import DeviceAugment  # noqa: E402

TRAIN_BATCH = 128
TEST_BATCH = 100


class CifarLoader:
    """Iterates (images, labels): float NCHW images (channels-last unless augment.channels_last
    is False) and int64 labels on `device`.

    train=True: order reshuffled every epoch (seeded: epoch e uses seed + e), last partial batch
    kept. train=False: sequential. `indices` selects a subset (smoke runs, tests).
    """

    def __init__(self, beton: str | Path, batch_size: int, train: bool, device: torch.device,
                 augment: DeviceAugment, seed: int = 0, indices: Sequence[int] | None = None,
                 num_workers: int = 0):
        self.device = torch.device(device)
        self.augment = augment
        self.train = train
        on_gpu = self.device.type == "cuda"
        to_device = [ToDevice(self.device, non_blocking=True)] if on_gpu else []
        self.loader = Loader(
            str(beton), batch_size=batch_size, num_workers=num_workers or torch.get_num_threads(),
            order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
            drop_last=False, seed=seed, os_cache=True,
            indices=None if indices is None else np.asarray(indices),
            pipelines={"image": [SimpleRGBImageDecoder(), ToTensor(), *to_device],
                       "label": [IntDecoder(), ToTensor(), Squeeze(-1), *to_device]},
        )
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
