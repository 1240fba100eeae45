"""Which kernels a run computes with: the choices, what `--kernels auto` picks, and the error
where Triton cannot run (fastres.kernels.build is the switch itself). No torch at import: the run
configuration checks `--kernels` before the training stack loads.

`auto` picks, per structure, what a committed GPU measurement found fastest. The measurements
live in package data, `kernels/kernel_table.json`, written on a GPU by
`benchmarks/kernel_table.py` (run by `benchmarks/device_check.sh`) and committed as it came
back. Each entry is one device:

    {"device_name": "NVIDIA H200", "date": "...", "torch": "...", "triton": "...",
     "command": "...", "equivalence_tests_passed": true,
     "structures": {"1": {"spec": "N=4 B=2,1,1,1 ...", "eager_step_ms": 4.0,
                          "triton_step_ms": 3.1}, ...}}

Structures are keyed by their Table 1 number or, for a custom spec, by its canonical spec
string (`str(spec)`); either way a row matches by spec string, so a renumbered or edited Table 1
never borrows another structure's figures. Anything short of a measurement that says triton is
faster on this exact device, with the kernels' equivalence tests passed natively there, means
eager; the reason says which case it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from fastres.study.structures import STRUCTURES, ResNetSpec

if TYPE_CHECKING:
    import torch

KERNELS = ("eager", "triton")  # eager: PyTorch (the reference); triton: fastres.kernels

TABLE_PATH = Path(__file__).with_name("kernel_table.json")
CPU_WHY = "on the CPU the Triton kernels run only under the interpreter"
# Every entry must say where its figures came from; one without these is not a measurement.
PROVENANCE = ("device_name", "date", "torch", "command")
FIGURES = ("eager_step_ms", "triton_step_ms")


class KernelsUnavailable(RuntimeError):
    """kernels="triton" asked for where Triton cannot run; the message says what to do."""


class KernelTableError(ValueError):
    """The kernel table file is not what benchmarks/kernel_table.py writes; names the file."""


# (path, mtime_ns, size) -> parsed table: one stat per call instead of a parse per call, and a
# rewritten file (the benchmark, a test) is read again.
_cache: dict[tuple[str, int, int], dict] = {}


def load_table(path: str | os.PathLike | None = None) -> dict:
    """The parsed, checked table at `path` (default: the package's); KernelTableError naming the
    file where it is missing or malformed. Callers must not modify it (it is cached)."""
    p = Path(path) if path is not None else TABLE_PATH
    try:
        st = p.stat()
    except OSError as e:
        raise KernelTableError(f"kernel table {p}: cannot read it ({e.strerror or e})") from None
    key = (str(p), st.st_mtime_ns, st.st_size)
    table = _cache.get(key)
    if table is None:
        try:
            table = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise KernelTableError(f"kernel table {p} is not valid JSON: {e}") from None
        check_table(table, p)
        _cache.clear()  # only the newest version of a file is worth keeping
        _cache[key] = table
    return table


def check_table(table: object, where: str | os.PathLike = "kernel table") -> None:
    """KernelTableError, naming `where` and the bad field, unless `table` has the shape
    benchmarks/kernel_table.py writes."""
    def bad(msg: str) -> KernelTableError:
        return KernelTableError(f"kernel table {where}: {msg}")

    if not isinstance(table, dict) or not isinstance(table.get("entries"), list):
        raise bad('expected an object with an "entries" list')
    seen: set[str] = set()
    for i, entry in enumerate(table["entries"]):
        if not isinstance(entry, dict):
            raise bad(f"entries[{i}] is not an object")
        for field in PROVENANCE:
            if not isinstance(entry.get(field), str) or not entry[field].strip():
                raise bad(f"entries[{i}] has no {field!r} (every measurement says where, when "
                          "and how it was taken)")
        name = entry["device_name"]
        if name in seen:
            raise bad(f"two entries for device {name!r}")
        seen.add(name)
        if not isinstance(entry.get("equivalence_tests_passed"), bool):
            raise bad(f"entries[{i}] ({name}): 'equivalence_tests_passed' must be true or false")
        structures = entry.get("structures")
        if not isinstance(structures, dict):
            raise bad(f"entries[{i}] ({name}): 'structures' must be an object")
        for label, row in structures.items():
            if not isinstance(row, dict):
                raise bad(f"entries[{i}] ({name}) structure {label!r} is not an object")
            if "spec" in row and not isinstance(row["spec"], str):
                raise bad(f"entries[{i}] ({name}) structure {label!r}: 'spec' must be a string")
            for fig in FIGURES:
                v = row.get(fig)
                # bool is an int to Python, never a time.
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                      or not v > 0):
                    raise bad(f"entries[{i}] ({name}) structure {label!r}: {fig!r} must be a "
                              f"positive number or null, got {v!r}")


def _row_spec(label: str, row: dict) -> str | None:
    """The spec string a table row measured: its own "spec", else its key read as a Table 1
    number or as a spec string."""
    if "spec" in row:
        return row["spec"]
    if label.isdigit():
        spec = STRUCTURES.get(int(label))
        return str(spec) if spec is not None else None
    return label


def _label(spec: ResNetSpec) -> str:
    """"structure 3" for a Table 1 structure, else the spec string."""
    for number, s in STRUCTURES.items():
        if s == spec:
            return f"structure {number}"
    return f"spec {spec}"


def choose(spec: ResNetSpec, device: torch.device | str) -> tuple[str, str]:
    """("eager" or "triton", why) for training `spec` on `device`, from the committed table.

    Touches CUDA only through torch.cuda.get_device_name (to match the table's entries)."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return "eager", CPU_WHY
    if device.type != "cuda":
        return "eager", f"fastres's Triton kernels run only on CUDA GPUs, not on {device.type}"
    table = load_table()
    name = torch.cuda.get_device_name(device)
    entries = table["entries"]
    entry = next((e for e in entries if e["device_name"] == name), None)
    if entry is None:
        measured = ", ".join(sorted(e["device_name"] for e in entries)) or "none"
        return "eager", f"no committed measurement for {name}; measured: {measured}"
    when = f"measured {entry['date'].split('T')[0]}"
    if not entry["equivalence_tests_passed"]:
        return "eager", (f"the kernel equivalence tests did not pass natively on {name} in the "
                         f"committed measurement ({when}): the Triton kernels are not trusted "
                         "there")
    want = str(spec)
    row = next((r for label, r in entry["structures"].items() if _row_spec(label, r) == want),
               None)
    if row is None:
        return "eager", f"{_label(spec)} is not in the committed measurement for {name} ({when})"
    eager_ms, triton_ms = row.get("eager_step_ms"), row.get("triton_step_ms")
    if eager_ms is None or triton_ms is None:
        missing = "triton" if triton_ms is None else "eager"
        error = row.get(f"{missing}_error")
        return "eager", (f"the committed measurement for {name} ({when}) has no {missing} "
                         f"figure for {_label(spec)}" + (f" ({error})" if error else ""))
    ms = {"eager": float(eager_ms), "triton": float(triton_ms)}
    pick = "triton" if ms["triton"] < ms["eager"] else "eager"  # a tie keeps the reference path
    other = "eager" if pick == "triton" else "triton"
    figures = (f"{pick} {ms[pick]:.2f} ms/step vs {other} {ms[other]:.2f} ms/step for "
               f"{_label(spec)} on {name}, {when}")
    if pick == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        # fastres.kernels would then run only on CPU tensors and refuse the GPU.
        return "eager", ("TRITON_INTERPRET=1 is set, so the kernels cannot run on the GPU "
                         f"({figures})")
    return pick, figures
