"""benchmarks/grid_throughput.py in --smoke mode: it runs and writes a well-formed table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_grid_throughput_smoke(tmp_path):
    pytest.importorskip("ray")
    out_json, out_md = tmp_path / "gt.json", tmp_path / "gt.md"
    proc = subprocess.run([sys.executable, "benchmarks/grid_throughput.py", "--smoke",
                           "--cache", str(tmp_path / "cache"), "--json", str(out_json),
                           "--md", str(out_md)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out_json.read_text())
    assert [r["packing"] for r in data["rows"]] == [1, 2]
    for r in data["rows"]:
        assert r["runs"] == 2 and r["epochs"] == 4 and r["epochs_per_hour"] > 0
        assert r["wall_s"] > 0 and r["train_s"] > 0
        assert r["startup_s_per_cell"] == pytest.approx((r["wall_s"] - r["train_s"]) / 2)
    assert data["rows"][0]["speedup"] == 1.0
    md = out_md.read_text()
    assert "| runs per GPU | runs | epochs |" in md and "start-up s per cell" in md
    assert md.count("\n| ") >= 3
