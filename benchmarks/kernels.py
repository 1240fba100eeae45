"""Benchmark fastres.kernels against eager PyTorch and torch.compile, at the model's real shapes.

    python benchmarks/kernels.py                      # GPU: structures 1 and 6, batch 128, bf16
    python benchmarks/kernels.py --structure 1 --dtype fp32
    python benchmarks/kernels.py --smoke              # CPU: tiny shapes, proves the script runs

For each kernel and each distinct shape it meets in the structure (with how many layers have it):
  augment       uint8 batch -> crop + flip + normalise -> float (triton kernel vs the plain-torch
                loader path vs that path under torch.compile), forward only;
  bn_add_relu   BatchNorm(train) + residual add + ReLU, forward and backward (triton: batch_stats
                + bn_act; eager: F.batch_norm, +, F.relu with autograd; compiled: the same
                function under torch.compile);
  conv_stats    the convolution plus its per-channel statistics, forward (triton: the implicit
                GEMM with the statistics epilogue; eager: F.conv2d (cuDNN) then torch.var_mean;
                compiled: the same under torch.compile).
Times are triton.testing.do_bench medians (ms). Rates: augment and bn_add_relu report the bytes
that must move (augment: uint8 in + float out; bn_add_relu: forward reads x and the residual and
writes y, backward reads dy, x, y and writes dx and dresidual: 8 activation-sized transfers; the
statistics read of x is not counted, since in the model the convolution supplies them) over the
measured device-to-device copy bandwidth; conv_stats reports TFLOP/s over the measured bf16/fp32
matmul rate. Targets on an H200 (structure 1, batch 128, bf16): bn_add_relu >= 70% of copy
bandwidth and faster than eager and compiled; conv_stats within 1.2x of eager (cuDNN + stats).

--smoke runs on the CPU under TRITON_INTERPRET=1 with structures shrunk to width 4, batch 2 and
8x8 images, a perf_counter median instead of do_bench, and torch.compile's "eager" backend
(dynamo only: inductor's C++ build would take minutes): its numbers mean nothing, only that every
path runs and the table is well formed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable

SMOKE = "--smoke" in sys.argv
if SMOKE and os.environ.get("TRITON_INTERPRET") != "1":
    import torch as _torch

    if not _torch.cuda.is_available():
        # Must precede importing fastres.kernels: triton.jit reads it at decoration time.
        os.environ["TRITON_INTERPRET"] = "1"
        print("# --smoke without a GPU: TRITON_INTERPRET=1 set (Triton interpreter on the CPU)")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastres.study.models import ResNet  # noqa: E402
from fastres.study.structures import STRUCTURES, ResNetSpec  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
COLUMNS = ("kernel", "shape", "layers", "triton ms", "eager ms", "compiled ms", "triton rate",
           "% of peak", "x eager", "x compiled")


def timer(device: torch.device, smoke: bool) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of fn()."""
    if smoke or device.type != "cuda":
        def bench(fn: Callable[[], object]) -> float:
            fn()  # warm-up (compilation)
            times = []
            for _ in range(3):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            return statistics.median(times)
        return bench
    from triton.testing import do_bench

    return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")


def peaks(device: torch.device, dtype: torch.dtype, bench, smoke: bool) -> tuple[float, float]:
    """(copy bandwidth in GB/s counting read + write, matmul TFLOP/s), measured here."""
    n = (1 << 20) if smoke else (1 << 28)
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    gbs = 2 * src.numel() * src.element_size() / (bench(lambda: dst.copy_(src)) * 1e-3) / 1e9
    k = 256 if smoke else 8192
    a = torch.randn(k, k, device=device, dtype=dtype)
    b = torch.randn(k, k, device=device, dtype=dtype)
    tflops = 2 * k**3 / (bench(lambda: a @ b) * 1e-3) / 1e12
    return gbs, tflops


def layer_shapes(spec: ResNetSpec, batch: int, image: int):
    """Counters of the conv configurations (N, C_in, H, W, C_out, k, s, p) and of the BN inputs
    (N, C, H, W) the model meets, from a forward on the meta device."""
    convs: Counter = Counter()
    bns: Counter = Counter()
    with torch.device("meta"):
        model = ResNet(spec)
    hooks = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda m, i, o: convs.update([(
                *i[0].shape, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0])])))
        elif isinstance(m, torch.nn.BatchNorm2d):
            hooks.append(m.register_forward_hook(lambda m, i, o: bns.update([tuple(i[0].shape)])))
    model(torch.empty(batch, 3, image, image, device="meta"))
    for h in hooks:
        h.remove()
    return convs, bns


def cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def bench_augment(batch, image, device, dtype, bench, compile_):
    from fastres.kernels.augment import augment
    from fastres.loaders.augment import crop_flip, normalize, random_params

    imgs = torch.randint(0, 256, (batch, image, image, 3), dtype=torch.uint8, device=device)
    p = random_params(batch, True, True, device, torch.Generator(device=device).manual_seed(0))

    def eager(imgs, p):
        return normalize(crop_flip(imgs, p), dtype)

    compiled = compile_(eager)
    times = (bench(lambda: augment(imgs, p.dy, p.dx, p.flip, dtype)),
             bench(lambda: eager(imgs, p)), bench(lambda: compiled(imgs, p)))
    nbytes = imgs.numel() * (1 + torch.finfo(dtype).bits // 8)
    yield ("augment", f"{batch}x{image}x{image}x3 u8", 1, times, nbytes, "GB/s")


def bn_add_relu_eager(x, res, w, b, rm, rv):
    return F.relu(F.batch_norm(x, rm, rv, w, b, training=True) + res)


def bn_add_relu_triton(x, res, w, b, rm, rv):
    from fastres.kernels.batchnorm import batch_stats, bn_act

    mean, rstd = batch_stats(x, rm, rv)
    return bn_act(x, mean, rstd, w, b, res, relu=True)


def conv_stats_eager(x, w, s, p):
    out = F.conv2d(x, w, stride=s, padding=p)
    return out, torch.var_mean(out, dim=(0, 2, 3), correction=0)


def bench_bn(shapes: Counter, device, dtype, bench, compile_):
    compiled = compile_(bn_add_relu_eager)
    for shape, count in sorted(shapes.items(), key=lambda kv: -kv[0][2]):
        c = shape[1]
        args = (cl(torch.randn(shape, device=device, dtype=dtype)).requires_grad_(),
                cl(torch.randn(shape, device=device, dtype=dtype)).requires_grad_(),
                torch.ones(c, device=device, requires_grad=True),
                torch.zeros(c, device=device, requires_grad=True),
                torch.zeros(c, device=device), torch.ones(c, device=device))
        dy = cl(torch.randn(shape, device=device, dtype=dtype))
        # autograd.grad, not backward(): accumulating into .grad would add traffic to every
        # variant that the layer itself does not have.
        times = tuple(bench(lambda fn=fn, args=args, dy=dy: torch.autograd.grad(
            fn(*args), args[:4], dy)) for fn in (bn_add_relu_triton, bn_add_relu_eager, compiled))
        nbytes = 8 * args[0].numel() * args[0].element_size()
        yield ("bn_add_relu", "x".join(map(str, shape)), count, times, nbytes, "GB/s")


def bench_conv(shapes: Counter, device, dtype, bench, compile_):
    from fastres.kernels.conv import conv2d, out_size

    compiled = compile_(conv_stats_eager)
    for (n, c_in, h, w_, c_out, k, s, p), count in sorted(shapes.items(),
                                                          key=lambda kv: (-kv[0][2], kv[0][5])):
        x = cl(torch.randn(n, c_in, h, w_, device=device, dtype=dtype))
        w = torch.randn(c_out, c_in, k, k, device=device, dtype=dtype) / (c_in * k * k) ** 0.5
        args = (x, w, s, p)
        times = (bench(lambda args=args: conv2d(*args, stats=True)),
                 bench(lambda args=args: conv_stats_eager(*args)),
                 bench(lambda args=args: compiled(*args)))
        oh, ow = out_size(h, k, p, s), out_size(w_, k, p, s)
        flop = 2 * n * oh * ow * c_out * c_in * k * k
        shape = f"{n}x{c_in}x{h}x{w_}->{c_out} k{k}s{s}p{p}"
        yield ("conv_stats", shape, count, times, flop, "TFLOP/s")


def fmt_row(row, gbs: float, tflops: float) -> str:
    kernel, shape, count, (t_tr, t_e, t_c), amount, unit = row
    if unit == "GB/s":
        rate = amount / (t_tr * 1e-3) / 1e9
        peak = 100 * rate / gbs
    else:
        rate = amount / (t_tr * 1e-3) / 1e12
        peak = 100 * rate / tflops
    cells = [kernel, shape, str(count), f"{t_tr:.4f}", f"{t_e:.4f}", f"{t_c:.4f}",
             f"{rate:.4g} {unit}", f"{peak:.3g}", f"{t_e / t_tr:.2f}", f"{t_c / t_tr:.2f}"]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/kernels.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structure", type=int, nargs="+", default=[1, 6], choices=sorted(STRUCTURES))
    ap.add_argument("--batch", type=int, default=None, help="default 128 (2 with --smoke)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="default bf16 (fp32 with --smoke)")
    ap.add_argument("--kernels", nargs="+", default=["augment", "bn", "conv"],
                    choices=["augment", "bn", "conv"])
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (see above)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new rows after this many seconds (rows print as they "
                         "finish)")
    args = ap.parse_args(argv)

    gpu = torch.cuda.is_available()
    if not gpu and not args.smoke:
        print("error: benchmarks/kernels.py needs a CUDA GPU; on the CPU run it with --smoke",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if gpu else "cpu")
    dtype = DTYPES[args.dtype or ("fp32" if args.smoke else "bf16")]
    batch = args.batch or (2 if args.smoke else 128)
    image = 8 if args.smoke else 32
    bench = timer(device, args.smoke)
    backend = "eager" if args.smoke else "inductor"

    # One compiled function serves every shape: static shapes (each one specialised, as a
    # training run would see it) and room for all of them in dynamo's cache.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)

    def compile_(fn):
        return torch.compile(fn, backend=backend, dynamic=False)

    gbs, tflops = peaks(device, dtype, bench, args.smoke)
    name = torch.cuda.get_device_name() if gpu else "CPU (Triton interpreter)"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# fastres kernel benchmark, {now}, {name}, torch {torch.__version__}, "
          f"{str(dtype).removeprefix('torch.')}, batch {batch}, compile backend {backend}")
    print(f"# command: python benchmarks/kernels.py {' '.join(argv or sys.argv[1:])}".rstrip())
    print(f"# measured peaks: copy {gbs:.1f} GB/s (read + write), matmul {tflops:.2f} TFLOP/s",
          flush=True)
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    for i in args.structure:
        spec = STRUCTURES[i]
        if args.smoke:
            spec = dataclasses.replace(spec, C_in=4)
        convs, bns = layer_shapes(spec, batch, image)
        rows = []
        if "augment" in args.kernels:
            rows.append(bench_augment(batch, image, device, dtype, bench, compile_))
        if "bn" in args.kernels:
            rows.append(bench_bn(bns, device, dtype, bench, compile_))
        if "conv" in args.kernels:
            rows.append(bench_conv(convs, device, dtype, bench, compile_))
        print(f"\n## structure {i}: {spec}\n")
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS), flush=True)
        # Rows print as they finish (compiling each shape takes seconds), so a run cut short by
        # a time limit still leaves what it measured.
        for gen in rows:
            for row in gen:
                print(fmt_row(row, gbs, tflops), flush=True)
                if deadline is not None and time.monotonic() > deadline:
                    print(f"\n# --budget-s {args.budget_s} reached: the remaining rows are "
                          "not measured")
                    return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
