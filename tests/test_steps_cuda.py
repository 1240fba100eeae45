"""The graphed training step against the eager one, on a GPU (skipped elsewhere; the device
script runs it natively). For each Table 2 optimizer: a few epochs of steps replayed from a CUDA
graph (rate in a device tensor, capturable/fused update, schedule filled in place) must leave
the same weights as stock torch stepping eagerly with a float rate.

Tolerance: fp32 throughout; the graphed and eager updates are the same algorithm in different
implementations (fused or foreach vs single-tensor), which may round differently in the last
bit per step. Over 12 steps that stays far below 1e-4 of each tensor's scale; a wrong capture
(a stale rate, a state tensor replaced after capture, a missed update) moves weights by the
size of an update, orders of magnitude more.
"""

import pytest
import torch

from fastres.models import build
from fastres.protocol import PAPER_OPTIMIZERS, SMOKE_SPEC
from fastres.steps import NOT_CAPTURABLE, Schedule, Steps, make_optimizer
from fastres.structures import ResNetSpec

from .conftest import scaled_error, stable_seed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SPEC = ResNetSpec.parse(SMOKE_SPEC)


def trained(optimizer: str, graphs: bool, batches: list[tuple[torch.Tensor, torch.Tensor]]
            ) -> dict[str, torch.Tensor]:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build(SPEC, device=device).to(device)
    opt = make_optimizer(optimizer, model.parameters(), graphed=graphs, device=device)
    steps = Steps(model, model, opt, device, None, graphs=graphs,
                  update_in_graph=optimizer not in NOT_CAPTURABLE, warm=2)
    schedule = Schedule(opt, tmax=2)
    for _epoch in range(3):  # the rate changes between epochs: the graph must follow it
        for x, y in batches:
            steps.train(x, y)
        schedule.step()
    torch.cuda.synchronize()
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("optimizer", PAPER_OPTIMIZERS)
def test_graphed_steps_match_eager(optimizer):
    g = torch.Generator().manual_seed(stable_seed("graphed", optimizer))
    batches = [(torch.randn(8, 3, 32, 32, generator=g).cuda(),
                torch.randint(0, 10, (8,), generator=g).cuda()) for _ in range(4)]
    eager = trained(optimizer, False, batches)
    graphed = trained(optimizer, True, batches)
    for k, v in eager.items():
        if v.dtype.is_floating_point:
            assert scaled_error(graphed[k], v, floor=1e-6) < 1e-4, k
        else:
            assert torch.equal(graphed[k], v), k
