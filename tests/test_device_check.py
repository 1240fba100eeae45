"""benchmarks/device_check.sh, the one GPU check, without a GPU: its budget arithmetic (the
stages' caps and the reserve never add up to more than the budget, and no step runs outside a
stage's cap), the stop at once where CUDA is missing, a SMOKE=1 dry run in which every stage
writes its result file in order, and benchmarks/sync_check.py's refusal off CUDA.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fastres.kernels.choice import load_table
from fastres.study.data import write_beton

from .conftest import random_images, stable_seed

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCH / "device_check.sh"
STAGE_FILES = ["1-machine.md", "2-main_job.md", "3-epoch_time.md", "4-tests.md",
               "5-kernel_table.json", "6-leftovers.md"]
ALWAYS = ["device_check.log", "raw.tar.gz"]
DONE = re.compile(r"^\[device_check\] stage (\d) (\w+) done after (\d+) s \(limit (\d+) s\), "
                  r"at (\d+) s: wrote (.*)raw\.tar\.gz; \$OUT holds (\d+) files$", re.M)
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")


def script_env(**extra: str) -> dict[str, str]:
    """The test's environment without what would steer the script elsewhere."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("BUDGET_S", "CAPS", "STAGES", "RUNGS", "SMOKE", "FASTRES_CACHE", "OUT",
                        "TO_BEST")}
    return {**env, "PY": sys.executable, **extra}


def print_caps(**extra: str) -> tuple[int, dict[str, int]]:
    res = subprocess.run(["bash", str(SCRIPT), "--print-caps"], capture_output=True, text=True,
                         env=script_env(**extra), timeout=30)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    budget = int(re.fullmatch(r"budget (\d+)", lines[0])[1])
    reserve = int(re.fullmatch(r"reserve (\d+)", lines[1])[1])
    caps: dict[str, int] = {}
    for line in lines[2:8]:
        m = re.fullmatch(r"stage (\d) (\w+) (\d+|rest)( skipped)?", line)
        assert m, line
        if m[3] != "rest" and not m[4]:
            caps[f"{m[1]} {m[2]}"] = int(m[3])
    total = int(re.fullmatch(r"total (\d+)", lines[8])[1])
    assert total == sum(caps.values()) + reserve
    return budget, caps | {"reserve": reserve}


def test_stage_caps_fit_the_budget():
    budget, caps = print_caps()
    assert budget == 420  # one rerun still fits a 15-minute device window with the start-up
    assert list(caps) == ["1 machine", "2 main_job", "3 ladder", "4 tests", "5 kernel_table",
                          "reserve"]
    assert sum(caps.values()) <= budget
    assert all(c > 0 for c in caps.values())
    # Fewer stages: only theirs count.
    _, some = print_caps(STAGES="2,6")
    assert list(some) == ["1 machine", "2 main_job", "reserve"]


@pytest.mark.parametrize("env, says", [
    ({"BUDGET_S": "300"}, "over BUDGET_S=300"),
    ({"CAPS": "50,150,100,50,55,9"}, "five numbers"),
    ({"CAPS": "50,150,1e9,50,55"}, "five numbers"),
    ({"CAPS": "50,150,300,50,55"}, "over BUDGET_S=420"),
])
def test_caps_over_the_budget_are_refused_before_anything_runs(tmp_path, env, says):
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30,
                         env=script_env(OUT=str(out), **env))
    assert res.returncode == 2 and says in res.stderr
    assert not out.exists()


def test_every_timeout_is_inside_a_stage_cap():
    """Each command's limit comes from bounded(), which clips it to its stage's time left: a
    `timeout` anywhere else could run past the stage's cap and so past the budget."""
    text = SCRIPT.read_text()
    calls = [line for line in text.splitlines()
             if re.search(r"(^|[;&|(]\s*)timeout\s", line.split("#", 1)[0].strip())]
    assert calls == ['  timeout --kill-after=5 "$t" "$@" 2>&1 | tee -a "$logf"']
    body = text[text.index("bounded() {"):]
    body = body[:body.index("\n}\n")]
    assert 'l=$(( $(stage_left) - GRACE_S ))' in body and "want < l ? want : l" in body


@pytest.fixture(scope="module")
def small_betons(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("device_check") / "betons"
    write_beton(folder / "train.beton", random_images(384), np.arange(384) % 10)
    write_beton(folder / "test.beton", random_images(128, 1), np.arange(128) % 10)
    return folder


@needs_no_cuda
def test_without_cuda_it_stops_after_the_machine_stage(tmp_path, small_betons):
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                         env=script_env(OUT=str(out), FASTRES_DATA=str(small_betons)))
    assert res.returncode == 3, res.stdout[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(["1-machine.md", *ALWAYS])
    assert "STOP: torch sees no CUDA GPU" in (out / "1-machine.md").read_text()
    assert "stage 2" not in (out / "device_check.log").read_text()


def test_smoke_dry_run_writes_every_stage_file_in_order(tmp_path, small_betons):
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600,
                         env=script_env(SMOKE="1", OUT=str(out),
                                        FASTRES_DATA=str(small_betons)))
    log = (out / "device_check.log").read_text()
    assert res.returncode == 0, log[-4000:]
    done = DONE.findall(log)
    assert [int(d[0]) for d in done] == [1, 2, 3, 4, 5, 6, 7]  # 7: the summary
    for (_stage, _name, took, limit, _at, wrote, held), name in zip(done, STAGE_FILES,
                                                                    strict=False):
        assert wrote.split() == [name], wrote
        assert int(took) <= int(limit)
        assert int(held) <= 8  # the device tool returns at most 8 files
    # Each stage's file was there when it ended: one more file per stage, never more than 8.
    assert [int(d[6]) for d in done] == [3, 4, 5, 6, 7, 8, 8]
    assert sorted(p.name for p in out.iterdir()) == sorted(STAGE_FILES + ALWAYS)
    times = [(out / f).stat().st_mtime_ns for f in STAGE_FILES]
    assert times == sorted(times)

    main_job = (out / "2-main_job.md").read_text()
    assert "PASS: rc 0" in main_job and "sync check: SMOKE" in main_job
    assert "| 1 | paper loop | ok |" in (out / "3-epoch_time.md").read_text()
    assert "not passed" in (out / "4-tests.md").read_text()  # nothing native ran here
    [entry] = load_table(out / "5-kernel_table.json")["entries"]
    assert entry["device_name"] == "cpu-smoke" and entry["equivalence_tests_passed"] is False
    leftovers = (out / "6-leftovers.md").read_text()
    assert "| smoke | 1 |" in leftovers and "| fastres-resident | ok |" in leftovers
    with tarfile.open(out / "raw.tar.gz") as tar:
        names = set(tar.getnames())
        assert {"raw/grid_smoke.log", "raw/epoch_time.json", "raw/tests.xml",
                "raw/arrays.json", "raw/loader.json"} <= names
        sync = json.load(tar.extractfile("raw/sync_check.json"))
    assert sync["status"] == "SMOKE" and len(sync["epoch_seconds"]) == 2


@needs_no_cuda
def test_sync_check_says_it_needs_cuda(capsys):
    sys.path.insert(0, str(BENCH))
    import sync_check

    assert sync_check.main([]) == 2
    err = capsys.readouterr().err
    assert "needs CUDA" in err and "--smoke" in err and "Traceback" not in err
    assert sync_check.main(["--smoke", "--epochs", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err


# ---------------------------------------------------------------------------- on a GPU only
# CUDA-only branches that no other test reaches natively (benchmarks/README.md's table): run by
# the device check's stage 4 (`-k cuda`), skipped elsewhere. What they check fails as a crash
# or by the size of an update, far outside the tolerances below.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Graphed against eager steps on CUDA in fp32 (TF32 off): the same algorithm in different
# implementations (fused/capturable vs single-tensor) and possibly different cuDNN algorithms,
# which round differently; a wrong resume or reuse moves weights by lr * grad, 1e-2 and more.
CUDA_REL = 1e-3


@pytest.fixture
def exact_fp32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def cuda_config(**kw):
    """The tests' tiny run on the GPU: fp32 NCHW, uncompiled (seconds), resident data."""
    from .test_fast_path import config

    return config(device="cuda", precision="fp32", channels_last=False, placement="resident",
                  **kw)


def assert_runs_close(got, want, what: str) -> None:
    assert [m.epoch for m in got.epochs] == [m.epoch for m in want.epochs], what
    for g, e in zip(got.epochs, want.epochs, strict=True):
        assert g.lr == e.lr, what
        for field in ("train_loss", "test_loss"):
            a, b = getattr(g, field), getattr(e, field)
            assert abs(a - b) <= CUDA_REL * abs(b), f"{what} epoch {e.epoch} {field}: {a} vs {b}"


@needs_cuda
def test_cuda_device_index_beyond_the_visible_gpus_is_refused():
    from fastres.run.config import parse_device

    n = torch.cuda.device_count()
    assert parse_device(f"cuda:{n - 1}").type == "cuda"
    with pytest.raises(ValueError, match="visible"):
        parse_device(f"cuda:{n}")


@needs_cuda
def test_cuda_host_copy_is_pinned_complete_and_independent():
    """The checkpoint's host copy of a CUDA state (pinned, asynchronous, one wait per device):
    bit for bit the device values, channels-last kept, tied tensors kept tied, nothing shared
    with the device tensors."""
    from fastres.run.checkpoints import host_copy

    g = torch.Generator(device="cuda").manual_seed(stable_seed("host_copy"))
    weight = torch.randn(64, 32, 3, 3, device="cuda", generator=g).to(
        memory_format=torch.channels_last)
    step = torch.tensor(7.0, device="cuda")
    state = {"model": {"w": weight, "tied": weight, "n": torch.arange(1000, device="cuda")},
             "optimizer": {"state": {0: {"step": step, "exp_avg": weight * 2}},
                           "param_groups": [{"lr": 0.1, "params": [0]}]},
             "cpu": torch.ones(3), "epoch": 4}
    want = {"w": weight.cpu(), "n": state["model"]["n"].cpu(), "avg": (weight * 2).cpu()}
    copy = host_copy(state)
    weight.add_(1.0)  # after the return: the copy must not see it
    w = copy["model"]["w"]
    assert w.device.type == "cpu" and w.is_pinned()
    assert w.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(w, want["w"]) and copy["model"]["tied"] is w
    assert torch.equal(copy["model"]["n"], want["n"])
    assert torch.equal(copy["optimizer"]["state"][0]["exp_avg"], want["avg"])
    assert copy["optimizer"]["state"][0]["step"].item() == 7.0
    assert copy["optimizer"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert torch.equal(copy["cpu"], torch.ones(3)) and copy["epoch"] == 4


@needs_cuda
def test_cuda_best_weights_are_a_device_copy_kept_until_the_next_update():
    """BestWeights on CUDA: one batched device copy per update, no sharing with the model."""
    from fastres.run.checkpoints import BestWeights

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).cuda()
    model = model.to(memory_format=torch.channels_last)
    best = BestWeights()
    best.update(1, model.state_dict())
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    kept = best.state()
    assert all(kept[k].device.type == "cuda" and torch.equal(kept[k], v)
               for k, v in first.items())
    best.update(2, model.state_dict())
    assert best.epoch == 2
    assert all(torch.equal(best.state()[k], v) for k, v in model.state_dict().items())


@needs_cuda
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_cuda_resume_into_a_graphed_engine_from_an_eager_checkpoint(optimizer, tiny_betons,
                                                                   exact_fp32, monkeypatch):
    """Killed after epoch 2 of an eager CUDA run, resumed with CUDA graphs: the state goes
    through the CUDA host copy and the engine's load, the fused/capturable optimizer is kept
    (else the capture reads the host and aborts), and the run ends as the uninterrupted one."""
    from fastres.run.train import train

    from .test_fast_path import QUIET
    from .test_train_array import MemoryStore

    monkeypatch.setattr("fastres.run.steps.WARM_STEPS", 1)  # the partial last batch is captured too
    cfg = cuda_config(optimizer=optimizer, seed=3, epochs=4, tmax=3, checkpoint_every=0,
                      graphs=False)
    store = MemoryStore()

    class Killed(Exception):
        """Stands for the process dying after epoch 2."""

    def kill_after_2(m) -> None:
        if m.epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, data=tiny_betons, checkpoint=store, on_epoch=kill_after_2, **QUIET)
    assert store.saved_epochs[-1] == 2
    resumed = train(dataclasses.replace(cfg, graphs=True), data=tiny_betons, checkpoint=store,
                    **QUIET)
    assert resumed.config["graphs"] is True and resumed.status == "completed"
    assert_runs_close(resumed, train(cfg, data=tiny_betons, **QUIET), optimizer)


@needs_cuda
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_cuda_warm_graphed_engine_trains_a_second_run_as_eager_does(optimizer, tiny_betons,
                                                                    exact_fp32, monkeypatch):
    """Two runs on one CUDA workbench: the second reuses the first's model, optimizer and
    captured graphs; each ends as its own eager run."""
    from fastres.run.train import train
    from fastres.run.workbench import Workbench

    from .test_fast_path import QUIET

    monkeypatch.setattr("fastres.run.steps.WARM_STEPS", 1)
    cfgs = [cuda_config(optimizer=optimizer, seed=1, epochs=3, tmax=2, graphs=True),
            cuda_config(optimizer=optimizer, seed=2, epochs=3, tmax=3, augment=False,
                        graphs=True)]
    bench = Workbench(cfgs[0].device)
    graphed = [train(c, data=tiny_betons, bench=bench, **QUIET) for c in cfgs]
    (engine,) = bench.engines.values()
    assert engine.runs == 2 and engine.steps.graphs
    for c, g in zip(cfgs, graphed, strict=True):
        eager = train(dataclasses.replace(c, graphs=False), data=tiny_betons, **QUIET)
        assert_runs_close(g, eager, f"{optimizer} seed {c.seed}")


@needs_cuda
def test_cuda_graphed_array_trains_its_runs_as_they_train_alone(tiny_betons, exact_fp32,
                                                                monkeypatch):
    """A run array on the GPU's default path (grouped convolutions, the whole step one CUDA
    graph per batch size) with mixed optimizers, Adagrad's device update included: each run
    within tests/test_train_array.py's grouped tolerance of the same run trained alone,
    eagerly."""
    from fastres.run.train import train
    from fastres.run.train_array import train_array

    from .test_fast_path import QUIET
    from .test_train_array import assert_close_runs

    monkeypatch.setattr("fastres.run.steps.WARM_STEPS", 1)  # the partial last batch is captured too
    rows = [dict(optimizer="adagrad", seed=11, augment=True, tmax=2),
            dict(optimizer="adadelta", seed=12, augment=False, tmax=3),
            dict(optimizer="nesterov", seed=13, augment=True, tmax=0)]
    cfgs = [cuda_config(epochs=3, graphs=True, **row) for row in rows]
    results = train_array(cfgs, data=tiny_betons, **QUIET)
    for cfg, got in zip(cfgs, results, strict=True):
        assert got.status == "completed", cfg.optimizer
        alone = train(dataclasses.replace(cfg, graphs=False), data=tiny_betons, **QUIET)
        assert_close_runs(got, alone, f"graphed array {cfg.optimizer}")
