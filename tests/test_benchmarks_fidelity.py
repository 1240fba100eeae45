"""benchmarks/fidelity.py: its statistics on numbers worked by hand, and a --smoke run on the CPU
that writes a well-formed table (shape, not accuracy: two seeds of one short epoch)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))  # fidelity.py imports epoch_time and _common from there
_spec = importlib.util.spec_from_file_location("fidelity", BENCH / "fidelity.py")
fidelity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fidelity)


def _runs(values: dict[str, list[float]]) -> dict:
    """Per side, seed -> one epoch whose every metric is the given value."""
    return {side: {s: [dict.fromkeys(fidelity.METRICS, v)] for s, v in enumerate(vs)}
            for side, vs in values.items()}


def test_paired_difference_and_its_standard_error():
    # Differences 0.1, 0.0, 0.2: mean 0.1, sample sd 0.1, SE 0.1 / sqrt(3); t(2) = 4.303.
    (row, *_) = fidelity.summarize(_runs({"fastres": [0.5, 0.6, 0.7],
                                          "paper": [0.4, 0.6, 0.5]}), 1)
    assert row["n"] == 3 and row["epoch"] == 1
    assert row["fastres_mean"] == pytest.approx(0.6) and row["paper_mean"] == pytest.approx(0.5)
    assert row["fastres_sd"] == pytest.approx(0.1) and row["paper_sd"] == pytest.approx(0.1)
    assert row["diff"] == pytest.approx(0.1) and row["diff_se"] == pytest.approx(0.1 / 3**0.5)
    assert row["t"] == pytest.approx(3**0.5)
    half = 4.303 * 0.1 / 3**0.5
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.1 - half, 0.1 + half))


def test_unpaired_seeds_are_left_out():
    # Seed 2 finished on one side only: the pairs are seeds 0 and 1.
    runs = _runs({"fastres": [0.5, 0.7, 0.9], "paper": [0.5, 0.5]})
    (row, *_) = fidelity.summarize(runs, 1)
    assert row["n"] == 2 and row["diff"] == pytest.approx(0.1)


def test_seed_lists():
    assert fidelity.parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert fidelity.parse_seeds("3,1,1-2") == [3, 1, 2]
    assert fidelity.t975(4) == 2.776 and fidelity.t975(27) == 2.060 and fidelity.t975(99) == 1.96


def test_fidelity_smoke_table(tiny_betons, tmp_path):
    data = tiny_betons.train.parent
    rc = fidelity.main(["--smoke", "--train-subset", "64", "--test-subset", "40", "--workers",
                        "0", "--data", str(data), "--cache", str(tmp_path / "cache"),
                        "--out", str(tmp_path / "out")])
    assert rc == 0
    result = json.loads((tmp_path / "out" / "fidelity_smoke-cpu.json").read_text())
    assert result["seeds_done"] == [0, 1] and (result["n_train"], result["n_test"]) == (64, 40)
    rows = result["summary"]
    assert [(r["epoch"], r["metric"]) for r in rows] == [(1, m) for m in fidelity.METRICS]
    for r in rows:
        assert r["n"] == 2
        for side in fidelity.SIDES:
            assert math.isfinite(r[f"{side}_mean"]) and r[f"{side}_sd"] >= 0
            if r["metric"].endswith("acc"):
                assert 0 <= r[f"{side}_mean"] <= 1
        assert r["diff"] == pytest.approx(r["fastres_mean"] - r["paper_mean"])
        assert r["diff_se"] >= 0 and r["ci_low"] <= r["diff"] <= r["ci_high"]
    md = (tmp_path / "out" / "fidelity_smoke-cpu.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| 1 |")]
    assert len(table) == 4 and all(line.count("|") == 8 for line in table)
