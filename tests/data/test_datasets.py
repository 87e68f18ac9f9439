import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deltamask.data import (DataError, Dataset, fashion_mnist_search_path, load_cifar, load_dataset, load_digits,
                            load_fashion_mnist, load_image_folder, read_idx)
from deltamask.data import datasets

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_fashion(folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8))


@pytest.fixture
def no_other_places(tmp_path, monkeypatch):
    """Point the Debian folder and the cache into tmp_path, clear DELTAMASK_DATA, forbid downloads."""
    monkeypatch.setattr(datasets, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DELTAMASK_DATA", raising=False)

    def offline(url, dest, timeout=60.0):
        raise OSError(f"network unreachable: {url}")

    monkeypatch.setattr(datasets, "_download", offline)
    return tmp_path


@pytest.mark.parametrize("name", ["x.idx", "x.idx.gz"])
@pytest.mark.parametrize("array", [np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
                                   np.array([-5, 7, 1 << 20], dtype=np.int32),
                                   np.linspace(0, 1, 6, dtype=np.float32).reshape(3, 2)])
def test_read_idx_round_trips_plain_and_gzipped_files(tmp_path, name, array):
    out = read_idx(write_idx(tmp_path / name, array))
    assert out.dtype == array.dtype.newbyteorder("=") and out.shape == array.shape
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("mangle, message", [
    (lambda b: b[:-3], "truncated"),
    (lambda b: b + b"\0", "trailing"),
    (lambda b: b[:6], "header"),
    (lambda b: b"\x01\x02" + b[2:], "not an IDX"),
    (lambda b: b[:2] + b"\x42" + b[3:], "not an IDX"),
    (lambda b: b"", "not an IDX"),
])
def test_corrupt_or_truncated_idx_raises_data_error_naming_the_file(tmp_path, mangle, message):
    path = tmp_path / "broken-images-idx3-ubyte"
    path.write_bytes(mangle(idx_bytes(np.zeros((2, 3, 3), np.uint8))))
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert "broken-images-idx3-ubyte" in str(info.value)


def test_a_broken_gzip_stream_raises_data_error(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 4), np.uint8)))[:-12])
    with pytest.raises(DataError, match="bad.gz"):
        read_idx(path)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="bad.gz"):
        read_idx(path)


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist_reads_plain_and_gzipped_files_from_root(no_other_places, gz):
    write_fashion(no_other_places / "fm", gz=gz)
    images, labels = load_fashion_mnist("train", root=no_other_places / "fm")
    assert images.shape == (12, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [i % 10 for i in range(12)]
    assert load_fashion_mnist("test", root=no_other_places / "fm")[0].shape == (5, 28, 28)


def test_search_order_is_root_env_debian_cache(no_other_places, monkeypatch):
    monkeypatch.setenv("DELTAMASK_DATA", str(no_other_places / "env"))
    assert fashion_mnist_search_path("/r") == [Path("/r"), no_other_places / "env" / "fashion-mnist",
                                               no_other_places / "system" / "fashion-mnist",
                                               no_other_places / "cache" / "deltamask" / "fashion-mnist"]
    write_fashion(no_other_places / "env" / "fashion-mnist", n_train=7)
    write_fashion(no_other_places / "system" / "fashion-mnist", n_train=9)
    assert len(load_fashion_mnist("train")[0]) == 7  # the env folder comes before the Debian one
    assert len(load_fashion_mnist("train", root=no_other_places / "nowhere")[0]) == 7


def test_mismatched_image_and_label_counts_raise_data_error(no_other_places):
    folder = no_other_places / "fm"
    write_fashion(folder)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="12 images but .* 3 labels"):
        load_fashion_mnist("train", root=folder)


def test_missing_fashion_mnist_names_every_place_and_the_apt_package(no_other_places, monkeypatch):
    monkeypatch.setenv("DELTAMASK_DATA", str(no_other_places / "env"))
    with pytest.raises(DataError) as info:
        load_fashion_mnist("train", root=no_other_places / "mine")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "network unreachable" in message
    for folder in fashion_mnist_search_path(no_other_places / "mine"):
        assert str(folder) in message
    assert not list((no_other_places / "cache").rglob("*.gz"))  # a failed download leaves nothing behind


def test_missing_files_are_downloaded_into_the_cache(no_other_places, monkeypatch):
    source = no_other_places / "mirror"
    write_fashion(source)
    fetched = []

    def fake_download(url, dest, timeout=60.0):
        fetched.append(url.rsplit("/", 1)[1])
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((source / fetched[-1]).read_bytes())

    monkeypatch.setattr(datasets, "_download", fake_download)
    images, labels = load_fashion_mnist("test")
    assert images.shape == (5, 28, 28) and sorted(fetched) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert (no_other_places / "cache" / "deltamask" / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").is_file()


def test_a_downloaded_page_that_is_not_idx_is_discarded(no_other_places, monkeypatch):
    monkeypatch.setattr(datasets, "_download", lambda url, dest, timeout=60.0: dest.write_bytes(b"<html>"))
    (no_other_places / "cache" / "deltamask" / "fashion-mnist").mkdir(parents=True)
    with pytest.raises(DataError, match="(?s)download failed:.*cannot read"):
        load_fashion_mnist("train")
    assert not list((no_other_places / "cache").rglob("*.gz"))


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="needs `apt-get install dataset-fashion-mnist`")
def test_the_debian_fashion_mnist_files_load():
    images, labels = load_fashion_mnist("train", root=DEBIAN)
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [6000] * 10
    test = load_dataset("fashion_mnist", "test", root=DEBIAN)
    assert len(test) == 10000 and test.num_classes == 10 and test.class_names[9] == "Ankle boot"


def test_digits_are_uint8_0_to_255_with_a_fixed_disjoint_split():
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 255
    assert labels.dtype == np.int64 and set(labels.tolist()) == set(range(10))
    train, test = load_digits("train"), load_digits("test")
    assert len(train[1]) + len(test[1]) == 1797
    np.testing.assert_array_equal(test[0], images[4::5])


def write_png(path: Path, colour, size=(6, 4), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def test_image_folder_reads_classes_in_sorted_order_and_resizes_to_the_first_image(tmp_path):
    write_png(tmp_path / "zebra" / "a.png", (255, 0, 0))
    write_png(tmp_path / "apple" / "b.PNG", (0, 255, 0), size=(6, 4))
    write_png(tmp_path / "apple" / "c.jpg", (0, 0, 255), size=(12, 8))
    write_png(tmp_path / "apple" / "d.png", 128, size=(6, 4), mode="L")
    (tmp_path / "apple" / "notes.txt").write_text("ignored")
    images, labels = load_image_folder(tmp_path)
    assert images.shape == (4, 4, 6, 3) and images.dtype == np.uint8  # (N, H, W, 3), H=4, W=6
    assert labels.tolist() == [0, 0, 0, 1]  # apple = 0, zebra = 1
    assert images[0, 0, 0].tolist() == [0, 255, 0] and images[2, 0, 0].tolist() == [128, 128, 128]
    assert abs(int(images[1, 2, 3, 2]) - 255) < 6 and images[3, 1, 1].tolist() == [255, 0, 0]
    assert load_image_folder(tmp_path, size=5)[0].shape == (4, 5, 5, 3)
    assert load_image_folder(tmp_path, size=(3, 7))[0].shape == (4, 3, 7, 3)


def test_image_folder_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(DataError, match="no class subfolders"):
        load_image_folder(tmp_path)
    write_png(tmp_path / "cat" / "1.png", (1, 2, 3))
    (tmp_path / "dog").mkdir()
    with pytest.raises(DataError, match="dog.*no images"):
        load_image_folder(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match="broken.png"):
        load_image_folder(tmp_path)


def test_load_dataset_reads_an_image_folder_split(tmp_path):
    write_png(tmp_path / "train" / "a" / "1.png", (1, 1, 1))
    write_png(tmp_path / "train" / "b" / "1.png", (2, 2, 2))
    ds = load_dataset("image_folder", "train", root=tmp_path)
    assert isinstance(ds, Dataset) and ds.num_classes == 2 and ds.class_names == ("a", "b") and len(ds) == 2
    with pytest.raises(DataError, match="needs root"):
        load_dataset("image_folder", "train")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


def cifar_batch(n: int, label_key: bytes, start: int) -> dict:
    data = np.zeros((n, 3072), np.uint8)
    data[:, :1024] = 200  # red plane
    data[:, 2048:] = np.arange(n, dtype=np.uint8)[:, None] + start  # blue plane: the image's number
    return {b"data": data, label_key: [(start + i) % 10 for i in range(n)], b"batch_label": b"x"}


def write_pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


@pytest.mark.parametrize("point_at_parent", [True, False])
def test_cifar10_reads_the_batches_as_hwc_images(tmp_path, point_at_parent):
    folder = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        write_pickle(folder / f"data_batch_{i}", cifar_batch(3, b"labels", 3 * (i - 1)))
    write_pickle(folder / "test_batch", cifar_batch(2, b"labels", 50))
    images, labels = load_cifar(tmp_path if point_at_parent else folder, 10, "train")
    assert images.shape == (15, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert images[:, 5, 7, 0].tolist() == [200] * 15 and images[:, 5, 7, 2].tolist() == list(range(15))
    assert labels.tolist() == [i % 10 for i in range(15)]
    assert load_dataset("cifar10", "test", root=tmp_path).labels.tolist() == [0, 1]


def test_cifar100_uses_fine_labels_and_names_a_missing_file(tmp_path):
    folder = tmp_path / "cifar-100-python"
    batch = cifar_batch(4, b"fine_labels", 95)
    batch[b"fine_labels"] = [95, 96, 97, 99]
    batch[b"coarse_labels"] = [1, 2, 3, 4]
    write_pickle(folder / "train", batch)
    ds = load_dataset("cifar100", "train", root=tmp_path)
    assert ds.labels.tolist() == [95, 96, 97, 99] and ds.num_classes == 100
    with pytest.raises(DataError, match="cifar-100-python.test"):
        load_cifar(tmp_path, 100, "test")


def test_cifar_errors_name_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    for i in (1, 2, 4, 5):
        write_pickle(folder / f"data_batch_{i}", cifar_batch(2, b"labels", 0))
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar(tmp_path, 10, "train")
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar(tmp_path, 10, "train")
    write_pickle(folder / "data_batch_3", {b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match="data_batch_3.*3072"):
        load_cifar(tmp_path, 10, "train")


def test_cifar_pickles_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": Evil(), b"labels": []})
    with pytest.raises(DataError, match="refusing"):
        load_cifar(tmp_path, 10, "test")
    assert not (tmp_path / "pwned").exists()


def test_dataset_checks_its_arrays():
    with pytest.raises(DataError, match="labels must lie"):
        Dataset(np.zeros((2, 4, 4), np.uint8), np.array([0, 3]), 3, "toy")
    with pytest.raises(DataError, match="uint8"):
        Dataset(np.zeros((2, 4, 4), np.float32), np.array([0, 1]), 3, "toy")
    with pytest.raises(DataError, match="int64"):
        Dataset(np.zeros((2, 4, 4), np.uint8), np.array([0, 1, 1]), 3, "toy")
