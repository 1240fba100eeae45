"""Crop, flip and normalise on the device, from a uint8 NHWC batch to float channels-last NCHW
(or contiguous NCHW with channels_last=False, as the CPU trains).

Plain torch ops (one gather, one fused-by-the-allocator affine); the single-pass Triton version
is fastres.kernels.augment, which DeviceAugment uses for CUDA tensors (backend="auto"). The
random parameters are drawn separately so tests can feed their own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fastres.study.protocol import CIFAR_MEAN, CIFAR_STD, PAD

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class AugmentParams:
    dy: torch.Tensor  # (B,) row offset into the padded image, 0..2*PAD
    dx: torch.Tensor  # (B,) column offset, 0..2*PAD
    flip: torch.Tensor  # (B,) bool: mirror left-right


def random_params(batch: int, crop: bool, flip: bool, device: torch.device,
                  generator: torch.Generator | None) -> AugmentParams:
    """Offsets uniform over the 9x9 positions of a 4-pixel padding (torchvision RandomCrop), and
    flips with p = 0.5, drawn from `generator` so a seed reproduces them."""
    def offsets() -> torch.Tensor:
        if not crop:
            return torch.full((batch,), PAD, device=device, dtype=torch.long)
        return torch.randint(0, 2 * PAD + 1, (batch,), device=device, generator=generator)

    dy, dx = offsets(), offsets()
    if flip:
        mirror = torch.rand(batch, device=device, generator=generator) < 0.5
    else:
        mirror = torch.zeros(batch, device=device, dtype=torch.bool)
    return AugmentParams(dy, dx, mirror)


def crop_flip(images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """uint8 (B, H, W, C) -> uint8 (B, H, W, C): the HxW window at (dy, dx) of the zero-padded
    image, mirrored where p.flip. Out-of-image pixels read as 0 (black), like RandomCrop's pad."""
    b, h, w, c = images.shape
    padded = images.new_zeros(b, h + 2 * PAD, w + 2 * PAD, c)
    padded[:, PAD:PAD + h, PAD:PAD + w] = images
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = p.dy[:, None] + ar_h  # (B, H)
    cols = torch.where(p.flip[:, None], w - 1 - ar_w, ar_w) + p.dx[:, None]  # (B, W)
    bi = torch.arange(b, device=images.device)[:, None, None]
    return padded[bi, rows[:, :, None], cols[:, None, :]]


@functools.lru_cache(maxsize=8)
def channel_constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as float32 tensors on `device`, made once: a tensor made from host numbers
    per batch is a host-to-device copy (and on a GPU a sync) before every step."""
    return (torch.tensor(mean, dtype=torch.float32, device=device),
            torch.tensor(std, dtype=torch.float32, device=device))


def normalize(images: torch.Tensor, dtype: torch.dtype, enabled: bool = True,
              mean: tuple[float, ...] = CIFAR_MEAN, std: tuple[float, ...] = CIFAR_STD
              ) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in channels-last memory: (x/255 - mean) / std."""
    x = images.to(torch.float32).div_(255.0)
    if enabled:
        m, s = channel_constants(tuple(mean), tuple(std), images.device)
        x = (x - m) / s
    # NHWC contiguous permuted to NCHW *is* channels-last: no copy.
    return x.to(dtype).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class DeviceAugment:
    """The train/test transform: each step switchable (the paper's Figure 7 turns them off)."""

    crop: bool = True
    flip: bool = True
    normalize: bool = True
    dtype: torch.dtype = torch.float32
    # "torch": the plain ops above; "triton": fastres.kernels.augment (one pass, an error where
    # Triton cannot run); "auto": triton for CUDA tensors, torch otherwise. Both draw the same
    # random parameters from the generator, so a seed gives the same crops either way.
    backend: str = "auto"
    # False: contiguous NCHW batches, for a model that does not run channels-last (the CPU:
    # a channels-last input would send oneDNN down its channels-last path anyway).
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def uses_triton(self, device: torch.device) -> bool:
        return self.backend == "triton" or (self.backend == "auto" and device.type == "cuda")

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 index: torch.Tensor | None = None) -> torch.Tensor:
        """Augment the batch `images`, or with `index` the batch images[index] of a whole
        uint8 dataset resident on the device (the Triton kernel gathers as it reads)."""
        batch = images.shape[0] if index is None else index.shape[0]
        if self.uses_triton(images.device):
            from fastres.kernels.augment import augment

            p = random_params(batch, self.crop, self.flip, images.device, generator)
            out = augment(images, p.dy, p.dx, p.flip, self.dtype, self.normalize, pad=PAD,
                          index=index)
        else:
            if index is not None:
                images = images[index]
            if self.crop or self.flip:
                p = random_params(images.shape[0], self.crop, self.flip, images.device,
                                  generator)
                images = crop_flip(images, p)
            out = normalize(images, self.dtype, self.normalize)
        return out if self.channels_last else out.contiguous()
