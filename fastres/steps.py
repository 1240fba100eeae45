"""The training step and the evaluation batch, run eagerly or replayed from CUDA graphs.

On a GPU a small ResNet's step is hundreds of short kernels; launching them one by one from
Python costs more than computing them. So the whole step (forward, loss, backward, the
optimizer's update and the metric sums) is captured once per batch size and replayed. Three
things make that possible:
- the learning rate lives in a device tensor, so the cosine schedule's fill_() reaches the
  captured update without a re-capture;
- metrics accumulate in device tensors, read once per epoch (no host sync inside an epoch);
- gradients are set to None before capture, so backward allocates them in the graph's pool and
  each replay rewrites them in place.
Where a piece cannot be captured (Adagrad: torch's implementation reads its step count on the
host) it runs outside the graph, and the log says so. Off the GPU everything runs eagerly with
stock torch optimizers: the reference path, bit for bit the loop the paper's script runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres.protocol import OPTIMIZER_SETTINGS, WEIGHT_DECAY

# The autocast dtype of each --precision name (fastres.config.PRECISIONS); None: no autocast.
AMP_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}

# Why an optimizer's update stays outside the captured step, by name; others are captured.
NOT_CAPTURABLE = {
    "adagrad": "torch's Adagrad has no capturable implementation (it reads its step count on "
               "the host); its update runs after each replayed forward and backward",
}


def make_optimizer(name: str, params: Iterable[torch.Tensor], lr: float | None = None,
                   weight_decay: float = WEIGHT_DECAY, graphed: bool = False,
                   device: torch.device | None = None) -> torch.optim.Optimizer:
    """Table 2's optimizer with coupled weight decay. graphed=True (a CUDA device): the
    implementation that a CUDA graph can hold, with the rate in a device tensor; the update is
    the same algorithm (fused SGD, capturable Adam and Adadelta)."""
    cls_name, settings = OPTIMIZER_SETTINGS[name]
    kwargs = {**settings, "weight_decay": weight_decay}
    if lr is not None:
        kwargs["lr"] = lr
    if graphed and name not in NOT_CAPTURABLE:
        kwargs["lr"] = torch.tensor(float(kwargs["lr"]), device=device)
        if cls_name == "SGD":
            kwargs["fused"] = True  # takes a tensor rate without a host read
        else:
            kwargs.update(capturable=True, foreach=True)
    return getattr(torch.optim, cls_name)(params, **kwargs)


def make_scheduler(opt: torch.optim.Optimizer, tmax: int) -> torch.optim.lr_scheduler.LRScheduler:
    """CosineAnnealingLR(T_max), stepped once per epoch and left to run past T_max (the
    paper's "reset"); T_max 0 means a constant rate."""
    if tmax == 0:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _epoch: 1.0)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tmax)


class Schedule:
    """The paper's schedule computed on the host in float64, as the authors' script computes it.
    A float rate is the optimizer's own; a device-tensor rate (graphed steps) follows a host
    stand-in, filled in place each epoch (no host read, and none of the float32 drift that
    running the recursive cosine formula on a device tensor would add over 500 epochs)."""

    def __init__(self, opt: torch.optim.Optimizer, tmax: int):
        self.opt = opt
        self.rates = [g["lr"] for g in opt.param_groups if isinstance(g["lr"], torch.Tensor)]
        if self.rates:
            base = float(self.rates[0].item())  # the run's base rate: one read per run
            self.host = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
        else:
            self.host = opt
        self.scheduler = make_scheduler(self.host, tmax)

    @property
    def lr(self) -> float:
        """The rate of the epoch about to run."""
        return float(self.host.param_groups[0]["lr"])

    def step(self) -> None:
        self.scheduler.step()
        for rate in self.rates:
            rate.fill_(self.lr)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
        if self.host is not self.opt:  # the stand-in's rate is not in the scheduler's state
            self.host.param_groups[0]["lr"] = self.scheduler.get_last_lr()[0]
        for rate in self.rates:
            rate.fill_(self.lr)


class Steps:
    """Train steps and eval batches of one model and optimizer, with the epoch's metric sums on
    the device. graphs=True: each (mode, batch size) runs eagerly `warm` times on a side stream
    (real steps on real batches, where compilation, cuDNN autotuning and the optimizer's lazily
    made state happen), is then captured, and every later batch of that size replays it. The
    captured graphs stay valid for the life of the model and optimizer: a new run on them
    (reset_run) reuses them."""

    def __init__(self, model: nn.Module, step_model: nn.Module, opt: torch.optim.Optimizer,
                 device: torch.device, amp_dtype: torch.dtype | None,
                 scaler: torch.amp.GradScaler | None = None, graphs: bool = False,
                 update_in_graph: bool = True, warm: int = 3,
                 log: Callable[[str], None] = print):
        if graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if graphs and scaler is not None and scaler.is_enabled():
            raise ValueError("fp16 loss scaling reads the host every step: no CUDA graphs")
        self.model, self.step_model, self.opt, self.device = model, step_model, opt, device
        self.amp_dtype, self.scaler, self.graphs = amp_dtype, scaler, graphs
        self.update_in_graph, self.warm, self.log = update_in_graph, warm, log
        self.seen: dict[tuple[str, int], int] = {}
        self.captured: dict[tuple[str, int], tuple] = {}
        zero = torch.zeros((), device=device)
        self.train_loss, self.test_loss = zero.clone(), zero.clone()
        self.train_correct = torch.zeros((), device=device, dtype=torch.long)
        self.test_correct = torch.zeros((), device=device, dtype=torch.long)
        self.side = torch.cuda.Stream(device) if graphs else None
        self.capture_seconds = 0.0

    def autocast(self):
        # The autocast weight cache must be off under capture; off it changes nothing else.
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None, cache_enabled=not self.graphs)

    # -- the bodies: what one step computes, eager or captured

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with self.autocast():
            logits = self.step_model(x)
            loss = F.cross_entropy(logits, y)
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        self.train_loss += loss.detach().float() * y.numel()
        self.train_correct += (logits.argmax(1) == y).sum()

    def _update(self) -> None:
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()

    def _train_body(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._forward_backward(x, y)
        if self.update_in_graph:
            self._update()

    def _eval_body(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.no_grad(), self.autocast():
            logits = self.step_model(x)
            self.test_loss += F.cross_entropy(logits.float(), y, reduction="sum")
            self.test_correct += (logits.argmax(1) == y).sum()

    # -- the public steps

    def train(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step on the batch (the model in train mode)."""
        if not self.graphs:
            self.opt.zero_grad(set_to_none=True)
            self._forward_backward(x, y)
            self._update()
            return
        self._graphed("train", x, y, self._train_body)
        if not self.update_in_graph:
            self._update()

    def eval(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Loss and accuracy sums of one test batch (the model in eval mode)."""
        if not self.graphs:
            self._eval_body(x, y)
            return
        self._graphed("eval", x, y, self._eval_body)

    def _graphed(self, mode: str, x: torch.Tensor, y: torch.Tensor, body) -> None:
        key = (mode, x.shape[0])
        if key in self.captured:
            g, sx, sy = self.captured[key]
            sx.copy_(x)
            sy.copy_(y)
            g.replay()
            return
        current = torch.cuda.current_stream(self.device)
        if self.seen.get(key, 0) < self.warm:
            self.seen[key] = self.seen.get(key, 0) + 1
            self.side.wait_stream(current)
            with torch.cuda.stream(self.side):
                if mode == "train":
                    self.opt.zero_grad(set_to_none=True)
                body(x, y)
            current.wait_stream(self.side)
            return
        # Capture records without running; the replay right after computes this batch.
        t0 = time.perf_counter()
        sx, sy = x.clone(), y.clone()
        g = torch.cuda.CUDAGraph()
        if mode == "train":
            self.opt.zero_grad(set_to_none=True)  # gradients from the graph's own pool
        self.side.wait_stream(current)
        # On the side stream the warm-ups used, so the lazily made autograd state belongs to
        # it; thread-local, so a loader thread may go on copying batches meanwhile.
        with torch.cuda.graph(g, stream=self.side, capture_error_mode="thread_local"):
            body(sx, sy)
        current.wait_stream(self.side)
        self.captured[key] = (g, sx, sy)
        torch.cuda.synchronize(self.device)
        self.capture_seconds += time.perf_counter() - t0
        g.replay()

    def forget_graphs(self) -> None:
        """Drop the captured steps (the optimizer's state tensors were replaced)."""
        self.captured.clear()
        self.seen.clear()

    # -- the epoch's sums

    def reset_sums(self) -> None:
        for t in (self.train_loss, self.train_correct, self.test_loss, self.test_correct):
            t.zero_()

    def sums(self) -> tuple[float, int, float, int]:
        """(train loss sum, train correct, test loss sum, test correct): one host sync."""
        packed = torch.stack([self.train_loss.double(), self.train_correct.double(),
                              self.test_loss.double(), self.test_correct.double()]).tolist()
        return packed[0], int(packed[1]), packed[2], int(packed[3])
