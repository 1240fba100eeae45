"""Fidelity, measured pairwise (issue 21): fastres's training path and the paper script's loop,
in lockstep on the CPU in fp32, from the same initial weights on the same batches.

fastres's side is fastres.run.train.train() itself: the workbench engine, fastres.run.steps.Steps,
the FFCV stream loader (the CPU's default placement) with DeviceAugment, and the Schedule. The
paper's side is benchmarks/epoch_time.PaperTrainer: the script's model code (written apart from
fastres.study.models), the stock torch.optim optimizer, nn.CrossEntropyLoss, CosineAnnealingLR, and
torchvision's transforms on PIL images. The initial weights are the paper model's, saved as the
script saves a checkpoint and loaded with fastres.study.models.from_seed_checkpoint. The order,
crops and flips fastres draws are recorded from its own loader (its traversal order and
random_params, both called through) and given to torchvision's RandomCrop and RandomHorizontalFlip
in place of their own draws; the images themselves come from the arrays the betons were written
from, not from FFCV.

What is compared, and why each tolerance is what it is:
- Every training batch (images and labels): exact. Both sides zero-pad, crop and flip uint8
  pixels (exact), then compute (x / 255 - mean) / std with the same three IEEE float32
  operations on the same values and constants, so they give the same bits.
- Every step's logits and loss, then every parameter and buffer (BN running statistics) of the
  two models, and every test batch's logits: exact. Both run the same torch operations in the
  same order on tensors of the same shapes, strides and dtype (contiguous NCHW fp32), one after
  the other in one thread with the same intra-op thread count, and torch's CPU kernels are
  deterministic under those conditions. So round-off is the same on both sides and their
  difference is zero: that is what fastres/run/steps.py claims ("bit for bit the loop the paper's
  script runs"). One ulp of difference would mean a different computation somewhere.
- Each epoch's learning rate: exact (the same CosineAnnealingLR recursion on host floats).
- Each epoch's metrics: the counts of correct answers exact; the mean losses to 2k * u relative
  (u = 2**-24, k = batches in the epoch). fastres sums loss * n in float32 on the device: k
  products and k additions, each one rounding of a value no larger than the final sum, so its
  error is at most 2k * u * sum; the script sums loss.item() * n in float64 (error ~1e-16).

Cases: structures 1 and 6; each structure runs all five optimizers, and each (optimizer,
augmentation) pair runs on one of the two structures, so both structures see augmentation on
and off. Each case runs several epochs of a small subset with a last partial batch (the
reshuffle, the scheduler's step and the partial batch at every boundary), T_max shorter than
the run (the rate falls to its minimum and climbs back), and evaluation after every epoch. One
more case runs on a warm engine (a run before it on the same workbench, as a grid worker's next
cell), against the script's fresh model for the same seed.

The paper's side takes fastres's draws, so what the draws are is checked elsewhere: here, that
each epoch visits the subset once in a new order; tests/test_loader.py, that crop offsets cover
the 9 x 9 positions uniformly and flips come half the time. benchmarks/fidelity.py compares the
two loops each with its own draws.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastres.loaders.augment as augment_module
from fastres.kernels import build
from fastres.loaders.cifar import EpochPermutation
from fastres.run.config import TrainConfig
from fastres.run.records import EpochMetrics
from fastres.run.train import train
from fastres.run.workbench import Workbench
from fastres.study.data import fixed_subset, prepare, write_beton
from fastres.study.models import from_seed_checkpoint
from fastres.study.protocol import CIFAR_MEAN, CIFAR_STD, PAD, PAPER_OPTIMIZERS
from fastres.study.structures import STRUCTURES

from .conftest import random_images, stable_seed

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
U = 2.0**-24  # float32's unit round-off
N_TRAIN = N_TEST = 10  # images in the betons, one per class; each case uses a subset


def _load_epoch_time():
    if "epoch_time" in sys.modules:  # tests/test_benchmarks.py may have loaded it already
        return sys.modules["epoch_time"]
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("epoch_time", BENCH / "epoch_time.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["epoch_time"] = mod
    spec.loader.exec_module(mod)
    return mod


epoch_time = _load_epoch_time()


@dataclass(frozen=True)
class Case:
    structure: int
    optimizer: str
    augment: bool
    train_subset: int  # with `batch`, a last partial batch every epoch
    batch: int = 2
    epochs: int = 3
    tmax: int = 1  # rates: base, minimum (epoch 2), base again (epoch 3: past T_max)
    test_subset: int = 3  # test batch 2: a partial test batch too
    test_batch: int = 2
    # On an engine a run before it used (a grid worker's next cell): fresh weights from the
    # seed and a zeroed optimizer state copied into the same tensors (Engine.start_run).
    warm: bool = False

    @property
    def id(self) -> str:
        return (f"s{self.structure}-{self.optimizer}-aug{'on' if self.augment else 'off'}"
                + ("-warm" if self.warm else ""))


# Each (optimizer, augmentation) pair once; each structure sees all five optimizers, both ways.
AUG_ON_S1 = {"sgd": True, "nesterov": False, "adam": True, "adadelta": False, "adagrad": True}
CASES = ([Case(1, o, AUG_ON_S1[o], train_subset=5) for o in PAPER_OPTIMIZERS]
         # Structure 6 costs five times structure 1 per image: two epochs (one boundary) at
         # rates base and base / 2; past T_max is structure 1's part.
         + [Case(6, o, not AUG_ON_S1[o], train_subset=3, epochs=2, tmax=2)
            for o in PAPER_OPTIMIZERS]
         # Adam's state (moments and step count) is what a reset could leave behind.
         + [Case(1, "adam", False, train_subset=5, epochs=2, tmax=2, warm=True)])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Betons of random uint8 images and the arrays they were written from (the paper's side
    reads the arrays, as the script reads its dataset: FFCV is fastres's alone)."""
    folder = tmp_path_factory.mktemp("fidelity")
    arrays = {"train": (random_images(N_TRAIN, 21), np.arange(N_TRAIN) * 7 % 10),
              "test": (random_images(N_TEST, 22), np.arange(N_TEST) * 3 % 10)}
    for split, (x, y) in arrays.items():
        write_beton(folder / "betons" / f"{split}.beton", x, y)
    return prepare(folder / "betons", cache=folder / "cache", log=lambda _m: None), arrays


def pinned_transform(augment: bool, dy: int, dx: int, flip: bool):
    """The script's training transform with its random draws replaced by fastres's: RandomCrop
    takes (dy, dx) as its offsets into the padded image, RandomHorizontalFlip flips always or
    never. Everything else is torchvision's own code."""
    import torchvision.transforms as T

    transform = epoch_time.paper_transforms(augment)[0]
    kinds = [type(t) for t in transform.transforms]
    assert (T.RandomCrop in kinds and T.RandomHorizontalFlip in kinds) == augment, kinds
    for t in transform.transforms:
        if isinstance(t, T.RandomCrop):
            assert t.padding == PAD and t.fill == 0  # black padding, as protocol.md says
            t.get_params = lambda _img, size: (dy, dx, *size)
        elif isinstance(t, T.RandomHorizontalFlip):
            t.p = 1.0 if flip else 0.0  # torch.rand(1) < p: always / never
    return transform


@dataclass
class Lockstep:
    """Runs the paper's step beside each of fastres's and compares them; collects the largest
    differences and the paper side's epoch sums (as the script computes them)."""

    case: Case
    arrays: dict
    paper: object  # epoch_time.PaperTrainer
    test_idx: np.ndarray | None
    order: np.ndarray | None = None  # this epoch's training order (dataset indices)
    orders: list = field(default_factory=list)  # every epoch's
    pos: int = 0
    test_pos: int = 0
    draws: list = field(default_factory=list)  # fastres's AugmentParams, in order
    steps: int = 0
    eval_batches: int = 0
    paper_lr: list[float] = field(default_factory=list)
    sums: dict = field(default_factory=lambda: dict.fromkeys(
        ("train_loss", "train_correct", "train_n", "test_loss", "test_correct", "test_n"), 0))
    epochs: list[dict] = field(default_factory=list)

    def paper_train_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        idx = self.order[self.pos:self.pos + n]
        self.pos += n
        x, y = self.arrays["train"]
        if self.case.augment:
            p = self.draws.pop(0)
            params = list(zip(p.dy.tolist(), p.dx.tolist(), p.flip.tolist(), strict=True))
        else:
            params = [(PAD, PAD, False)] * n
        images = [pinned_transform(self.case.augment, *pp)(Image.fromarray(x[i]))
                  for i, pp in zip(idx, params, strict=True)]
        return torch.stack(images), torch.as_tensor(y[idx])

    def paper_test_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        x, y = self.arrays["test"]
        idx = np.arange(len(y)) if self.test_idx is None else self.test_idx
        idx = idx[self.test_pos:self.test_pos + n]
        self.test_pos = (self.test_pos + n) % (len(y) if self.test_idx is None
                                               else len(self.test_idx))
        test_tf = epoch_time.paper_transforms(self.case.augment)[1]
        return torch.stack([test_tf(Image.fromarray(x[i])) for i in idx]), torch.as_tensor(y[idx])


def assert_same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Exact equality (see the module docstring for why exact), with the size of a miss."""
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    if not torch.equal(a, b):
        diff = (a.double() - b.double()).abs().max().item()
        scale = b.double().abs().max().item()
        pytest.fail(f"{what}: differs by up to {diff:.3e} (largest entry {scale:.3e})")


def run_pair(case: Case, data, tmp_path: Path, monkeypatch) -> tuple[Lockstep, list]:
    betons, arrays = data
    spec = STRUCTURES[case.structure]
    seed = stable_seed("fidelity", case.id) % 1000
    quiet = lambda _m: None  # noqa: E731
    cfg = TrainConfig(spec=spec, structure=case.structure, optimizer=case.optimizer,
                      augment=case.augment, epochs=case.epochs, tmax=case.tmax, seed=seed,
                      device="cpu", batch_size=case.batch, test_batch_size=case.test_batch,
                      train_subset=case.train_subset, test_subset=case.test_subset,
                      # One FFCV worker, so one torch thread (FFCV sets torch's count to its
                      # own): CI's cores are shared, where 2-thread kernels stall. Both sides
                      # run at whatever count it is.
                      loader_workers=1).resolved(quiet)
    assert (cfg.precision, cfg.kernels, cfg.placement, cfg.graphs, cfg.compile) == \
        ("fp32", "eager", "stream", False, False)  # the CPU's defaults: what this test checks

    bench = Workbench(torch.device("cpu"))
    if case.warm:
        # A run of another seed first, on the same bench; this run then reuses its engine and
        # draws its weights from its own seed, which the script's do too (see
        # test_same_seed_same_initial_weights).
        train(dataclasses.replace(cfg, seed=seed + 1, epochs=1), data=betons, bench=bench,
              log=quiet)
        engine, warm = bench.engine(cfg, quiet)
        assert warm and engine.runs == 1
        torch.manual_seed(seed)
        paper = epoch_time.PaperTrainer(spec, case.optimizer, case.tmax)
    else:
        # The paper's model, saved as the script saves it; fastres's engine starts from it.
        torch.manual_seed(seed + 1)  # other weights than fastres's own draw for `seed`
        paper = epoch_time.PaperTrainer(spec, case.optimizer, case.tmax)
        ckpt = tmp_path / "paper.pt"
        torch.save({"net": paper.net.state_dict(), "acc": 0.0, "epoch": 0}, ckpt)
        engine, _ = bench.engine(cfg, quiet)
        engine.model.load_state_dict(from_seed_checkpoint(ckpt, spec).state_dict())
    ls = Lockstep(case, arrays, paper, fixed_subset(case.test_subset, len(arrays["test"][1])))

    # Record fastres's own draws as it makes them (the real functions, called through).
    sample_order = EpochPermutation.sample_order

    def recorded_order(self, epoch: int) -> np.ndarray:
        ls.order, ls.pos = sample_order(self, epoch), 0
        ls.orders.append(ls.order)
        return ls.order

    random_params = augment_module.random_params

    def recorded_params(*args, **kwargs):
        p = random_params(*args, **kwargs)
        ls.draws.append(p)
        return p

    monkeypatch.setattr(EpochPermutation, "sample_order", recorded_order)
    monkeypatch.setattr(augment_module, "random_params", recorded_params)

    logits: list[torch.Tensor] = []
    hook = engine.model.register_forward_hook(lambda _m, _i, out: logits.append(out.detach()))
    steps = engine.steps
    fastres_train, fastres_eval = steps.train, steps.eval

    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        px, py = ls.paper_train_batch(len(y))
        assert_same(y, py, f"step {ls.steps}: labels")
        assert_same(x, px, f"step {ls.steps}: images")
        if ls.pos == len(y):  # the epoch's first step: the rate this epoch runs at
            ls.paper_lr.append(paper.optimizer.param_groups[0]["lr"])
        assert engine.opt.param_groups[0]["lr"] == ls.paper_lr[-1], f"step {ls.steps}: rate"
        logits.clear()
        fastres_train(x, y)
        paper.net.train()  # the script's own mode switch, not fastres's
        loss, out = paper.train_step(px, py)
        (f_out,) = logits
        assert_same(f_out, out, f"step {ls.steps}: logits")
        assert_same(F.cross_entropy(f_out, y), loss, f"step {ls.steps}: loss")
        paper_state = paper.net.state_dict()
        for k, v in engine.model.state_dict().items():
            assert_same(v, paper_state[k], f"after step {ls.steps}: {k}")
        ls.sums["train_loss"] += loss.item() * len(py)
        ls.sums["train_correct"] += out.max(1)[1].eq(py).sum().item()
        ls.sums["train_n"] += len(py)
        ls.steps += 1

    def eval_batch(x: torch.Tensor, y: torch.Tensor) -> None:
        px, py = ls.paper_test_batch(len(y))
        assert_same(y, py, f"test batch {ls.eval_batches}: labels")
        assert_same(x, px, f"test batch {ls.eval_batches}: images")
        logits.clear()
        fastres_eval(x, y)
        paper.net.eval()
        loss, out = paper.eval_batch(px, py)
        (f_out,) = logits
        assert_same(f_out, out, f"test batch {ls.eval_batches}: logits")
        ls.sums["test_loss"] += loss.item() * len(py)
        ls.sums["test_correct"] += out.max(1)[1].eq(py).sum().item()
        ls.sums["test_n"] += len(py)
        ls.eval_batches += 1

    def epoch_end(m: EpochMetrics) -> None:
        paper.epoch_end()  # the script steps its scheduler after evaluating
        ls.epochs.append(dict(ls.sums))
        ls.sums = dict.fromkeys(ls.sums, 0)

    monkeypatch.setattr(steps, "train", train_step)
    monkeypatch.setattr(steps, "eval", eval_batch)
    try:
        result = train(cfg, data=betons, bench=bench, on_epoch=epoch_end, log=quiet)
    finally:
        hook.remove()
    assert result.status == "completed"
    return ls, result.epochs


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fastres_steps_equal_the_paper_loop(case, data, tmp_path, monkeypatch):
    ls, history = run_pair(case, data, tmp_path, monkeypatch)
    per_epoch = -(-case.train_subset // case.batch)
    assert ls.steps == case.epochs * per_epoch  # every step went through both sides
    assert ls.eval_batches == case.epochs * -(-case.test_subset // case.test_batch)
    assert not ls.draws  # every crop fastres drew was checked (none drawn with augment off)
    # The paper's side follows fastres's order, so check here what the script's sampler does:
    # each epoch visits the subset once, in a new order (the chance that a correct reshuffle
    # of 5 repeats itself over 3 epochs is 1 in 120**2; the seeds are fixed).
    subset = np.sort(fixed_subset(case.train_subset, N_TRAIN))
    assert all(np.array_equal(np.sort(o), subset) for o in ls.orders)
    if case.train_subset >= 5 and case.epochs >= 3:
        assert any(not np.array_equal(o, ls.orders[0]) for o in ls.orders[1:]), ls.orders
    assert len(history) == len(ls.epochs) == case.epochs
    assert [m.lr for m in history] == ls.paper_lr
    for m, p in zip(history, ls.epochs, strict=True):
        assert round(m.train_acc * p["train_n"]) == p["train_correct"]
        assert round(m.test_acc * p["test_n"]) == p["test_correct"]
        k_train, k_test = per_epoch, -(-case.test_subset // case.test_batch)
        assert abs(m.train_loss - p["train_loss"] / p["train_n"]) <= \
            2 * k_train * U * p["train_loss"] / p["train_n"], (m, p)
        assert abs(m.test_loss - p["test_loss"] / p["test_n"]) <= \
            2 * k_test * U * p["test_loss"] / p["test_n"], (m, p)


@pytest.mark.parametrize("structure", [1, 6])
def test_same_seed_same_initial_weights(structure):
    """fastres builds its model after torch.manual_seed(seed); the script seeds, then builds its
    model (epoch_time.paper_loop does). The two draw the same default initialisation in the same
    module order, so a seed gives both the same weights: benchmarks/fidelity.py pairs its runs on
    that."""
    spec = STRUCTURES[structure]
    torch.manual_seed(structure)
    ours = build(spec).state_dict()
    torch.manual_seed(structure)
    theirs = epoch_time.PaperResNet.from_spec(spec).state_dict()
    assert list(ours) == list(theirs)
    for k, v in ours.items():
        assert_same(v, theirs[k], k)


def test_lockstep_sees_a_wrong_crop(data, tmp_path, monkeypatch):
    """The comparison can fail: fastres's crops shifted by one pixel (a defect of the kind this
    check exists to find) are caught at the first step's images."""
    real = augment_module.crop_flip

    def shifted(images, p):
        return real(images, augment_module.AugmentParams((p.dy + 1).clamp(max=2 * PAD), p.dx,
                                                         p.flip))

    monkeypatch.setattr(augment_module, "crop_flip", shifted)
    with pytest.raises(pytest.fail.Exception, match="step 0: images"):
        run_pair(Case(1, "sgd", True, train_subset=5, epochs=1), data, tmp_path, monkeypatch)


def test_normalisation_constants_are_the_papers():
    """The two sides share nothing but these numbers (fastres.study.protocol, read by both); check
    them against protocol.md's."""
    assert CIFAR_MEAN == (0.4914, 0.4822, 0.4465) and CIFAR_STD == (0.2023, 0.1994, 0.2010)
