"""Convolution as an implicit GEMM in Triton, with BatchNorm's statistics in its epilogue.

x is NCHW in channels-last memory (so an NHWC array), the weight is repacked to
(KH, KW, C_in, C_out), and the output is the (M = N*OH*OW, C_out) matrix
    out[m, co] = sum over (kh, kw, ci) of x[n, oh*s - p + kh, ow*s - p + kw, ci] * w[kh, kw, ci, co]
computed tile by tile: each program owns BLOCK_M output pixels x BLOCK_N output channels and
loads its A tiles straight from x (zeros where the window hangs over the padding), so no im2col
buffer is ever written. While the finished tile is still in registers the epilogue reduces it
per channel to (sum, sum of squared deviations from the tile's mean): the Partials that
kernels/batchnorm.py merges, so BatchNorm needs no pass over the output to find its statistics.

Groups (F.conv2d's `groups`; run arrays make every conv of R runs one conv with groups=R): group
g maps input channels [g*C_in/G, (g+1)*C_in/G) to output channels [g*C_out/G, (g+1)*C_out/G),
so it is a third grid axis; a program offsets its x channels and weight columns by its group and
never mixes groups in one tile. The statistics stay per output channel, i.e. per group.

Backward: aten's convolution_backward (cuDNN's dgrad and wgrad on the GPU) with the same groups,
handed tensors of one memory format (see backward_format). Why not Triton: the fused statistic
is a forward-only saving; the two backward GEMMs have nothing to fuse (BatchNorm's backward
already produced their input), and cuDNN's per-shape tuned kernels are at least as fast as an
implicit GEMM we would have to tune for every shape of the nine structures.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastres.kernels._common import (
    INTERPRET,
    cast,
    check_device,
    define_op,
    empty,
    launch,
    next_pow2,
    nhwc,
)
from fastres.kernels.batchnorm import Partials
from fastres.study.models import strictly


def out_size(size: int, kernel: int, padding: int, stride: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def config(m: int, c_in: int, c_out: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for an (m x c_out) output over c_in input channels (per
    group: a tile never spans two); a pure function of the shape so the fake (meta)
    implementation knows the partials' shape."""
    block_n = min(max(16, next_pow2(c_out)), 128)
    block_k = min(max(16, next_pow2(c_in)), 64)
    block_m = 128 if m >= 128 * 264 else 64  # keep >= 2 waves of programs on 132 SMs
    return block_m, block_n, block_k


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, out_ptr, psum_ptr, pm2_ptr,
                     H, W, C_IN, OH, OW, C_OUT, M, C_IN_G, C_OUT_G,
                     STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                     STATS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # C_IN / C_OUT are x's and out's row lengths (all groups); C_IN_G / C_OUT_G one group's.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    grp = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = local < C_OUT_G  # a tile's last columns must not spill into the next group
    cols = grp * C_OUT_G + local
    img = rows // (OH * OW)
    pix = rows % (OH * OW)
    ih0 = (pix // OW) * STRIDE - PAD
    iw0 = (pix % OW) * STRIDE - PAD
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    # One flat loop over (tap, channel block) rather than three nested ones: Triton software-
    # pipelines only a loop's own body, and with C_in <= BLOCK_K the innermost loop would have a
    # single trip, leaving every load exposed.
    c_blocks = tl.cdiv(C_IN_G, BLOCK_K)
    for step in range(KH * KW * c_blocks):
        tap = step // c_blocks
        ci = (step % c_blocks) * BLOCK_K + ks
        kh = tap // KW
        kw = tap % KW
        ih = ih0 + kh
        iw = iw0 + kw
        ok = rmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        kmask = ci < C_IN_G
        base = ((img.to(tl.int64) * H + ih) * W + iw) * C_IN + grp * C_IN_G
        a = tl.load(x_ptr + base[:, None] + ci[None, :], mask=ok[:, None] & kmask[None, :],
                    other=0.0)
        b = tl.load(w_ptr + (tap * C_IN_G + ci)[:, None] * C_OUT + cols[None, :],
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:
            # The interpreter's dot multiplies bf16 bit patterns as integers; in fp32 the
            # products are exact, so this is the GPU's bf16 MMA math.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    out = cast(acc, out_ptr.dtype.element_ty)
    mask = rmask[:, None] & cmask[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * C_OUT + cols[None, :], out, mask=mask)
    if STATS:
        # Statistics of the stored (rounded) values, as eager BatchNorm reads them.
        v = tl.where(mask, out.to(tl.float32), 0.0)
        n = tl.sum(rmask.to(tl.float32), axis=0)
        s = tl.sum(v, axis=0)
        d = tl.where(mask, v - (s / n)[None, :], 0.0)
        tl.store(psum_ptr + pid_m * C_OUT + cols, s, mask=cmask)
        tl.store(pm2_ptr + pid_m * C_OUT + cols, tl.sum(d * d, axis=0), mask=cmask)


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows cuDNN's own setting, so the reference conv and this one round alike.
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32" if dtype == torch.float32 else "ieee"


def _shapes(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, groups: int):
    n, c_in, h, w = x.shape
    c_out, c_in_w, kh, kw = weight.shape
    if groups < 1 or c_in % groups or c_out % groups:
        raise ValueError(f"groups={groups} must divide both the input channels ({c_in}) and the "
                         f"output channels ({c_out})")
    if c_in_w * groups != c_in:
        per = "" if groups == 1 else f" per group; with groups={groups}"
        raise ValueError(f"weight has {c_in_w} input channels{per}, x has {c_in}")
    oh, ow = out_size(h, kh, padding, stride), out_size(w, kw, padding, stride)
    if oh < 1 or ow < 1:
        raise ValueError(f"a {kh}x{kw} kernel with padding {padding} leaves no output of a "
                         f"{h}x{w} input")
    m = n * oh * ow
    block_m, block_n, block_k = config(m, c_in_w, c_out // groups)
    return n, c_in, h, w, c_out, kh, kw, oh, ow, m, block_m, block_n, block_k


def _fwd_impl(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, stats: bool,
              groups: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_device(x)
    n, c_in, h, w, c_out, kh, kw, oh, ow, m, block_m, block_n, block_k = _shapes(
        x, weight, stride, padding, groups)
    if weight.dtype != x.dtype:
        raise TypeError(f"conv input is {x.dtype} but weight is {weight.dtype}")
    w_packed = weight.permute(2, 3, 1, 0).contiguous()  # (KH, KW, C_in / groups, C_out)
    out = empty((n, oh, ow, c_out), x.dtype, x.device)
    g = triton.cdiv(m, block_m) if stats else 0
    psum = empty((g, c_out), torch.float32, x.device)
    pm2 = empty((g, c_out), torch.float32, x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(c_out // groups, block_n), groups)
    launch(_conv_fwd_kernel)[grid](
        nhwc(x), w_packed, out, psum, pm2, h, w, c_in, oh, ow, c_out, m, c_in // groups,
        c_out // groups,
        STRIDE=stride, PAD=padding, KH=kh, KW=kw, STATS=stats, PRECISION=_precision(x.dtype),
        UPCAST=INTERPRET and x.dtype == torch.bfloat16, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k)
    return out.permute(0, 3, 1, 2), psum, pm2


def _fwd_fake(x, weight, stride, padding, stats, groups=1):
    n, _c_in, _h, _w, c_out, _kh, _kw, oh, ow, m, block_m, _bn, _bk = _shapes(
        x, weight, stride, padding, groups)
    g = triton.cdiv(m, block_m) if stats else 0
    out = x.new_empty((n, oh, ow, c_out)).permute(0, 3, 1, 2)
    return (out, x.new_empty((g, c_out), dtype=torch.float32),
            x.new_empty((g, c_out), dtype=torch.float32))


_fwd_op = define_op("conv2d_stats", _fwd_impl, _fwd_fake)


def _setup(ctx, inputs, output) -> None:
    x, weight, stride, padding, _stats, groups = inputs  # the schema fills in default groups
    ctx.save_for_backward(x, weight)
    ctx.stride, ctx.padding, ctx.groups = stride, padding, groups
    ctx.mark_non_differentiable(output[1], output[2])


def backward_format(device: torch.device) -> torch.memory_format:
    """The one memory format the backward hands aten, for grad_out, x and weight alike.

    aten picks its algorithm from the input's format and trusts the others to match: a
    channels-last x with an NCHW grad_out gave a weight gradient 25x too large on an AMD CPU
    (oneDNN read out of bounds). On the CPU even matching channels-last tensors are not safe
    (oneDNN's channels-last backward is wrong at some odd shapes), so the CPU gets contiguous
    NCHW; cuDNN's fastest path on the GPU is channels-last."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def _backward(ctx, grad_out: torch.Tensor, _gsum, _gm2):
    x, weight = ctx.saved_tensors
    s, p = ctx.stride, ctx.padding
    fmt = backward_format(x.device)
    dx, dw, _ = torch.ops.aten.convolution_backward(
        strictly(grad_out, fmt), strictly(x, fmt), strictly(weight, fmt), None, [s, s], [p, p],
        [1, 1], False, [0, 0], ctx.groups,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
    return dx, dw, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 0,
           stats: bool = True, groups: int = 1) -> tuple[torch.Tensor, Partials | None]:
    """F.conv2d(x, weight, stride=stride, padding=padding, groups=groups) (no bias, square
    stride/padding) on the implicit-GEMM kernel; with `stats`, also the output's per-channel
    Partials for BatchNorm. x is (N, C_in, H, W), weight (C_out, C_in / groups, KH, KW)."""
    out, psum, pm2 = _fwd_op(x, weight, stride, padding, stats, groups)
    if not stats:
        return out, None
    return out, Partials(psum, pm2, config(out.shape[0] * out.shape[2] * out.shape[3],
                                           weight.shape[1], weight.shape[0] // groups)[0])
