"""What a worker keeps warm between runs on one device: the resident datasets and, per kind of
run, the built (compiled) model, its optimizer and the CUDA graphs of its steps.

The grid trains 10 runs per structure. Each would otherwise pay its own compile and graph
capture; here a run of the same structure, optimizer, weight decay and compute settings reuses
the engine of the one before: fresh weights are copied into the same parameters (built from the
run's seed exactly as a fresh model), the optimizer's state is zeroed in place (which every
Table 2 optimizer treats exactly as a fresh state) and its rate set, so the captured graphs stay
valid and the results are those of a fresh model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from fastres.kernels import build
from fastres.loaders.resident import ResidentData, fits, resident_bytes
from fastres.run.config import TrainConfig
from fastres.run.steps import (
    AMP_DTYPES,
    Steps,
    compile_model,
    load_optimizer_state,
    make_optimizer,
    reset_optimizer_state,
)


def engine_key(cfg: TrainConfig) -> tuple:
    """What a captured step depends on (beyond the rate, which lives in a device tensor)."""
    return (str(cfg.spec), cfg.kernels, cfg.precision, cfg.channels_last, cfg.compile,
            cfg.graphs, cfg.optimizer, cfg.weight_decay, cfg.device)


@dataclass
class Engine:
    """One model, its optimizer and its steps, reused by the runs of one engine_key."""

    model: nn.Module
    step_model: Callable[[torch.Tensor], torch.Tensor]  # the model, or its compiled call
    opt: torch.optim.Optimizer
    steps: Steps
    scaler: torch.amp.GradScaler
    kernel_plan: list[str] = field(default_factory=list)
    runs: int = 0

    def start_run(self, cfg: TrainConfig) -> None:
        """Fresh weights from the run's seed (as a fresh build draws them) and a fresh
        optimizer state at the run's rate, in the tensors the graphs were captured with."""
        if self.runs:
            torch.manual_seed(cfg.seed)
            fresh = build(cfg.spec, kernels=cfg.kernels, device=torch.device(cfg.device))
            self.model.load_state_dict(fresh.state_dict())
            reset_optimizer_state(self.opt)
            if self.scaler.is_enabled():
                self.scaler.load_state_dict(
                    torch.amp.GradScaler(self.steps.device.type).state_dict())
        for group in self.opt.param_groups:
            group.pop("initial_lr", None)  # a new schedule starts from the run's base rate
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(cfg.lr)
            else:
                group["lr"] = cfg.lr
        self.model.train()
        self.runs += 1

    def load(self, state: dict) -> None:
        """Resume: the saved model and optimizer, whatever wrote them (a graphed or eager run, a
        run array), into this engine's implementation. The optimizer's state arrives in new
        tensors, so steps captured before are dropped and captured again on the next batches."""
        self.model.load_state_dict(state["model"])
        load_optimizer_state(self.opt, state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.steps.forget_graphs()


class Workbench:
    """One per device and process (see for_device): resident data and warm engines."""

    def __init__(self, device: torch.device, max_engines: int = 2):
        self.device = torch.device(device)
        self.max_engines = max_engines
        self.data: dict[tuple, ResidentData] = {}
        self.engines: dict[tuple, Engine] = {}

    def resident(self, beton: str | Path, indices, log: Callable[[str], None]
                 ) -> ResidentData | None:
        """The split on the device (read once per process), or None where it does not fit."""
        key = (str(beton), None if indices is None else tuple(int(i) for i in indices))
        if key not in self.data:
            need = resident_bytes(beton, indices)
            if not fits(need, self.device):
                log(f"[train] {Path(beton).name}: {need / 2**20:.0f} MiB does not fit "
                    f"resident on {self.device}; streaming it with FFCV")
                return None
            self.data[key] = ResidentData.from_beton(beton, self.device, indices)
        return self.data[key]

    def engine(self, cfg: TrainConfig, log: Callable[[str], None]) -> tuple[Engine, bool]:
        """The warm engine for this run's kind, or a new one; and whether it was warm."""
        key = engine_key(cfg)
        if key in self.engines:
            return self.engines[key], True
        while len(self.engines) >= self.max_engines:  # graphs hold device memory: keep a few
            self.engines.pop(next(iter(self.engines)))
        device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        model = build(cfg.spec, kernels=cfg.kernels, device=device).to(device)
        plan = model.explain_kernels() if hasattr(model, "explain_kernels") else []
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        graphed = bool(cfg.graphs)
        opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay,
                             graphed=graphed, device=device)
        amp_dtype = AMP_DTYPES[cfg.precision]
        # fp16 needs loss scaling; bf16 has fp32's range and does not.
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
        step_model = compile_model(model) if cfg.compile else model
        steps = Steps(model, step_model, opt, device, amp_dtype, scaler, graphs=graphed, log=log)
        engine = Engine(model, step_model, opt, steps, scaler, plan)
        self.engines[key] = engine
        return engine, False


_BENCHES: dict[str, Workbench] = {}


def for_device(device: str | torch.device) -> Workbench:
    """This process's workbench for `device`: a grid worker trains all its cells on it."""
    key = str(torch.device(device))
    if key not in _BENCHES:
        _BENCHES[key] = Workbench(torch.device(device))
    return _BENCHES[key]
