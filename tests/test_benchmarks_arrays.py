"""benchmarks/arrays.py in --smoke mode: it runs, prints its table and a last line with a
positive speedup for every array size; in --host --smoke mode, a table of ops and host ms per
run-step whose graphed array dispatches no more ops per step at R = 2 than at R = 1 beyond one
more batch copy."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAST = re.compile(r"array speedup \(grouped vs one at a time\): (.+)")
ITEM = re.compile(r"R=(\d+): (\d+\.\d+)x")


def test_arrays_benchmark_smoke(tmp_path):
    out_json, out_md = tmp_path / "arrays.json", tmp_path / "arrays.md"
    proc = subprocess.run([sys.executable, "benchmarks/arrays.py", "--smoke", "--steps", "2",
                           "--json", str(out_json), "--md", str(out_md)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    m = LAST.fullmatch(lines[-1])
    assert m, lines[-1]
    items = m[1].split(", ")
    parsed = [ITEM.fullmatch(item) for item in items]
    assert all(parsed), items
    assert [int(p[1]) for p in parsed] == [1, 2, 4]  # the smoke sizes
    assert all(float(p[2]) > 0 for p in parsed)

    header = next(i for i, line in enumerate(lines) if line.startswith("| structure |"))
    cols = [c.strip() for c in lines[header].strip("|").split("|")]
    assert cols[:7] == ["structure", "R", "one at a time ms", "array grouped ms",
                        "array per-run ms", "grouped speedup", "per-run speedup"]
    body = [line for line in lines[header + 2:] if line.startswith("| ")]
    assert len(body) == 3
    for line in body:
        cells = dict(zip(cols, (c.strip() for c in line.strip("|").split("|")), strict=True))
        assert cells["structure"] == "smoke"
        for col in ("one at a time ms", "array grouped ms", "array per-run ms",
                    "grouped runs-steps/s"):
            assert float(cells[col]) > 0, (col, cells[col])

    data = json.loads(out_json.read_text())
    assert [r["runs"] for r in data["rows"]] == [1, 2, 4]
    for r, p in zip(data["rows"], parsed, strict=True):
        assert r["steps"] == 2 and r["grouped_rps"] > 0
        assert f"{r['grouped_speedup']:.2f}" == p[2]
    assert "| structure | R |" in out_md.read_text()


HOST_LAST = re.compile(r"array graphed ops/step \(structure 1\): R=1: (\d+) \((\d+) copy_\), "
                       r"R=2: (\d+) \((\d+) copy_\)")
HOST_VARIANTS = ["one run eager", "one run graphed", "array eager", "array graphed"]


def test_arrays_benchmark_host_smoke(tmp_path):
    """--host --smoke: structure 1 at C_in=4, R = 1, 2, the four variants, graphed ones through
    the CUDA-graph stand-in. A graphed array's host work per step does not grow with R beyond
    copying each run's batch into the captured inputs: its ops other than those copies are the
    same at R = 1 and 2 (none: the replay's ops are the device's), while the eager array's grow."""
    out_json = tmp_path / "host.json"
    proc = subprocess.run([sys.executable, "benchmarks/arrays.py", "--host", "--smoke",
                           "--json", str(out_json)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    m = HOST_LAST.fullmatch(lines[-1])
    assert m, lines[-1]
    header = next(i for i, line in enumerate(lines) if line.startswith("| structure |"))
    cols = [c.strip() for c in lines[header].strip("|").split("|")]
    assert cols[:7] == ["structure", "R", "variant", "ops/step", "of which copy_",
                        "ops/run-step", "host ms/run-step"]
    body = [dict(zip(cols, (c.strip() for c in line.strip("|").split("|")), strict=True))
            for line in lines[header + 2:] if line.startswith("| ")]
    assert [(c["structure"], c["R"], c["variant"]) for c in body] == [
        ("1", str(r), v) for r in (1, 2) for v in HOST_VARIANTS]
    cells = {(int(c["R"]), c["variant"]): c for c in body}
    for c in body:
        assert c["notes"] == "-", c  # no failure, the same ops counted in every counted step
        assert float(c["host ms/run-step"]) > 0
        assert float(c["ops/run-step"]) == pytest.approx(int(c["ops/step"]) / int(c["R"]),
                                                         abs=0.05)
        graphed = c["variant"].endswith("graphed")
        assert (c["stand-in replay ms/run-step"] != "-") == graphed, c

    ops = {r: int(cells[r, "array graphed"]["ops/step"]) for r in (1, 2)}
    copies = {r: int(cells[r, "array graphed"]["of which copy_"]) for r in (1, 2)}
    assert (ops[1], copies[1], ops[2], copies[2]) == tuple(int(g) for g in m.groups())
    assert copies == {1: 2, 2: 3}  # the labels and each run's images, into the graph's inputs
    assert ops[1] - copies[1] == ops[2] - copies[2]  # nothing else grows with R
    assert ops[2] <= ops[1] + 1
    for r in (1, 2):  # a replay instead of the step's ops: a few against hundreds
        assert ops[r] * 50 < int(cells[r, "array eager"]["ops/step"])
        assert int(cells[r, "one run graphed"]["ops/step"]) == 2 * r  # x and y per solo run
    assert int(cells[2, "array eager"]["ops/step"]) > int(cells[1, "array eager"]["ops/step"])

    data = json.loads(out_json.read_text())
    assert [(r["runs"], r["variant"]) for r in data["rows"]] == [
        (r, v) for r in (1, 2) for v in HOST_VARIANTS]
    assert all(r["steps"] == 2 for r in data["rows"])
