"""Labelled image datasets as NumPy arrays, offline copies first: Fashion-MNIST, digits, CIFAR, image folders.

Every loader returns `(images, labels)`: images uint8, (N, H, W) for grayscale or (N, H, W, 3) for colour;
labels int64, (N,). `load_dataset` dispatches by name and wraps the arrays in a `Dataset`.
"""
import gzip
import logging
import os
import pickle
import shutil
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
from PIL import Image

from deltamask.errors import DataError

log = logging.getLogger(__name__)

Arrays = Tuple[np.ndarray, np.ndarray]
SPLITS = ("train", "test")

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_URLS = (  # tried in order; each holds the four .gz files
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
SYSTEM_DIR = Path("/usr/share/datasets")  # where Debian's dataset-* packages put their files
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# IDX element type codes (third magic byte) -> big-endian dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True, eq=False)
class Dataset:
    """One split of a labelled dataset, as arrays (see the module docstring for shapes and dtypes)."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    class_names: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_arrays(self.images, self.labels, self.name)
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise DataError(f"{self.name}: labels must lie in 0..{self.num_classes - 1}, "
                            f"got {self.labels.min()}..{self.labels.max()}")

    def __len__(self) -> int:
        return len(self.labels)


def cache_dir() -> Path:
    """The user's download cache: $XDG_CACHE_HOME/deltamask, by default ~/.cache/deltamask."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "deltamask"


# ---------------------------------------------------------------------------------------------- IDX

def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Read one IDX file (gzipped when its name ends in .gz), checking magic number, dims and length."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'})")
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int(x) for x in np.frombuffer(raw, ">u4", ndim, 4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{path}: IDX file {what}: {len(raw)} bytes, dims {dims} need {expected}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


# ------------------------------------------------------------------------------------ Fashion-MNIST

def fashion_mnist_search_path(root: Optional[Union[str, Path]] = None) -> List[Path]:
    """The folders `load_fashion_mnist` looks in, in order: root, $DELTAMASK_DATA/fashion-mnist, the
    Debian package's folder, the user cache (where downloads go)."""
    dirs = [Path(root).expanduser()] if root is not None else []
    if os.environ.get("DELTAMASK_DATA"):
        dirs.append(Path(os.environ["DELTAMASK_DATA"]).expanduser() / "fashion-mnist")
    return dirs + [SYSTEM_DIR / "fashion-mnist", cache_dir() / "fashion-mnist"]


def _find_file(folder: Path, name: str) -> Optional[Path]:
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _download(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Fetch `url` into `dest` through a temporary file, so that a failed download leaves nothing."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _download_fashion_mnist(split: str, folder: Path) -> List[str]:
    """Try every mirror for the split's two files; returns the failures (empty on success)."""
    failures = []
    for name in FASHION_MNIST_FILES[split]:
        if _find_file(folder, name):
            continue
        for base in FASHION_MNIST_URLS:
            try:
                _download(base + name + ".gz", folder / (name + ".gz"))
                read_idx(folder / (name + ".gz"))  # a page of HTML is not an IDX file
                log.info("downloaded %s from %s", name, base)
                break
            except Exception as e:  # noqa: BLE001 -- any failure means: try the next mirror
                (folder / (name + ".gz")).unlink(missing_ok=True)
                failures.append(f"{base}{name}.gz: {e}")
        else:
            return failures
    return []


def load_fashion_mnist(split: str = "train", root: Optional[Union[str, Path]] = None) -> Arrays:
    """Fashion-MNIST as (N, 28, 28) uint8 images and int64 labels 0..9 (60,000 train, 10,000 test).

    Reads the IDX files (plain or .gz) from the first folder of `fashion_mnist_search_path(root)` that
    holds both files of the split; when none does, downloads them into the user cache; when that fails
    too, raises DataError naming every folder looked at and how to get the files.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folders = fashion_mnist_search_path(root)
    for folder in folders:
        files = [_find_file(folder, name) for name in FASHION_MNIST_FILES[split]]
        if all(files):
            if root is not None and folder != folders[0]:
                log.warning("Fashion-MNIST not found in %s; using %s", root, folder)
            return _read_fashion_mnist(files[0], files[1])
    cache = folders[-1]
    failures = _download_fashion_mnist(split, cache)
    files = [_find_file(cache, name) for name in FASHION_MNIST_FILES[split]]
    if not failures and all(files):
        return _read_fashion_mnist(files[0], files[1])
    looked = "\n".join(f"  {d}" for d in folders)
    raise DataError(
        f"Fashion-MNIST ({split}) not found. Looked for {' and '.join(FASHION_MNIST_FILES[split])} "
        f"(optionally .gz) in:\n{looked}\nand the download failed:\n  " + "\n  ".join(failures) +
        "\nTo get the data: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four files "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz) in a folder and pass it as root (or set DELTAMASK_DATA).")


def _read_fashion_mnist(images_file: Path, labels_file: Path) -> Arrays:
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_file}: expected uint8 images of shape (N, H, W), got {images.dtype} "
                        f"{images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{labels_file}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{images_file} holds {len(images)} images but {labels_file} {len(labels)} labels")
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{labels_file}: label {labels.max()} out of range 0..9")
    log.debug("read %d Fashion-MNIST images from %s", len(images), images_file)
    return images, labels.astype(np.int64)


# ------------------------------------------------------------------------------------------ digits

def load_digits(split: str = "all") -> Arrays:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), pixel values 0..16 scaled to 0..255.

    split: "all", or a fixed split: "test" is every fifth image (359), "train" the rest (1,438).
    """
    if split not in SPLITS + ("all",):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    from sklearn.datasets import load_digits as sklearn_digits  # optional dependency, bundled data

    bunch = sklearn_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    if split != "all":
        test = np.arange(len(labels)) % 5 == 4
        keep = test if split == "test" else ~test
        images, labels = images[keep], labels[keep]
    return images, labels


# ------------------------------------------------------------------------------------ image folder

def load_image_folder(path: Union[str, Path], size: Optional[Union[int, Tuple[int, int]]] = None) -> Arrays:
    """Images laid out as `path/<class_name>/*.png|jpg|jpeg` (torchvision's ImageFolder layout).

    Class indices follow the sorted class-folder names. Every image is decoded to RGB and resized
    (bilinear) to `size` (an int for a square, or (height, width)) or, when None, to the first image's size.
    Returns (N, H, W, 3) uint8 images and int64 labels.
    """
    images, labels, _ = _image_folder(Path(path), size)
    return images, labels


def image_folder_classes(path: Union[str, Path]) -> List[str]:
    """The class names of an image folder, in label order (sorted folder names)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist or is not a folder")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {path} has no class subfolders (expected {path}/<class_name>/*.png)")
    return classes


def _image_folder(path: Path, size: Optional[Union[int, Tuple[int, int]]]) -> Tuple[np.ndarray, np.ndarray,
                                                                                      List[str]]:
    classes = image_folder_classes(path)
    hw = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(f for f in (path / name).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class folder {path / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert("RGB")
                    if hw is None:
                        hw = (im.height, im.width)
                    if (im.height, im.width) != hw:
                        im = im.resize((hw[1], hw[0]), Image.BILINEAR)
                    images.append(np.asarray(im, dtype=np.uint8))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                raise DataError(f"cannot read image {f}: {e}") from e
            labels.append(label)
    log.debug("read %d images of %d classes from %s", len(images), len(classes), path)
    return np.stack(images), np.asarray(labels, np.int64), classes


# ------------------------------------------------------------------------------------------- CIFAR

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and NumPy arrays only: a pickle can run code, a dataset must not."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"),
               ("_codecs", "encode")}  # how protocol-2 pickles written by Python 3 store bytes

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core." + module[len("numpy.core."):]  # NumPy 2 renamed it; avoid the shim
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> Dict[str, object]:
    if not path.is_file():
        raise DataError(f"CIFAR file {path} is missing")
    try:
        with open(path, "rb") as f:
            raw = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, AttributeError, ImportError, IndexError,
            TypeError) as e:
        raise DataError(f"cannot read CIFAR file {path}: {e}") from e
    if not isinstance(raw, dict):
        raise DataError(f"CIFAR file {path} does not hold a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in raw.items()}


def cifar_search_path(root: Optional[Union[str, Path]] = None) -> List[Path]:
    """Folders `load_cifar` looks in when given no root: $DELTAMASK_DATA, then the user cache."""
    if root is not None:
        return [Path(root).expanduser()]
    dirs = [Path(os.environ["DELTAMASK_DATA"]).expanduser()] if os.environ.get("DELTAMASK_DATA") else []
    return dirs + [cache_dir()]


def load_cifar(root: Optional[Union[str, Path]] = None, classes: int = 10, split: str = "train") -> Arrays:
    """CIFAR-10 or CIFAR-100 (fine labels) from the python-pickle release, as (N, 32, 32, 3) uint8 images.

    root is the extracted folder (`cifar-10-batches-py`, `cifar-100-python`) or its parent; None looks in
    `cifar_search_path()`. Get the data from https://www.cs.toronto.edu/~kriz/cifar.html ("python version").
    """
    if classes not in (10, 100):
        raise ValueError(f"classes must be 10 or 100, got {classes}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    sub = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
    if classes == 10:
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        names = [split]
    folder = None
    searched = cifar_search_path(root)
    for base in searched:
        for candidate in (base / sub, base):
            if (candidate / names[0]).is_file():
                folder = candidate
                break
        if folder is not None:
            break
    if folder is None:
        first = searched[0]
        looked = ", ".join(str(d / sub) for d in searched)
        raise DataError(f"CIFAR-{classes} file {first / sub / names[0]} is missing (looked in {looked} and their "
                        f"parents). Download the python version from https://www.cs.toronto.edu/~kriz/cifar.html, "
                        f"extract it and pass the folder as root.")
    key = "labels" if classes == 10 else "fine_labels"
    images, labels = [], []
    for name in names:
        batch = _read_cifar_pickle(folder / name)
        if "data" not in batch or key not in batch:
            raise DataError(f"CIFAR file {folder / name} lacks '{'data' if 'data' not in batch else key}'")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"CIFAR file {folder / name}: data must be uint8 (N, 3072), got {data.dtype} "
                            f"{data.shape}")
        lab = np.asarray(batch[key], dtype=np.int64)
        if lab.shape != (len(data),) or (len(lab) and (lab.min() < 0 or lab.max() >= classes)):
            raise DataError(f"CIFAR file {folder / name}: {key} must be {len(data)} values in 0..{classes - 1}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


# ---------------------------------------------------------------------------------------- dispatch

DATASETS = ("fashion_mnist", "digits", "cifar10", "cifar100", "image_folder")


def load_dataset(name: str, split: str = "train", root: Optional[Union[str, Path]] = None) -> Dataset:
    """Load a dataset split by name (one of `DATASETS`).

    image_folder needs root; it reads `root/<split>` when that folder exists, else root itself.
    digits ignores root (see `load_digits` for its fixed split).
    """
    if name == "fashion_mnist":
        images, labels = load_fashion_mnist(split, root)
        return Dataset(images, labels, 10, name, FASHION_MNIST_CLASSES)
    if name == "digits":
        images, labels = load_digits(split)
        return Dataset(images, labels, 10, name, tuple(str(i) for i in range(10)))
    if name in ("cifar10", "cifar100"):
        classes = int(name[5:])
        images, labels = load_cifar(root, classes, split)
        return Dataset(images, labels, classes, name)
    if name == "image_folder":
        if root is None:
            raise DataError("image_folder needs root: a folder laid out as root/<class_name>/*.png")
        folder = Path(root) / split if (Path(root) / split).is_dir() else Path(root)
        images, labels, classes = _image_folder(folder, None)
        return Dataset(images, labels, len(classes), name, tuple(classes))
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def _check_arrays(images: np.ndarray, labels: np.ndarray, name: str) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or not (
            images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise DataError(f"{name}: images must be uint8 (N, H, W) or (N, H, W, 3), got "
                        f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.shape != (len(images),):
        raise DataError(f"{name}: labels must be int64 ({len(images)},), got "
                        f"{getattr(labels, 'dtype', type(labels))} {getattr(labels, 'shape', '')}")
