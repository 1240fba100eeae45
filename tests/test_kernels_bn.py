"""fastres.kernels.batchnorm against eager F.batch_norm (+ add) (+ ReLU), forward and backward.

Reference: eager PyTorch autograd in fp32 on the same input values (bf16 inputs upcast), with an
nn.BatchNorm2d holding the same parameters and buffers. Tolerances:
  fp32  y, dx, dres: rtol 1e-5, atol 1e-5; dweight, dbias: rtol 1e-4, atol 1e-4 (sums over N*H*W)
  bf16  errors over each tensor's largest entry (conftest.scaled_error), not element-wise:
        y, dx, dres within 2**-6: each is stored in bf16 (half an ulp, u = 2**-8, of its largest
        entry) after at most one more bf16 rounding (the BN output before the add, as eager's
        separate kernels do), so 2u, doubled for the bf16 rounding of dy's products on the way;
        dweight, dbias within 1e-3: fp32 sums of products of bf16 values.
  running statistics, either dtype: rtol 1e-5, atol 1e-6.
In bf16 a ReLU input within rounding of 0 may fall on either side, which changes gradients by a
whole dy; the bf16 inputs are therefore made so no pre-activation lies within 0.1 of 0.
"""

import pytest
import torch
import torch.nn.functional as F

from fastres.kernels import batchnorm
from fastres.kernels._common import poison_outputs

from .conftest import assert_scaled_close, stable_seed

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: (dict(rtol=1e-5, atol=1e-5), dict(rtol=1e-4, atol=1e-4)),
       torch.bfloat16: (2**-6, 1e-3)}  # scaled errors, see the docstring
STATS_TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True)
def poisoned():
    with poison_outputs():
        yield


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def make_case(shape, dtype, residual: bool, relu: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = torch.randn(shape, generator=g) * 1.5 + torch.randn(c, 1, 1, generator=g) * 3
    weight = torch.rand(c, generator=g) + 0.5
    bias = torch.randn(c, generator=g) * 0.5
    res = torch.randn(shape, generator=g) if residual else None
    if dtype == torch.bfloat16 and relu:
        if residual:
            # Push the pre-activation out of (-0.1, 0.1) through the residual.
            x = x.to(dtype).float()
            z = F.batch_norm(x, None, None, weight, bias, True) + res
            res = res + torch.where(z.abs() < 0.1, torch.where(z < 0, -0.2, 0.2), 0.0)
        else:
            # Bimodal x with a gap around each channel's mean, and no bias: z = w * xhat
            # stays away from 0.
            x = torch.randn(c, 1, 1, generator=g) * 3 + torch.sign(x - x.mean((0, 2, 3), True)) \
                * (1 + torch.rand(shape, generator=g))
            bias = torch.zeros(c)
    to = lambda t: None if t is None else channels_last(t.to(dtype)).to(DEV)  # noqa: E731
    return to(x), to(res), weight.to(DEV), bias.to(DEV)


def close(actual, expected, tol, what: str) -> None:
    """fp32: element-wise (rtol, atol); bf16: the error over the tensor's largest entry."""
    if isinstance(tol, dict):
        torch.testing.assert_close(actual.float(), expected, **tol, msg=lambda m: f"{what}: {m}")
    else:
        assert_scaled_close(actual.float(), expected, tol, what)


def bn_module(c, weight, bias, seed):
    bn = torch.nn.BatchNorm2d(c).to(DEV)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn


def run_pair(x, res, weight, bias, relu, training, seed, grad_seed):
    """(kernel outputs, reference outputs): y, dx, dres, dw, db and the two BN modules."""
    c = x.shape[1]
    bk, br = bn_module(c, weight, bias, seed), bn_module(c, weight, bias, seed)
    bk.train(training)
    br.train(training)
    xk = x.clone().requires_grad_()
    rk = res.clone().requires_grad_() if res is not None else None
    yk = batchnorm.batch_norm_act(xk, bk, rk, relu)
    xr = x.float().requires_grad_()
    rr = res.float().requires_grad_() if res is not None else None
    yr = br(xr)
    if rr is not None:
        yr = yr + rr
    if relu:
        yr = F.relu(yr)
    dy = torch.randn(yr.shape, generator=torch.Generator().manual_seed(grad_seed)).to(DEV)
    yk.backward(channels_last(dy.to(x.dtype)))
    yr.backward(dy.to(x.dtype).float())
    out_k = (yk, xk.grad, rk.grad if rk is not None else None, bk.weight.grad, bk.bias.grad)
    out_r = (yr, xr.grad, rr.grad if rr is not None else None, br.weight.grad, br.bias.grad)
    return out_k, out_r, bk, br


SHAPES = [(1, 3, 32, 32), (2, 10, 16, 16), (3, 24, 8, 8), (4, 24, 4, 4), (2, 10, 7, 7),
          (2, 130, 3, 3)]
VARIANTS = [(True, True), (False, True), (False, False), (True, False)]  # (residual, relu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS, ids=["add-relu", "relu", "bn", "add"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_training_matches_eager(shape, variant, dtype):
    residual, relu = variant
    seed = stable_seed(shape, variant) % 1000
    x, res, w, b = make_case(shape, dtype, residual, relu, seed)
    (yk, *gk), (yr, *gr), bk, br = run_pair(x, res, w, b, relu, True, seed, seed + 1)
    act, par = TOL[dtype]
    assert yk.dtype == dtype and yk.is_contiguous(memory_format=torch.channels_last)
    close(yk, yr, act, "y")
    names = ("dx", "dres", "dweight", "dbias")
    for name, k, r, tol in zip(names, gk, gr, (act, act, par, par), strict=True):
        if r is None:
            assert k is None, name
            continue
        close(k, r, tol, name)
    torch.testing.assert_close(bk.running_mean, br.running_mean, **STATS_TOL)
    torch.testing.assert_close(bk.running_var, br.running_var, **STATS_TOL)
    assert bk.num_batches_tracked.item() == br.num_batches_tracked.item() == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_eval_uses_running_stats(dtype):
    x, res, w, b = make_case((2, 24, 5, 5), dtype, True, True, 7)
    (yk, *gk), (yr, *gr), bk, br = run_pair(x, res, w, b, True, False, 7, 8)
    act, par = TOL[dtype]
    close(yk, yr, act, "y")
    for k, r, tol in zip(gk, gr, (act, act, par, par), strict=True):
        close(k, r, tol, "grad")
    # Eval leaves the buffers alone.
    torch.testing.assert_close(bk.running_mean, br.running_mean, rtol=0, atol=0)
    assert bk.num_batches_tracked.item() == 0


def test_many_partials_and_repeated_steps(monkeypatch):
    """Several tiles per program and several programs per channel (the GPU's layout at batch
    128, forced at a small shape), and running statistics over three steps with a large mean
    (where E[x^2] - E[x]^2 would lose digits)."""
    monkeypatch.setattr(batchnorm, "_TARGET_PARTIALS", 2)
    c = 5
    bk = torch.nn.BatchNorm2d(c).to(DEV)
    mean64 = torch.zeros(c, dtype=torch.float64)
    var64 = torch.ones(c, dtype=torch.float64)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x = channels_last(torch.randn(3, c, 20, 20, generator=g) + 300.0).to(DEV)
        assert batchnorm._iters(3 * 20 * 20, batchnorm._tiles(1200, c)[0]) > 1
        yk = batchnorm.batch_norm_act(x, bk, None, relu=False)
        # The reference is float64 on the same fp32 inputs: at a mean of 300 eager fp32 BN itself
        # is off by 1e-4 to 6e-4, depending on its thread count (measured), too noisy to judge by.
        x64 = x.double().cpu()
        y64 = F.batch_norm(x64, None, None, bk.weight.double().detach().cpu(),
                           bk.bias.double().detach().cpu(), training=True, eps=bk.eps)
        # x's fp32 ulp at 300 is 3e-5: 2e-4 allows a few ulps in (x - mean).
        torch.testing.assert_close(yk.double().cpu(), y64, rtol=0, atol=2e-4)
        m = x64.mean((0, 2, 3))
        v = x64.var((0, 2, 3), unbiased=True)
        mean64, var64 = 0.9 * mean64 + 0.1 * m, 0.9 * var64 + 0.1 * v
    torch.testing.assert_close(bk.running_mean.double().cpu(), mean64, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(bk.running_var.double().cpu(), var64, rtol=1e-4, atol=1e-5)
    assert bk.num_batches_tracked.item() == 3


def test_one_value_per_channel_is_an_error_like_eager():
    x = torch.randn(1, 4, 1, 1, device=DEV)
    bn = torch.nn.BatchNorm2d(4).to(DEV)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batchnorm.batch_norm_act(x, bn)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_nan_propagates_through_the_fused_relu_like_eager(residual):
    """A NaN entry stays NaN through BN + add + ReLU in eval mode, as torch.relu keeps it (Triton's
    maximum would turn it into 0 and hide a diverged run's NaN from its loss)."""
    bn = torch.nn.BatchNorm2d(3).eval()
    x = torch.randn(2, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    x[1, 2, 3, 4] = float("nan")
    res = torch.randn_like(x) if residual else None
    got = batchnorm.batch_norm_act(x, bn, res, relu=True)
    want = F.relu(bn(x) + (res if residual else 0))
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got).sum() == 1
    ok = ~torch.isnan(want)
    torch.testing.assert_close(got[ok], want[ok], rtol=1e-5, atol=1e-6)
