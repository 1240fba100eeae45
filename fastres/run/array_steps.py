"""A run array's training side: one stock torch.optim optimizer per run over views of the
stacked parameters (RunViews), and ArraySteps, fastres.run.steps.Steps for an array (one step
trains every run). The array model itself is fastres.study.array_model.

Each run's optimizer state_dict is the one its solo run's optimizer would have, so a run moves
between an array and a solo run (or arrays of other sizes) through its checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres.run.steps import Steps, load_optimizer_state, make_optimizer
from fastres.study.array_model import ArrayResNet, array_loss
from fastres.study.protocol import WEIGHT_DECAY


class RunViews:
    """One optimizer per run over leaf Parameters that view the array's stacked tensors, in
    ResNet(spec).parameters() order; a run's optimizer updates its slices in place.

    Gradients are set up once: each stacked parameter gets a persistent gradient tensor that
    backward accumulates into (zeroed in place before each step, one call), and each run's
    Parameters hold views of it for good. So a step costs the host nothing per run and
    parameter beyond the optimizers' own work, and a CUDA graph can hold the whole step (the
    tensors it reads and writes never change). graphed=True: each run's optimizer is the one a
    graph can hold (fastres.run.steps.make_optimizer), its rate a device tensor of its own.

    Make it after the model is on its device (moving the model replaces the stacked tensors).
    Each step: zero_grad(), forward, array_loss(...)[0].backward(), step(active)."""

    def __init__(self, model: ArrayResNet, optimizers: Sequence[str],
                 lrs: Sequence[float | None] | None = None,
                 weight_decays: Sequence[float] | None = None, graphed: bool = False):
        runs = model.runs
        lrs = [None] * runs if lrs is None else list(lrs)
        wds = [WEIGHT_DECAY] * runs if weight_decays is None else list(weight_decays)
        if not len(optimizers) == len(lrs) == len(wds) == runs:
            raise ValueError(f"need {runs} optimizer names, rates and weight decays")
        self.model, self.names = model, list(optimizers)
        self.stacked = list(model.named_parameters())
        for _k, p in self.stacked:
            p.grad = torch.zeros_like(p)
        self.grads = [p.grad for _k, p in self.stacked]
        self.params: list[list[nn.Parameter]] = []
        for r in range(runs):
            views = []
            for k, p in self.stacked:
                v = nn.Parameter(model.run_view(k, p.detach(), r))
                v.grad = model.run_view(k, p.grad, r)
                views.append(v)
            self.params.append(views)
        device = self.grads[0].device if self.grads else None
        self.optimizers = [make_optimizer(name, ps, lr, wd, graphed=graphed, device=device)
                           for name, ps, lr, wd
                           in zip(self.names, self.params, lrs, wds, strict=True)]

    def check_views(self) -> None:
        """RuntimeError unless every run's Parameters and gradients still view the stacked
        tensors (they do not once the model has been moved)."""
        for r, views in enumerate(self.params):
            for (k, p), v in zip(self.stacked, views, strict=True):
                if (v.data_ptr() != self.model.run_view(k, p.detach(), r).data_ptr()
                        or p.grad is None
                        or v.grad.data_ptr() != self.model.run_view(k, p.grad, r).data_ptr()):
                    raise RuntimeError(f"run {r}'s {k} no longer views the array's tensor "
                                       "(was the model moved after RunViews was made?)")

    def zero_grad(self) -> None:
        """Zero the stacked gradients in place (the runs' views see it)."""
        torch._foreach_zero_(self.grads)

    def step(self, active: Sequence[bool] | None = None) -> None:
        """Step the active runs' optimizers (all by default) on the stacked gradients."""
        if active is not None and len(active) != len(self.optimizers):
            raise ValueError(f"active has {len(active)} entries for {len(self.optimizers)} runs")
        for r, opt in enumerate(self.optimizers):
            if active is None or active[r]:
                opt.step()

    def optimizer_state(self, r: int) -> dict:
        """Run r's optimizer state_dict, in the format of a solo run's optimizer over
        ResNet(spec).parameters(): a deep copy (torch's load_state_dict keeps the tensors it is
        given, so a live one would be shared by two optimizers)."""
        return copy.deepcopy(self.optimizers[r].state_dict())

    def load_optimizer_state(self, r: int, state: dict) -> None:
        """Load a run's (or a solo run's) optimizer state_dict into run r's optimizer (copied)."""
        load_optimizer_state(self.optimizers[r], copy.deepcopy(state))


class ArraySteps(Steps):
    """fastres.run.steps.Steps for an array: one step trains every run (forward of the array, the
    sum of the runs' mean losses, backward, each run's optimizer), one eval batch scores every
    run; the epoch's sums are per run, on the device, read once. graphs=True captures the
    whole array step as one graph per batch size (RunViews' gradients are persistent, so the
    capture holds the same tensors the eager step uses), replayed with the runs' batches copied
    into its inputs."""

    def __init__(self, model: ArrayResNet, views: RunViews, device: torch.device,
                 amp_dtype: torch.dtype | None, graphs: bool = False, warm: int | None = None,
                 log=print):
        super().__init__(model, model, views.optimizers[0], device, amp_dtype, None,
                         graphs=graphs, warm=warm, log=log)
        self.views = views

    def sums_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (model.runs,)  # the sums of each run

    def train(self, xs: Sequence[torch.Tensor], ys: torch.Tensor) -> None:  # type: ignore[override]
        """One step of every run: xs[r] (B, 3, H, W) and ys (R, B) are run r's batch."""
        self._step("train", (ys, *xs), self._train_body)

    def eval(self, xs: Sequence[torch.Tensor], ys: torch.Tensor) -> None:  # type: ignore[override]
        self._step("eval", (ys, *xs), self._eval_body)

    def _clear_grads(self) -> None:
        pass  # zeroed in place inside the step itself: the gradients are persistent

    def _train_body(self, ys: torch.Tensor, *xs: torch.Tensor) -> None:
        self.views.zero_grad()
        with self.autocast():
            logits = self.model(list(xs))
        total, per_run = array_loss(logits.float(), ys)
        total.backward()
        self.views.step()
        self.train_loss += per_run * ys.shape[1]
        self.train_correct += (logits.argmax(-1) == ys).sum(1)

    def _eval_body(self, ys: torch.Tensor, *xs: torch.Tensor) -> None:
        with torch.no_grad(), self.autocast():
            logits = self.model(list(xs)).float()
            # Per run, as the solo step sums (one batched call may sum in another order).
            self.test_loss += torch.stack([F.cross_entropy(logits[r], y, reduction="sum")
                                           for r, y in enumerate(ys)])
            self.test_correct += (logits.argmax(-1) == ys).sum(1)

    def sums(self) -> list[list[float]]:  # type: ignore[override]
        """Per run: [train loss sums], [train correct], [test loss sums], [test correct]."""
        return self.read_sums()
