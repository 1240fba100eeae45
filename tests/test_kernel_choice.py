"""`--kernels auto`: fastres.kernels.choice reads the committed table, and
benchmarks/kernel_table.py writes it. GPU cases run with torch.cuda.get_device_name mocked
(choose touches CUDA through nothing else), against temporary tables."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastres.kernels import choice as kernel_choice
from fastres.kernels.choice import (
    CPU_WHY,
    PROVENANCE,
    TABLE_PATH,
    KernelTableError,
    check_table,
    choose,
    load_table,
)
from fastres.study.protocol import SMOKE_SPEC
from fastres.study.structures import STRUCTURES, ResNetSpec

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_table.py"
GPU = "NVIDIA Test GPU"
CUSTOM = ResNetSpec.parse("N=3 B=2,2,2 C_in=32 F0=3 P0=1 F1=3 P1=1")


def entry(name: str = GPU, passed: bool = True, **structures: dict) -> dict:
    return {"device_name": name, "date": "2026-01-02T03:04:05+00:00", "torch": "2.11.0",
            "triton": "3.5.0", "command": "python3 benchmarks/kernel_table.py",
            "equivalence_tests_passed": passed, "structures": structures}


def row(spec: ResNetSpec, eager: float | None, triton: float | None, **extra) -> dict:
    return {"spec": str(spec), "eager_step_ms": eager, "triton_step_ms": triton, **extra}


@pytest.fixture
def table(tmp_path, monkeypatch):
    """write(entries) puts a table in place of the package's; choose() then reads it."""
    path = tmp_path / "kernel_table.json"
    monkeypatch.setattr(kernel_choice, "TABLE_PATH", path)

    def write(*entries: dict) -> Path:
        path.write_text(json.dumps({"comment": "test", "entries": list(entries)}))
        return path

    return write


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device named GPU whose only CUDA call allowed is get_device_name."""
    def forbidden(*_a, **_k):
        raise AssertionError("choose() touched CUDA beyond get_device_name")

    for fn in ("is_available", "device_count", "current_device", "_lazy_init", "synchronize",
               "get_device_properties", "get_device_capability"):
        monkeypatch.setattr(torch.cuda, fn, forbidden)
    names: list[object] = []

    def get_device_name(device=None) -> str:
        names.append(device)
        return GPU

    monkeypatch.setattr(torch.cuda, "get_device_name", get_device_name)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return names


def test_cpu_is_eager_without_reading_the_table(table, monkeypatch):
    monkeypatch.setattr(kernel_choice, "TABLE_PATH", Path("/nonexistent/kernel_table.json"))
    assert choose(STRUCTURES[1], torch.device("cpu")) == ("eager", CPU_WHY)
    assert choose(STRUCTURES[1], "cpu")[0] == "eager"


def test_no_entry_for_this_device_names_the_measured_ones(table, gpu):
    table()
    kernels, why = choose(STRUCTURES[1], torch.device("cuda"))
    assert kernels == "eager"
    assert why == f"no committed measurement for {GPU}; measured: none"
    table(entry("NVIDIA H200", **{"1": row(STRUCTURES[1], 4.0, 3.0)}),
          entry("NVIDIA A100-SXM4-80GB", **{"1": row(STRUCTURES[1], 4.0, 3.0)}))
    kernels, why = choose(STRUCTURES[1], torch.device("cuda:0"))
    assert kernels == "eager"
    assert why == (f"no committed measurement for {GPU}; "
                   "measured: NVIDIA A100-SXM4-80GB, NVIDIA H200")
    assert gpu == [torch.device("cuda"), torch.device("cuda:0")]  # asked about that device


def test_equivalence_not_passed_is_never_triton(table, gpu):
    table(entry(passed=False, **{"1": row(STRUCTURES[1], 4.0, 1.0)}))
    kernels, why = choose(STRUCTURES[1], torch.device("cuda"))
    assert kernels == "eager"
    assert "equivalence tests did not pass" in why and GPU in why


def test_triton_faster_is_triton_with_the_figures(table, gpu):
    table(entry(**{"1": row(STRUCTURES[1], 4.0, 3.1)}))
    kernels, why = choose(STRUCTURES[1], torch.device("cuda"))
    assert kernels == "triton"
    assert why == (f"triton 3.10 ms/step vs eager 4.00 ms/step for structure 1 on {GPU}, "
                   "measured 2026-01-02")


def test_eager_faster_or_a_tie_is_eager(table, gpu):
    table(entry(**{"1": row(STRUCTURES[1], 4.0, 5.5), "2": row(STRUCTURES[2], 4.0, 4.0)}))
    kernels, why = choose(STRUCTURES[1], torch.device("cuda"))
    assert (kernels, why) == ("eager", f"eager 4.00 ms/step vs triton 5.50 ms/step for "
                                       f"structure 1 on {GPU}, measured 2026-01-02")
    assert choose(STRUCTURES[2], torch.device("cuda"))[0] == "eager"


def test_each_structure_gets_its_own_choice(table, gpu):
    table(entry(**{"1": row(STRUCTURES[1], 4.0, 3.0), "6": row(STRUCTURES[6], 4.0, 6.0),
                   str(CUSTOM): row(CUSTOM, 2.0, 1.0)}))
    assert choose(STRUCTURES[1], torch.device("cuda"))[0] == "triton"
    assert choose(STRUCTURES[6], torch.device("cuda"))[0] == "eager"
    kernels, why = choose(CUSTOM, torch.device("cuda"))  # a custom spec, by its spec string
    assert kernels == "triton" and f"spec {CUSTOM}" in why


def test_unknown_structure_is_eager(table, gpu):
    table(entry(**{"1": row(STRUCTURES[1], 4.0, 3.0)}))
    kernels, why = choose(STRUCTURES[7], torch.device("cuda"))
    assert kernels == "eager"
    assert why == f"structure 7 is not in the committed measurement for {GPU} (measured 2026-01-02)"
    kernels, why = choose(CUSTOM, torch.device("cuda"))
    assert kernels == "eager" and f"spec {CUSTOM} is not in" in why


def test_a_row_matches_by_spec_not_by_number(table, gpu):
    # Keyed "1" but measured on structure 2's spec (Table 1 edited since): never structure 1's.
    table(entry(**{"1": row(STRUCTURES[2], 4.0, 3.0)}))
    assert "is not in" in choose(STRUCTURES[1], torch.device("cuda"))[1]
    assert choose(STRUCTURES[2], torch.device("cuda"))[0] == "triton"
    # A row without "spec" is read by its key.
    table(entry(**{"1": {"eager_step_ms": 4.0, "triton_step_ms": 3.0}}))
    assert choose(STRUCTURES[1], torch.device("cuda"))[0] == "triton"


def test_a_missing_figure_is_eager_with_its_error(table, gpu):
    table(entry(**{"1": row(STRUCTURES[1], 4.0, None, triton_error="RuntimeError: boom")}))
    kernels, why = choose(STRUCTURES[1], torch.device("cuda"))
    assert kernels == "eager" and "no triton figure" in why and "RuntimeError: boom" in why


def test_interpreter_on_a_gpu_is_eager(table, gpu, monkeypatch):
    table(entry(**{"1": row(STRUCTURES[1], 4.0, 3.0)}))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels, why = choose(STRUCTURES[1], torch.device("cuda"))
    assert kernels == "eager" and "TRITON_INTERPRET=1" in why and "triton 3.00" in why


def test_the_table_is_read_again_when_rewritten(table, gpu):
    path = table(entry(**{"1": row(STRUCTURES[1], 4.0, 3.0)}))
    assert load_table(path) is load_table(path)  # cached: one parse, not one per call
    assert choose(STRUCTURES[1], torch.device("cuda"))[0] == "triton"
    table(entry(**{"1": row(STRUCTURES[1], 4.0, 30.0)}))
    os.utime(path, ns=(1, 1))  # a new mtime even on a coarse-clock filesystem
    assert choose(STRUCTURES[1], torch.device("cuda"))[0] == "eager"


@pytest.mark.parametrize("text, says", [
    ("{not json", "is not valid JSON"),
    ("[]", '"entries" list'),
    ('{"entries": [{"device_name": "X"}]}', "has no 'date'"),
    ('{"entries": [{"device_name": "X", "date": "d", "torch": "t", "command": "c", '
     '"equivalence_tests_passed": "yes", "structures": {}}]}', "must be true or false"),
    ('{"entries": [{"device_name": "X", "date": "d", "torch": "t", "command": "c", '
     '"equivalence_tests_passed": true, "structures": {"1": {"eager_step_ms": -1}}}]}',
     "positive number"),
])
def test_a_malformed_table_is_a_clear_error_naming_the_file(table, gpu, text, says):
    path = table()
    path.write_text(text)
    with pytest.raises(KernelTableError, match=says) as err:
        choose(STRUCTURES[1], torch.device("cuda"))
    assert str(path) in str(err.value)


def test_a_missing_table_is_a_clear_error(gpu, monkeypatch, tmp_path):
    monkeypatch.setattr(kernel_choice, "TABLE_PATH", tmp_path / "gone.json")
    with pytest.raises(KernelTableError, match="gone.json"):
        choose(STRUCTURES[1], torch.device("cuda"))


def test_duplicate_devices_are_refused():
    with pytest.raises(KernelTableError, match="two entries"):
        check_table({"entries": [entry(), entry()]})


def test_the_committed_table_holds_only_real_measurements():
    """Parses, and every entry says when, where and how it was measured (no invented figures:
    nothing but benchmarks/kernel_table.py on a GPU writes this file)."""
    raw = json.loads(TABLE_PATH.read_text())
    assert isinstance(raw.get("comment"), str) and "kernel_table.py" in raw["comment"]
    table = load_table(TABLE_PATH)
    for e in table["entries"]:
        for field in (*PROVENANCE, "triton", "git_commit"):
            assert e.get(field), (field, e.get("device_name"))
        assert e["device_name"] != "cpu-smoke"  # a dry run's table never gets committed
        assert "kernel_table.py" in e["command"] and "--smoke" not in e["command"]
        assert e["structures"], e["device_name"]


# ---------------------------------------------------------------------------- the benchmark


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, env=env)


def _load_script():
    spec = importlib.util.spec_from_file_location("kernel_table_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_writes_a_table_that_parses(tmp_path):
    out = tmp_path / "x.json"
    res = run_script("--smoke", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    table = load_table(out)
    [e] = table["entries"]
    assert e["device_name"] == "cpu-smoke" and e["equivalence_tests_passed"] is False
    assert "--smoke" in e["command"] and e["date"] and e["torch"]
    [r] = e["structures"].values()
    assert r["spec"] == str(ResNetSpec.parse(SMOKE_SPEC))
    assert r["eager_step_ms"] > 0 and r["triton_step_ms"] is None  # eager only on the CPU
    assert "| auto picks |" in res.stdout


def test_smoke_merges_into_an_existing_table_and_keeps_other_devices(tmp_path):
    out = tmp_path / "t.json"
    other = entry("NVIDIA H200", **{"1": row(STRUCTURES[1], 4.0, 3.0)})
    stale = entry("cpu-smoke", passed=False)
    out.write_text(json.dumps({"comment": "kept", "entries": [other, stale]}))
    assert _load_script().main(["--smoke", "--out", str(out), "--steps", "1",
                                "--warmup", "0", "--batch", "4"]) == 0
    table = load_table(out)
    assert table["comment"] == "kept"
    assert [e["device_name"] for e in table["entries"]] == ["NVIDIA H200", "cpu-smoke"]
    assert table["entries"][0] == other
    assert table["entries"][1]["structures"]  # replaced, not the stale empty one


def test_smoke_never_writes_the_package_table(capsys):
    mod = _load_script()
    before = TABLE_PATH.read_bytes()
    assert mod.main(["--smoke"]) == 2
    assert "--smoke needs --out" in capsys.readouterr().err
    assert mod.main(["--smoke", "--out", str(TABLE_PATH)]) == 2
    assert "never writes the package's" in capsys.readouterr().err
    assert TABLE_PATH.read_bytes() == before


def test_a_malformed_out_table_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "bad.json"
    out.write_text("{oops")
    assert _load_script().main(["--smoke", "--out", str(out)]) == 2
    assert str(out) in capsys.readouterr().err and out.read_text() == "{oops"


@pytest.mark.skipif(torch.cuda.is_available(), reason="measures for real on a GPU")
def test_without_a_gpu_it_refuses_cleanly(tmp_path):
    out = tmp_path / "never.json"
    res = run_script("--out", str(out))
    assert res.returncode == 2
    assert "CUDA GPU" in res.stderr and "--smoke" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()
