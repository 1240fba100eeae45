"""Run arrays (fastres.study.array_model, fastres.run.array_steps) against solo runs: each run of
an array is its solo model."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from fastres.kernels import build
from fastres.run.array_steps import RunViews
from fastres.run.steps import Schedule, make_optimizer
from fastres.study.array_model import ArrayResNet, array_loss
from fastres.study.models import from_seed_checkpoint
from fastres.study.protocol import SMOKE_SPEC, base_lr
from fastres.study.structures import ResNetSpec

from .conftest import scaled_error, stable_seed

# SMOKE_SPEC has identity shortcuts in layer 1 and a projection in layer 2; the odd spec adds
# 5 channels (not a SIMD width), a second block after the projection, and 13x13 images.
SPECS = {"smoke": SMOKE_SPEC, "odd": "N=2 B=1,2 C_in=5 F0=3 P0=1 F1=3 P1=1 K=1"}

# Grouped path vs per-run path, relative to each tensor's largest entry (conftest.scaled_error).
# The grouped kernels (one conv with groups=R, one BN over R*C channels, one batched matmul) may
# sum in another order than the dense per-run ops: fp32 round-off (eps 1.2e-7) grown over sums
# of up to B*H*W*C*k*k terms. Forward values (logits, losses, running stats) came within 3e-7
# here, so 1e-5. Gradients are such sums of mixed sign, cancelling below their terms' scale, and
# BN's backward subtracts means again: up to 5e-6 of the tensor's largest entry here, so 5e-5.
# A wrong group, a lost term or a wrong kernel is off by order 1.
FORWARD_REL = 1e-5
GRAD_REL = 5e-5


def spec_of(name: str) -> ResNetSpec:
    return ResNetSpec.parse(SPECS[name])


def solo_models(spec: ResNetSpec, seeds: list[int]) -> list[torch.nn.Module]:
    models = []
    with torch.random.fork_rng(devices=[]):
        for seed in seeds:
            torch.manual_seed(seed)
            models.append(build(spec))
    return models


def batches(seed: int, runs: int, batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(runs, batch, 3, size, size, generator=g),
            torch.randint(0, 10, (runs, batch), generator=g))


def assert_run_is_solo(array: ArrayResNet, r: int, solo: torch.nn.Module, what: str) -> None:
    """Run r's parameters, running stats and counts are bit for bit the solo model's."""
    state = array.run_state(r)
    for k, v in solo.state_dict().items():
        assert torch.equal(state[k], v), f"{what}: run {r} {k}"


def assert_grads_are_solo(array: ArrayResNet, r: int, solo: torch.nn.Module, what: str) -> None:
    solo_params = dict(solo.named_parameters())
    for k, p in array.named_parameters():
        assert torch.equal(array.run_view(k, p.grad, r), solo_params[k].grad), \
            f"{what}: run {r} grad {k}"


# -- state: keys, round trips, initialisation


@pytest.mark.parametrize("spec_name", SPECS)
def test_state_round_trips_with_paper_keys(spec_name, tmp_path):
    spec = spec_of(spec_name)
    seeds = [stable_seed("state", spec_name, r) for r in range(3)]
    solos = solo_models(spec, seeds)
    # init_runs draws each run as manual_seed + build would, and leaves the caller's RNG alone.
    torch.manual_seed(1)
    before = torch.rand(1)
    torch.manual_seed(1)
    array = ArrayResNet.from_seeds(spec, seeds)
    assert torch.equal(torch.rand(1), before)
    for r, solo in enumerate(solos):
        assert_run_is_solo(array, r, solo, "from_seeds")
    # The stacked layout, and parameters in the solo model's order (optimizer state indices).
    assert [k for k, _ in array.named_parameters()] == [k for k, _ in solos[0].named_parameters()]
    sd = array.state_dict()
    assert sd["conv1.weight"].shape == (3 * spec.C_in, 3, spec.F0, spec.F0)
    assert sd["bn1.running_var"].shape == (3 * spec.C_in,)
    assert sd["bn1.num_batches_tracked"].shape == (3,)
    assert sd["linear.weight"].shape == (3, 10, spec.layer_channels()[-1])
    assert sd["linear.bias"].shape == (3, 10)
    assert torch.equal(sd["conv1.weight"][spec.C_in:2 * spec.C_in],
                       solos[1].state_dict()["conv1.weight"])
    # from_states of the solo state_dicts (one with its counters stepped) and back.
    states = [s.state_dict() for s in solos]
    states[2] = {k: v + 5 if k.endswith("num_batches_tracked") else v
                 for k, v in states[2].items()}
    array = ArrayResNet.from_states(spec, states)
    for r in range(3):
        got = array.run_state(r)
        assert list(got) == list(states[r])
        assert all(torch.equal(got[k], v) for k, v in states[r].items())
    # run_state is a snapshot (clones), not a view of the array.
    got = array.run_state(1)
    got["conv1.weight"].add_(1)
    assert torch.equal(array.run_state(1)["conv1.weight"], states[1]["conv1.weight"])
    # It loads into the paper model, directly and through a saved checkpoint.
    solo = build(spec)
    solo.load_state_dict(array.run_state(2))
    assert_run_is_solo(array, 2, solo, "load_state_dict")
    torch.save(array.run_state(0), tmp_path / "run0.pt")
    assert_run_is_solo(array, 0, from_seed_checkpoint(tmp_path / "run0.pt", spec), "checkpoint")
    # Per-run on the CPU by default (no grouped oneDNN kernel), grouped on CUDA.
    assert not array.uses_grouped(torch.device("cpu"))
    assert array.uses_grouped(torch.device("cuda"))
    with pytest.raises(ValueError, match="2 batches for an array of 3"):
        array(torch.zeros(2, 1, 3, 13, 13))
    with pytest.raises(KeyError, match="conv1.weight"):
        ArrayResNet.from_states(spec, [{k: v for k, v in states[0].items()
                                        if k != "conv1.weight"}])


# -- the per-run path is the solo model, bit for bit


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("runs", [1, 2, 3])
@pytest.mark.parametrize("batch,size", [(1, 13), (5, 13), (5, 32)])
def test_per_run_path_is_solo_bit_for_bit(spec_name, runs, batch, size):
    spec = spec_of(spec_name)
    case = ("per-run", spec_name, runs, batch, size)
    seeds = [stable_seed(*case, r) for r in range(runs)]
    solos = solo_models(spec, seeds)
    array = ArrayResNet.from_seeds(spec, seeds, grouped=False)
    x, y = batches(stable_seed(*case), runs, batch, size)
    # Train mode on the (R, B, 3, H, W) tensor; eval mode below on the list of R batches.
    logits = array(x)
    total, per_run = array_loss(logits, y)
    total.backward()
    for r, solo in enumerate(solos):
        out = solo(x[r])
        loss = F.cross_entropy(out, y[r])
        loss.backward()
        assert torch.equal(logits[r], out), f"run {r} logits"
        assert torch.equal(per_run[r], loss.detach()), f"run {r} loss"
        assert_grads_are_solo(array, r, solo, "train step")
        assert_run_is_solo(array, r, solo, "after a train-mode forward")
    array.eval()
    with torch.no_grad():
        logits = array(list(x))
        for r, solo in enumerate(solos):
            assert torch.equal(logits[r], solo.eval()(x[r])), f"run {r} eval logits"


# -- training: stock optimizers on views, each run its own optimizer, rate, decay, schedule


def train_solo(spec: ResNetSpec, seed: int, name: str, lr: float, wd: float, tmax: int):
    (model,) = solo_models(spec, [seed])
    opt = make_optimizer(name, model.parameters(), lr, wd)
    return model, opt, Schedule(opt, tmax)


def solo_step(model, opt, x: torch.Tensor, y: torch.Tensor) -> None:
    # fastres.run.steps.Steps.train off the GPU.
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def array_step(array: ArrayResNet, views: RunViews, x: torch.Tensor, y: torch.Tensor,
               active: list[bool] | None = None) -> torch.Tensor:
    views.zero_grad()
    total, per_run = array_loss(array(x), y, active)
    total.backward()
    views.step(active)
    return per_run


TRAIN_CASES = [("smoke", 32, ("sgd", "adam", "adagrad")),
               ("odd", 13, ("nesterov", "adadelta", "sgd"))]


@pytest.mark.parametrize("spec_name,size,names", TRAIN_CASES)
def test_training_matches_solo_runs(spec_name, size, names):
    spec = spec_of(spec_name)
    case = ("train", spec_name, names)
    seeds = [stable_seed(*case, r) for r in range(3)]
    lrs = [base_lr(n) * f for n, f in zip(names, (1.0, 0.5, 2.0), strict=True)]
    wds = [5e-4, 1e-3, 0.0]
    tmaxes = [3, 1, 0]  # cosine, cosine past its T_max, constant
    array = ArrayResNet.from_seeds(spec, seeds, grouped=False)
    views = RunViews(array, names, lrs, wds)
    schedules = [Schedule(opt, t) for opt, t in zip(views.optimizers, tmaxes, strict=True)]
    solos = [train_solo(spec, *a) for a in zip(seeds, names, lrs, wds, tmaxes, strict=True)]
    for step in range(4):
        x, y = batches(stable_seed(*case, step), 3, 5, size)
        array_step(array, views, x, y)
        for r, (model, opt, _) in enumerate(solos):
            solo_step(model, opt, x[r], y[r])
            assert_run_is_solo(array, r, model, f"step {step}")
        if step % 2 == 1:  # an "epoch" of two steps
            for s in schedules + [s for _, _, s in solos]:
                s.step()
            assert [s.lr for s in schedules] == [s.lr for _, _, s in solos]
    # The run's optimizer state is a solo optimizer's, key for key.
    for r, (_, opt, _) in enumerate(solos):
        ours, theirs = views.optimizer_state(r), opt.state_dict()
        assert ours["param_groups"] == theirs["param_groups"]
        assert ours["state"].keys() == theirs["state"].keys()
        for i, st in theirs["state"].items():
            for k, v in st.items():
                assert torch.equal(torch.as_tensor(ours["state"][i][k]), torch.as_tensor(v))


# -- the grouped path (the CUDA default) on the CPU, against the per-run path


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("runs", [1, 3])
@pytest.mark.parametrize("batch,size", [(1, 13), (5, 13), (2, 32)])
def test_grouped_path_matches_per_run_path(spec_name, runs, batch, size):
    spec = spec_of(spec_name)
    case = ("grouped", spec_name, runs, batch, size)
    seeds = [stable_seed(*case, r) for r in range(runs)]
    x, y = batches(stable_seed(*case), runs, batch, size)
    arrays = [ArrayResNet.from_seeds(spec, seeds, grouped=g) for g in (True, False)]
    results = []
    for a in arrays:
        logits = a(x)
        total, per_run = array_loss(logits, y)
        total.backward()
        results.append((logits, per_run))
    (lg, lossg), (lp, lossp) = results
    grouped, per_run = arrays
    for r in range(runs):
        sg, sp = grouped.run_state(r), per_run.run_state(r)
        checks = [("logits", lg[r], lp[r], FORWARD_REL), ("loss", lossg[r], lossp[r], FORWARD_REL)]
        checks += [(k, sg[k].float(), sp[k].float(), FORWARD_REL) for k in sp]  # running stats
        checks += [(f"grad {k}", grouped.run_view(k, pg.grad, r), per_run.run_view(k, pp.grad, r),
                    GRAD_REL) for (k, pg), (_, pp) in zip(grouped.named_parameters(),
                                                         per_run.named_parameters(), strict=True)]
        for what, got, want, rel in checks:
            assert torch.isfinite(got).all(), f"run {r} {what}: non-finite"
            err = scaled_error(got, want)
            assert err <= rel, f"run {r} {what}: error {err:.2e} of its scale, allowed {rel:.0e}"
    for a in arrays:
        a.eval()
    with torch.no_grad():
        err = scaled_error(grouped(x), per_run(x))
    assert err <= FORWARD_REL, f"eval logits: error {err:.2e}"


# The convolution alone, where oneDNN has had silently wrong gradients
# (fastres.study.models.Conv2d):
# one grouped conv against R dense ones at odd channel counts, batches and map sizes, in NCHW
# (what the grouped path runs) and channels-last. No shape has failed on this test's CPUs (AMD
# EPYC, torch 2.14); the per-run path stays the CPU default anyway, since it needs no grouped
# kernel to be right. Tolerance as GRAD_REL's.
CONV_SHAPES = list(itertools.product((3,), (5, 7), (1, 2, 5), (10, 13), (1, 3), (1, 2)))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_grouped_conv_gradients_at_odd_shapes(layout):
    bad = []
    for runs, ch, batch, size, k, stride in CONV_SHAPES:
        g = torch.Generator().manual_seed(stable_seed("conv", runs, ch, batch, size, k, stride))
        x = torch.randn(batch, runs * ch, size, size, generator=g)
        w = torch.randn(runs * (ch + 2), ch, k, k, generator=g)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        xd, wd = x.clone().requires_grad_(), w.clone().requires_grad_()
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        out = F.conv2d(xg.to(memory_format=fmt), wg.to(memory_format=fmt), None, stride, k // 2,
                       1, runs)
        dense = torch.cat([F.conv2d(a, b, None, stride, k // 2)
                           for a, b in zip(xd.split(ch, 1), wd.split(ch + 2), strict=True)], 1)
        grad = torch.randn(out.shape, generator=g)
        out.backward(grad)
        dense.backward(grad)
        errs = [scaled_error(a, b) for a, b in ((out, dense), (xg.grad, xd.grad),
                                                (wg.grad, wd.grad))]
        if max(errs) > GRAD_REL:
            bad.append(((runs, ch, batch, size, k, stride), errs))
    assert not bad, f"grouped conv off at (runs, ch, batch, size, k, stride): {bad}"


# -- isolation: a diverged run, marked inactive, changes nothing for the others


# Per-run path: Table 2 optimizers of all kinds, bit for bit. Grouped path: round-off apart
# (GRAD_REL), so SGD only: Adam and Adagrad scale each entry's update by its gradient's own
# size, which turns round-off in a near-zero gradient into an update of +-lr.
@pytest.mark.parametrize("grouped,names", [(False, ("adam", "sgd", "adagrad")),
                                           (True, ("sgd", "adam", "nesterov"))])
def test_inactive_diverged_run_is_isolated(grouped, names):
    spec = spec_of("odd")
    lrs, wds = (base_lr(names[0]), 0.1, base_lr(names[2]) / 2), (5e-4, 0.0, 1e-3)
    seeds = [stable_seed("isolation", r) for r in range(3)]
    array = ArrayResNet.from_seeds(spec, seeds, grouped=grouped)
    with torch.no_grad():
        array.linear.weight[1] = float("inf")
    views = RunViews(array, names, lrs, wds)
    keep = [0, 2]
    pair = ArrayResNet.from_seeds(spec, [seeds[r] for r in keep], grouped=grouped)
    pair_views = RunViews(pair, [names[r] for r in keep], [lrs[r] for r in keep],
                          [wds[r] for r in keep])

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        # Grouped: R=3 vs 2 groups, kernels that may sum in another order.
        if not torch.isfinite(a).all():
            return False
        return torch.equal(a, b) if not grouped else scaled_error(a, b) <= GRAD_REL

    active = [True, False, True]
    for step in range(2):
        x, y = batches(stable_seed("isolation", step), 3, 5, 13)
        views.zero_grad()
        total, losses = array_loss(array(x), y, active)
        total.backward()
        assert torch.isfinite(total) and not torch.isfinite(losses[1])
        # There is NaN to leak: the diverged run's own gradients.
        assert torch.isnan(array.run_view("conv1.weight", array.conv1.weight.grad, 1)).any()
        pair_views.zero_grad()
        pair_total, pair_losses = array_loss(pair(x[keep]), y[keep])
        pair_total.backward()
        for i, r in enumerate(keep):
            assert same(losses[r], pair_losses[i]), f"step {step} run {r} loss"
            for (k, p), (_, q) in zip(array.named_parameters(), pair.named_parameters(),
                                      strict=True):
                assert same(array.run_view(k, p.grad, r), pair.run_view(k, q.grad, i)), \
                    f"step {step} run {r} grad {k}"
        views.step(active)
        pair_views.step()
        for i, r in enumerate(keep):
            a, b = array.run_state(r), pair.run_state(i)
            for k in b:
                assert same(a[k].float(), b[k].float()), f"step {step} run {r} {k}"
        assert torch.isinf(array.linear.weight[1]).all()  # its optimizer never stepped
    with pytest.raises(ValueError, match="no active run"):
        array_loss(array(x), y, [False] * 3)


# -- re-grouping: runs leave an array and continue in others (or alone) exactly


def test_regrouped_runs_continue_exactly():
    spec = spec_of("odd")
    names, lrs, wds = ("sgd", "adam", "adadelta"), (0.05, 2e-3, 1.0), (5e-4, 1e-3, 0.0)
    seeds = [stable_seed("regroup", r) for r in range(3)]
    array = ArrayResNet.from_seeds(spec, seeds, grouped=False)
    views = RunViews(array, names, lrs, wds)
    data = [batches(stable_seed("regroup", step), 3, 5, 13) for step in range(4)]
    for x, y in data[:2]:
        array_step(array, views, x, y)
    states = [array.run_state(r) for r in range(3)]
    opt_states = [views.optimizer_state(r) for r in range(3)]
    # Runs (1) and (2, 0) in new arrays: optimizers made with Table 2's defaults, then loaded
    # (the rates and decays come with the state).
    groups = [[1], [2, 0]]
    regrouped = []
    for runs in groups:
        a = ArrayResNet.from_states(spec, [states[r] for r in runs], grouped=False)
        v = RunViews(a, [names[r] for r in runs])
        for i, r in enumerate(runs):
            v.load_optimizer_state(i, opt_states[r])
        regrouped.append((runs, a, v))
    # And run 1 alone, in the paper's model with a solo optimizer.
    solo = build(spec)
    solo.load_state_dict(states[1])
    solo_opt = make_optimizer(names[1], solo.parameters())
    solo_opt.load_state_dict(opt_states[1])
    for x, y in data[2:]:
        array_step(array, views, x, y)
        for runs, a, v in regrouped:
            array_step(a, v, x[runs], y[runs])
        solo_step(solo, solo_opt, x[1], y[1])
        for runs, a, _ in regrouped:
            for i, r in enumerate(runs):
                got, want = a.run_state(i), array.run_state(r)
                assert all(torch.equal(got[k], want[k]) for k in want), f"run {r} in {runs}"
        assert_run_is_solo(array, 1, solo, "run 1 alone")
