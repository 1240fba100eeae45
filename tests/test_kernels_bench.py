"""benchmarks/kernels.py runs and prints a well-formed table (its numbers mean something only
on a GPU; on the CPU it runs in --smoke mode)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"
COLUMNS = ["kernel", "shape", "layers", "triton ms", "eager ms", "compiled ms", "triton rate",
           "% of peak", "x eager", "x compiled"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ})


def test_smoke_prints_a_table_for_every_kernel():
    out = run("--smoke", "--structure", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("# measured peaks: copy ") for line in lines)
    assert "## structure 1: N=4 B=2,1,1,1 C_in=4" in out.stdout
    table = [line for line in lines if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    assert cells[0] == COLUMNS
    assert set(cells[1]) == {"---"} and len(cells[1]) == len(COLUMNS)
    rows = cells[2:]
    assert {r[0] for r in rows} == {"augment", "bn_add_relu", "conv_stats"}
    # Structure 1: 4 BN shapes; 11 distinct convs: the stem, layer 1's 3x3, and in each later
    # layer the strided 3x3, the 3x3 and the 1x1 projection.
    assert sum(r[0] == "bn_add_relu" for r in rows) == 4
    assert sum(r[0] == "conv_stats" for r in rows) == 11
    for r in rows:
        assert len(r) == len(COLUMNS), r
        assert int(r[2]) >= 1
        times = [float(v) for v in r[3:6]]
        assert all(t > 0 for t in times), r
        rate, unit = r[6].split()
        assert unit == ("TFLOP/s" if r[0] == "conv_stats" else "GB/s") and float(rate) > 0
        ratios = [float(v) for v in r[8:10]]
        assert ratios[0] == pytest.approx(times[1] / times[0], rel=0.02, abs=0.01), r


@pytest.mark.skipif(torch.cuda.is_available(), reason="the full benchmark is for the GPU")
def test_full_mode_without_a_gpu_says_so():
    out = run()
    assert out.returncode == 2
    assert "needs a CUDA GPU" in out.stderr and "--smoke" in out.stderr
