"""FFCV pipelines and the device-side crop / flip / normalise."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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
from fastres.loaders.cifar import CifarLoader

from .conftest import random_images

CPU = torch.device("cpu")
RAW = DeviceAugment(crop=False, flip=False, normalize=False)


def labels_of(loader) -> list[np.ndarray]:
    return [y.numpy().copy() for _, y in loader]


def image_ids(loader, table: dict[bytes, int]) -> tuple[list[int], list[int]]:
    """One epoch: the batch sizes, and which stored image each sample is."""
    sizes, ids = [], []
    for x, _y in loader:
        sizes.append(len(x))
        u8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        ids += [table[img.tobytes()] for img in u8]
    return sizes, ids


def test_train_order_reshuffled_each_epoch_and_last_batch_kept(tiny_betons):
    table = {img.tobytes(): i for i, img in enumerate(random_images(300))}
    loader = CifarLoader(tiny_betons.train, 128, True, CPU, RAW, seed=7)
    assert len(loader) == 3
    orders = []
    for _ in range(3):
        sizes, ids = image_ids(loader, table)
        assert sizes == [128, 128, 44]  # last partial batch kept
        assert sorted(ids) == list(range(300))  # every image exactly once
        orders.append(ids)
    assert orders[0] != orders[1] != orders[2] and orders[0] != list(range(300))
    again = CifarLoader(tiny_betons.train, 128, True, CPU, RAW, seed=7)
    assert image_ids(again, table)[1] == orders[0]  # a seed reproduces the order


def test_resume_epoch_sets_the_order(tiny_betons):
    a = CifarLoader(tiny_betons.train, 128, True, CPU, RAW, seed=3)
    list(a)
    second = labels_of(a)
    b = CifarLoader(tiny_betons.train, 128, True, CPU, RAW, seed=3)
    b.epoch = 1
    np.testing.assert_array_equal(np.concatenate(labels_of(b)), np.concatenate(second))


def test_test_loader_is_sequential_batch_100(tiny_betons):
    loader = CifarLoader(tiny_betons.test, 100, False, CPU, RAW)
    batches = [(x, y) for x, y in loader]
    assert [len(y) for _, y in batches] == [100, 20]
    x = torch.cat([b[0] for b in batches])
    np.testing.assert_array_equal((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(),
                                  random_images(120, 1))
    np.testing.assert_array_equal(torch.cat([b[1] for b in batches]).numpy(), np.arange(120) % 10)
    assert batches[0][1].dtype == torch.long


def test_subset_indices(tiny_betons):
    loader = CifarLoader(tiny_betons.test, 100, False, CPU, RAW, indices=[5, 6, 50])
    (x, y), = list(loader)
    assert y.tolist() == [5, 6, 0] and loader.num_samples == 3


# ------------------------------------------------------------------ augmentation semantics


def reference_crop_flip(img: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    """torchvision's RandomCrop(32, padding=4) then RandomHorizontalFlip, on one HWC image."""
    chw = img.permute(2, 0, 1)
    padded = F.pad(chw, (PAD, PAD, PAD, PAD), value=0)
    out = padded[:, dy:dy + 32, dx:dx + 32]
    if flip:
        out = torch.flip(out, dims=[2])
    return out.permute(1, 2, 0)


def test_crop_flip_matches_reference_for_every_offset():
    imgs = torch.from_numpy(random_images(2 * 81))
    dy = torch.arange(9).repeat_interleave(9).repeat(2)
    dx = torch.arange(9).repeat(9).repeat(2)
    flip = torch.arange(162) >= 81
    out = crop_flip(imgs, AugmentParams(dy, dx, flip))
    for i in range(162):
        torch.testing.assert_close(out[i], reference_crop_flip(imgs[i], int(dy[i]), int(dx[i]),
                                                               bool(flip[i])), rtol=0, atol=0)


def test_zero_fill_where_padded():
    imgs = torch.full((1, 32, 32, 3), 255, dtype=torch.uint8)
    p = AugmentParams(torch.tensor([0]), torch.tensor([8]), torch.tensor([False]))
    out = crop_flip(imgs, p)
    assert (out[0, :4] == 0).all() and (out[0, :, -4:] == 0).all()  # black band top and right
    assert (out[0, 4:, :-4] == 255).all()


def test_exact_mirror():
    imgs = torch.from_numpy(random_images(3))
    centre = torch.full((3,), PAD)
    out = crop_flip(imgs, AugmentParams(centre, centre, torch.tensor([True, False, True])))
    torch.testing.assert_close(out[0], imgs[0].flip(1), rtol=0, atol=0)
    torch.testing.assert_close(out[1], imgs[1], rtol=0, atol=0)
    torch.testing.assert_close(out[2, :, 0], imgs[2, :, 31], rtol=0, atol=0)


def test_random_params_cover_the_padding_and_flip_half():
    g = torch.Generator().manual_seed(0)
    p = random_params(20_000, True, True, CPU, g)
    for off in (p.dy, p.dx):
        assert off.min() == 0 and off.max() == 2 * PAD
        counts = torch.bincount(off, minlength=9).float() / 20_000
        assert (counts - 1 / 9).abs().max() < 0.02  # uniform over the 9 positions
    assert abs(p.flip.float().mean().item() - 0.5) < 0.02
    q = random_params(20_000, True, True, CPU, torch.Generator().manual_seed(0))
    assert torch.equal(p.dy, q.dy) and torch.equal(p.flip, q.flip)
    none = random_params(10, False, False, CPU, g)
    assert (none.dy == PAD).all() and (none.dx == PAD).all() and not none.flip.any()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_normalisation_values_and_layout(dtype, tol):
    imgs = torch.stack([torch.zeros(32, 32, 3, dtype=torch.uint8),
                        torch.full((32, 32, 3), 255, dtype=torch.uint8)])
    out = normalize(imgs, dtype)
    assert out.shape == (2, 3, 32, 32) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    mean, std = torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)
    torch.testing.assert_close(out[0, :, 5, 7].float(), -mean / std, rtol=tol, atol=tol)
    torch.testing.assert_close(out[1, :, 5, 7].float(), (1 - mean) / std, rtol=tol, atol=tol)
    off = normalize(imgs, dtype, enabled=False)
    torch.testing.assert_close(off[1].float(), torch.ones(3, 32, 32), rtol=0, atol=0)


def test_device_augment_is_seeded_and_test_path_untouched():
    imgs = torch.from_numpy(random_images(64))
    aug = DeviceAugment()
    a = aug(imgs, torch.Generator().manual_seed(1))
    b = aug(imgs, torch.Generator().manual_seed(1))
    c = aug(imgs, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain = DeviceAugment(crop=False, flip=False)(imgs)
    torch.testing.assert_close(plain, normalize(imgs, torch.float32), rtol=0, atol=0)
