"""A stand-in for CUDA graphs on the CPU, so the graphed code paths run in CI.

It has a CUDA graph's semantics, not "call the function again":
- capture records every aten op the body dispatches (below autograd: forward, backward and the
  optimizer's update alike) with the very tensors it read and wrote. The ops run once while
  recording (their outputs are needed to go on), but every tensor that existed before the
  capture is put back as it was afterwards: like a real capture, it computes nothing that
  lasts, and the replay that follows it does the work;
- replay re-runs exactly those ops on exactly those tensors, writing each op's result into the
  tensor captured for it. Python values the body read (a float rate, a shape) stay as they were
  at capture; a tensor bound after capture (a new `.grad`, a replaced optimizer state, a new
  rate tensor) is never seen by a replay; state created inside the capture is created again by
  every replay (as a real graph re-runs its fill kernels);
- a host read inside capture is an error, as on a GPU: `.item()`, `bool(tensor)`, `.tolist()`,
  `.numpy()`, `.cpu()`, data-dependent shapes (`nonzero`, `masked_select`, ...): each of these
  would read or wait on the device there. (A tensor made from host data, `torch.tensor(1.0)`, is
  not refused: on the CPU it cannot be told from a host scalar, which torch's capturable Adam
  itself passes to its update; tests count those separately.)
Streams and synchronisation are no-ops on the CPU.

`installed()` registers it for the CPU in fastres.run.steps.GRAPH_RUNTIMES and lets torch's
capturable optimizers run on CPU tensors, until it exits: the suite's `standin_graphs` fixture
uses it for one test, benchmarks/arrays.py --host for its graphed rows on the CPU.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

# Ops whose result is a host value, or whose output shape depends on the data: on a GPU each
# waits for the device, which a capture refuses.
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
              aten.equal.default, aten.masked_select.default, aten._unique2.default,
              aten.unique_consecutive.default, aten.unique_dim.default,
              aten.repeat_interleave.Tensor, aten.bincount.default}


class HostReadInCapture(RuntimeError):
    """What cudaStreamIsCapturing errors become on the CPU."""


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _aliasing_returns(func: torch._ops.OpOverload) -> list[bool]:
    return [r.alias_info is not None for r in func._schema.returns]


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any]] = []
        self.made: set[int] = set()  # storages allocated inside the capture
        self.saved: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            raise HostReadInCapture(f"{func} inside a CUDA graph capture reads the device from "
                                    "the host")
        # Every tensor from before the capture that an op touches is kept as it was, to be put
        # back afterwards: not only those a schema marks as written (native_batch_norm writes
        # its running statistics unannounced).
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.numel():
                key = _storage_key(t)
                if key not in self.made and key not in self.saved:
                    storage = t.untyped_storage()
                    self.saved[key] = (storage, storage.clone())
        result = func(*args, **kwargs)
        aliasing = _aliasing_returns(func)
        returns = [result] if len(aliasing) == 1 else list(result or ())
        for value, alias in zip(returns, aliasing, strict=True):
            if alias:  # a view of (or the very) argument: not a new allocation
                continue
            for t in tree_flatten(value)[0]:
                if isinstance(t, torch.Tensor) and t.numel():
                    self.made.add(_storage_key(t))
        self.ops.append((func, args, kwargs, result))
        return result


class StandInGraph:
    """One captured body: replay() re-runs its ops on its tensors."""

    def __init__(self, ops: list[tuple[Any, tuple, dict, Any]]):
        self.ops = ops
        self.replays = 0

    def replay(self) -> None:
        with torch.no_grad(), torch._C._AutoDispatchBelowADInplaceOrView():
            for func, args, kwargs, captured in self.ops:
                result = func(*args, **kwargs)
                aliasing = _aliasing_returns(func)
                if not aliasing:  # returns nothing: it wrote into its arguments
                    continue
                if len(aliasing) == 1:
                    pairs = [(captured, result, aliasing[0])]
                else:
                    pairs = list(zip(captured, result, aliasing, strict=True))
                for old, new, alias in pairs:
                    # An in-place op or a view already wrote into (or is) the captured tensor;
                    # a fresh output is copied into the tensor the later ops were captured with.
                    for o, n in zip(tree_flatten(old)[0], tree_flatten(new)[0], strict=True):
                        if not alias and isinstance(o, torch.Tensor) and o is not n:
                            o.copy_(n)
        self.replays += 1


def _refuse(name: str) -> Callable:
    def refuse(*_args: object, **_kwargs: object):
        raise HostReadInCapture(f"Tensor.{name}() inside a CUDA graph capture copies the device "
                                "to the host")
    return refuse


@contextlib.contextmanager
def _host_reads_refused() -> Iterator[None]:
    """Tensor methods that read the host without dispatching an aten op on the CPU."""
    names = ("tolist", "numpy", "cpu", "__array__")
    kept = {n: getattr(torch.Tensor, n) for n in names}
    try:
        for n in names:
            setattr(torch.Tensor, n, _refuse(n))
        yield
    finally:
        for n, f in kept.items():
            setattr(torch.Tensor, n, f)


class StandInGraphs:
    """fastres.run.steps.GraphRuntime for the CPU."""

    def __init__(self) -> None:
        self.captures = 0

    def stream(self, device: torch.device) -> object:
        return None

    @contextlib.contextmanager
    def on_side(self, side: object, device: torch.device) -> Iterator[None]:
        yield

    def capture(self, fn: Callable[[], None], side: object, device: torch.device
                ) -> StandInGraph:
        recorder = _Recorder()
        try:
            with _host_reads_refused(), recorder:
                fn()
        finally:
            # Nothing a capture computed lasts: the tensors it found are as they were.
            for storage, before in recorder.saved.values():
                storage.copy_(before)
        self.captures += 1
        return StandInGraph(recorder.ops)


@contextlib.contextmanager
def installed() -> Iterator[StandInGraphs]:
    """graphs=True on the CPU runs through a fresh StandInGraphs while inside."""
    from fastres.run import steps

    runtime = StandInGraphs()
    modules = [importlib.import_module(m) for m in ("torch.optim.adam", "torch.optim.adadelta")]
    kept = [m._get_capturable_supported_devices for m in modules]
    before = steps.GRAPH_RUNTIMES.get("cpu")
    steps.GRAPH_RUNTIMES["cpu"] = runtime
    try:
        for module, supported in zip(modules, kept, strict=True):
            module._get_capturable_supported_devices = (
                lambda *a, _f=supported, **k: [*_f(*a, **k), "cpu"])
        yield runtime
    finally:
        for module, supported in zip(modules, kept, strict=True):
            module._get_capturable_supported_devices = supported
        if before is None:
            steps.GRAPH_RUNTIMES.pop("cpu", None)
        else:
            steps.GRAPH_RUNTIMES["cpu"] = before
