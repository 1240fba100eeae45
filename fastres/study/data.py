"""CIFAR-10 sources on disk, converted once into FFCV `.beton` files.

A source is detected from `--data PATH`:
- torchvision's `cifar-10-batches-py` folder (or a folder holding one), or nothing at all, in
  which case the cached download is used, or torchvision downloads it into the cache;
- an ImageFolder tree with `train/` and `test/` class folders, or a `.tar.gz` of such a tree;
- a folder with ready `train.beton` and `test.beton`;
- the word `synthetic`: made-up, learnable images for trying the tool out where no CIFAR-10 can
  be had. Everything trained on it is labelled synthetic, in the output and in the results.

Everything but ready betons is written to `<cache>/betons/<kind>-<identity>/` with atomic renames,
and a cached pair is checked on open (sample count, image shape) and rebuilt if it is wrong.
"""

from __future__ import annotations

import errno
import functools
import gzip
import hashlib
import io
import json
import os
import pickle
import signal
import socket
import stat
import sys
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def silence_conversion_bars() -> None:
    """FFCV's conversion draws tqdm bars: on a terminal they tear a live display, in a pipe or
    a log each becomes hundreds of carriage-return fragments. tqdm reads TQDM_DISABLE; each
    conversion is logged in a line of its own anyway."""
    os.environ.setdefault("TQDM_DISABLE", "1")


IMAGE_SHAPE = (32, 32, 3)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = len(CIFAR10_CLASSES)  # the model's output width: labels must be 0..9
CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
MANIFEST_VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")

HOW_TO_POINT = (
    "Point fastres at a local copy with --data PATH (or the FASTRES_DATA environment variable), "
    "where PATH is one of: torchvision's cifar-10-batches-py folder; an ImageFolder tree with "
    "train/ and test/ class folders; a .tar.gz of such a tree; a folder with train.beton and "
    "test.beton. To try fastres without CIFAR-10, use --data synthetic (made-up images).")


class DataError(ValueError):
    """A data source that cannot be used; the message says what was found and what was expected."""


class DataUnavailable(DataError):
    """No local copy was given and CIFAR-10 could not be downloaded."""


@dataclass(frozen=True)
class BetonPair:
    train: Path
    test: Path
    kind: str
    source: str
    num_train: int
    num_test: int
    identity: str  # what results are keyed by: the same data always gives the same identity


def fixed_subset(n: int | None, total: int) -> np.ndarray | None:
    """A fixed random `n` of `total` indices (rng 0, so the same for every run and seed, which
    keeps subset runs comparable), sorted so a sequential loader keeps the file's order."""
    if n is None or n >= total:
        return None
    return np.sort(np.random.default_rng(0).permutation(total)[:n])


def _cache_source(cache: str | os.PathLike | None) -> tuple[Path, str]:
    """The cache folder and how the user named it (for errors): --cache, else FASTRES_CACHE,
    else XDG_CACHE_HOME/fastres, else ~/.cache/fastres. The home folder is looked up only for
    the last: in a container it may not exist."""
    if cache is not None and str(cache):
        return Path(cache), f"--cache {cache}"
    env = os.environ.get("FASTRES_CACHE")
    if env:
        return Path(env), f"FASTRES_CACHE={env}"
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "fastres", f"the cache folder {Path(xdg) / 'fastres'} " \
            f"(XDG_CACHE_HOME={xdg}; --cache DIR or FASTRES_CACHE move it)"
    try:
        home = Path.home()
    except RuntimeError:  # HOME unset and no passwd entry: usual for a container's user
        raise DataError("no folder for the cache: there is no home folder (HOME is unset and "
                        f"user {os.getuid()} has no passwd entry); give one with --cache DIR or "
                        "the FASTRES_CACHE environment variable") from None
    folder = home / ".cache" / "fastres"
    return folder, f"the cache folder {folder} (--cache DIR or FASTRES_CACHE move it)"


def default_cache_dir() -> Path:
    """Where downloads and betons go when no --cache is given (see _cache_source)."""
    return _cache_source(None)[0]


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """The cache folder, created if need be; DataError naming --cache or FASTRES_CACHE where it
    is a file or cannot be written (found here, not as a traceback mid-conversion)."""
    folder, named = _cache_source(cache)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{named} is a file, not a folder; give a folder for downloads and "
                        "converted data")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{named}: cannot create that folder ({e.strerror}); give another with "
                        "--cache DIR or FASTRES_CACHE") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"{named} is not writable; give a writable folder with --cache DIR or "
                        "FASTRES_CACHE")
    return folder


# ---------------------------------------------------------------------------- detection


def _find_cifar_python(path: Path) -> Path | None:
    for cand in (path, path / "cifar-10-batches-py"):
        if cand.is_dir() and all((cand / b).is_file() for b in [*CIFAR_BATCHES, "test_batch"]):
            return cand
    return None


def _is_imagefolder(path: Path) -> bool:
    return all((path / split).is_dir() and any(p.is_dir() for p in (path / split).iterdir())
               for split in ("train", "test"))


def detect(path: Path) -> tuple[str, Path]:
    """(kind, root) for a source path; DataError naming what was found otherwise."""
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder. {HOW_TO_POINT}")
    if path.is_file():
        if path.name.endswith((".tar.gz", ".tgz")):
            return "tar", path
        if path.suffix == ".beton":
            raise DataError(f"--data {path} is a single .beton file; expected a folder holding "
                            "both train.beton and test.beton")
        raise DataError(f"--data {path} is a file of unknown kind ({path.suffix or 'no suffix'}); "
                        f"expected a .tar.gz of an ImageFolder tree. {HOW_TO_POINT}")
    if (path / "train.beton").is_file() and (path / "test.beton").is_file():
        return "beton", path
    found = _find_cifar_python(path)
    if found is not None:
        return "cifar-python", found
    if _is_imagefolder(path):
        return "imagefolder", path
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(entries[:12]) + (" ..." if len(entries) > 12 else "") or "nothing"
    raise DataError(f"--data {path} is a folder holding {shown}; expected data_batch_1..5 and "
                    "test_batch (cifar-10-batches-py), train/ and test/ class folders, or "
                    f"train.beton and test.beton. {HOW_TO_POINT}")


def identity(kind: str, root: Path) -> str:
    """A key for the cache: content hash for archives and batch files, listing for trees."""
    h = hashlib.sha256(f"v{MANIFEST_VERSION}:{kind}".encode())
    if kind == "tar":
        files = [root]
    elif kind == "cifar-python":
        files = [root / b for b in [*CIFAR_BATCHES, "test_batch"]]
    else:
        files = []
        for split in ("train", "test"):
            for p in sorted((root / split).rglob("*")):
                if p.is_file():
                    st = p.stat()
                    h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        # Images below a class folder's top level were left out before they were read at any
        # depth: such a tree gets a key of its own, so neither its cached betons nor its results
        # are those of the conversion that missed them. (Also finds broken links before any
        # conversion starts.)
        if any(len(f.relative_to(c).parts) > 1 for split in ("train", "test")
               for c in (root / split).iterdir() if c.is_dir() for f in _image_files(c, root)):
            h.update(b"images at any depth")
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):  # noqa: B023
                h.update(chunk)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- readers


def _decode(data: bytes, name: str) -> np.ndarray:
    from PIL import Image

    try:
        img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except Exception as e:  # PIL raises many types for a bad file
        raise DataError(f"cannot decode image {name}: {e}") from None
    if img.shape != IMAGE_SHAPE:
        raise DataError(f"image {name} is {img.shape[1]}x{img.shape[0]}; "
                        f"CIFAR-10 images are 32x32 RGB")
    return img


def _stack(images: list[np.ndarray], labels: list[int], what: str,
           classes: list[str] | None = None, log=None) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels as arrays. With `classes` (the label's names), a class without images
    is refused (training would go on with nine, without a word), and `log` is told how many
    images each class has."""
    if not images:
        raise DataError(f"{what} holds no images")
    y = np.asarray(labels, dtype=np.int64)
    if classes is not None:
        counts = np.bincount(y, minlength=len(classes))
        empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
        if empty:
            raise DataError(f"{what}: class {', '.join(empty)} has no images (looked for "
                            f"{', '.join(IMAGE_SUFFIXES)} files at any depth under its folder); "
                            f"every class needs images in train/ and test/")
        if log is not None:
            log(f"[data] {what}: {len(y)} images, "
                + ", ".join(f"{c} {n}" for c, n in zip(classes, counts, strict=True)))
    return np.stack(images), y


def read_cifar_python(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """torchvision's pickled batches: rows of 3072 bytes, the R, G and B planes in turn."""
    out = {}
    for split, names in (("train", CIFAR_BATCHES), ("test", ["test_batch"])):
        xs, ys = [], []
        for name in names:
            with open(root / name, "rb") as f:
                try:
                    batch = pickle.load(f, encoding="bytes")
                    data = np.asarray(batch[b"data"], dtype=np.uint8)
                    labels = batch[b"labels"]
                except Exception as e:
                    raise DataError(f"{root / name} is not a CIFAR-10 python batch: {e}") from None
            if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
                raise DataError(f"{root / name}: data shape {data.shape} with {len(labels)} "
                                "labels; expected (n, 3072) and n labels")
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(labels, dtype=np.int64))
        out[split] = (np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys))
    return out


def _names(classes: list[str]) -> str:
    return ", ".join(classes[:20]) + (" ..." if len(classes) > 20 else "") if classes else "none"


def _class_index(train: set[str], test: set[str], where: str) -> dict[str, int]:
    """Label of each class folder, in sorted order (CIFAR-10's own order for its ten names).
    Exactly ten, the same in train/ and test/: the model has ten outputs, and another set would
    train on the wrong classes without a word, or fail mid-run on a label past 9."""
    tr, te = sorted(train), sorted(test)
    if len(tr) != NUM_CLASSES:
        raise DataError(f"{where}: train/ has {len(tr)} class folders ({_names(tr)}); CIFAR-10 "
                        f"has exactly {NUM_CLASSES} ({', '.join(CIFAR10_CLASSES)})")
    if tr != te:
        raise DataError(f"{where}: test/ has class folders ({_names(te)}) other than train/'s "
                        f"({_names(tr)}); both need the same {NUM_CLASSES}")
    return {c: i for i, c in enumerate(tr)}


def _broken_link(path: Path, root: Path) -> DataError:
    """The error for a link under a data tree that leads nowhere (dangling, or a loop)."""
    try:
        path.stat()
        what = "cannot be read"
    except OSError as e:
        what = ("is a symbolic link loop" if e.errno == errno.ELOOP else
                f"is a dangling symbolic link (to {os.readlink(path)}, which does not exist)"
                if e.errno == errno.ENOENT else f"cannot be read ({e.strerror})")
    return DataError(f"--data {root}: {path.relative_to(root)} {what}; remove it or fix it, "
                     "then rerun (fastres refuses a tree with broken files rather than train on "
                     "part of it)")


def _image_files(folder: Path, root: Path) -> list[Path]:
    """The images under a class folder at any depth, as torchvision's ImageFolder finds them
    (links to folders followed), sorted by path (as an archive of the tree is read). A broken
    link, or a folder link back into its own ancestry (walked forever otherwise), is a
    DataError naming it."""
    found: list[Path] = []

    def walk(d: Path, ancestors: frozenset) -> None:
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            raise DataError(f"--data {root}: cannot read folder {d.relative_to(root)} "
                            f"({e.strerror})") from None
        for e in entries:
            p = Path(e.path)
            try:
                st = p.stat()  # follows links: a dangling one or a loop fails here
            except OSError:
                raise _broken_link(p, root) from None
            if stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in ancestors:
                    raise DataError(f"--data {root}: {p.relative_to(root)} links back to a folder "
                                    "above it (a loop); remove the link, then rerun")
                walk(p, ancestors | {(st.st_dev, st.st_ino)})
            elif p.suffix.lower() in IMAGE_SUFFIXES:
                found.append(p)

    # The folders above it up to the tree's root count as its ancestry: a link to train/ would
    # otherwise add the other classes' images to this one.
    above = [folder, *(root / d for d in folder.relative_to(root).parents)]
    walk(folder, frozenset((st.st_dev, st.st_ino) for st in (d.stat() for d in above)))
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def read_imagefolder(root: Path, log=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folders = {split: sorted(p for p in (root / split).iterdir() if p.is_dir())
               for split in ("train", "test")}
    classes = _class_index({p.name for p in folders["train"]}, {p.name for p in folders["test"]},
                           f"--data {root}")
    out = {}
    for split in ("train", "test"):
        images, labels = [], []
        for cdir in folders[split]:
            for f in _image_files(cdir, root):
                try:
                    data = f.read_bytes()
                except OSError as e:
                    raise DataError(f"--data {root}: cannot read {f.relative_to(root)} "
                                    f"({e.strerror})") from None
                images.append(_decode(data, str(f)))
                labels.append(classes[cdir.name])
        out[split] = _stack(images, labels, str(root / split), list(classes), log)
    return out


def _tar_members(path: Path) -> Iterator[tuple[str, str, str, bytes]]:
    """(split, class, name, bytes) for each image, allowing one leading folder in the archive."""
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if m.issym() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES:
                    # Dangling or not, a link is no image: refused rather than skipped, since
                    # skipping would train on part of a class without a word.
                    raise DataError(f"--data {path}: {m.name} in the archive is a symbolic link "
                                    f"(to {m.linkname}), not an image; archive the images "
                                    "themselves (tar --dereference)")
                if not m.isfile():
                    continue
                parts = Path(m.name).parts
                if len(parts) >= 4 and parts[0] not in ("train", "test") \
                        and parts[1] in ("train", "test"):
                    parts = parts[1:]  # e.g. cifar10/train/cat/0001.jpg
                # Images at any depth under their class folder (train/cat/part1/0001.jpg), as
                # in a tree on disk.
                if len(parts) < 3 or parts[0] not in ("train", "test"):
                    continue
                if Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                yield parts[0], parts[1], m.name, tf.extractfile(m).read()  # type: ignore[union-attr]
            # tarfile stops quietly at a damaged header, which would train on part of the data:
            # read the stream to its end so that gzip checks its length and CRC.
            while tf.fileobj.read(1 << 20):  # type: ignore[union-attr]
                pass
    except (EOFError, tarfile.ReadError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, EOFError) or "unexpected end of data" in reason:
            raise DataError(f"--data {path}: archive {path.name} is truncated ({reason}); it "
                            "ends before its last file: copy or download it again") from None
        raise DataError(f"--data {path} is not a readable tar archive ({reason}); expected a "
                        ".tar.gz of an ImageFolder tree (train/<class>/*.jpg, test/<class>/*.jpg)"
                        ) from None
    except (tarfile.TarError, zlib.error, gzip.BadGzipFile, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:  # the file system's, not the data's
            raise DataError(f"--data {path}: cannot read it ({e})") from None
        raise DataError(f"--data {path}: archive {path.name} is corrupt or truncated "
                        f"({type(e).__name__}: {e}): copy or download it again") from None


def read_tar(path: Path, log=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    by_split: dict[str, list[tuple[str, str, np.ndarray]]] = {"train": [], "test": []}
    for split, cls, name, data in _tar_members(path):
        by_split[split].append((cls, name, _decode(data, f"{path}:{name}")))
    if not by_split["train"] or not by_split["test"]:
        raise DataError(f"--data {path} holds {len(by_split['train'])} train/ and "
                        f"{len(by_split['test'])} test/ images; expected an ImageFolder tree "
                        "train/<class>/*.jpg and test/<class>/*.jpg")
    classes = _class_index({c for c, _, _ in by_split["train"]},
                           {c for c, _, _ in by_split["test"]}, f"--data {path}")
    out = {}
    for split, items in by_split.items():
        items.sort(key=lambda t: (t[0], Path(t[1]).parts))  # as a tree on disk is read
        out[split] = _stack([im for _, _, im in items], [classes[c] for c, _, _ in items],
                            f"{path}:{split}/", list(classes), log)
    return out


# ---------------------------------------------------------------------------- betons


class _ArrayDataset:
    """What FFCV's DatasetWriter iterates: (HWC uint8 image, int label) per index."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


def _die_with_parent(parent: int, job: Callable, *args) -> None:
    """An FFCV writer worker's body: killed as soon as the process that started it dies, so a
    SIGKILLed conversion leaves no orphan holding hundreds of MB, a shared-memory segment and
    the temporary file. Linux's PR_SET_PDEATHSIG; elsewhere the job runs as FFCV runs it."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)
    job(*args)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporary files of `path` (`.NAME.tmp-HOST-PID`, or `.NAME.tmp-PID` as written
    before the host was named) whose process is gone: a conversion killed mid-write leaves its
    file behind. Another host's files are left alone (its processes cannot be seen from here).
    Returns what was removed."""
    host = socket.gethostname()
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        owner = tmp.name[len(f".{path.name}.tmp-"):]
        tmp_host, _, pid = owner.rpartition("-")
        if not pid.isdigit() or tmp_host not in ("", host):
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or not ours to signal): still being written
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def write_beton(path: Path, images: np.ndarray, labels: np.ndarray, num_workers: int = 1) -> None:
    """Write raw RGB images and integer labels; the file appears under `path` only when whole."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.utils import chunks
    from ffcv.writer import DatasetWriter, worker_job_indexed_dataset

    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"images must be uint8 (n, 32, 32, 3), got {images.dtype} {images.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _tmp_name(path)
    try:
        writer = DatasetWriter(str(tmp), {"image": RGBImageField(write_mode="raw"),
                                          "label": IntField()}, num_workers=num_workers)
        # DatasetWriter.from_indexed_dataset, with workers that die with this process.
        indices = list(enumerate(range(len(images))))
        writer._write_common(len(indices), chunks(indices, 100),
                             functools.partial(_die_with_parent, os.getpid(),
                                               worker_job_indexed_dataset),
                             (_ArrayDataset(images, labels),))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_beton(path: Path, count: int | None = None) -> int:
    """Sample count of a beton whose images are all 32x32; DataError if it is not that."""
    from ffcv.reader import Reader

    try:
        reader = Reader(str(path))
        n = int(reader.num_samples)
        meta = reader.metadata
    except Exception as e:  # a truncated or foreign file fails in many ways inside FFCV
        raise DataError(f"{path} is not a readable .beton: {e}") from None
    names = meta.dtype.names or ()
    if "f0" not in names:
        raise DataError(f"{path} has no image field")
    img = meta["f0"]
    if not {"width", "height"} <= set(img.dtype.names or ()):
        raise DataError(f"{path}: first field is not an RGB image field")
    if n == 0 or not (np.all(img["width"] == 32) and np.all(img["height"] == 32)):
        raise DataError(f"{path}: {n} samples, expected non-empty 32x32 images")
    # An IntField keeps its values in the metadata: checking every label costs nothing.
    if "f1" not in names or meta["f1"].dtype.kind not in "iu":
        raise DataError(f"{path}: second field is not an integer label field")
    labels = meta["f1"]
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataError(f"{path}: labels run {labels.min()}..{labels.max()}; CIFAR-10's are "
                        f"0..{NUM_CLASSES - 1} (ten classes)")
    if count is not None and n != count:
        raise DataError(f"{path} holds {n} samples, expected {count}")
    missing = sorted(set(range(NUM_CLASSES)) - set(np.unique(labels).tolist()))
    if missing:  # e.g. converted by a version that missed a class folder's nested images
        raise DataError(f"{path}: no image of class {', '.join(map(str, missing))}; every one "
                        f"of the {NUM_CLASSES} classes needs images")
    return n


def write_json_atomic(path: str | os.PathLike, obj: dict) -> None:
    """Write JSON so that `path` only ever holds a whole file (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _cached_pair(folder: Path, kind: str, source: str) -> BetonPair | None:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        m = json.loads(manifest.read_text())
        n_train = check_beton(folder / "train.beton", m["num_train"])
        n_test = check_beton(folder / "test.beton", m["num_test"])
    except (DataError, KeyError, ValueError, OSError) as e:
        warnings.warn(f"cached betons in {folder} are unusable ({e}); rebuilding", stacklevel=3)
        return None
    return BetonPair(folder / "train.beton", folder / "test.beton", kind, source, n_train, n_test,
                     folder.name)


def _convert(kind: str, root: Path, folder: Path, log) -> BetonPair:
    log(f"[data] converting {kind} source {root} into {folder} (once)")
    if kind == "cifar-python":
        splits = read_cifar_python(root)
    else:
        splits = {"tar": read_tar, "imagefolder": read_imagefolder}[kind](root, log=log)
    for split, (x, y) in splits.items():
        write_beton(folder / f"{split}.beton", x, y)
    write_json_atomic(folder / "manifest.json", {
        "version": MANIFEST_VERSION, "kind": kind, "source": str(root),
        "num_train": len(splits["train"][0]), "num_test": len(splits["test"][0]),
        "num_classes": int(max(splits["train"][1].max(), splits["test"][1].max()) + 1),
    })
    pair = _cached_pair(folder, kind, str(root))
    if pair is None:
        raise DataError(f"betons written to {folder} fail their own check")
    return pair


SYNTHETIC = "synthetic"
SYNTHETIC_WARNING = ("SYNTHETIC DATA: these images are made up (class templates plus noise), "
                     "not CIFAR-10; accuracies on them say nothing about the paper")


def make_synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ten fixed colour-and-stripe templates (one per class) under heavy noise: learnable in a
    few epochs, so the tool can be tried end to end without CIFAR-10."""
    blocks = np.random.default_rng(1234).integers(0, 256, (10, 4, 4, 3))
    templates = blocks.repeat(8, axis=1).repeat(8, axis=2)  # 4x4 grid of 8-pixel squares
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    noise = rng.normal(0, 60, (n, 32, 32, 3))
    images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels


def synthetic(cache: Path, log=print) -> BetonPair:
    log(f"[data] WARNING: {SYNTHETIC_WARNING}")
    folder = cache / "betons" / f"{SYNTHETIC}-v1"
    pair = _cached_pair(folder, SYNTHETIC, SYNTHETIC)
    if pair is not None:
        return pair
    for split, (n, seed) in (("train", (10_000, 0)), ("test", (2_000, 1))):
        write_beton(folder / f"{split}.beton", *make_synthetic(n, seed))
    write_json_atomic(folder / "manifest.json", {
        "version": MANIFEST_VERSION, "kind": SYNTHETIC, "source": SYNTHETIC,
        "num_train": 10_000, "num_test": 2_000, "num_classes": 10})
    pair = _cached_pair(folder, SYNTHETIC, SYNTHETIC)
    assert pair is not None
    return pair


def download_cifar10(cache: Path) -> Path:
    """torchvision's download into the cache; DataUnavailable with directions if it fails."""
    from torchvision.datasets import CIFAR10

    root = cache / "download"
    try:
        CIFAR10(str(root), train=True, download=True)
    except Exception as e:  # URLError, socket timeouts, HTTP errors, bad checksums
        raise DataUnavailable(
            f"CIFAR-10 is not in the cache ({root}) and could not be downloaded: "
            f"{type(e).__name__}: {e}. {HOW_TO_POINT}") from None
    return root / "cifar-10-batches-py"


def prepare(data: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
            download: bool = True, log=print) -> BetonPair:
    """Betons for `data` (see the module docstring), converting and caching as needed."""
    asked = cache  # looked up, and checked, only where the cache is used: not for ready betons
    if data is None:
        data = os.environ.get("FASTRES_DATA") or None
    if data is None:
        cache = cache_dir(asked)
        local = _find_cifar_python(cache / "download")
        if local is None:
            if not download:
                raise DataUnavailable(f"CIFAR-10 is not in the cache ({cache / 'download'}) and "
                                      f"downloading is off. {HOW_TO_POINT}")
            log("[data] no --data given: downloading CIFAR-10 with torchvision")
            local = download_cifar10(cache)
        data = local
    if str(data) == SYNTHETIC:
        return synthetic(cache_dir(asked), log)
    try:
        path = Path(data).expanduser()
    except RuntimeError:  # "~" with no home folder
        raise DataError(f"--data {data}: no home folder to expand ~ in; give the full path"
                        ) from None
    kind, root = detect(path.resolve())
    if kind == "beton":
        n_train = check_beton(root / "train.beton")
        n_test = check_beton(root / "test.beton")
        h = hashlib.sha256()
        for f in (root / "train.beton", root / "test.beton"):
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return BetonPair(root / "train.beton", root / "test.beton", kind, str(root),
                         n_train, n_test, f"beton-{h.hexdigest()[:16]}")
    folder = cache_dir(asked) / "betons" / f"{kind}-{identity(kind, root)}"
    return _cached_pair(folder, kind, str(root)) or _convert(kind, root, folder, log)
