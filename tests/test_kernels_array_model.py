"""The Triton array model (fastres.kernels.model.TritonArrayResNet: grouped implicit-GEMM
convolutions with BN statistics in the epilogue, fused BN + add + ReLU) against the eager array
(per-run path, each run its solo model bit for bit): forward, loss, gradients and running stats
of one training step, R = 1, 2, 3 at odd channel counts, batches and image sizes, fp32 and bf16.

Tolerances, relative to each tensor's largest entry (conftest.scaled_error), as for the solo
Triton model (tests/test_kernels_model.py): fp32 logits and losses 1e-4, running stats 1e-5,
gradients 1e-3 (BatchNorm over as few as 1*5*5 values amplifies rounding). bf16 autocast: both
arrays' bf16 gradients against the eager fp32 step; the Triton one within 3x (+0.05) of the
eager bf16 one's own error, as the solo test argues (a wrong gradient lands near 1.0).
"""

from __future__ import annotations

import pytest
import torch

from fastres.kernels.model import TritonArrayResNet
from fastres.study.array_model import ArrayResNet, array_loss
from fastres.study.structures import ResNetSpec

from .conftest import scaled_error, stable_seed

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.usefixtures("poisoned_ieee_fp32")

# 5 and 3 channels (not SIMD widths), a projection shortcut and an identity one.
SPEC = ResNetSpec.parse("N=2 B=1,2 C_in=3 F0=3 P0=1 F1=3 P1=1 K=1")
CASES = [(1, 1, 9), (2, 3, 7), (3, 2, 9)]  # runs, batch, image size


def arrays(runs: int, seed: int):
    seeds = [seed + r for r in range(runs)]
    eager = ArrayResNet.from_seeds(SPEC, seeds, DEV, grouped=False)
    triton = TritonArrayResNet.from_seeds(SPEC, seeds, DEV)
    return eager, triton


def batch(runs: int, n: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(runs, n, 3, size, size, generator=g)
    return x.to(DEV), torch.randint(0, 10, (runs, n), generator=g).to(DEV)


def step(model, x, y, dtype=None):
    with torch.autocast(DEV.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(list(x))
    total, per_run = array_loss(logits.float(), y)
    total.backward()
    return logits.float(), per_run


def grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.float() for k, p in model.named_parameters()}


def check(what: str, got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    assert torch.isfinite(got).all(), f"{what}: non-finite"
    err = scaled_error(got, want, floor=1e-6)
    assert err <= rel, f"{what}: error {err:.2e} of its scale, allowed {rel:.0e}"


@pytest.mark.parametrize("runs,n,size", CASES)
def test_fp32_step_matches_eager_array(runs, n, size):
    seed = stable_seed("triton-array", runs, n, size)
    eager, triton = arrays(runs, seed)
    x, y = batch(runs, n, size, seed)
    (le, pe), (lt, pt) = step(eager, x, y), step(triton, x, y)
    check("logits", lt, le, 1e-4)
    check("losses", pt, pe, 1e-4)
    ge, gt = grads(eager), grads(triton)
    for k in ge:
        for r in range(runs):  # run by run: one run's error cannot hide in another's scale
            check(f"run {r} grad {k}", eager.run_view(k, gt[k], r), eager.run_view(k, ge[k], r),
                  1e-3)
    se, st = eager.state_dict(), triton.state_dict()
    for k in se:
        if k.endswith("num_batches_tracked"):
            assert torch.equal(st[k], se[k]), k
        else:
            check(k, st[k].float(), se[k].float(), 1e-5)
    eager.eval()
    triton.eval()
    with torch.no_grad():
        check("eval logits", triton(list(x)).float(), eager(list(x)).float(), 1e-4)


@pytest.mark.parametrize("runs,n,size", CASES[1:])
def test_bf16_step_is_as_close_to_fp32_as_eager_bf16(runs, n, size):
    seed = stable_seed("triton-array-bf16", runs, n, size)
    eager, triton = arrays(runs, seed)
    reference, _ = arrays(runs, seed)
    x, y = batch(runs, n, size, seed)
    step(reference, x, y)
    le, _ = step(eager, x, y, torch.bfloat16)
    lt, _ = step(triton, x, y, torch.bfloat16)
    check("bf16 logits", lt, le, 5e-2)

    def error(g: torch.Tensor, ref: torch.Tensor) -> float:
        return ((g - ref).norm() / ref.norm().clamp_min(1e-8)).item()

    gr, ge, gt = grads(reference), grads(eager), grads(triton)
    for k in gr:
        for r in range(runs):
            ref, e, t = (reference.run_view(k, g[k], r) for g in (gr, ge, gt))
            err_t, err_e = error(t, ref), error(e, ref)
            assert err_t < 3 * err_e + 0.05, \
                f"run {r} {k}: {err_t:.3f} from fp32 (eager bf16 {err_e:.3f})"


def test_a_run_of_the_triton_array_does_not_see_another():
    """Run 1's weights blown up to NaN: run 0's logits and gradients are those of run 0 alone
    (the grouped kernels keep each run in its own group and channels)."""
    seed = stable_seed("triton-array-isolation")
    _, pair = arrays(2, seed)
    _, alone = arrays(1, seed)
    with torch.no_grad():
        pair.run_view("conv1.weight", pair.conv1.weight, 1).fill_(float("nan"))
    x, y = batch(2, 3, 7, seed)
    lp, pp = step(pair, x, y)
    la, pa = step(alone, x[:1], y[:1])
    assert torch.isnan(lp[1]).all() and not torch.isnan(lp[0]).any()
    check("run 0 logits", lp[0], la[0], 1e-5)
    ga, gp = grads(alone), grads(pair)
    for k in ga:
        check(f"run 0 grad {k}", pair.run_view(k, gp[k], 0), ga[k], 1e-4)
