"""fastres.kernels.conv (implicit-GEMM convolution + BN statistics epilogue) against F.conv2d.

Every kernel size, stride and padding of the nine structures appears: stems F0 = 3..11 with
P0 = (F0-1)/2 at stride 1 from 3 channels, block convs F1 = 3, 5, 7 at stride 1 and 2, and the
1x1 stride-2 projection; spatial 32, 16, 8, 4 and odd 7 and 9; batch 1 to 3; channel counts
3, 10, 24 and 72 -> 136 (several K and N tiles). Big kernels run on small maps: the interpreter
pays per tap.

Reference: eager F.conv2d in fp32 on the same values. Tolerances (outputs are O(1): the weights
are scaled by 1/sqrt(fan-in)):
  fp32  output and grads rtol 1e-4, atol 1e-4 (TF32 off on a GPU, for both sides)
  bf16  output rtol 2**-7, atol 1e-2 (fp32 accumulation, one rounding); grads (aten's bf16
        backward) rtol 2e-2, atol 2e-2
  statistics: the partial sums match the stored output's channel sums to rtol 1e-5 of the
  sum of |values| and the merged mean / rstd match the output's own to rtol 1e-4.
"""

import pytest
import torch
import torch.nn.functional as F
from fastres.kernels import batchnorm, conv

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: (dict(rtol=1e-4, atol=1e-4), dict(rtol=1e-4, atol=1e-4)),
       torch.bfloat16: (dict(rtol=2**-7, atol=1e-2), dict(rtol=2e-2, atol=2e-2))}


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


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_conv_and_stats_match_eager(case):
    n, c_in, c_out, size, k, stride, pad, dtype = case
    g = torch.Generator().manual_seed(hash(case_id(case)) % 10_000)
    x = torch.randn(n, c_in, size, size, generator=g).to(dtype)
    w = (torch.randn(c_out, c_in, k, k, generator=g) / (c_in * k * k) ** 0.5).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last).to(DEV)
    w = w.to(DEV)
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    out, partials = conv.conv2d(xk, wk, stride, pad, stats=True)
    xr, wr = x.float().requires_grad_(), w.float().requires_grad_()
    ref = F.conv2d(xr, wr, stride=stride, padding=pad)
    act, grad = TOL[dtype]
    assert out.shape == ref.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), ref, **act)

    # Statistics of the stored values, which is what eager BatchNorm would read.
    v = out.detach().float()
    sums = partials.sums.sum(0)
    scale = v.abs().sum((0, 2, 3))
    torch.testing.assert_close(sums, v.sum((0, 2, 3)), rtol=0, atol=1e-5 * scale.max().item())
    rm, rv = torch.zeros(c_out, device=DEV), torch.ones(c_out, device=DEV)
    mean, rstd = batchnorm.batch_stats(out, rm, rv, partials=partials)
    torch.testing.assert_close(mean, v.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    var = v.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(rstd, torch.rsqrt(var + 1e-5), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rv, 0.9 + 0.1 * v.var((0, 2, 3), unbiased=True), rtol=1e-5,
                               atol=1e-6)

    dy = torch.randn(ref.shape, generator=g).to(DEV)
    out.backward(dy.to(dtype).contiguous(memory_format=torch.channels_last))
    ref.backward(dy.to(dtype).float())
    torch.testing.assert_close(xk.grad.float(), xr.grad, **grad)
    torch.testing.assert_close(wk.grad.float(), wr.grad, **grad)


def test_without_stats_and_from_nchw_input():
    x = torch.randn(2, 10, 8, 8, device=DEV)  # plain NCHW: the op takes its own NHWC copy
    w = torch.randn(24, 10, 3, 3, device=DEV) / 9
    out, partials = conv.conv2d(x, w, 1, 1, stats=False)
    assert partials is None
    torch.testing.assert_close(out, F.conv2d(x, w, padding=1), **TOL[F32][0])


def test_bad_shapes_are_clear_errors():
    x = torch.randn(1, 10, 8, 8, device=DEV)
    with pytest.raises(ValueError, match="input channels"):
        conv.conv2d(x, torch.randn(4, 3, 3, 3, device=DEV), 1, 1)
    with pytest.raises(ValueError, match="leaves no output"):
        conv.conv2d(x, torch.randn(4, 10, 11, 11, device=DEV), 1, 0)
    with pytest.raises(TypeError, match="weight is"):
        conv.conv2d(x, torch.randn(4, 10, 3, 3, device=DEV, dtype=torch.bfloat16), 1, 1)
