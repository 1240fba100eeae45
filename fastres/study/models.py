"""The paper's ResNet, built from a ResNetSpec.

Module names follow the authors' published script (conv1, bn1, layer{i}.{j}.conv1|bn1|conv2|bn2,
layer{i}.{j}.shortcut.0|1, linear) so that its checkpoints load with a plain load_state_dict.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres.study.structures import NUM_CLASSES, STRUCTURES, ResNetSpec, param_count


def strictly(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """4-D `t` with exactly the strides of `memory_format` (a copy only where they differ).

    `t.contiguous(memory_format=...)` is a no-op on a tensor whose size-1 dimensions make it
    "contiguous" in both formats (a 1x1 weight, a 1x1 map) even when its strides are the other
    format's; oneDNN and cuDNN then pick their algorithm from those strides."""
    n, c, h, w = t.shape
    want = ((c * h * w, h * w, w, 1) if memory_format == torch.contiguous_format
            else (h * w * c, 1, w * c, c))
    return t if t.stride() == want else t.clone(memory_format=memory_format)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state_dict) that computes in contiguous NCHW on the CPU.

    oneDNN's channels-last convolution backward returns silently wrong gradients at some odd
    shapes on some CPUs (seen on AMD EPYC: 7 channels, batch 1-2, 10x10 maps), differently from
    run to run; NCHW was right in every case tried. A model moved to channels-last, or fed a
    channels-last batch, therefore still trains correctly on the CPU. On a GPU (cuDNN) it is
    nn.Conv2d unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            nchw = torch.contiguous_format
            return self._conv_forward(strictly(x, nchw), strictly(self.weight, nchw), self.bias)
        return super().forward(x)


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, f1: int, p1: int, k: int):
        super().__init__()
        self.conv1 = Conv2d(in_ch, out_ch, f1, stride=stride, padding=p1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = Conv2d(out_ch, out_ch, f1, stride=1, padding=p1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                Conv2d(in_ch, out_ch, k, stride=stride, padding=0, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, spec: ResNetSpec, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.spec = spec
        self.conv1 = Conv2d(3, spec.C_in, spec.F0, stride=1, padding=spec.P0, bias=False)
        self.bn1 = nn.BatchNorm2d(spec.C_in)
        in_ch = spec.C_in
        for i, (ch, blocks) in enumerate(zip(spec.layer_channels(), spec.B, strict=True)):
            layer = []
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                layer.append(BasicBlock(in_ch, ch, stride, spec.F1, spec.P1, spec.K))
                in_ch = ch
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
        self.linear = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.spec.N):
            out = getattr(self, f"layer{i + 1}")(out)
        # avg_pool2d over the whole map (not adaptive pooling): the script's op, bit for bit.
        out = F.avg_pool2d(out, out.shape[-2:]).flatten(1)
        return self.linear(out)


def forward_flops(model: nn.Module, image_size: int = 32) -> int:
    """FLOP of one forward pass for one image: 2 per multiply-add of convs and linears."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += 2 * out[0].numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += 2 * m.in_features * m.out_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total


class CheckpointError(ValueError):
    """A checkpoint that does not fit the spec; the message names the keys."""


def _unwrap_state_dict(obj: object) -> Mapping[str, torch.Tensor]:
    # The authors' script saves {"net": state_dict, "acc": ..., "epoch": ...}; a bare one is fine.
    if isinstance(obj, Mapping):
        for key in ("net", "state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state_dict "
                          "(or a dict with one under 'net')")


def from_seed_checkpoint(path: str | os.PathLike, spec: ResNetSpec) -> ResNet:
    """Load a state_dict saved by the paper's published script into a model built from `spec`."""
    raw = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in _unwrap_state_dict(raw).items()}
    model = ResNet(spec)
    expected = model.state_dict()
    # BN's num_batches_tracked is absent from checkpoints of old torch versions: not an error.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or misshaped:
        lines = [f"checkpoint {os.fspath(path)} does not fit spec {spec}:"]

        def show(title: str, items: list[str]) -> None:
            if items:
                more = f" ... and {len(items) - 10} more" if len(items) > 10 else ""
                lines.append(f"  {title} ({len(items)}): {', '.join(items[:10])}{more}")

        show("missing keys", missing)
        show("unexpected keys", unexpected)
        show("mis-shaped keys", misshaped)
        n = sum(v.numel() for k, v in state.items()
                if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
        match = [i for i, s in STRUCTURES.items() if param_count(s) == n]
        if match:
            lines.append(f"  its {n:,} parameters match Table 1 structure {match[0]} "
                         f"({STRUCTURES[match[0]]}): did you mean --structure {match[0]}?")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=False)
    return model

