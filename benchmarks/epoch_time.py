"""Seconds per epoch (train over the training set, then evaluate the test set), rung by rung,
from the paper's own loop to everything fastres does, and the distance to the FLOP floor.

    python benchmarks/epoch_time.py                        # structure 1, all rungs, this device
    python benchmarks/epoch_time.py --structures 1,6,9 --epochs 3
    python benchmarks/epoch_time.py --smoke                # tiny spec and subset: CPU-sized
    python benchmarks/epoch_time.py --to-best              # structure 1, SGD, 200 epochs

The ladder (each rung adds one thing to the one before):
  1  the paper's loop as published: CIFAR10-style in-memory dataset with PIL transforms,
     DataLoader with 2 workers, eager fp32 model, per-step .item() (written here, from
     shared/reference/protocol.md; it imports nothing of fastres)
  2  the same with one loader worker per core
  3  fastres.run.train.train(): eager fp32, FFCV loader, device-side crop/flip/normalise
  4  + bf16 autocast and channels-last (channels-last on a GPU only: on the CPU fastres trains
     in contiguous NCHW, since oneDNN's channels-last convolution backward is wrong at some
     shapes on some CPUs)
  5  + torch.compile
  6  + the Triton kernels (fastres.kernels.build(kernels="triton"))
  7  + CUDA graphs of the whole training step with the optimizer inside (fused SGD with the
     learning rate in a device tensor, so the cosine schedule still applies), and of evaluation
     (fastres.run.train with --graphs on --placement stream)
  8  + training and test sets resident on the device, reshuffled there every epoch from the
     same permutation source as the stream (--placement resident: the default on a GPU)

Rungs 1-2 time the authors' script shape; 3-8 time fastres.run.train itself with the settings of
each rung. Every rung keeps the protocol: SGD lr 0.1 momentum 0.9, coupled weight decay 5e-4,
batch 128 reshuffled each epoch with the last partial batch kept, CosineAnnealingLR stepped per
epoch, test batch 100, crop with 4-pixel zero padding + flip.

Per rung: median seconds per epoch after --warmup epochs (the warm-up, compilation included, is
reported apart), images per second (train + test images over the epoch time), achieved TFLOP/s
from the structure's computed FLOP (forward x 3 per training image + forward per test image),
fraction of the FLOP floor (that FLOP over the fastest matmul rate measured here, now, on this
device), and speedup over rung 1. A rung that cannot run here says why in its row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (also puts the checkout on sys.path)

from fastres.study.protocol import (  # noqa: E402
    CIFAR_MEAN,
    CIFAR_STD,
    OPTIMIZER_SETTINGS,
    SMOKE_SPEC,
    TEST_BATCH,
    TMAX,
    TRAIN_BATCH,
    WEIGHT_DECAY,
)

RUNGS: dict[int, tuple[str, str]] = {
    1: ("paper loop", "torchvision CIFAR10-style + PIL, DataLoader 2 workers, eager fp32"),
    2: ("paper loop, all cores", "DataLoader workers = cores"),
    3: ("fastres eager fp32", "FFCV loader + device-side augmentation"),
    4: ("+ bf16, channels-last", "bf16 autocast, channels-last"),
    5: ("+ torch.compile", "torch.compile"),
    6: ("+ Triton kernels", "kernels='triton'"),
    7: ("+ CUDA graphs", "whole step graphed, fused SGD inside; eval graphed"),
    8: ("+ device-resident data", "train and test sets on the device, no FFCV"),
}
PROTO = {**OPTIMIZER_SETTINGS["sgd"][1], "weight_decay": WEIGHT_DECAY, "batch": TRAIN_BATCH,
         "test_batch": TEST_BATCH, "tmax": TMAX}  # SGD's row of the protocol, as reported
MEAN, STD = CIFAR_MEAN, CIFAR_STD


class RungSkipped(Exception):
    """This rung cannot run on this device or with this build; the message says why."""


class BudgetSpent(Exception):
    """Raised from an epoch callback to stop measuring a rung once its time budget is spent."""


# ---------------------------------------------------------------------------- rungs 1-2


class PaperBlock(nn.Module):
    """protocol.md's basic block: conv-BN-ReLU-conv-BN + shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, f1: int, p1: int, k: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, f1, stride, p1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, f1, 1, p1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, k, stride, 0, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PaperResNet(nn.Module):
    """protocol.md's model for (N, B, C_in, F0, P0, F1, P1, K), written independently of
    fastres.study.models so that rung 1 is the authors' code shape and nothing of ours. Its modules
    carry the script's names (conv1, bn1, layer{i}.{j}..., linear), so its state_dict is the
    script's checkpoint format (fastres.study.models.from_seed_checkpoint loads it)."""

    def __init__(self, n: int, b: tuple[int, ...], c_in: int, f0: int, p0: int, f1: int,
                 p1: int, k: int, num_classes: int = 10):
        super().__init__()
        self.n = n
        self.conv1 = nn.Conv2d(3, c_in, f0, 1, p0, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        cin = c_in
        for i in range(n):
            cout = c_in * 2**i
            blocks = []
            for j in range(b[i]):
                blocks.append(PaperBlock(cin, cout, 2 if (i > 0 and j == 0) else 1, f1, p1, k))
                cin = cout
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(cin, num_classes)

    @classmethod
    def from_spec(cls, spec) -> PaperResNet:
        return cls(spec.N, spec.B, spec.C_in, spec.F0, spec.P0, spec.F1, spec.P1, spec.K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.n):
            out = getattr(self, f"layer{i + 1}")(out)
        out = F.avg_pool2d(out, out.shape[-2:]).flatten(1)
        return self.linear(out)


class CIFAR10Arrays(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's __getitem__ over in-memory uint8 arrays: PIL image from
    the array, then the transform (what the paper's script does per image, in a worker)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        self.data, self.targets, self.transform = images, labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def paper_transforms(augment: bool = True, normalize: bool = True
                     ) -> tuple[Callable, Callable]:
    """The script's (train, test) torchvision transforms: RandomCrop(32, padding=4) and
    RandomHorizontalFlip when augmenting, then ToTensor and Normalize (each switchable)."""
    import torchvision.transforms as T

    tail = [T.ToTensor(), *([T.Normalize(MEAN, STD)] if normalize else [])]
    aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
    return T.Compose([*aug, *tail]), T.Compose(tail)


def paper_optimizer(name: str, params) -> torch.optim.Optimizer:
    """Table 2's optimizer as the script builds it: the stock torch.optim class with its own
    defaults, the table's settings and coupled weight decay."""
    cls_name, settings = OPTIMIZER_SETTINGS[name]
    return getattr(torch.optim, cls_name)(params, **settings, weight_decay=WEIGHT_DECAY)


class PaperTrainer:
    """The script's per-step code: its model, the stock optimizer, nn.CrossEntropyLoss, and
    CosineAnnealingLR(T_max) stepped once per epoch (none when tmax is 0: a constant rate).
    paper_loop drives it from DataLoaders; tests/test_fidelity.py from fastres's own batches."""

    def __init__(self, spec, optimizer: str = "sgd", tmax: int = TMAX,
                 device: torch.device | str = "cpu"):
        self.net = PaperResNet.from_spec(spec).to(device)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = paper_optimizer(optimizer, self.net.parameters())
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=tmax)
                          if tmax else None)

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on the batch (the net in train mode); its loss and outputs."""
        self.optimizer.zero_grad()
        outputs = self.net(inputs)
        loss = self.criterion(outputs, targets)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), outputs.detach()

    def eval_batch(self, inputs: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and outputs of one test batch (the net in eval mode)."""
        with torch.no_grad():
            outputs = self.net(inputs)
            return self.criterion(outputs, targets), outputs

    def epoch_end(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()


def paper_loop(spec, arrays, train_idx, test_idx, workers: int, device: torch.device,
               epochs: int, on_epoch: Callable[[dict], None], seed: int = 0,
               optimizer: str = "sgd", augment: bool = True, tmax: int = TMAX) -> None:
    """The authors' loop: a fresh DataLoader iterator (and workers) each epoch, .item() after
    every step, cudnn.benchmark on (as their script family sets it on CUDA). The model is built
    right after torch.manual_seed(seed), so its initial weights are fastres's for that seed."""
    tr_tf, te_tf = paper_transforms(augment)
    (xtr, ytr), (xte, yte) = arrays["train"], arrays["test"]
    if train_idx is not None:
        xtr, ytr = xtr[train_idx], ytr[train_idx]
    if test_idx is not None:
        xte, yte = xte[test_idx], yte[test_idx]
    trainset, testset = CIFAR10Arrays(xtr, ytr, tr_tf), CIFAR10Arrays(xte, yte, te_tf)
    torch.manual_seed(seed)
    trainloader = torch.utils.data.DataLoader(trainset, batch_size=PROTO["batch"], shuffle=True,
                                              num_workers=workers)
    testloader = torch.utils.data.DataLoader(testset, batch_size=PROTO["test_batch"],
                                             shuffle=False, num_workers=workers)
    run = PaperTrainer(spec, optimizer, tmax, device)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        run.net.train()
        train_loss = correct = total = 0
        for inputs, targets in trainloader:
            inputs, targets = inputs.to(device), targets.to(device)
            loss, outputs = run.train_step(inputs, targets)
            train_loss += loss.item() * targets.size(0)
            total += targets.size(0)
            correct += outputs.max(1)[1].eq(targets).sum().item()
        train_total, train_correct = total, correct
        run.net.eval()
        test_loss = correct = total = 0
        for inputs, targets in testloader:
            inputs, targets = inputs.to(device), targets.to(device)
            loss, outputs = run.eval_batch(inputs, targets)
            test_loss += loss.item() * targets.size(0)
            total += targets.size(0)
            correct += outputs.max(1)[1].eq(targets).sum().item()
        run.epoch_end()
        on_epoch({"epoch": epoch, "seconds": time.perf_counter() - t0, "lr": lr,
                  "train_loss": train_loss / train_total, "train_acc": train_correct / train_total,
                  "test_loss": test_loss / total, "test_acc": correct / total})


# ---------------------------------------------------------------------------- one rung


@dataclass
class Setup:
    """What every rung of one structure shares."""

    label: str  # "1", "6", or "smoke"
    spec: object
    device: torch.device
    data: str | None
    cache: str | None
    train_subset: int | None
    test_subset: int | None
    warmup: int
    epochs: int
    budget_s: float | None
    seed: int = 0
    triton_ok: bool = False
    triton_why: str = ""
    _arrays: dict | None = field(default=None, repr=False)
    _betons: object = field(default=None, repr=False)

    def arrays(self) -> dict:
        if self._arrays is None:
            if self.data is None:
                raise RungSkipped("no CIFAR-10 source: pass --data or set FASTRES_DATA")
            self._arrays = C.source_arrays(self.data, self.cache)
        return self._arrays

    def betons(self):
        ok, why = C.ffcv_status()
        if not ok:
            raise RungSkipped(f"needs FFCV: {why}")
        if self._betons is None:
            from fastres.study.data import check_beton, default_cache_dir, prepare, write_beton

            arrays = self.arrays()  # decoded once, shared with the torchvision rungs
            key = hashlib.sha256()
            for split in ("train", "test"):
                x, y = arrays[split]
                key.update(x[::997].tobytes() + y.tobytes())
            folder = Path(self.cache or default_cache_dir()) / "bench-betons" / \
                f"n{len(arrays['train'][0])}-{key.hexdigest()[:16]}"
            for split in ("train", "test"):
                path = folder / f"{split}.beton"
                try:
                    check_beton(path, len(arrays[split][0]))
                except Exception:  # absent or stale: write it (atomic)
                    write_beton(path, *arrays[split])
            self._betons = prepare(folder, self.cache, log=lambda _m: None)
        return self._betons

    def indices(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        a = self.arrays()
        return (C.subset_indices(self.train_subset, len(a["train"][0])),
                C.subset_indices(self.test_subset, len(a["test"][0])))


def train_config(setup: Setup, rung: int, epochs: int):
    from fastres.run.cell import Cell, GridProtocol

    cell = Cell(setup.spec, None, "sgd", tmax=PROTO["tmax"], seed=setup.seed)
    protocol = GridProtocol(epochs=epochs, train_subset=setup.train_subset,
                            test_subset=setup.test_subset)
    return cell.config(protocol, {
        "device": str(setup.device), "precision": "fp32" if rung == 3 else "bf16",
        # The CPU trains in NCHW: oneDNN's channels-last backward is wrong at some shapes.
        "channels_last": rung >= 4 and setup.device.type == "cuda",
        "compile": rung >= 5,
        "kernels": "triton" if rung >= 6 and setup.triton_ok else "eager",
        "graphs": rung >= 7, "placement": "resident" if rung == 8 else "stream",
        "data": None, "cache": setup.cache}).resolved()


def triton_status(spec) -> tuple[bool, str]:
    """Whether fastres builds the Triton model here; if not, why."""
    if not torch.cuda.is_available():
        return False, ("Triton kernels need a CUDA GPU (on the CPU they run only through the "
                       "interpreter, which measures nothing about speed)")
    from fastres.kernels import build

    try:
        build(spec, kernels="triton", device="cuda")
    except NotImplementedError as e:
        return False, f"fastres.kernels.build(kernels='triton'): {e}"
    except Exception as e:
        return False, (f"fastres.kernels.build(kernels='triton') failed: "
                       f"{type(e).__name__}: {e}")
    return True, ""


def run_rung(setup: Setup, rung: int) -> dict:
    """Measure one rung; returns its row (status ok / skipped / failed, with the reason)."""
    name, adds = RUNGS[rung]
    row: dict = {"structure": setup.label, "rung": rung, "name": name, "adds": adds,
                 "status": "ok", "reason": ""}
    epochs: list[dict] = []
    total = setup.warmup + setup.epochs
    t_start = time.perf_counter()

    def on_epoch(m: dict) -> None:
        epochs.append(m)
        measured = [e["seconds"] for e in epochs[setup.warmup:]]
        if (setup.budget_s is not None and measured and len(epochs) < total
                and time.perf_counter() - t_start > setup.budget_s):
            raise BudgetSpent

    try:
        if rung in (1, 2):
            workers = 2 if rung == 1 else C.cpu_count()
            row["loader"] = f"torchvision DataLoader, {workers} workers"
            tr, te = setup.indices()
            paper_loop(setup.spec, setup.arrays(), tr, te, workers, setup.device, total,
                       on_epoch, setup.seed)
        else:
            if rung == 6 and not setup.triton_ok:
                raise RungSkipped(setup.triton_why)
            if rung >= 7 and setup.device.type != "cuda":
                raise RungSkipped("CUDA graphs need a CUDA GPU")
            from fastres.run.train import train

            row["loader"] = ("device-resident uint8 + DeviceAugment (fastres.run.train)"
                             if rung == 8
                             else "FFCV + DeviceAugment (fastres.run.train)")
            if rung >= 7 and not setup.triton_ok:
                row["adds"] += " (on eager kernels: rung 6 unavailable)"
            cfg = train_config(setup, rung, total)

            def fastres_epoch(m) -> None:
                on_epoch({"epoch": m.epoch, "seconds": m.seconds, "train_loss": m.train_loss,
                          "train_acc": m.train_acc, "test_loss": m.test_loss,
                          "test_acc": m.test_acc})

            train(cfg, data=setup.betons(), on_epoch=fastres_epoch, log=lambda _m: None)
    except BudgetSpent:
        pass
    except RungSkipped as e:
        row.update(status="skipped", reason=str(e))
    except Exception as e:  # a rung that breaks must not take the others with it
        row.update(status="failed", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    finally:
        if setup.device.type == "cuda":
            try:  # after a failed capture the device may refuse even this; the row says why
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception as e:
                row["reason"] += f" (then: {type(e).__name__}: {str(e).splitlines()[0][:200]})"
    row["epochs"] = epochs
    if row["status"] == "ok" and len(epochs) <= setup.warmup:
        row.update(status="failed", reason=f"only {len(epochs)} epoch(s) ran; none measured")
    if row["status"] == "ok":
        measured = [e["seconds"] for e in epochs[setup.warmup:]]
        row["epochs_measured"] = len(measured)
        row["epoch_s"] = C.median(measured)
        row["warmup_s"] = sum(e["seconds"] for e in epochs[:setup.warmup])
        # What the warm-up cost beyond ordinary epochs: compilation, autotuning, JIT, capture.
        row["compile_s"] = max(0.0, row["warmup_s"] - setup.warmup * row["epoch_s"])
        last = epochs[-1]
        row.update({k: last[k] for k in ("train_loss", "test_acc")})
    return row


# ---------------------------------------------------------------------------- the table


def finish_rows(rows: list[dict], flop_fwd: float, n_train: int, n_test: int,
                floor_tflops: float) -> None:
    """Add images/s, TFLOP/s, floor fraction and speedup (needs rung 1 of the same structure)."""
    epoch_flop = flop_fwd * (3 * n_train + n_test)
    floor_s = epoch_flop / (floor_tflops * 1e12)
    base = next((r["epoch_s"] for r in rows if r["rung"] == 1 and r["status"] == "ok"), None)
    for r in rows:
        r.update(epoch_tflop=epoch_flop / 1e12, floor_s=floor_s, n_train=n_train, n_test=n_test)
        if r["status"] != "ok":
            continue
        s = r["epoch_s"]
        r["images_per_s"] = (n_train + n_test) / s
        r["tflops"] = epoch_flop / s / 1e12
        r["floor_fraction"] = floor_s / s
        r["speedup"] = base / s if base else None


COLUMNS = [("structure", "struct", ""), ("rung", "rung", ""), ("name", "what", ""),
           ("status", "status", ""), ("epoch_s", "s/epoch", ".4g"),
           ("images_per_s", "images/s", ",.0f"), ("tflops", "TFLOP/s", ".3g"),
           ("floor_fraction", "of floor", ".2%"), ("speedup", "vs rung 1", ".2f"),
           ("warmup_s", "warm-up s", ".3g"), ("compile_s", "of it extra", ".3g"),
           ("epochs_measured", "n", ""), ("test_acc", "test acc", ".2%"),
           ("reason", "why not / notes", "")]


def render(result: dict) -> str:
    env, ceil = result["environment"], result["ceilings"]
    lines = [f"# epoch_time: {env['device_name']} ({env['device']}), {env['date']}", "",
             f"Command: `{env['command']}`  ", f"Mode: {result['mode']}; torch {env['torch']}, "
             f"python {env['python']}, git {env['git_commit']}, {env['cpu_cores']} cores "
             f"({env['torch_threads']} torch threads at start), "
             f"load average {C.fmt(env.get('load_average_1m'), '.2f')} at start  ",
             f"Measured here: matmul fp32 {C.fmt(ceil.get('matmul_fp32_tflops'))} TFLOP/s, "
             f"bf16 {C.fmt(ceil.get('matmul_bf16_tflops'))} TFLOP/s "
             f"(n={ceil['matmul_n']}); copy {C.fmt(ceil['copy_gbps'])} GB/s; "
             f"FLOP floor uses {C.fmt(ceil['floor_tflops'])} TFLOP/s", ""]
    for s in result["structures"]:
        r0 = s["rows"][0]
        lines += [f"## {s['label']}: {s['spec']}", "",
                  f"{s['params']:,} parameters, {s['gflop_per_image']:.4g} GFLOP/image forward; "
                  f"{r0['n_train']:,} train + {r0['n_test']:,} test images per epoch = "
                  f"{r0['epoch_tflop']:.4g} TFLOP; floor {r0['floor_s']:.4g} s/epoch", "",
                  C.markdown_table(sorted(s["rows"], key=lambda r: r["rung"]), COLUMNS), ""]
    if result.get("to_best"):
        b = result["to_best"]
        lines += ["## Time to the paper's best", "", "```", json.dumps(
            {k: v for k, v in b.items() if k != "epochs"}, indent=1), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def parse_rungs(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    bad = [r for r in out if r not in RUNGS]
    if bad:
        raise argparse.ArgumentTypeError(f"rungs are 1..{max(RUNGS)}, got {bad}")
    return list(dict.fromkeys(out))  # run in the order given (tables sort by rung)


def make_setup(args, label: str, spec) -> Setup:
    s = Setup(label, spec, C.pick_device(args.device), args.data, args.cache, args.train_subset,
              args.test_subset, args.warmup, args.epochs, args.rung_budget, args.seed)
    s.triton_ok, s.triton_why = triton_status(spec)
    return s


def run_isolated(args, label: str, spec, rung: int, left: float | None) -> dict:
    """One rung in a child process, so a CUDA error or a stuck graph cannot spoil the rest."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--_row", str(out), "--rungs", str(rung),
               "--warmup", str(args.warmup), "--epochs", str(args.epochs),
               "--seed", str(args.seed), "--_label", label]
        cmd += ["--structures", label] if label.isdigit() else ["--spec", str(spec)]
        for flag in ("data", "cache", "device", "train_subset", "test_subset", "rung_budget",
                     "threads"):
            v = getattr(args, flag)
            if v is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(v)]
        if args.smoke:
            cmd.append("--smoke")
        limit = args.rung_timeout if left is None else min(args.rung_timeout, left)
        name, adds = RUNGS[rung]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return {"structure": label, "rung": rung, "name": name, "adds": adds,
                    "status": "failed", "epochs": [],
                    "reason": f"stopped after {limit:.0f} s (--rung-timeout / --deadline)"}
        if out.is_file():
            row = json.loads(out.read_text())
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            row = {"structure": label, "rung": rung, "name": name, "adds": adds,
                   "status": "failed", "epochs": [],
                   "reason": f"child exited {proc.returncode}: {tail[0][:300]}"}
        if row["status"] != "ok":  # the child's own words, for whoever debugs it later
            row["child_stderr_tail"] = proc.stderr[-3000:]
        return row


def to_best(args, setup: Setup) -> dict:
    """Structure 1 (or the one given), SGD, --best-epochs epochs with the best rung that runs
    here; wall time from the first step and the best test accuracy reached."""
    rung = args.best_rung or (8 if setup.device.type == "cuda" else 3)
    setup.warmup, setup.epochs, setup.budget_s = 0, args.best_epochs, None
    t0 = time.perf_counter()
    row = run_rung(setup, rung)
    wall = time.perf_counter() - t0
    ep = row.get("epochs", [])
    best = max(ep, key=lambda e: (e["test_acc"], -e["epoch"])) if ep else None
    reach = sum(e["seconds"] for e in ep[:best["epoch"]]) if best else None
    return {"structure": setup.label, "rung": rung, "name": RUNGS[rung][0],
            "status": row["status"], "reason": row["reason"], "epochs_run": len(ep),
            "wall_s": wall, "train_s": sum(e["seconds"] for e in ep),
            "best_test_acc": best["test_acc"] if best else None,
            "best_epoch": best["epoch"] if best else None, "seconds_to_best": reach,
            "paper_best_test_acc": 0.9503, "paper_best_epoch": 212, "epochs": ep}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structures", default=None,
                    help="Table 1 numbers, e.g. 1,6,9 (default 1; --smoke: a tiny spec)")
    ap.add_argument("--spec", help="a custom spec instead (label 'custom')")
    ap.add_argument("--rungs", type=parse_rungs, default=None,
                    help="e.g. 1-8 or 1,8,7,5: run in this order (with --deadline, the most "
                    "wanted first)")
    ap.add_argument("--epochs", type=int, default=None, help="measured epochs per rung")
    ap.add_argument("--warmup", type=int, default=1, help="epochs before measuring")
    ap.add_argument("--rung-budget", type=float, default=None,
                    help="stop measuring a rung after this many seconds (at least 1 epoch)")
    ap.add_argument("--rung-timeout", type=float, default=1800, help="with --isolate")
    ap.add_argument("--isolate", action="store_true", help="each rung in its own process")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for the whole run: rungs that would start later are skipped "
                    "(and with --isolate a running one is stopped)")
    ap.add_argument("--data", default=None, help="CIFAR-10 source (default: the JPEG copy)")
    ap.add_argument("--cache", default=None, help="cache for decoded arrays and betons")
    ap.add_argument("--device", default=None)
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--test-subset", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads at start (default: torch's own choice; note "
                    "that FFCV's Loader, so rungs 3-7, resets them to its worker count)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU-sized: tiny spec, 1024 train / 256 test images, 2 epochs")
    ap.add_argument("--to-best", action="store_true", help="time to the paper's best instead")
    ap.add_argument("--best-epochs", type=int, default=200)
    ap.add_argument("--best-rung", type=int, default=None)
    ap.add_argument("--out", default=None, help="folder for epoch_time_<tag>.json/.md")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--_row", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_label", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    from fastres.study.structures import STRUCTURES, ResNetSpec, describe

    if args.smoke:
        args.train_subset = args.train_subset or 1024
        args.test_subset = args.test_subset or 256
        args.epochs = args.epochs or 2
    args.epochs = args.epochs or 3
    args.data = args.data or C.default_data()
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # the paper's script family sets it; so do we
    if args.spec or (args.smoke and args.structures is None):
        specs = [("custom" if args.spec else "smoke",
                  ResNetSpec.parse(args.spec or SMOKE_SPEC).validate())]
    else:
        specs = [(str(i), STRUCTURES[int(i)]) for i in (args.structures or "1").split(",")]
    rungs = args.rungs or list(RUNGS)

    if args._row:  # child of --isolate: one rung, one row
        label, spec = specs[0]
        label = args._label or label
        row = run_rung(make_setup(args, label, spec), rungs[0])
        Path(args._row).write_text(json.dumps(row))
        return 0

    t_main = time.time()
    device = C.pick_device(args.device)
    env = C.environment(device)
    ceil = C.ceilings(device)
    mode = "smoke (tiny spec, image subset: a check that it runs, not a speed figure)" \
        if args.smoke else "full"
    print(f"[epoch_time] {env['device_name']}: floor rate {ceil['floor_tflops']:.4g} TFLOP/s, "
          f"copy {ceil['copy_gbps']:.4g} GB/s; data {args.data}", flush=True)
    result: dict = {"mode": mode, "environment": env, "ceilings": ceil, "protocol": PROTO,
                    "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                    "structures": []}
    tag = ("smoke-" if args.smoke else "") + device.type + ("-to-best" if args.to_best else "")
    json_path = args.json or (os.path.join(args.out, f"epoch_time_{tag}.json") if args.out
                              else None)
    md_path = args.md or (os.path.join(args.out, f"epoch_time_{tag}.md") if args.out else None)
    if args.to_best:
        label, spec = specs[0]
        setup = make_setup(args, label, spec)
        result["to_best"] = to_best(args, setup)
        b = result["to_best"]
        print(f"[epoch_time] to-best: {b['status']} {b['reason']} best "
              f"{C.fmt(b['best_test_acc'], '.4f')} at epoch {b['best_epoch']}, "
              f"wall {b['wall_s']:.1f} s", flush=True)
    else:
        for label, spec in specs:
            d = describe(spec)
            setup = make_setup(args, label, spec)
            entry = {"label": label, "spec": str(spec), "params": d["params"],
                     "gflop_per_image": d["gflop_per_image"], "rows": []}
            result["structures"].append(entry)
            try:
                n_train, n_test = (len(ix) if ix is not None else len(setup.arrays()[s][0])
                                   for ix, s in zip(setup.indices(), ("train", "test"),
                                                    strict=True))
            except RungSkipped:  # no data: every rung will say so
                n_train, n_test = 0, 0
            for rung in rungs:
                left = None if args.deadline is None else args.deadline - (time.time() - t_main)
                if left is not None and left < 10:
                    name, adds = RUNGS[rung]
                    row = {"structure": label, "rung": rung, "name": name, "adds": adds,
                           "status": "skipped", "epochs": [],
                           "reason": f"the run's --deadline of {args.deadline:g} s was spent"}
                elif args.isolate:
                    row = run_isolated(args, label, spec, rung, left)
                else:
                    row = run_rung(setup, rung)
                entry["rows"].append(row)
                print(f"[epoch_time] {label} rung {rung} {row['name']}: {row['status']} "
                      f"{C.fmt(row.get('epoch_s'), '.4g')} s/epoch "
                      f"(warm-up {C.fmt(row.get('warmup_s'), '.3g')} s) {row['reason']}",
                      flush=True)
                finish_rows(entry["rows"], d["gflop_per_image"] * 1e9, n_train, n_test,
                            ceil["floor_tflops"])
                # Written after every rung, so a run stopped by a timeout keeps what it measured.
                C.write_outputs(result, json_path, md_path, render(result))
    md = render(result)
    C.write_outputs(result, json_path, md_path, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
