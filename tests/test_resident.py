"""The resident loader against the FFCV stream: the same seed gives bit-identical batches, so the
placement is a speed choice only. CPU, torch augmentation backend, small random betons."""

import numpy as np
import pytest
import torch

from fastres.loaders.augment import DeviceAugment
from fastres.loaders.cifar import CifarLoader
from fastres.loaders.order import permutation
from fastres.loaders.resident import ResidentData, ResidentLoader, fits, resident_bytes
from fastres.study.data import write_beton

from .conftest import random_images

CPU = torch.device("cpu")
N_TRAIN, N_TEST = 300, 100  # batch 64: 4 full train batches and one of 44; test 3 and one of 4
BATCH = 64
AUGMENTS = {
    "crop+flip": DeviceAugment(crop=True, flip=True, backend="torch"),
    "plain": DeviceAugment(crop=False, flip=False, backend="torch"),
}
RAW = DeviceAugment(crop=False, flip=False, normalize=False, backend="torch")
SUBSET = [250, 3, 17, 299, 100, 42, 7, 180, 64, 65, 66, 1, 0, 222, 91]  # unsorted on purpose
TEST_SUBSET = [95, 3, 17, 42, 0, 64, 65, 7, 99]


def labels_for(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 10, n)


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resident")
    write_beton(folder / "train.beton", random_images(N_TRAIN, 10), labels_for(N_TRAIN, 10))
    write_beton(folder / "test.beton", random_images(N_TEST, 11), labels_for(N_TEST, 11))
    return folder / "train.beton", folder / "test.beton"


def epochs(loader, count: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(count)]


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for e, (ea, eb) in enumerate(zip(a, b, strict=True)):
        assert [len(y) for _, y in ea] == [len(y) for _, y in eb], f"epoch {e}: batch sizes"
        for i, ((xa, ya), (xb, yb)) in enumerate(zip(ea, eb, strict=True)):
            assert xa.dtype == xb.dtype and ya.dtype == yb.dtype == torch.long
            assert torch.equal(xa, xb), f"epoch {e} batch {i}: images differ"
            assert torch.equal(ya, yb), f"epoch {e} batch {i}: labels differ"


def pair(beton, train: bool, augment: DeviceAugment, seed: int, indices=None):
    batch = BATCH if train else 32
    stream = CifarLoader(beton, batch, train, CPU, augment, seed=seed, indices=indices)
    data = ResidentData.from_beton(beton, CPU, indices=indices)
    return stream, ResidentLoader(data, batch, train, CPU, augment, seed=seed)


# ------------------------------------------------------------------ the order


def test_permutation_is_a_stable_permutation():
    for n, seed, epoch in [(0, 0, 0), (1, 5, 2), (300, 7, 0), (50_000, 2**32 - 1, 499)]:
        p = permutation(n, seed, epoch)
        assert p.dtype == np.int64 and np.array_equal(np.sort(p), np.arange(n))
    # Computed once (numpy 2.x, PCG64 + SeedSequence([seed, epoch])) and written here: a change
    # means every seeded run's batch order changed, across processes, machines or numpy versions.
    assert permutation(10, 0, 0).tolist() == [3, 2, 1, 8, 6, 0, 7, 4, 5, 9]
    assert permutation(300, 7, 1)[:8].tolist() == [263, 254, 288, 63, 230, 25, 165, 209]
    assert permutation(50_000, 0, 0)[:6].tolist() == [25556, 20554, 16026, 47310, 38162, 6037]
    # Seed and epoch are kept apart: (1, 0) is not (0, 1), as it would be with seed + epoch.
    assert not np.array_equal(permutation(300, 1, 0), permutation(300, 0, 1))
    with pytest.raises(ValueError):
        permutation(10, -1, 0)


def test_stream_train_order_is_the_permutation(betons):
    stream = CifarLoader(betons[0], BATCH, True, CPU, RAW, seed=4, indices=SUBSET)
    y = torch.cat([y for _, y in stream])
    expected = labels_for(N_TRAIN, 10)[np.asarray(SUBSET)[permutation(len(SUBSET), 4, 0)]]
    np.testing.assert_array_equal(y.numpy(), expected)


# ------------------------------------------------------------------ the data


@pytest.mark.parametrize("indices", [None, SUBSET])
def test_resident_data_holds_the_split_in_order(betons, indices):
    data = ResidentData.from_beton(betons[0], CPU, indices=indices)
    sel = slice(None) if indices is None else np.asarray(indices)
    assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.int64
    np.testing.assert_array_equal(data.images.numpy(), random_images(N_TRAIN, 10)[sel])
    np.testing.assert_array_equal(data.labels.numpy(), labels_for(N_TRAIN, 10)[sel])
    assert data.nbytes == resident_bytes(betons[0], indices) and len(data) == len(data.labels)
    assert fits(data.nbytes, CPU)


# ------------------------------------------------------------------ stream == resident


@pytest.mark.parametrize("aug", AUGMENTS, ids=str)
@pytest.mark.parametrize("indices", [None, SUBSET], ids=["all", "subset"])
def test_train_batches_identical_over_three_epochs(betons, aug, indices):
    stream, resident = pair(betons[0], True, AUGMENTS[aug], 5, indices)
    assert len(stream) == len(resident) and stream.num_samples == resident.num_samples
    a, b = epochs(stream, 3), epochs(resident, 3)
    assert_same_batches(a, b)
    if indices is None:
        assert [len(y) for _, y in b[0]] == [64, 64, 64, 64, 44]  # last partial batch kept
    assert not torch.equal(a[0][0][1], a[1][0][1])  # reshuffled between epochs
    assert stream.epoch == resident.epoch == 3


@pytest.mark.parametrize("indices", [None, TEST_SUBSET], ids=["all", "subset"])
def test_test_batches_identical_and_sequential(betons, indices):
    stream, resident = pair(betons[1], False, AUGMENTS["plain"], 0, indices)
    a, b = epochs(stream, 2), epochs(resident, 2)
    assert_same_batches(a, b)
    sel = slice(None) if indices is None else np.asarray(indices)
    np.testing.assert_array_equal(torch.cat([y for _, y in b[0]]).numpy(),
                                  labels_for(N_TEST, 11)[sel])
    if indices is None:
        assert [len(y) for _, y in b[0]] == [32, 32, 32, 4]


def test_resume_at_epoch_k_gives_epoch_k(betons):
    """What train() does on resume: a fresh loader, epoch = k, the generator state restored."""
    aug = AUGMENTS["crop+flip"]
    stream, resident = pair(betons[0], True, aug, 9)
    first = epochs(stream, 2)
    state = stream.generator.get_state()
    third = epochs(stream, 1)
    for fresh in pair(betons[0], True, aug, 9):
        fresh.epoch = 2
        fresh.generator.set_state(state)
        assert_same_batches(epochs(fresh, 1), third)
    assert_same_batches(epochs(resident, 2), first)


def test_epoch_advances_at_the_first_batch(betons):
    """Both loaders are generators: the epoch advances when the first batch is drawn, so an
    epoch abandoned part way (an interrupt) leaves both at the same next epoch."""
    for loader in pair(betons[0], True, RAW, 0):
        it = iter(loader)
        assert loader.epoch == 0
        next(it)
        assert loader.epoch == 1
        next(iter(loader))
        assert loader.epoch == 2


def test_indices_out_of_range_are_refused(betons):
    """FFCV itself would read past the last sample without a word."""
    with pytest.raises(ValueError, match="indices must lie in"):
        ResidentData.from_beton(betons[1], CPU, indices=[0, N_TEST])
    with pytest.raises(ValueError, match="indices must lie in"):
        CifarLoader(betons[1], 32, False, CPU, RAW, indices=[-1, 3])


def test_different_seeds_give_different_orders(betons):
    orders = []
    for seed in (0, 1):
        stream, resident = pair(betons[0], True, RAW, seed)
        ys = torch.cat([y for _, y in stream]), torch.cat([y for _, y in resident])
        assert torch.equal(*ys)
        orders.append(ys[0])
    assert not torch.equal(orders[0], orders[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_resident_epoch_never_waits_for_the_device(betons):
    """No .item(), no host-side indexing: the device never has to catch up inside an epoch."""
    dev = torch.device("cuda")
    data = ResidentData.from_beton(betons[0], dev)
    loader = ResidentLoader(data, BATCH, True, dev, DeviceAugment(backend="auto"), seed=0)
    list(loader)  # warm up (Triton compile, allocator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in loader:
            pass
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = CifarLoader(betons[0], BATCH, True, dev, DeviceAugment(backend="auto"), seed=0)
    assert_same_batches(epochs(stream, 2), epochs(ResidentLoader(data, BATCH, True, dev,
                                                                 DeviceAugment(backend="auto"),
                                                                 seed=0), 2))
