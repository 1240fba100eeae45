"""Triton kernels (installed as fastres.kernels), one op per module, Liger-Kernel style: the
kernels, a plain launcher and the torch.library registration (fake + autograd) side by side.

- augment: uint8 NHWC batch (or gather by index) -> crop + flip + normalise -> float, one pass.
- batchnorm: BatchNorm statistics (train) and fused BN + residual add + ReLU, forward/backward.
- conv: implicit-GEMM convolution whose epilogue yields BatchNorm's statistics.
- model: TritonResNet and TritonArrayResNet, the eager models' modules on these ops.
- choice: which kernels a run uses (`--kernels auto`), KernelsUnavailable (no torch).
- _common: where Triton can run, triton_op vs custom_op registration, poisoned allocation.

`build` below is the one switch between the eager reference and these kernels. Importing a
kernel module fixes interpreter mode: set TRITON_INTERPRET=1 before it to run the kernels on the
CPU. May import fastres.study only (the eager models and the protocol); nothing here imports
torch or triton at package import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastres.kernels.choice import KERNELS
from fastres.study.structures import ResNetSpec

if TYPE_CHECKING:
    import torch

    from fastres.study.models import ResNet


def build(spec: ResNetSpec, kernels: str = "eager",
          device: torch.device | str | None = None) -> ResNet:
    """The model for `spec`. kernels="eager" is the PyTorch reference path
    (fastres.study.models.ResNet); "triton" runs the same modules on these kernels
    (KernelsUnavailable, a RuntimeError, where Triton cannot run on `device`, by default the best
    device there is)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "triton":
        # Same modules, so the same state_dict; raises where Triton cannot run (no silent
        # fall-back to eager).
        from fastres.kernels.model import build_triton

        return build_triton(spec, device)
    from fastres.study.models import ResNet

    return ResNet(spec)
