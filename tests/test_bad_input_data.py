"""Issue 19: bad data trees and cache folders, as `python -m fastres.train` and the grid meet
them. A class is never trained without, a broken file is named, and a bad cache or home folder
is one line naming --cache / FASTRES_CACHE, exit 2, no traceback."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastres.run.train import main
from fastres.study.data import CIFAR10_CLASSES, cache_dir, check_beton, prepare, write_beton

from .conftest import random_images

SPEC = "N=2 B=1,1 C_in=8 F0=3 P0=1 F1=3 P1=1 K=1"


def image_tree(root: Path, per_class: int = 2, nested: str | None = None) -> Path:
    """An ImageFolder tree of `per_class` PNGs per class and split; the class `nested` keeps
    its images one folder down (train/cat/part1/0.png)."""
    for split in ("train", "test"):
        for i, name in enumerate(CIFAR10_CLASSES):
            folder = root / split / name / ("part1" if name == nested else "")
            folder.mkdir(parents=True)
            for k, img in enumerate(random_images(per_class, i)):
                Image.fromarray(img).save(folder / f"{k}.png")
    return root


def run(tree: Path, cache: Path, *extra: str) -> int:
    return main(["--spec", SPEC, "--epochs", "1", "--device", "cpu", "--data", str(tree),
                 "--cache", str(cache), "--loader-workers", "1", *extra])


# ---------------------------------------------------------------- 1: a class never left out

def test_images_one_folder_down_are_read_and_counted(tmp_path):
    """What a run prints as it converts (fastres.run.train and the grid pass print as the log)."""
    tree = image_tree(tmp_path / "tree", nested="cat")
    said: list[str] = []
    pair = prepare(tree, cache=tmp_path / "cache", log=said.append)
    for split in ("train", "test"):
        assert f"[data] {tree / split}: 20 images, airplane 2, automobile 2, bird 2, cat 2, " \
            "deer 2, dog 2, frog 2, horse 2, ship 2, truck 2" in said
    assert (pair.num_train, pair.num_test) == (20, 20)
    check_beton(pair.train)  # every class has images: checked on open


def test_a_class_without_images_is_refused(tmp_path, capsys):
    tree = image_tree(tmp_path / "tree")
    for f in (tree / "test" / "dog").iterdir():
        f.unlink()
    (tree / "test" / "dog" / "notes.txt").write_text("no images here")
    assert run(tree, tmp_path / "cache") == 2
    err = capsys.readouterr().err
    assert f"{tree / 'test'}: class dog has no images" in err and "Traceback" not in err
    assert not list((tmp_path / "cache").rglob("*.beton"))


def test_betons_missing_a_class_are_refused(tmp_path, capsys):
    """Given betons, or cached ones converted before nested images were read, that lack a class
    are never trained on (a cached pair is rebuilt from its source)."""
    folder = tmp_path / "betons"
    labels = np.arange(40) % 10
    labels[labels == 3] = 4  # no cat
    write_beton(folder / "train.beton", random_images(40), labels)
    write_beton(folder / "test.beton", random_images(20, 1), np.arange(20) % 10)
    assert run(folder, tmp_path / "cache") == 2
    err = capsys.readouterr().err
    assert f"{folder / 'train.beton'}: no image of class 3" in err and "Traceback" not in err


# ---------------------------------------------------------------- 8: broken files in a tree

@pytest.mark.parametrize("link, message", [
    ("missing.png", "train/cat/bad.png is a dangling symbolic link (to missing.png"),
    ("bad.png", "train/cat/bad.png is a symbolic link loop"),
    ("..", "train/cat/bad.png links back to a folder above it (a loop)"),
], ids=["dangling", "loop", "folder-loop"])
def test_a_broken_link_in_the_tree_is_named_and_refused(link, message, tmp_path, capsys):
    tree = image_tree(tmp_path / "tree")
    (tree / "train" / "cat" / "bad.png").symlink_to(link)
    assert run(tree, tmp_path / "cache") == 2
    err = capsys.readouterr().err
    assert message in err and "remove" in err
    assert "Traceback" not in err
    assert not list((tmp_path / "cache").rglob("*.beton"))


def test_a_linked_class_folder_is_followed(tmp_path, capsys):
    """A link to a folder elsewhere is followed (as torchvision does), not taken for a loop."""
    tree = image_tree(tmp_path / "tree")
    (tree / "train" / "cat").rename(tmp_path / "cats")
    (tree / "train" / "cat").symlink_to(tmp_path / "cats")
    pair = prepare(tree, cache=tmp_path / "cache", log=lambda _m: None)
    assert pair.num_train == 20
    assert os.path.islink(tree / "train" / "cat")


# ---------------------------------------------------------------- 7: the cache and the home folder

@pytest.fixture
def homeless(monkeypatch):
    """No usable home folder: HOME unset, and no passwd entry for the user (a container's)."""
    def no_home(*_a, **_k):
        raise RuntimeError("Could not determine home directory.")

    for name in ("HOME", "FASTRES_CACHE", "XDG_CACHE_HOME", "FASTRES_DATA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(Path, "home", no_home)
    monkeypatch.setattr(Path, "expanduser", lambda self: self if "~" not in str(self)
                        else no_home())


def test_without_a_home_folder_the_cache_must_be_named(tmp_path, homeless, monkeypatch, capsys):
    tree = image_tree(tmp_path / "tree", per_class=1)
    assert main(["--spec", SPEC, "--epochs", "1", "--device", "cpu", "--data", str(tree)]) == 2
    err = capsys.readouterr().err
    assert "no folder for the cache: there is no home folder" in err and "Traceback" not in err
    assert "--cache DIR or the FASTRES_CACHE environment variable" in err
    # Given a location (any of the three), the home folder is never looked up.
    pair = prepare(tree, cache=tmp_path / "given", log=lambda _m: None)
    assert pair.num_train == 10 and tmp_path / "given" in pair.train.parents
    monkeypatch.setenv("FASTRES_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env" and (tmp_path / "env").is_dir()
    monkeypatch.delenv("FASTRES_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "fastres"


@pytest.mark.parametrize("how", ["--cache", "FASTRES_CACHE"])
def test_a_cache_that_is_a_file_is_named(how, tmp_path, monkeypatch, capsys):
    tree = image_tree(tmp_path / "tree", per_class=1)
    (tmp_path / "file").write_text("not a folder")
    extra = ["--cache", str(tmp_path / "file")] if how == "--cache" else []
    if how == "FASTRES_CACHE":
        monkeypatch.setenv("FASTRES_CACHE", str(tmp_path / "file"))
    argv = ["--spec", SPEC, "--epochs", "1", "--device", "cpu", "--data", str(tree), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    named = f"--cache {tmp_path / 'file'}" if how == "--cache" else \
        f"FASTRES_CACHE={tmp_path / 'file'}"
    assert f"{named} is a file, not a folder" in err and "Traceback" not in err
    # A folder under the file cannot be made: also one line naming it.
    extra = ["--cache", str(tmp_path / "file" / "sub")] if how == "--cache" else []
    if how == "FASTRES_CACHE":
        monkeypatch.setenv("FASTRES_CACHE", str(tmp_path / "file" / "sub"))
    argv = ["--spec", SPEC, "--epochs", "1", "--device", "cpu", "--data", str(tree), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'file' / 'sub'}: cannot create that folder (Not a directory)" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_an_unwritable_cache_is_named(tmp_path, capsys):
    tree = image_tree(tmp_path / "tree", per_class=1)
    (tmp_path / "ro").mkdir(mode=0o555)
    assert main(["--spec", SPEC, "--epochs", "1", "--device", "cpu", "--data", str(tree),
                 "--cache", str(tmp_path / "ro")]) == 2
    assert f"--cache {tmp_path / 'ro'} is not writable" in capsys.readouterr().err


# ---------------------------------------------------------------- 5: a conversion killed

CONVERT_SLOWLY = """
import os, sys, time
from pathlib import Path
import numpy as np
import fastres.study.data as data

def slow(self, i):  # runs in FFCV's writer worker: say who it is, then take forever
    Path(sys.argv[2]).write_text(str(os.getpid()))
    time.sleep(600)

data._ArrayDataset.__getitem__ = slow
data.write_beton(Path(sys.argv[1]), np.zeros((10, 32, 32, 3), np.uint8), np.arange(10))
"""


def _gone(pid: int) -> bool:
    """Exited (a zombie no reaper has collected yet counts: it holds no memory or files)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_conversion_leaves_no_worker_and_its_file_is_cleaned(tmp_path):
    target, child_pid = tmp_path / "cache" / "train.beton", tmp_path / "worker.pid"
    proc = subprocess.Popen([sys.executable, "-c", CONVERT_SLOWLY, str(target), str(child_pid)])
    try:
        deadline = time.monotonic() + 120
        while not child_pid.is_file() or not child_pid.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "no writer worker"
            time.sleep(0.05)
        worker = int(child_pid.read_text())
        proc.kill()  # SIGKILL mid-conversion
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while not _gone(worker):
            assert time.monotonic() < deadline, f"writer worker {worker} outlived its parent"
            time.sleep(0.05)
    finally:
        proc.kill()
    (stale,) = target.parent.glob(".train.beton.tmp-*")
    assert stale.name.endswith(f"-{proc.pid}")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = target.with_name(f".train.beton.tmp-{live.pid}")  # a conversion still going
        kept.write_bytes(b"")
        write_beton(target, random_images(10), np.arange(10))
        assert sorted(target.parent.iterdir()) == [kept, target]
    finally:
        live.kill()
        live.wait()


def test_a_link_in_an_archive_is_named_and_refused(tmp_path, capsys):
    import tarfile

    tree = image_tree(tmp_path / "tree", per_class=1)
    (tree / "train" / "cat" / "bad.png").symlink_to("missing.png")
    with tarfile.open(tmp_path / "t.tar.gz", "w:gz") as tf:
        tf.add(tree, arcname=".")
    assert run(tmp_path / "t.tar.gz", tmp_path / "cache") == 2
    err = capsys.readouterr().err
    assert "train/cat/bad.png in the archive is a symbolic link (to missing.png)" in err
    assert "Traceback" not in err
