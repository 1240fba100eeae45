"""fastres against the paper's own loop on the same data: K epochs x S seeds, and per epoch the
mean and spread of train and test accuracy and loss of each, with their paired difference and
its uncertainty.

    python benchmarks/fidelity.py                   # this device's defaults (below)
    python benchmarks/fidelity.py --structure 1 --epochs 2 --seeds 0-9        # on a GPU
    python benchmarks/fidelity.py --smoke           # seconds: a check that it runs

The two sides:
- fastres: fastres.run.train.train() with the device's default settings (on the CPU: fp32, eager,
  FFCV stream; on a GPU: bf16, compiled, graphed, resident data);
- the paper's loop: benchmarks/epoch_time.paper_loop, the authors' script shape (its own model
  code, torchvision transforms on PIL images, a DataLoader with --workers workers, the stock
  optimizer, fp32).
Both read the same decoded images (the betons fastres reads are written from the arrays the
paper's loop reads) and the same fixed subsets.

Pairing: run s of each side seeds torch with s just before building its model, so the two start
from the same weights (tests/test_fidelity.py checks it); each loop then draws its own order,
crops and flips. The difference fastres - paper is taken seed by seed; its mean over the S
seeds, with standard error sd(difference) / sqrt(S), says whether the two loops differ by more
than what those draws alone give. (tests/test_fidelity.py shows that given the same draws the
two compute the same bits, step by step, on the CPU in fp32.)

Defaults: on the CPU the tiny fastres.study.protocol.SMOKE_SPEC on a fixed 10,000-image training
subset and 2,000 test images, 2 epochs x 8 seeds, one torch thread (about 15 minutes on 2
shared cores); on a GPU structure 1 on all the data, 2 epochs x 8 seeds. SGD with augmentation
on unless --optimizer and --augment say otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (also puts the checkout on sys.path)
import epoch_time  # noqa: E402

from fastres.study.protocol import OPTIMIZER_SETTINGS, SMOKE_SPEC, TMAX  # noqa: E402

METRICS = ("train_acc", "train_loss", "test_acc", "test_loss")
SIDES = ("fastres", "paper")

# Two-sided 95% quantiles of Student's t by degrees of freedom (S - 1); 1.96 past the table.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
        16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}


def t975(df: int) -> float:
    if df in T975:
        return T975[df]
    smaller = [d for d in T975 if d <= df]
    return T975[max(smaller)] if df <= 30 else 1.96  # a conservative (wider) interval


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-4' (or a mix)."""
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {text!r}")
    return list(dict.fromkeys(out))


def run_fastres(setup: epoch_time.Setup, args, seed: int) -> list[dict]:
    """fastres.run.train.train() for one seed: its per-epoch metrics. The seeds share one workbench,
    as a grid worker's cells do: data read once, the model compiled once on a GPU; each run
    starts from its seed's fresh weights (tests/test_fidelity.py's warm case)."""
    from fastres.run.cell import Cell, GridProtocol
    from fastres.run.train import train
    from fastres.run.workbench import for_device

    cell = Cell(setup.spec, args.structure if not args.spec else None, args.optimizer,
                args.augment, tmax=args.tmax, seed=seed)
    protocol = GridProtocol(epochs=args.epochs, train_subset=args.train_subset,
                            test_subset=args.test_subset)
    cfg = cell.config(protocol, {"device": str(setup.device), "data": None,
                                 "cache": args.cache}).resolved(log=lambda _m: None)
    result = train(cfg, data=setup.betons(), log=lambda _m: None,
                   bench=for_device(setup.device))
    if result.status != "completed":
        raise RuntimeError(f"fastres run of seed {seed}: {result.status}")
    return [{"epoch": m.epoch, "seconds": m.seconds, **{k: getattr(m, k) for k in METRICS}}
            for m in result.epochs]


def run_paper(setup: epoch_time.Setup, args, seed: int) -> list[dict]:
    """The paper's loop for one seed: its per-epoch metrics."""
    epochs: list[dict] = []
    tr, te = setup.indices()
    epoch_time.paper_loop(setup.spec, setup.arrays(), tr, te, args.workers, setup.device,
                          args.epochs, epochs.append, seed, optimizer=args.optimizer,
                          augment=args.augment, tmax=args.tmax)
    return epochs


def summarize(runs: dict[str, dict[int, list[dict]]], epochs: int) -> list[dict]:
    """Per epoch and metric: each side's mean and sample sd over the seeds both finished, and
    the paired difference fastres - paper (mean, standard error, 95% interval, t)."""
    seeds = sorted(set(runs["fastres"]) & set(runs["paper"]))
    rows = []
    for e in range(epochs):
        for metric in METRICS:
            vals = {side: [runs[side][s][e][metric] for s in seeds] for side in SIDES}
            d = [f - p for f, p in zip(vals["fastres"], vals["paper"], strict=True)]
            n = len(d)
            row = {"epoch": e + 1, "metric": metric, "n": n}
            for side in SIDES:
                row[f"{side}_mean"] = statistics.fmean(vals[side]) if n else None
                row[f"{side}_sd"] = statistics.stdev(vals[side]) if n > 1 else None
            row["diff"] = statistics.fmean(d) if n else None
            row["diff_se"] = statistics.stdev(d) / math.sqrt(n) if n > 1 else None
            if row["diff_se"] is not None:
                half = t975(n - 1) * row["diff_se"]
                row["ci_low"], row["ci_high"] = row["diff"] - half, row["diff"] + half
                row["t"] = row["diff"] / row["diff_se"] if row["diff_se"] > 0 else None
            rows.append(row)
    return rows


def _pm(mean: float | None, sd: float | None, pct: bool) -> str:
    if mean is None:
        return "-"
    k, f = (100, ".2f") if pct else (1, ".4f")
    return f"{k * mean:{f}}" + ("" if sd is None else f" ± {k * sd:{f}}")


def render(result: dict) -> str:
    env, s = result["environment"], result["settings"]
    lines = [f"# fidelity: {env['device_name']} ({env['device']}), {env['date']}", "",
             f"Command: `{env['command']}`  ",
             f"{result['spec_label']} ({result['spec']}), {s['optimizer']}, augment "
             f"{'on' if s['augment'] else 'off'}, T_max {s['tmax']}; {result['n_train']:,} "
             f"train / {result['n_test']:,} test images from {result['data']}; seeds "
             f"{', '.join(map(str, result['seeds_done']))} of {s['seeds']}; paper loop with "
             f"{s['workers']} DataLoader workers; torch {env['torch']}, git {env['git_commit']}, "
             f"{env['cpu_cores']} cores, load average {C.fmt(env.get('load_average_1m'), '.2f')}"
             " at start  ",
             "Accuracies in %, losses as they are; each side's mean ± sample sd over the seeds; "
             "difference = fastres - paper, paired by seed (same initial weights), ± its "
             "standard error, with a 95% t interval and t = difference / SE.", "",
             "| epoch | metric | fastres | paper | difference ± SE | 95% interval | t |",
             "|---|---|---|---|---|---|---|"]
    for r in result["summary"]:
        pct = r["metric"].endswith("acc")
        k, f = (100, ".2f") if pct else (1, ".4f")
        diff = _pm(r["diff"], r.get("diff_se"), pct)
        ci = (f"[{k * r['ci_low']:{f}}, {k * r['ci_high']:{f}}]" if "ci_low" in r else "-")
        ours = _pm(r["fastres_mean"], r["fastres_sd"], pct)
        theirs = _pm(r["paper_mean"], r["paper_sd"], pct)
        lines.append(f"| {r['epoch']} | {r['metric']} | {ours} | {theirs} | {diff} | {ci} | "
                     f"{C.fmt(r.get('t'), '.2f')} |")
    secs = {side: [e["seconds"] for runs in result["runs"][side].values() for e in runs]
            for side in SIDES}
    lines += ["", "Seconds per epoch (median): " + ", ".join(
        f"{side} {C.fmt(C.median(v), '.3g')}" for side, v in secs.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structure", type=int, default=None,
                    help="Table 1 structure (default: 1 on a GPU, SMOKE_SPEC on the CPU)")
    ap.add_argument("--spec", help="a custom spec instead")
    ap.add_argument("--optimizer", choices=tuple(OPTIMIZER_SETTINGS), default="sgd")
    ap.add_argument("--augment", type=lambda t: {"on": True, "off": False}[t], default=True,
                    metavar="on|off")
    ap.add_argument("--tmax", type=int, default=TMAX)
    ap.add_argument("--epochs", type=int, default=None, help="K (default 2)")
    ap.add_argument("--seeds", type=parse_seeds, default=None, help="e.g. 0-7 (the default)")
    ap.add_argument("--data", default=None, help="CIFAR-10 source (default: the JPEG copy)")
    ap.add_argument("--cache", default=None, help="cache for decoded arrays and betons")
    ap.add_argument("--device", default=None)
    ap.add_argument("--train-subset", type=int, default=None,
                    help="default 10000 on the CPU, all on a GPU")
    ap.add_argument("--test-subset", type=int, default=None,
                    help="default 2000 on the CPU, all on a GPU")
    ap.add_argument("--workers", type=int, default=2,
                    help="the paper loop's DataLoader workers (the script's 2)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch's intra-op threads for both sides (default: 1 on the CPU, where "
                    "the tiny spec gains little from more and 2-thread kernels stall on cores "
                    "shared with other work; torch's choice on a GPU)")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds: tiny spec, 256 train / 128 test images, 1 epoch x 2 seeds")
    ap.add_argument("--out", default=None, help="folder for fidelity_<tag>.json/.md")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)

    from fastres.study.structures import STRUCTURES, ResNetSpec

    device = C.pick_device(args.device)
    gpu = device.type == "cuda"
    if args.smoke:
        args.train_subset = args.train_subset or 256
        args.test_subset = args.test_subset or 128
        args.epochs = args.epochs or 1
        args.seeds = args.seeds or [0, 1]
    if not gpu:
        args.train_subset = args.train_subset or 10_000
        args.test_subset = args.test_subset or 2_000
        args.threads = args.threads or 1
    args.epochs = args.epochs or 2
    args.seeds = args.seeds or list(range(8))
    if args.threads:
        # fastres's FFCV loader then runs as many workers and keeps torch at this count too.
        torch.set_num_threads(args.threads)
    args.data = args.data or C.default_data()
    if args.data is None:
        ap.error("no CIFAR-10 source: pass --data or set FASTRES_DATA")
    if args.spec or (args.structure is None and (args.smoke or not gpu)):
        label, spec = ("custom" if args.spec else "smoke"), \
            ResNetSpec.parse(args.spec or SMOKE_SPEC).validate()
    else:
        args.structure = args.structure or 1
        label, spec = f"structure {args.structure}", STRUCTURES[args.structure]
    if gpu:
        torch.backends.cudnn.benchmark = True  # the paper's script family sets it

    setup = epoch_time.Setup(label, spec, device, args.data, args.cache, args.train_subset,
                             args.test_subset, warmup=0, epochs=args.epochs, budget_s=None)
    env = C.environment(device)
    tr, te = setup.indices()
    arrays = setup.arrays()
    n_train = len(tr) if tr is not None else len(arrays["train"][0])
    n_test = len(te) if te is not None else len(arrays["test"][0])
    tag = ("smoke-" if args.smoke else "") + device.type
    json_path = args.json or (os.path.join(args.out, f"fidelity_{tag}.json") if args.out
                              else None)
    md_path = args.md or (os.path.join(args.out, f"fidelity_{tag}.md") if args.out else None)
    result: dict = {"environment": env, "spec_label": label, "spec": str(spec),
                    "data": args.data, "n_train": n_train, "n_test": n_test,
                    "settings": {k: v for k, v in vars(args).items()},
                    "runs": {side: {} for side in SIDES}, "seeds_done": [], "summary": []}
    print(f"[fidelity] {env['device_name']}: {label} ({spec}), {args.optimizer}, augment "
          f"{'on' if args.augment else 'off'}, {args.epochs} epochs x seeds {args.seeds}, "
          f"{n_train} train / {n_test} test images", flush=True)
    t0 = time.perf_counter()
    for seed in args.seeds:
        # The two sides alternate seed by seed, so load on a shared machine falls on both.
        for side, run in (("fastres", run_fastres), ("paper", run_paper)):
            ts = time.perf_counter()
            result["runs"][side][seed] = run(setup, args, seed)
            last = result["runs"][side][seed][-1]
            print(f"[fidelity] seed {seed} {side}: epoch {last['epoch']} train acc "
                  f"{100 * last['train_acc']:.2f}% loss {last['train_loss']:.4f}, test acc "
                  f"{100 * last['test_acc']:.2f}% loss {last['test_loss']:.4f} "
                  f"({time.perf_counter() - ts:.0f} s; {time.perf_counter() - t0:.0f} s in all)",
                  flush=True)
        result["seeds_done"].append(seed)
        result["summary"] = summarize(result["runs"], args.epochs)
        # Written after every seed, so a run stopped early keeps what it measured.
        C.write_outputs(result, json_path, md_path, render(result))
    md = render(result)
    C.write_outputs(result, json_path, md_path, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
