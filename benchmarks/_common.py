"""Shared pieces of the benchmark scripts: device ceilings measured on the spot, timing,
the data each loader needs, and JSON + Markdown output.

Every ceiling is measured, never assumed: the FLOP floor of an epoch is its FLOP over the
fastest matrix-product rate this module measures on the same device in the same process.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

# FFCV's writer and pip-installed helpers draw tqdm bars; benchmark logs want none.
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(REPO))

# Where a JPEG copy may sit: the shared one beside a checkout, or the one that travels in device/.
DATA_CANDIDATES = (REPO.parent / "shared/data/cifar10-jpeg.tar.gz",
                   REPO / "device/data/cifar10-jpeg.tar.gz")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pick_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_data() -> str | None:
    env = os.environ.get("FASTRES_DATA")
    if env:
        return env
    for cand in DATA_CANDIDATES:
        if cand.is_file():
            return str(cand)
    return None


def ffcv_status() -> tuple[bool, str]:
    """Whether FFCV imports here, and if not the reason in one line (rows quote it)."""
    try:
        import ffcv.loader  # noqa: F401
        import ffcv.writer  # noqa: F401
    except Exception as e:  # ImportError, or an OSError from a missing shared library
        return False, f"ffcv does not import here ({type(e).__name__}: {str(e).splitlines()[0]})"
    return True, ""


# ---------------------------------------------------------------------------- ceilings


def _time_cuda(fn: Callable[[], object], reps: int) -> list[float]:
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(start, end, strict=True)]


def _time_host(fn: Callable[[], object], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None,
                reps: int = 10) -> float:
    """Median TFLOP/s of an n x n x n product on random data (zeros run faster than real
    data on some chips), after warm-up, rotating among inputs larger than the GPU's L2."""
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    gen = torch.Generator(device=device).manual_seed(0)
    pairs = [(torch.randn(n, n, device=device, dtype=dtype, generator=gen),
              torch.randn(n, n, device=device, dtype=dtype, generator=gen)) for _ in range(2)]
    it = iter(range(1 << 30))

    def run() -> None:
        a, b = pairs[next(it) % len(pairs)]
        torch.mm(a, b)

    for _ in range(3):
        run()
    sync(device)
    times = _time_cuda(run, reps) if device.type == "cuda" else _time_host(run, reps)
    return 2 * n**3 / statistics.median(times) / 1e12


def copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 10) -> float:
    """Median GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    if nbytes is None:
        nbytes = (2 << 30) if device.type == "cuda" else (128 << 20)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    fn = lambda: dst.copy_(src)  # noqa: E731
    times = _time_cuda(fn, reps) if device.type == "cuda" else _time_host(fn, reps)
    return 2 * nbytes / statistics.median(times) / 1e9


def ceilings(device: torch.device) -> dict:
    """The measured matmul rates (fp32 and bf16; TF32 as PyTorch's default leaves it) and copy
    bandwidth. `floor_tflops` is the fastest of the rates: the FLOP floor's denominator."""
    out: dict = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        try:
            out[f"matmul_{name}_tflops"] = matmul_rate(device, dtype)
        except Exception as e:  # bf16 matmul is missing on some CPUs' builds
            out[f"matmul_{name}_tflops"] = None
            out[f"matmul_{name}_error"] = f"{type(e).__name__}: {e}"
    out["copy_gbps"] = copy_bandwidth(device)
    rates = [v for k, v in out.items() if k.startswith("matmul_") and isinstance(v, float)]
    out["floor_tflops"] = max(rates)
    out["matmul_n"] = 8192 if device.type == "cuda" else 1024
    return out


# ---------------------------------------------------------------------------- environment


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=REPO, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": commit, "python": platform.python_version(), "torch": torch.__version__,
        "device": str(device), "device_name": name, "cpu_cores": cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other work on the machine skews CPU figures: the load average says how much there was.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


# ---------------------------------------------------------------------------- data


def subset_indices(n: int | None, total: int) -> np.ndarray | None:
    """The same fixed subset fastres.run.train uses, so every rung sees the same images."""
    from fastres.study.data import fixed_subset  # no FFCV needed

    return fixed_subset(n, total)


def source_arrays(data: str, cache: str | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """uint8 (n, 32, 32, 3) images and int64 labels per split, decoded from `data` once and kept
    as .npy beside fastres's betons. Needs no FFCV, so the torchvision rungs run without it."""
    from fastres.study.data import (
        default_cache_dir,
        detect,
        identity,
        read_cifar_python,
        read_imagefolder,
        read_tar,
    )

    kind, root = detect(Path(data).expanduser().resolve())
    if kind == "beton":
        return _arrays_from_betons(root)
    folder = (Path(cache) if cache else default_cache_dir()) / "arrays" / \
        f"{kind}-{identity(kind, root)}"
    files = {s: (folder / f"{s}_x.npy", folder / f"{s}_y.npy") for s in ("train", "test")}
    if all(x.is_file() and y.is_file() for x, y in files.values()):
        return {s: (np.load(x), np.load(y)) for s, (x, y) in files.items()}
    reader = {"tar": read_tar, "cifar-python": read_cifar_python,
              "imagefolder": read_imagefolder}[kind]
    splits = reader(root)
    folder.mkdir(parents=True, exist_ok=True)
    for s, (x, y) in splits.items():
        for path, arr in zip(files[s], (x, y), strict=True):
            tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npy")
            np.save(tmp, arr)
            os.replace(tmp, path)
    return splits


def _arrays_from_betons(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    out = {}
    for split in ("train", "test"):
        loader = Loader(str(root / f"{split}.beton"), batch_size=1000,
                        order=OrderOption.SEQUENTIAL, drop_last=False,
                        pipelines={"image": [SimpleRGBImageDecoder()],
                                   "label": [IntDecoder()]})
        xs, ys = zip(*((x.copy(), y.copy().reshape(-1)) for x, y in loader), strict=True)
        out[split] = (np.concatenate(xs), np.concatenate(ys).astype(np.int64))
    return out


# ---------------------------------------------------------------------------- output


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(v: object, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec for floats)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = [fmt(r.get(k), f).replace("|", "/").replace("\n", " ") for k, _, f in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(obj: dict, json_path: str | None, md_path: str | None, markdown: str) -> None:
    for path, text in ((json_path, json.dumps(obj, indent=2, allow_nan=True)),
                       (md_path, markdown)):
        if path:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
            tmp.write_text(text + "\n")
            os.replace(tmp, p)
