"""Measure what `--kernels auto` should pick on this GPU and write it into the kernel table.

    python benchmarks/kernel_table.py --equivalence-passed          # GPU: structures 1-9
    python benchmarks/kernel_table.py --structures 1,6 --out /tmp/kernel_table.json
    python benchmarks/kernel_table.py --smoke --out /tmp/x.json    # CPU dry run (tests)

For each structure it times one training step in the configuration `--kernels auto` hands it
to: an engine from fastres.run.workbench, as fastres.run.train builds one (on a GPU: bf16 autocast,
channels-last, torch.compile, the whole step captured in a CUDA graph with fused SGD inside and
the rate in a device tensor), stepped through fastres.run.steps.Steps.train, so what is timed is a
graph replay, where launch cost, the largest difference between eager and fused kernels, is
gone. Table 2's SGD with coupled weight decay, batch 128, one fixed random batch on the device
in the dtype and layout the loaders deliver; first with kernels="eager", then "triton". Warm-up
steps first (compilation, cuDNN's search, the graph's warm-up and capture: at least
Steps.warm + 1 on a graphed engine), then the median of --steps steps timed with CUDA events.
Each model gets a fresh torch.compile (torch._dynamo.reset()), so no recompile limit or cache
carries over from the one before.

It writes the entry for this device (torch.cuda.get_device_name) into the table at --out,
default the package's kernels/kernel_table.json, replacing any earlier entry for the same
device and keeping the others (an --out that does not exist yet starts from the package's
table, so the file that comes back can be committed over it as it is). The entry says
equivalence_tests_passed: true only with --equivalence-passed, which benchmarks/device_check.sh
gives when tests/test_kernels_*.py passed natively on this GPU in the same call; without it,
fastres.kernels.choice never picks triton on this device. The table is rewritten after every
structure, so a run cut short keeps what it measured.

No GPU: it refuses (exit 2), except with --smoke, which times fastres.study.protocol.SMOKE_SPEC on
the CPU with the eager model only (the CPU engine: fp32, NCHW, uncompiled, ungraphed) and writes an
entry for the device "cpu-smoke" into --out (never into the package's table): the figures mean
nothing, only that the script runs and the table it writes is well formed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (also puts the checkout on sys.path)

from fastres.kernels.choice import (  # noqa: E402
    TABLE_PATH,
    KernelTableError,
    check_table,
    load_table,
)
from fastres.run.config import TrainConfig  # noqa: E402
from fastres.run.steps import AMP_DTYPES  # noqa: E402
from fastres.run.workbench import Workbench  # noqa: E402
from fastres.study.protocol import SMOKE_SPEC  # noqa: E402
from fastres.study.structures import STRUCTURES, ResNetSpec, SpecError  # noqa: E402

SMOKE_DEVICE = "cpu-smoke"
# The compute settings a timed step records (what fastres.run.train resolves on the device).
COMPUTE = ("precision", "channels_last", "compile", "graphs")
COMMENT = ("Per-device training-step times, eager vs fastres's Triton kernels, read by "
           "`--kernels auto` (kernels/choice.py). Written on a GPU by "
           "benchmarks/kernel_table.py, which benchmarks/device_check.sh runs after the native "
           "kernel equivalence tests; commit the 5-kernel_table.json it returns under $OUT "
           "by copying it here.")


def parse_structures(text: str) -> list[int]:
    """"1,6,9" or "1-9" (or both) as Table 1 numbers."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            nums = range(int(lo), int(hi) + 1) if sep else [int(part)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--structures takes numbers like 1,6 or 1-9, "
                                             f"got {text!r}") from None
        for n in nums:
            if n not in STRUCTURES:
                raise argparse.ArgumentTypeError(f"structure {n} is not in Table 1 (1-9)")
            out.append(n)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structures", type=parse_structures, default=None,
                    help="Table 1 structures to time, e.g. 1,6 or 1-9 (default: 1-9, or none "
                         "when --spec is given)")
    ap.add_argument("--spec", action="append", default=[],
                    help="a custom structure to time too (repeatable); keyed by its spec string")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 128; smoke 16)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps per model first (default 10; smoke 1)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per model, the median is kept (default 30; smoke 3)")
    ap.add_argument("--out", default=None,
                    help=f"table to write the entry into (default: the package's {TABLE_PATH})")
    ap.add_argument("--equivalence-passed", action="store_true",
                    help="tests/test_kernels_*.py passed natively on this GPU (device_check.sh "
                         "says so); without it the entry is marked as not passed")
    ap.add_argument("--equivalence-summary", default=None,
                    help="pytest's summary line of that run, recorded beside the figures")
    ap.add_argument("--deadline", type=float, default=None,
                    help="skip (and say so) the structures that would start after this many "
                         "seconds")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU dry run: the tiny smoke structure, eager only, device 'cpu-smoke'; "
                         "needs --out")
    return ap


def refusal(args: argparse.Namespace) -> str | None:
    """Why this run must not go ahead (exit 2), or None."""
    if args.smoke:
        if not args.out:
            return ("--smoke needs --out PATH: its figures are a CPU dry run and never go into "
                    f"the package's {TABLE_PATH}")
        if Path(args.out).resolve() == TABLE_PATH.resolve():
            return f"--smoke never writes the package's {TABLE_PATH}; give another --out"
        return None
    if not torch.cuda.is_available():
        return ("it measures on a CUDA GPU and torch sees none here "
                "(torch.cuda.is_available() is False); --smoke --out PATH is the CPU dry run")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return ("TRITON_INTERPRET=1 is set: fastres's kernels would run only under the "
                "interpreter, not natively on the GPU; unset it")
    return None


def step_config(spec: ResNetSpec, kernels: str, device: torch.device, batch: int
                ) -> TrainConfig:
    """The run configuration whose step is timed: fastres.run.train's defaults on this device (on a
    GPU bf16, channels-last, compiled, graphed), SGD, the given kernels and batch size."""
    return TrainConfig(spec=spec, structure=None, optimizer="sgd", kernels=kernels,
                       device=str(device), batch_size=batch).resolved(log=lambda _m: None)


def time_step(spec: ResNetSpec, kernels: str, device: torch.device, batch: int, warmup: int,
              steps: int) -> dict:
    """{"step_ms": median ms of a training step, "warmup_s": the warm-up's seconds, "config":
    the compute settings it ran with}."""
    gpu = device.type == "cuda"
    if gpu:
        torch._dynamo.reset()  # this model's own compile: nothing cached from the one before
    cfg = step_config(spec, kernels, device, batch)
    engine, _warm = Workbench(device).engine(cfg, log=lambda _m: None)
    engine.start_run(cfg)
    runner = engine.steps
    if runner.graphs:  # the warm-ups and the capture happen before anything is timed
        warmup = max(warmup, runner.warm + 1)
    # The batch as the loaders deliver it: the run's dtype and memory layout.
    dtype = AMP_DTYPES[cfg.precision] or torch.float32
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, device=device, generator=gen).to(dtype).contiguous(
        memory_format=memory_format)
    labels = torch.randint(0, 10, (batch,), device=device, generator=gen)
    engine.model.train()
    runner.reset_sums()

    def step() -> None:
        runner.train(images, labels)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _common.sync(device)
    warmup_s = time.perf_counter() - t0
    times = (_common._time_cuda(step, steps) if gpu else _common._time_host(step, steps))
    loss_sum = runner.sums()[0]
    if not math.isfinite(loss_sum):  # a kernel that computes garbage must not win on speed
        raise FloatingPointError(f"loss sum is {loss_sum} after {warmup + steps} steps")
    return {"step_ms": statistics.median(times) * 1e3, "warmup_s": warmup_s,
            "config": {k: getattr(cfg, k) for k in COMPUTE}}


def base_table(out: Path, smoke: bool) -> dict:
    """What the entry is merged into: --out as it is, else (GPU) the package's table."""
    if out.exists():
        return load_table(out)
    if not smoke and TABLE_PATH.exists():
        return json.loads(json.dumps(load_table(TABLE_PATH)))  # a copy: the cache keeps its own
    return {"comment": COMMENT, "entries": []}


def write_table(table: dict, out: Path) -> None:
    check_table(table, out)  # never write what fastres.kernels.choice would refuse to read
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(table, indent=2) + "\n")
    os.replace(tmp, out)


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    why_not = refusal(args)
    if why_not:
        print(f"kernel_table.py: {why_not}", file=sys.stderr)
        return 2
    try:
        specs = [ResNetSpec.parse(s).validate() for s in args.spec]
    except SpecError as e:
        print(f"kernel_table.py: --spec: {e}", file=sys.stderr)
        return 2
    smoke = args.smoke
    jobs: list[tuple[str, ResNetSpec]]
    if smoke:
        jobs = [(SMOKE_SPEC, ResNetSpec.parse(SMOKE_SPEC))]
    else:
        numbers = args.structures if args.structures is not None else (
            [] if specs else list(STRUCTURES))
        jobs = [(str(n), STRUCTURES[n]) for n in numbers] + [(str(s), s) for s in specs]
    batch = args.batch or (16 if smoke else 128)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 10)
    steps = args.steps or (3 if smoke else 30)
    if batch < 1 or warmup < 0 or steps < 1:
        print("kernel_table.py: --batch and --steps must be at least 1, --warmup at least 0",
              file=sys.stderr)
        return 2

    out = Path(args.out) if args.out else TABLE_PATH
    try:
        table = base_table(out, smoke)
    except KernelTableError as e:
        print(f"kernel_table.py: {e}; not overwriting it", file=sys.stderr)
        return 2
    device = torch.device("cpu") if smoke else torch.device("cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as fastres.run.train sets it on a GPU
    env = _common.environment(device)
    defaults = step_config(ResNetSpec.parse(SMOKE_SPEC), "eager", device, batch)
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    name = SMOKE_DEVICE if smoke else env["device_name"]
    entry = {
        "device_name": name,
        "date": env["date"],
        "torch": env["torch"],
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": env["python"],
        # The device machines get a copy of the tree without .git: device_check.sh passes the
        # commit the caller named (FASTRES_GIT_COMMIT), which the committed table must record.
        "git_commit": env["git_commit"] or os.environ.get("FASTRES_GIT_COMMIT") or None,
        "command": env["command"],
        "equivalence_tests_passed": bool(args.equivalence_passed) and not smoke,
        "equivalence_tests": args.equivalence_summary,
        # What fastres.run.train runs on this device; each row's own "config" says what it ran.
        "settings": {"batch": batch, "warmup_steps": warmup, "timed_steps": steps,
                     "statistic": "median", "optimizer": "sgd",
                     "step": ("fastres.run.workbench engine, Steps.train "
                              "(a graph replay when graphed)"),
                     **{k: getattr(defaults, k) for k in COMPUTE}},
        "structures": {},
    }
    table["entries"] = [e for e in table["entries"] if e.get("device_name") != name] + [entry]
    print(f"# kernel table: {name}, {env['date']}, torch {env['torch']}, triton "
          f"{triton_version}; equivalence tests passed: {entry['equivalence_tests_passed']}; "
          f"-> {out}")
    print("| structure | eager ms/step | triton ms/step | auto picks |")
    print("|---|---|---|---|")
    start = time.monotonic()
    failed = False
    for key, spec in jobs:
        if args.deadline is not None and time.monotonic() - start > args.deadline:
            print(f"# skipped {key}: past --deadline {args.deadline:g} s")
            continue
        row: dict = {"spec": str(spec)}
        for kernels in ("eager",) if smoke else ("eager", "triton"):
            try:
                r = time_step(spec, kernels, device, batch, warmup, steps)
                row[f"{kernels}_step_ms"] = r["step_ms"]
                row[f"{kernels}_warmup_s"] = r["warmup_s"]
                row[f"{kernels}_config"] = r["config"]
            except Exception as e:  # recorded in the row; the other structures still run
                failed = True
                row[f"{kernels}_step_ms"] = None
                row[f"{kernels}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"[:300]
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if smoke:
            row["triton_step_ms"] = None
            row["triton_error"] = "not measured: --smoke times the eager model only"
        entry["structures"][key] = row
        write_table(table, out)
        e_ms, t_ms = row["eager_step_ms"], row["triton_step_ms"]
        pick = ("triton" if e_ms is not None and t_ms is not None and t_ms < e_ms
                and entry["equivalence_tests_passed"] else "eager")
        print(f"| {key} | {fmt_ms(e_ms)} | {fmt_ms(t_ms)} | {pick} |")
        for k in ("eager_error", "triton_error"):
            if k in row and not smoke:
                print(f"#   {key} {k}: {row[k]}")
    write_table(table, out)  # also when every structure was skipped: the entry says so
    print(f"# wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
