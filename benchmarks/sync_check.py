"""No unplanned host sync inside a default epoch: two epochs of a Table 1 structure through
fastres.run.train.train() with every default (resident data, bf16, channels-last, compiled, CUDA
graphs), the second under torch.cuda.set_sync_debug_mode("error").

    python benchmarks/sync_check.py                      # structure 1, 2 epochs, on CUDA
    python benchmarks/sync_check.py --json /tmp/sync.json
    python benchmarks/sync_check.py --smoke --data DIR   # CPU dry run (no sync check there)

Epoch 1 is the warm-up: compilation, cuDNN's search and the graph captures may synchronise as
they like. From the end of epoch 1 (the run's on_epoch callback) every synchronising CUDA call
raises, so epoch 2 fails at the first host read, blocking copy or stream synchronisation it
makes, with the traceback naming the line. The epoch's one planned read (Steps.sums, the
metrics) lifts the mode around itself. Run by benchmarks/device_check.sh (stage 2).

The last line is `sync check: PASS|FAIL|SMOKE ...` with the seconds of each epoch; exit 0 on
PASS (and SMOKE), 1 on FAIL, 2 where it cannot run (no CUDA without --smoke, bad flags).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402,F401  (puts the checkout on sys.path)

from fastres.run.config import TrainConfig  # noqa: E402
from fastres.run.records import EpochMetrics  # noqa: E402
from fastres.study.data import DataError, DataUnavailable  # noqa: E402
from fastres.study.protocol import SMOKE_SPEC  # noqa: E402
from fastres.study.structures import STRUCTURES, ResNetSpec  # noqa: E402

# torch's words for a call that set_sync_debug_mode("error") refused.
SYNC_ERROR = "synchronizing CUDA operation"
NEEDS_CUDA = ("sync check: needs CUDA (torch.cuda.is_available() is False here); it checks "
              "that a default epoch on a GPU makes no unplanned host sync. --smoke is the CPU "
              "dry run.")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structure", type=int, default=1, choices=sorted(STRUCTURES))
    ap.add_argument("--epochs", type=int, default=2,
                    help="epochs in all; the sync check is on from the end of the first")
    ap.add_argument("--data", default=None, help="CIFAR-10 source (default: $FASTRES_DATA, ...)")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--smoke", action="store_true",
                    help="CPU dry run: the smoke spec on 256 train / 128 test images, no sync "
                         "check (CUDA has the only sync debug mode)")
    ap.add_argument("--json", default=None, help="write the outcome here as JSON")
    return ap


def config(args: argparse.Namespace) -> TrainConfig:
    """The run: the trainer's defaults but for the epoch count (and, smoke, a tiny run)."""
    if args.smoke:
        return TrainConfig(spec=ResNetSpec.parse(SMOKE_SPEC), structure=None, epochs=args.epochs,
                           device="cpu", train_subset=256, test_subset=128, data=args.data,
                           cache=args.cache)
    return TrainConfig(spec=STRUCTURES[args.structure], structure=args.structure,
                       epochs=args.epochs, device="cuda", data=args.data, cache=args.cache)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.epochs < 2:
        print("sync check: --epochs must be at least 2 (the first is the warm-up)",
              file=sys.stderr)
        return 2
    if not args.smoke and not torch.cuda.is_available():
        print(NEEDS_CUDA, file=sys.stderr)
        return 2
    gpu = not args.smoke
    cfg = config(args)
    epochs: list[EpochMetrics] = []

    def on_epoch(m: EpochMetrics) -> None:
        epochs.append(m)
        if gpu:
            # On from the end of the warm-up epoch, off after the last: what the trainer does
            # after its loop (results, environment) is not an epoch.
            torch.cuda.set_sync_debug_mode("error" if m.epoch < cfg.epochs else "default")

    outcome: dict = {"structure": None if args.smoke else args.structure, "spec": str(cfg.spec),
                     "epochs_asked": cfg.epochs, "device": cfg.device,
                     "checked_from_epoch": 2 if gpu else None}
    t0 = time.perf_counter()
    try:
        result = train_run(cfg, on_epoch)
        if result.status != "completed":
            status, detail = "FAIL", f"the run {result.status} at epoch {result.diverged_at}"
        elif gpu:
            status, detail = "PASS", f"no unplanned host sync in epochs 2-{cfg.epochs}"
        else:
            status, detail = "SMOKE", "ran"
    except (DataUnavailable, DataError) as e:
        print(f"sync check: no data: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if gpu:
            torch.cuda.set_sync_debug_mode("default")
        traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        status = "FAIL"
        detail = (f"unplanned host sync in epoch {len(epochs) + 1}: {first}"
                  if SYNC_ERROR in str(e) else f"{type(e).__name__}: {first}")
    outcome.update(status=status, detail=detail, wall_s=round(time.perf_counter() - t0, 3),
                   epoch_seconds=[round(m.seconds, 4) for m in epochs],
                   test_acc=[m.test_acc for m in epochs])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(outcome, indent=2) + "\n")
    secs = ", ".join(f"epoch {m.epoch} {m.seconds:.2f} s" for m in epochs) or "no epoch ended"
    where = "" if gpu else " (CPU dry run: no sync debug mode off CUDA)"
    print(f"sync check: {status} {cfg.spec} on {cfg.device}: {secs}; {detail}{where}",
          flush=True)
    return 0 if status in ("PASS", "SMOKE") else 1


def train_run(cfg: TrainConfig, on_epoch):
    """fastres.run.train.train with the callback; imported here so --help and the no-CUDA refusal
    need neither FFCV nor the training stack."""
    from fastres.run.train import train

    return train(cfg, on_epoch=on_epoch)


if __name__ == "__main__":
    sys.exit(main())
