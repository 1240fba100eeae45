"""Run arrays whose whole step is captured (issue 18), on the CPU through the CUDA-graph
stand-in (tests/graph_standin.py): forward of the R runs, their losses, backward and every
run's optimizer in one graph per batch size, replayed.

What "equal" means here: on the per-run path an array computes each run's ops exactly as its
solo model does, and a graphed array's optimizers are a graphed solo run's (fused SGD,
capturable Adam/Adadelta, DeviceAdagrad over views of the stacked tensors), so a graphed array
is bit for bit its runs trained alone with graphs. Against the runs trained alone and eagerly
(stock single-tensor optimizers) it is within test_graphs.py's stated round-off; on the grouped
path within the grouped tolerance of tests/test_train_array.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastres.run.train import train
from fastres.run.train_array import train_array

from .test_fast_path import QUIET, config, metrics, run
from .test_graphs import Killed, assert_close_metrics, kill_after
from .test_train_array import MemoryStore, assert_close_runs

# Mixed optimizers, augmentation on and off, different T_max (the paper's row shape).
MIXED = [dict(optimizer="adagrad", seed=11, augment=True, tmax=2),
         dict(optimizer="adadelta", seed=12, augment=False, tmax=3),
         dict(optimizer="nesterov", seed=13, augment=True, tmax=0)]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread for every run here: an FFCV stream sets torch's thread count to its
    worker count (1 in these configs) while resident runs keep the process's, and a reduction
    split over another number of threads sums in another order (a last-bit difference that a
    bit-for-bit comparison would blame on the array)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cfgs(rows: list[dict], **kw) -> list:
    return [config(epochs=3, graphs=True, **{**row, **kw}) for row in rows]


@pytest.mark.parametrize("runs", [1, 2, 3])
def test_a_graphed_array_is_its_runs_graphed_alone_bit_for_bit(runs, graphed_runs,
                                                               tiny_betons):
    array_cfgs = cfgs(MIXED[:runs])
    before = graphed_runs.captures
    results = train_array(array_cfgs, data=tiny_betons, grouped=False, **QUIET)
    assert graphed_runs.captures - before == 4  # train 128, 44; eval 100, 20: one array each
    for cfg, got in zip(array_cfgs, results, strict=True):
        alone = run(cfg, tiny_betons)
        assert metrics(got) == metrics(alone), cfg.optimizer
        eager = run(dataclasses.replace(cfg, graphs=False), tiny_betons)
        assert_close_metrics(got, eager, f"{cfg.optimizer} vs eager alone")


def test_a_graphed_grouped_array_matches_its_runs_within_tolerance(graphed_runs, tiny_betons):
    array_cfgs = cfgs(MIXED)
    results = train_array(array_cfgs, data=tiny_betons, grouped=True, **QUIET)
    for cfg, got in zip(array_cfgs, results, strict=True):
        assert_close_runs(got, run(dataclasses.replace(cfg, graphs=False), tiny_betons),
                          f"grouped graphed {cfg.optimizer}")


def test_a_diverged_run_leaves_and_the_rest_are_captured_anew(graphed_runs, tiny_betons):
    """SGD at a rate of 1e12 diverges in epoch 1 and leaves; the two others go on as an array
    of two, captured again, and end as they would alone."""
    array_cfgs = cfgs([dict(optimizer="sgd", seed=21, lr=1e12), *MIXED[:2]])
    before = graphed_runs.captures
    bad, *good = train_array(array_cfgs, data=tiny_betons, grouped=False, **QUIET)
    assert bad.status == "diverged" and bad.diverged_at == 1
    # The array of 3 captured its 128-image step in epoch 1 (the others were still warming up);
    # the array of 2 captured all four shapes anew in epochs 2 and 3.
    assert graphed_runs.captures - before == 1 + 4
    for cfg, got in zip(array_cfgs[1:], good, strict=True):
        assert metrics(got) == metrics(run(cfg, tiny_betons)), cfg.optimizer


def test_runs_saved_alone_and_in_an_array_resume_in_one_graphed_array(graphed_runs,
                                                                       tiny_betons):
    """An eager solo run and an eager array of two are killed after epoch 2; the three resume
    together as one graphed array (their optimizers loaded into graphed ones) and end as their
    uninterrupted eager runs."""
    rows = [dict(optimizer="adam", seed=31, tmax=3), dict(optimizer="adagrad", seed=32, tmax=3),
            dict(optimizer="sgd", seed=33, tmax=3, augment=False)]
    eager = [config(epochs=4, checkpoint_every=0, **row) for row in rows]
    stores = [MemoryStore() for _ in rows]
    with pytest.raises(Killed):
        train(eager[0], data=tiny_betons, checkpoint=stores[0], on_epoch=kill_after(2),
              **QUIET)
    with pytest.raises(Killed):
        train_array(eager[1:], data=tiny_betons, checkpoints=stores[1:],
                    on_epoch=kill_after(2, run=1), **QUIET)
    assert [s.saved_epochs[-1] for s in stores] == [2, 2, 2]
    graphed = [dataclasses.replace(c, graphs=True) for c in eager]
    results = train_array(graphed, data=tiny_betons, checkpoints=stores, grouped=False,
                          **QUIET)
    for cfg, got in zip(eager, results, strict=True):
        assert_close_metrics(got, run(cfg, tiny_betons), f"{cfg.optimizer} resumed")


def test_an_array_step_dispatches_no_per_run_gradient_work_on_the_host(tiny_betons):
    """RunViews sets the runs' gradient views once: a step no longer re-points R x parameters
    .grad attributes (6.9 ms per step for 10 runs on this CPU before)."""
    from fastres.run.array_steps import RunViews
    from fastres.study.array_model import ArrayResNet

    from .test_fast_path import TINY

    model = ArrayResNet.from_seeds(TINY, [1, 2, 3], grouped=False)
    views = RunViews(model, ["sgd", "adam", "adagrad"])
    grads = [[v.grad for v in run_views] for run_views in views.params]
    views.zero_grad()
    x = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    from fastres.study.array_model import array_loss

    array_loss(model(x), torch.randint(0, 10, (3, 2)))[0].backward()
    views.step()
    views.check_views()
    assert all(v.grad is g for run_views, gs in zip(views.params, grads, strict=True)
               for v, g in zip(run_views, gs, strict=True))


def test_auto_sizes_arrays_by_measured_step_time_and_records_it(graphed_runs, monkeypatch,
                                                                 tmp_path):
    """choose_array (what --array auto runs on a GPU): the largest array that fits against one
    run at a time, each timed as it would train (graphed here, through the stand-in), the faster
    per run-step wins; what was measured is said, returned, and kept in the results store."""
    import fastres.run.train_array as ta
    from fastres.run.results import ResultsDB

    monkeypatch.setattr(ta, "fit_host_array", lambda cfg, cap, log: 3)
    said: list[str] = []
    cfg = config(graphs=True, batch_size=4).resolved(log=lambda _m: None)
    size, record = ta.choose_array(cfg, 10, log=said.append)
    assert record["largest_fitting"] == 3 and record["chose"] == size
    alone, array = record["ms_per_run_step_alone"], record["ms_per_run_step_array"]
    assert alone > 0 and array > 0
    assert size == (3 if array < alone else 1)
    assert any("measured per run-step" in m and "array of 3" in m for m in said), said
    db = ResultsDB(tmp_path)
    db.note("array size x", record)
    assert db.notes() == {"array size x": record}
    db.close()
