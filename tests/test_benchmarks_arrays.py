"""benchmarks/arrays.py in --smoke mode: it runs, prints its table and a last line with a
positive speedup for every array size."""

import json
import re
import subprocess
import sys
from pathlib import Path

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
