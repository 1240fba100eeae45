"""Epochs per hour of a grid slice, one run per GPU against several packed onto one.

    python benchmarks/grid_throughput.py                 # structure 1, sgd+nesterov x aug on/off
    python benchmarks/grid_throughput.py --packing 1,2,4
    python benchmarks/grid_throughput.py --smoke         # tiny spec, synthetic data, on the CPU

Each packing K runs the same slice with `python -m fastres.grid --workers K --runs-per-gpu K`
(K = 1: the plain in-process loop), in a fresh results folder, side by side in this one command.
Epochs per hour counts the whole grid command (start-up, data, Ray, compilation included) and,
separately, the training seconds the runs themselves recorded; start-up seconds per cell is the
difference over the cells (wall - recorded training) / cells. Small models leave a big GPU idle;
packing is what fills it.
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (also puts the checkout on sys.path)
    REPO,
    default_data,
    environment,
    markdown_table,
    write_outputs,
)

from fastres.protocol import SMOKE_SPEC  # noqa: E402


def run_slice(packing: int, args: argparse.Namespace, results: Path) -> dict:
    cmd = [sys.executable, "-m", "fastres.grid", "--results", str(results), "--quiet",
           "--optimizers", args.optimizers, "--augment", "on,off", "--epochs", str(args.epochs)]
    cmd += ["--spec", SMOKE_SPEC] if args.smoke else ["--structures", str(args.structure)]
    if args.data:
        cmd += ["--data", args.data]
    if args.cache:
        cmd += ["--cache", args.cache]
    if args.device:
        cmd += ["--device", args.device]
    if args.train_subset:
        cmd += ["--train-subset", str(args.train_subset)]
    if args.test_subset:
        cmd += ["--test-subset", str(args.test_subset)]
    if packing > 1:
        cmd += ["--workers", str(packing), "--runs-per-gpu", str(packing)]
    row: dict = {"packing": packing, "command": " ".join(cmd[1:])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        row["error"] = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["failed"]
        row["error"] = f"grid exited {proc.returncode}: {row['error'][0]}"
        return row
    conn = sqlite3.connect(results / "results.sqlite")
    try:
        runs, epochs, train_s = conn.execute(
            "SELECT COUNT(*), SUM(epochs_done), SUM(train_seconds) FROM runs").fetchone()
    finally:
        conn.close()
    # What each cell cost beyond its recorded epochs: process start, data, Ray, building,
    # compiling and capturing (the warm worker pays most of these once, not per cell).
    row.update(runs=runs, epochs=epochs, wall_s=wall, train_s=train_s,
               startup_s_per_cell=(wall - train_s) / runs, epochs_per_hour=3600 * epochs / wall)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structure", type=int, default=1)
    ap.add_argument("--optimizers", default="sgd,nesterov")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--packing", default="1,2,4", help="runs per GPU to compare")
    ap.add_argument("--data", default=None)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--test-subset", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny spec, synthetic data unless --data, sgd only, 2 epochs, "
                    "packing 1,2")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.epochs = min(args.epochs, 2)
        args.optimizers = "sgd" if args.optimizers == "sgd,nesterov" else args.optimizers
        args.packing = "1,2" if args.packing == "1,2,4" else args.packing
        args.data = args.data or "synthetic"
        args.train_subset = args.train_subset or 512
        args.test_subset = args.test_subset or 256
    args.data = args.data or default_data()
    packings = [int(p) for p in args.packing.split(",")]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in packings:
            rows.append(run_slice(k, args, Path(tmp) / f"pack{k}"))
            print(f"packing {k}: {rows[-1].get('epochs_per_hour', rows[-1].get('error'))}",
                  flush=True)
    base = rows[0].get("epochs_per_hour")
    for r in rows:
        if base and r.get("epochs_per_hour"):
            r["speedup"] = r["epochs_per_hour"] / base
    env = environment(device)
    slice_ = (f"{'smoke spec' if args.smoke else f'structure {args.structure}'}, "
              f"{args.optimizers} x augment on/off, {args.epochs} epochs")
    md = "\n".join([
        f"# Grid throughput: {slice_}", "",
        f"{env['date']} on {env['device_name']} ({env['device']}), torch {env['torch']}", "",
        markdown_table(rows, [("packing", "runs per GPU", ""), ("runs", "runs", ""),
                              ("epochs", "epochs", ""), ("wall_s", "wall s", ".1f"),
                              ("train_s", "train s (sum)", ".1f"),
                              ("startup_s_per_cell", "start-up s per cell", ".1f"),
                              ("epochs_per_hour", "epochs/hour", ".0f"),
                              ("speedup", "vs 1", ".2f"), ("error", "error", "")]), ""])
    print(md)
    write_outputs({"environment": env, "slice": slice_, "rows": rows}, args.json, args.md, md)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
