"""Images per second delivered ready for the model: augmented (crop with 4-pixel zero padding,
flip), normalised, float, on the device. Runs on the CPU too (there "on the device" is host
memory), so the ratio between pipelines is measurable on any machine.

    python benchmarks/loader.py                  # the whole training set, this device
    python benchmarks/loader.py --smoke          # 4096 images: a check that it runs

Pipelines:
  torchvision-2w     the paper's: in-memory CIFAR10-style dataset, PIL RandomCrop + flip +
                     ToTensor + Normalize in 2 DataLoader workers, then .to(device)
  torchvision-all    the same with one worker per core
  ffcv-cpu           FFCV with its own CPU transforms (RandomTranslate, RandomHorizontalFlip,
                     NormalizeImage, all in its compiled CPU pipeline), then to the device
  fastres-ffcv       fastres's loader: FFCV moves uint8 to the device, DeviceAugment there
  fastres-resident   the training set kept on the device as uint8, DeviceAugment there
                     (epoch_time.py's rung 8)

Each is timed over --epochs passes after one warm-up pass (worker start, JIT compilation,
first allocations: reported separately); the figure is the median pass. The clock stops after
a device synchronisation, so what it counts is batches that are ready.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BATCH = 128
PIPELINES = ("torchvision-2w", "torchvision-all", "ffcv-cpu", "fastres-ffcv", "fastres-resident")


class Skip(Exception):
    """This pipeline cannot run here; the message says why."""


def torchvision_batches(images: np.ndarray, labels: np.ndarray, workers: int,
                        device: torch.device, dtype: torch.dtype) -> Callable[[], Iterable]:
    from epoch_time import CIFAR10Arrays, paper_transforms

    ds = CIFAR10Arrays(images, labels, paper_transforms()[0])
    # pin_memory as a tuned torchvision user would set it on a GPU: a fair baseline.
    dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers,
                                     pin_memory=device.type == "cuda")

    def one_pass() -> Iterable:
        for x, y in dl:
            yield (x.to(device, non_blocking=True).to(dtype),
                   y.to(device, non_blocking=True))
    return one_pass


def ffcv_cpu_batches(beton: Path, indices, device: torch.device, dtype: torch.dtype
                     ) -> Callable[[], Iterable]:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import (
        NormalizeImage,
        RandomHorizontalFlip,
        RandomTranslate,
        Squeeze,
        ToDevice,
        ToTensor,
        ToTorchImage,
    )

    from fastres.study.protocol import CIFAR_MEAN, CIFAR_STD

    mean = np.array(CIFAR_MEAN) * 255
    std = np.array(CIFAR_STD) * 255
    to_dev = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    loader = Loader(
        str(beton), batch_size=BATCH, num_workers=-1, order=OrderOption.RANDOM,
        drop_last=False, os_cache=True, indices=indices,
        pipelines={
            # RandomTranslate(padding=4, fill=0) is RandomCrop(32, padding=4) with zero padding.
            "image": [SimpleRGBImageDecoder(), RandomTranslate(padding=4, fill=(0, 0, 0)),
                      RandomHorizontalFlip(), NormalizeImage(mean, std, np.float32),
                      ToTensor(), *to_dev, ToTorchImage()],  # FFCV's documented order
            "label": [IntDecoder(), ToTensor(), Squeeze(-1), *to_dev]})

    def one_pass() -> Iterable:
        for x, y in loader:
            yield x.to(dtype), y
    return one_pass


def fastres_ffcv_batches(beton: Path, indices, device: torch.device, dtype: torch.dtype
                         ) -> Callable[[], Iterable]:
    from fastres.loaders.augment import DeviceAugment
    from fastres.loaders.cifar import CifarLoader

    loader = CifarLoader(beton, BATCH, True, device, DeviceAugment(dtype=dtype), indices=indices)
    return lambda: iter(loader)


def resident_batches(images: np.ndarray, labels: np.ndarray, device: torch.device,
                     dtype: torch.dtype) -> Callable[[], Iterable]:
    from fastres.loaders.augment import DeviceAugment
    from fastres.loaders.resident import ResidentData, ResidentLoader

    data = ResidentData(torch.from_numpy(np.ascontiguousarray(images)).to(device),
                        torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device))
    loader = ResidentLoader(data, BATCH, True, device, DeviceAugment(dtype=dtype))
    return lambda: iter(loader)


def time_pipeline(make: Callable[[], Callable[[], Iterable]], device: torch.device,
                  epochs: int, threads: int | None = None) -> dict:
    """One warm-up pass (plus building the pipeline), then `epochs` timed passes."""
    t0 = time.perf_counter()
    one_pass = make()
    setup_s = time.perf_counter() - t0
    passes: list[tuple[float, int]] = []
    for _ in range(epochs + 1):
        if threads:  # FFCV's Loader sets torch's thread count to its own worker count
            torch.set_num_threads(threads)
        start = time.perf_counter()
        n = 0
        for x, _y in one_pass():
            n += x.shape[0]
        C.sync(device)
        passes.append((time.perf_counter() - start, n))
    s = C.median([p[0] for p in passes[1:]])
    n = passes[1][1]
    return {"status": "ok", "images": n, "pass_s": s, "images_per_s": n / s,
            "warmup_s": setup_s + passes[0][0], "passes_s": [p[0] for p in passes],
            "torch_threads_after": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--images", type=int, default=None, help="a fixed subset of the train set")
    ap.add_argument("--epochs", type=int, default=None, help="timed passes (default 3)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                    help="delivered dtype (default: bf16 on a GPU, fp32 on the CPU)")
    ap.add_argument("--pipelines", default=",".join(PIPELINES))
    ap.add_argument("--smoke", action="store_true", help="4096 images, 2 passes")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads, set again before every pass since FFCV's "
                    "Loader resets them to its worker count (default: leave them alone). On a "
                    "small CPU shared with other work, 1 avoids threads spinning on each other")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.images = args.images or 4096
        args.epochs = args.epochs or 2
    args.epochs = args.epochs or 3
    args.data = args.data or C.default_data()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = C.pick_device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    env = C.environment(device)
    names = [p for p in args.pipelines.split(",") if p]
    unknown = set(names) - set(PIPELINES)
    if unknown:
        ap.error(f"unknown pipelines {sorted(unknown)}; choose from {', '.join(PIPELINES)}")
    if args.data is None:
        ap.error("no CIFAR-10 source: pass --data or set FASTRES_DATA")

    from epoch_time import Setup

    setup = Setup("loader", None, device, args.data, args.cache, args.images, None, 0, 0, None)
    arrays = setup.arrays()
    idx = C.subset_indices(args.images, len(arrays["train"][0]))
    x, y = arrays["train"]
    if idx is not None:
        x, y = x[idx], y[idx]
    ffcv_ok, ffcv_why = C.ffcv_status()

    def ffcv_beton() -> Path:
        if not ffcv_ok:
            raise Skip(f"needs FFCV: {ffcv_why}")
        return setup.betons().train

    makers: dict[str, Callable[[], Callable[[], Iterable]]] = {
        "torchvision-2w": lambda: torchvision_batches(x, y, 2, device, dtype),
        "torchvision-all": lambda: torchvision_batches(x, y, C.cpu_count(), device, dtype),
        "ffcv-cpu": lambda: ffcv_cpu_batches(ffcv_beton(), idx, device, dtype),
        "fastres-ffcv": lambda: fastres_ffcv_batches(ffcv_beton(), idx, device, dtype),
        "fastres-resident": lambda: resident_batches(x, y, device, dtype),
    }
    rows = []
    for name in names:
        row: dict = {"pipeline": name, "reason": ""}
        try:
            row.update(time_pipeline(makers[name], device, args.epochs, args.threads))
        except Skip as e:
            row.update(status="skipped", reason=str(e))
        except Exception as e:  # one pipeline failing must not hide the others
            row.update(status="failed", reason=f"{type(e).__name__}: {str(e).splitlines()[0]}")
        rows.append(row)
        print(f"[loader] {name}: {row['status']} {C.fmt(row.get('images_per_s'), ',.0f')} "
              f"images/s {row['reason']}", flush=True)
    base = next((r["images_per_s"] for r in rows
                 if r["pipeline"] == "torchvision-2w" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] == "ok" and base:
            r["vs_torchvision_2w"] = r["images_per_s"] / base

    result = {"mode": "smoke (image subset: a check that it runs)" if args.smoke else "full",
              "environment": env, "dtype": str(dtype).removeprefix("torch."),
              "batch": BATCH, "images": len(y), "torch_threads": args.threads,
              "rows": rows}
    cols = [("pipeline", "pipeline", ""), ("status", "status", ""),
            ("images_per_s", "images/s", ",.0f"), ("vs_torchvision_2w", "vs torchvision 2w", ".2f"),
            ("pass_s", "s/pass", ".3g"), ("warmup_s", "warm-up s", ".3g"),
            ("reason", "why not", "")]
    md = "\n".join([
        f"# loader: {env['device_name']} ({env['device']}), {env['date']}", "",
        f"Command: `{env['command']}`  ",
        f"Mode: {result['mode']}; {len(y):,} training images, batch {BATCH}, delivered as "
        f"{result['dtype']} NCHW on {device}; torch {env['torch']}, {env['cpu_cores']} cores "
        f"(torch threads: {args.threads or 'default'}), "
        f"load average {C.fmt(env.get('load_average_1m'), '.2f')} at start", "",
        C.markdown_table(rows, cols), ""])
    tag = ("smoke-" if args.smoke else "") + device.type
    out = args.out
    C.write_outputs(result, args.json or (out and os.path.join(out, f"loader_{tag}.json")),
                    args.md or (out and os.path.join(out, f"loader_{tag}.md")), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
