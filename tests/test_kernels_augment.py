"""fastres.kernels.augment against the plain-torch path and a torchvision-style reference.

Tolerances: fp32 1e-6 (the same operations in the same order; a GPU's division may differ by an
ulp); bf16 one bf16 ulp (rtol 2**-7), since a 1-ulp fp32 difference can round either way.
"""

import pytest
import torch
import torch.nn.functional as F

from fastres.kernels._common import poison_outputs
from fastres.kernels.augment import augment
from fastres.loaders.augment import (
    CIFAR_MEAN,
    CIFAR_STD,
    PAD,
    AugmentParams,
    DeviceAugment,
    crop_flip,
    normalize,
    random_params,
)

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=2**-7, atol=0.0)}


@pytest.fixture(autouse=True)
def poisoned():
    with poison_outputs():
        yield


def images(n: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8).to(DEV)


def torchvision_style(img: torch.Tensor, dy: int, dx: int, flip: bool, dtype: torch.dtype,
                      norm: bool = True) -> torch.Tensor:
    """RandomCrop(padding=4) -> RandomHorizontalFlip -> ToTensor -> Normalize, on one HWC image."""
    h, w = img.shape[:2]
    chw = F.pad(img.permute(2, 0, 1), (PAD, PAD, PAD, PAD), value=0)[:, dy:dy + h, dx:dx + w]
    if flip:
        chw = chw.flip(2)
    x = chw.float() / 255
    if norm:
        x = (x - torch.tensor(CIFAR_MEAN, device=DEV)[:, None, None]) \
            / torch.tensor(CIFAR_STD, device=DEV)[:, None, None]
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_offset_and_flip(dtype):
    imgs = images(2 * 81)
    dy = torch.arange(9).repeat_interleave(9).repeat(2).to(DEV)
    dx = torch.arange(9).repeat(9).repeat(2).to(DEV)
    flip = (torch.arange(162) >= 81).to(DEV)
    out = augment(imgs, dy, dx, flip, dtype)
    assert out.shape == (162, 3, 32, 32) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    plain = normalize(crop_flip(imgs, AugmentParams(dy, dx, flip)), dtype)
    torch.testing.assert_close(out, plain, **TOL[dtype])
    for i in (0, 8, 40, 80, 81, 100, 161):
        ref = torchvision_style(imgs[i], int(dy[i]), int(dx[i]), bool(flip[i]), dtype)
        torch.testing.assert_close(out[i], ref, **TOL[dtype])


def test_gather_by_index_odd_size_batch_one_and_no_normalise():
    data = images(20, 7, 9, seed=1)  # odd, non-square images: the kernel takes any H x W
    index = torch.tensor([19, 3, 3, 0, 11], device=DEV)
    g = torch.Generator(device=DEV).manual_seed(5)
    p = random_params(5, True, True, DEV, g)
    out = augment(data, p.dy, p.dx, p.flip, torch.float32, index=index)
    for i, j in enumerate(index.tolist()):
        ref = torchvision_style(data[j], int(p.dy[i]), int(p.dx[i]), bool(p.flip[i]),
                                torch.float32)
        torch.testing.assert_close(out[i], ref, **TOL[torch.float32])
    one = augment(data, p.dy[:1], p.dx[:1], p.flip[:1], torch.bfloat16, normalize=False,
                  index=index[:1])
    assert one.shape == (1, 3, 7, 9)
    ref = torchvision_style(data[19], int(p.dy[0]), int(p.dx[0]), bool(p.flip[0]),
                            torch.bfloat16, norm=False)
    torch.testing.assert_close(one[0], ref, **TOL[torch.bfloat16])
    assert one.min() >= 0 and one.max() <= 1


@pytest.mark.parametrize("crop, flip, norm, dtype", [(True, True, True, torch.float32),
                                                     (False, False, True, torch.bfloat16),
                                                     (True, False, False, torch.float32)])
def test_device_augment_backends_agree_with_one_seed(crop, flip, norm, dtype):
    imgs = images(37, seed=2)
    outs = []
    for backend in ("torch", "triton"):
        aug = DeviceAugment(crop=crop, flip=flip, normalize=norm, dtype=dtype, backend=backend)
        outs.append(aug(imgs, torch.Generator(device=DEV).manual_seed(11)))
    torch.testing.assert_close(outs[1], outs[0], **TOL[dtype])
    assert outs[1].is_contiguous(memory_format=torch.channels_last)


def test_device_augment_gathers_from_a_resident_dataset():
    data = images(50, seed=3)
    index = torch.tensor([7, 49, 0, 7, 21], device=DEV)
    outs = [DeviceAugment(backend=b)(data, torch.Generator(device=DEV).manual_seed(4), index)
            for b in ("torch", "triton")]
    torch.testing.assert_close(outs[1], outs[0], **TOL[torch.float32])
    direct = DeviceAugment(backend="torch")(data[index], torch.Generator(device=DEV).manual_seed(4))
    torch.testing.assert_close(outs[0], direct, rtol=0, atol=0)


def test_backend_switch():
    with pytest.raises(ValueError, match="backend must be one of"):
        DeviceAugment(backend="cuda")
    assert not DeviceAugment().uses_triton(torch.device("cpu"))  # auto: torch on the CPU
    assert DeviceAugment().uses_triton(torch.device("cuda"))
    assert DeviceAugment(backend="torch").uses_triton(torch.device("cuda")) is False


def test_poisoning_is_on():
    from fastres.kernels._common import empty

    assert empty((3, 4), torch.float32, DEV).isnan().all()
    assert (empty((3,), torch.int32, DEV) == -1).all()
