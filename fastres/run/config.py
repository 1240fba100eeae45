"""A run's configuration: TrainConfig with its checks and per-device defaults, and the flags that
say where and how a run computes (shared by `python -m fastres.train` and `fastres.grid.command`).

No torch or FFCV at import: a grid plans and checks every cell before the training stack loads.
torch is imported inside the two functions that look at the devices (parse_device, resolved).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fastres.kernels.choice import KERNELS, choose
from fastres.study.protocol import (
    EPOCHS,
    OPTIMIZER_SETTINGS,
    TEST_BATCH,
    TMAX,
    TRAIN_BATCH,
    WEIGHT_DECAY,
    base_lr,
)
from fastres.study.structures import PARAM_BUDGET, STRUCTURES, ResNetSpec

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16", "fp16")  # autocast dtypes by name (fastres.run.train maps them)
KERNEL_CHOICES = ("auto", *KERNELS)
PLACEMENTS = ("auto", "resident", "stream")
CHECKPOINT_EVERY = 60.0
DEVICE_FORMS = "cpu, cuda or cuda:N"
# FFCV seeds numpy with seed + epoch (non-negative only) and the results store keeps it in a
# signed 64-bit column: numpy's classic 32-bit seed range fits all of them.
SEED_MAX = 2**32 - 1
# The results store's integers are SQLite's signed 64-bit ones: epochs, T_max and attempts
# beyond it cannot be recorded (an OverflowError mid-registration otherwise).
STORE_INT_MAX = 2**63 - 1
CPU_CHANNELS_LAST = ("channels-last on the CPU: oneDNN's channels-last convolution backward is "
                     "wrong at some shapes on some CPUs; training in contiguous NCHW instead")


def check_storable(value: int, flag: str) -> None:
    """ValueError naming `flag` for an integer the results store cannot hold."""
    if value > STORE_INT_MAX:
        raise ValueError(f"{flag} must be at most {STORE_INT_MAX} (2**63 - 1, the largest "
                         f"integer the results store holds), got {value}")


def device_or_default(device: str | None) -> str:
    """`device`, or where a run goes when none is named: the GPU if torch sees one."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(text: str) -> torch.device:
    """`--device` as a torch.device; ValueError unless it names the CPU or a visible CUDA GPU."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be {DEVICE_FORMS}, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: no CUDA GPU is visible to torch here "
                             "(torch.cuda.is_available() is False); use --device cpu")
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise ValueError(f"--device {text}: only {n} CUDA GPU{'s' if n > 1 else ''} "
                             f"visible ({'cuda:0' if n == 1 else f'cuda:0..cuda:{n - 1}'})")
    return device


def check_output_path(path: str | os.PathLike, flag: str) -> None:
    """ValueError naming `flag` unless a file can be written at `path` (checked before a run, so
    a long run never ends unable to save): not a folder, under a writable folder."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file path")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:  # written with mkdir -p later
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: folder {parent} is not writable")


@dataclass
class TrainConfig:
    spec: ResNetSpec = field(default_factory=lambda: STRUCTURES[1])
    structure: int | None = 1  # Table 1 number, None for a custom spec
    optimizer: str = "sgd"
    augment: bool = True
    normalize: bool = True
    epochs: int = EPOCHS
    tmax: int = TMAX
    lr: float | None = None  # None: Table 2's rate for the optimizer
    weight_decay: float = WEIGHT_DECAY
    seed: int = 0
    device: str | None = None  # None: cuda if present, else cpu
    precision: str | None = None  # None: bf16 on a GPU, fp32 on the CPU
    channels_last: bool | None = None  # None: on for a GPU
    compile: bool | None = None  # None: on for a GPU
    kernels: str = "auto"  # eager, triton, or auto: what a GPU measurement found fastest
    placement: str = "auto"  # resident, stream, or auto: resident on a GPU where it fits
    graphs: bool | None = None  # None: the whole step in CUDA graphs on a GPU
    checkpoint_every: float = CHECKPOINT_EVERY  # seconds between saved states; 0 = every epoch
    batch_size: int = TRAIN_BATCH
    test_batch_size: int = TEST_BATCH
    train_subset: int | None = None  # a fixed random N of the training images (smoke, tests)
    test_subset: int | None = None
    data: str | None = None
    cache: str | None = None
    loader_workers: int = 0  # FFCV threads; 0 = torch's thread count

    def resolved(self, log: Callable[[str], None] | None = None) -> TrainConfig:
        """A copy with every None default replaced by the choice for this device; ValueError
        naming the flag for any bad setting. Channels-last asked for on the CPU is switched off,
        said through `log` (a warning without one)."""
        self.check()
        device = device_or_default(self.device)
        gpu = parse_device(device).type == "cuda"
        channels_last = gpu if self.channels_last is None else self.channels_last
        if channels_last and not gpu:
            if log is None:
                warnings.warn(CPU_CHANNELS_LAST, stacklevel=2)
            else:
                log(f"[train] {CPU_CHANNELS_LAST}")
            channels_last = False
        precision = self.precision or ("bf16" if gpu else "fp32")
        from fastres.run.steps import graphs_available  # torch: only when a config is resolved

        if self.graphs and not graphs_available(parse_device(device)):
            raise ValueError(f"--graphs on needs a CUDA GPU; {device} has no CUDA graphs")
        if self.graphs and precision == "fp16":
            raise ValueError("--graphs on with --precision fp16: fp16's loss scaler reads its "
                             "inf check on the host every step, which a CUDA graph cannot hold; "
                             "use bf16 (no scaler) or --graphs off")
        kernels, why = self.kernels, ""
        if kernels == "auto":
            kernels, why = choose(self.spec, parse_device(device))
            say = log or (lambda m: None)
            say(f"[train] --kernels auto: {kernels} ({why})")
        c = dataclasses.replace(
            self, device=device, precision=precision, channels_last=channels_last,
            compile=gpu if self.compile is None else self.compile,
            lr=base_lr(self.optimizer) if self.lr is None else self.lr,
            kernels=kernels,
            # On the CPU the FFCV stream is the default: host memory is the device's memory
            # anyway, and it keeps the on-disk format exercised. train() falls back to the
            # stream where the data does not fit on the GPU.
            placement=("resident" if gpu else "stream") if self.placement == "auto"
            else self.placement,
            graphs=(gpu and precision != "fp16") if self.graphs is None else self.graphs,
        )
        c.check()
        return c

    def check(self) -> None:
        """ValueError naming the command-line flag of the first bad setting (None is allowed
        where resolved() fills it in)."""
        if self.device is not None:
            parse_device(self.device)
        if self.optimizer not in OPTIMIZER_SETTINGS:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZER_SETTINGS)}, "
                             f"got {self.optimizer!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"--kernels must be one of {', '.join(KERNEL_CHOICES)}, "
                             f"got {self.kernels!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"--placement must be one of {', '.join(PLACEMENTS)}, "
                             f"got {self.placement!r}")
        if not (math.isfinite(self.checkpoint_every) and self.checkpoint_every >= 0):
            raise ValueError(f"--checkpoint-every must be 0 (every epoch) or a positive number "
                             f"of seconds, got {self.checkpoint_every}")
        for name in ("epochs", "batch_size", "test_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, "
                                 f"got {getattr(self, name)}")
        if self.tmax < 0:
            raise ValueError(f"--tmax must be 0 (constant rate) or positive, got {self.tmax}")
        for name in ("epochs", "tmax"):
            check_storable(getattr(self, name), f"--{name}")
        # A NaN or zero rate would only show as a wasted epoch and a "diverged" run.
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive finite number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"--weight-decay must be zero or a positive finite number, "
                             f"got {self.weight_decay}")
        if not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"--seed must be in 0..{SEED_MAX} (2**32 - 1), got {self.seed}")
        for name in ("train_subset", "test_subset"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
        if self.loader_workers < 0:
            raise ValueError(f"--loader-workers must be 0 (torch's thread count) or more, "
                             f"got {self.loader_workers}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["spec"] = self.spec.to_dict()
        return d


def on_off(text: str) -> bool:
    if text.lower() in ("on", "true", "1", "yes"):
        return True
    if text.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `lo` (argparse names the flag in its error)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {v}")
        return v

    return parse


def add_run_arguments(ap: argparse.ArgumentParser, checkpoints: bool = True) -> None:
    """Flags shared by fastres.run.train and fastres.grid.command: where and how a run computes.
    checkpoints=False: no --checkpoint-every (a command that keeps no checkpoints)."""
    ap.add_argument("--data", help="CIFAR-10 source (default: $FASTRES_DATA, else the cached "
                    "or downloaded copy)")
    ap.add_argument("--cache", help="cache folder for downloads and betons "
                    "(default: $FASTRES_CACHE or ~/.cache/fastres)")
    ap.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
    ap.add_argument("--precision", choices=PRECISIONS,
                    help="autocast dtype (default: bf16 on a GPU, fp32 on the CPU)")
    ap.add_argument("--channels-last", type=on_off, default=None, metavar="on|off")
    ap.add_argument("--compile", type=on_off, default=None, metavar="on|off")
    ap.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto",
                    help="eager: PyTorch everywhere (the reference); triton: fastres' fused "
                    "kernels everywhere; auto (default): per structure, what a committed GPU "
                    "measurement found fastest on this kind of GPU, else eager")
    ap.add_argument("--placement", choices=PLACEMENTS, default="auto",
                    help="resident: the uint8 data copied once to the device, shuffled there; "
                    "stream: the FFCV loader; auto (default): resident on a GPU where it fits")
    ap.add_argument("--graphs", type=on_off, default=None, metavar="on|off",
                    help="capture the whole training step (optimizer included) and evaluation "
                    "in CUDA graphs (default: on for a GPU)")
    if checkpoints:
        ap.add_argument("--checkpoint-every", type=float, default=CHECKPOINT_EVERY,
                        metavar="SECONDS", help="save the training state at most this often, "
                        "off the training thread (default 60; 0 = every epoch); metrics are "
                        "recorded every epoch, and the state at the end and on SIGTERM/SIGINT")
    else:
        ap.set_defaults(checkpoint_every=CHECKPOINT_EVERY)
    ap.add_argument("--train-subset", type=int, help="use a fixed random N of the training images")
    ap.add_argument("--test-subset", type=int, help="use a fixed random N of the test images")
    ap.add_argument("--loader-workers", type=int, default=0,
                    help="FFCV threads (0: torch's thread count, which FFCV also sets torch to)")
    ap.add_argument("--param-budget", type=int_at_least(1), default=PARAM_BUDGET,
                    help=f"most parameters a --spec may have (default {PARAM_BUDGET})")


def compute_settings(args: argparse.Namespace) -> dict:
    """The add_run_arguments flags that say how a run computes, as TrainConfig keywords: the same
    for every cell of a grid (the data source and subsets are set apart)."""
    return {"device": args.device, "precision": args.precision,
            "channels_last": args.channels_last, "compile": args.compile,
            "kernels": args.kernels, "loader_workers": args.loader_workers,
            "cache": args.cache, "placement": args.placement, "graphs": args.graphs,
            "checkpoint_every": args.checkpoint_every}
