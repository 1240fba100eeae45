"""The paper's ResNet on the Triton kernels.

`TritonResNet` is the eager `fastres.study.models.ResNet` with the same modules (so the same
state_dict keys, shapes and weights) and a different forward: every conv -> BN (-> + shortcut)
-> ReLU runs as the implicit-GEMM convolution, whose epilogue yields BN's batch statistics, and
one fused BN + add + ReLU kernel. The average pool and the linear head stay on PyTorch: they
are a few kilobytes per batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres.kernels._common import triton_available, unavailable_reason
from fastres.kernels.batchnorm import batch_norm_act
from fastres.kernels.choice import KernelsUnavailable
from fastres.kernels.conv import backward_format, conv2d
from fastres.study.array_model import ArrayBatchNorm, ArrayConv, ArrayResNet
from fastres.study.models import BasicBlock, ResNet, strictly
from fastres.study.structures import ResNetSpec


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Under autocast the eager model's convs run in the autocast dtype; do the same here
    # explicitly (custom ops are not autocast-aware), and keep BN's parameters in fp32.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# Per-layer convolution: "triton" is the implicit GEMM with the statistics epilogue; "aten" is
# F.conv2d (cuDNN on a GPU) with BatchNorm finding its statistics in its own pass. Set per layer
# with TritonResNet.set_conv_backends where a GPU measurement shows cuDNN ahead.
CONV_BACKENDS = ("triton", "aten")


def conv_bn_act(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                residual: torch.Tensor | None = None, relu: bool = True,
                backend: str = "triton") -> torch.Tensor:
    """relu(bn(conv(x)) + residual) with the modules' own parameters and buffers."""
    if conv.bias is not None or conv.groups != 1 or conv.dilation != (1, 1):
        raise ValueError("the Triton conv takes bias-free, ungrouped, undilated convolutions")
    stride, padding = conv.stride[0], conv.padding[0]
    if conv.stride != (stride, stride) or conv.padding != (padding, padding):
        raise ValueError("the Triton conv takes square strides and paddings")
    weight = conv.weight.to(x.dtype)
    if backend == "aten":
        fmt = backward_format(x.device)  # aten's backward trusts only one format per device
        out = F.conv2d(strictly(x, fmt), strictly(weight, fmt), None, stride, padding)
        partials = None
    else:
        out, partials = conv2d(x, weight, stride, padding, stats=bn.training)
    return batch_norm_act(out, bn, residual, relu, partials)


def _backend(conv: nn.Conv2d) -> str:
    return getattr(conv, "fastres_backend", "triton")


def block_forward(block: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    out = conv_bn_act(x, block.conv1, block.bn1, backend=_backend(block.conv1))
    if len(block.shortcut) == 0:
        shortcut = x
    else:
        sc_conv, sc_bn = block.shortcut[0], block.shortcut[1]
        shortcut = conv_bn_act(x, sc_conv, sc_bn, relu=False, backend=_backend(sc_conv))
    return conv_bn_act(out, block.conv2, block.bn2, residual=shortcut,
                       backend=_backend(block.conv2))


class TritonResNet(ResNet):
    """ResNet whose forward runs on fastres.kernels; its parameters and buffers are the eager
    model's, so one state_dict loads into either."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(_compute_dtype(x)).contiguous(memory_format=torch.channels_last)
        out = conv_bn_act(x, self.conv1, self.bn1, backend=_backend(self.conv1))
        for i in range(self.spec.N):
            for block in getattr(self, f"layer{i + 1}"):
                out = block_forward(block, out)
        out = F.avg_pool2d(out, out.shape[-2:]).flatten(1)
        return self.linear(out)

    def set_conv_backends(self, choices: dict[str, str], reason: str) -> None:
        """Run the named conv layers (module names, e.g. "layer1.0.conv1") on `choices[name]`
        ("triton" or "aten"); `reason` (say, the benchmark figures that chose it) is shown by
        explain_kernels, so a choice is never silent."""
        convs = {n: m for n, m in self.named_modules() if isinstance(m, nn.Conv2d)}
        for name, backend in choices.items():
            if name not in convs:
                raise ValueError(f"no conv layer {name!r} (layers: {', '.join(convs)})")
            if backend not in CONV_BACKENDS:
                raise ValueError(f"conv backend must be one of {CONV_BACKENDS}, got {backend!r}")
            convs[name].fastres_backend = backend
            convs[name].fastres_reason = reason

    def explain_kernels(self) -> list[str]:
        """One line per conv -> BN layer: which kernels run it, and why where it is not the
        default Triton path."""
        lines = []
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                k, s, p = m.kernel_size[0], m.stride[0], m.padding[0]
                head = f"{name}: {m.in_channels}->{m.out_channels} k{k} s{s} p{p}: "
                if _backend(m) == "aten":
                    lines.append(head + "aten conv2d (cuDNN) + triton BN stats pass, triton "
                                 f"BN+add+ReLU ({getattr(m, 'fastres_reason', '')})")
                else:
                    lines.append(head + "triton implicit-GEMM conv + BN stats epilogue, "
                                 "triton BN+add+ReLU; backward aten convolution_backward (cuDNN)")
        return lines


def build_triton(spec: ResNetSpec, device: torch.device | str | None = None) -> TritonResNet:
    """The Triton model for `spec`; KernelsUnavailable, never a silent eager fall-back, where the
    kernels cannot run on `device` (default: the CUDA GPU if there is one, else the CPU)."""
    if not triton_available(device):
        raise KernelsUnavailable(f"kernels='triton' is not available: "
                                 f"{unavailable_reason(device)}; use kernels='eager'")
    return TritonResNet(spec)


def _array_conv_bn(x: torch.Tensor, conv: ArrayConv, bn: ArrayBatchNorm,
                   residual: torch.Tensor | None = None, relu: bool = True) -> torch.Tensor:
    # One grouped implicit-GEMM convolution for the R runs (group r = run r), its epilogue
    # giving the per-channel (so per-run) statistics of the R*C channels.
    out, partials = conv2d(x, conv.weight.to(x.dtype), conv.stride, conv.padding,
                           stats=bn.training, groups=conv.runs)
    return batch_norm_act(out, bn, residual, relu, partials)


class TritonArrayResNet(ArrayResNet):
    """fastres.study.array_model.ArrayResNet whose grouped forward runs on fastres.kernels (always
    grouped: the Triton convolution's group axis is the run axis)."""

    def uses_grouped(self, device: torch.device) -> bool:
        return True

    def _grouped(self, xs: list[torch.Tensor]) -> torch.Tensor:
        b, c, h, w = xs[0].shape
        x = torch.stack(xs, 1).view(b, self.runs * c, h, w)
        out = _array_conv_bn(x.to(_compute_dtype(x)).contiguous(memory_format=torch.channels_last),
                             self.conv1, self.bn1)
        for i in range(self.spec.N):
            for block in getattr(self, f"layer{i + 1}"):
                mid = _array_conv_bn(out, block.conv1, block.bn1)
                if len(block.shortcut) == 0:
                    shortcut = out
                else:
                    shortcut = _array_conv_bn(out, block.shortcut[0], block.shortcut[1],
                                              relu=False)
                out = _array_conv_bn(mid, block.conv2, block.bn2, residual=shortcut)
        out = F.avg_pool2d(out, out.shape[-2:]).view(b, self.runs, -1).transpose(0, 1)
        return self.linear(out)
