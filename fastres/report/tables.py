"""The shape of Tables 3 and 4, shared by the Markdown and HTML reports: one block per
(T_max, augment), optimizers in the paper's order, one row per structure, and row averages
taken like for like with the paper's."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from statistics import mean

from fastres.study.paper import OPTIMIZER_ORDER

# what -> (our value, the paper's, the difference, digits shown), keys of report.table_cells.
FIELDS = {"acc": ("best_acc", "paper_acc", "acc_diff", 2),
          "epoch": ("best_epoch", "paper_epoch", "epoch_diff", 0)}
TITLES = {"acc": "Table 3 analog: best test accuracy (%)",
          "epoch": "Table 4 analog: epoch of the best test accuracy"}


def fmt(v: float | None, digits: int) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


@dataclass
class TableBlock:
    title: str  # with its augmentation and T_max
    opts: list[str]  # the columns: the paper's optimizers first, in its order
    rows: dict[str, dict[str, dict]]  # structure -> optimizer -> cell


def table_blocks(cells: list[dict], what: str) -> list[TableBlock]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        groups[(c["tmax"], c["augment"])].append(c)
    blocks = []
    for (tmax, aug), cs in groups.items():
        opts = [o for o in OPTIMIZER_ORDER if any(c["optimizer"] == o for c in cs)]
        opts += sorted({c["optimizer"] for c in cs} - set(opts))
        rows: dict[str, dict[str, dict]] = defaultdict(dict)
        for c in cs:
            rows[c["structure"]][c["optimizer"]] = c
        blocks.append(TableBlock(f"{TITLES[what]}, augmentation {'on' if aug else 'off'}, "
                                 f"T_max {tmax}", opts, dict(rows)))
    return blocks


def row_average(by_opt: dict[str, dict], n_opts: int) -> tuple[float | None, float | None, bool]:
    """(our mean accuracy, the paper's mean over the same optimizers, whether the row is
    partial): like for like on a row whose runs have not all finished."""
    mine = [c["best_acc"] for c in by_opt.values() if c["best_acc"] is not None]
    theirs = [c["paper_acc"] for c in by_opt.values()
              if c["paper_acc"] is not None and c["best_acc"] is not None]
    return (mean(mine) if mine else None, mean(theirs) if theirs else None, len(mine) < n_opts)
