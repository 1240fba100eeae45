"""Adagrad whose whole update, step count included, stays on the device, so a CUDA graph can
hold it. torch's own Adagrad reads its step count on the host every step (`_get_value`), which a
capture refuses and which costs a sync per step outside one.

The algorithm is torch.optim.Adagrad's (coupled weight decay, `lr_decay`, `eps`,
`initial_accumulator_value`), and so is the state: per parameter a float32 `step` tensor and a
`sum` of squared gradients, so a state_dict moves between the two in either direction (the
checkpoint format stays a solo run's). The rate may be a float or a device tensor (filled in
place by fastres.run.steps.Schedule).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class DeviceAdagrad(torch.optim.Optimizer):
    """torch.optim.Adagrad's update with no host read: equal to it to round-off (bit for bit at
    the protocol's settings on the CPU, tested)."""

    # fastres.run.steps.load_optimizer_state keeps each `step` on its parameter's device.
    device_steps = True

    def __init__(self, params: Iterable[torch.Tensor], lr: float | torch.Tensor = 1e-2,
                 lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10):
        for name, value in (("lr", float(lr)), ("lr_decay", lr_decay),
                            ("weight_decay", weight_decay), ("eps", eps),
                            ("initial_accumulator_value", initial_accumulator_value)):
            if not value >= 0.0:
                raise ValueError(f"Adagrad: invalid {name} {value}")
        super().__init__(params, {"lr": lr, "lr_decay": lr_decay, "weight_decay": weight_decay,
                                  "initial_accumulator_value": initial_accumulator_value,
                                  "eps": eps})
        # State made now, not lazily in the first step: a capture must not contain its creation
        # (a replay would re-initialise it every step).
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "sum": torch.full_like(p, group["initial_accumulator_value"],
                                           memory_format=torch.preserve_format)}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            sums = [self.state[p]["sum"] for p in params]
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_add_(steps, 1)
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            torch._foreach_addcmul_(sums, grads, grads, value=1)
            std = torch._foreach_sqrt(sums)
            torch._foreach_add_(std, group["eps"])
            neg_lr, decay = -group["lr"], group["lr_decay"]
            for p, g, s, step in zip(params, grads, std, steps, strict=True):
                # -lr / (1 + (step - 1) * lr_decay), the step count read on the device
                clr = neg_lr / (1 + (step - 1) * decay) if decay else neg_lr
                if isinstance(clr, torch.Tensor):
                    p.addcdiv_(g * clr, s)  # (clr * g) / std: torch's CPU kernel's order
                else:
                    p.addcdiv_(g, s, value=clr)
        return loss
