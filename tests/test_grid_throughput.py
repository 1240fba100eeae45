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
    assert "| runs trained | runs | epochs |" in md and "start-up s per cell" in md
    assert md.count("\n| ") >= 3


def test_grid_throughput_arrays_smoke(tmp_path):
    """--arrays: the structure's ten runs one at a time and as arrays of 5 and 10, each row
    with its peak memory (the grid process's RSS on the CPU)."""
    out_json = tmp_path / "gt.json"
    proc = subprocess.run([sys.executable, "benchmarks/grid_throughput.py", "--smoke",
                           "--arrays", "5,10", "--epochs", "1", "--cache",
                           str(tmp_path / "cache"), "--json", str(out_json)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["one at a time", "arrays of 5", "arrays of 10"]
    assert [r["array"] for r in rows] == [1, 5, 10]
    for r in rows:
        assert r["runs"] == 10 and r["epochs"] == 10 and r["epochs_per_hour"] > 0, r
        assert r["peak_of"] == "process RSS" and 100 < r["peak_mib"] < 24 * 2**10, r
        assert ("--array off" if r["array"] == 1 else f"--array {r['array']}") in r["command"]
    assert "peak MiB" in proc.stdout
