"""fastres.kernels.conv with groups (a run array's R runs as one convolution) against eager.

A grouped conv of R runs takes x (N, R*C_in, H, W) and a weight (R*C_out, C_in, k, k); run r
maps channels [r*C_in, (r+1)*C_in) to [r*C_out, (r+1)*C_out). Cases cover R = 1, 2, 3, odd
channel counts per run (3, 5, 7 in, 5 out: every tile is partly masked, so a tile spilling into
the next run's columns or channels would show), batch 1 and 3, odd 7x7 and 9x9 maps, stride 1
and 2, kernels 1 and 3 with padding, fp32 and bf16, x in NCHW and in channels-last memory (dy in
the other format), and one case with several K and N tiles per run (72 -> 136).

Data: seeded from each case's name with a stable digest, so every run tests the same numbers.

References, per case:
  exact    F.conv2d(groups=R) in float64 on the same (rounded) values, NCHW.
  aten     F.conv2d(groups=R) in the case's dtype, in the memory format aten trusts on this
           device (fastres.kernels.conv.backward_format): what eager PyTorch computes there.
  per-run  R dense F.conv2d in the case's dtype on the channel slices, concatenated: what the
           runs compute alone.
Errors are max |error| over the tensor's largest entry (conftest.scaled_error); outputs and
gradients are O(1) (weights scaled by 1/sqrt(fan-in)). Bounds, as in test_kernels_conv.py:
  fp32  everything within 1e-5 of each reference: fp32 sums of at most 648 products (72
        channels x 9 taps), error ~ sqrt(K) u32 |terms| with u32 = 6e-8.
  bf16  forward within 2**-8 of exact (fp32 accumulation, one rounding to bf16: half an ulp)
        and 2**-7 of aten and per-run (each side 2**-8 from exact). Gradients: aten's bf16
        convolution_backward on both our side and aten's, so within 2**-7 of aten's; within
        2**-5 of exact (aten's CPU bf16 backward rounds between blocked reductions, ~1% of the
        largest entry measured on an AMD EPYC); the per-run reference is a different aten
        kernel, each within 2**-5 of exact, so within 2**-4 of ours. A wrong group is off by O(1).
  statistics: per output channel (so per run), checked as test_kernels_conv.py does.
Beyond tolerances: per run, the grouped kernel computes exactly the tiles of the dense kernel
on that run's slice (same block sizes, same loop order, the other runs' channels masked out),
so its output and partial statistics equal R dense Triton convs bit for bit; and groups=1 is
the ungrouped op bit for bit.
"""

import pytest
import torch
import torch.nn.functional as F

from fastres.kernels import _common, conv

from .conftest import assert_scaled_close, stable_seed
from .test_kernels_conv import assert_stats_of_stored_values

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32_REL = 1e-5
B16_FWD_EXACT, B16_FWD_EAGER, B16_GRAD_ATEN, B16_GRAD_EXACT, B16_GRAD_PER_RUN = (
    2**-8, 2**-7, 2**-7, 2**-5, 2**-4)

# Every test: outputs poisoned before kernels run, IEEE fp32 on both sides (conftest).
pytestmark = pytest.mark.usefixtures("poisoned_ieee_fp32")

F32, B16 = torch.float32, torch.bfloat16
NCHW, CL = torch.contiguous_format, torch.channels_last
CASES = [  # (runs, batch, c_in per run, c_out per run, size, kernel, stride, padding, dtype, x fmt)
    (1, 3, 3, 5, 7, 3, 1, 1, F32, CL), (1, 1, 7, 5, 9, 1, 2, 0, B16, NCHW),
    (2, 1, 3, 5, 9, 3, 2, 1, B16, NCHW), (2, 3, 5, 5, 7, 1, 2, 0, F32, NCHW),
    (2, 1, 7, 5, 9, 3, 1, 1, B16, CL), (2, 3, 3, 5, 9, 3, 1, 1, F32, CL),
    (3, 3, 7, 5, 9, 3, 2, 1, F32, CL), (3, 1, 5, 5, 7, 3, 1, 1, B16, NCHW),
    (3, 3, 3, 5, 7, 1, 1, 0, B16, CL), (3, 1, 5, 5, 9, 1, 2, 0, F32, NCHW),
    (3, 3, 5, 5, 9, 3, 1, 1, B16, CL),
    # several K and N tiles per run: the tile offsets within a run add to the run's offset
    (2, 1, 72, 136, 4, 3, 1, 1, F32, CL),
]


def case_id(c) -> str:
    r, n, ci, co, h, k, s, p, dt, fmt = c
    return (f"R{r}-n{n}-{ci}to{co}-{h}px-k{k}s{s}p{p}-{'fp32' if dt == F32 else 'bf16'}-"
            f"{'nchw' if fmt == NCHW else 'cl'}")


def make_case(case):
    runs, n, c_in, c_out, size, k, _s, _p, dtype, fmt = case
    g = torch.Generator().manual_seed(stable_seed("grouped", case_id(case)))
    x = torch.randn(n, runs * c_in, size, size, generator=g).to(dtype)
    w = (torch.randn(runs * c_out, c_in, k, k, generator=g) / (c_in * k * k) ** 0.5).to(dtype)
    return x.contiguous(memory_format=fmt).to(DEV), w.to(DEV), g


def conv_with_grads(x, w, dy, stride, pad, groups, fmt):
    """F.conv2d's output and (dx, dw) for upstream gradient dy, all in memory format fmt."""
    x, w, dy = (t.contiguous(memory_format=fmt) for t in (x, w, dy))
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    out = F.conv2d(x, w, stride=stride, padding=pad, groups=groups)
    out.backward(dy)
    return out.detach(), x.grad, w.grad


def per_run(x, w, dy, stride, pad, runs, fmt):
    """R dense convolutions on the runs' channel slices, results concatenated by run: output
    and dx along channels (dim 1), dw along output channels (dim 0)."""
    parts = [conv_with_grads(xr, wr, dyr, stride, pad, 1, fmt) for xr, wr, dyr in zip(
        x.chunk(runs, 1), w.chunk(runs, 0), dy.chunk(runs, 1), strict=True)]
    out, dx, dw = zip(*parts, strict=True)
    return torch.cat(out, 1), torch.cat(dx, 1), torch.cat(dw, 0)


def triton_with_grads(x, w, dy, stride, pad, **kw):
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    out, partials = conv.conv2d(xk, wk, stride, pad, stats=True, **kw)
    out.backward(dy)
    return out.detach(), partials, xk.grad, wk.grad


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_grouped_conv_and_stats_match_eager(case):
    runs, _n, _ci, c_out, _size, _k, stride, pad, dtype, fmt = case
    x, w, g = make_case(case)
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    out, partials = conv.conv2d(xk, wk, stride, pad, stats=True, groups=runs)
    assert out.dtype == dtype and out.shape[1] == runs * c_out
    assert out.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn(out.shape, generator=g).to(dtype).to(DEV)
    dy = dy.contiguous(memory_format=NCHW if fmt == CL else CL)  # the other format than x's
    out.backward(dy)
    mine = (out.detach(), xk.grad, wk.grad)
    names = ("output", "dx", "dw")
    exact = conv_with_grads(x.double(), w.double(), dy.double(), stride, pad, runs, NCHW)
    bfmt = conv.backward_format(x.device)
    aten = conv_with_grads(x, w, dy, stride, pad, runs, bfmt)
    alone = per_run(x, w, dy, stride, pad, runs, bfmt)
    for name, a, e, r, s in zip(names, mine, exact, aten, alone, strict=True):
        assert a.dtype == dtype and a.shape == e.shape, name
        if dtype == torch.float32:
            for ref, what in ((e, "exact"), (r, "aten"), (s, "per-run")):
                assert_scaled_close(a, ref, F32_REL, f"{name} vs {what}")
        elif name == "output":
            assert_scaled_close(a, e, B16_FWD_EXACT, "output vs exact")
            assert_scaled_close(a, r, B16_FWD_EAGER, "output vs aten bf16")
            assert_scaled_close(a, s, B16_FWD_EAGER, "output vs per-run bf16")
        else:
            assert_scaled_close(a, e, B16_GRAD_EXACT, f"{name} vs exact")
            assert_scaled_close(a, r, B16_GRAD_ATEN, f"{name} vs aten bf16")
            assert_scaled_close(a, s, B16_GRAD_PER_RUN, f"{name} vs per-run bf16")

    # Statistics of the stored values, per output channel (so per run).
    assert partials.sums.shape[1] == partials.m2.shape[1] == runs * c_out
    assert_stats_of_stored_values(out, partials)


@pytest.mark.parametrize("case", [CASES[4], CASES[6]], ids=case_id)
def test_grouped_equals_dense_triton_per_run(case):
    """Each run's slice of the grouped output and partials is the dense Triton conv's on that
    run's slice, bit for bit (see the module docstring for why exactly)."""
    runs, _n, _ci, _co, _size, _k, stride, pad, _dt, _fmt = case
    x, w, _g = make_case(case)
    out, partials = conv.conv2d(x, w, stride, pad, stats=True, groups=runs)
    for r, (xr, wr) in enumerate(zip(x.chunk(runs, 1), w.chunk(runs, 0), strict=True)):
        o, p = conv.conv2d(xr, wr, stride, pad, stats=True)
        assert torch.equal(out.chunk(runs, 1)[r], o), f"run {r} output"
        assert torch.equal(partials.sums.chunk(runs, 1)[r], p.sums), f"run {r} sums"
        assert torch.equal(partials.m2.chunk(runs, 1)[r], p.m2), f"run {r} m2"
        assert partials.rows == p.rows


@pytest.mark.parametrize("dtype", [F32, B16], ids=["fp32", "bf16"])
def test_groups_one_is_the_ungrouped_op_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(stable_seed("groups=1", str(dtype)))
    x = torch.randn(3, 7, 9, 9, generator=g).to(dtype).contiguous(memory_format=CL).to(DEV)
    w = (torch.randn(5, 7, 3, 3, generator=g) / 8).to(dtype).to(DEV)
    dy = torch.randn(3, 5, 5, 5, generator=g).to(dtype).to(DEV)
    plain = triton_with_grads(x, w, dy, 2, 1)
    grouped = triton_with_grads(x, w, dy, 2, 1, groups=1)
    for name, a, b in zip(("output", "partials", "dx", "dw"), plain, grouped, strict=True):
        if name == "partials":
            assert torch.equal(a.sums, b.sums) and torch.equal(a.m2, b.m2) and a.rows == b.rows
        else:
            assert torch.equal(a, b), name
    # The registered op, called without its defaulted last argument and with it.
    five = torch.ops.fastres.conv2d_stats(x, w, 2, 1, True)
    six = torch.ops.fastres.conv2d_stats(x, w, 2, 1, True, 1)
    assert all(torch.equal(a, b) for a, b in zip(five, six, strict=True))
    assert torch.equal(five[0], plain[0])


def test_groups_not_dividing_the_channels_are_clear_errors():
    x = torch.randn(1, 6, 7, 7, device=DEV)
    with pytest.raises(ValueError, match=r"groups=4 .*input channels \(6\).*output channels"):
        conv.conv2d(x, torch.randn(8, 1, 3, 3, device=DEV), 1, 1, groups=4)
    with pytest.raises(ValueError, match=r"groups=3 .*input channels \(6\).*output channels \(4\)"):
        conv.conv2d(x, torch.randn(4, 2, 3, 3, device=DEV), 1, 1, groups=3)
    with pytest.raises(ValueError, match="groups=0"):
        conv.conv2d(x, torch.randn(4, 6, 3, 3, device=DEV), 1, 1, groups=0)
    with pytest.raises(ValueError, match="3 input channels per group"):
        conv.conv2d(x, torch.randn(6, 3, 3, 3, device=DEV), 1, 1, groups=3)


@pytest.mark.skipif(_common.USE_TRITON_OP and _common.INTERPRET,
                    reason="a triton_op cannot be fake-traced under the interpreter (_common)")
def test_fake_implementation_knows_grouped_shapes():
    """torch.compile traces the op on fake tensors: same shapes and strides as the real op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(3, 15, 9, 9, device=DEV).contiguous(memory_format=CL)
    w = torch.randn(12, 5, 3, 3, device=DEV)
    real = torch.ops.fastres.conv2d_stats(x, w, 2, 1, True, 3)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = torch.ops.fastres.conv2d_stats(mode.from_tensor(x), mode.from_tensor(w), 2, 1,
                                              True, 3)
    for r, f in zip(real, fake, strict=True):
        assert r.shape == f.shape and r.stride() == f.stride() and r.dtype == f.dtype
