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
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import fastres
from fastres.kernels.choice import KernelsUnavailable
from fastres.loaders.augment import DeviceAugment
from fastres.loaders.cifar import CifarLoader
from fastres.loaders.resident import ResidentLoader
from fastres.run.cell import Cell, GridProtocol
from fastres.run.checkpoints import BestWeights, StateSaver
from fastres.run.config import (
    TrainConfig,
    add_run_arguments,
    check_output_path,
    compute_settings,
    on_off,
)
from fastres.run.records import Checkpointer, EpochMetrics, RunResult, best_of, finite
from fastres.run.signals import Interrupted, StopRequest, stop_on_signals
from fastres.run.steps import AMP_DTYPES, Schedule
from fastres.run.workbench import Workbench
from fastres.study.data import (
    BetonPair,
    DataError,
    DataUnavailable,
    fixed_subset,
    prepare,
    silence_conversion_bars,
    write_json_atomic,
)
from fastres.study.protocol import (
    EPOCHS,
    OPTIMIZER_SETTINGS,
    TMAX,
    WEIGHT_DECAY,
)
from fastres.study.structures import SpecError, resolve


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {"fastres": fastres.__version__, "git_commit": commit or None,
            "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "device_name": name or platform.machine()}


Loader = CifarLoader | ResidentLoader


def make_loaders(cfg: TrainConfig, data: BetonPair, bench: Workbench | None = None,
                 log: Callable[[str], None] = print) -> tuple[Loader, Loader, str]:
    """The run's train and test loaders and the placement they use: resident (the splits on
    the device, from `bench`) or the FFCV stream. Both draw their order from one permutation
    source (fastres.loaders.order) and their crops from one seeded generator, so a seed gives
    the same batches either way."""
    device = torch.device(cfg.device)
    dtype = AMP_DTYPES[cfg.precision] or torch.float32
    # One switch for every kernel: --kernels eager means PyTorch's augmentation too.
    backend = "triton" if cfg.kernels == "triton" else "torch"
    train_aug = DeviceAugment(crop=cfg.augment, flip=cfg.augment, normalize=cfg.normalize,
                              dtype=dtype, channels_last=bool(cfg.channels_last), backend=backend)
    test_aug = DeviceAugment(crop=False, flip=False, normalize=cfg.normalize, dtype=dtype,
                             channels_last=bool(cfg.channels_last), backend=backend)
    train_idx = fixed_subset(cfg.train_subset, data.num_train)
    test_idx = fixed_subset(cfg.test_subset, data.num_test)
    if cfg.placement == "resident":
        bench = bench or Workbench(device)
        xtr = bench.resident(data.train, train_idx, log)
        xte = bench.resident(data.test, test_idx, log) if xtr is not None else None
        if xtr is not None and xte is not None:
            return (ResidentLoader(xtr, cfg.batch_size, True, device, train_aug, seed=cfg.seed),
                    ResidentLoader(xte, cfg.test_batch_size, False, device, test_aug,
                                   seed=cfg.seed), "resident")
    train = CifarLoader(data.train, cfg.batch_size, True, device, train_aug, seed=cfg.seed,
                        indices=train_idx, num_workers=cfg.loader_workers)
    test = CifarLoader(data.test, cfg.test_batch_size, False, device, test_aug, seed=cfg.seed,
                       indices=test_idx, num_workers=cfg.loader_workers)
    return train, test, "stream"


def train(cfg: TrainConfig, data: BetonPair | None = None,
          on_epoch: Callable[[EpochMetrics], None] | None = None,
          log: Callable[[str], None] = print,
          checkpoint: Checkpointer | None = None, explain_kernels: bool = False,
          live: bool = False, bench: Workbench | None = None) -> RunResult:
    """Run the whole schedule; stops early (status "diverged") on a non-finite loss.

    With a checkpoint, a run resumes from its last saved state (model, optimizer, scheduler,
    scaler, RNG and loader state), records every epoch's metrics, and saves its state and best
    weights off the training thread every cfg.checkpoint_every seconds, at the end, and on
    SIGINT/SIGTERM (then raises Interrupted). `bench` keeps data and compiled, graphed models
    warm between runs (a grid worker passes its own). live=True shows a batch counter on stderr
    during long epochs."""
    cfg = cfg.resolved(log)
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest algorithm
    if data is None:
        data = prepare(cfg.data, cfg.cache, log=log)
    bench = bench or Workbench(device)
    train_loader, test_loader, placement = make_loaders(cfg, data, bench, log)
    if placement != cfg.placement:
        cfg = dataclasses.replace(cfg, placement=placement)  # recorded as it ran
    engine, warm = bench.engine(cfg, log)
    engine.start_run(cfg)
    model, opt, steps = engine.model, engine.opt, engine.steps
    schedule = Schedule(opt, cfg.tmax, cfg.lr)

    log(f"[train] {cfg.spec} | {cfg.optimizer} lr {cfg.lr} wd {cfg.weight_decay} | augment "
        f"{'on' if cfg.augment else 'off'} | {cfg.epochs} epochs, T_max {cfg.tmax} | {device} "
        f"{cfg.precision}{' channels-last' if cfg.channels_last else ''}"
        f"{' compiled' if cfg.compile else ''}{' graphed' if cfg.graphs else ''} | "
        f"{cfg.kernels} kernels | {train_loader.num_samples} train / "
        f"{test_loader.num_samples} test images, {placement}, from {data.kind} {data.source}"
        f"{' | warm engine' if warm else ''}")
    if explain_kernels:
        for line in engine.kernel_plan or [f"{cfg.kernels}: PyTorch's own kernels for every "
                                           "layer (--kernels triton runs fastres's)"]:
            log(f"[kernels] {line}")

    history: list[EpochMetrics] = []
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        state, history = saved
        if state["epoch"] != len(history):
            raise ValueError(f"checkpoint is of epoch {state['epoch']} but {len(history)} "
                             "epochs are recorded")
        engine.load(state)
        schedule.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        train_loader.generator.set_state(state["augment_rng"])
        train_loader.epoch = state["loader_epoch"]
        log(f"[train] resuming after epoch {state['epoch']}")
    status, diverged_at = "completed", None
    if history and not finite(history[-1]):  # killed between a diverged epoch and its report
        status, diverged_at = "diverged", history[-1].epoch
    best_acc = best_of(history)[0]
    best = BestWeights() if checkpoint is not None else None
    epoch = len(history)

    def state() -> dict:
        return {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": schedule.state_dict(), "scaler": engine.scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "augment_rng": train_loader.generator.get_state(),
                "loader_epoch": train_loader.epoch}

    # The saver waits for its write in flight on the way out; a failed write is raised (or, on
    # the way out of another error, attached to it).
    saving = StateSaver(checkpoint, cfg.checkpoint_every) if checkpoint is not None \
        else contextlib.nullcontext()
    stop = StopRequest(log) if checkpoint is not None else contextlib.nullcontext()
    with saving as saver:
        with stop:
            remaining = range(epoch + 1, cfg.epochs + 1) if status == "completed" else range(0)
            for epoch in remaining:
                t0 = time.perf_counter()
                lr = schedule.lr
                steps.reset_sums()
                model.train()
                shown = time.monotonic()
                for step, (images, labels) in enumerate(train_loader, 1):
                    if live and time.monotonic() - shown > 2:  # a long (CPU) epoch: show it
                        shown = time.monotonic()
                        print(f"\r  epoch {epoch}: batch {step}/{len(train_loader)}", end="",
                              file=sys.stderr, flush=True)
                    steps.train(images, labels)
                schedule.step()
                if live:
                    print("\r\033[K", end="", file=sys.stderr, flush=True)  # clear the counter
                model.eval()
                for images, labels in test_loader:
                    steps.eval(images, labels)
                model.train()
                # The epoch's one host sync: sums kept on the device until now.
                loss_sum, correct, test_sum, test_correct = steps.sums()
                m = EpochMetrics(epoch, lr, loss_sum / train_loader.num_samples,
                                 correct / train_loader.num_samples,
                                 test_sum / test_loader.num_samples,
                                 test_correct / test_loader.num_samples,
                                 time.perf_counter() - t0)
                history.append(m)
                log(f"epoch {epoch:>4}/{cfg.epochs}  lr {lr:.5f}  train loss {m.train_loss:.4f} "
                    f"acc {100 * m.train_acc:6.2f}%  test loss {m.test_loss:.4f} "
                    f"acc {100 * m.test_acc:6.2f}%  {m.seconds:.1f}s")
                if checkpoint is not None:
                    checkpoint.record(m)
                    if finite(m) and (best_acc is None or m.test_acc > best_acc):
                        best_acc = m.test_acc
                        best.update(epoch, model.state_dict())
                    if cfg.checkpoint_every == 0:  # every epoch's state, as the flag says
                        saver.writer.wait()
                    saver.epoch_end(epoch, state, best)
                if on_epoch is not None:
                    on_epoch(m)
                if not finite(m):
                    status, diverged_at = "diverged", epoch
                    bad = m.train_loss if not math.isfinite(m.train_loss) else m.test_loss
                    log(f"[train] loss is {bad} at epoch {epoch}: run diverged, stopping")
                    break
                if saver is not None and stop.signum is not None:
                    saver.final(epoch, state, best)
                    log(f"[train] state of epoch {epoch} saved; stopping")
                    raise Interrupted(stop.signum)
        if saver is not None:
            saver.final(epoch, state, best)  # the end of the run: its last state and best

    best_acc, best_epoch, loss_at_best = best_of(history)
    if best_acc is not None:
        log(f"[train] {status}: best test accuracy {100 * best_acc:.2f}% at epoch {best_epoch} "
            f"(test loss {loss_at_best:.4f})")
    env = environment(device)
    if engine.kernel_plan:  # which kernels ran each layer, recorded with the result
        env["kernels"] = engine.kernel_plan
    if device.type == "cuda":  # what this process has held at most: benchmarks read it
        env["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    if steps.capture_seconds:
        env["graph_capture_seconds"] = round(steps.capture_seconds, 3)
    return RunResult(cfg.to_dict(), status, history, best_acc, best_epoch, loss_at_best,
                     diverged_at, env,
                     {"kind": data.kind, "source": data.source, "num_train":
                      train_loader.num_samples, "num_test": test_loader.num_samples,
                      "placement": placement})


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
    # No --checkpoint-every: a single run keeps no checkpoints (the grid does, and resumes).
    add_run_arguments(ap, checkpoints=False)
    args = ap.parse_args(argv)
    if not sys.stderr.isatty():  # a pipe or a log: FFCV's bars would be \r fragments there
        silence_conversion_bars()
    try:
        with stop_on_signals():
            return _run(args)
    except KeyboardInterrupt as e:  # Interrupted, or a Ctrl-C before the handlers were set
        clear = "\r\033[K" if sys.stderr.isatty() else ""  # the live batch counter's line
        print(f"{clear}interrupted: this run's progress is lost (python -m fastres.train keeps "
              "no checkpoints; python -m fastres.grid saves and resumes its runs)",
              file=sys.stderr)
        return e.exit_code if isinstance(e, Interrupted) else 128 + signal.SIGINT


def _run(args: argparse.Namespace) -> int:
    try:
        spec = resolve(args.structure, args.spec, args.param_budget)
        cell = Cell(spec, None if args.spec else (args.structure or 1), args.optimizer,
                    args.augment, args.normalize, args.tmax, args.seed)
        protocol = GridProtocol(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                                train_subset=args.train_subset, test_subset=args.test_subset)
        cfg = cell.config(protocol, {**compute_settings(args), "data": args.data}
                          ).resolved(log=print)
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

