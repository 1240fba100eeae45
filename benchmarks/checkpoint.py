"""Training-thread time spent on checkpointing per epoch: the old scheme (the full state written
synchronously every epoch) against the new one (fastres.run.checkpoints.StateSaver: a host copy on
a time cadence, written by a background thread; best weights kept every epoch).

    python benchmarks/checkpoint.py                      # structures 1, 9 x sgd, adam; ~9 min
    python benchmarks/checkpoint.py --structures 1 --optimizers adam --checkpoint-every 10
    python benchmarks/checkpoint.py --smoke              # tiny spec, short epochs, seconds

An epoch is stood in for by time.sleep(--epoch-seconds): like a GPU-bound epoch it leaves the
CPU to the writer thread. The state is the trainer's (model, optimizer after one real step,
scheduler, RNG), built on the CPU. Old: save_checkpoint of it every epoch. New: every epoch
BestWeights.update (the worst case, every epoch a new best) and StateSaver.epoch_end, whose
cadence (--checkpoint-every, default 60 s) starts a save, written with save_checkpoint by the
writer thread. Enough epochs run that the cadence fires at least twice, so the per-epoch
figure carries its share of the saves. The final save of a run is shown apart (once a run).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table, write_outputs  # noqa: E402

from fastres.kernels import build  # noqa: E402
from fastres.run.checkpoints import BestWeights, StateSaver, save_checkpoint, to_bytes  # noqa: E402
from fastres.run.steps import make_optimizer, make_scheduler  # noqa: E402
from fastres.study.protocol import SMOKE_SPEC  # noqa: E402
from fastres.study.structures import STRUCTURES, ResNetSpec  # noqa: E402


class FileCheckpointer:
    """The file side of a run's Checkpointer: the state as epoch-NNNN.pt (the previous one
    removed, as the results store does) and best.pt beside it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.last: Path | None = None

    def load(self) -> None:
        return None

    def record(self, metrics: object) -> None:
        pass

    def save(self, epoch: int, state: bytes, best: bytes | None) -> None:
        path = self.folder / f"epoch-{epoch:04d}.pt"
        save_checkpoint(path, state)
        if best is not None:
            save_checkpoint(self.folder / "best.pt", best)
        if self.last is not None and self.last != path:
            self.last.unlink(missing_ok=True)
        self.last = path


def make_state(spec: ResNetSpec, optimizer: str) -> tuple[torch.nn.Module, Callable[[int], dict]]:
    """A model and the trainer's state function, with optimizer state from one real step."""
    torch.manual_seed(0)
    model = build(spec, device="cpu")
    opt = make_optimizer(optimizer, model.parameters())
    sched = make_scheduler(opt, 500)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    sched.step()
    gen = torch.Generator().manual_seed(1)

    def state(epoch: int) -> dict:
        return {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                "augment_rng": gen.get_state(), "loader_epoch": epoch}

    return model, state


def sleep_epoch(seconds: float, late: list[float]) -> None:
    """The stand-in epoch; `late` gets how long past its end the thread got going again
    (waiting for the GIL a writer holds shows here)."""
    t0 = time.perf_counter()
    time.sleep(seconds)
    late.append(time.perf_counter() - t0 - seconds)


def run_old(state: Callable[[int], dict], folder: Path, epochs: int,
            epoch_s: float) -> dict:
    folder.mkdir(parents=True)
    ck = FileCheckpointer(folder)
    times: list[float] = []
    late: list[float] = []
    for epoch in range(1, epochs + 1):
        sleep_epoch(epoch_s, late)
        t0 = time.perf_counter()
        ck.save(epoch, state(epoch), None)  # what the old trainer did at every epoch end
        times.append(time.perf_counter() - t0)
    return {"old_epochs": epochs, "old_ms": 1e3 * statistics.fmean(times),
            "old_max_ms": 1e3 * max(times), "old_late_ms": 1e3 * statistics.fmean(late)}


def run_new(model: torch.nn.Module, state: Callable[[int], dict], folder: Path, epochs: int,
            epoch_s: float, every_s: float) -> dict:
    folder.mkdir(parents=True)
    best = BestWeights()
    times: list[float] = []
    late: list[float] = []
    with StateSaver(FileCheckpointer(folder), every_s) as saver:
        epoch = 0
        for epoch in range(1, epochs + 1):
            sleep_epoch(epoch_s, late)
            t0 = time.perf_counter()
            best.update(epoch, model.state_dict())  # every epoch a new best: the worst case
            saver.epoch_end(epoch, lambda e=epoch: state(e), best)
            times.append(time.perf_counter() - t0)
        loop_saves, skipped = saver.saves, saver.skipped
        t0 = time.perf_counter()
        saver.final(epoch, lambda: state(epoch), best)
        final_s = time.perf_counter() - t0
    return {"new_epochs": epochs, "new_ms": 1e3 * statistics.fmean(times),
            "new_median_ms": 1e3 * statistics.median(times), "new_max_ms": 1e3 * max(times),
            "new_late_ms": 1e3 * statistics.fmean(late),
            "saves": loop_saves, "skipped": skipped, "final_ms": 1e3 * final_s,
            "write_s_per_save": saver.write_seconds / max(saver.saves, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epoch-seconds", type=float, default=0.35,
                    help="the stand-in epoch's length (an H200 epoch's target)")
    ap.add_argument("--checkpoint-every", type=float, default=60.0,
                    help="the new scheme's cadence in seconds (the trainer's default)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="new-scheme epochs per config (default: two cadence periods and a bit)")
    ap.add_argument("--old-epochs", type=int, default=20,
                    help="old-scheme epochs per config (every one costs the same)")
    ap.add_argument("--structures", default="1,9")
    ap.add_argument("--optimizers", default="sgd,adam")
    ap.add_argument("--dir", default=None,
                    help="where the temporary folder goes (default: the system's temp folder); "
                    "put it on the results disk to measure that disk")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny spec, 0.02 s epochs, 0.1 s cadence: seconds in all")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.epoch_seconds, args.checkpoint_every = 0.02, 0.1
        args.old_epochs = min(args.old_epochs, 5)
        # Five cadence periods: room for a slow fsync on a busy machine to delay a save.
        args.epochs = args.epochs or 25
    if args.epochs is None:
        # The cadence counts from the saver's start; 2% and 2 epochs spare for the time the
        # loop itself takes, so the second save lands inside the run.
        periods = 2 * args.checkpoint_every / args.epoch_seconds if args.epoch_seconds else 2
        args.epochs = max(2, math.ceil(1.02 * periods) + 2)
    if args.smoke:
        configs = [("smoke", ResNetSpec.parse(SMOKE_SPEC), o)
                   for o in args.optimizers.split(",")]
    else:
        configs = [(int(s), STRUCTURES[int(s)], o) for s in args.structures.split(",")
                   for o in args.optimizers.split(",")]

    # A plain SIGTERM would skip the clean-up of the temporary folder below; SystemExit runs it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fastres-ckpt-bench-", dir=args.dir) as tmp:
        for i, (structure, spec, optimizer) in enumerate(configs):
            model, state = make_state(spec, optimizer)
            row: dict = {"structure": structure, "optimizer": optimizer,
                         "state_mb": len(to_bytes(state(0))) / 1e6}
            row.update(run_old(state, Path(tmp) / f"old{i}", args.old_epochs,
                               args.epoch_seconds))
            row.update(run_new(model, state, Path(tmp) / f"new{i}", args.epochs,
                               args.epoch_seconds, args.checkpoint_every))
            # Other work on the machine inflates every figure: say how much there was.
            row["load_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            rows.append(row)
            print(f"structure {structure} {optimizer}: {row['state_mb']:.1f} MB, old "
                  f"{row['old_ms']:.1f} ms/epoch, new {row['new_ms']:.2f} ms/epoch "
                  f"({row['saves']} saves in {row['new_epochs']} epochs)", flush=True)
            if row["saves"] < 2:
                print(f"warning: structure {structure} {optimizer}: the cadence fired "
                      f"{row['saves']} time(s); raise --epochs for an honest figure",
                      flush=True)

    env = environment(torch.device("cpu"))
    table = markdown_table(rows, [
        ("structure", "structure", ""), ("optimizer", "optimizer", ""),
        ("state_mb", "state MB", ".1f"), ("old_ms", "old ms/epoch", ".1f"),
        ("new_ms", "new ms/epoch", ".2f"), ("saves", "saves made", ""),
        ("new_epochs", "epochs (new)", ""), ("new_median_ms", "new median ms", ".2f"),
        ("new_max_ms", "new max ms", ".1f"),
        ("final_ms", "final save ms", ".0f"), ("write_s_per_save", "writer s/save", ".2f"),
        ("old_late_ms", "old wake-up ms", ".2f"), ("new_late_ms", "new wake-up ms", ".2f"),
        ("load_1m", "load 1m", ".2f")])
    worst_old = max(r["old_ms"] for r in rows)
    worst_new = max(r["new_ms"] for r in rows)
    last = f"training-thread checkpoint ms/epoch: old {worst_old:.1f}, new {worst_new:.1f}"
    md = "\n".join([
        f"# Checkpointing: training-thread ms per {args.epoch_seconds} s epoch, cadence "
        f"{args.checkpoint_every} s", "",
        f"{env['date']} on {env['device_name']}, torch {env['torch']}", "", table, ""])
    print(md)
    write_outputs({"environment": env, "args": vars(args), "rows": rows,
                   "worst_old_ms": worst_old, "worst_new_ms": worst_new}, args.json, None, md)
    print(last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
