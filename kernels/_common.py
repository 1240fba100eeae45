"""What every kernel module shares: where Triton can run, how an op is registered, and the
output allocator that tests poison.

Registration is picked by device (see the shared toolchain notes): on a CUDA GPU an op is a
`torch.library.triton_op`, so inductor sees the Triton kernels inside it and can schedule around
them; under `TRITON_INTERPRET=1` on the CPU, `triton_op` fails inside torch.compile (fake-tensor
tracing reaches the interpreter's data pointers), so the same launcher is wrapped as an opaque
`torch.library.custom_op` with a fake implementation. `FASTRES_OPS=custom_op` forces the opaque
form on a GPU (a fall-back if a triton_op ever misbehaves under a new torch), and
`FASTRES_OPS=triton_op` forces triton_op under the interpreter, where it runs eagerly (a test
uses it to cover the GPU's registration path on the CPU).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

import torch
import triton
import triton.language as tl

from fastres.kernels.choice import KernelsUnavailable

# triton.jit reads TRITON_INTERPRET when a kernel is decorated, so this is fixed at import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
OPS = os.environ.get("FASTRES_OPS", "auto")
if OPS not in ("auto", "triton_op", "custom_op"):
    raise ValueError(f"FASTRES_OPS must be auto, triton_op or custom_op, got {OPS!r}")
# The interpreter converts fp32 to bf16 by truncation (measured: half of all values differ from
# torch's rounding); the GPU rounds to nearest even. Kernels convert through `cast`, which
# rounds explicitly under the interpreter so that it computes what the GPU computes.
ROUND_BF16 = tl.constexpr(INTERPRET)
USE_TRITON_OP = OPS == "triton_op" or (OPS == "auto" and torch.cuda.is_available()
                                       and not INTERPRET)


def triton_available(device: torch.device | str | None = None) -> bool:
    """True where these kernels can run on `device` (default: the best device there is)."""
    kind = torch.device(device).type if device is not None else (
        "cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return torch.cuda.is_available() and not INTERPRET
    return kind == "cpu" and INTERPRET


def unavailable_reason(device: torch.device | str | None = None) -> str:
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda" and INTERPRET:
        return ("TRITON_INTERPRET=1 was set when fastres.kernels was imported: its kernels run "
                "only on CPU tensors, not on the GPU")
    return (f"Triton kernels cannot run on {kind!r} here: they need a CUDA GPU, or the Triton "
            "interpreter on the CPU (set TRITON_INTERPRET=1 before importing fastres.kernels)")


def check_device(*tensors: torch.Tensor) -> None:
    """A clear error, instead of a segfault or an opaque Triton one, for a tensor on a device
    where the kernels cannot run."""
    for t in tensors:
        if not triton_available(t.device):
            raise KernelsUnavailable(unavailable_reason(t.device))


def launch(kernel: Callable) -> Callable:
    """The kernel as a launcher may call it: wrapped for triton_op tracing on the GPU."""
    if USE_TRITON_OP:
        from torch.library import wrap_triton

        return wrap_triton(kernel)
    return kernel


def define_op(name: str, impl: Callable, fake: Callable, mutates_args: Sequence[str] = ()
              ) -> torch._library.custom_ops.CustomOpDef:
    """Register `impl` as op `fastres::<name>`: a triton_op on the GPU (no fake needed: it is
    traced), an opaque custom_op with `fake` as its meta implementation elsewhere."""
    qualname = f"fastres::{name}"
    if USE_TRITON_OP:
        return torch.library.triton_op(qualname, impl, mutates_args=tuple(mutates_args))
    op = torch.library.custom_op(qualname, impl, mutates_args=tuple(mutates_args))
    op.register_fake(fake)
    return op


_POISON = False


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Fill every kernel output with NaN (floats) or -1 (ints) before the kernel writes it, so a
    test sees any element a kernel forgot to write."""
    global _POISON
    old, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = old


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON:
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


def nhwc(x: torch.Tensor) -> torch.Tensor:
    """An NCHW tensor's NHWC-contiguous view: free for channels-last memory, one copy otherwise."""
    return x.permute(0, 2, 3, 1).contiguous()


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def cast(x, dtype: tl.constexpr):
    """fp32 x converted to `dtype` rounding to nearest even, on the GPU and the interpreter."""
    if ROUND_BF16:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    return x.to(dtype)
