"""fastres.run.checkpoints: atomic files, host copies, the cadence, the background writer, the best
weights and the trainer-side StateSaver. CPU only, no training."""

from __future__ import annotations

import errno
import hashlib
import sys
import threading
from collections import OrderedDict

import pytest
import torch
from torch import nn

from fastres.run.checkpoints import (
    BackgroundWriter,
    BestWeights,
    Cadence,
    StateSaver,
    from_bytes,
    host_copy,
    load_checkpoint,
    save_checkpoint,
    to_bytes,
)
from fastres.run.results import ResultsError

TIMEOUT = 10  # seconds: only ever reached when something is broken


class FakeCheckpointer:
    """Records every save (decoded), how many ran at once, and can hold a save on an Event."""

    def __init__(self, gate: threading.Event | None = None, fail: BaseException | None = None):
        self.gate, self.fail = gate, fail
        self.calls: list[tuple[int, dict, dict | None]] = []
        self.threads: set[str] = set()
        self.started = threading.Event()
        self._lock = threading.Lock()
        self.active = self.max_active = 0

    def load(self):
        return None

    def record(self, metrics) -> None:
        pass

    def save(self, epoch: int, state: bytes, best: bytes | None) -> None:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.threads.add(threading.current_thread().name)
            self.started.set()
            if self.gate is not None:
                assert self.gate.wait(TIMEOUT)
            if self.fail is not None:
                raise self.fail
            assert isinstance(state, bytes) and (best is None or isinstance(best, bytes))
            self.calls.append((epoch, from_bytes(state), None if best is None else
                               from_bytes(best)))
        finally:
            with self._lock:
                self.active -= 1

    @property
    def epochs(self) -> list[int]:
        return [c[0] for c in self.calls]


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2))


def make_state(model: nn.Module, epoch: int) -> dict:
    return {"epoch": epoch, "model": model.state_dict(), "rng": torch.get_rng_state()}


def bump(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)


# ---------------------------------------------------------------------------- host_copy


def test_host_copy_equal_values_independent_storage():
    a = torch.arange(6.0).reshape(2, 3)
    tied = torch.ones(3)
    meta = OrderedDict(w=torch.full((2,), 7.0))
    meta._metadata = {"": {"version": 1}}
    obj = {"a": a, "list": [torch.zeros(2, dtype=torch.int64), 3, "x", None],
           "tuple": (a[1], 2.5), "nested": {"tied1": tied, "tied2": tied},
           "sd": meta, "param": nn.Parameter(torch.ones(2)),
           "cl": torch.randn(1, 3, 4, 4).to(memory_format=torch.channels_last)}
    before = {"a": a.clone(), "row": a[1].clone(), "tied": tied.clone(), "w": meta["w"].clone()}

    out = host_copy(obj)

    assert torch.equal(out["a"], a) and torch.equal(out["tuple"][0], a[1])
    assert out["list"][1:] == [3, "x", None] and out["tuple"][1] == 2.5
    assert isinstance(out["tuple"], tuple) and isinstance(out["list"], list)
    assert type(out["sd"]) is OrderedDict and out["sd"]._metadata == meta._metadata
    assert out["nested"]["tied1"] is out["nested"]["tied2"]  # one tensor stays one
    assert not out["param"].requires_grad and not isinstance(out["param"], nn.Parameter)
    assert out["cl"].is_contiguous(memory_format=torch.channels_last)
    originals = [a, obj["list"][0], tied, meta["w"], obj["param"], obj["cl"]]
    copies = [out["a"], out["list"][0], out["nested"]["tied1"], out["sd"]["w"], out["param"],
              out["cl"], out["tuple"][0]]
    ptrs = {t.untyped_storage().data_ptr() for t in originals}
    assert not ptrs & {t.untyped_storage().data_ptr() for t in copies}

    with torch.no_grad():  # training goes on: the copy must not see it
        for t in originals:
            t.add_(100)
    assert torch.equal(out["a"], before["a"]) and torch.equal(out["tuple"][0], before["row"])
    assert torch.equal(out["nested"]["tied1"], before["tied"])
    assert torch.equal(out["sd"]["w"], before["w"])
    assert torch.equal(out["list"][0], torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("make", [
    lambda: torch.randn(3, 4).to(torch.bfloat16),
    lambda: torch.randn(5, dtype=torch.float64),
    lambda: torch.tensor([True, False]),
    lambda: torch.arange(6, dtype=torch.int8),
    lambda: torch.randn(4, dtype=torch.complex128),
    lambda: torch.tensor(3.0),
    lambda: torch.randn(8)[::2],  # a strided view: copied compact
    lambda: torch.randn(3, 4).t(),
    lambda: torch.randn(3, 3).to_sparse(),
], ids=["bf16", "f64", "bool", "int8", "complex128", "0-d", "step-view", "transposed",
        "sparse"])
def test_host_copy_of_every_kind_of_tensor(make):
    t = make()
    out = host_copy([t])[0]
    dense = (lambda x: x.to_dense()) if t.layout != torch.strided else (lambda x: x)
    expect = dense(t).clone()
    assert out.dtype == t.dtype and out.shape == t.shape and torch.equal(dense(out), expect)
    with torch.no_grad():
        if t.layout == torch.strided:
            t.copy_(torch.zeros_like(t) if t.dtype != torch.bool else ~t)
        else:
            t._values().zero_()
    assert torch.equal(dense(out), expect)


def test_host_copy_of_a_state_loads_back():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    state = host_copy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    restored = from_bytes(to_bytes(state))
    other = tiny_model()
    other.load_state_dict(restored["model"])
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v)
    opt2 = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(restored["optimizer"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_copy_of_cuda_tensors_is_pinned_and_independent():
    x = torch.randn(1000, 1000, device="cuda")
    cl = torch.randn(8, 16, 3, 3, device="cuda").to(memory_format=torch.channels_last)
    out = host_copy({"x": x, "cl": cl, "n": 3})
    assert out["x"].device.type == "cpu" and out["x"].is_pinned()
    assert out["cl"].is_contiguous(memory_format=torch.channels_last)
    expect = x.cpu()
    x.add_(1)
    torch.cuda.synchronize()
    assert torch.equal(out["x"], expect) and torch.equal(out["cl"], cl.cpu())


# ---------------------------------------------------------------------------- Cadence


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_cadence_zero_is_always_due():
    clock = FakeClock()
    c = Cadence(0, clock)
    for _ in range(3):
        assert c.due()
        c.mark()


def test_cadence_every_60_seconds():
    clock = FakeClock()
    c = Cadence(60, clock)
    assert not c.due()  # counted from construction
    clock.t += 59.9
    assert not c.due()
    clock.t += 0.1
    assert c.due()
    clock.t += 5
    c.mark()
    assert not c.due()
    clock.t += 59
    assert not c.due()
    clock.t += 1
    assert c.due()


@pytest.mark.parametrize("bad", [-1, float("nan")])
def test_cadence_refuses_a_bad_period(bad):
    with pytest.raises(ValueError):
        Cadence(bad)


# ---------------------------------------------------------------------------- BackgroundWriter


def test_writer_one_job_in_flight():
    gate, ran = threading.Event(), []
    with BackgroundWriter() as w:
        assert not w.busy
        assert w.submit(lambda: (gate.wait(TIMEOUT), ran.append(1)))
        assert w.busy
        assert not w.submit(lambda: ran.append(2))  # returns at once: the caller skips
        assert not w.wait(timeout=0.01)  # still in flight
        gate.set()
        assert w.wait()
        assert not w.busy and ran == [1]
        assert w.submit(lambda: ran.append(3))
        w.wait()
    assert ran == [1, 3]
    assert not w._thread.is_alive()


def test_writer_runs_jobs_in_its_own_thread():
    names: list[str] = []
    with BackgroundWriter(name="ckpt-writer") as w:
        w.submit(lambda: names.append(threading.current_thread().name))
    assert names == ["ckpt-writer"]


def test_writer_error_comes_back_on_submit_then_clears():
    full = OSError(errno.ENOSPC, "No space left on device")

    def fail():
        raise full

    w = BackgroundWriter()
    try:
        assert w.submit(fail)
        while w.busy:  # not wait(): that would raise it
            w._thread.join(0.001)
        with pytest.raises(OSError) as e:
            w.submit(lambda: None)
        assert e.value is full and e.value.errno == errno.ENOSPC
        assert w.submit(lambda: None)  # raised once; the writer still works
        w.wait()
    finally:
        w.close()


def test_writer_error_comes_back_on_wait_and_close():
    w = BackgroundWriter()
    w.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        w.wait()
    w.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        w.close()
    assert not w._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        w.submit(lambda: None)
    w.close()  # idempotent


def test_writer_close_waits_for_the_job_in_flight():
    gate, done = threading.Event(), []
    w = BackgroundWriter()
    w.submit(lambda: (gate.wait(TIMEOUT), done.append(True)))
    threading.Timer(0.05, gate.set).start()
    w.close()
    assert done == [True]


def test_writer_error_in_a_with_block_keeps_the_body_error():
    with pytest.raises(KeyError) as e:
        with BackgroundWriter() as w:
            w.submit(lambda: 1 / 0)
            raise KeyError("body")
    if sys.version_info >= (3, 11):  # add_note arrived with 3.11
        assert any("ZeroDivisionError" in n for n in e.value.__notes__)


# ---------------------------------------------------------------------------- files


def test_save_and_load_checkpoint_round_trip(tmp_path):
    state = {"epoch": 3, "w": torch.arange(4.0)}
    path = tmp_path / "run" / "epoch-0003.pt"
    sha = save_checkpoint(path, state)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    got = load_checkpoint(path, sha)
    assert got["epoch"] == 3 and torch.equal(got["w"], state["w"])
    blob = to_bytes(state)
    assert save_checkpoint(tmp_path / "b.pt", blob) == hashlib.sha256(blob).hexdigest()
    assert list(tmp_path.glob(".*")) == [] and list(path.parent.glob(".*")) == []


def test_load_checkpoint_refuses_a_wrong_sha_a_missing_and_a_corrupt_file(tmp_path):
    path = tmp_path / "c.pt"
    sha = save_checkpoint(path, {"epoch": 1})
    with pytest.raises(ResultsError, match="sha256"):
        load_checkpoint(path, "0" * 64)
    with pytest.raises(ResultsError, match="missing"):
        load_checkpoint(tmp_path / "nope.pt", sha)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ResultsError, match="cannot be read"):
        load_checkpoint(path, None)


class _HalfWriter:
    """A file whose write stores half the data, then fails as a full disk would."""

    def __init__(self, f, exc: BaseException):
        self.f, self.exc = f, exc

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()

    def write(self, data):
        self.f.write(bytes(data[: len(data) // 2]))
        self.f.flush()
        raise self.exc

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 KeyboardInterrupt()], ids=["disk-full", "interrupt"])
def test_save_checkpoint_failing_mid_write_leaves_nothing_half_written(tmp_path, monkeypatch,
                                                                        exc):
    import fastres.run.checkpoints as ck

    path = tmp_path / "epoch.pt"
    sha = save_checkpoint(path, {"epoch": 1, "w": torch.ones(1000)})
    monkeypatch.setattr(ck, "open", lambda p, mode: _HalfWriter(open(p, mode), exc),
                        raising=False)
    with pytest.raises(type(exc)):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(1000)})
    with pytest.raises(type(exc)):
        save_checkpoint(tmp_path / "new.pt", {"epoch": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch.pt"]  # no temp, no new.pt
    assert load_checkpoint(path, sha)["epoch"] == 1  # the old one intact


def test_save_checkpoint_failing_fsync_keeps_the_old_file(tmp_path, monkeypatch):
    import fastres.run.checkpoints as ck

    path = tmp_path / "epoch.pt"
    sha = save_checkpoint(path, {"epoch": 1})

    def no_fsync(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(ck.os, "fsync", no_fsync)
    with pytest.raises(OSError):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["epoch.pt"]
    assert load_checkpoint(path, sha)["epoch"] == 1


# ---------------------------------------------------------------------------- BestWeights


def test_best_weights_of_mixed_dtypes_and_layouts():
    sd = {"bf16": torch.randn(4, 4).to(torch.bfloat16), "steps": torch.tensor(7),
          "cl": torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)}
    best = BestWeights()
    best.update(1, sd)
    expect = {k: v.clone() for k, v in sd.items()}
    for v in sd.values():
        v.add_(1)
    for k, v in best.state().items():
        assert torch.equal(v, expect[k]) and v.stride() == sd[k].stride()


def test_best_weights_keep_the_epoch_they_were_updated_at():
    model = tiny_model()
    best = BestWeights()
    assert best.epoch is None
    with pytest.raises(ValueError):
        best.state()
    best.update(1, model.state_dict())
    at_1 = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in best.state().items()}
    bump(model)  # later epochs, not better
    bump(model)
    assert best.epoch == 1
    for k, v in best.state().items():
        assert torch.equal(v, at_1[k])
    assert hasattr(best.state(), "_metadata")  # loads like a state_dict
    best.update(3, model.state_dict())
    assert best.epoch == 3
    for k, v in best.state().items():
        assert torch.equal(v, model.state_dict()[k])
        assert v.data_ptr() == ptrs[k]  # buffers allocated once
    other = tiny_model()
    other.load_state_dict(best.state())
    with pytest.raises(ValueError, match="keys"):
        best.update(4, {"other": torch.zeros(1)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_best_weights_on_cuda_stay_on_the_device():
    w = torch.randn(100, device="cuda")
    best = BestWeights()
    best.update(1, {"w": w})
    w.add_(1)
    assert best.state()["w"].device == w.device
    assert torch.equal(best.state()["w"] + 1, w)


# ---------------------------------------------------------------------------- StateSaver


def test_saver_every_epoch_saves_once_the_previous_write_finished():
    model, ck = tiny_model(), FakeCheckpointer()
    with StateSaver(ck, every_s=0) as saver:
        for epoch in range(1, 6):
            assert saver.epoch_end(epoch, lambda e=epoch: make_state(model, e))
            saver.writer.wait()
    assert ck.epochs == [1, 2, 3, 4, 5]
    assert [c[1]["epoch"] for c in ck.calls] == [1, 2, 3, 4, 5]
    assert saver.saves == 5 and saver.thread_seconds > 0
    assert ck.threads == {saver.writer._thread.name}


def test_saver_skips_a_boundary_while_a_write_is_in_flight():
    gate = threading.Event()
    model, ck = tiny_model(), FakeCheckpointer(gate)
    built: list[int] = []

    def state_fn(epoch):
        built.append(epoch)
        return make_state(model, epoch)

    with StateSaver(ck, every_s=0) as saver:
        assert saver.epoch_end(1, lambda: state_fn(1))
        assert not saver.epoch_end(2, lambda: state_fn(2))  # no copy, no wait
        gate.set()
        saver.writer.wait()
        assert saver.epoch_end(3, lambda: state_fn(3))
    assert built == [1, 3] and ck.epochs == [1, 3] and saver.skipped == 1


def test_saver_with_a_long_cadence_saves_only_at_final():
    model, ck = tiny_model(), FakeCheckpointer()
    built: list[int] = []
    with StateSaver(ck, every_s=1e9) as saver:
        for epoch in range(1, 11):
            assert not saver.epoch_end(epoch, lambda: built.append(1))
        assert saver.final(10, lambda: make_state(model, 10))
    assert built == [] and ck.epochs == [10] and saver.saves == 1


def test_saver_follows_the_clock():
    clock, ck, model = FakeClock(), FakeCheckpointer(), tiny_model()
    with StateSaver(ck, every_s=60, clock=clock) as saver:
        saved = []
        for epoch in range(1, 8):
            clock.t += 20
            saved.append(saver.epoch_end(epoch, lambda e=epoch: make_state(model, e)))
            saver.writer.wait()
    assert saved == [False, False, True, False, False, True, False]
    assert ck.epochs == [3, 6]


def test_saver_saves_the_state_of_the_boundary_not_later_changes():
    gate = threading.Event()
    model, ck = tiny_model(), FakeCheckpointer(gate)
    with StateSaver(ck, every_s=0) as saver:
        saver.epoch_end(1, lambda: make_state(model, 1))
        expect = {k: v.clone() for k, v in model.state_dict().items()}
        bump(model)  # the next epoch trains while the write waits
        gate.set()
    for k, v in ck.calls[0][1]["model"].items():
        assert torch.equal(v, expect[k])


def test_final_waits_for_the_write_in_flight_then_writes_its_own():
    gate = threading.Event()
    model, ck = tiny_model(), FakeCheckpointer(gate)
    with StateSaver(ck, every_s=0) as saver:
        assert saver.epoch_end(3, lambda: make_state(model, 3))
        assert ck.started.wait(TIMEOUT)
        bump(model)
        expect = {k: v.clone() for k, v in model.state_dict().items()}
        threading.Timer(0.05, gate.set).start()
        assert saver.final(5, lambda: make_state(model, 5))
        assert not saver.writer.busy  # final returns once its own write is done
    assert ck.epochs == [3, 5] and ck.max_active == 1
    for k, v in ck.calls[1][1]["model"].items():
        assert torch.equal(v, expect[k])


def test_final_does_not_write_an_epoch_twice():
    model, ck = tiny_model(), FakeCheckpointer()
    best = BestWeights()
    with StateSaver(ck, every_s=0) as saver:
        best.update(4, model.state_dict())
        saver.epoch_end(4, lambda: make_state(model, 4), best)
        assert not saver.final(4, lambda: make_state(model, 4), best)
        best.update(4, model.state_dict())  # unchanged epoch: still nothing new
        assert not saver.final(4, lambda: make_state(model, 4), best)
    assert ck.epochs == [4]


def test_saver_writes_best_weights_only_when_they_changed():
    model, ck = tiny_model(), FakeCheckpointer()
    best = BestWeights()
    with StateSaver(ck, every_s=0) as saver:
        saver.epoch_end(1, lambda: make_state(model, 1), best)  # no best yet
        saver.writer.wait()
        best.update(2, model.state_dict())
        at_2 = {k: v.clone() for k, v in model.state_dict().items()}
        saver.epoch_end(2, lambda: make_state(model, 2), best)
        saver.writer.wait()
        bump(model)
        saver.epoch_end(3, lambda: make_state(model, 3), best)  # best still epoch 2
        saver.writer.wait()
        best.update(4, model.state_dict())
        saver.final(4, lambda: make_state(model, 4), best)
    assert ck.epochs == [1, 2, 3, 4]
    assert [c[2] is None for c in ck.calls] == [True, False, True, False]
    for k, v in ck.calls[1][2].items():
        assert torch.equal(v, at_2[k])
    for k, v in ck.calls[3][2].items():
        assert torch.equal(v, model.state_dict()[k])


def test_saver_raises_a_failed_write_in_the_training_thread():
    full = OSError(errno.ENOSPC, "No space left on device")
    model, ck = tiny_model(), FakeCheckpointer(fail=full)
    saver = StateSaver(ck, every_s=0)
    try:
        assert saver.epoch_end(1, lambda: make_state(model, 1))
        while saver.writer.busy:
            saver.writer._thread.join(0.001)
        with pytest.raises(OSError) as e:
            saver.epoch_end(2, lambda: make_state(model, 2))
        assert e.value is full
        ck.fail = full
        saver.epoch_end(3, lambda: make_state(model, 3))
        with pytest.raises(OSError):
            saver.final(3, lambda: make_state(model, 3))
    finally:
        ck.fail = None
        saver.close()


def test_saver_with_a_shared_writer_leaves_it_running():
    ck, model = FakeCheckpointer(), tiny_model()
    with BackgroundWriter() as w:
        saver = StateSaver(ck, every_s=0, writer=w)
        saver.epoch_end(1, lambda: make_state(model, 1))
        saver.close()
        assert ck.epochs == [1] and w._thread.is_alive()
