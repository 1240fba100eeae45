"""Knowing what you started: how long a grid will take here, from a few timed steps of each
structure it will train (timed apart from training, a couple of seconds at most each).

The steps are the eager model's (no compilation, no CUDA graphs: compiling alone can take longer
than the measurement), so on a GPU the estimate is an upper bound that the fast path beats. On
the CPU, where whole CIFAR-10 epochs of the paper's structures take hours, it also says what the
paper's grid would take at the rate measured and what to run instead.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastres.grid.plan import epoch_flop, fmt_time
from fastres.kernels import build
from fastres.run.config import TrainConfig
from fastres.run.steps import AMP_DTYPES, make_optimizer
from fastres.study.protocol import CIFAR_SIZES, EPOCHS, PAPER_OPTIMIZERS
from fastres.study.structures import STRUCTURES, ResNetSpec

CPU_BATCH = 16  # on the CPU a step's time is close to linear in the batch: time a small one


@dataclass(frozen=True)
class StepTimes:
    """Seconds per image of a training step and of evaluation, for one spec on one device."""

    spec: ResNetSpec
    train_s: float
    eval_s: float
    batch: int

    def epoch_seconds(self, n_train: int, n_test: int) -> float:
        return n_train * self.train_s + n_test * self.eval_s


def duration(seconds: float) -> str:
    """fmt_time, in days beyond two of them (a CPU's estimate of the paper's grid)."""
    return f"{seconds / 86400:,.0f} days" if seconds > 2 * 86400 else fmt_time(seconds)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(cfg: TrainConfig, budget_s: float = 2.0, most: int = 8) -> StepTimes:
    """Median seconds per image of a few training steps (forward, backward, optimizer) and eval
    batches of `cfg`'s structure, after one untimed warm-up; `cfg` is resolved."""
    device = torch.device(cfg.device)
    batch = cfg.batch_size if device.type == "cuda" else min(cfg.batch_size, CPU_BATCH)
    model = build(cfg.spec, kernels=cfg.kernels, device=device).to(device)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    g = torch.Generator().manual_seed(0)  # data made up: only the time counts
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device).to(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    amp = AMP_DTYPES[cfg.precision]

    def autocast():
        return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def eval_step() -> None:
        with autocast():
            model(x)

    def median(step: Callable[[], None]) -> float:
        step()  # warm-up: allocation, cuDNN's algorithm search
        _sync(device)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 2 or (len(times) < most and time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) / batch

    model.train()
    train_s = median(train_step)
    model.eval()
    return StepTimes(cfg.spec, train_s, median(eval_step), batch)


def estimate_lines(configs: list[TrainConfig], epochs_left: list[int], n_train: int,
                   n_test: int, workers: int = 1,
                   log: Callable[[str], None] = print) -> list[str]:
    """What the grid will take: a line per structure measured, the total, and on the CPU the
    paper's grid at the rate measured and what to run instead. `configs` are the resolved
    configs of the cells still to train (one measurement per spec)."""
    if not configs:
        return ["[grid] estimate: nothing left to train"]
    device = torch.device(configs[0].device)
    measured: dict[str, StepTimes] = {}
    for cfg in configs:
        if str(cfg.spec) not in measured:
            measured[str(cfg.spec)] = time_steps(cfg)
    lines, total, rate = [], 0.0, []
    for key, t in measured.items():
        epoch_s = t.epoch_seconds(n_train, n_test)
        flop = epoch_flop(t.spec, n_train, n_test)
        rate.append(flop / epoch_s)
        lines.append(f"[grid] estimate: {key}: {epoch_s:.1f} s per epoch of {n_train} + "
                     f"{n_test} images ({1e3 * t.train_s * t.batch:.1f} ms per training step "
                     f"of {t.batch}, eager) on {device}")
    for cfg, left in zip(configs, epochs_left, strict=True):
        total += left * measured[str(cfg.spec)].epoch_seconds(n_train, n_test)
    lines.append(f"[grid] estimate: {sum(epochs_left)} epochs left in {len(configs)} cells: "
                 f"about {duration(total / max(workers, 1))}"
                 + (f" over {workers} workers" if workers > 1 else "")
                 + (" (eager steps: the compiled, graphed fast path is faster)"
                    if device.type == "cuda" else ""))
    if device.type == "cpu":
        flops = statistics.median(rate)
        paper = sum(epoch_flop(s, *CIFAR_SIZES) for s in STRUCTURES.values()) * \
            len(PAPER_OPTIMIZERS) * 2 * EPOCHS
        what = "these structures" if len(measured) > 1 else "this structure"
        lines.append(f"[grid] on this CPU, at the {flops / 1e9:.0f} GFLOP/s measured on {what}, "
                     f"the paper's grid (90 runs x {EPOCHS} epochs) would take about "
                     f"{duration(paper / flops)}. "
                     "To see fastres work here: --preset smoke, or a subset (e.g. --structures 1 "
                     "--optimizers sgd --epochs 3 --train-subset 2000); for the study, a GPU.")
    return lines
