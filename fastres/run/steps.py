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
Every Table 2 optimizer is captured: fused SGD, capturable Adam and Adadelta, and
fastres.run.adagrad.DeviceAdagrad (torch's Adagrad reads its step count on the host). Off the GPU
everything runs eagerly with stock torch optimizers: the reference path, bit for bit the loop
the paper's script runs.

How graphs are made is one small object per device type (GRAPH_RUNTIMES): CUDA's here; the test
suite registers a CPU stand-in with a CUDA graph's semantics, so every graphed line runs in CI.
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres.run.adagrad import DeviceAdagrad
from fastres.study.protocol import OPTIMIZER_SETTINGS, WEIGHT_DECAY

# The autocast dtype of each --precision name (fastres.run.config.PRECISIONS); None: no autocast.
AMP_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}

# Param-group keys that say how an optimizer computes, not what: a loaded state keeps the
# loading optimizer's (a graph needs its fused/capturable implementation whatever saved it).
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


class Graph(Protocol):
    def replay(self) -> None: ...


class GraphRuntime(Protocol):
    """Streams and graph capture for one device type."""

    def stream(self, device: torch.device) -> object: ...

    def on_side(self, side: object, device: torch.device) -> contextlib.AbstractContextManager:
        """Run the block on `side`, ordered after and before the current stream's work."""

    def capture(self, fn: Callable[[], None], side: object, device: torch.device) -> Graph:
        """Record fn's device work as a graph (not run: the first replay runs it)."""


class CudaGraphs:
    """CUDA's streams and graphs."""

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        return torch.cuda.Stream(device)

    @contextlib.contextmanager
    def on_side(self, side: torch.cuda.Stream, device: torch.device) -> Iterator[None]:
        current = torch.cuda.current_stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            yield
        current.wait_stream(side)

    def capture(self, fn: Callable[[], None], side: torch.cuda.Stream,
                device: torch.device) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(device)
        side.wait_stream(current)
        # On the side stream the warm-ups used, so the lazily made autograd state belongs to
        # it; thread-local, so a loader thread may go on copying batches meanwhile.
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            fn()
        current.wait_stream(side)
        torch.cuda.synchronize(device)
        return graph


# Device type -> its graph runtime. Tests add "cpu" (tests/graph_standin.py).
GRAPH_RUNTIMES: dict[str, GraphRuntime] = {"cuda": CudaGraphs()}


def graphs_available(device: torch.device | str) -> bool:
    return torch.device(device).type in GRAPH_RUNTIMES


@contextlib.contextmanager
def planned_host_read(device: torch.device) -> Iterator[None]:
    """A host read that is meant to be there (the epoch's metrics): allowed even while
    torch.cuda.set_sync_debug_mode("error") checks that nothing else syncs."""
    if device.type != "cuda":
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


# torch.compile's backend for the trainer's models; tests use "eager" (dynamo alone, seconds).
COMPILE_BACKEND = "inductor"


def compile_model(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch.compile of this one model, once per input shape and mode, with no silent fall-back.

    dynamo keeps its compiled entries per code object, and stops compiling (one warning, then
    eager for good) past its recompile limit of 8. Compiling `model` itself would put every
    engine a grid worker ever builds on the one code object of ResNet.forward, so the limit
    would be reached after three structures. Here each model is called from a code object of
    its own, holding only its own shapes (train batch, last partial batch, test batch), freed
    with it. dynamic=False: one specialised graph per shape (the shapes are few and fixed);
    fullgraph=True: a graph break is an error at the first step, never a silent slow path."""
    def call(x: torch.Tensor) -> torch.Tensor:
        return model(x)

    own = types.FunctionType(call.__code__.replace(), call.__globals__, "compiled_model", None,
                             call.__closure__)
    return torch.compile(own, backend=COMPILE_BACKEND, dynamic=False, fullgraph=True)


def make_optimizer(name: str, params: Iterable[torch.Tensor], lr: float | None = None,
                   weight_decay: float = WEIGHT_DECAY, graphed: bool = False,
                   device: torch.device | None = None) -> torch.optim.Optimizer:
    """Table 2's optimizer with coupled weight decay. graphed=True (a CUDA device): the
    implementation that a CUDA graph can hold, with the rate in a device tensor; the update is
    the same algorithm (fused SGD, capturable Adam and Adadelta, DeviceAdagrad)."""
    cls_name, settings = OPTIMIZER_SETTINGS[name]
    kwargs = {**settings, "weight_decay": weight_decay}
    if lr is not None:
        kwargs["lr"] = lr
    if not graphed:
        return getattr(torch.optim, cls_name)(params, **kwargs)
    kwargs["lr"] = torch.tensor(float(kwargs["lr"]), device=device)
    if cls_name == "Adagrad":
        return DeviceAdagrad(params, **kwargs)
    if cls_name == "SGD":
        kwargs["fused"] = True  # takes a tensor rate without a host read
    else:
        kwargs.update(capturable=True, foreach=True)
    return getattr(torch.optim, cls_name)(params, **kwargs)


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state, whichever implementation saved it (eager, graphed, a run
    array's), into `opt` without changing how `opt` computes: torch's load_state_dict replaces
    every param-group key but `params`, which would turn a graphed optimizer back into one that
    reads the host inside a capture. A device-tensor rate stays the same tensor (captured graphs
    read it), filled with the saved rate; `step` counts sit where this implementation keeps
    them (on the parameter's device for fused, capturable and DeviceAdagrad; else the host)."""
    kept = [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in opt.param_groups]
    rates = [g["lr"] for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, impl, rate in zip(opt.param_groups, kept, rates, strict=True):
        group.update(impl)
        saved = float(group["lr"])  # one host read per resume
        if isinstance(rate, torch.Tensor):
            rate.fill_(saved)
            group["lr"] = rate
        else:
            group["lr"] = saved
        on_device = bool(group.get("fused") or group.get("capturable")
                         or getattr(opt, "device_steps", False))
        for p in group["params"]:
            st = opt.state.get(p, {})
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].to(p.device if on_device else "cpu", torch.float32)


def reset_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """A fresh run's optimizer state, written into the existing tensors (captured graphs hold
    them): zeros everywhere (every Table 2 optimizer treats zeroed state exactly as a fresh one),
    Adagrad's sums at their initial value."""
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    value.fill_(group.get("initial_accumulator_value", 0.0) if key == "sum"
                                else 0.0)


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

    def __init__(self, opt: torch.optim.Optimizer, tmax: int, lr: float | None = None):
        self.opt = opt
        self.rates = [g["lr"] for g in opt.param_groups if isinstance(g["lr"], torch.Tensor)]
        if self.rates:
            # The run's base rate as configured (the device tensor holds it rounded to fp32,
            # which would shift every epoch's cosine rate off the eager run's); read from the
            # device only when not given.
            base = float(self.rates[0].item()) if lr is None else float(lr)
            self.host = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
        else:
            self.host = opt
        self.scheduler = make_scheduler(self.host, tmax)
        if self.host is not opt:
            # The stand-in has no gradients, so this step changes nothing; it tells the
            # scheduler its optimizer steps (else every epoch warns it stepped first).
            self.host.step()

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


# Eager steps of each (mode, batch size) on the side stream before its capture.
WARM_STEPS = 3


class Steps:
    """Train steps and eval batches of one model and optimizer, with the epoch's metric sums on
    the device. graphs=True: each (mode, batch size) runs eagerly `warm` times on a side stream
    (real steps on real batches, where compilation, cuDNN autotuning and the optimizer's lazily
    made state happen), is then captured, and every later batch of that size replays it. The
    captured graphs stay valid for the life of the model and optimizer: a new run on them
    (reset_run) reuses them."""

    def __init__(self, model: nn.Module, step_model: Callable[[torch.Tensor], torch.Tensor],
                 opt: torch.optim.Optimizer,
                 device: torch.device, amp_dtype: torch.dtype | None,
                 scaler: torch.amp.GradScaler | None = None, graphs: bool = False,
                 warm: int | None = None, log: Callable[[str], None] = print):
        if graphs and not graphs_available(device):
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        if graphs and scaler is not None and scaler.is_enabled():
            raise ValueError("fp16 loss scaling reads the host every step: no CUDA graphs")
        self.model, self.step_model, self.opt, self.device = model, step_model, opt, device
        self.amp_dtype, self.scaler, self.graphs = amp_dtype, scaler, graphs
        self.warm, self.log = WARM_STEPS if warm is None else warm, log
        self.seen: dict[tuple[str, int], int] = {}
        self.captured: dict[tuple[str, int], tuple[Graph, tuple[torch.Tensor, ...]]] = {}
        shape = self.sums_shape(model)
        self.train_loss = torch.zeros(shape, device=device)
        self.test_loss = torch.zeros(shape, device=device)
        self.train_correct = torch.zeros(shape, device=device, dtype=torch.long)
        self.test_correct = torch.zeros(shape, device=device, dtype=torch.long)
        self.runtime = GRAPH_RUNTIMES[device.type] if graphs else None
        self.side = self.runtime.stream(device) if graphs else None
        self.capture_seconds = 0.0

    def autocast(self):
        # The autocast weight cache must be off under capture; off it changes nothing else.
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None, cache_enabled=not self.graphs)

    # -- the bodies: what one step computes, eager or captured

    def _train_body(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with self.autocast():
            logits = self.step_model(x)
            loss = F.cross_entropy(logits, y)
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.train_loss += loss.detach().float() * y.numel()
        self.train_correct += (logits.argmax(1) == y).sum()

    def _eval_body(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.no_grad(), self.autocast():
            logits = self.step_model(x)
            self.test_loss += F.cross_entropy(logits.float(), y, reduction="sum")
            self.test_correct += (logits.argmax(1) == y).sum()

    # -- the public steps

    def train(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step on the batch (the model in train mode)."""
        self._step("train", (x, y), self._train_body)

    def eval(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Loss and accuracy sums of one test batch (the model in eval mode)."""
        self._step("eval", (x, y), self._eval_body)

    def _clear_grads(self) -> None:
        # Set to None, not zeroed: backward then allocates them, under a capture in the
        # graph's own pool, and each replay rewrites them in place.
        self.opt.zero_grad(set_to_none=True)

    def _step(self, mode: str, inputs: tuple[torch.Tensor, ...], body) -> None:
        if not self.graphs:
            if mode == "train":
                self._clear_grads()
            body(*inputs)
            return
        key = (mode, inputs[-1].shape[0])  # the batch size (the last input is batch-first)
        if key in self.captured:
            graph, static = self.captured[key]
            for s, t in zip(static, inputs, strict=True):
                s.copy_(t)
            graph.replay()
            return
        if self.seen.get(key, 0) < self.warm:
            self.seen[key] = self.seen.get(key, 0) + 1
            with self.runtime.on_side(self.side, self.device):
                if mode == "train":
                    self._clear_grads()
                body(*inputs)
            return
        # Capture records without running; the replay right after computes this batch.
        t0 = time.perf_counter()
        static = tuple(t.clone() for t in inputs)
        if mode == "train":
            self._clear_grads()
        graph = self.runtime.capture(lambda: body(*static), self.side, self.device)
        self.captured[key] = (graph, static)
        self.capture_seconds += time.perf_counter() - t0
        graph.replay()

    def forget_graphs(self) -> None:
        """Drop the captured steps (the optimizer's state tensors were replaced)."""
        self.captured.clear()
        self.seen.clear()

    # -- the epoch's sums

    def reset_sums(self) -> None:
        for t in (self.train_loss, self.train_correct, self.test_loss, self.test_correct):
            t.zero_()

    def sums_shape(self, model: nn.Module) -> tuple[int, ...]:
        return ()  # one run: scalar sums

    def read_sums(self) -> list:
        """[train loss sum, train correct, test loss sum, test correct] (each of sums_shape),
        as floats: the epoch's one planned host read."""
        packed = torch.stack([self.train_loss.double(), self.train_correct.double(),
                              self.test_loss.double(), self.test_correct.double()])
        with planned_host_read(self.device):
            return packed.tolist()

    def sums(self) -> tuple[float, int, float, int]:
        """(train loss sum, train correct, test loss sum, test correct)."""
        values = self.read_sums()
        return values[0], int(values[1]), values[2], int(values[3])
