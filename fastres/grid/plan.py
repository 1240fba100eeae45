"""Planning a grid: its cells (fastres.run.cell's Cell, one per run), registering them in the
store, the presets and the flags that select them, and the cost of an epoch. No torch or FFCV:
`python -m fastres.grid --dry-run` plans without the training stack (fastres.grid.runner runs
the plan).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from fastres.run.cell import Cell, GridProtocol, run_id
from fastres.run.config import SEED_MAX, STORE_INT_MAX, check_storable
from fastres.study.protocol import (
    CIFAR_SIZES,
    EPOCHS,
    OPTIMIZER_SETTINGS,
    PAPER_OPTIMIZERS,
    SMOKE_SPEC,
    TMAX,
)
from fastres.study.structures import STRUCTURES, ResNetSpec, SpecError, forward_flop

if TYPE_CHECKING:
    from fastres.run.results import ResultsDB

H200_BF16_FLOPS = 790e12  # measured dense bf16 rate quoted in protocol.md: the speed floor


class GridError(ValueError):
    """A grid that cannot be run as asked; the message names the flag."""


def register(db: ResultsDB, cell: Cell, protocol: GridProtocol, data_source: str) -> str:
    """Add the cell's run to the results database (if new); returns its run id."""
    rid = run_id(cell, protocol)
    settings = {**OPTIMIZER_SETTINGS[cell.optimizer][1], "weight_decay": protocol.weight_decay}
    if protocol.lr is not None:
        settings["lr"] = protocol.lr
    db.register(rid, {
        "label": cell.label, "cell": json.dumps(cell.to_dict()), "protocol_id": protocol.id,
        "protocol": json.dumps({**asdict(protocol), "data_source": data_source}),
        "structure": cell.structure, "spec": str(cell.spec), "optimizer": cell.optimizer,
        "optimizer_settings": json.dumps(settings), "augment": int(cell.augment),
        "normalize": int(cell.normalize), "tmax": cell.tmax, "epochs": protocol.epochs,
        "seed": cell.seed})
    return rid


@dataclass
class Plan:
    specs: list[tuple[int | None, ResNetSpec]]
    optimizers: list[str]
    augment: list[bool]
    normalize: list[bool] = field(default_factory=lambda: [True])
    tmax: list[int] = field(default_factory=lambda: [TMAX])
    seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int = EPOCHS
    train_subset: int | None = None
    test_subset: int | None = None

    def cells(self) -> list[Cell]:
        return [Cell(spec, num, opt, aug, norm, tmax, seed)
                for num, spec in self.specs for opt in self.optimizers for aug in self.augment
                for norm in self.normalize for tmax in self.tmax for seed in self.seeds]


def _structures(nums: list[int]) -> list[tuple[int | None, ResNetSpec]]:
    return [(i, STRUCTURES[i]) for i in nums]


PRESETS: dict[str, Plan] = {
    "paper": Plan(_structures(list(range(1, 10))), list(PAPER_OPTIMIZERS), [True, False]),
    "fig7": Plan(_structures([1]), ["sgd"], [True, False], normalize=[True, False], epochs=200),
    "fig8": Plan(_structures([1]), ["sgd"], [True], tmax=[0, 100, 200, 300]),
    "smoke": Plan([(None, ResNetSpec.parse(SMOKE_SPEC))], ["sgd", "adam"], [True, False],
                  epochs=2, train_subset=1000, test_subset=500),
}


def _split(text: str, flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not any(items):
        raise GridError(f"{flag} {text!r} selects nothing")
    if not all(items):  # "1,,2" is more likely a typo than a wish for 1 and 2
        raise GridError(f"{flag} {text!r} has an empty item; separate values with one comma")
    return items


def _ints(text: str, flag: str, lo: int = 0, hi: int = STORE_INT_MAX) -> list[int]:
    out = []
    for t in _split(text, flag):
        try:
            v = int(t)
        except ValueError:
            raise GridError(f"{flag}: {t!r} is not an integer") from None
        if v < lo:
            raise GridError(f"{flag}: {v} must be at least {lo}")
        if v > hi:
            raise GridError(f"{flag}: {v} must be at most {hi}"
                            + (" (2**63 - 1, the largest integer the results store holds)"
                               if hi == STORE_INT_MAX else ""))
        out.append(v)
    return out


def _once(items: list, flag: str, key=lambda x: x, show=str) -> list:
    """`items` without repeats, in order, with a note naming what `flag` repeated: a cell
    given twice would be leased, trained and counted twice."""
    seen: dict = {}
    for item in items:
        k = key(item)
        if k in seen:
            print(f"[grid] note: {flag} gives {show(item)} more than once; each cell runs once",
                  file=sys.stderr, flush=True)
        else:
            seen[k] = item
    return list(seen.values())


def _on_off(text: str, flag: str) -> list[bool]:
    table = {"on": True, "off": False}
    bad = [t for t in _split(text, flag) if t.lower() not in table]
    if bad:
        raise GridError(f"{flag}: {bad[0]!r} is not on or off")
    return _once([table[t.lower()] for t in _split(text, flag)], flag,
                 show=lambda b: "on" if b else "off")


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The preset, narrowed or widened by the grid's selection flags; GridError naming the flag
    of a bad one."""
    base = PRESETS[args.preset]
    plan = Plan(**{**base.__dict__})
    if args.structures is not None or args.spec:
        plan.specs = []
        if args.structures is not None:
            for i in _ints(args.structures, "--structures", lo=1):
                if i not in STRUCTURES:
                    raise GridError(f"--structures: unknown structure {i} (Table 1 has 1..9)")
                plan.specs.append((i, STRUCTURES[i]))
        for text in args.spec or []:
            try:
                plan.specs.append((None, ResNetSpec.parse(text).validate(args.param_budget)))
            except SpecError as e:
                raise GridError(f"--spec {text!r}: {e}") from None
        # One structure named twice (--structures 1,1, one --spec twice, or a --spec equal to a
        # Table 1 structure) is one set of cells: the first naming is kept.
        plan.specs = _once(plan.specs, "--structures" if not args.spec else
                           "--structures/--spec" if args.structures is not None else "--spec",
                           key=lambda s: str(s[1]),
                           show=lambda s: f"structure {s[0]}" if s[0] else f"{str(s[1])!r}")
    if args.optimizers is not None:
        names = _split(args.optimizers, "--optimizers")
        bad = [n for n in names if n not in OPTIMIZER_SETTINGS]
        if bad:
            raise GridError(f"--optimizers: unknown optimizer {bad[0]!r} "
                            f"(choose from {', '.join(OPTIMIZER_SETTINGS)})")
        plan.optimizers = _once(names, "--optimizers")
    if args.augment is not None:
        plan.augment = _on_off(args.augment, "--augment")
    if args.normalize is not None:
        plan.normalize = _on_off(args.normalize, "--normalize")
    if args.tmax is not None:
        plan.tmax = _once(_ints(args.tmax, "--tmax"), "--tmax")
    if args.seeds is not None:
        plan.seeds = _once(_ints(args.seeds, "--seeds", hi=SEED_MAX), "--seeds")
    if args.epochs is not None:
        if args.epochs < 1:
            raise GridError(f"--epochs must be at least 1, got {args.epochs}")
        try:
            check_storable(args.epochs, "--epochs")
        except ValueError as e:
            raise GridError(str(e)) from None
        plan.epochs = args.epochs
    if args.train_subset is not None:
        plan.train_subset = args.train_subset
    if args.test_subset is not None:
        plan.test_subset = args.test_subset
    if not plan.cells():
        raise GridError("the selection is empty: no cells to run")
    return plan


def effective_subset(asked: int | None, available: int, what: str, flag: str) -> int | None:
    """The subset a run really uses (what results are keyed and reported by): a request above
    what the data holds is clamped to all of it, with a warning."""
    if asked is None or asked <= available:
        return asked
    print(f"[grid] warning: {flag} {asked} is more than the {available} {what} images of this "
          f"data; using (and recording) all {available}", file=sys.stderr, flush=True)
    return available


def epoch_flop(spec: ResNetSpec, n_train: int, n_test: int) -> float:
    """Training (forward + backward, about 3x forward) plus evaluation, for one epoch."""
    return forward_flop(spec) * (3 * n_train + n_test)


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def print_plan(cells: list[Cell], plan: Plan) -> None:
    """The --dry-run table: each cell's epochs and FLOP, the total and its floor on an H200."""
    n_train = plan.train_subset or CIFAR_SIZES[0]
    n_test = plan.test_subset or CIFAR_SIZES[1]
    total = 0.0
    print(f"{'cell':<60} {'epochs':>6} {'PFLOP':>10}")
    for c in cells:
        f = epoch_flop(c.spec, n_train, n_test) * plan.epochs
        total += f
        print(f"{c.label:<60} {plan.epochs:>6} {f / 1e15:>10.1f}")
    print(f"{len(cells)} cells, {len(cells) * plan.epochs} epochs, {total / 1e18:.3f} EFLOP "
          f"({n_train} train / {n_test} test images per epoch); at {H200_BF16_FLOPS / 1e12:.0f} "
          f"TFLOP/s the floor is {fmt_time(total / H200_BF16_FLOPS)}")
