"""One training run under the paper's protocol.

    python -m fastres.train --structure 1 --optimizer sgd --augment on --epochs 500 --tmax 200

The defaults are the authors' script (see shared/reference/protocol.md): batch 128 reshuffled
every epoch, test batch 100 over the whole test set after every epoch, the optimizer settings of
Table 2 with coupled weight decay 5e-4, CosineAnnealingLR(T_max) stepped once per epoch. Speed
switches (precision, channels-last, compile) change how it is computed, never what.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastres
from fastres.data import (
    BetonPair,
    DataError,
    DataUnavailable,
    fixed_subset,
    prepare,
    write_json_atomic,
)
from fastres.loaders.augment import DeviceAugment
from fastres.loaders.cifar import CifarLoader
from fastres.models import KERNELS, KernelsUnavailable, build
from fastres.protocol import (
    EPOCHS,
    OPTIMIZER_SETTINGS,
    TEST_BATCH,
    TMAX,
    TRAIN_BATCH,
    WEIGHT_DECAY,
    base_lr,
)
from fastres.records import Checkpointer, EpochMetrics, RunResult, best_of, finite
from fastres.structures import PARAM_BUDGET, STRUCTURES, ResNetSpec, SpecError, resolve

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
KERNEL_CHOICES = ("auto", *KERNELS)
PLACEMENTS = ("auto", "resident", "stream")
CHECKPOINT_EVERY = 60.0
DEVICE_FORMS = "cpu, cuda or cuda:N"
# FFCV seeds numpy with seed + epoch (non-negative only) and the results store keeps it in a
# signed 64-bit column: numpy's classic 32-bit seed range fits all of them.
SEED_MAX = 2**32 - 1
CPU_CHANNELS_LAST = ("channels-last on the CPU: oneDNN's channels-last convolution backward is "
                     "wrong at some shapes on some CPUs; training in contiguous NCHW instead")


def parse_device(text: str) -> torch.device:
    """`--device` as a torch.device; ValueError unless it names the CPU or a visible CUDA GPU."""
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
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        gpu = parse_device(device).type == "cuda"
        channels_last = gpu if self.channels_last is None else self.channels_last
        if channels_last and not gpu:
            if log is None:
                warnings.warn(CPU_CHANNELS_LAST, stacklevel=2)
            else:
                log(f"[train] {CPU_CHANNELS_LAST}")
            channels_last = False
        precision = self.precision or ("bf16" if gpu else "fp32")
        if self.graphs and not gpu:
            raise ValueError(f"--graphs on needs a CUDA GPU; {device} has no CUDA graphs")
        if self.graphs and precision == "fp16":
            raise ValueError("--graphs on with --precision fp16: fp16's loss scaler reads its "
                             "inf check on the host every step, which a CUDA graph cannot hold; "
                             "use bf16 (no scaler) or --graphs off")
        kernels, why = self.kernels, ""
        if kernels == "auto":
            from fastres.kernel_choice import choose

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

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["spec"] = self.spec.to_dict()
        return d


def make_optimizer(name: str, params, lr: float | None = None,
                   weight_decay: float = WEIGHT_DECAY) -> torch.optim.Optimizer:
    cls_name, kwargs = OPTIMIZER_SETTINGS[name]
    cls = getattr(torch.optim, cls_name)
    kwargs = {**kwargs, "weight_decay": weight_decay}
    if lr is not None:
        kwargs["lr"] = lr
    return cls(params, **kwargs)


def make_scheduler(opt: torch.optim.Optimizer, tmax: int) -> torch.optim.lr_scheduler.LRScheduler:
    """CosineAnnealingLR(T_max), stepped once per epoch and left to run past T_max (the
    paper's "reset"); T_max 0 means a constant rate."""
    if tmax == 0:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _epoch: 1.0)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tmax)


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(fastres.__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {"fastres": fastres.__version__, "git_commit": commit or None,
            "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "device_name": name or platform.machine()}


def make_loaders(cfg: TrainConfig, data: BetonPair) -> tuple[CifarLoader, CifarLoader]:
    device = torch.device(cfg.device)
    dtype = PRECISIONS[cfg.precision] or torch.float32
    train_aug = DeviceAugment(crop=cfg.augment, flip=cfg.augment, normalize=cfg.normalize,
                              dtype=dtype, channels_last=bool(cfg.channels_last))
    test_aug = DeviceAugment(crop=False, flip=False, normalize=cfg.normalize, dtype=dtype,
                             channels_last=bool(cfg.channels_last))

    train = CifarLoader(data.train, cfg.batch_size, True, device, train_aug, seed=cfg.seed,
                        indices=fixed_subset(cfg.train_subset, data.num_train),
                        num_workers=cfg.loader_workers)
    test = CifarLoader(data.test, cfg.test_batch_size, False, device, test_aug, seed=cfg.seed,
                       indices=fixed_subset(cfg.test_subset, data.num_test),
                       num_workers=cfg.loader_workers)
    return train, test


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (see stop_on_signals). A KeyboardInterrupt, not an Exception, so
    that the `except Exception` around decoders and readers cannot swallow it."""

    def __init__(self, signum: int):
        super().__init__(signum)  # args (signum,): pickles across processes
        self.signum = signum

    def __str__(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's 128 + signal number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
                    ) -> Iterator[None]:
    """Within the block, each of `signums` raises Interrupted(signum) in the main thread, so the
    work stops at once through its `finally` blocks (temp files removed, nothing half-written
    kept) and the caller can exit cleanly; the previous handlers are restored on leaving. Off the
    main thread, where Python cannot set handlers, it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupted(signum: int, _frame) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, raise_interrupted) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            # None: a handler not set from Python; the default is the closest we can restore.
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def train(cfg: TrainConfig, data: BetonPair | None = None,
          on_epoch: Callable[[EpochMetrics], None] | None = None,
          log: Callable[[str], None] = print,
          checkpoint: Checkpointer | None = None, explain_kernels: bool = False,
          live: bool = False) -> RunResult:
    """Run the whole schedule; stops early (status "diverged") on a non-finite loss.

    With a checkpoint, a run resumes after its last committed epoch (model, optimizer,
    scheduler, scaler, RNG and loader state) and commits every epoch as it ends. live=True
    shows a batch counter on stderr during long epochs."""
    cfg = cfg.resolved(log)
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest algorithm
    if data is None:
        data = prepare(cfg.data, cfg.cache, log=log)
    train_loader, test_loader = make_loaders(cfg, data)

    torch.manual_seed(cfg.seed)
    model = build(cfg.spec, kernels=cfg.kernels, device=device).to(device)
    kernel_plan = model.explain_kernels() if hasattr(model, "explain_kernels") else []
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    sched = make_scheduler(opt, cfg.tmax)
    amp_dtype = PRECISIONS[cfg.precision]
    # fp16 needs loss scaling; bf16 has fp32's range and does not.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    step_model: nn.Module = torch.compile(model) if cfg.compile else model

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                              enabled=amp_dtype is not None)

    log(f"[train] {cfg.spec} | {cfg.optimizer} lr {cfg.lr} wd {cfg.weight_decay} | augment "
        f"{'on' if cfg.augment else 'off'} | {cfg.epochs} epochs, T_max {cfg.tmax} | {device} "
        f"{cfg.precision}{' channels-last' if cfg.channels_last else ''}"
        f"{' compiled' if cfg.compile else ''} | {train_loader.num_samples} train / "
        f"{test_loader.num_samples} test images from {data.kind} {data.source}")

    for line in kernel_plan if explain_kernels else []:
        log(f"[kernels] {line}")

    history: list[EpochMetrics] = []
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        state, history = saved
        if state["epoch"] != len(history):
            raise ValueError(f"checkpoint is of epoch {state['epoch']} but {len(history)} "
                             "epochs are recorded")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        train_loader.generator.set_state(state["augment_rng"])
        train_loader.epoch = state["loader_epoch"]
        log(f"[train] resuming after epoch {state['epoch']}")
    status, diverged_at = "completed", None
    if history and not finite(history[-1]):  # killed between a diverged epoch and its report
        status, diverged_at = "diverged", history[-1].epoch
    remaining = range(len(history) + 1, cfg.epochs + 1) if status == "completed" else range(0)
    for epoch in remaining:
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        model.train()
        # Sums stay on the device: one host sync per epoch, not per step.
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        shown = time.monotonic()
        for step, (images, labels) in enumerate(train_loader, 1):
            if live and time.monotonic() - shown > 2:  # a long (CPU) epoch: show it moving
                shown = time.monotonic()
                print(f"\r  epoch {epoch}: batch {step}/{len(train_loader)}", end="",
                      file=sys.stderr, flush=True)
            with autocast():
                logits = step_model(images)
                loss = F.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss_sum += loss.detach().float() * labels.numel()
            correct += (logits.argmax(1) == labels).sum()
        sched.step()
        if live:
            print("\r\033[K", end="", file=sys.stderr, flush=True)  # clear the batch counter
        train_loss = loss_sum.item() / train_loader.num_samples
        train_acc = correct.item() / train_loader.num_samples
        test_loss, test_acc = evaluate(step_model, test_loader, autocast)
        m = EpochMetrics(epoch, lr, train_loss, train_acc, test_loss, test_acc,
                         time.perf_counter() - t0)
        history.append(m)
        log(f"epoch {epoch:>4}/{cfg.epochs}  lr {lr:.5f}  train loss {train_loss:.4f} "
            f"acc {100 * train_acc:6.2f}%  test loss {test_loss:.4f} acc {100 * test_acc:6.2f}%  "
            f"{m.seconds:.1f}s")
        if checkpoint is not None:
            checkpoint.commit(m, {
                "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "augment_rng": train_loader.generator.get_state(),
                "loader_epoch": train_loader.epoch})
        if on_epoch is not None:
            on_epoch(m)
        if not finite(m):
            status, diverged_at = "diverged", epoch
            log(f"[train] loss is {train_loss if not math.isfinite(train_loss) else test_loss} "
                f"at epoch {epoch}: run diverged, stopping")
            break

    best_acc, best_epoch, loss_at_best = best_of(history)
    if best_acc is not None:
        log(f"[train] {status}: best test accuracy {100 * best_acc:.2f}% at epoch {best_epoch} "
            f"(test loss {loss_at_best:.4f})")
    env = environment(device)
    if kernel_plan:  # which kernels ran each layer, recorded with the result
        env["kernels"] = kernel_plan
    return RunResult(cfg.to_dict(), status, history, best_acc, best_epoch, loss_at_best,
                     diverged_at, env,
                     {"kind": data.kind, "source": data.source, "num_train":
                      train_loader.num_samples, "num_test": test_loader.num_samples})


@torch.no_grad()
def evaluate(model: nn.Module, loader: CifarLoader, autocast) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the whole loader, with the BN running statistics."""
    model.eval()
    loss_sum = torch.zeros((), device=loader.device)
    correct = torch.zeros((), device=loader.device, dtype=torch.long)
    for images, labels in loader:
        with autocast():
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
    model.train()
    return loss_sum.item() / loader.num_samples, correct.item() / loader.num_samples


def on_off(text: str) -> bool:
    if text.lower() in ("on", "true", "1", "yes"):
        return True
    if text.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    """Flags shared by fastres.train and fastres.grid: where and how a run computes."""
    ap.add_argument("--data", help="CIFAR-10 source (default: $FASTRES_DATA, else the cached "
                    "or downloaded copy)")
    ap.add_argument("--cache", help="cache folder for downloads and betons "
                    "(default: $FASTRES_CACHE or ~/.cache/fastres)")
    ap.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
    ap.add_argument("--precision", choices=tuple(PRECISIONS),
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
    ap.add_argument("--checkpoint-every", type=float, default=CHECKPOINT_EVERY,
                    metavar="SECONDS", help="save the training state at most this often, off "
                    "the training thread (default 60; 0 = every epoch); metrics are recorded "
                    "every epoch, and the state at the end and on SIGTERM/SIGINT")
    ap.add_argument("--train-subset", type=int, help="use a fixed random N of the training images")
    ap.add_argument("--test-subset", type=int, help="use a fixed random N of the test images")
    ap.add_argument("--loader-workers", type=int, default=0,
                    help="FFCV threads (0: torch's thread count, which FFCV also sets torch to)")
    ap.add_argument("--param-budget", type=int, default=PARAM_BUDGET)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastres.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structure", type=int, help="Table 1 structure, 1..9 (default 1)")
    ap.add_argument("--spec", help='custom structure: "N=2 B=1,1 C_in=16 F0=3 P0=1 F1=3 P1=1 K=1"')
    ap.add_argument("--optimizer", choices=tuple(OPTIMIZER_SETTINGS), default="sgd")
    ap.add_argument("--augment", type=on_off, default=True, metavar="on|off")
    ap.add_argument("--normalize", type=on_off, default=True, metavar="on|off")
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--tmax", type=int, default=TMAX, help="cosine T_max in epochs; 0 = constant")
    ap.add_argument("--lr", type=float, help="override Table 2's learning rate")
    ap.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the whole result here as JSON")
    ap.add_argument("--explain-kernels", action="store_true",
                    help="print which kernels run each layer (with --kernels triton)")
    add_run_arguments(ap)
    args = ap.parse_args(argv)
    try:
        with stop_on_signals():
            return _run(args)
    except KeyboardInterrupt as e:  # Interrupted, or a Ctrl-C before the handlers were set
        clear = "\r\033[K" if sys.stderr.isatty() else ""  # the live batch counter's line
        print(f"{clear}interrupted", file=sys.stderr)
        return e.exit_code if isinstance(e, Interrupted) else 128 + signal.SIGINT


def _run(args: argparse.Namespace) -> int:
    try:
        spec = resolve(args.structure, args.spec, args.param_budget)
        cfg = TrainConfig(
            spec=spec, structure=None if args.spec else (args.structure or 1),
            optimizer=args.optimizer, augment=args.augment, normalize=args.normalize,
            epochs=args.epochs, tmax=args.tmax, lr=args.lr, weight_decay=args.weight_decay,
            seed=args.seed, device=args.device, precision=args.precision,
            channels_last=args.channels_last, compile=args.compile, kernels=args.kernels,
            placement=args.placement, graphs=args.graphs, checkpoint_every=args.checkpoint_every,
            train_subset=args.train_subset, test_subset=args.test_subset, data=args.data,
            cache=args.cache, loader_workers=args.loader_workers).resolved(log=print)
        if args.json:  # before the data and the run, not after them
            check_output_path(args.json, "--json")
        result = train(cfg, explain_kernels=args.explain_kernels, live=sys.stderr.isatty())
    except DataUnavailable as e:
        print(f"\nerror: no CIFAR-10 data.\n{e}", file=sys.stderr)
        return 2
    except (SpecError, DataError, ValueError, KernelsUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        try:
            write_json_atomic(args.json, result.to_dict())
        except OSError as e:  # e.g. the disk filled during the run: keep the result anyway
            print(f"error: --json {args.json}: cannot write ({e}); the result follows on stdout",
                  file=sys.stderr)
            print(json.dumps(result.to_dict(), indent=2))
            return 2
        print(f"[train] wrote {args.json}")
    return 0 if result.status == "completed" else 3


if __name__ == "__main__":
    sys.exit(main())
