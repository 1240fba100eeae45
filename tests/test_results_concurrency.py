"""Grid processes started together on a new results folder all open it: creating the database
and switching it to WAL at the same moment must wait for each other, never fail."""

import multiprocessing as mp

from fastres.run.results import ResultsDB

PROCESSES, FOLDERS = 4, 12


def _open_all(root: str, barrier, errors) -> None:
    for i in range(FOLDERS):
        barrier.wait()  # every process at the same folder at the same moment
        try:
            ResultsDB(f"{root}/r{i}").close()
        except Exception as e:  # reported to the parent, which fails the test
            errors.put(f"folder {i}: {type(e).__name__}: {e}")


def test_processes_creating_one_database_at_once_all_succeed(tmp_path):
    ctx = mp.get_context("spawn")  # fresh interpreters, as separate grid processes are
    barrier, errors = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=_open_all, args=(str(tmp_path), barrier, errors))
             for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert [p.exitcode for p in procs] == [0] * PROCESSES
    assert found == []
