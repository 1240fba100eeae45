"""Graphed steps against eager ones, on the CPU through the CUDA-graph stand-in
(tests/graph_standin.py) and, where a GPU is present, on real CUDA graphs (the device check runs
those: `-k cuda`).

First the stand-in is shown to catch what a GPU would: each planted bug below fails under it,
and the same code without the bug passes. Then the product's graphed paths: all five Table 2
optimizers over several epochs of two batch sizes (the protocol's 128 + 80 shape, small), a rate
that changes every epoch, evaluation graphs in eval mode.

Tolerance: fp32 throughout. The graphed and eager updates are the same algorithm in different
implementations (fused SGD, capturable foreach Adam and Adadelta computing their bias
corrections on the device in fp32, against torch's single-tensor loops with host float64
scalars), which round differently in the last bits of a step. Over the 16 steps here the
weights stay within 1e-4 of each tensor's scale (measured worst: Adam, 9e-6), and the loss
sums within 1e-4 relative. A wrong capture (a stale rate, a stale gradient, state re-made each
replay, a missed update) moves weights by the size of an update, lr * grad: 1e-2 of their scale
and more. Correct counts may differ by one image per epoch where round-off flips a near tie.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastres.kernels import build
from fastres.run.steps import Schedule, Steps, make_optimizer
from fastres.study.protocol import OPTIMIZER_SETTINGS, PAPER_OPTIMIZERS
from fastres.study.structures import ResNetSpec

from .conftest import scaled_error, stable_seed
from .graph_standin import HostReadInCapture, StandInGraphs

SPEC = ResNetSpec.parse("N=2 B=1,1 C_in=4 F0=3 P0=1 F1=3 P1=1 K=1")
REL = 1e-4
OPTIMIZER_RATES = {name: settings["lr"] for name, (_cls, settings) in OPTIMIZER_SETTINGS.items()}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES, ids=lambda d: "standin" if d == "cpu" else "cuda")
def device(request) -> torch.device:
    if request.param == "cpu":
        request.getfixturevalue("standin_graphs")
    return torch.device(request.param)


def batches(device: torch.device, tag: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two full batches and a partial last one (the protocol's 128, 128, ..., 80, smaller)."""
    g = torch.Generator().manual_seed(stable_seed("graphs", tag))
    return [(torch.randn(b, 3, 8, 8, generator=g).to(device),
             torch.randint(0, 10, (b,), generator=g).to(device)) for b in (6, 6, 3)]


def trained(optimizer: str, graphs: bool, device: torch.device, data, epochs: int = 4,
            warm: int = 1, plant=None) -> tuple[dict[str, torch.Tensor], list[tuple]]:
    """Weights and per-epoch (train loss, correct, test loss, correct) after `epochs` epochs of
    `data`, each followed by evaluation of its first two batches in eval mode. `plant(model,
    opt, steps)` may plant a bug before the first step."""
    torch.manual_seed(0)
    model = build(SPEC, device=device).to(device)
    opt = make_optimizer(optimizer, model.parameters(), graphed=graphs, device=device)
    steps = Steps(model, model, opt, device, None, graphs=graphs, warm=warm)
    # A different rate every epoch: the graph must follow it.
    schedule = Schedule(opt, tmax=3, lr=OPTIMIZER_RATES[optimizer])
    if plant is not None:
        plant(model, opt, steps)
    sums = []
    for _epoch in range(epochs):
        steps.reset_sums()
        model.train()
        for x, y in data:
            steps.train(x, y)
        schedule.step()
        model.eval()
        for x, y in data[:2]:
            steps.eval(x, y)
        sums.append(steps.sums())
    weights = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    return weights, sums


def worst_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(scaled_error(b[k], v, floor=1e-6) for k, v in a.items()
               if v.dtype.is_floating_point)


def assert_same_run(graphed, eager, what: str) -> None:
    (gw, gs), (ew, es) = graphed, eager
    assert worst_error(ew, gw) < REL, f"{what}: weights {worst_error(ew, gw):.2e}"
    for epoch, (g, e) in enumerate(zip(gs, es, strict=True), 1):
        for i in (0, 2):
            assert abs(g[i] - e[i]) <= REL * abs(e[i]), f"{what} epoch {epoch}: {g} vs {e}"
        for i in (1, 3):
            assert abs(g[i] - e[i]) <= 1, f"{what} epoch {epoch}: {g} vs {e}"
    for k, v in ew.items():
        if not v.dtype.is_floating_point:  # num_batches_tracked: every step counted once
            assert torch.equal(gw[k], v), k


# -- the stand-in catches what a GPU would


def test_a_capture_computes_nothing_and_each_replay_runs_the_body_once():
    runtime = StandInGraphs()
    w, step = torch.zeros(3), torch.ones(3)

    def body():
        w.add_(step * 2)

    graph = runtime.capture(body, None, torch.device("cpu"))
    assert torch.equal(w, torch.zeros(3))  # as a CUDA capture: recorded, not run
    graph.replay()
    graph.replay()
    assert torch.equal(w, torch.full((3,), 4.0))
    step.fill_(5)  # a captured input, written in place: the replay reads it
    graph.replay()
    assert torch.equal(w, torch.full((3,), 14.0))


@pytest.mark.parametrize("read", ["item", "bool", "tolist", "cpu", "numpy", "nonzero"])
def test_planted_host_read_inside_capture_is_refused(read):
    runtime = StandInGraphs()
    t = torch.ones(2)
    reads = {"item": lambda: t.sum().item(), "bool": lambda: bool(t[0] > 0),
             "tolist": lambda: t.tolist(), "cpu": lambda: t.cpu(), "numpy": lambda: t.numpy(),
             "nonzero": lambda: t.nonzero()}
    with pytest.raises(HostReadInCapture):
        runtime.capture(reads[read], None, torch.device("cpu"))
    runtime.capture(lambda: t.mul(2), None, torch.device("cpu"))  # no read: captured
    t.tolist()  # and the methods are themselves again after a refused capture


def test_planted_rate_read_as_a_python_float_at_capture_is_caught(standin_graphs):
    """The rate as a float in the captured update: every replay keeps the epoch-1 rate."""
    cpu = torch.device("cpu")
    data = batches(cpu, "float-rate")

    def float_rate(_model, opt, _steps):
        opt.param_groups[0]["lr"] = float(opt.param_groups[0]["lr"])  # the bug

    eager = trained("sgd", False, cpu, data)
    with pytest.raises(AssertionError, match="weights"):
        assert_same_run(trained("sgd", True, cpu, data, plant=float_rate), eager, "planted")
    assert_same_run(trained("sgd", True, cpu, data), eager, "tensor rate")


class UpdateOutsideTheGraph(Steps):
    """The old design for Adagrad: forward and backward replayed, the update run after each
    replay on whatever `.grad` holds, which each capture re-binds to its own batch size's."""

    def _train_body(self, x, y):
        step, self.opt.step = self.opt.step, lambda: None
        try:
            super()._train_body(x, y)
        finally:
            self.opt.step = step

    def train(self, x, y):
        super().train(x, y)
        if self.graphs:
            self.opt.step()


def test_planted_gradient_rebound_after_capture_is_caught(standin_graphs):
    cpu = torch.device("cpu")
    data = batches(cpu, "rebound")

    def outside(model, opt, steps):
        steps.__class__ = UpdateOutsideTheGraph

    eager = trained("adagrad", False, cpu, data)
    with pytest.raises(AssertionError, match="weights"):
        assert_same_run(trained("adagrad", True, cpu, data, plant=outside), eager, "planted")
    assert_same_run(trained("adagrad", True, cpu, data), eager, "in the graph")


def test_planted_optimizer_state_made_inside_the_capture_is_caught(standin_graphs):
    """No warm-up: Adam makes its state in the captured step, so every replay re-zeroes it, as a
    real graph re-runs the fills it captured. The warm-ups exist for this."""
    cpu = torch.device("cpu")
    data = batches(cpu, "lazy-state")
    eager = trained("adam", False, cpu, data)
    with pytest.raises(AssertionError, match="weights"):
        assert_same_run(trained("adam", True, cpu, data, warm=0), eager, "planted")
    assert_same_run(trained("adam", True, cpu, data, warm=1), eager, "warmed up")


# -- the product's graphed steps


@pytest.mark.parametrize("optimizer", PAPER_OPTIMIZERS)
def test_graphed_steps_match_eager(optimizer, device):
    data = batches(device, optimizer)
    eager = trained(optimizer, False, device, data)
    graphed = trained(optimizer, True, device, data)
    assert_same_run(graphed, eager, optimizer)


def test_graphs_are_captured_once_per_mode_and_batch_size(standin_graphs):
    cpu = torch.device("cpu")
    trained("sgd", True, cpu, batches(cpu, "count"))
    assert standin_graphs.captures == 3  # train 6, train 3, eval 6: each once, then replayed


def test_the_host_schedule_of_a_device_rate_does_not_warn(standin_graphs, recwarn):
    """Its stand-in optimizer never stepped, so torch warned "lr_scheduler.step() before
    optimizer.step()" in every graphed run."""
    model = build(SPEC)
    opt = make_optimizer("sgd", model.parameters(), graphed=True, device=torch.device("cpu"))
    schedule = Schedule(opt, tmax=3)
    schedule.step()
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(schedule.lr)


# -- whole runs through fastres.run.train on graphed engines (the stand-in)


def assert_close_metrics(graphed, eager, what: str) -> None:
    """Per-epoch metrics of two runs within the tolerance above (the module's docstring)."""
    assert [m.epoch for m in graphed.epochs] == [m.epoch for m in eager.epochs], what
    for g, e in zip(graphed.epochs, eager.epochs, strict=True):
        assert g.lr == e.lr, what  # the host schedule, the same float64 arithmetic
        for field in ("train_loss", "test_loss"):
            assert abs(getattr(g, field) - getattr(e, field)) <= REL * abs(getattr(e, field)), \
                f"{what} epoch {e.epoch} {field}: {getattr(g, field)} vs {getattr(e, field)}"
        for field, n in (("train_acc", eager.data["num_train"]),
                         ("test_acc", eager.data["num_test"])):
            assert abs(getattr(g, field) - getattr(e, field)) * n <= 1.5, \
                f"{what} epoch {e.epoch} {field}"


@pytest.mark.parametrize("optimizer", PAPER_OPTIMIZERS)
def test_a_warm_graphed_engine_trains_a_second_run_as_eager_does(optimizer, graphed_runs,
                                                                 tiny_betons):
    """Two runs on one workbench: the second reuses the first's model, optimizer and captured
    graphs (fresh weights and zeroed state copied into the captured tensors, its own rate in
    the captured rate tensor); both equal their eager runs."""
    from fastres.run.workbench import Workbench

    from .test_fast_path import config, run

    bench = Workbench("cpu")
    first_cfg = config(optimizer=optimizer, seed=1, epochs=3, tmax=2, graphs=True)
    second_cfg = config(optimizer=optimizer, seed=2, epochs=3, tmax=3, augment=False,
                        graphs=True, lr=OPTIMIZER_RATES[optimizer] / 2)
    first = run(first_cfg, tiny_betons, bench)
    captured = graphed_runs.captures
    second = run(second_cfg, tiny_betons, bench)
    (engine,) = bench.engines.values()
    assert engine.runs == 2 and engine.steps.graphs
    assert captured == 4 and graphed_runs.captures == captured  # train 128, 44; eval 100, 20
    for graphed, cfg in ((first, first_cfg), (second, second_cfg)):
        eager = run(dataclasses.replace(cfg, graphs=False), tiny_betons)
        assert_close_metrics(graphed, eager, f"{optimizer} seed {cfg.seed}")


class Killed(Exception):
    """Stands for the process dying after an epoch."""


def kill_after(epoch: int, run: int = 0):
    """An on_epoch callback for train (metrics) or train_array (run index, metrics): dies once
    `run` has ended `epoch`."""
    def on_epoch(*args):
        if args[-1].epoch == epoch and (len(args) == 1 or args[0] == run):
            raise Killed
    return on_epoch


@pytest.mark.parametrize("optimizer", PAPER_OPTIMIZERS)
def test_a_run_resumes_into_a_graphed_engine_from_an_eager_checkpoint(optimizer, graphed_runs,
                                                                      tiny_betons):
    """Killed after epoch 2 of an eager run (the CPU, an older version), resumed with graphs:
    the engine's optimizer stays fused/capturable through the load (else its capture reads the
    host and aborts), and the run ends as the uninterrupted eager run."""
    from fastres.run.train import train

    from .test_fast_path import QUIET, config, run
    from .test_train_array import MemoryStore

    cfg = config(optimizer=optimizer, seed=3, epochs=4, tmax=3, checkpoint_every=0)
    store = MemoryStore()
    with pytest.raises(Killed):
        train(cfg, data=tiny_betons, checkpoint=store, on_epoch=kill_after(2), **QUIET)
    assert store.saved_epochs[-1] == 2
    resumed = train(dataclasses.replace(cfg, graphs=True), data=tiny_betons, checkpoint=store,
                    **QUIET)
    assert graphed_runs.captures >= 2  # epochs 3 and 4 replayed captured steps
    assert_close_metrics(resumed, run(cfg, tiny_betons), optimizer)


def test_runs_resume_into_graphed_engines_from_a_run_array_checkpoint(graphed_runs,
                                                                      tiny_betons):
    """An array of three runs (Adam, Adadelta, SGD: eager stock optimizers over views) killed
    after epoch 2; each run resumed alone on a graphed engine ends as its uninterrupted eager
    run."""
    from fastres.run.train import train
    from fastres.run.train_array import train_array

    from .test_fast_path import QUIET, config, run
    from .test_train_array import MemoryStore

    cfgs = [config(optimizer=o, seed=s, epochs=4, tmax=3, checkpoint_every=0)
            for o, s in (("adam", 5), ("adadelta", 6), ("sgd", 7))]
    stores = [MemoryStore() for _ in cfgs]
    with pytest.raises(Killed):
        train_array(cfgs, data=tiny_betons, checkpoints=stores, on_epoch=kill_after(2, run=2),
                    **QUIET)
    assert [s.saved_epochs[-1] for s in stores] == [2, 2, 2]
    for cfg, store in zip(cfgs, stores, strict=True):
        resumed = train(dataclasses.replace(cfg, graphs=True), data=tiny_betons,
                        checkpoint=store, **QUIET)
        assert_close_metrics(resumed, run(cfg, tiny_betons), f"array run {cfg.optimizer}")


# -- what runs around the graphs: compilation and the per-batch transforms


def test_engines_of_four_structures_compile_once_per_shape_and_never_fall_back(monkeypatch,
                                                                              caplog):
    """A grid worker builds engine after engine in one process. Compiled as torch.compile(model)
    they shared ResNet.forward's dynamo cache, and past its recompile limit (8) the rest of the
    grid ran uncompiled after one log line. Each model now compiles on its own code object:
    3 graphs per engine (train batch, partial last batch, eval), never the limit. Dynamo alone
    ("eager" backend) is what decides this; inductor would only make it slower here."""
    import logging

    from torch._dynamo.utils import counters

    from fastres.run.workbench import Workbench

    from .test_fast_path import config

    monkeypatch.setattr("fastres.run.steps.COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    counters.clear()
    bench = Workbench("cpu")  # keeps two engines: older ones are dropped, as in a grid
    g = torch.Generator().manual_seed(stable_seed("compile"))
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        for channels in (4, 5, 6, 7):
            spec = ResNetSpec.parse(f"N=2 B=1,1 C_in={channels} F0=3 P0=1 F1=3 P1=1 K=1")
            cfg = config(spec=spec, compile=True).resolved(log=lambda _m: None)
            engine, warm = bench.engine(cfg, log=lambda _m: None)
            assert not warm
            engine.start_run(cfg)
            for _epoch in range(2):
                engine.model.train()
                for b in (4, 4, 3):  # full batches and a partial last one
                    engine.steps.train(torch.randn(b, 3, 8, 8, generator=g),
                                       torch.randint(0, 10, (b,), generator=g))
                engine.model.eval()
                engine.steps.eval(torch.randn(5, 3, 8, 8, generator=g),
                                  torch.randint(0, 10, (5,), generator=g))
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "recompile" in m or "cache_size" in m], said
    assert counters["stats"]["unique_graphs"] == 4 * 3


class HostDataCount(TorchDispatchMode):
    """Tensors made from host data (torch.tensor, as_tensor): on a GPU each is a pageable
    host-to-device copy that waits."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_no_tensor_is_made_from_host_data_per_batch(backend, split):
    from fastres.loaders.augment import DeviceAugment

    train = split == "train"
    augment = DeviceAugment(crop=train, flip=train, normalize=True, backend=backend,
                            channels_last=False)
    g = torch.Generator().manual_seed(stable_seed("host-data", backend, split))
    images = torch.randint(0, 256, (7, 9, 9, 3), dtype=torch.uint8, generator=g)
    index = torch.tensor([6, 0, 3])
    augment(images[:3], g)  # the first batch may make the run's constants
    augment(images, g, index=index)
    with HostDataCount() as counted:
        for _ in range(2):
            augment(images[:3], g)
            augment(images, g, index=index)
    assert counted.count == 0


def test_no_tensor_is_made_from_host_data_per_batch_in_a_whole_epoch(tiny_betons):
    """The whole default training path (resident data), not only the transforms: after the
    first epoch (which makes the run's constants), an epoch of 10 training and 3 test batches
    makes no tensor from host data per batch. The one allowed is the resident loader's epoch
    order (one per epoch, copied from pinned memory without a wait on a GPU). The FFCV stream,
    the fallback where the data does not fit, brings each batch from the host by design (from
    its pinned buffers, non-blocking)."""
    from fastres.run.train import train

    from .test_fast_path import QUIET, config

    counted = HostDataCount()

    def count_from_epoch_2(m):
        if m.epoch == 1:
            counted.__enter__()

    try:
        train(config(epochs=2, placement="resident", batch_size=30, test_batch_size=50),
              data=tiny_betons, on_epoch=count_from_epoch_2, **QUIET)
    finally:
        counted.__exit__(None, None, None)
    assert counted.count <= 1
