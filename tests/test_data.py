"""Every source format into betons and back, the cache, and the errors."""

import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fastres.loaders.augment import DeviceAugment
from fastres.loaders.cifar import CifarLoader
from fastres.study import data as fdata
from fastres.study.data import DataError, DataUnavailable, prepare, write_beton

from .conftest import random_images

RAW = DeviceAugment(crop=False, flip=False, normalize=False)


def read_back(beton) -> tuple[np.ndarray, np.ndarray]:
    """All images (uint8 NHWC) and labels of a beton, in file order, through the real loader."""
    xs, ys = [], []
    for x, y in CifarLoader(beton, 100, False, torch.device("cpu"), RAW):
        xs.append((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def write_cifar_python(root, train_x, train_y, test_x, test_y):
    """The original CIFAR-10 python format: pickled dicts of (n, 3072) R, G, B planes."""
    root.mkdir(parents=True)

    def dump(name, x, y):
        planes = x.transpose(0, 3, 1, 2).reshape(len(x), 3072)
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": list(map(int, y)),
                         b"data": planes, b"filenames": [b"x.png"] * len(x)}, f)

    for i, (x, y) in enumerate(zip(np.array_split(train_x, 5), np.array_split(train_y, 5),
                                   strict=True)):
        dump(f"data_batch_{i + 1}", x, y)
    dump("test_batch", test_x, test_y)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in fdata.CIFAR10_CLASSES]}, f)


def write_tree(root, splits, classes=fdata.CIFAR10_CLASSES):
    """ImageFolder tree of PNGs (lossless, so the round trip is exact)."""
    for split, (x, y) in splits.items():
        for i, (img, label) in enumerate(zip(x, y, strict=True)):
            d = root / split / classes[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:04d}.png")


def tree_order(x, y):
    """The order an ImageFolder walk gives: by class, then by file name (= index here)."""
    idx = np.lexsort((np.arange(len(y)), y))
    return x[idx], y[idx]


@pytest.fixture
def splits():
    return {"train": (random_images(60, 5), np.arange(60) % 10),
            "test": (random_images(21, 6), np.arange(21) % 10)}


def test_cifar_python_round_trip(tmp_path):
    tx, ty = random_images(50, 2), np.arange(50) % 10
    vx, vy = random_images(20, 3), (np.arange(20) * 7) % 10
    write_cifar_python(tmp_path / "src" / "cifar-10-batches-py", tx, ty, vx, vy)
    # Both the batches folder itself and the folder holding it are accepted.
    for path in (tmp_path / "src", tmp_path / "src" / "cifar-10-batches-py"):
        pair = prepare(path, cache=tmp_path / "cache")
        assert pair.kind == "cifar-python" and (pair.num_train, pair.num_test) == (50, 20)
        x, y = read_back(pair.train)
        np.testing.assert_array_equal(x, tx)
        np.testing.assert_array_equal(y, ty)
        x, y = read_back(pair.test)
        np.testing.assert_array_equal(x, vx)
        np.testing.assert_array_equal(y, vy)


def test_imagefolder_round_trip(tmp_path, splits):
    write_tree(tmp_path / "tree", splits)
    pair = prepare(tmp_path / "tree", cache=tmp_path / "cache")
    assert pair.kind == "imagefolder"
    for split, beton in (("train", pair.train), ("test", pair.test)):
        ex, ey = tree_order(*splits[split])
        x, y = read_back(beton)
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)


@pytest.mark.parametrize("prefix", ["", "cifar10/"])
def test_tar_round_trip(tmp_path, splits, prefix):
    write_tree(tmp_path / "tree", splits)
    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for split in ("train", "test"):
            tf.add(tmp_path / "tree" / split, arcname=f"{prefix}{split}")
    pair = prepare(archive, cache=tmp_path / "cache")
    assert pair.kind == "tar"
    ex, ey = tree_order(*splits["train"])
    x, y = read_back(pair.train)
    np.testing.assert_array_equal(x, ex)
    np.testing.assert_array_equal(y, ey)


def test_ready_betons_are_used_in_place(tmp_path):
    write_beton(tmp_path / "b" / "train.beton", random_images(30), np.arange(30) % 10)
    write_beton(tmp_path / "b" / "test.beton", random_images(10), np.arange(10))
    pair = prepare(tmp_path / "b", cache=tmp_path / "cache")
    assert pair.kind == "beton" and pair.train == (tmp_path / "b" / "train.beton").resolve()
    assert not (tmp_path / "cache").exists()
    np.testing.assert_array_equal(read_back(pair.train)[0], random_images(30))


def test_jpeg_copy_of_cifar10(jpeg_betons):
    assert (jpeg_betons.num_train, jpeg_betons.num_test) == (50_000, 10_000)
    x, y = read_back(jpeg_betons.test)
    assert np.bincount(y).tolist() == [1000] * 10
    assert x.shape == (10_000, 32, 32, 3) and 100 < x.mean() < 140


def test_cache_is_reused_and_rebuilt_when_broken(tmp_path, splits):
    write_tree(tmp_path / "tree", splits)
    logs = []
    pair = prepare(tmp_path / "tree", cache=tmp_path / "cache", log=logs.append)
    assert sum("converting" in m for m in logs) == 1
    mtime = pair.train.stat().st_mtime_ns
    again = prepare(tmp_path / "tree", cache=tmp_path / "cache", log=logs.append)
    assert again == pair and sum("converting" in m for m in logs) == 1
    assert pair.train.stat().st_mtime_ns == mtime

    # A truncated file is caught on open and rebuilt, with a warning.
    with open(pair.train, "r+b") as f:
        f.truncate(200)
    with pytest.warns(UserWarning, match="unusable"):
        rebuilt = prepare(tmp_path / "tree", cache=tmp_path / "cache", log=logs.append)
    assert sum("converting" in m for m in logs) == 2
    np.testing.assert_array_equal(read_back(rebuilt.train)[0], tree_order(*splits["train"])[0])

    # A whole but wrong file (other count) is rebuilt too.
    write_beton(pair.test, random_images(5), np.arange(5))
    with pytest.warns(UserWarning, match="holds 5 samples, expected 21"):
        prepare(tmp_path / "tree", cache=tmp_path / "cache", log=logs.append)
    assert sum("converting" in m for m in logs) == 3


def test_half_written_files_are_never_picked_up(tmp_path, splits):
    write_tree(tmp_path / "tree", splits)
    pair = prepare(tmp_path / "tree", cache=tmp_path / "cache")
    folder = pair.train.parent
    # A crash mid-conversion leaves temp files and no manifest: the next run converts again.
    (folder / "manifest.json").unlink()
    (folder / ".train.beton.tmp-999").write_bytes(b"garbage")
    logs = []
    prepare(tmp_path / "tree", cache=tmp_path / "cache", log=logs.append)
    assert any("converting" in m for m in logs)
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name and "999" not in p.name]


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(DataError, match="uint8"):
        write_beton(tmp_path / "x.beton", np.zeros((3, 32, 32, 3), np.float32), np.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_changed_source_gets_a_new_cache_entry(tmp_path, splits):
    write_tree(tmp_path / "tree", splits)
    a = prepare(tmp_path / "tree", cache=tmp_path / "cache")
    Image.fromarray(random_images(1, 9)[0]).save(tmp_path / "tree" / "test" / "cat" / "9999.png")
    b = prepare(tmp_path / "tree", cache=tmp_path / "cache")
    assert a.train.parent != b.train.parent and b.num_test == 22


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "no such file or folder"),
    (lambda p: (p.mkdir(), p)[1], "holding nothing; expected data_batch_1..5"),
    (lambda p: (p.mkdir(), (p / "a.txt").write_text("x"), p)[2], "holding a.txt; expected"),
    (lambda p: (p.with_suffix(".zip").write_text("x"), p.with_suffix(".zip"))[1],
     "file of unknown kind"),
    (lambda p: (p.with_suffix(".beton").write_text("x"), p.with_suffix(".beton"))[1],
     "single .beton file"),
    (lambda p: (p.with_suffix(".tar.gz").write_bytes(b"not a tar"), p.with_suffix(".tar.gz"))[1],
     "not a readable tar archive"),
])
def test_bad_sources_say_what_was_found(tmp_path, make, message):
    with pytest.raises(DataError, match=message) as e:
        prepare(make(tmp_path / "src"), cache=tmp_path / "cache")
    assert "--data" in str(e.value)


def test_wrong_image_size_names_the_file(tmp_path, splits):
    write_tree(tmp_path / "tree", splits)
    Image.new("RGB", (64, 48)).save(tmp_path / "tree" / "train" / "dog" / "big.png")
    with pytest.raises(DataError, match=r"big.png is 64x48"):
        prepare(tmp_path / "tree", cache=tmp_path / "cache")


def test_empty_tar_split(tmp_path, splits):
    write_tree(tmp_path / "tree", splits)
    with tarfile.open(tmp_path / "t.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "tree" / "train", arcname="train")
    with pytest.raises(DataError, match="0 test/ images"):
        prepare(tmp_path / "t.tar.gz", cache=tmp_path / "cache")


def test_download_failure_says_how_to_point_at_a_copy(tmp_path, offline):
    with pytest.raises(DataUnavailable, match="could not be downloaded.*--data PATH"):
        prepare(None, cache=tmp_path / "cache", log=lambda _m: None)


def test_downloaded_copy_in_cache_is_used(tmp_path, monkeypatch):
    tx, ty = random_images(10), np.arange(10)
    write_cifar_python(tmp_path / "cache" / "download" / "cifar-10-batches-py", tx, ty, tx, ty)
    monkeypatch.delenv("FASTRES_DATA", raising=False)
    pair = prepare(None, cache=tmp_path / "cache", download=False)
    assert pair.kind == "cifar-python" and pair.num_train == 10


def test_train_cli_without_data(tmp_path, offline, capsys):
    from fastres.run.train import main

    assert main(["--epochs", "1", "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "could not be downloaded" in err and "--data PATH" in err


def tar_of(tree, archive):
    with tarfile.open(archive, "w:gz") as tf:
        for split in ("train", "test"):
            tf.add(tree / split, arcname=split)
    return archive


def ten(n):
    return np.arange(n) % 10


@pytest.mark.parametrize("train_classes, test_classes, message", [
    (fdata.CIFAR10_CLASSES[:9], fdata.CIFAR10_CLASSES[:9], "train/ has 9 class folders"),
    ((*fdata.CIFAR10_CLASSES, "zebra"), (*fdata.CIFAR10_CLASSES, "zebra"),
     "train/ has 11 class folders .*zebra"),
    (fdata.CIFAR10_CLASSES, (*fdata.CIFAR10_CLASSES[:9], "zebra"),
     "test/ has class folders .*zebra.* other than train/'s"),
])
@pytest.mark.parametrize("packed", [False, True])
def test_class_folders_must_be_the_same_ten(tmp_path, train_classes, test_classes, message,
                                            packed):
    """Issue 8: 9 classes trained without a word, 11 failed mid-run on label 10."""
    for split, classes in (("train", train_classes), ("test", test_classes)):
        n = 2 * len(classes)
        write_tree(tmp_path / "tree", {split: (random_images(n), np.arange(n) % len(classes))},
                   classes)
    src = tar_of(tmp_path / "tree", tmp_path / "t.tar.gz") if packed else tmp_path / "tree"
    with pytest.raises(DataError, match=message) as e:
        prepare(src, cache=tmp_path / "cache")
    assert str(src) in str(e.value)
    assert not list((tmp_path / "cache").rglob("*.beton"))


def test_any_ten_class_names_are_accepted_in_sorted_order(tmp_path):
    names = tuple(f"c{i}" for i in range(10))
    write_tree(tmp_path / "tree", {"train": (random_images(20), ten(20)),
                                   "test": (random_images(10), ten(10))}, names)
    pair = prepare(tmp_path / "tree", cache=tmp_path / "cache")
    assert read_back(pair.test)[1].tolist() == list(range(10))


def test_ready_betons_with_labels_past_9_are_refused(tmp_path):
    write_beton(tmp_path / "b" / "train.beton", random_images(11), np.arange(11))
    write_beton(tmp_path / "b" / "test.beton", random_images(10), ten(10))
    with pytest.raises(DataError, match=r"train.beton: labels run 0..10; CIFAR-10's are 0..9"):
        prepare(tmp_path / "b", cache=tmp_path / "cache")


def test_truncated_archive_is_a_clear_error_and_caches_nothing(tmp_path, splits):
    write_tree(tmp_path / "tree", splits)
    whole = tar_of(tmp_path / "tree", tmp_path / "whole.tar.gz").read_bytes()
    half = tmp_path / "half.tar.gz"
    half.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match=r"archive half.tar.gz is truncated"):
        prepare(half, cache=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_archive_with_a_bad_crc_is_not_read_in_part(tmp_path, splits):
    """tarfile alone ends quietly at a damaged member; the gzip trailer must still be checked."""
    write_tree(tmp_path / "tree", splits)
    data = bytearray(tar_of(tmp_path / "tree", tmp_path / "t.tar.gz").read_bytes())
    data[-8] ^= 0xFF  # the CRC-32 in gzip's trailer
    (tmp_path / "t.tar.gz").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"archive t.tar.gz is corrupt or truncated .*CRC"):
        prepare(tmp_path / "t.tar.gz", cache=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
