"""R runs of one structure trained together as one array (fastres.study.array_model,
fastres.run.array_steps), top to bottom.

Each run is the run fastres.run.train would make of its config: its own seed (weights, shuffle,
crops), augmentation, optimizer, rate, T_max and weight decay, its own metrics, checkpoints and
result. What the runs share is the model's kernels: every step is one forward and backward of
the array. Runs may stand at different epochs (resumed from checkpoints written by arrays of
other sizes, or alone): each counts its own. A run that finishes or diverges leaves the array
at the end of that epoch; the rest go on in a smaller array.

Each step is fastres.run.array_steps.ArraySteps: on a GPU (cfg.graphs) the whole array step is
replayed from one CUDA graph per batch size, every run's optimizer inside it.

A run's checkpoint is a solo run's (paper keys, its optimizer's solo state_dict), so it resumes
alone or in an array of any size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

import fastres.run.steps
from fastres.kernels import build
from fastres.run.array_steps import ArraySteps, RunViews
from fastres.run.checkpoints import BestWeights, StateSaver
from fastres.run.config import TrainConfig
from fastres.run.records import Checkpointer, EpochMetrics, RunResult, best_of, finite
from fastres.run.signals import Interrupted, StopRequest
from fastres.run.steps import AMP_DTYPES, Schedule
from fastres.run.train import environment, make_loaders
from fastres.run.workbench import Workbench
from fastres.study.array_model import ArrayResNet, array_loss
from fastres.study.data import BetonPair, prepare
from fastres.study.protocol import PAPER_OPTIMIZERS

# What every run of one array must share: they are computed by the same kernels, from batches
# of the same size, over the same data.
SHARED = ("spec", "epochs", "batch_size", "test_batch_size", "train_subset", "test_subset",
          "device", "precision", "channels_last", "kernels", "data")


class ArrayError(ValueError):
    """Runs that cannot be trained as one array (the message says which setting differs)."""


def check_shared(cfgs: Sequence[TrainConfig]) -> None:
    if not cfgs:
        raise ArrayError("an array needs at least one run")
    for name in SHARED:
        values = [getattr(c, name) for c in cfgs]
        if any(v != values[0] for v in values):
            raise ArrayError(f"the runs of one array must share {name}; got "
                             f"{sorted({str(v) for v in values})}")
    if cfgs[0].precision == "fp16":
        raise ArrayError("fp16 trains with one loss scale, which would couple the runs of an "
                         "array (one run's overflow would rescale all); use bf16 or fp32, or "
                         "train fp16 runs one at a time")


def run_label(cfg: TrainConfig) -> str:
    return (f"{cfg.optimizer} aug {'on' if cfg.augment else 'off'} T_max {cfg.tmax} "
            f"seed {cfg.seed}")


@dataclass
class _Run:
    """One run's side of the array."""

    index: int
    cfg: TrainConfig
    train: object
    test: object
    checkpoint: Checkpointer | None
    history: list[EpochMetrics] = field(default_factory=list)
    status: str = "completed"
    diverged_at: int | None = None
    best_acc: float | None = None
    best: BestWeights | None = None
    saver: StateSaver | None = None
    schedule: Schedule | None = None
    error: BaseException | None = None
    left: bool = False

    @property
    def epoch(self) -> int:
        return len(self.history)

    def finished(self) -> bool:
        return self.status != "completed" or self.epoch >= self.cfg.epochs


def _fresh_state(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    # Exactly the solo run's initial weights: torch.manual_seed(seed); build(spec).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build(cfg.spec).state_dict()


def array_class(kernels: str) -> type[ArrayResNet]:
    if kernels == "triton":
        from fastres.kernels.model import TritonArrayResNet

        return TritonArrayResNet
    return ArrayResNet


class Array:
    """The model and per-run optimizers of the runs now in the array (rebuilt when one leaves)."""

    def __init__(self, runs: list[_Run], states: list[dict | None], device: torch.device,
                 grouped: bool | None):
        cfg = runs[0].cfg
        self.runs = runs
        model_states = [s["model"] if s is not None else _fresh_state(r.cfg)
                        for r, s in zip(runs, states, strict=True)]
        self.model = array_class(cfg.kernels).from_states(cfg.spec, model_states, device,
                                                          grouped)
        if cfg.channels_last and self.model.uses_grouped(device):
            self.model = self.model.to(memory_format=torch.channels_last)
        self.views = RunViews(self.model, [r.cfg.optimizer for r in runs],
                              [r.cfg.lr for r in runs], [r.cfg.weight_decay for r in runs],
                              graphed=bool(cfg.graphs))
        # One graph per array (and batch size): a smaller array is captured anew.
        self.steps = ArraySteps(self.model, self.views, device, AMP_DTYPES[cfg.precision],
                                graphs=bool(cfg.graphs))
        for i, (run, state) in enumerate(zip(runs, states, strict=True)):
            # The solo order: the schedule on the fresh optimizer, then the saved states.
            run.schedule = Schedule(self.views.optimizers[i], run.cfg.tmax, run.cfg.lr)
            if state is not None:
                self.views.load_optimizer_state(i, state["optimizer"])
                run.schedule.load_state_dict(state["scheduler"])

    def state(self, i: int) -> dict:
        """Run i's state in a solo run's checkpoint format (fastres.run.train's keys)."""
        run = self.runs[i]
        return {"epoch": run.epoch, "model": self.model.run_state(i),
                "optimizer": self.views.optimizer_state(i),
                "scheduler": run.schedule.state_dict(),
                "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
                "torch_rng": torch.get_rng_state(),
                "augment_rng": run.train.generator.get_state(),
                "loader_epoch": run.train.epoch}


def train_array(cfgs: Sequence[TrainConfig], data: BetonPair | None = None,
                on_epoch: Callable[[int, EpochMetrics], None] | None = None,
                log: Callable[[str], None] = print,
                checkpoints: Sequence[Checkpointer | None] | None = None,
                bench: Workbench | None = None, grouped: bool | None = None,
                isolate: tuple[type[BaseException], ...] = ()
                ) -> list[RunResult | BaseException]:
    """Train cfgs[i] for each i as one array; returns run i's RunResult at i, or the exception
    (of a type in `isolate`) that took run i out of the array alone, say a lost lease. Any
    other exception stops the whole array (every run's last saved state stays).

    checkpoints[i]: run i's store, as fastres.run.train's `checkpoint` (resume, per-epoch rows,
    states on cfg.checkpoint_every's cadence, SIGINT/SIGTERM: save every run's state at the end
    of the epoch in flight, then raise Interrupted). on_epoch(i, metrics) after each epoch.
    grouped: the array's compute path (fastres.study.array_model.ArrayResNet); Triton kernels are
    always grouped."""
    asked = [c.placement for c in cfgs]
    said: set[str] = set()

    def once(message: str) -> None:  # the runs resolve alike: a line for the array, not each
        if message not in said:
            said.add(message)
            log(message)

    cfgs = [c.resolved(once) for c in cfgs]
    check_shared(cfgs)
    checkpoints = list(checkpoints) if checkpoints is not None else [None] * len(cfgs)
    if len(checkpoints) != len(cfgs):
        raise ArrayError(f"{len(checkpoints)} checkpoints for {len(cfgs)} runs")
    device = torch.device(cfgs[0].device)
    if cfgs[0].kernels == "triton":
        grouped = True  # the Triton convolution's run axis is its group axis
    if data is None:
        data = prepare(cfgs[0].data, cfgs[0].cache, log=log)
    bench = bench or Workbench(device)
    runs: list[_Run] = []
    for i, cfg in enumerate(cfgs):
        # Resident data: every run's batches gathered from one copy on the device.
        cfg = dataclasses.replace(cfg, placement="stream" if asked[i] == "stream" else "resident",
                                  compile=False)
        train_loader, test_loader, placement = make_loaders(cfg, data, bench, log)
        cfgs[i] = dataclasses.replace(cfg, placement=placement)
        runs.append(_Run(i, cfgs[i], train_loader, test_loader, checkpoints[i]))
    path = "grouped" if (grouped if grouped is not None else device.type == "cuda") \
        else "per-run"
    log(f"[array] {cfgs[0].spec} | {len(runs)} runs as one array ({path}) | {cfgs[0].epochs} "
        f"epochs | {device} {cfgs[0].precision} | {cfgs[0].kernels} kernels | "
        f"{runs[0].train.num_samples} train / {runs[0].test.num_samples} test images, "
        f"{cfgs[0].placement}{' | graphed' if cfgs[0].graphs else ''} | no compile in arrays yet")

    states: list[dict | None] = []
    for run in runs:
        saved = run.checkpoint.load() if run.checkpoint is not None else None
        state = None
        if saved is not None:
            state, run.history = saved
            if state["epoch"] != len(run.history):
                raise ValueError(f"run {run.index}: checkpoint is of epoch {state['epoch']} but "
                                 f"{len(run.history)} epochs are recorded")
            run.train.generator.set_state(state["augment_rng"])
            run.train.epoch = state["loader_epoch"]
            log(f"[array] {run_label(run.cfg)}: resuming after epoch {state['epoch']}")
        if run.history and not finite(run.history[-1]):
            run.status, run.diverged_at = "diverged", run.history[-1].epoch
        run.best_acc = best_of(run.history)[0]
        run.best = BestWeights() if run.checkpoint is not None else None
        states.append(state)

    def leave(run: _Run, error: BaseException | None = None) -> None:
        run.left, run.error = True, error

    with contextlib.ExitStack() as stack:
        for run in runs:
            if run.checkpoint is not None:
                run.saver = stack.enter_context(StateSaver(run.checkpoint,
                                                           run.cfg.checkpoint_every))
        stop = stack.enter_context(StopRequest(log) if any(checkpoints)
                                   else contextlib.nullcontext())
        live = [(r, s) for r, s in zip(runs, states, strict=True) if not r.finished()]
        for run in runs:
            if run.finished():
                leave(run)
        array = Array([r for r, _ in live], [s for _, s in live], device, grouped) \
            if live else None
        while array is not None:
            t0 = time.perf_counter()
            members = array.runs
            lrs = [r.schedule.lr for r in members]
            n = len(members)
            steps = array.steps
            steps.reset_sums()
            array.model.train()
            for batches in zip(*[r.train for r in members], strict=True):
                steps.train([x for x, _ in batches], torch.stack([y for _, y in batches]))
            for run in members:
                run.schedule.step()
            array.model.eval()
            for batches in zip(*[r.test for r in members], strict=True):
                steps.eval([x for x, _ in batches], torch.stack([y for _, y in batches]))
            array.model.train()
            # The epoch's one host sync: every run's sums at once.
            sums = steps.sums()
            share = (time.perf_counter() - t0) / n  # each run's share of the array's epoch
            for i, run in enumerate(members):
                m = EpochMetrics(run.epoch + 1, lrs[i], sums[0][i] / run.train.num_samples,
                                 int(sums[1][i]) / run.train.num_samples,
                                 sums[2][i] / run.test.num_samples,
                                 int(sums[3][i]) / run.test.num_samples, share)
                run.history.append(m)
                log(f"epoch {m.epoch:>4}/{run.cfg.epochs} [{run_label(run.cfg)}]  lr {m.lr:.5f}  "
                    f"train loss {m.train_loss:.4f} acc {100 * m.train_acc:6.2f}%  test loss "
                    f"{m.test_loss:.4f} acc {100 * m.test_acc:6.2f}%  {m.seconds:.1f}s")
                if not finite(m):
                    run.status, run.diverged_at = "diverged", m.epoch
                    bad = m.train_loss if not math.isfinite(m.train_loss) else m.test_loss
                    log(f"[array] {run_label(run.cfg)}: loss is {bad} at epoch {m.epoch}: run "
                        "diverged; it leaves the array")
                try:
                    _after_epoch(array, i, m, stop)
                except isolate as e:
                    log(f"[array] {run_label(run.cfg)} leaves the array: {e}")
                    leave(run, e)
                    continue
                if on_epoch is not None:
                    on_epoch(run.index, m)
            if stop is not None and getattr(stop, "signum", None) is not None:
                for i, run in enumerate(members):
                    if run.saver is not None and not run.left:
                        run.saver.final(run.epoch, lambda i=i, a=array: a.state(i), run.best)
                log("[array] every run's state saved; stopping")
                raise Interrupted(stop.signum)
            going = []
            for i, run in enumerate(members):
                if run.left:
                    continue
                if run.finished():
                    if run.saver is not None:
                        try:
                            run.saver.final(run.epoch, lambda i=i, a=array: a.state(i), run.best)
                        except isolate as e:
                            leave(run, e)
                            continue
                    leave(run)
                else:
                    going.append(i)
            if len(going) == n:
                continue
            # Some runs left: the rest go on as a smaller array, from their exact states.
            kept = [array.runs[i] for i in going]
            array = Array(kept, [array.state(i) for i in going], device, grouped) \
                if kept else None

    env = environment(device)
    env["array"] = {"runs": len(runs), "path": path}
    if device.type == "cuda":  # what this process has held at most: benchmarks read it
        env["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    out: list[RunResult | BaseException] = []
    for run in runs:
        if run.error is not None:
            out.append(run.error)
            continue
        best_acc, best_epoch, loss_at_best = best_of(run.history)
        out.append(RunResult(run.cfg.to_dict(), run.status, run.history, best_acc, best_epoch,
                             loss_at_best, run.diverged_at, env,
                             {"kind": data.kind, "source": data.source,
                              "num_train": run.train.num_samples,
                              "num_test": run.test.num_samples,
                              "placement": run.cfg.placement}))
    return out


def _after_epoch(array: Array, i: int, m: EpochMetrics, stop: object) -> None:
    """Run i's store after its epoch: the metrics row, its best weights, its state on the
    cadence."""
    run = array.runs[i]
    if run.checkpoint is None:
        return
    run.checkpoint.record(m)
    if finite(m) and (run.best_acc is None or m.test_acc > run.best_acc):
        run.best_acc = m.test_acc
        run.best.update(m.epoch, array.model.run_views(i))  # copied into its buffers
    if run.cfg.checkpoint_every == 0:  # every epoch's state, as the flag says
        run.saver.writer.wait()
    run.saver.epoch_end(m.epoch, lambda: array.state(i), run.best)


# Of the device's free memory, the share arrays may plan on: the allocator's slack, cuDNN's
# workspaces and the resident data need the rest.
ARRAY_MEMORY_SHARE = 0.6


def fit_size(per_run_bytes: int, fixed_bytes: int, free_bytes: int, cap: int) -> int:
    """The most runs (1..cap) whose training fits in ARRAY_MEMORY_SHARE of free_bytes, each
    taking per_run_bytes beyond fixed_bytes."""
    room = free_bytes * ARRAY_MEMORY_SHARE - fixed_bytes
    return max(1, min(cap, int(room // max(per_run_bytes, 1))))


def _step_peak(cfg: TrainConfig, runs: int) -> int:
    """Peak device bytes of one training step of `runs` runs at cfg's batch size, with Adam
    (two state tensors per parameter, as many as any Table 2 optimizer holds)."""
    device = torch.device(cfg.device)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model = array_class(cfg.kernels).from_seeds(cfg.spec, range(runs), device, grouped=True)
    views = RunViews(model, ["adam"] * runs)
    amp = AMP_DTYPES[cfg.precision]
    x = [torch.randn(cfg.batch_size, 3, 32, 32, device=device) for _ in range(runs)]
    y = torch.randint(0, 10, (runs, cfg.batch_size), device=device)
    for _ in range(2):  # the second step holds the optimizer's state too
        views.zero_grad()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x)
        array_loss(logits.float(), y)[0].backward()
        views.step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del model, views, x, y, logits
    torch.cuda.empty_cache()
    return peak


def fit_array(cfg: TrainConfig, cap: int, log: Callable[[str], None] = print) -> int:
    """How many runs of cfg's spec one array on cfg's (CUDA) device should hold: from the
    measured peak memory of a training step of 1 and 2 runs, and the device's free memory."""
    device = torch.device(cfg.device)
    one, two = _step_peak(cfg, 1), _step_peak(cfg, 2)
    per_run = max(two - one, one // 2)  # what each further run adds
    free, _total = torch.cuda.mem_get_info(device)
    n = fit_size(per_run, one - per_run, free, cap)
    log(f"[array] {cfg.spec}: {per_run / 2**20:.0f} MiB per run at batch {cfg.batch_size}, "
        f"{free / 2**30:.1f} GiB free: arrays of up to {n}")
    return n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_ms_per_run(cfg: TrainConfig, runs: int, steps: int = 10,
                    bench: Workbench | None = None) -> float:
    """Milliseconds per run-step of training `runs` runs of cfg's spec as the grid would train
    them, on random batches of cfg.batch_size: runs=1 through the workbench's engine for cfg
    (compiled and graphed as cfg says; the engine stays warm for the runs that follow), more as
    one array (graphed as cfg says, optimizers cycling over Table 2's). Warm-ups and captures
    first, then the median of `steps` timed steps."""
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(0)
    amp = AMP_DTYPES[cfg.precision]
    xs = [torch.randn(cfg.batch_size, 3, 32, 32, generator=gen).to(device, amp or torch.float32)
          for _ in range(runs)]
    if cfg.channels_last:
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    ys = torch.randint(0, 10, (runs, cfg.batch_size), generator=gen).to(device)
    if runs == 1:
        engine, _warm = (bench or Workbench(device)).engine(cfg, log=lambda _m: None)
        engine.start_run(cfg)
        engine.model.train()
        step = lambda: engine.steps.train(xs[0], ys[0])  # noqa: E731
    else:
        names = [PAPER_OPTIMIZERS[r % len(PAPER_OPTIMIZERS)] for r in range(runs)]
        model = array_class(cfg.kernels).from_seeds(cfg.spec, range(runs), device, grouped=True)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        views = RunViews(model, names, graphed=bool(cfg.graphs))
        array = ArraySteps(model.train(), views, device, amp, graphs=bool(cfg.graphs))
        step = lambda: array.train(xs, ys)  # noqa: E731
    for _ in range(fastres.run.steps.WARM_STEPS + 2):  # warm-ups, the capture, a replay
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times) / runs


def choose_array(cfg: TrainConfig, cap: int, log: Callable[[str], None] = print,
                 bench: Workbench | None = None) -> tuple[int, dict]:
    """Runs per array for cfg's spec on its device, by measurement: the largest array that fits
    (fit_array on a GPU, fit_host_array on the CPU) against one run at a time, each timed as it
    would train (step_ms_per_run); the faster per run-step wins. Returns the size and what was
    measured, for the record."""
    fit = fit_array if cfg.device.startswith("cuda") else fit_host_array
    largest = fit(cfg, cap, log)
    record: dict = {"largest_fitting": largest, "device": cfg.device,
                    "graphs": bool(cfg.graphs), "compile_one_at_a_time": bool(cfg.compile)}
    if largest == 1:
        record["chose"] = 1
        return 1, record
    alone = step_ms_per_run(cfg, 1, bench=bench)
    array = step_ms_per_run(cfg, largest)
    chose = largest if array < alone else 1
    record.update(ms_per_run_step_alone=round(alone, 4),
                  ms_per_run_step_array=round(array, 4), chose=chose)
    log(f"[array] {cfg.spec}: measured per run-step: one at a time {alone:.3f} ms"
        f"{' (compiled' if cfg.compile else ' ('}{', graphed)' if cfg.graphs else ')'}, "
        f"array of {largest} {array:.3f} ms{' (graphed)' if cfg.graphs else ''}: "
        + (f"arrays of up to {largest}" if chose > 1 else "one run at a time"))
    return chose, record


def host_bytes_per_run(cfg: TrainConfig) -> int:
    """What one more run of an array needs in host memory (a CPU array), from the spec: each
    conv and BN output at cfg's batch size, in fp32, kept for the backward pass and matched by
    its gradient (x2, and x2 again for the ReLU outputs beside them), plus weights, gradients
    and two optimizer states (x4)."""
    model = build(cfg.spec)
    outputs = 0

    def count(_m, _inp, out: torch.Tensor) -> None:
        nonlocal outputs
        outputs += out.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, torch.nn.Conv2d | torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    params = sum(p.numel() for p in model.parameters())
    return 4 * (4 * outputs * cfg.batch_size + 4 * params)


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fit_host_array(cfg: TrainConfig, cap: int, log: Callable[[str], None] = print) -> int:
    """How many runs of cfg's spec one CPU array should hold, from host_bytes_per_run and the
    host's available memory."""
    per_run, free = host_bytes_per_run(cfg), available_host_bytes()
    n = fit_size(per_run, 0, free, cap)
    log(f"[array] {cfg.spec}: about {per_run / 2**20:.0f} MiB per run at batch "
        f"{cfg.batch_size}, {free / 2**30:.1f} GiB of host memory available: arrays of up to {n}")
    return n
