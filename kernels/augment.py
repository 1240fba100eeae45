"""Device-side augmentation in one pass: uint8 NHWC images (a batch, or gathered by index from the
whole dataset resident on the device) -> random crop from the zero-padded image -> horizontal
flip -> (x / 255 - mean) / std -> fp32 or bf16, written as NCHW in channels-last memory.

Each program writes BLOCK consecutive output elements of one image; each element computes its
source pixel from the image's (dy, dx, flip) and reads a zero where that pixel lies in the
padding, so the padded image is never built. The random parameters are drawn by torch on the
device (fastres.loaders.augment.random_params), so a seeded generator reproduces them and tests
can feed their own. No autograd: the input is data.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fastres.kernels._common import cast, check_device, define_op, empty, launch, next_pow2
from fastres.study.protocol import CIFAR_MEAN, CIFAR_STD, PAD


@functools.lru_cache(maxsize=8)
def _channel_constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a tensor made from host numbers per batch is a host-to-device copy
    # (a sync on a GPU) before every step. Its own cache, not the loader's: kernels import no
    # loader (the loader picks this kernel, fastres.loaders.augment.DeviceAugment).
    return (torch.tensor(mean, dtype=torch.float32, device=device),
            torch.tensor(std, dtype=torch.float32, device=device))


@triton.jit
def _augment_kernel(src_ptr, idx_ptr, dy_ptr, dx_ptr, flip_ptr, mean_ptr, std_ptr, out_ptr,
                    H, W, C, PAD, NORMALIZE: tl.constexpr, GATHER: tl.constexpr,
                    BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    hwc = H * W * C
    mask = offs < hwc
    c = offs % C
    pix = offs // C
    oh = pix // W
    ow = pix % W
    if GATHER:
        img = tl.load(idx_ptr + b).to(tl.int64)
    else:
        img = b.to(tl.int64)
    dy = tl.load(dy_ptr + b).to(tl.int32)
    dx = tl.load(dx_ptr + b).to(tl.int32)
    flip = tl.load(flip_ptr + b)
    # Crop then mirror: output column ow reads crop column W-1-ow when flipped.
    col = tl.where(flip != 0, W - 1 - ow, ow)
    ih = oh + dy - PAD
    iw = col + dx - PAD
    inside = mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    v = tl.load(src_ptr + img * hwc + (ih * W + iw) * C + c, mask=inside, other=0)
    v = v.to(tl.float32) / 255.0
    if NORMALIZE:
        # Same operation order as the plain-torch path: (x/255 - mean) / std.
        v = (v - tl.load(mean_ptr + c, mask=mask, other=0.0)) / tl.load(std_ptr + c, mask=mask,
                                                                        other=1.0)
    tl.store(out_ptr + b.to(tl.int64) * hwc + offs, cast(v, out_ptr.dtype.element_ty), mask=mask)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _impl(images: torch.Tensor, index: torch.Tensor | None, dy: torch.Tensor, dx: torch.Tensor,
          flip: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, pad: int, normalize: bool,
          dtype: str) -> torch.Tensor:
    check_device(images)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError(f"images must be uint8 (N, H, W, C), got {images.dtype} "
                        f"{tuple(images.shape)}")
    _n, h, w, c = images.shape
    b = index.shape[0] if index is not None else images.shape[0]
    out = empty((b, h, w, c), _DTYPES[dtype], images.device)
    block = min(next_pow2(h * w * c), 4096)
    if b:
        launch(_augment_kernel)[(b, triton.cdiv(h * w * c, block))](
            images.contiguous(), index if index is not None else dy, dy, dx, flip, mean, std,
            out, h, w, c, pad, NORMALIZE=normalize, GATHER=index is not None, BLOCK=block)
    return out.permute(0, 3, 1, 2)


def _fake(images, index, dy, dx, flip, mean, std, pad, normalize, dtype):
    _n, h, w, c = images.shape
    b = index.shape[0] if index is not None else images.shape[0]
    return images.new_empty((b, h, w, c), dtype=_DTYPES[dtype]).permute(0, 3, 1, 2)


_op = define_op("augment", _impl, _fake)


def augment(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
            dtype: torch.dtype = torch.float32, normalize: bool = True,
            mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD, pad: int = PAD,
            index: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (N, H, W, C) -> dtype (B, C, H, W), channels-last. Image i of the output is
    images[index[i]] (or images[i] without `index`), cropped at offset (dy[i], dx[i]) of the
    image zero-padded by `pad` on each side (pad, pad is the uncropped centre), mirrored where
    flip[i], then normalised by mean / std per channel (or only scaled to [0, 1])."""
    name = {v: k for k, v in _DTYPES.items()}.get(dtype)
    if name is None:
        raise TypeError(f"augment writes {', '.join(_DTYPES)}, not {dtype}")
    m, s = _channel_constants(tuple(mean), tuple(std), images.device)
    return _op(images, index, dy, dx, flip.to(torch.uint8), m, s, pad, normalize, name)
