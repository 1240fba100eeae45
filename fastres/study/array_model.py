"""Run arrays: R runs of one ResNetSpec trained together as one model.

Each run keeps its own weights, BatchNorm statistics, optimizer, learning rate and weight decay,
and trains exactly as it would alone. The runs' tensors are stacked (the idea of HFTA's
horizontally fused models): a conv weight is one (R*C_out, C_in, k, k) tensor, run r's rows
r*C_out:(r+1)*C_out, which is the weight of a grouped convolution with groups=R; a BN tensor is
(R*C,); the head is (R, 10, C_last) and (R, 10). Module names are fastres.study.models' (the paper
script's state_dict keys), so key k of the array holds the R runs' tensors of key k.

Two compute paths over the same tensors:
- grouped (the default on CUDA): the R batches side by side as (B, R*3, H, W); each convolution
  is one F.conv2d with groups=R, each BatchNorm one F.batch_norm over R*C channels (statistics
  are per channel, so per run), the head one batched matmul. Few large kernels.
- per-run (the default on the CPU): every op per run on contiguous slices with the solo model's
  dense ops in strict NCHW, so each run is bit for bit its solo model, and no grouped oneDNN
  kernel is involved (fastres.study.models.Conv2d says why oneDNN is kept to plain NCHW here).

The array's optimizers and steps are a run's business: fastres.run.array_steps. The Triton
version of this model is fastres.kernels.model.TritonArrayResNet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres.study.models import ResNet, strictly
from fastres.study.structures import NUM_CLASSES, ResNetSpec

# nn.BatchNorm2d's defaults, which fastres.study.models uses.
BN_MOMENTUM = 0.1
BN_EPS = 1e-5

Batches = torch.Tensor | Sequence[torch.Tensor]


def _nchw(t: torch.Tensor) -> torch.Tensor:
    # Plain NCHW on the CPU, as fastres.study.models.Conv2d computes; cuDNN takes any layout.
    return strictly(t, torch.contiguous_format) if t.device.type == "cpu" else t


class ArrayConv(nn.Module):
    """R bias-free convolutions: weight (R*C_out, C_in, k, k)."""

    def __init__(self, runs: int, in_ch: int, out_ch: int, kernel: int, stride: int,
                 padding: int):
        super().__init__()
        self.runs, self.out_ch, self.stride, self.padding = runs, out_ch, stride, padding
        self.weight = nn.Parameter(torch.empty(runs * out_ch, in_ch, kernel, kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(_nchw(x), _nchw(self.weight), None, self.stride, self.padding, 1,
                        self.runs)

    def per_run(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        # One split per step: its backward writes each run's gradient into its rows (a copy).
        ws = self.weight.split(self.out_ch)
        return [F.conv2d(_nchw(x), _nchw(w), None, self.stride, self.padding)
                for x, w in zip(xs, ws, strict=True)]


class ArrayBatchNorm(nn.Module):
    """R BatchNorm2d's of C channels: weight, bias, running stats (R*C,); num_batches_tracked
    (R,), one counter per run, so that a run's state is exactly its solo model's even when runs
    with different histories (resumed, or regrouped from other arrays) train side by side."""

    def __init__(self, runs: int, ch: int):
        super().__init__()
        self.runs, self.ch = runs, ch
        # nn.BatchNorm2d's attributes, which the Triton BatchNorm reads.
        self.momentum, self.eps, self.affine, self.track_running_stats = \
            BN_MOMENTUM, BN_EPS, True, True
        self.weight = nn.Parameter(torch.ones(runs * ch))
        self.bias = nn.Parameter(torch.zeros(runs * ch))
        self.register_buffer("running_mean", torch.zeros(runs * ch))
        self.register_buffer("running_var", torch.ones(runs * ch))
        self.register_buffer("num_batches_tracked", torch.zeros(runs, dtype=torch.long))

    def _count(self) -> None:
        # What nn.BatchNorm2d counts; with a fixed momentum the count changes nothing else.
        if self.training:
            self.num_batches_tracked.add_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._count()
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, BN_MOMENTUM, BN_EPS)

    def per_run(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        self._count()
        c = self.ch
        # The running stats are updated in place through these contiguous views.
        parts = zip(xs, self.running_mean.split(c), self.running_var.split(c),
                    self.weight.split(c), self.bias.split(c), strict=True)
        return [F.batch_norm(x, m, v, w, b, self.training, BN_MOMENTUM, BN_EPS)
                for x, m, v, w, b in parts]


def _seq_per_run(seq: nn.Sequential, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    for m in seq:
        xs = m.per_run(xs)
    return xs


class ArrayBlock(nn.Module):
    """fastres.study.models.BasicBlock for R runs (same names, same shortcut rule)."""

    def __init__(self, runs: int, in_ch: int, out_ch: int, stride: int, f1: int, p1: int,
                 k: int):
        super().__init__()
        self.conv1 = ArrayConv(runs, in_ch, out_ch, f1, stride, p1)
        self.bn1 = ArrayBatchNorm(runs, out_ch)
        self.conv2 = ArrayConv(runs, out_ch, out_ch, f1, 1, p1)
        self.bn2 = ArrayBatchNorm(runs, out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(ArrayConv(runs, in_ch, out_ch, k, stride, 0),
                                          ArrayBatchNorm(runs, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))

    def per_run(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = [F.relu(o) for o in self.bn1.per_run(self.conv1.per_run(xs))]
        out = self.bn2.per_run(self.conv2.per_run(out))
        return [F.relu(o + s) for o, s in zip(out, _seq_per_run(self.shortcut, xs), strict=True)]


class ArrayHead(nn.Module):
    """R linear heads: weight (R, 10, C), bias (R, 10)."""

    def __init__(self, runs: int, in_features: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(runs, num_classes, in_features))
        self.bias = nn.Parameter(torch.empty(runs, num_classes))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(R, B, C) -> (R, B, 10): one batched matmul."""
        return torch.baddbmm(self.bias.unsqueeze(1), feats, self.weight.transpose(1, 2))

    def per_run(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [F.linear(x, w, b)
                for x, w, b in zip(xs, self.weight.unbind(), self.bias.unbind(), strict=True)]


class ArrayResNet(nn.Module):
    """R runs of fastres.study.models.ResNet(spec) as one model; forward takes R batches of the same
    size ((R, B, 3, H, W), or a sequence of R (B, 3, H, W)) and returns logits (R, B, 10).

    grouped: True for the grouped path, False for the per-run path, None (default) for grouped
    on CUDA and per-run elsewhere. A new array draws run r's weights as the r-th of R
    consecutive ResNet(spec) calls would; from_states / from_seeds / init_runs set them."""

    def __init__(self, spec: ResNetSpec, runs: int, grouped: bool | None = None,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        if runs < 1:
            raise ValueError(f"an array needs at least one run, got {runs}")
        self.spec, self.runs, self.grouped = spec, runs, grouped
        self.conv1 = ArrayConv(runs, 3, spec.C_in, spec.F0, 1, spec.P0)
        self.bn1 = ArrayBatchNorm(runs, spec.C_in)
        in_ch = spec.C_in
        for i, (ch, blocks) in enumerate(zip(spec.layer_channels(), spec.B, strict=True)):
            layer = []
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                layer.append(ArrayBlock(runs, in_ch, ch, stride, spec.F1, spec.P1, spec.K))
                in_ch = ch
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
        self.linear = ArrayHead(runs, in_ch, num_classes)
        # The solo model's shape of each state key: run r's slice of key k is
        # tensor.view(R, *shape)[r], a contiguous view (run-major in the first dimension).
        solo = [ResNet(spec).state_dict() for _ in range(runs)]
        self.solo_shapes = {k: tuple(v.shape) for k, v in solo[0].items()}
        if list(self.solo_shapes) != list(self.state_dict()):
            raise AssertionError("ArrayResNet's state keys differ from fastres.study.models'")
        self.load_runs(solo)

    # -- per-run state

    def run_view(self, key: str, tensor: torch.Tensor, r: int) -> torch.Tensor:
        """Run r's part of the stacked `tensor` (state key `key`): a view sharing storage."""
        return tensor.view(self.runs, *self.solo_shapes[key])[r]

    def run_views(self, r: int) -> dict[str, torch.Tensor]:
        """Run r's state_dict under the paper's keys as detached views into the array: for a
        copy made at once (fastres.run.checkpoints.BestWeights); later steps change them."""
        if not 0 <= r < self.runs:
            raise IndexError(f"run {r} of an array of {self.runs}")
        return {k: self.run_view(k, v.detach(), r) for k, v in self.state_dict().items()}

    def run_state(self, r: int) -> dict[str, torch.Tensor]:
        """Run r's state_dict under the paper's keys, as ResNet(spec).state_dict() has it.
        The tensors are detached clones: a snapshot that later steps do not change, and that
        torch.save writes alone (a view would write the whole array's storage)."""
        return {k: v.clone() for k, v in self.run_views(r).items()}

    @torch.no_grad()
    def load_runs(self, states: Sequence[dict[str, torch.Tensor]]) -> None:
        """Copy R solo state_dicts (paper keys) into the stacked tensors in place (views of
        them, such as RunViews' parameters, stay valid). num_batches_tracked may be absent
        (old checkpoints): it is then 0."""
        if len(states) != self.runs:
            raise ValueError(f"{len(states)} states for an array of {self.runs} runs")
        for r, state in enumerate(states):
            state = {k.removeprefix("module."): v for k, v in state.items()}
            missing = [k for k in self.solo_shapes
                       if k not in state and not k.endswith("num_batches_tracked")]
            unexpected = [k for k in state if k not in self.solo_shapes]
            if missing or unexpected:
                raise KeyError(f"run {r}'s state does not fit {self.spec}: missing {missing}, "
                               f"unexpected {unexpected}")
            for k, v in self.state_dict().items():
                src = state.get(k, torch.zeros((), dtype=torch.long))
                if tuple(src.shape) != self.solo_shapes[k]:
                    raise ValueError(f"run {r}'s {k} has shape {tuple(src.shape)}, "
                                     f"expected {self.solo_shapes[k]}")
                self.run_view(k, v, r).copy_(src)

    @classmethod
    def from_states(cls, spec: ResNetSpec, states: Sequence[dict[str, torch.Tensor]],
                    device: torch.device | str | None = None,
                    grouped: bool | None = None) -> ArrayResNet:
        """An array of len(states) runs, run r with the solo state_dict states[r]. The
        caller's global RNG state is left as it was."""
        with torch.random.fork_rng(devices=[]):  # the constructor's draws are overwritten
            model = cls(spec, len(states), grouped=grouped)
        model.load_runs(states)
        return model.to(device) if device is not None else model

    def init_runs(self, seeds: Sequence[int]) -> None:
        """Run r's initial state exactly as `torch.manual_seed(seeds[r]); ResNet(spec)` draws
        it. The caller's global RNG state is left as it was."""
        if len(seeds) != self.runs:
            raise ValueError(f"{len(seeds)} seeds for an array of {self.runs} runs")
        states = []
        with torch.random.fork_rng(devices=[]):
            for seed in seeds:
                torch.manual_seed(seed)
                states.append(ResNet(self.spec).state_dict())
        self.load_runs(states)

    @classmethod
    def from_seeds(cls, spec: ResNetSpec, seeds: Sequence[int],
                   device: torch.device | str | None = None,
                   grouped: bool | None = None) -> ArrayResNet:
        """An array of len(seeds) runs, run r as `torch.manual_seed(seeds[r]); ResNet(spec)`.
        The caller's global RNG state is left as it was."""
        with torch.random.fork_rng(devices=[]):
            model = cls(spec, len(seeds), grouped=grouped)
        model.init_runs(seeds)
        return model.to(device) if device is not None else model

    # -- forward

    def uses_grouped(self, device: torch.device) -> bool:
        return self.grouped if self.grouped is not None else device.type == "cuda"

    def forward(self, x: Batches) -> torch.Tensor:
        xs = list(x.unbind()) if isinstance(x, torch.Tensor) else list(x)
        if len(xs) != self.runs:
            raise ValueError(f"{len(xs)} batches for an array of {self.runs} runs")
        if len({t.shape for t in xs}) != 1 or xs[0].dim() != 4:
            raise ValueError(f"the runs' batches must all be (B, 3, H, W) of one size, got "
                             f"{[tuple(t.shape) for t in xs]}")
        if self.uses_grouped(xs[0].device):
            return self._grouped(xs)
        return torch.stack(self._per_run(xs))

    def _grouped(self, xs: list[torch.Tensor]) -> torch.Tensor:
        b, c, h, w = xs[0].shape
        # (B, R*3, H, W): run r's channels at r*3:(r+1)*3, the grouped conv's group r.
        out = torch.stack(xs, 1).view(b, self.runs * c, h, w)
        out = F.relu(self.bn1(self.conv1(out)))
        for i in range(self.spec.N):
            out = getattr(self, f"layer{i + 1}")(out)
        out = F.avg_pool2d(out, out.shape[-2:]).view(b, self.runs, -1).transpose(0, 1)
        return self.linear(out)

    def _per_run(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        # Layer by layer over the runs; each run's ops are those of fastres.study.models.ResNet.
        out = [F.relu(o) for o in self.bn1.per_run(self.conv1.per_run(xs))]
        for i in range(self.spec.N):
            for block in getattr(self, f"layer{i + 1}"):
                out = block.per_run(out)
        out = [F.avg_pool2d(o, o.shape[-2:]).flatten(1) for o in out]
        return self.linear.per_run(out)


def array_loss(logits: torch.Tensor, labels: torch.Tensor,
               active: Sequence[bool] | torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, per_run): per_run (R,) is each run's mean cross-entropy (detached), total the
    sum of the active runs' (all by default), so each run's gradient is its own mean loss's.
    An inactive run is left out of the sum, not multiplied by 0 (0 * NaN is NaN)."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits (R, B, classes) and labels (R, B), got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    runs = logits.shape[0]
    mask = [True] * runs if active is None else [bool(a) for a in
                                                  (active.tolist() if isinstance(active,
                                                   torch.Tensor) else active)]
    if len(mask) != runs:
        raise ValueError(f"active has {len(mask)} entries for {runs} runs")
    if not any(mask):
        raise ValueError("no active run: nothing to train")
    # The solo step's F.cross_entropy per run (one batched call may sum in another order).
    losses = [F.cross_entropy(logits[r], labels[r]) for r in range(runs)]
    total = torch.stack([loss for loss, a in zip(losses, mask, strict=True) if a]).sum()
    return total, torch.stack([loss.detach() for loss in losses])
