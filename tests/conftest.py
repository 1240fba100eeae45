from __future__ import annotations

import os

import torch

# Triton kernels run on the CPU only through the interpreter; it must be on before any kernel
# module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import zlib
from pathlib import Path

import numpy as np
import pytest

from fastres.study.data import BetonPair, prepare, write_beton

SHARED_JPEG = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def jpeg_betons(tmp_path_factory) -> BetonPair:
    """The shared JPEG copy of CIFAR-10, converted once per test session into a temp cache."""
    if not SHARED_JPEG.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the shared CIFAR-10 copy at {SHARED_JPEG}")
        pytest.skip(f"no shared CIFAR-10 copy at {SHARED_JPEG}")
    return prepare(SHARED_JPEG, cache=tmp_path_factory.mktemp("cache"), log=lambda _m: None)


def stable_seed(*parts: object) -> int:
    """A seed from a test case's description that is the same in every process: CRC-32 of its
    repr (Python's hash() of a string is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def scaled_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """max |actual - expected| over max |expected| (or `floor`, if larger): an error relative to
    the tensor's scale, so a near-zero entry (whose own relative error is meaningless in low
    precision) cannot fail it. `floor` is the scale of the terms a result is summed from, for a
    tensor that is zero in exact arithmetic and so holds only their rounding noise."""
    scale = max(expected.detach().double().abs().max().item(), floor, 1e-30)
    return ((actual.detach().double() - expected.detach().double()).abs().max() / scale).item()


def assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, rel: float,
                        what: str = "", floor: float = 0.0) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite entries"
    err = scaled_error(actual, expected, floor)
    assert err <= rel, f"{what}: max error {err:.3e} of the largest entry, allowed {rel:.1e}"


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def tiny_betons(tmp_path) -> BetonPair:
    """Ready betons of random images: 300 train (labels = index % 10), 120 test."""
    folder = tmp_path / "betons"
    write_beton(folder / "train.beton", random_images(300), np.arange(300) % 10)
    write_beton(folder / "test.beton", random_images(120, 1), np.arange(120) % 10)
    return prepare(folder, cache=tmp_path / "cache")


@pytest.fixture
def poisoned_ieee_fp32():
    """Kernel outputs filled with NaN before each kernel runs (an unwritten element fails), and
    IEEE fp32 on both sides on a GPU (the Triton conv follows cuDNN's TF32 setting)."""
    from fastres.kernels._common import poison_outputs

    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with poison_outputs():
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.fixture
def standin_graphs():
    """CUDA graphs on the CPU for one test (tests/graph_standin.py): graphs=True runs through
    the stand-in, and torch's capturable optimizers accept CPU tensors."""
    from .graph_standin import installed

    with installed() as runtime:
        yield runtime


@pytest.fixture
def graphed_runs(standin_graphs, monkeypatch):
    """The stand-in with one warm-up per shape, so a 3-epoch run of fastres.run.train or
    train_array captures its partial last batch too."""
    monkeypatch.setattr("fastres.run.steps.WARM_STEPS", 1)
    return standin_graphs


@pytest.fixture
def offline(monkeypatch):
    """No network and no FASTRES_DATA: torchvision's CIFAR-10 download fails as it does here."""
    import urllib.error

    def no_network(*_a, **_k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.CIFAR10.download", no_network)
    monkeypatch.delenv("FASTRES_DATA", raising=False)
