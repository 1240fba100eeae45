"""The paper's tables and figures from a results folder.

    python -m fastres.report --results runs                 # Tables 3 and 4 as Markdown
    python -m fastres.report --results runs --format csv    # or json, for machines
    python -m fastres.report --results runs --format html --out report.html   # one page
    python -m fastres.report --results runs --tensorboard tb  # TensorBoard event files

Table 3 analog: best test accuracy per structure x optimizer, augmentation on and off, with row
averages; Table 4 analog: the 1-based epoch of that best. Each cell shows ours, the paper's value
and the difference. Figures 5 to 8 (test loss against epoch) are written as PNG beside them.
A partial grid reports what it has and marks the rest. The results are only read (SQLite's
read-only mode), so a report works on a read-only copy; it writes nothing but the figures
(and --out, --tensorboard where asked).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from statistics import mean

from fastres.report.tables import FIELDS, fmt, row_average, table_blocks
from fastres.run.results import DONE, ResultsDB, ResultsError
from fastres.study.paper import OPTIMIZER_ORDER, TABLE3, TABLE4
from fastres.study.structures import STRUCTURES


def _row_name(r: dict) -> str:
    return str(r["structure"]) if r["structure"] else f"[{r['spec']}]"


def choose_protocol(runs: list[dict], wanted: str | None) -> tuple[str, list[dict], list[str]]:
    """Runs of one protocol (never mixed): the one asked for, else the one with most runs."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        groups[r["protocol_id"]].append(r)
    if not groups:
        raise ResultsError("the results folder holds no runs yet")
    if wanted is not None:
        if wanted not in groups:
            raise ResultsError(f"--protocol {wanted} not found; present: {', '.join(groups)}")
        chosen = wanted
    else:
        chosen = max(groups, key=lambda k: len(groups[k]))
    return chosen, groups[chosen], [k for k in groups if k != chosen]


def table_cells(runs: list[dict]) -> list[dict]:
    """One record per (tmax, augment, structure, optimizer) with normalisation on, seeds pooled."""
    pooled: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        if r["normalize"]:
            pooled[(r["tmax"], bool(r["augment"]), _row_name(r), r["optimizer"])].append(r)
    cells = []
    for (tmax, aug, row, opt), rs in sorted(pooled.items(), key=lambda kv: _sort_key(kv[0])):
        done = [r for r in rs if r["status"] in DONE and r["best_acc"] is not None]
        key = (int(row), opt, aug) if row.isdigit() else None
        paper_acc = TABLE3.get(key) if key and tmax == 200 else None
        paper_ep = TABLE4.get(key) if key and tmax == 200 else None
        ours_acc = mean(100 * r["best_acc"] for r in done) if done else None
        ours_ep = mean(r["best_epoch"] for r in done) if done else None
        pending = [r for r in rs if r not in done]
        cells.append({
            "tmax": tmax, "augment": aug, "structure": row, "optimizer": opt,
            "seeds": len(done), "of_seeds": len(rs),
            "status": "done" if not pending else ", ".join(
                f"{r['status']} {r['epochs_done']}/{r['epochs']}" for r in pending),
            "best_acc": ours_acc, "paper_acc": paper_acc,
            "acc_diff": None if ours_acc is None or paper_acc is None else ours_acc - paper_acc,
            "best_epoch": ours_ep, "paper_epoch": paper_ep,
            "epoch_diff": None if ours_ep is None or paper_ep is None else ours_ep - paper_ep,
        })
    return cells


def _sort_key(k: tuple) -> tuple:
    tmax, aug, row, opt = k
    order = OPTIMIZER_ORDER.index(opt) if opt in OPTIMIZER_ORDER else len(OPTIMIZER_ORDER)
    # The paper's T_max 200 first, then other schedules.
    return (tmax != 200, tmax, not aug, (0, int(row)) if row.isdigit() else (1, row), order, opt)


def _signed(v: float | None, digits: int) -> str:
    return "" if v is None else f", {v:+.{digits}f}"


def markdown(cells: list[dict], what: str) -> str:
    """Table 3 (what='acc') or Table 4 (what='epoch') analog, one block per (tmax, augment)."""
    ours, paper, diff, digits = FIELDS[what]
    out = []
    for block in table_blocks(cells, what):
        opts = block.opts
        out.append(f"### {block.title}\n")
        out.append("Each cell: ours (paper, ours - paper); — where there is no value.\n")
        header = ["structure", *opts] + (["average"] if what == "acc" else [])
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        for row, by_opt in block.rows.items():
            line = [row]
            for o in opts:
                c = by_opt.get(o)
                if c is None:
                    line.append("not in grid")
                elif c[ours] is None:
                    line.append(f"missing ({c['status']})"
                                + (f" (paper {fmt(c[paper], digits)})" if c[paper] else ""))
                else:
                    seeds = f" n={c['seeds']}" if c["of_seeds"] > 1 else ""
                    line.append(f"{fmt(c[ours], digits)} ({fmt(c[paper], digits)}"
                                f"{_signed(c[diff], digits)}){seeds}")
            if what == "acc":
                avg, theirs, partial = row_average(by_opt, len(opts))
                line.append(f"{fmt(avg, 2)}{'*' if partial else ''} ({fmt(theirs, 2)})")
            out.append("| " + " | ".join(line) + " |")
        if what == "acc" and any("*" in line for line in out[-len(block.rows):]):
            out.append("\n\\* average over the optimizers finished so far; the paper's value "
                       "beside it is its mean over the same optimizers.")
        out.append("")
    return "\n".join(out)


def write_figures(db: ResultsDB, runs: list[dict], folder: Path, structure: str | None
                  ) -> list[str]:
    """Figures 5-8 as PNG; returns a line per figure saying what was written or skipped."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    names = [_row_name(r) for r in runs]
    if structure is None:  # structure 1 where the grid has it, else its first structure
        structure = "1" if "1" in names else names[0]
    first_seed = min(r["seed"] for r in runs)
    mine = [r for r, n in zip(runs, names, strict=True)
            if n == str(structure) and r["seed"] == first_seed]

    def pick(**want) -> list[dict]:
        return [r for r in mine if all(r[k] == v for k, v in want.items())]

    figures = {
        "fig5_optimizers_augmented": (
            f"Structure {structure}: test loss, augmented data",
            [(r["optimizer"], r) for r in pick(augment=1, normalize=1, tmax=200)]),
        "fig6_optimizers_not_augmented": (
            f"Structure {structure}: test loss, non-augmented data",
            [(r["optimizer"], r) for r in pick(augment=0, normalize=1, tmax=200)]),
        "fig7_augment_normalize": (
            f"Structure {structure}, SGD: augmentation x normalisation",
            [(f"augment {'on' if r['augment'] else 'off'}, normalise "
              f"{'on' if r['normalize'] else 'off'}", r) for r in pick(optimizer="sgd", tmax=200)]),
        "fig8_tmax": (
            f"Structure {structure}, SGD: cosine T_max",
            [(f"T_max {r['tmax']}" if r["tmax"] else "no schedule", r)
             for r in pick(optimizer="sgd", augment=1, normalize=1)]),
    }
    notes = []
    for name, (title, curves) in figures.items():
        curves = [(lab, r, db.epochs(r["run_id"])) for lab, r in curves]
        curves = [(lab, r, eps) for lab, r, eps in curves if eps]
        if name == "fig7_augment_normalize" and len(curves) < 2:
            curves = []  # one curve is not a comparison
        if name == "fig8_tmax" and len({r["tmax"] for _, r, _ in curves}) < 2:
            curves = []
        if not curves:
            notes.append(f"{name}: skipped (no runs of it in these results)")
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, _r, eps in curves:
            ax.plot([e.epoch for e in eps], [e.test_loss for e in eps], label=label, lw=1.2)
        ax.set(title=title, xlabel="epoch", ylabel="test loss (log scale)", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        notes.append(f"{name}: {path} ({len(curves)} curves)")
    return notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastres.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="runs")
    ap.add_argument("--format", choices=("markdown", "csv", "json", "html"), default="markdown",
                    help="html: one self-contained page, figures embedded")
    ap.add_argument("--out", help="write the report to this file (default: standard output)")
    ap.add_argument("--tensorboard", metavar="DIR", help="only export every run's epochs and "
                    "hyper-parameters as TensorBoard event files into DIR (a second export "
                    "adds only what is new)")
    ap.add_argument("--protocol", help="report this protocol id (default: the one with most runs)")
    ap.add_argument("--figures", help="folder for the PNG figures (default RESULTS/figures, "
                    "skipped with a note where that cannot be written)")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--structure", help="structure of Figures 5-8: a Table 1 number or a spec "
                    "in brackets as the tables show it (default 1, else the first)")
    args = ap.parse_args(argv)
    if args.tensorboard:
        ignored = [f for f, v in (("--out", args.out), ("--figures", args.figures),
                                  ("--structure", args.structure)) if v is not None]
        if ignored:  # an export writes no report: say so rather than drop the flags
            print(f"error: --tensorboard only exports event files; {', '.join(ignored)} "
                  f"belong{'s' if len(ignored) == 1 else ''} to a report: run the report and "
                  "the export as two commands", file=sys.stderr)
            return 2
        return _export_tensorboard(args.results, args.tensorboard)
    try:
        db = ResultsDB(args.results, readonly=True)  # a report never writes the results
        chosen, runs, others = choose_protocol(db.runs(), args.protocol)
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.structure is not None and not args.no_figures:
        names = sorted({_row_name(r) for r in runs})
        if args.structure not in names:
            unknown = args.structure.isdigit() and int(args.structure) not in STRUCTURES
            print(f"error: --structure {args.structure}: "
                  + ("there is no such Table 1 structure (1..9)" if unknown
                     else "no runs of it in these results")
                  + f"; the results hold {', '.join(names)}", file=sys.stderr)
            return 2
    cells = table_cells(runs)
    protocol = json.loads(runs[0]["protocol"])
    notes = [f"protocol {chosen}: {protocol['epochs']} epochs, data {protocol['data_kind']} "
             f"{protocol.get('data_source', '')}"
             + (f", train subset {protocol['train_subset']}" if protocol["train_subset"] else "")
             + (f", test subset {protocol['test_subset']}" if protocol["test_subset"] else "")]
    if protocol["data_kind"] == "synthetic":
        notes.append("WARNING: trained on SYNTHETIC (made-up) data: not comparable to the paper")
    if others:
        notes.append(f"other protocols in this folder (not mixed in): {', '.join(others)}; "
                     "choose one with --protocol")
    finished = sum(r["status"] in DONE for r in runs)
    notes.append(f"{finished}/{len(runs)} runs finished")
    fig_dir, fig_notes, tmp = None, [], None
    if not args.no_figures:
        if args.format == "html" and not args.figures:  # embedded in the page: drawn aside
            tmp = tempfile.TemporaryDirectory(prefix="fastres-report-")
        fig_dir = (Path(args.figures) if args.figures else Path(tmp.name) if tmp
                   else Path(args.results) / "figures")
        try:
            fig_notes = write_figures(db, runs, fig_dir, args.structure)
        except OSError as e:
            if args.figures:  # asked for there: an error
                print(f"error: --figures {fig_dir}: cannot write ({e.strerror or e})",
                      file=sys.stderr)
                return 2
            notes.append(f"figures: not written, {fig_dir} cannot be written "
                         f"({e.strerror or e}); choose a folder with --figures DIR")
            fig_dir = None
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        if args.format == "html":
            from fastres.report.html import page

            print(page(chosen=chosen, protocol=protocol, notes=notes, cells=cells, runs=runs,
                       fig_dir=fig_dir, fig_notes=fig_notes), end="")
        elif args.format == "json":
            print(json.dumps({"protocol": chosen, "notes": notes + fig_notes, "cells": cells},
                             indent=2))
        elif args.format == "csv":
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=list(cells[0]) if cells else ["structure"])
            w.writeheader()
            w.writerows(cells)
            print(buf.getvalue(), end="")
            for n in notes + fig_notes:
                print(f"# {n}", file=sys.stderr)
        else:
            print("\n".join(f"- {n}" for n in notes + fig_notes) + "\n")
            print(markdown(cells, "acc"))
            print(markdown(cells, "epoch"))
    if tmp is not None:
        tmp.cleanup()
    return _emit(text.getvalue(), args.out)


def _emit(text: str, out: str | None) -> int:
    """The report to standard output, or whole (temp file + rename) to --out."""
    if out is None:
        sys.stdout.write(text)
        return 0
    path = Path(out)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        print(f"error: --out {path}: cannot write ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0


def _export_tensorboard(results: str, out: str) -> int:
    from fastres.report.tensorboard import export

    try:
        n_runs, n_epochs = export(out, results)
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: --tensorboard {out}: cannot write ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"tensorboard: {n_runs} run(s), {n_epochs} new epoch(s) written to {out}; view with: "
          f"tensorboard --logdir {out}")
    return 0

