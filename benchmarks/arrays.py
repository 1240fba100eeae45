"""Run arrays against one run at a time: the time of one training step of R runs of a structure.

    python benchmarks/arrays.py                          # structure 1, R = 1, 2, 5, 10, batch 128
    python benchmarks/arrays.py --structures 1,6 --json /tmp/arrays.json --md /tmp/arrays.md
    python benchmarks/arrays.py --smoke                  # tiny spec, batch 16, R = 1, 2, 4: CPU

For each structure and array size R, three ways to take one training step of R runs (each run
its own random batch of --batch images, its own weights, and one of Table 2's five optimizers,
cycling over the runs as the paper's grid mixes them, with their own rates and coupled weight
decay):
- one at a time: R solo models (fastres.kernels.build,
  fastres.run.steps.make_optimizer), each doing
  forward, cross-entropy, backward and its optimizer's step, one after the other;
- array, grouped: one fastres.study.array_model.ArrayResNet(grouped=True) (one grouped
  convolution per layer, one BatchNorm over R*C channels, a batched head), forward on the
  (R, B, 3, 32, 32) batch, array_loss, backward, RunViews.step (R stock optimizers over views);
- array, per-run: the same with grouped=False (every op per run on slices, the CPU default).

As fastres.run.train computes: on CUDA bf16 autocast, channels-last model and bf16 channels-last
batches, cuDNN benchmark on; on the CPU fp32 in NCHW (--smoke there: one torch thread, unless
--threads). One untimed step of each variant at R = 1 comes first (one-time costs). Each variant
takes --warmup steps, then the median of --steps steps, each timed from a device
synchronisation to the next. --budget-s
bounds the whole run: a variant stops measuring once its share of the time left is spent (at
least one measured step), and cells that would start past the budget are skipped, saying so.
Peak memory per variant: torch.cuda.max_memory_allocated on CUDA (reset before each variant;
it includes that cell's batches), on Linux CPUs the peak resident-set growth over the variant
(/proc/self/clear_refs resets the peak), else "-".

The last line is `array speedup (grouped vs one at a time): R=1: <x>x, ...` for the first
structure.

--host (issue 18: what the host does per step, with negligible arithmetic)

    python benchmarks/arrays.py --host --structures 1,6  # R = 1, 2, 5, 10, batch 2, C_in=4
    python benchmarks/arrays.py --host --smoke           # R = 1, 2, 2 timed steps

Each structure's layer layout at C_in=4 (dataclasses.replace(STRUCTURES[s], C_in=4)), fp32,
batch 2 of 32x32 images per run, optimizers cycling over Table 2's five, four ways to take one
training step of R runs: one run eager / graphed (R solo fastres.run.steps.Steps, graphs=False /
True, one after the other) and an array eager / graphed (one fastres.run.array_steps.ArraySteps over
ArrayResNet and RunViews, graphs=False / True; --array-path grouped, the GPU's default, or
per-run). Graphed optimizers are make_optimizer(..., graphed=True). On the CPU graphed rows run
through tests/graph_standin.py (installed() for the whole run). Each variant warms up
WARM_STEPS + 2 steps (every graph captured, and replayed once), then counts the aten ops of
--count-steps steps with a TorchDispatchMode (every op at the dispatcher: forward, backward,
update; the stand-in's replays run with the mode off, since what they re-run is the device's
work) and times --steps steps (default 20; --budget-s bounds the run as above). Host ms per
run-step: on the CPU the step's wall time minus the time inside the stand-in's replays, over R;
on CUDA the step call's wall time before synchronising, over R, with device ms per run-step
from CUDA events beside it. One torch thread on the CPU unless --threads. The last line is
`array graphed ops/step (structure <s>): R=1: <n> (<c> copy_), ...` for the first structure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (also puts the checkout on sys.path)
    environment,
    fmt,
    markdown_table,
    pick_device,
    sync,
    write_outputs,
)

from fastres.kernels import build  # noqa: E402
from fastres.run.array_steps import ArraySteps, RunViews  # noqa: E402
from fastres.run.steps import WARM_STEPS, Steps, make_optimizer  # noqa: E402
from fastres.study.array_model import ArrayResNet, array_loss  # noqa: E402
from fastres.study.protocol import PAPER_OPTIMIZERS, SMOKE_SPEC  # noqa: E402
from fastres.study.structures import NUM_CLASSES, STRUCTURES, ResNetSpec  # noqa: E402

VARIANTS = ("solo", "grouped", "per_run")
LABELS = {"solo": "one at a time", "grouped": "array grouped", "per_run": "array per-run"}


# ---------------------------------------------------------------------------- memory


def _proc_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakMemory:
    """Peak memory of what runs between start() and stop(), in MB: allocated device memory on
    CUDA; on the CPU the growth of the resident set's peak over the resident set at start
    (Linux only: writing 5 to /proc/self/clear_refs resets the peak); None where neither works."""

    def __init__(self, device: torch.device):
        self.device, self.rss0 = device, None

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.rss0 = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return
        self.rss0 = _proc_kb("VmRSS")

    def stop(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        hwm = _proc_kb("VmHWM")
        return None if self.rss0 is None or hwm is None else max(hwm - self.rss0, 0) / 1024


# ---------------------------------------------------------------------------- variants


def make_batches(runs: int, batch: int, device: torch.device, channels_last: bool,
                 dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, B, 3, 32, 32) random images, each run's (B, 3, 32, 32) slice channels-last where
    asked (as DeviceAugment delivers them), and (R, B) labels."""
    gen = torch.Generator().manual_seed(seed)
    if channels_last:
        x = torch.randn(runs, batch, 32, 32, 3, generator=gen).to(device, dtype)
        x = x.permute(0, 1, 4, 2, 3)
    else:
        x = torch.randn(runs, batch, 3, 32, 32, generator=gen).to(device, dtype)
    y = torch.randint(0, NUM_CLASSES, (runs, batch), generator=gen).to(device)
    return x, y


def setup_variant(variant: str, spec: ResNetSpec, runs: int, device: torch.device,
                  channels_last: bool, x: torch.Tensor, y: torch.Tensor,
                  autocast: Callable[[], object]) -> Callable[[], None]:
    """The models and optimizers of one variant, and its training step over all R runs."""
    names = [PAPER_OPTIMIZERS[r % len(PAPER_OPTIMIZERS)] for r in range(runs)]
    fmt_ = torch.channels_last if channels_last else torch.contiguous_format
    if variant == "solo":
        models, opts = [], []
        for r in range(runs):
            torch.manual_seed(r)
            m = build(spec).to(device, memory_format=fmt_).train()
            models.append(m)
            opts.append(make_optimizer(names[r], m.parameters()))
        xs = list(x.unbind())

        def step() -> None:
            for m, opt, xr, yr in zip(models, opts, xs, y.unbind(), strict=True):
                opt.zero_grad(set_to_none=True)
                with autocast():
                    loss = F.cross_entropy(m(xr), yr)
                loss.backward()
                opt.step()

        return step
    model = ArrayResNet.from_seeds(spec, list(range(runs)), device, grouped=variant == "grouped")
    model = model.to(memory_format=fmt_).train()
    views = RunViews(model, names)  # after the last move: its parameters view the stacked ones

    def array_step() -> None:
        views.zero_grad()
        with autocast():
            total, _ = array_loss(model(x), y)
        total.backward()
        views.step()

    return array_step


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int,
               budget_s: float) -> tuple[list[float], float]:
    """Seconds of each measured step (at least one; fewer than `steps` once `budget_s` of
    measuring is spent) and the warm-up's seconds."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm = time.perf_counter() - t0
    times: list[float] = []
    stop = time.perf_counter() + budget_s
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > stop:
            break
    return times, warm


def measure(variant: str, spec: ResNetSpec, runs: int, args: argparse.Namespace,
            device: torch.device, channels_last: bool, budget_s: float) -> dict:
    """One variant in one layout; everything it builds is freed when it returns."""
    cuda = device.type == "cuda"
    mem = PeakMemory(device)
    mem.start()
    x, y = make_batches(runs, args.batch, device, channels_last,
                        torch.bfloat16 if cuda else torch.float32, args.seed)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    step = setup_variant(variant, spec, runs, device, channels_last, x, y, autocast)
    times, warm = time_steps(step, device, args.warmup, args.steps, budget_s)
    ms = 1e3 * statistics.median(times)
    return {"ms": ms, "rps": runs * 1e3 / ms, "mem_mb": mem.stop(), "steps": len(times),
            "warmup_s": warm, "layout": "channels-last" if channels_last else "NCHW"}


def run_variant(variant: str, spec: ResNetSpec, runs: int, args: argparse.Namespace,
                device: torch.device, budget_s: float) -> dict:
    """measure() in channels-last on CUDA, falling back to NCHW (and saying so) if that
    fails; NCHW on the CPU. A failure is returned as {"error": ...}, never raised."""
    notes: list[str] = []
    for channels_last in ([True, False] if device.type == "cuda" else [False]):
        try:
            return {**measure(variant, spec, runs, args, device, channels_last, budget_s),
                    "notes": notes}
        except torch.cuda.OutOfMemoryError as e:
            return {"error": f"out of memory ({str(e).splitlines()[0][:100]})", "notes": notes}
        except Exception as e:
            msg = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
            if not channels_last:
                return {"error": msg, "notes": notes}
            notes.append(f"channels-last failed ({msg}), ran NCHW")
        finally:
            gc.collect()
    return {"error": "no layout ran", "notes": notes}


# ---------------------------------------------------------------------------- --host


HOST_VARIANTS = ("one_eager", "one_graphed", "array_eager", "array_graphed")
HOST_LABELS = {"one_eager": "one run eager", "one_graphed": "one run graphed",
               "array_eager": "array eager", "array_graphed": "array graphed"}


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (below autograd: forward, backward and the
    optimizer's update, each op once, views and copies included)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.copies = 0  # aten.copy_: a graphed step's batch copies into its captured inputs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.copies += func is torch.ops.aten.copy_.default
        return func(*args, **(kwargs or {}))


class ReplayClock:
    """While inside: each StandInGraph.replay() (the CPU stand-in's "device" work: it re-runs
    the captured aten ops) runs with every dispatch mode off, so an OpCounter does not count
    the ops it re-runs, and its seconds are summed in `seconds`."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.replays = 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        from tests.graph_standin import StandInGraph

        original = StandInGraph.replay
        clock = self

        def replay(graph) -> None:
            with _disable_current_modes():
                t0 = time.perf_counter()
                try:
                    original(graph)
                finally:
                    clock.seconds += time.perf_counter() - t0
                    clock.replays += 1

        StandInGraph.replay = replay
        try:
            yield
        finally:
            StandInGraph.replay = original


def host_spec(structure: int) -> ResNetSpec:
    """The structure's layer layout at 4 stem channels: the arithmetic all but vanishes, the
    number of ops a step dispatches stays the structure's."""
    return dataclasses.replace(STRUCTURES[structure], C_in=4)


def host_setup(variant: str, spec: ResNetSpec, runs: int, device: torch.device,
               x: torch.Tensor, y: torch.Tensor, grouped: bool
               ) -> tuple[Callable[[], None], list[Steps]]:
    """One variant's training step over all R runs, and its Steps objects (to check that every
    graph is captured)."""
    names = [PAPER_OPTIMIZERS[r % len(PAPER_OPTIMIZERS)] for r in range(runs)]
    graphed = variant.endswith("graphed")
    xs, ys = list(x.unbind()), y
    if variant.startswith("one"):
        solo: list[Steps] = []
        for r in range(runs):
            torch.manual_seed(r)
            m = build(spec).to(device).train()
            opt = make_optimizer(names[r], m.parameters(), graphed=graphed, device=device)
            solo.append(Steps(m, m, opt, device, None, graphs=graphed, log=lambda _m: None))
        pairs = list(zip(solo, xs, ys.unbind(), strict=True))

        def step() -> None:
            for s, xr, yr in pairs:
                s.train(xr, yr)

        return step, solo
    model = ArrayResNet.from_seeds(spec, list(range(runs)), device, grouped=grouped).train()
    views = RunViews(model, names, graphed=graphed)
    steps = ArraySteps(model, views, device, None, graphs=graphed, log=lambda _m: None)
    return (lambda: steps.train(xs, ys)), [steps]


def host_measure(variant: str, spec: ResNetSpec, runs: int, args: argparse.Namespace,
                 device: torch.device, budget_s: float) -> dict:
    """Ops per step (counted over --count-steps steps) and host/device ms per run-step
    (median over up to --steps steps) of one variant, after its warm-up."""
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(runs, args.batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (runs, args.batch), generator=gen).to(device)
    step, all_steps = host_setup(variant, spec, runs, device, x, y, args.array_path == "grouped")
    graphed = variant.endswith("graphed")
    clock = ReplayClock()
    with clock.installed() if not cuda else contextlib.nullcontext():
        # Steps warms each batch size WARM_STEPS times, captures on the next call and replays
        # from then on; eager variants take as many (the optimizers' state is made lazily).
        for _ in range(args.host_warmup):
            step()
        sync(device)
        if graphed and not all(s.captured for s in all_steps):
            raise RuntimeError("a graph was not captured during the warm-up")
        counts, copies = [], []
        for _ in range(args.count_steps):
            with OpCounter() as counter:
                step()
            counts.append(counter.ops)
            copies.append(counter.copies)
        sync(device)
        host, dev, replay = [], [], []
        stop = time.perf_counter() + budget_s
        for _ in range(args.steps):
            replay0 = clock.seconds
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                sync(device)
                start.record()
            t0 = time.perf_counter()
            step()
            wall = time.perf_counter() - t0
            if cuda:
                end.record()
                end.synchronize()
                dev.append(start.elapsed_time(end) / runs)  # ms
            inside = clock.seconds - replay0
            host.append(1e3 * (wall - inside) / runs)
            replay.append(1e3 * inside / runs)
            if time.perf_counter() > stop:
                break
    out = {"ops": counts[0], "ops_run": counts[0] / runs, "copies": copies[0],
           "host_ms": statistics.median(host), "steps": len(host),
           "dev_ms": statistics.median(dev) if dev else None,
           "notes": [] if len(set(counts)) == 1 else [f"ops counted per step: {counts}"]}
    if not cuda and graphed:
        out["replay_ms"] = statistics.median(replay)
    return out


def host_main(args: argparse.Namespace) -> int:
    """--host: ops dispatched and host ms per run-step of the four ways to step R runs."""
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    if not cuda and args.threads is None:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    sizes = [int(s) for s in args.sizes.split(",")]
    structures = [int(s) for s in args.structures.split(",")]
    start = time.perf_counter()
    stand_in = contextlib.nullcontext()
    if not cuda:
        from tests.graph_standin import installed

        stand_in = installed()
    rows: list[dict] = []
    failed = False
    with stand_in:
        cells = [(s, r, v) for s in structures for r in sizes for v in HOST_VARIANTS]
        # One untimed step of each variant first: lazy imports and first-call costs.
        for v in HOST_VARIANTS:
            host_measure(v, host_spec(structures[0]), 1, argparse.Namespace(
                **{**vars(args), "steps": 1, "count_steps": 1}), device, 0.0)
        for i, (structure, runs, variant) in enumerate(cells):
            row: dict = {"structure": structure, "runs": runs, "variant": HOST_LABELS[variant]}
            left = args.budget_s - (time.perf_counter() - start)
            if left <= 0:
                row["notes"] = f"skipped (budget of {args.budget_s:g} s spent)"
                rows.append(row)
                continue
            try:
                res = host_measure(variant, host_spec(structure), runs, args, device,
                                   left / (len(cells) - i))
            except Exception as e:
                failed = True
                row["notes"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(row)
                continue
            finally:
                gc.collect()
            row.update({k: v for k, v in res.items() if k != "notes"})
            row["notes"] = "; ".join(res["notes"]) or None
            row["load_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            rows.append(row)
            print(f"structure {structure} R={runs} {HOST_LABELS[variant]}: {row['ops']} ops/step,"
                  f" {row['host_ms']:.3f} host ms/run-step", flush=True)

    columns = [("structure", "structure", ""), ("runs", "R", ""), ("variant", "variant", ""),
               ("ops", "ops/step", ""), ("copies", "of which copy_", ""),
               ("ops_run", "ops/run-step", ".1f"),
               ("host_ms", "host ms/run-step", ".3f")]
    if cuda:
        columns.append(("dev_ms", "device ms/run-step", ".3f"))
    else:
        columns.append(("replay_ms", "stand-in replay ms/run-step", ".3f"))
    columns += [("steps", "steps", ""), ("load_1m", "load 1m", ".2f"), ("notes", "notes", "")]
    table = markdown_table(rows, columns)
    graphed_host = ("the step call's wall time before synchronising, over R" if cuda else
                    "the step's wall time minus the time inside the stand-in's replays, over R")
    threads = f"{env['torch_threads']} torch thread{'' if env['torch_threads'] == 1 else 's'}"
    md = "\n".join([
        "# Run arrays: host work per training step (--host)", "",
        f"{env['date']} on {env['device_name']} ({env['device']}), torch {env['torch']}, "
        f"{threads}, load average {fmt(env['load_average_1m'], '.2f')} at start; each "
        f"structure's layer layout at C_in=4, batch {args.batch} of 32x32 images per run, fp32, "
        f"optimizers {', '.join(PAPER_OPTIMIZERS)} cycling over the runs; array path "
        f"{args.array_path}; graphed rows "
        + ("through CUDA graphs." if cuda else "through tests/graph_standin.py (the CPU "
           "stand-in for CUDA graphs)."), "",
        table, "",
        "one run eager / graphed: R solo fastres.run.steps.Steps (graphs=False / True) stepped one "
        "after the other; array eager / graphed: one fastres.run.array_steps.ArraySteps over "
        "ArrayResNet "
        "and RunViews (graphed=False / True). Each variant warms up "
        f"{args.host_warmup} steps (Steps warms {args.warm_steps} and captures on the next), "
        "then:",
        "- ops/step: aten ops dispatched during one training step of all R runs "
        "(forward + backward + optimizer update, at the dispatcher: every op, views and copies "
        "included, counted by a TorchDispatchMode; not the profiler's top-level ops)"
        + ("; a CUDA graph's replay dispatches none" if cuda else
           "; the ops the stand-in's replay re-runs are its device work and are not counted")
        + "; of which copy_: those that are aten.copy_ (a graphed step's host work is its "
        "batch copies into the captured inputs, x and y per solo run, R + 1 per array, and "
        "one replay per graph); ops/run-step: ops/step over R;",
        f"- host ms/run-step: median over the timed steps of {graphed_host}"
        + (";\n- device ms/run-step: CUDA events around the step, over R." if cuda else
           ";\n- stand-in replay ms/run-step: median over the timed steps of the time inside "
           "the stand-in's replays (the CPU doing the \"device\" work), over R."), ""])
    print(md)
    write_outputs({"environment": env, "args": vars(args), "rows": rows,
                   "elapsed_s": time.perf_counter() - start}, args.json, args.md, md)
    first = structures[0]
    summary = {r["runs"]: (r.get("ops"), r.get("copies")) for r in rows
               if r["structure"] == first and r["variant"] == HOST_LABELS["array_graphed"]}
    print(f"array graphed ops/step (structure {first}): "
          + ", ".join(f"R={r}: {fmt(n)} ({fmt(c)} copy_)" for r, (n, c) in summary.items()))
    return 1 if failed else 0


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structures", default="1", help="structure numbers, e.g. 1,6")
    ap.add_argument("--sizes", default=None, help="array sizes R (default 1,2,5,10; smoke 1,2,4)")
    ap.add_argument("--batch", type=int, default=None,
                    help="images per run per step (default 128, the protocol's; smoke 16)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default 10; smoke 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2; smoke 1)")
    ap.add_argument("--budget-s", type=float, default=600.0,
                    help="the whole run's time bound in seconds (cells past it are skipped)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch's CPU threads (default: torch's own choice; smoke on the CPU: "
                    "1, since a second thread on a small busy CPU makes step times swing 100x)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true",
                    help="fastres.study.protocol.SMOKE_SPEC, batch 16, R = 1, 2, 4, 3 steps")
    ap.add_argument("--host", action="store_true",
                    help="host work instead: aten ops and host ms per run-step of one run "
                    "eager/graphed and an array eager/graphed, each structure at C_in=4, batch 2 "
                    "(graphed on the CPU through tests/graph_standin.py); --smoke: R = 1, 2")
    ap.add_argument("--array-path", choices=("grouped", "per-run"), default="grouped",
                    help="--host: the arrays' path (default grouped, a GPU's default)")
    ap.add_argument("--count-steps", type=int, default=2,
                    help="--host: steps whose ops are counted (each must count the same)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    if args.host:
        args.sizes = args.sizes or ("1,2" if args.smoke else "1,2,5,10")
        args.batch = args.batch or 2
        args.steps = args.steps or (2 if args.smoke else 20)
        args.warm_steps = WARM_STEPS
        # Steps warms WARM_STEPS times, captures (and replays) on the next call; one more
        # replay, and every graph is warm.
        args.host_warmup = WARM_STEPS + 2 if args.warmup is None else args.warmup
        return host_main(args)
    args.sizes = args.sizes or ("1,2,4" if args.smoke else "1,2,5,10")
    args.batch = args.batch or (16 if args.smoke else 128)
    args.steps = args.steps or (3 if args.smoke else 10)
    args.warmup = (1 if args.smoke else 2) if args.warmup is None else args.warmup
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.smoke:
        structures: list[tuple[str | int, ResNetSpec]] = [("smoke", ResNetSpec.parse(SMOKE_SPEC))]
    else:
        structures = [(int(s), STRUCTURES[int(s)]) for s in args.structures.split(",")]
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    if args.smoke and not cuda and args.threads is None:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cudnn.benchmark = True  # as fastres.run.train: fixed shapes
    env = environment(device)

    start = time.perf_counter()
    # One untimed step of each variant first: one-time costs (CUDA context, cuBLAS workspace,
    # oneDNN's first primitives, lazy imports) then land in no cell's time or memory.
    for variant in VARIANTS:
        run_variant(variant, structures[0][1], 1,
                    argparse.Namespace(**{**vars(args), "warmup": 0, "steps": 1}), device, 0.0)
    cells = [(s, spec, r) for s, spec in structures for r in sizes]
    todo = len(cells) * len(VARIANTS)
    rows: list[dict] = []
    failed = False
    for structure, spec, runs in cells:
        row: dict = {"structure": structure, "runs": runs}
        notes: list[str] = []
        for variant in VARIANTS:
            left = args.budget_s - (time.perf_counter() - start)
            if left <= 0:
                notes.append(f"{LABELS[variant]}: skipped (budget of {args.budget_s:g} s spent)")
                todo -= 1
                continue
            res = run_variant(variant, spec, runs, args, device, left / todo)
            todo -= 1
            notes += [f"{LABELS[variant]}: {n}" for n in res.get("notes", [])]
            if "error" in res:
                failed = True
                notes.append(f"{LABELS[variant]} failed: {res['error']}")
                continue
            for k in ("ms", "rps", "mem_mb", "steps", "warmup_s", "layout"):
                row[f"{variant}_{k}"] = res[k]
        for v in ("grouped", "per_run"):
            if row.get("solo_ms") and row.get(f"{v}_ms"):
                row[f"{v}_speedup"] = row["solo_ms"] / row[f"{v}_ms"]
        steps = [row[f"{v}_steps"] for v in VARIANTS if f"{v}_steps" in row]
        row["steps"] = min(steps) if steps else None
        layouts = sorted({row[f"{v}_layout"] for v in VARIANTS if f"{v}_layout" in row})
        row["layout"] = "/".join(layouts) or None
        row["load_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        row["notes"] = "; ".join(notes) or None
        rows.append(row)
        print(f"structure {structure} R={runs}: one at a time {fmt(row.get('solo_ms'), '.1f')} ms,"
              f" grouped {fmt(row.get('grouped_ms'), '.1f')} ms, per-run "
              f"{fmt(row.get('per_run_ms'), '.1f')} ms", flush=True)

    mem = "peak GPU MB" if cuda else "peak RSS growth MB"
    table = markdown_table(rows, [
        ("structure", "structure", ""), ("runs", "R", ""),
        ("solo_ms", "one at a time ms", ".1f"), ("grouped_ms", "array grouped ms", ".1f"),
        ("per_run_ms", "array per-run ms", ".1f"), ("grouped_speedup", "grouped speedup", ".2f"),
        ("per_run_speedup", "per-run speedup", ".2f"),
        ("solo_rps", "one at a time runs-steps/s", ".1f"),
        ("grouped_rps", "grouped runs-steps/s", ".1f"),
        ("per_run_rps", "per-run runs-steps/s", ".1f"),
        ("solo_mem_mb", f"one at a time {mem}", ".0f"),
        ("grouped_mem_mb", f"grouped {mem}", ".0f"),
        ("per_run_mem_mb", f"per-run {mem}", ".0f"),
        ("layout", "layout", ""), ("steps", "steps", ""), ("load_1m", "load 1m", ".2f"),
        ("notes", "notes", "")])
    first = structures[0][0]
    speedups = {r["runs"]: r.get("grouped_speedup") for r in rows if r["structure"] == first}
    last = "array speedup (grouped vs one at a time): " + ", ".join(
        f"R={r}: {'-' if x is None else f'{x:.2f}x'}" for r, x in speedups.items())
    how = ("bf16 autocast, channels-last, cuDNN benchmark" if cuda
           else "fp32, NCHW (fastres's CPU path; the grouped path is oneDNN grouped convolution)")
    threads = f"{env['torch_threads']} torch thread{'' if env['torch_threads'] == 1 else 's'}"
    md = "\n".join([
        f"# Run arrays: one training step of R runs, batch {args.batch} per run", "",
        f"{env['date']} on {env['device_name']} ({env['device']}), torch {env['torch']}, "
        f"{threads}, load average {fmt(env['load_average_1m'], '.2f')} at start; {how}; "
        f"optimizers {', '.join(PAPER_OPTIMIZERS)} cycling over the runs; "
        f"median of up to {args.steps} steps after {args.warmup} warm-up", "",
        table, "",
        f"ms: all R runs' step (one at a time: R solo steps in sequence); speedup: one at a time "
        f"ms over the array's; runs-steps/s: R over the step time; {mem}: "
        + ("torch.cuda.max_memory_allocated during the variant, its batches included."
           if cuda else "the resident set's peak over the variant minus the set at its start "
           "(freed memory the allocator keeps shows as no growth later)."), ""])
    print(md)
    write_outputs({"environment": env, "args": vars(args), "rows": rows,
                   "speedups_first_structure": {str(k): v for k, v in speedups.items()},
                   "elapsed_s": time.perf_counter() - start}, args.json, args.md, md)
    print(last)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
