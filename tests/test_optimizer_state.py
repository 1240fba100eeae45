"""The graphed optimizers' own pieces: DeviceAdagrad against torch's Adagrad, and optimizer
states that move between eager and graphed implementations without changing either.

Tolerances: fp32. At the protocol's Adagrad settings (lr_decay 0) DeviceAdagrad does torch's
single-tensor arithmetic in torch's order, so it is bit for bit the same on the CPU. With
lr_decay the step size lr / (1 + (step - 1) * lr_decay) is computed in fp32 on the device
instead of float64 on the host: a relative difference of a few fp32 ulps (~1e-7) per step in the
update, so after 12 steps the weights stay within 1e-6 of their scale (an update itself is
~1e-2 of it, so a wrong formula fails by four orders of magnitude).
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastres.run.adagrad import DeviceAdagrad
from fastres.run.steps import load_optimizer_state, make_optimizer
from fastres.study.protocol import OPTIMIZER_SETTINGS, PAPER_OPTIMIZERS, WEIGHT_DECAY

from .conftest import scaled_error


def params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    # odd shapes: a conv weight, a vector, a scalar-like bias
    return [torch.nn.Parameter(torch.randn(shape, generator=g))
            for shape in ((5, 3, 3, 3), (7,), (1,))]


def run(opt_params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, seed: int,
        steps: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in opt_params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.parametrize("rate", ["float", "tensor"])
def test_device_adagrad_is_torch_adagrad_bit_for_bit_at_the_protocol_settings(rate):
    lr = OPTIMIZER_SETTINGS["adagrad"][1]["lr"]
    ours, theirs = params(1), params(1)
    ours_opt = DeviceAdagrad(ours, lr=torch.tensor(lr) if rate == "tensor" else lr,
                             weight_decay=WEIGHT_DECAY)
    torch_opt = torch.optim.Adagrad(theirs, lr=lr, weight_decay=WEIGHT_DECAY)
    run(ours, ours_opt, 2, 12)
    run(theirs, torch_opt, 2, 12)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(ours_opt.state[a]["sum"], torch_opt.state[b]["sum"])
        assert float(ours_opt.state[a]["step"]) == float(torch_opt.state[b]["step"]) == 12


@pytest.mark.parametrize("options", [
    {"lr_decay": 0.1}, {"initial_accumulator_value": 0.3}, {"eps": 1e-3},
    {"weight_decay": 0.05, "lr_decay": 0.02, "initial_accumulator_value": 0.1}])
def test_device_adagrad_follows_torch_adagrad_with_its_other_options(options):
    ours, theirs = params(3), params(3)
    ours_opt = DeviceAdagrad(ours, lr=torch.tensor(0.05), **options)
    torch_opt = torch.optim.Adagrad(theirs, lr=0.05, **options)
    run(ours, ours_opt, 4, 12)
    run(theirs, torch_opt, 4, 12)
    for a, b in zip(ours, theirs, strict=True):
        assert scaled_error(a, b) < 1e-6


@pytest.mark.parametrize("direction", ["torch->device", "device->torch"])
def test_adagrad_states_move_between_the_two_implementations(direction):
    """Half the steps in one, the state loaded into the other, the rest there: the same weights
    as all steps in one (bit for bit: protocol settings)."""
    make_torch = lambda ps: torch.optim.Adagrad(ps, lr=0.01, weight_decay=WEIGHT_DECAY)  # noqa: E731
    make_device = lambda ps: DeviceAdagrad(ps, lr=torch.tensor(0.01), weight_decay=WEIGHT_DECAY)  # noqa: E731
    first, second = ((make_torch, make_device) if direction == "torch->device"
                     else (make_device, make_torch))
    whole = params(5)
    run(whole, make_torch(whole), 6, 10)

    split = params(5)
    opt = first(split)
    g = torch.Generator().manual_seed(6)
    for i in range(10):
        if i == 5:
            state = copy.deepcopy(opt.state_dict())
            opt = second(split)
            load_optimizer_state(opt, state)
        for p in split:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    for a, b in zip(split, whole, strict=True):
        assert torch.equal(a, b)


IMPL_FLAGS = {"sgd": ("fused",), "nesterov": ("fused",), "adam": ("capturable", "foreach"),
              "adadelta": ("capturable", "foreach"), "adagrad": ()}


@pytest.mark.parametrize("optimizer", PAPER_OPTIMIZERS)
def test_a_graphed_optimizer_stays_graphable_after_loading_an_eager_state(optimizer):
    """torch's load_state_dict replaces every param-group key but `params`: an eager state made
    fused SGD foreach again and capturable Adam/Adadelta not capturable (then their update reads
    the host inside a capture). The rate stays the device tensor the graphs read."""
    cpu = torch.device("cpu")
    eager_params, graphed_params = params(7), params(7)
    eager = make_optimizer(optimizer, eager_params)
    run(eager_params, eager, 8, 3)
    graphed = make_optimizer(optimizer, graphed_params, graphed=True, device=cpu)
    rate = graphed.param_groups[0]["lr"]
    flags = {k: graphed.param_groups[0][k] for k in IMPL_FLAGS[optimizer]}
    load_optimizer_state(graphed, copy.deepcopy(eager.state_dict()))
    group = graphed.param_groups[0]
    assert group["lr"] is rate and float(rate) == pytest.approx(eager.param_groups[0]["lr"])
    assert {k: group[k] for k in flags} == flags and all(flags.values())
    for p in graphed_params:
        step = graphed.state[p].get("step")
        if step is not None:
            assert step.dtype == torch.float32 and step.device == p.device


@pytest.mark.parametrize("optimizer", PAPER_OPTIMIZERS)
def test_an_eager_optimizer_stays_eager_after_loading_a_graphed_state(optimizer, standin_graphs):
    """A GPU run's checkpoint resumed eagerly (on the CPU, in a run array): a float rate and the
    eager implementation, whatever the saved groups say."""
    cpu = torch.device("cpu")
    graphed_params, eager_params = params(9), params(9)
    graphed = make_optimizer(optimizer, graphed_params, graphed=True, device=cpu)
    run(graphed_params, graphed, 10, 3)
    eager = make_optimizer(optimizer, eager_params)
    flags = {k: eager.param_groups[0][k] for k in IMPL_FLAGS[optimizer]}
    load_optimizer_state(eager, copy.deepcopy(graphed.state_dict()))
    group = eager.param_groups[0]
    assert isinstance(group["lr"], float)
    assert {k: group[k] for k in flags} == flags
    assert not any(group.get(k) for k in ("fused", "capturable"))
    run(eager_params, eager, 11, 1)  # and it steps
