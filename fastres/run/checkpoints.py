"""Saving a run's state without stalling its training: checkpoint files (atomic, checked by
sha256), copies of the state in host memory taken at an epoch boundary, a time cadence, one
background writer thread, and the best epoch's weights kept on the device.

The training thread pays only for host_copy() at a save (and BestWeights.update() each epoch);
serialising, hashing and writing happen in the writer thread while the next epoch runs. At most
one write is in flight: an epoch boundary that finds the writer busy skips its save.

Imports torch (it serialises tensors), never fastres.run.train or FFCV.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from fastres.run.records import Checkpointer, ResultsError, refuse_in_ray_worker

# ---------------------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def to_bytes(state: Any) -> bytes:
    """The checkpoint encoding of `state` (torch.save, in memory)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()  # CPython hands over the buffer itself, no second copy


def from_bytes(blob: bytes) -> dict:
    """The state encoded by to_bytes(), on the CPU; weights_only, so a file cannot run code."""
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def save_checkpoint(path: Path, state: dict | bytes) -> str:
    """Write a state (or its to_bytes) atomically and durably; return the file's sha256.
    A failed write is an OSError (errno ENOSPC when the disk is full), never a half-written
    file: the temp file goes on any error, KeyboardInterrupt included, and an existing file at
    `path` stays as it was until the complete new one replaces it."""
    path = Path(path)
    refuse_in_ray_worker(path.parent)
    # Serialised in memory first: torch.save straight into a file turns the OSError of a full
    # disk into an opaque RuntimeError ("[enforce fail at inline_container.cc] unexpected pos").
    buf = memoryview(state if isinstance(state, (bytes, bytearray, memoryview))
                     else to_bytes(state))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Per process and thread: two writers of one path never share a temp file.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_native_id()}")
    try:
        with open(tmp, "wb") as f:
            f.write(buf)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return hashlib.sha256(buf).hexdigest()  # hashlib releases the GIL on large buffers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(path: Path, sha: str | None) -> dict:
    """The state in `path`, after checking it is the file the database recorded (ResultsError
    when missing, different or unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"checkpoint {path} is missing")
    # Read once, then hash and decode the same bytes: no window for the file to change between.
    blob = path.read_bytes()
    if sha is not None and hashlib.sha256(blob).hexdigest() != sha:
        raise ResultsError(f"checkpoint {path} does not match its recorded sha256")
    try:
        return from_bytes(blob)
    except Exception as e:  # unpickling errors come in many types
        raise ResultsError(f"checkpoint {path} cannot be read: {e}") from None


# ---------------------------------------------------------------------------- host copies

# Integer dtypes by element size: any dtype's bits copy as these, through numpy.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _cpu_copy_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) for CPU tensors on the calling thread alone, the GIL released. torch's
    copy_ splits large tensors over its intra-op threads, which sleep while an epoch runs on a
    GPU: waking them cost 10-300 ms per 20 MB of weights on a 2-vCPU VM, against 2 ms for the
    memcpy on one thread."""
    size = src.element_size()
    if (dst.dtype == src.dtype and size in _BITS and dst.shape == src.shape
            and dst.stride() == src.stride() and not src.is_conj() and not src.is_neg()):
        np.copyto(dst.view(_BITS[size]).numpy(), src.view(_BITS[size]).numpy())
    else:  # other layouts and dtypes (complex128): torch's own copy
        dst.copy_(src)


def _host_tensor(t: torch.Tensor, devices: set[torch.device]) -> torch.Tensor:
    t = t.detach()
    if t.device.type == "cpu":
        if t.layout != torch.strided:
            return t.clone()  # sparse and other rare kinds need no speed
        out = torch.empty_like(t)  # keeps the layout (channels-last stays channels-last)
        _cpu_copy_(out, t)
        return out
    if t.device.type != "cuda" or t.layout != torch.strided:
        return t.to("cpu")  # a copy, as the device differs; rare kinds need no speed
    fmt = (torch.channels_last if t.dim() == 4 and not t.is_contiguous()
           and t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
    # Pinned memory makes the copy truly asynchronous; the caching host allocator reuses the
    # blocks of the previous save, so this does not pay cudaHostAlloc every time.
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True, memory_format=fmt)
    out.copy_(t, non_blocking=True)
    devices.add(t.device)
    return out


def _host(obj: Any, devices: set[torch.device], memo: dict[int, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        # The same tensor twice (tied weights) stays one tensor in the copy.
        got = memo.get(id(obj))
        if got is None:
            got = memo[id(obj)] = _host_tensor(obj, devices)
        return got
    if isinstance(obj, dict):
        items = [(k, _host(v, devices, memo)) for k, v in obj.items()]
        if type(obj) is dict:
            return dict(items)
        # A state_dict is an OrderedDict carrying `_metadata` (module versions that
        # load_state_dict reads): copy.copy keeps the class and its attributes.
        new = copy.copy(obj)
        new.clear()
        new.update(items)
        return new
    if isinstance(obj, list):
        return [_host(v, devices, memo) for v in obj]
    if isinstance(obj, tuple):
        items = [_host(v, devices, memo) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj  # numbers, strings, None, ...: immutable or plain, kept as they are


def host_copy(obj: Any) -> Any:
    """A copy of a nested dict/list/tuple of tensors and plain values in which every tensor
    lives in host memory and shares no storage with the original, so training may change the
    originals at once. CUDA tensors go to pinned memory asynchronously, then one wait per
    device (not one per tensor) makes the copy complete on return."""
    devices: set[torch.device] = set()
    out = _host(obj, devices, {})
    for d in devices:
        # The copies were queued on each device's current stream, behind the work that
        # produced the values: waiting for that stream is enough.
        torch.cuda.current_stream(d).synchronize()
    return out


# ---------------------------------------------------------------------------- cadence


class Cadence:
    """Due every `every_s` seconds since the last mark() (or construction); every_s == 0 is
    always due (a save every epoch)."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic):
        if not every_s >= 0:
            raise ValueError(f"every_s must be 0 or a positive number of seconds, got {every_s}")
        self.every_s = float(every_s)
        self._clock = clock
        self._last = clock()

    def due(self) -> bool:
        return self.every_s == 0 or self._clock() - self._last >= self.every_s

    def mark(self) -> None:
        self._last = self._clock()


# ---------------------------------------------------------------------------- writer


def _close_after(close: Callable[[], None], exc: BaseException | None) -> None:
    """close() on leaving a block: its error raised if the block ended cleanly, else attached
    to the block's exception as a note (which goes on)."""
    if exc is None:
        close()
        return
    try:
        close()
    except BaseException as e:
        exc.add_note(f"the checkpoint writer also failed: {type(e).__name__}: {e}")


class BackgroundWriter:
    """One daemon thread running one job at a time. submit() never blocks: it starts the job
    or, with one still in flight, returns False and the caller skips that save. A job's
    exception is raised again in the caller by the next submit(), check(), wait() or close():
    a full disk stops the run instead of vanishing in the thread."""

    def __init__(self, name: str = "fastres-checkpoint-writer"):
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._job: Callable[[], object] | None = None
        self._busy = False
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                # Condition.wait releases the GIL: an idle writer costs the trainer nothing.
                while self._job is None and not self._closed:
                    self._cond.wait()
                if self._job is None:  # closed and idle
                    return
                job, self._job = self._job, None
            try:
                job()
            except BaseException as e:  # all of it goes back to the caller
                error: BaseException | None = e
            else:
                error = None
            del job  # frees the job's host copies before the next one is taken
            with self._cond:
                if error is not None and self._error is None:
                    self._error = error
                self._busy = False
                self._cond.notify_all()

    def _raise_pending(self) -> None:
        # Under the lock. Raised once: the caller decides what happens next.
        error, self._error = self._error, None
        if error is not None:
            raise error

    @property
    def busy(self) -> bool:
        return self._busy

    def submit(self, fn: Callable[[], object]) -> bool:
        """Start fn in the thread and return True, or return False at once if a job is still
        in flight. Raises a previous job's exception first."""
        with self._cond:
            self._raise_pending()
            if self._closed:
                raise RuntimeError("BackgroundWriter is closed")
            if self._busy:
                return False
            self._job, self._busy = fn, True
            self._cond.notify_all()
            return True

    def check(self) -> None:
        """Raise a finished job's exception, if any; never waits."""
        with self._cond:
            self._raise_pending()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no job is in flight (True) or `timeout` seconds pass (False); raise a
        job's exception."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            self._raise_pending()
            return not self._busy

    def close(self) -> None:
        """Wait for the job in flight, stop the thread, raise a job's exception. Idempotent."""
        try:
            self.wait()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            if self._thread is not threading.current_thread():
                self._thread.join()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        _close_after(self.close, exc)


# ---------------------------------------------------------------------------- best weights


class BestWeights:
    """The best epoch's model weights, kept in buffers allocated once on the weights' own
    device: update() is a device copy (no host sync on CUDA), and a save host_copy()s
    state() like the rest of the state."""

    def __init__(self) -> None:
        self.epoch: int | None = None
        self._buffers: dict[str, Any] | None = None
        self._keys: list[str] = []

    def update(self, epoch: int, state_dict: Mapping[str, Any]) -> None:
        """Keep a copy of `state_dict` (the model's, at the end of `epoch`)."""
        if self._buffers is None:
            self._buffers = copy.copy(state_dict) if isinstance(state_dict, dict) \
                else dict(state_dict)  # an OrderedDict keeps its _metadata
            self._keys = [k for k, v in state_dict.items() if isinstance(v, torch.Tensor)]
            for k in self._keys:
                self._buffers[k] = torch.empty_like(state_dict[k].detach())
        elif list(state_dict.keys()) != list(self._buffers.keys()):
            raise ValueError("BestWeights.update: the state_dict's keys changed since the first "
                             "update")
        bufs, srcs = [], []
        for k in self._keys:
            buf, src = self._buffers[k], state_dict[k].detach()
            if buf.device.type == "cpu" and buf.layout == torch.strided:
                _cpu_copy_(buf, src)
            else:
                bufs.append(buf)
                srcs.append(src)
        if bufs:
            # One batched dispatch (grouped by device and dtype inside): no host sync.
            torch._foreach_copy_(bufs, srcs)
        for k, v in state_dict.items():
            if not isinstance(v, torch.Tensor):
                self._buffers[k] = v
        self.epoch = epoch

    def state(self) -> dict:
        """The buffers themselves (live: host_copy() them before training goes on)."""
        if self._buffers is None:
            raise ValueError("BestWeights.state: no update yet")
        return self._buffers


# ---------------------------------------------------------------------------- the trainer's side


class StateSaver:
    """The training thread's side of checkpointing one run: at an epoch boundary, when the
    cadence is due and the writer idle, copy the state (and best weights) to host memory and
    hand their encoding and writing to the writer thread; at the end (or on SIGTERM) save and
    wait. The checkpointer sees saves one at a time, epochs increasing.

    thread_seconds: training-thread seconds spent here; saves: saves started; skipped: epoch
    boundaries that were due but found a write still in flight; write_seconds: writer-thread
    seconds of the finished saves (encoding and checkpointer.save)."""

    def __init__(self, checkpointer: Checkpointer, every_s: float,
                 writer: BackgroundWriter | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.checkpointer = checkpointer
        self.cadence = Cadence(every_s, clock)
        self._own_writer = writer is None
        self.writer = writer if writer is not None else BackgroundWriter()
        self.thread_seconds = 0.0
        self.saves = 0
        self.skipped = 0
        self.write_seconds = 0.0
        # Set by the writer thread once a save has succeeded; read only while it is idle.
        self.saved_epoch: int | None = None
        self._best_saved: int | None = None

    def _start(self, epoch: int, state_fn: Callable[[], dict], best: BestWeights | None) -> bool:
        best_epoch = best.epoch if best is not None else None
        with_best = best_epoch is not None and best_epoch != self._best_saved
        # One host_copy for both: one device wait, not two.
        state, best_state = host_copy((state_fn(), best.state() if with_best else None))
        self.cadence.mark()

        def job() -> None:
            t0 = time.perf_counter()
            blob = to_bytes(state)
            best_blob = to_bytes(best_state) if best_state is not None else None
            self.checkpointer.save(epoch, blob, best_blob)
            self.write_seconds += time.perf_counter() - t0
            self.saved_epoch = epoch
            if best_blob is not None:
                self._best_saved = best_epoch

        if not self.writer.submit(job):  # only if someone else shares the writer
            return False
        self.saves += 1
        return True

    def epoch_end(self, epoch: int, state_fn: Callable[[], dict],
                  best: BestWeights | None = None) -> bool:
        """After `epoch`: start a save of state_fn()'s state if the cadence is due and no write
        is in flight; return whether one started. Raises a failed write's exception."""
        t0 = time.perf_counter()
        try:
            self.writer.check()
            if not self.cadence.due():
                return False
            if self.writer.busy:
                self.skipped += 1
                return False
            return self._start(epoch, state_fn, best)
        finally:
            self.thread_seconds += time.perf_counter() - t0

    def final(self, epoch: int, state_fn: Callable[[], dict],
              best: BestWeights | None = None) -> bool:
        """Wait for any write in flight, then save this state and wait for it (the end of a
        run, SIGTERM). Returns False when there was nothing new to write: this epoch's state
        and the best weights were saved already."""
        t0 = time.perf_counter()
        try:
            self.writer.wait()
            best_epoch = best.epoch if best is not None else None
            if self.saved_epoch == epoch and best_epoch in (None, self._best_saved):
                return False
            if not self._start(epoch, state_fn, best):
                raise RuntimeError("StateSaver.final: the writer is busy with another job")
            self.writer.wait()
            return True
        finally:
            self.thread_seconds += time.perf_counter() - t0

    def close(self) -> None:
        """Wait for the write in flight (raising its error); stop the writer if it is ours."""
        if self._own_writer:
            self.writer.close()
        else:
            self.writer.wait()

    def __enter__(self) -> StateSaver:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        _close_after(self.close, exc)
