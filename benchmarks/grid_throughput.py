"""Epochs per hour of a grid slice: one run at a time, against several packed onto one GPU
(Ray processes) or trained together as run arrays (one fused model, fastres/run/train_array.py).

    python benchmarks/grid_throughput.py                 # structure 1, sgd+nesterov x aug on/off
    python benchmarks/grid_throughput.py --packing 1,2,4
    python benchmarks/grid_throughput.py --arrays 2,5,10 --structure 6   # a structure's 10 runs
    python benchmarks/grid_throughput.py --smoke         # tiny spec, synthetic data, on the CPU

With --arrays the slice is one structure's ten runs (five optimizers x augmentation on/off):
`--array off` (one at a time), then `--array N` for each N, side by side, each row with the peak
memory it took (device memory on a GPU, the grid process's peak RSS on the CPU).

Each packing K runs the same slice with `python -m fastres.grid --workers K --runs-per-gpu K`
(K = 1: the plain in-process loop), in a fresh results folder, side by side in this one command.
Epochs per hour counts the whole grid command (start-up, data, Ray, compilation included) and,
separately, the training seconds the runs themselves recorded; start-up seconds per cell is the
difference over the cells (wall - recorded training) / cells. Small models leave a big GPU idle;
packing is what fills it.
"""

from __future__ import annotations

import argparse
import json
import os
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

from fastres.study.protocol import SMOKE_SPEC  # noqa: E402


def run_slice(packing: int, args: argparse.Namespace, results: Path, array: int = 1) -> dict:
    cmd = [sys.executable, "-m", "fastres.grid", "--results", str(results), "--quiet",
           "--optimizers", args.optimizers, "--augment", "on,off", "--epochs", str(args.epochs)]
    cmd += ["--spec", SMOKE_SPEC] if args.smoke else ["--structures", str(args.structure)]
    if args.data:
        cmd += ["--data", args.data]
    if args.cache:
        cmd += ["--cache", args.cache]
    if args.device:
        cmd += ["--device", args.device]
    if args.placement:
        cmd += ["--placement", args.placement]
    if args.train_subset:
        cmd += ["--train-subset", str(args.train_subset)]
    if args.test_subset:
        cmd += ["--test-subset", str(args.test_subset)]
    if packing > 1:
        cmd += ["--workers", str(packing), "--runs-per-gpu", str(packing)]
    cmd += ["--array", "off" if array == 1 else str(array)]
    row: dict = {"packing": packing, "array": array,
                 "mode": f"arrays of {array}" if array > 1 else
                 (f"{packing} per GPU" if packing > 1 else "one at a time"),
                 "command": " ".join(cmd[1:])}
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            # wait4: this grid process's own peak RSS (KiB on Linux), not the largest so far.
            _pid, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            raise
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        last = text.strip().splitlines()[-1:] or ["failed"]
        row["error"] = f"grid exited {proc.returncode}: {last[0]}"
        return row
    conn = sqlite3.connect(results / "results.sqlite")
    try:
        runs, epochs, train_s = conn.execute(
            "SELECT COUNT(*), SUM(epochs_done), SUM(train_seconds) FROM runs").fetchone()
        envs = [json.loads(e or "{}") for (e,) in conn.execute("SELECT environment FROM runs")]
    finally:
        conn.close()
    device_peaks = [e.get("peak_device_bytes") for e in envs if e.get("peak_device_bytes")]
    row["peak_mib"] = (max(device_peaks) if device_peaks else usage.ru_maxrss * 1024) / 2**20
    row["peak_of"] = "device" if device_peaks else "process RSS"
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
    ap.add_argument("--arrays", default=None, help="array sizes to compare with one run at a "
                    "time, e.g. 2,5,10 (the slice becomes the structure's ten runs)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--placement", choices=("auto", "resident", "stream"), default=None,
                    help="the grid's --placement for every row (arrays use resident data "
                    "where it fits; on the CPU one at a time streams by default)")
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
    arrays = [int(a) for a in args.arrays.split(",")] if args.arrays else []
    if arrays:  # a structure's row of the paper: five optimizers x augmentation on/off
        args.optimizers, packings = "sgd,nesterov,adam,adadelta,adagrad", [1]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in packings:
            rows.append(run_slice(k, args, Path(tmp) / f"pack{k}"))
            print(f"{rows[-1]['mode']}: {rows[-1].get('epochs_per_hour', rows[-1].get('error'))}",
                  flush=True)
        for n in arrays:
            rows.append(run_slice(1, args, Path(tmp) / f"array{n}", array=n))
            print(f"{rows[-1]['mode']}: {rows[-1].get('epochs_per_hour', rows[-1].get('error'))}",
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
        markdown_table(rows, [("mode", "runs trained", ""), ("runs", "runs", ""),
                              ("epochs", "epochs", ""), ("wall_s", "wall s", ".1f"),
                              ("train_s", "train s (sum)", ".1f"),
                              ("startup_s_per_cell", "start-up s per cell", ".1f"),
                              ("epochs_per_hour", "epochs/hour", ".0f"),
                              ("speedup", "vs one at a time", ".2f"),
                              ("peak_mib", "peak MiB", ".0f"), ("peak_of", "peak of", ""),
                              ("error", "error", "")]), ""])
    print(md)
    write_outputs({"environment": env, "slice": slice_, "rows": rows}, args.json, args.md, md)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
