"""The benchmark scripts run in --smoke mode on the CPU and write well-formed tables.

What is checked is shape, not speed: every requested rung or pipeline has a row, a row that ran
has finite positive figures, a row that could not run says why.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastres.study.data import write_beton
from fastres.study.structures import STRUCTURES, param_count

from .conftest import random_images

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


epoch_time = _load("epoch_time")
bench_loader = _load("loader")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> tuple[Path, Path]:
    """A ready beton pair of random images (768 train, 200 test) and a cache folder."""
    root = tmp_path_factory.mktemp("bench")
    folder = root / "betons"
    write_beton(folder / "train.beton", random_images(768), np.arange(768) % 10)
    write_beton(folder / "test.beton", random_images(200, 1), np.arange(200) % 10)
    return folder, root / "cache"


def _finite_positive(row: dict, keys: tuple[str, ...]) -> None:
    for k in keys:
        assert isinstance(row[k], float) and math.isfinite(row[k]) and row[k] > 0, (k, row)


def test_epoch_time_smoke_table(small_data, tmp_path):
    data, cache = small_data
    out = tmp_path / "out"
    rc = epoch_time.main(["--smoke", "--rungs", "1,3,6,7,8", "--warmup", "1", "--epochs", "1",
                          "--data", str(data), "--cache", str(cache), "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "epoch_time_smoke-cpu.json").read_text())
    assert result["ceilings"]["floor_tflops"] > 0
    (s,) = result["structures"]
    assert s["label"] == "smoke" and s["params"] > 0 and s["gflop_per_image"] > 0
    rows = {r["rung"]: r for r in s["rows"]}
    assert sorted(rows) == [1, 3, 6, 7, 8]
    for rung in (1, 3):
        r = rows[rung]
        assert r["status"] == "ok", r
        _finite_positive(r, ("epoch_s", "images_per_s", "tflops", "floor_fraction", "speedup",
                             "warmup_s"))
        assert r["epochs_measured"] == 1 and r["n_train"] == 768 and r["n_test"] == 200
        assert r["compile_s"] >= 0 and 0 <= r["test_acc"] <= 1
    assert rows[1]["speedup"] == pytest.approx(1.0)
    for rung in (6, 7, 8):  # no GPU: each says why
        assert rows[rung]["status"] == "skipped" and "CUDA" in rows[rung]["reason"]
    md = (out / "epoch_time_smoke-cpu.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| smoke |")]
    assert len(table) == 5 and all(line.count("|") == len(epoch_time.COLUMNS) + 1
                                   for line in table)


def test_epoch_time_isolated_rung_and_to_best(small_data, tmp_path):
    data, cache = small_data
    out = tmp_path / "iso.json"
    # A child process per rung: its row comes back through a file.
    rc = subprocess.run([sys.executable, str(BENCH / "epoch_time.py"), "--smoke", "--isolate",
                         "--rungs", "7", "--data", str(data), "--cache", str(cache),
                         "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert rc.returncode == 0, rc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["structures"][0]["rows"]
    assert row["rung"] == 7 and row["status"] == "skipped" and row["reason"]

    best = tmp_path / "best.json"
    assert epoch_time.main(["--smoke", "--to-best", "--best-epochs", "2", "--best-rung", "3",
                            "--data", str(data), "--cache", str(cache), "--json",
                            str(best)]) == 0
    b = json.loads(best.read_text())["to_best"]
    assert b["status"] == "ok" and b["epochs_run"] == 2 and 1 <= b["best_epoch"] <= 2
    assert 0 <= b["best_test_acc"] <= 1 and b["wall_s"] >= b["train_s"] > 0


def test_paper_model_matches_table1():
    """Rung 1's model is written apart from fastres.study.models; it must be the same network."""
    for i, s in STRUCTURES.items():
        with torch.device("meta"):
            net = epoch_time.PaperResNet(s.N, s.B, s.C_in, s.F0, s.P0, s.F1, s.P1, s.K)
        assert sum(p.numel() for p in net.parameters()) == param_count(s), i


def test_loader_smoke_table(small_data, tmp_path):
    data, cache = small_data
    rc = bench_loader.main(["--smoke", "--images", "512", "--epochs", "1", "--data", str(data),
                            "--cache", str(cache), "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "loader_smoke-cpu.json").read_text())
    rows = {r["pipeline"]: r for r in result["rows"]}
    assert list(rows) == list(bench_loader.PIPELINES)
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["images"] == 512
        _finite_positive(r, ("images_per_s", "pass_s", "warmup_s"))
    assert rows["torchvision-2w"]["vs_torchvision_2w"] == pytest.approx(1.0)
    md = (tmp_path / "loader_smoke-cpu.md").read_text()
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + len(rows)


@pytest.mark.parametrize("script", ["device_check.sh", "prepare_device.sh"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(BENCH / script)]).returncode == 0


def test_epoch_time_deadline_skips_and_says_why(small_data, tmp_path):
    data, cache = small_data
    out = tmp_path / "d.json"
    assert epoch_time.main(["--smoke", "--rungs", "3,1", "--deadline", "5", "--data", str(data),
                            "--cache", str(cache), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["structures"][0]["rows"]
    assert [r["rung"] for r in rows] == [3, 1]  # run in the order asked
    assert all(r["status"] == "skipped" and "deadline" in r["reason"] for r in rows)
