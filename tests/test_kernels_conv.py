"""fastres.kernels.conv (implicit-GEMM convolution + BN statistics epilogue) against F.conv2d.

Every kernel size, stride and padding of the nine structures appears: stems F0 = 3..11 with
P0 = (F0-1)/2 at stride 1 from 3 channels, block convs F1 = 3, 5, 7 at stride 1 and 2, and the
1x1 stride-2 projection; spatial 32, 16, 8, 4 and odd 7 and 9; batch 1 to 3; channel counts
3, 10, 24 and 72 -> 136 (several K and N tiles). Big kernels run on small maps: the interpreter
pays per tap.

Data: seeded from each case's name with a stable digest, so every run tests the same numbers.

References, per case:
  exact  F.conv2d in float64 on the same (rounded) input values, NCHW: no oneDNN path, no
         rounding worth the name, on every CPU.
  aten   F.conv2d in the case's dtype on the same inputs, in the memory format aten trusts on
         this device (fastres.kernels.conv.backward_format): what eager PyTorch computes there.
Errors are max |error| over the tensor's largest entry (conftest.scaled_error); outputs and
gradients are O(1) (weights scaled by 1/sqrt(fan-in)). Bounds, from the arithmetic:
  fp32  everything within 1e-5 of exact: fp32 sums of at most 1,224 products (72 channels x 17
        taps), error ~ sqrt(K) u32 |terms| with u32 = 6e-8, well under 1e-5 at this scale.
  bf16  forward within 2**-8 of exact: fp32 accumulation and one rounding to bf16 (u = 2**-8,
        half an ulp per entry); within 2**-7 of aten's bf16 forward (each side 2**-8 from exact).
        Gradients (computed by aten's convolution_backward in bf16 on both sides) within 2**-7
        of aten's own, and within 2**-5 of exact: aten's CPU bf16 backward rounds to bf16 between
        blocked reductions (measured on an AMD EPYC: 1% of the largest entry), i.e. a few u; a
        wrong gradient is off by O(1).
  statistics: the partial sums match the stored output's channel sums to 1e-5 of the sum of
  |values| and the merged mean / rstd match the output's own to rtol 1e-4.
"""

import pytest
import torch
import torch.nn.functional as F

from fastres.kernels import batchnorm, conv

from .conftest import assert_scaled_close, stable_seed

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32_REL = 1e-5
B16_FWD_EXACT, B16_FWD_ATEN, B16_GRAD_ATEN, B16_GRAD_EXACT = 2**-8, 2**-7, 2**-7, 2**-5


# Every test: outputs poisoned before kernels run, IEEE fp32 on both sides (conftest).
pytestmark = pytest.mark.usefixtures("poisoned_ieee_fp32")


F32, B16 = torch.float32, torch.bfloat16
CASES = [  # (batch, c_in, c_out, size, kernel, stride, padding, dtype)
    # stems
    (1, 3, 10, 32, 3, 1, 1, F32), (2, 3, 24, 16, 5, 1, 2, B16), (1, 3, 10, 8, 7, 1, 3, F32),
    (2, 3, 10, 8, 9, 1, 4, B16), (1, 3, 24, 8, 11, 1, 5, F32), (1, 3, 10, 7, 11, 1, 5, B16),
    # block convs, stride 1
    (2, 10, 10, 16, 3, 1, 1, F32), (2, 24, 24, 8, 5, 1, 2, B16), (1, 10, 24, 7, 7, 1, 3, F32),
    (3, 24, 10, 4, 3, 1, 1, B16), (2, 24, 24, 4, 7, 1, 3, F32),
    # block convs, stride 2
    (1, 10, 24, 32, 3, 2, 1, B16), (2, 10, 24, 9, 5, 2, 2, F32), (2, 24, 24, 8, 7, 2, 3, B16),
    (2, 24, 10, 4, 3, 2, 1, F32),
    # 1x1 projection shortcuts
    (2, 10, 24, 16, 1, 2, 0, F32), (1, 24, 24, 7, 1, 2, 0, B16),
    # several K and N tiles
    (2, 72, 136, 4, 3, 1, 1, F32), (2, 72, 136, 5, 3, 2, 1, B16),
]


def case_id(c) -> str:
    n, ci, co, h, k, s, p, dt = c
    return f"n{n}-{ci}to{co}-{h}px-k{k}s{s}p{p}-{'fp32' if dt == F32 else 'bf16'}"


def conv_with_grads(x, w, dy, stride, pad, fmt=None):
    """F.conv2d's output and (dx, dw) for upstream gradient dy, in memory format fmt."""
    if fmt is not None:
        x, w = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
        dy = dy.contiguous(memory_format=fmt)
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    out = F.conv2d(x, w, stride=stride, padding=pad)
    out.backward(dy)
    return out.detach(), x.grad, w.grad


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_conv_and_stats_match_eager(case):
    n, c_in, c_out, size, k, stride, pad, dtype = case
    g = torch.Generator().manual_seed(stable_seed(case_id(case)))
    x = torch.randn(n, c_in, size, size, generator=g).to(dtype)
    w = (torch.randn(c_out, c_in, k, k, generator=g) / (c_in * k * k) ** 0.5).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last).to(DEV)
    w = w.to(DEV)
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    out, partials = conv.conv2d(xk, wk, stride, pad, stats=True)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn(out.shape, generator=g).to(dtype).to(DEV)
    out.backward(dy.contiguous(memory_format=torch.channels_last))
    exact = conv_with_grads(x.double(), w.double(), dy.double(), stride, pad,
                            torch.contiguous_format)
    names = ("output", "dx", "dw")
    mine = (out.detach(), xk.grad, wk.grad)
    if dtype == torch.float32:
        for name, a, e in zip(names, mine, exact, strict=True):
            assert_scaled_close(a, e, F32_REL, name)
    else:
        aten = conv_with_grads(x, w, dy, stride, pad, conv.backward_format(x.device))
        assert_scaled_close(mine[0], exact[0], B16_FWD_EXACT, "output vs exact")
        assert_scaled_close(mine[0], aten[0], B16_FWD_ATEN, "output vs aten bf16")
        for name, a, r, e in zip(names[1:], mine[1:], aten[1:], exact[1:], strict=True):
            assert a.dtype == dtype, name
            assert_scaled_close(a, r, B16_GRAD_ATEN, f"{name} vs aten bf16")
            assert_scaled_close(a, e, B16_GRAD_EXACT, f"{name} vs exact")

    assert_stats_of_stored_values(out, partials)


def assert_stats_of_stored_values(out: torch.Tensor, partials) -> None:
    """The fused per-channel statistics against those of the stored output, which is what
    eager BatchNorm would read: partial sums, then batch mean, rstd and running variance."""
    v = out.detach().float()
    channels = v.shape[1]
    scale = v.abs().sum((0, 2, 3))
    torch.testing.assert_close(partials.sums.sum(0), v.sum((0, 2, 3)), rtol=0,
                               atol=1e-5 * scale.max().item())
    rm, rv = torch.zeros(channels, device=DEV), torch.ones(channels, device=DEV)
    mean, rstd = batchnorm.batch_stats(out, rm, rv, partials=partials)
    torch.testing.assert_close(mean, v.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    var = v.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(rstd, torch.rsqrt(var + 1e-5), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rv, 0.9 + 0.1 * v.var((0, 2, 3), unbiased=True), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("c_in", [4, 6, 7, 8])
@pytest.mark.parametrize("grad_format", ["nchw", "channels_last"])
def test_shortcut_backward_with_any_grad_format(c_in, grad_format):
    """Regression (issue 8): a 1x1 stride-2 projection with a channels-last input and an NCHW
    grad_output got a weight gradient 25x-100x too large on an AMD CPU whenever the channel
    count was not a multiple of 8 (aten read the gradient as if it were channels-last). The
    backward now hands aten one format; whatever format the gradient arrives in, the result
    is the float64 one."""
    g = torch.Generator().manual_seed(stable_seed("shortcut", c_in, grad_format))
    x = torch.randn(5, c_in, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(2 * c_in, c_in, 1, 1, generator=g)
    dy = torch.randn(5, 2 * c_in, 8, 8, generator=g)
    x, w, dy = x.to(DEV), w.to(DEV), dy.to(DEV)
    if grad_format == "channels_last":
        dy = dy.contiguous(memory_format=torch.channels_last)
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    out, _ = conv.conv2d(xk, wk, 2, 0, stats=True)
    out.backward(dy)
    _, dx, dw = conv_with_grads(x.double(), w.double(), dy.double(), 2, 0,
                                torch.contiguous_format)
    assert_scaled_close(xk.grad, dx, F32_REL, "dx")
    assert_scaled_close(wk.grad, dw, F32_REL, "dw")


def test_without_stats_and_from_nchw_input():
    x = torch.randn(2, 10, 8, 8, device=DEV)  # plain NCHW: the op takes its own NHWC copy
    w = torch.randn(24, 10, 3, 3, device=DEV) / 9
    out, partials = conv.conv2d(x, w, 1, 1, stats=False)
    assert partials is None
    assert_scaled_close(out, F.conv2d(x.double(), w.double(), padding=1), F32_REL)


def test_bad_shapes_are_clear_errors():
    x = torch.randn(1, 10, 8, 8, device=DEV)
    with pytest.raises(ValueError, match="input channels"):
        conv.conv2d(x, torch.randn(4, 3, 3, 3, device=DEV), 1, 1)
    with pytest.raises(ValueError, match="leaves no output"):
        conv.conv2d(x, torch.randn(4, 10, 11, 11, device=DEV), 1, 0)
    with pytest.raises(TypeError, match="weight is"):
        conv.conv2d(x, torch.randn(4, 10, 3, 3, device=DEV, dtype=torch.bfloat16), 1, 1)
