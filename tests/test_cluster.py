"""Issue 11: the grid on a multi-node Ray cluster (ray.cluster_utils.Cluster: a head and two
worker nodes on this machine), with the results folder on the driver only.

Every Python process started here (the drivers, every Ray worker) records its file accesses
under the module's temp folder (tests/audit/sitecustomize.py), so a test can tell which
process wrote into a results folder."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from fastres.grid.cluster import WORKER_RUNTIME_ENV  # noqa: E402
from fastres.run.checkpoints import save_checkpoint  # noqa: E402
from fastres.run.results import DB_NAME, ResultsDB, ResultsError  # noqa: E402
from fastres.study.data import write_beton  # noqa: E402

from .conftest import random_images  # noqa: E402
from .test_grid import curves, finish, spawn, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AUDIT = Path(__file__).resolve().parent / "audit"
NODE_MB = 100 * 2**20
E = 8  # epochs of the two-cell grid: about 0.5 s each here, a window to strike mid-run
TWO_CELLS = ("--optimizers", "sgd", "--augment", "on,off", "--epochs", str(E))
# Every epoch's state saved (written while the next epoch trains): a retry or a rerun then
# resumes at most one epoch back; with the default 60 s cadence these short runs would restart.
EVERY_EPOCH = ("--checkpoint-every", "0")


@pytest.fixture(scope="module")
def audit_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def cluster(audit_root):
    """Head (the driver's node: no CPU, so no cell runs there) and two 1-CPU worker nodes, each
    with a resource of its own: two cells at once land on different nodes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(AUDIT), str(ROOT),
                                                 os.environ.get("PYTHONPATH", "")]))
        mp.setenv("FASTRES_AUDIT_ROOT", str(audit_root))
        mp.setenv("FASTRES_AUDIT_LOG", str(audit_root.parent / f"{audit_root.name}-audit.log"))
        mp.setenv("RAY_DEDUP_LOGS", "0")
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "object_store_memory": NODE_MB, "include_dashboard": False})
        for name in ("node_a", "node_b"):
            c.add_node(num_cpus=1, resources={name: 1}, object_store_memory=NODE_MB)
        c.wait_for_nodes()
        try:
            yield c
        finally:
            c.shutdown()


@pytest.fixture(scope="module")
def cluster_data(audit_root) -> str:
    """Betons a small net learns something from (a bright band whose row is the label), so
    best accuracies and epochs differ between cells: 1000 train, 200 test images."""
    folder = audit_root / "data"

    def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = random_images(n, seed) // 2, np.arange(n) % 10
        for k in range(10):
            x[y == k, 3 * k:3 * k + 3] = 255
        return x, y

    write_beton(folder / "train.beton", *images(1000, 5))
    write_beton(folder / "test.beton", *images(200, 6))
    return str(folder)


def args(data: str, results: Path, *extra: str) -> list[str]:
    return ["--preset", "smoke", "--data", data, "--results", str(results), "--device", "cpu",
            "--train-subset", "1000", "--test-subset", "200", "--loader-workers", "1", *extra]


def on_cluster(cluster: Cluster, *extra: str) -> list[str]:
    return ["--ray", cluster.address, "--workers", "2", *extra]


@pytest.fixture(scope="module")
def local_two_cells(cluster_data, audit_root) -> Path:
    """The reference: the two-cell grid run locally (no Ray), one thread like a Ray task."""
    results = audit_root / "local-two"
    finish(spawn(args(cluster_data, results, *TWO_CELLS, "--quiet")))
    return results


def audit_log(audit_root: Path) -> list[tuple[int, str, str, str]]:
    log = audit_root.parent / f"{audit_root.name}-audit.log"
    return [tuple(line.split("\t")) for line in log.read_text().splitlines()]


def assert_only_driver_wrote(audit_root: Path, results: Path, drivers: set[int],
                             data: str) -> None:
    """Every write under `results` came from a driver process; and the hook did see the Ray
    workers (they read the betons), so a worker's write would have been caught."""
    entries = audit_log(audit_root)
    wrote = {int(pid) for pid, _e, mode, path in entries
             if mode == "w" and Path(path).is_relative_to(results)}
    assert wrote, "the audit hook saw no write at all: it is not working"
    assert wrote <= drivers, f"processes other than the driver wrote in {results}: " + str(
        sorted({(pid, path) for pid, _e, mode, path in entries if mode == "w"
                and Path(path).is_relative_to(results) and int(pid) not in drivers}))
    readers = {int(pid) for pid, _e, _m, path in entries if Path(path).is_relative_to(data)}
    assert readers - drivers, "no Ray worker was audited reading the betons"


def rows(results: Path) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in table(results, "SELECT run_id, status, attempts, epochs_done, "
                                       "best_acc, best_epoch, loss_at_best FROM runs")}


def epoch_lists(results: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for rid, e in table(results, "SELECT run_id, epoch FROM epochs ORDER BY run_id, epoch"):
        out.setdefault(rid, []).append(e)
    return out


def node_of(results: Path, run_id: str) -> str:
    (env,) = table(results, f"SELECT environment FROM runs WHERE run_id = '{run_id}'")[0]
    env = json.loads(env)
    return env.get("ray", env)["ray_node_id"]


def report(results: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "fastres.report", "--results", str(results),
                          "--format", "json", "--no-figures"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return json.loads(out)


def wait_for(results: Path, sql: str, p: subprocess.Popen, timeout: float = 240) -> list:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (results / DB_NAME).exists():
            try:
                found = table(results, sql)
            except sqlite3.OperationalError:
                found = []
            if found:
                return found
        if p.poll() is not None:
            pytest.fail("the grid ended first:\n" + p.communicate()[0])
        time.sleep(0.05)
    p.kill()
    pytest.fail(f"timed out waiting for {sql}")


# ----------------------------------------------------------------------------------- tests


def test_a_ray_worker_cannot_open_the_results_folder(cluster, audit_root):
    """Tasks and the store run with WORKER_RUNTIME_ENV: there, opening the database or writing
    a checkpoint is an error and creates nothing; the same call in a plain task works."""
    folder = audit_root / "forbidden"

    def touch(kind: str) -> str:
        try:
            if kind == "db":
                ResultsDB(folder).close()
            else:
                save_checkpoint(folder / "checkpoints" / "x" / "epoch-0001.pt", {"epoch": 1})
        except ResultsError as e:
            return f"refused: {e}"
        return "opened"

    ray.init(address=cluster.address)
    try:
        guarded = ray.remote(touch).options(num_cpus=1, runtime_env=WORKER_RUNTIME_ENV)
        for kind in ("db", "checkpoint"):
            said = ray.get(guarded.remote(kind), timeout=120)
            assert said.startswith("refused: a Ray worker may not open the results folder"), said
        assert not folder.exists()
        plain = ray.remote(touch).options(num_cpus=1)  # the check itself can fail
        assert ray.get(plain.remote("db"), timeout=120) == "opened"
        assert (folder / DB_NAME).is_file()
    finally:
        ray.shutdown()


def test_smoke_grid_on_two_nodes_equals_local(cluster, cluster_data, audit_root):
    local, remote = audit_root / "local-smoke", audit_root / "ray-smoke"
    finish(spawn(args(cluster_data, local, "--quiet")))
    # One cell per task (--array off): the two cells land on the two nodes.
    p = spawn(args(cluster_data, remote, *on_cluster(cluster), "--array", "off"))
    out = finish(p, timeout=300)
    assert "Ray: 2 worker(s) over 0 GPU(s), 2 CPU(s)" in out
    assert report(remote) == report(local)  # the tables, cell for cell
    assert rows(remote) == rows(local)
    assert curves(remote) == curves(local)  # every epoch's metrics, bit for bit
    assert all(r[:3] == ("completed", 1, 2) for r in rows(remote).values())
    workers = {n.node_id for n in cluster.worker_nodes}
    nodes = {node_of(remote, rid) for rid in rows(remote)}
    assert nodes == workers, "the cells should have run on both worker nodes, and only there"
    assert_only_driver_wrote(audit_root, remote, {p.pid}, cluster_data)


def test_arrays_on_two_nodes_equal_local_runs_one_at_a_time(cluster, cluster_data, audit_root):
    """--array 2: the smoke grid's 4 cells as two arrays, one Ray task each (one per node);
    every run's epochs equal the local one-at-a-time grid's bit for bit (the CPU's per-run
    path), and only the driver writes into the results folder."""
    local, remote = audit_root / "local-smoke", audit_root / "ray-arrays"
    if not (local / DB_NAME).exists():
        finish(spawn(args(cluster_data, local, "--quiet")))
    p = spawn(args(cluster_data, remote, *on_cluster(cluster), "--array", "2"))
    out = finish(p, timeout=300)
    assert "its runs in arrays of up to 2" in out
    assert rows(remote) == rows(local)
    assert curves(remote) == curves(local)
    nodes = {node_of(remote, rid) for rid in rows(remote)}
    assert nodes == {n.node_id for n in cluster.worker_nodes}, "one array per worker node"
    envs = [json.loads(e) for (e,) in table(remote, "SELECT environment FROM runs")]
    assert all(e["array"] == {"runs": 2, "path": "per-run"} for e in envs)
    assert_only_driver_wrote(audit_root, remote, {p.pid}, cluster_data)


@pytest.mark.parametrize("array", ["off", "2"], ids=["one-cell-tasks", "array-task"])
def test_node_failure_mid_run_retries_on_the_other_node(array, cluster, cluster_data, audit_root,
                                                        local_two_cells):
    """A worker node dies mid-run: Ray retries its task on the other node at once, resuming
    from the last committed states. As one array task (--array 2), both runs die and resume
    together."""
    results = audit_root / f"ray-node-failure-{array}"
    p = spawn(args(cluster_data, results, *TWO_CELLS, *EVERY_EPOCH,
                   *on_cluster(cluster, "--max-retries", "2", "--array", array)))
    (run, done), = wait_for(results, "SELECT run_id, epochs_done FROM runs WHERE checkpoint "
                            f"IS NOT NULL AND epochs_done BETWEEN 1 AND {E - 3} LIMIT 1", p)
    dead = node_of(results, run)
    (node,) = [n for n in cluster.worker_nodes if n.node_id == dead]
    t0 = time.time()
    cluster.remove_node(node, allow_graceful=False)
    try:
        before = table(results, "SELECT run_id, epoch, committed_at FROM epochs")
        out = finish(p, timeout=300)
        took = time.time() - t0
    finally:
        cluster.add_node(num_cpus=1, resources={"node_c": 1}, object_store_memory=NODE_MB)
        cluster.wait_for_nodes()
    assert took < 60, f"{took:.0f} s to finish after the node died: a lease TTL waited out?"
    got = rows(results)
    died = [run] if array == "off" else list(got)  # an array task holds both runs
    for r in died:
        assert got[r][:3] == ("completed", 2, E), out  # a second attempt, on the other node
        assert node_of(results, r) != dead
    assert all(r[0] == "completed" and r[2] == E for r in got.values())
    assert epoch_lists(results) == {rid: list(range(1, E + 1)) for rid in got}  # each exactly once
    resumed = [line for line in out.splitlines() if "retried by Ray (attempt 2)" in line]
    assert len(resumed) == len(died), out
    assert all("resuming after epoch 0" not in line for line in resumed), out
    assert "restarting it from epoch 1" not in out
    after = set(table(results, "SELECT run_id, epoch, committed_at FROM epochs"))
    assert any(r == run for r, _e, _t in before), "the run had committed nothing yet"
    # At most the epoch whose state was still being written when the node died is trained again.
    redone = set(before) - after
    last = {r: max((e for q, e, _t in before if q == r), default=0) for r in died}
    assert {(r, e) for r, e, _t in redone} <= set(last.items()), \
        f"epochs committed before the node died were trained again: {sorted(redone)}"
    # Resumed from its checkpoint, the run is the uninterrupted one bit for bit.
    assert curves(results) == curves(local_two_cells)
    assert rows(results)[run][3:] == rows(local_two_cells)[run][3:]
    assert_only_driver_wrote(audit_root, results, {p.pid}, cluster_data)


def test_driver_killed_then_rerun_resumes(cluster, cluster_data, audit_root, local_two_cells):
    results = audit_root / "ray-driver-killed"
    grid = args(cluster_data, results, *TWO_CELLS, *EVERY_EPOCH, *on_cluster(cluster))
    p = spawn(grid)
    # Kill once every run has saved a state (a run killed before its first save restarts,
    # by design) and one is mid-run.
    wait_for(results, "SELECT run_id FROM runs WHERE checkpoint IS NOT NULL AND "
             f"epochs_done BETWEEN 1 AND {E - 3} AND "
             "(SELECT COUNT(*) FROM runs WHERE checkpoint IS NULL) = 0", p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = table(results, "SELECT run_id, epoch, committed_at FROM epochs")
    mid = [r for r, d in table(results, "SELECT run_id, epochs_done FROM runs") if 0 < d < E]
    assert before and mid, "the kill should land mid-grid"
    t0 = time.time()
    q = spawn(grid)
    out = finish(q, timeout=300)
    assert time.time() - t0 < 60, "the dead driver's leases should be taken over at once"
    assert "restarting it from epoch 1" not in out
    got = rows(results)
    assert all(r[0] == "completed" and r[2] == E for r in got.values())
    assert all(got[r][1] == 2 for r in mid)  # taken over: one more attempt, like local mode
    assert epoch_lists(results) == {rid: list(range(1, E + 1)) for rid in got}
    after = set(table(results, "SELECT run_id, epoch, committed_at FROM epochs"))
    # At most each run's epoch whose state was still being written at the kill is trained again.
    last = {r: max(e for q_, e, _t in before if q_ == r) for r, _e, _t in before}
    redone = {(r, e) for r, e, _t in set(before) - after}
    assert redone <= set(last.items()), f"epochs committed before the kill were trained again: " \
        f"{sorted(redone)}"
    assert curves(results) == curves(local_two_cells)
    assert_only_driver_wrote(audit_root, results, {p.pid, q.pid}, cluster_data)
