"""The paper's protocol in one place: the facts of the authors' script that fastres reproduces by
default (shared/reference/protocol.md). Plain values only, no torch: planning, reports and
loaders all read them from here, so one edit changes the protocol everywhere.
"""

from __future__ import annotations

EPOCHS = 500
TMAX = 200  # CosineAnnealingLR(T_max) stepped once per epoch, left to run past T_max
TRAIN_BATCH = 128  # reshuffled every epoch, last partial batch kept
TEST_BATCH = 100  # the whole test set after every epoch
WEIGHT_DECAY = 5e-4  # coupled L2: the optimizer's own weight_decay (Adam is Adam, not AdamW)

# Table 2: torch.optim class name and settings, before weight decay.
OPTIMIZER_SETTINGS: dict[str, tuple[str, dict]] = {
    "sgd": ("SGD", {"lr": 0.1, "momentum": 0.9}),
    "nesterov": ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    "adam": ("Adam", {"lr": 1e-3}),
    "adadelta": ("Adadelta", {"lr": 1.0}),
    "adagrad": ("Adagrad", {"lr": 0.01}),
}
PAPER_OPTIMIZERS = tuple(OPTIMIZER_SETTINGS)

# Augmentation: random crop from the image zero-padded by PAD pixels, flip with p = 0.5, then
# normalise [0, 1] pixels by mean and std per channel (test images: normalise only).
PAD = 4
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CIFAR_SIZES = (50_000, 10_000)  # training and test images

# Not the paper's: the tiny structure of smoke runs and CPU-sized benchmarks (one for all).
SMOKE_SPEC = "N=2 B=1,1 C_in=8 F0=3 P0=1 F1=3 P1=1 K=1"


def base_lr(optimizer: str) -> float:
    """Table 2's learning rate for `optimizer`."""
    return OPTIMIZER_SETTINGS[optimizer][1]["lr"]
