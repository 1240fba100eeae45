"""BatchNorm (training or eval) + optional residual add + ReLU, forward and backward, in Triton.

Tensors are NCHW with channels-last memory, so each one is an (M, C) row-major matrix with
M = N*H*W: a channel is a column, and every kernel below tiles (BLOCK_M rows, BLOCK_C columns).

Passes over memory (training):
  statistics  one read of x, unless the convolution's epilogue already produced them
              (kernels/conv.py), then only a tiny finalize over its per-tile partials;
  forward     one read of x (+ residual), one write of y;
  backward    two reads of (dy, x, y): a per-channel reduction of dz and dz*xhat, then the
              elementwise dx (and dres). xhat and the ReLU mask are recomputed from x and y rather
              than stored: y is kept alive anyway as the next layer's input.
Partial statistics are per tile (count, sum, sum of squared deviations from the tile mean) and
merged with Chan et al.'s formula: no E[x^2] - E[x]^2 cancellation, and deterministic (no
atomics), so a run is bit-reproducible on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastres.kernels._common import (
    cast,
    check_device,
    define_op,
    empty,
    launch,
    next_pow2,
    nhwc,
)

# Rows of partial statistics aimed for per channel: enough programs to fill an H200's 132 SMs a
# few times over, few enough that the finalize reads a negligible amount.
_TARGET_PARTIALS = 512


def _tiles(m: int, c: int) -> tuple[int, int]:
    block_c = min(next_pow2(c), 64)
    block_m = max(16, min(4096 // block_c, next_pow2(m)))
    return block_m, block_c


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _partial_stats_kernel(x_ptr, psum_ptr, pm2_ptr, M, C, ROWS,
                          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ITERS: tl.constexpr):
    """Partial g: count, sum and centred sum of squares of rows [g*ROWS, (g+1)*ROWS)."""
    g = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    n_acc = tl.zeros((BLOCK_C,), tl.float32)
    mean_acc = tl.zeros((BLOCK_C,), tl.float32)
    m2_acc = tl.zeros((BLOCK_C,), tl.float32)
    for i in range(ITERS):
        rows = g * ROWS + i * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        n = tl.sum(rmask.to(tl.float32), axis=0)
        s = tl.sum(x, axis=0)
        mean = s / tl.maximum(n, 1.0)
        d = tl.where(mask, x - mean[None, :], 0.0)
        m2 = tl.sum(d * d, axis=0)
        # Chan's merge of (n_acc, mean_acc, m2_acc) with this chunk's (n, mean, m2).
        tot = n_acc + n
        delta = mean - mean_acc
        frac = n / tl.maximum(tot, 1.0)
        mean_acc = mean_acc + delta * frac
        m2_acc = m2_acc + m2 + delta * delta * n_acc * frac
        n_acc = tot
    tl.store(psum_ptr + g * C + cols, mean_acc * n_acc, mask=cmask)
    tl.store(pm2_ptr + g * C + cols, m2_acc, mask=cmask)


@triton.jit
def _finalize_kernel(psum_ptr, pm2_ptr, mean_ptr, rstd_ptr, rmean_ptr, rvar_ptr,
                     G, C, M, ROWS, eps, momentum, bessel,
                     BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge G partials into each channel's mean and 1/sqrt(var + eps); update running stats
    like nn.BatchNorm2d: r = (1 - momentum) * r + momentum * stat, var unbiased (M / (M - 1))."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    total = tl.zeros((BLOCK_C,), tl.float32)
    for g0 in range(0, G, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        mask = (gs < G)[:, None] & cmask[None, :]
        total += tl.sum(tl.load(psum_ptr + gs[:, None] * C + cols[None, :], mask=mask,
                                other=0.0), axis=0)
    mean = total / M
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for g0 in range(0, G, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        gmask = gs < G
        mask = gmask[:, None] & cmask[None, :]
        n = tl.where(gmask, tl.minimum(ROWS, M - gs * ROWS), 0).to(tl.float32)
        s = tl.load(psum_ptr + gs[:, None] * C + cols[None, :], mask=mask, other=0.0)
        q = tl.load(pm2_ptr + gs[:, None] * C + cols[None, :], mask=mask, other=0.0)
        d = s / tl.maximum(n, 1.0)[:, None] - mean[None, :]
        m2 += tl.sum(tl.where(mask, q + n[:, None] * d * d, 0.0), axis=0)
    var = tl.maximum(m2 / M, 0.0)
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(rstd_ptr + cols, tl.div_rn(1.0, tl.sqrt_rn(var + eps)), mask=cmask)
    rm = tl.load(rmean_ptr + cols, mask=cmask)
    rv = tl.load(rvar_ptr + cols, mask=cmask)
    tl.store(rmean_ptr + cols, (1.0 - momentum) * rm + momentum * mean, mask=cmask)
    tl.store(rvar_ptr + cols, (1.0 - momentum) * rv + momentum * var * bessel, mask=cmask)


@triton.jit
def _fwd_kernel(x_ptr, res_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, M, C,
                HAS_RES: tl.constexpr, RELU: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows < M)[:, None] & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    # Fold BN into one multiply-add per element: scale = w * rstd, shift = b - mean * scale.
    scale = tl.load(w_ptr + cols, mask=cmask).to(tl.float32) * tl.load(rstd_ptr + cols, mask=cmask)
    shift = tl.load(b_ptr + cols, mask=cmask).to(tl.float32) - tl.load(mean_ptr + cols,
                                                                       mask=cmask) * scale
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    z = x * scale[None, :] + shift[None, :]
    if HAS_RES:
        # Rounded to the storage dtype first, as eager's separate bn -> add kernels do.
        z = cast(z, y_ptr.dtype.element_ty).to(tl.float32) + tl.load(res_ptr + offs,
                                                                    mask=mask).to(tl.float32)
    if RELU:
        z = tl.where(z < 0.0, 0.0, z)  # NaN stays NaN, as torch.relu (tl.maximum drops it)
    tl.store(y_ptr + offs, cast(z, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_reduce_kernel(dy_ptr, x_ptr, y_ptr, mean_ptr, rstd_ptr, pdb_ptr, pdw_ptr, M, C, ROWS,
                       RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                       ITERS: tl.constexpr):
    """Partials of sum(dz) and sum(dz * xhat) per channel, dz = dy masked by the ReLU."""
    g = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + cols, mask=cmask, other=0.0)
    sdz = tl.zeros((BLOCK_C,), tl.float32)
    sdzx = tl.zeros((BLOCK_C,), tl.float32)
    for i in range(ITERS):
        rows = g * ROWS + i * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * C + cols[None, :]
        dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            dz = tl.where(tl.load(y_ptr + offs, mask=mask, other=0.0) > 0, dz, 0.0)
        xhat = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean[None, :]) \
            * rstd[None, :]
        sdz += tl.sum(dz, axis=0)
        sdzx += tl.sum(tl.where(mask, dz * xhat, 0.0), axis=0)
    tl.store(pdb_ptr + g * C + cols, sdz, mask=cmask)
    tl.store(pdw_ptr + g * C + cols, sdzx, mask=cmask)


@triton.jit
def _bwd_kernel(dy_ptr, x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, db_ptr, dw_ptr, dx_ptr, dres_ptr,
                M, C, RELU: tl.constexpr, HAS_RES: tl.constexpr, TRAINING: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows < M)[:, None] & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    dz = tl.load(dy_ptr + offs, mask=mask).to(tl.float32)
    if RELU:
        dz = tl.where(tl.load(y_ptr + offs, mask=mask) > 0, dz, 0.0)
    if HAS_RES:
        tl.store(dres_ptr + offs, cast(dz, dres_ptr.dtype.element_ty), mask=mask)
    rstd = tl.load(rstd_ptr + cols, mask=cmask)
    scale = tl.load(w_ptr + cols, mask=cmask).to(tl.float32) * rstd
    if TRAINING:
        # Batch statistics depend on x: dx = w*rstd * (dz - mean(dz) - xhat * mean(dz*xhat)).
        mean = tl.load(mean_ptr + cols, mask=cmask)
        db = tl.load(db_ptr + cols, mask=cmask) / M
        dw = tl.load(dw_ptr + cols, mask=cmask) / M
        xhat = (tl.load(x_ptr + offs, mask=mask).to(tl.float32) - mean[None, :]) * rstd[None, :]
        dx = scale[None, :] * (dz - db[None, :] - xhat * dw[None, :])
    else:
        dx = scale[None, :] * dz
    tl.store(dx_ptr + offs, cast(dx, dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class Partials:
    """Per-tile statistics of an (M, C) tensor: partial g covers rows [g*rows, (g+1)*rows),
    sums (G, C) holds each tile's sum and m2 (G, C) its sum of squared deviations from the
    tile's own mean."""

    sums: torch.Tensor
    m2: torch.Tensor
    rows: int


def _iters(m: int, block_m: int) -> int:
    return triton.cdiv(triton.cdiv(m, block_m), _TARGET_PARTIALS)


def _partials_grid(m: int, c: int) -> tuple[int, int, int, int, int]:
    """(block_m, block_c, iters, rows per program, programs along M) of a per-channel reduction
    that leaves one partial row per program (summed on the host side: no atomics)."""
    block_m, block_c = _tiles(m, c)
    iters = _iters(m, block_m)
    rows = block_m * iters
    return block_m, block_c, iters, rows, triton.cdiv(m, rows)


def _partial_stats(x2: torch.Tensor) -> Partials:
    m, c = x2.shape
    block_m, block_c, iters, rows, g = _partials_grid(m, c)
    psum = empty((g, c), torch.float32, x2.device)
    pm2 = empty((g, c), torch.float32, x2.device)
    launch(_partial_stats_kernel)[(g, triton.cdiv(c, block_c))](
        x2, psum, pm2, m, c, rows, BLOCK_M=block_m, BLOCK_C=block_c, ITERS=iters)
    return Partials(psum, pm2, rows)


def _stats_impl(x: torch.Tensor, psum: torch.Tensor | None, pm2: torch.Tensor | None,
                rows: int, running_mean: torch.Tensor, running_var: torch.Tensor,
                momentum: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    check_device(x)
    n, c, h, w = x.shape
    m = n * h * w
    if m < 2:
        # nn.BatchNorm2d's own rule: one value per channel has no variance.
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"size {tuple(x.shape)}")
    if psum is None or pm2 is None:
        p = _partial_stats(nhwc(x).view(m, c))
        psum, pm2, rows = p.sums, p.m2, p.rows
    mean = empty((c,), torch.float32, x.device)
    rstd = empty((c,), torch.float32, x.device)
    block_c = min(next_pow2(c), 128)
    launch(_finalize_kernel)[(triton.cdiv(c, block_c),)](
        psum, pm2, mean, rstd, running_mean, running_var, psum.shape[0], c, m, rows, eps,
        momentum, m / (m - 1), BLOCK_G=32, BLOCK_C=block_c)
    return mean, rstd


def _stats_fake(x, psum, pm2, rows, running_mean, running_var, momentum, eps):
    c = x.shape[1]
    return x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32)


_stats_op = define_op("bn_batch_stats", _stats_impl, _stats_fake,
                      mutates_args=("running_mean", "running_var"))


def _out_like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    n, c, h, w = x.shape
    return empty((n, h, w, c), dtype or x.dtype, x.device).permute(0, 3, 1, 2)


def _fwd_impl(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
              residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
              training: bool, relu: bool) -> torch.Tensor:
    check_device(x)
    n, c, h, w = x.shape
    m = n * h * w
    x2 = nhwc(x).view(m, c)
    res2 = nhwc(residual).view(m, c) if residual is not None else x2
    y = _out_like(x)
    block_m, block_c = _tiles(m, c)
    launch(_fwd_kernel)[(triton.cdiv(m, block_m), triton.cdiv(c, block_c))](
        x2, res2, y, mean, rstd, weight, bias, m, c, HAS_RES=residual is not None, RELU=relu,
        BLOCK_M=block_m, BLOCK_C=block_c)
    return y


def _fwd_fake(x, mean, rstd, residual, weight, bias, training, relu):
    return _out_like(x)


_fwd_op = define_op("bn_act", _fwd_impl, _fwd_fake)


def _bwd_impl(dy: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor,
              rstd: torch.Tensor, weight: torch.Tensor, training: bool, relu: bool,
              has_res: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    m = n * h * w
    dy2, x2, y2 = nhwc(dy).view(m, c), nhwc(x).view(m, c), nhwc(y).view(m, c)
    block_m, block_c, iters, rows, g = _partials_grid(m, c)
    pdb = empty((g, c), torch.float32, x.device)
    pdw = empty((g, c), torch.float32, x.device)
    launch(_bwd_reduce_kernel)[(g, triton.cdiv(c, block_c))](
        dy2, x2, y2, mean, rstd, pdb, pdw, m, c, rows, RELU=relu, BLOCK_M=block_m,
        BLOCK_C=block_c, ITERS=iters)
    # A (G, C) column sum: small next to the passes over the activations, deterministic.
    db, dw = pdb.sum(0), pdw.sum(0)
    dx = _out_like(x)
    dres = _out_like(x, y.dtype) if has_res else x.new_empty((0,))
    launch(_bwd_kernel)[(triton.cdiv(m, block_m), triton.cdiv(c, block_c))](
        dy2, x2, y2, mean, rstd, weight, db, dw, dx, dres, m, c, RELU=relu, HAS_RES=has_res,
        TRAINING=training, BLOCK_M=block_m, BLOCK_C=block_c)
    return dx, dres, dw.to(weight.dtype), db.to(weight.dtype)


def _bwd_fake(dy, x, y, mean, rstd, weight, training, relu, has_res):
    c = x.shape[1]
    dres = _out_like(x, y.dtype) if has_res else x.new_empty((0,))
    return _out_like(x), dres, weight.new_empty((c,)), weight.new_empty((c,))


_bwd_op = define_op("bn_act_backward", _bwd_impl, _bwd_fake)


def _setup(ctx, inputs, output) -> None:
    x, mean, rstd, residual, weight, _bias, training, relu = inputs
    ctx.save_for_backward(x, output, mean, rstd, weight)
    ctx.training, ctx.relu, ctx.has_res = training, relu, residual is not None


def _backward(ctx, grad: torch.Tensor):
    x, y, mean, rstd, weight = ctx.saved_tensors
    dx, dres, dw, db = _bwd_op(grad, x, y, mean, rstd, weight, ctx.training, ctx.relu,
                               ctx.has_res)
    # mean and rstd get no gradient: in training they are functions of x, and dx above is the
    # full derivative through them; in eval they are buffers.
    return dx, None, None, (dres if ctx.has_res else None), dw, db, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------- public API


def batch_stats(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                momentum: float = 0.1, eps: float = 1e-5, partials: Partials | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-mode statistics of NCHW `x` per channel: (mean, 1/sqrt(biased var + eps)), fp32.
    Updates running_mean / running_var in place as nn.BatchNorm2d does. With `partials` (from
    the fused convolution) x is not read at all."""
    if partials is None:
        return _stats_op(x.detach(), None, None, 0, running_mean, running_var, momentum, eps)
    return _stats_op(x.detach(), partials.sums, partials.m2, partials.rows, running_mean,
                     running_var, momentum, eps)


def eval_stats(running_mean: torch.Tensor, running_var: torch.Tensor, eps: float = 1e-5
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval mode: the running statistics, as (mean, rstd)."""
    return running_mean, torch.rsqrt(running_var + eps)


def bn_act(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor, residual: torch.Tensor | None = None, relu: bool = True,
           training: bool = True) -> torch.Tensor:
    """relu?((x - mean) * rstd * weight + bias (+ residual)), differentiable in x, residual,
    weight and bias. `training` says mean and rstd are x's own batch statistics (they enter the
    backward); False means they are constants (eval)."""
    return _fwd_op(x, mean, rstd, residual, weight, bias, training, relu)


def batch_norm_act(x: torch.Tensor, bn: torch.nn.BatchNorm2d, residual: torch.Tensor | None = None,
                   relu: bool = True, partials: Partials | None = None) -> torch.Tensor:
    """nn.BatchNorm2d `bn` (its mode, parameters and buffers) applied to x, then + residual,
    then ReLU: the eager `relu(bn(x) + residual)` on the Triton kernels."""
    if bn.momentum is None or not bn.affine or not bn.track_running_stats:
        raise ValueError("the Triton BatchNorm needs affine=True, track_running_stats=True and "
                         "a momentum (the paper's PyTorch defaults)")
    if bn.training:
        mean, rstd = batch_stats(x, bn.running_mean, bn.running_var, bn.momentum, bn.eps,
                                 partials)
        bn.num_batches_tracked.add_(1)
    else:
        mean, rstd = eval_stats(bn.running_mean, bn.running_var, bn.eps)
    return bn_act(x, mean, rstd, bn.weight, bn.bias, residual, relu, bn.training)
