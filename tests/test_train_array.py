"""Run arrays (fastres.run.train_array) against the runs trained alone (fastres.run.train).

The per-run path (the CPU default) computes every op of every run with the solo model's dense
ops on the same tensors in the same order, so an array's per-epoch metrics are its runs' solo
metrics bit for bit: those tests compare with ==. The grouped path (the CUDA default) sums each
grouped convolution in another order than the dense one; see GROUPED_REL for its tolerance.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from fastres.run.checkpoints import from_bytes
from fastres.run.config import TrainConfig
from fastres.run.records import EpochMetrics
from fastres.run.train import train
from fastres.run.train_array import ArrayError, fit_size, train_array
from fastres.study.data import prepare, write_beton
from fastres.study.models import from_seed_checkpoint
from fastres.study.protocol import PAPER_OPTIMIZERS, SMOKE_SPEC
from fastres.study.structures import ResNetSpec

TINY = ResNetSpec.parse(SMOKE_SPEC)
QUIET = {"log": lambda _m: None}
EPOCHS = 3

# Grouped vs dense convolutions in fp32: each output sums C_in*k*k products in another order
# (one step agrees to ~1e-6 of each tensor's scale: tests/test_arrays.py holds the grouped step
# to the per-run one tightly). Training then amplifies it: Adagrad's and Adadelta's first
# updates are about lr * g / |g|, so a gradient entry within round-off of zero moves its weight
# by +-lr either way, and 3 epochs of 7 steps at batch 32 separate the trajectories. Measured on
# this row (fastres 2026-12-01, AMD EPYC): losses within 3.5e-3 relative (Adagrad's test loss;
# SGD/Nesterov/Adam within 1.1e-3), accuracies within 2 images. Allowed: 2e-2 and 4 images
# (about 5x and 2x the worst), still far below a bug's effect: a run reading another's weights
# or a wrong gradient is off by 1e-1 and tens of images within the first epoch.
GROUPED_REL = 2e-2
GROUPED_IMAGES = 4


def class_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: a fixed random template per class plus noise. (On pure noise every
    logit ties within round-off and accuracies say nothing about equivalence.)"""
    templates = np.random.default_rng(0).integers(40, 216, (10, 32, 32, 3))
    labels = np.arange(n) % 10
    noise = np.random.default_rng(seed).integers(-40, 41, (n, 32, 32, 3))
    return (templates[labels] + noise).clip(0, 255).astype(np.uint8), labels


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    folder = tmp_path_factory.mktemp("arraydata")
    write_beton(folder / "train.beton", *class_images(200, 5))
    write_beton(folder / "test.beton", *class_images(60, 6))
    return prepare(folder, cache=folder / "cache", log=lambda _m: None)


def config(**kw) -> TrainConfig:
    base = dict(spec=TINY, structure=None, epochs=EPOCHS, device="cpu", kernels="eager",
                loader_workers=1, compile=False, batch_size=32, test_batch_size=25,
                placement="resident")
    return TrainConfig(**{**base, **kw})


# The paper's row of a structure: five optimizers x augmentation on/off, here also with
# different T_max (0 = constant) and seeds per run.
ROW = [config(optimizer=opt, augment=aug, tmax=(0, 2, 3, 5, 7)[i % 5], seed=100 + 7 * i + aug)
       for i, opt in enumerate(PAPER_OPTIMIZERS) for aug in (True, False)]


def metrics(result) -> list[tuple]:
    return [(m.epoch, m.lr, m.train_loss, m.train_acc, m.test_loss, m.test_acc)
            for m in result.epochs]


@pytest.fixture(scope="module")
def solo(betons):
    """Each run of ROW trained alone (fastres.run.train, the reference loop)."""
    return [train(c, data=betons, **QUIET) for c in ROW]


def assert_close_runs(array_result, solo_result, what: str) -> None:
    a, s = array_result.epochs, solo_result.epochs
    assert [m.epoch for m in a] == [m.epoch for m in s], what
    n_train, n_test = array_result.data["num_train"], array_result.data["num_test"]
    for ma, ms in zip(a, s, strict=True):
        assert ma.lr == ms.lr, what
        for name in ("train_loss", "test_loss"):
            x, y = getattr(ma, name), getattr(ms, name)
            assert abs(x - y) <= GROUPED_REL * abs(y), f"{what} epoch {ma.epoch} {name}: {x} {y}"
        assert abs(ma.train_acc - ms.train_acc) * n_train <= GROUPED_IMAGES + 1e-9, what
        assert abs(ma.test_acc - ms.test_acc) * n_test <= GROUPED_IMAGES + 1e-9, what


def test_a_row_of_ten_as_one_array_is_its_solo_runs_bit_for_bit(betons, solo):
    """R = 10: all five optimizers, augmentation on and off, different T_max and seeds."""
    results = train_array(ROW, data=betons, **QUIET)
    for i, (a, s) in enumerate(zip(results, solo, strict=True)):
        assert a.status == s.status == "completed", i
        assert metrics(a) == metrics(s), f"run {i}: {ROW[i].optimizer} aug {ROW[i].augment}"
        assert (a.best_acc, a.best_epoch, a.loss_at_best) == \
            (s.best_acc, s.best_epoch, s.loss_at_best)
        assert a.config == s.config  # recorded as it ran: the same settings


def test_an_array_of_one_is_the_solo_run(betons, solo):
    (a,) = train_array(ROW[3:4], data=betons, **QUIET)
    assert metrics(a) == metrics(solo[3])


@pytest.mark.parametrize("runs", [2, 10])
def test_grouped_array_matches_solo_runs_within_round_off(runs, betons, solo):
    results = train_array(ROW[:runs], data=betons, grouped=True, **QUIET)
    assert results[0].environment["array"] == {"runs": runs, "path": "grouped"}
    for i, (a, s) in enumerate(zip(results, solo[:runs], strict=True)):
        assert_close_runs(a, s, f"run {i}")


@pytest.mark.parametrize("grouped", [False, True], ids=["per-run", "grouped"])
def test_a_diverging_run_is_frozen_and_the_others_are_untouched(grouped, betons, solo):
    """A run whose loss goes non-finite is recorded as diverged at that epoch and leaves the
    array; the other runs' results are those they get without it (alone)."""
    bad = dataclasses.replace(ROW[0], lr=1e12, seed=5)  # SGD at 1e12: inf/NaN within epoch 1
    cfgs = [ROW[1], bad, ROW[2]]
    r1, rb, r2 = train_array(cfgs, data=betons, grouped=grouped, **QUIET)
    assert rb.status == "diverged" and rb.diverged_at == 1
    assert len(rb.epochs) == 1 and not math.isfinite(rb.epochs[0].train_loss)
    for a, s in ((r1, solo[1]), (r2, solo[2])):
        assert a.status == "completed" and len(a.epochs) == EPOCHS
        if grouped:
            assert_close_runs(a, s, "grouped")
        else:
            assert metrics(a) == metrics(s)


class MemoryStore:
    """A Checkpointer in memory (fastres.run.records.Checkpointer's contract)."""

    def __init__(self) -> None:
        self.rows: list[EpochMetrics] = []
        self.state: bytes | None = None
        self.best: bytes | None = None
        self.saved_epochs: list[int] = []

    def load(self):
        if self.state is None:
            self.rows = []
            return None
        state = from_bytes(self.state)
        self.rows = self.rows[:state["epoch"]]
        return state, list(self.rows)

    def record(self, m: EpochMetrics) -> None:
        self.rows = [r for r in self.rows if r.epoch < m.epoch] + [m]

    def save(self, epoch: int, state: bytes, best: bytes | None) -> None:
        self.state = state
        self.saved_epochs.append(epoch)
        if best is not None:
            self.best = best


class Killed(Exception):
    """Stands for the process dying mid-array."""


def test_resume_regroups_runs_of_different_epochs_into_other_arrays(betons, solo, tmp_path):
    """An array of 4 dies after run 1 has recorded and saved epoch 2 but runs 2 and 3 only
    epoch 1 (every epoch's state saved: --checkpoint-every 0). Resumed as two arrays of other
    runs, each mixing runs at different epochs, and the last run alone: every run ends as its
    uninterrupted solo run, bit for bit. Each run's checkpoint is a solo model's state."""
    cfgs = [dataclasses.replace(c, checkpoint_every=0) for c in ROW[:4]]
    stores = [MemoryStore() for _ in cfgs]

    def die(i: int, m: EpochMetrics) -> None:
        if (i, m.epoch) == (1, 2):
            raise Killed

    with pytest.raises(Killed):
        train_array(cfgs, data=betons, checkpoints=stores, on_epoch=die, **QUIET)
    assert [len(s.rows) for s in stores] == [2, 2, 1, 1]
    assert [s.saved_epochs[-1] for s in stores] == [2, 2, 1, 1]
    (tmp_path / "run0.pt").write_bytes(stores[0].state)
    model = from_seed_checkpoint(tmp_path / "run0.pt", TINY)  # the paper's keys, loadable
    assert set(model.state_dict()) == set(torch.load(tmp_path / "run0.pt")["model"])

    first = train_array([cfgs[0], cfgs[2]], data=betons, checkpoints=[stores[0], stores[2]],
                        **QUIET)
    second = train_array([cfgs[3]], data=betons, checkpoints=[stores[3]], **QUIET)
    # and run 1 in a grouped array with a fresh run beside it
    third = train_array([cfgs[1], ROW[4]], data=betons,
                        checkpoints=[stores[1], None], grouped=True, **QUIET)
    assert metrics(first[0]) == metrics(solo[0]) and metrics(first[1]) == metrics(solo[2])
    assert metrics(second[0]) == metrics(solo[3])
    assert_close_runs(third[0], solo[1], "run 1 resumed in a grouped array")
    assert [m.epoch for m in third[0].epochs] == [1, 2, 3]
    assert_close_runs(third[1], solo[4], "fresh run beside a resumed one")
    for s in stores:
        assert s.best is not None and from_bytes(s.state)["epoch"] == EPOCHS


def test_a_run_finished_before_is_not_trained_again(betons, solo):
    store = MemoryStore()
    (done,) = train_array([ROW[0]], data=betons, checkpoints=[store], **QUIET)
    again = train_array([ROW[0], ROW[1]], data=betons, checkpoints=[store, None], **QUIET)
    assert metrics(again[0]) == metrics(done) == metrics(solo[0])
    assert metrics(again[1]) == metrics(solo[1])


def test_runs_that_cannot_share_an_array_are_refused(betons):
    with pytest.raises(ArrayError, match="share epochs"):
        train_array([ROW[0], dataclasses.replace(ROW[1], epochs=2)], data=betons, **QUIET)
    with pytest.raises(ArrayError, match="share spec"):
        train_array([ROW[0], dataclasses.replace(ROW[1], spec=ResNetSpec.parse(
            "N=2 B=1,1 C_in=4 F0=3 P0=1 F1=3 P1=1 K=1"))], data=betons, **QUIET)
    with pytest.raises(ArrayError, match="fp16"):
        train_array([dataclasses.replace(c, precision="fp16") for c in ROW[:2]], data=betons,
                    **QUIET)


def test_array_size_from_memory():
    gib = 2**30
    assert fit_size(gib, gib, 100 * gib, 10) == 10  # room for far more: the cap
    assert fit_size(10 * gib, gib, 100 * gib, 10) == 5  # (60 - 1) // 10
    assert fit_size(200 * gib, gib, 100 * gib, 10) == 1  # never below one run


def test_triton_array_trains_as_the_eager_solo_runs(betons):
    """kernels="triton": the array runs on TritonArrayResNet (grouped implicit-GEMM convs with
    the BN statistics epilogue; the Triton interpreter here). One step of an odd batch of 5
    images and a test batch of 3 (the interpreter's time grows with the images), SGD with
    augmentation off and Adam with it on: fp32 losses within 1e-4 relative of the eager solo
    runs (tests/test_kernels_array_model.py's forward tolerance: a loss is a mean over the
    images of per-image terms, each still from full 32x32 maps, so fewer images leave its
    relative round-off where it was), accuracies to the image."""
    small = dict(train_subset=5, test_subset=3, epochs=1, batch_size=5, test_batch_size=3)
    cfgs = [dataclasses.replace(c, **small) for c in (ROW[1], ROW[4])]
    results = train_array([dataclasses.replace(c, kernels="triton") for c in cfgs],
                          data=betons, **QUIET)
    assert results[0].config["kernels"] == "triton"
    assert results[0].environment["array"] == {"runs": 2, "path": "grouped"}
    for a, c in zip(results, cfgs, strict=True):
        (ma,), (ms,) = a.epochs, train(c, data=betons, **QUIET).epochs
        for name in ("train_loss", "test_loss"):
            assert abs(getattr(ma, name) - getattr(ms, name)) <= 1e-4 * getattr(ms, name), name
        assert (ma.train_acc, ma.test_acc) == (ms.train_acc, ms.test_acc)


def test_what_every_run_resolves_alike_is_said_once(betons):
    """Issue 19: the --kernels auto line (and the CPU's channels-last one) came once per run."""
    said: list[str] = []
    cfgs = [config(kernels="auto", channels_last=True, epochs=1, optimizer=opt)
            for opt in ("sgd", "adam", "nesterov")]
    train_array(cfgs, data=betons, log=said.append)
    assert sum(m.startswith("[train] --kernels auto: eager") for m in said) == 1
    assert sum("channels-last on the CPU" in m for m in said) == 1
