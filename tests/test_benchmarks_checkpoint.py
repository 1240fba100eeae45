"""benchmarks/checkpoint.py in --smoke mode: it runs, prints its table and a last line whose
numbers parse."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAST = re.compile(r"training-thread checkpoint ms/epoch: old (\d+\.\d), new (\d+\.\d)")


def test_checkpoint_benchmark_smoke(tmp_path):
    out_json = tmp_path / "ck.json"
    proc = subprocess.run([sys.executable, "benchmarks/checkpoint.py", "--smoke", "--json",
                           str(out_json), "--dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    m = LAST.fullmatch(lines[-1])
    assert m, lines[-1]
    old, new = float(m[1]), float(m[2])
    assert old >= 0 and new >= 0

    header = next(i for i, line in enumerate(lines) if line.startswith("| structure |"))
    cols = [c.strip() for c in lines[header].strip("|").split("|")]
    assert cols[:6] == ["structure", "optimizer", "state MB", "old ms/epoch", "new ms/epoch",
                        "saves made"]
    body = [line for line in lines[header + 2:] if line.startswith("| ")]
    assert len(body) == 2  # the smoke spec with sgd and adam
    for line in body:
        cells = dict(zip(cols, (c.strip() for c in line.strip("|").split("|")), strict=True))
        assert cells["structure"] == "smoke" and cells["optimizer"] in ("sgd", "adam")
        for col in cols[2:]:
            assert float(cells[col]) >= 0, (col, cells[col])
        assert int(cells["saves made"]) >= 1  # the cadence fires within the smoke run

    data = json.loads(out_json.read_text())
    assert max(r["old_ms"] for r in data["rows"]) == data["worst_old_ms"]
    assert f"{data['worst_new_ms']:.1f}" == m[2]
    assert list(tmp_path.iterdir()) == [out_json]  # its temporary folder is gone
