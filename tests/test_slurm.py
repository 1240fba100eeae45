"""Issue 11: scripts/slurm/grid.sbatch on a one-node Slurm cluster on this machine.

Needs root and Debian's slurm-wlm (scripts/slurm/localhost.sh installs and starts it), so it
runs only when asked: FASTRES_TEST_SLURM=1 python -m pytest -m slurm tests/test_slurm.py"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from fastres.study.data import write_beton

from .conftest import random_images
from .test_grid import table

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(os.environ.get("FASTRES_TEST_SLURM") != "1",
                       reason="set FASTRES_TEST_SLURM=1 (root; installs and starts Slurm)"),
]


def test_sbatch_runs_the_smoke_grid_on_ray(tmp_path):
    subprocess.run(["bash", str(ROOT / "scripts/slurm/localhost.sh")], check=True, timeout=600)
    assert shutil.which("sbatch")
    data = tmp_path / "data"
    write_beton(data / "train.beton", random_images(256, 3), np.arange(256) % 10)
    write_beton(data / "test.beton", random_images(100, 4), np.arange(100) % 10)
    results, log = tmp_path / "runs", tmp_path / "job.log"
    job = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", f"--output={log}",
         str(ROOT / "scripts/slurm/grid.sbatch"), "--preset", "smoke", "--data", str(data),
         "--results", str(results), "--device", "cpu", "--train-subset", "256",
         "--test-subset", "100", "--loader-workers", "1", "--workers", "2", "--quiet"],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    deadline = time.time() + 300
    while time.time() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                               text=True).stdout.strip()
        if not state:
            break
        time.sleep(2)
    else:
        subprocess.run(["scancel", job])
        pytest.fail("the job did not finish in 5 minutes")
    info = subprocess.run(["scontrol", "show", "job", job], capture_output=True,
                          text=True).stdout
    out = log.read_text()
    assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info + out
    assert "Ray: 2 worker(s)" in out and "4/4 cells finished" in out, out
    assert table(results, "SELECT status, epochs_done, COUNT(*) FROM runs GROUP BY 1, 2") == [
        ("completed", 2, 4)]
