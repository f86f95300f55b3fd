"""MNIST, binarized MNIST, CIFAR-10 and SVHN as in-memory arrays, from local files or TFDS.

Two sources behind one function, ``load_split``:
  * local files (``data_dir`` given): the standard MNIST IDX files
    (``train-images-idx3-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``),
    Larochelle's ``binarized_mnist_{train,valid,test}.amat[.gz]``, CIFAR-10's
    python pickles (``data_batch_1`` .. ``data_batch_5``, ``test_batch``, in
    ``data_dir`` or its ``cifar-10-batches-py/``) and SVHN's cropped-digit
    MATLAB files (``train_32x32.mat``, ``test_32x32.mat``). An explicit
    ``data_dir`` always wins: TFDS is never consulted then.
  * TensorFlow Datasets (``data_dir`` None): ``tfds.data_source``, which reads
    prepared ArrayRecord files without TensorFlow. Only the first download and
    preparation needs TensorFlow (the ``[prepare]`` extra).

Images are held as uint8 [m, h, w, c]: 0/1 for a binary set, 0..255 for
grey MNIST and colour. ``preprocess`` turns a batch into float32 targets inside the jitted
step (dynamic binarisation needs the step's key). The order in which a run
visits them lives in ``feeding``.

Notation (``draw_jax/__init__.py``): m = images in a split, b = batch,
h, w, c = height, width, channels.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import struct
import time
import typing
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

__all__ = [
    "BINARIZE_CHOICES",
    "DATASETS",
    "DataError",
    "Dataset",
    "DatasetInfo",
    "canonical_split",
    "load_split",
    "preprocess",
]

BINARIZE_CHOICES = ("dynamic", "threshold", "none")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the code needs to know about a data set before loading it.

    Attributes:
      splits: split -> (local file stem, TFDS split spec, image slice of that file or None).
      binary: True when pixels are already 0/1.
      default_binarize: the binarisation used when none is asked for.
      image_shape: (h, w, c).
      local_format: how ``data_dir`` holds it: idx, amat, cifar_pickle or svhn_mat.
      default_likelihood: the model's D(x | c_T) unless --likelihood says otherwise.
    """

    splits: dict[str, tuple[str, str, slice | None]]
    binary: bool
    default_binarize: str
    image_shape: tuple[int, int, int] = (28, 28, 1)
    local_format: str = "idx"
    default_likelihood: str = "bernoulli"


# MNIST has no validation split of its own: the last 10,000 training images
# (50,000-59,999) are held out as `valid`, the same cut that Larochelle's
# binarized MNIST makes (its train/valid are MNIST train's first 50,000 / last
# 10,000), so model selection never touches test.
MNIST_VALID_START = 50_000
CIFAR_VALID_START = 45_000  # of CIFAR-10's 50,000 training images
SVHN_VALID_START = 68_257  # of SVHN's 73,257 cropped training digits
_MNIST_SPLITS = {
    "train": ("train", f"train[:{MNIST_VALID_START}]", slice(0, MNIST_VALID_START)),
    "valid": ("train", f"train[{MNIST_VALID_START}:]", slice(MNIST_VALID_START, None)),
    "test": ("t10k", "test", None),
}
DATASETS: dict[str, DatasetInfo] = {
    "binarized_mnist": DatasetInfo(
        splits={
            "train": ("binarized_mnist_train", "train", None),
            "valid": ("binarized_mnist_valid", "validation", None),
            "test": ("binarized_mnist_test", "test", None),
        },
        binary=True,
        default_binarize="none",
        local_format="amat",
    ),
    "mnist": DatasetInfo(
        splits=_MNIST_SPLITS,
        binary=False,
        default_binarize="dynamic",
    ),
    # Built from mnist's splits (draw_jax/two_digits.py): two digits on a 60 x 60 canvas.
    "mnist_two_digits": DatasetInfo(
        splits=_MNIST_SPLITS,
        binary=False,
        default_binarize="dynamic",
        image_shape=(60, 60, 1),
    ),
    # Colour (sec. 4.4-4.5): 8-bit values, modelled as such (no binarisation).
    # Neither has a validation split of its own: the last 5,000 training images
    # are held out as valid, so model selection never touches test.
    "cifar10": DatasetInfo(
        splits={
            "train": ("data_batch", f"train[:{CIFAR_VALID_START}]", slice(0, CIFAR_VALID_START)),
            "valid": ("data_batch", f"train[{CIFAR_VALID_START}:]", slice(CIFAR_VALID_START, None)),
            "test": ("test_batch", "test", None),
        },
        binary=False,
        default_binarize="none",
        image_shape=(32, 32, 3),
        local_format="cifar_pickle",
        default_likelihood="discretized_logistic",
    ),
    # The cropped-digit format ("format 2", 32 x 32); the paper's 64 x 64 crops
    # of the full house-number photographs are not a TFDS data set (BUILD_NOTES).
    "svhn_cropped": DatasetInfo(
        splits={
            "train": ("train_32x32", f"train[:{SVHN_VALID_START}]", slice(0, SVHN_VALID_START)),
            "valid": ("train_32x32", f"train[{SVHN_VALID_START}:]", slice(SVHN_VALID_START, None)),
            "test": ("test_32x32", "test", None),
        },
        binary=False,
        default_binarize="none",
        image_shape=(32, 32, 3),
        local_format="svhn_mat",
        default_likelihood="discretized_logistic",
    ),
}
_SPLIT_ALIASES = {"validation": "valid", "val": "valid"}


class DataError(ValueError):
    """Bad or missing input data. The message names the file or split at fault."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One split held in host memory.

    Attributes:
      images: uint8 [m, h, w, c].
      binary: True when values are 0/1 (binarized MNIST), False for 0..255 grey.
      name, split: where it came from (for messages).
      labels: int32 [m] class labels where the data set has them (mnist), else None.
    """

    images: np.ndarray
    binary: bool
    name: str
    split: str
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])


def canonical_split(split: str) -> str:
    """'validation' and 'val' are 'valid'; other names unchanged."""
    return _SPLIT_ALIASES.get(split, split)


def _info(dataset: str, split: str) -> tuple[DatasetInfo, str]:
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    split = canonical_split(split)
    info = DATASETS[dataset]
    if split not in info.splits:
        raise DataError(
            f"dataset {dataset!r} has no split {split!r}; its splits are {', '.join(info.splits)}"
        )
    return info, split


# -- local files ------------------------------------------------------------


def _find_file(data_dir: str, stem: str, suffix: str) -> str:
    candidates = [os.path.join(data_dir, stem + suffix + ext) for ext in ("", ".gz")]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise DataError(f"missing data file: none of {', '.join(candidates)} exists (--data_dir={data_dir})")


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        raise DataError(f"cannot read {path}: truncated or corrupt ({type(e).__name__}: {e})") from e


def _read_idx_images(path: str) -> np.ndarray:
    raw = _read_bytes(path)
    if len(raw) < 16:
        raise DataError(f"{path}: too short for an IDX image header ({len(raw)} bytes)")
    magic, n, rows, cols = struct.unpack(">iiii", raw[:16])
    if magic != 2051:
        raise DataError(f"{path}: wrong IDX magic {magic} (images have 2051); is this an image file?")
    if (rows, cols) != (28, 28):
        raise DataError(f"{path}: images are {rows}x{cols}, expected 28x28")
    expected = 16 + n * rows * cols
    if len(raw) != expected:
        raise DataError(
            f"{path}: header says {n} images ({expected} bytes) but the file holds {len(raw)} bytes "
            "(truncated or padded)"
        )
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows, cols, 1).copy()


def _read_idx_labels(path: str) -> np.ndarray:
    raw = _read_bytes(path)
    if len(raw) < 8:
        raise DataError(f"{path}: too short for an IDX label header ({len(raw)} bytes)")
    magic, n = struct.unpack(">ii", raw[:8])
    if magic != 2049:
        raise DataError(f"{path}: wrong IDX magic {magic} (labels have 2049); is this a label file?")
    if len(raw) != 8 + n:
        raise DataError(
            f"{path}: header says {n} labels but the file holds {len(raw) - 8} (truncated or padded)"
        )
    labels = np.frombuffer(raw, np.uint8, offset=8).astype(np.int32)
    if labels.max(initial=0) > 9:
        raise DataError(f"{path}: label {int(labels.max())} is not a digit 0-9")
    return labels


_SPACE = np.frombuffer(b" \t\r\n", np.uint8)


def _read_amat(path: str) -> np.ndarray:
    """Larochelle's text format: one image a line, 784 values in {0, 1}."""
    raw = _read_bytes(path)
    lines = raw.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataError(f"{path}: no images in file")
    buf = np.frombuffer(raw, np.uint8)
    nonspace = ~np.isin(buf, _SPACE)
    tokens = buf[nonspace]
    fast = (
        tokens.size == len(lines) * 784
        and np.all((tokens == ord("0")) | (tokens == ord("1")))
        # every token one character: no two non-space bytes side by side
        and not np.any(nonspace[1:] & nonspace[:-1])
    )
    if fast:
        return (tokens - ord("0")).astype(np.uint8).reshape(len(lines), 28, 28, 1)
    # Slow path: find the offending line and say what is wrong with it.
    out = np.empty((len(lines), 784), np.uint8)
    for i, line in enumerate(lines):
        try:
            values = np.array(line.split(), dtype=np.float64)
        except ValueError as e:
            raise DataError(f"{path}, line {i + 1}: not a number ({e})") from e
        if values.size != 784:
            raise DataError(f"{path}, line {i + 1}: {values.size} values, expected 784 (28x28)")
        if np.isnan(values).any():
            raise DataError(f"{path}, line {i + 1}: contains NaN")
        bad = values[(values != 0) & (values != 1)]
        if bad.size:
            raise DataError(
                f"{path}, line {i + 1}: value {float(bad[0])!r} is not 0 or 1 (binarized MNIST must be binary)"
            )
        out[i] = values.astype(np.uint8)
    return out.reshape(-1, 28, 28, 1)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays, nothing else: a data
    file cannot run code (CIFAR-10's official format is a pickle)."""

    _ALLOWED: typing.ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # bytes, as Python 3 writes them at protocol 2
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> typing.Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not an array)")
        return super().find_class(module, name)


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: a dict with b'data' uint8 [n, 3072] (the red,
    green and blue planes of 32 x 32, row-major) and b'labels' [n] in 0..9."""
    raw = _read_bytes(path)
    try:
        batch = _ArraysOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # truncated, not a pickle, or not arrays
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise DataError(f"{path}: a CIFAR-10 batch is a dict, this file holds a {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise DataError(f"{path}: no {' or '.join(missing)} entry (has {', '.join(map(str, batch))})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 32 * 32 * 3:
        raise DataError(f"{path}: data is {data.dtype} {data.shape}, expected uint8 [n, 3072]")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.size} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels outside 0..9")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def _cifar_dir(data_dir: str) -> str:
    nested = os.path.join(data_dir, "cifar-10-batches-py")
    return nested if os.path.isdir(nested) else data_dir


def _read_cifar(data_dir: str, stem: str) -> tuple[np.ndarray, np.ndarray]:
    folder = _cifar_dir(data_dir)
    names = [f"data_batch_{i}" for i in range(1, 6)] if stem == "data_batch" else [stem]
    paths = [os.path.join(folder, n) for n in names]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"missing CIFAR-10 file(s) {', '.join(missing)} (--data_dir={data_dir}; the python "
            "version, cifar-10-python.tar.gz, extracted)"
        )
    parts = [_read_cifar_batch(p) for p in paths]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read_svhn(data_dir: str, stem: str) -> tuple[np.ndarray, np.ndarray]:
    """SVHN's cropped digits: a MATLAB file with X uint8 [32, 32, 3, n] and y [n, 1]
    in 1..10 (10 is the digit 0)."""
    import scipy.io  # a dependency of jax

    path = os.path.join(data_dir, stem + ".mat")
    if not os.path.isfile(path):
        raise DataError(f"missing data file {path} (--data_dir={data_dir}; SVHN's {stem}.mat)")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # truncated, not a .mat, ...
        raise DataError(f"{path}: not a readable MATLAB file ({type(e).__name__}: {e})") from e
    if "X" not in mat or "y" not in mat:
        raise DataError(
            f"{path}: no X and y arrays (has {', '.join(k for k in mat if not k.startswith('__'))})"
        )
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: X is {x.dtype} {x.shape}, expected uint8 [32, 32, 3, n]")
    if y.shape != (x.shape[3],):
        raise DataError(f"{path}: {y.size} labels for {x.shape[3]} images")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DataError(f"{path}: labels outside 1..10")
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2))
    return images, (y % 10).astype(np.int32)


def _load_local(dataset: str, split: str, data_dir: str) -> Dataset:
    info = DATASETS[dataset]
    stem, _, part = info.splits[split]
    labels = None
    if info.local_format == "amat":
        images = _read_amat(_find_file(data_dir, stem, ".amat"))
    elif info.local_format == "cifar_pickle":
        images, labels = _read_cifar(data_dir, stem)
    elif info.local_format == "svhn_mat":
        images, labels = _read_svhn(data_dir, stem)
    else:
        image_file = _find_file(data_dir, stem, "-images-idx3-ubyte")
        images = _read_idx_images(image_file)
        label_file = os.path.join(data_dir, stem + "-labels-idx1-ubyte")
        if any(os.path.isfile(label_file + ext) for ext in ("", ".gz")):
            labels = _read_idx_labels(_find_file(data_dir, stem, "-labels-idx1-ubyte"))
            if len(labels) != len(images):
                raise DataError(
                    f"{label_file}: {len(labels)} labels for the {len(images)} images of {image_file}"
                )
    if part is not None:
        needed = part.stop if part.stop is not None else part.start + 1
        if images.shape[0] < needed:
            last = "" if part.stop is None else f"..{part.stop - 1}"
            raise DataError(
                f"{dataset}/{split} is images {part.start}{last} of the {stem} file, which holds only "
                f"{images.shape[0]} (--data_dir={data_dir})"
            )
        images = images[part].copy()
        labels = None if labels is None else labels[part].copy()
    return Dataset(images, binary=info.binary, name=dataset, split=split, labels=labels)


# -- TensorFlow Datasets ----------------------------------------------------


def _tfds_error(dataset: str, tfds_split: str, e: Exception) -> DataError:
    """What TFDS's failure to download and prepare a set means for the user."""
    if isinstance(e, ImportError):
        return DataError(
            f"tensorflow-datasets needs TensorFlow to download and prepare {dataset!r} the first "
            f"time ({e}). Install it with `pip install 'draw_jax[prepare]'`, or pass --data_dir "
            "with local copies of the files."
        )
    # network errors, missing split, ...
    return DataError(
        f"tensorflow-datasets could not provide {dataset}/{tfds_split}: {type(e).__name__}: {e}. "
        "Offline, pass --data_dir with local copies of the files."
    )


def _load_tfds(dataset: str, split: str, tfds_data_dir: str | None, download: bool = True) -> Dataset:
    import tensorflow_datasets as tfds  # heavy import, only on this path

    info = DATASETS[dataset]
    tfds_split = info.splits[split][1]
    try:
        source = tfds.data_source(dataset, split=tfds_split, data_dir=tfds_data_dir, download=download)
    except Exception as e:
        if download:
            raise _tfds_error(dataset, tfds_split, e) from e
        raise DataError(
            f"{dataset} is not prepared in TFDS's folder{f' {tfds_data_dir}' if tfds_data_dir else ''} "
            f"({type(e).__name__}), and nothing is downloaded for this; pass --data_dir with local "
            "copies of the files"
        ) from e
    records = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(r["image"]) for r in records]).astype(np.uint8)
    labels = (
        np.array([int(r["label"]) for r in records], np.int32) if records and "label" in records[0] else None
    )
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[1:] != info.image_shape:
        raise DataError(
            f"tfds {dataset}/{tfds_split}: images have shape {images.shape[1:]}, expected {info.image_shape}"
        )
    binary = info.binary
    if binary and images.max(initial=0) > 1:
        raise DataError(f"tfds {dataset}/{tfds_split}: values above 1 in a binarized set")
    return Dataset(images, binary=binary, name=dataset, split=split, labels=labels)


def load_split(
    dataset: str,
    split: str,
    data_dir: str | None = None,
    tfds_data_dir: str | None = None,
    *,
    download: bool = True,
) -> Dataset:
    """Loads one split into memory.

    Args:
      dataset: 'binarized_mnist', 'mnist', 'mnist_two_digits' (built from mnist's
        files), 'cifar10' or 'svhn_cropped'.
      split: 'train', 'valid' ('validation' too) or 'test'. For mnist, valid is
        training images 50,000-59,999 and train the first 50,000; for cifar10 and
        svhn_cropped, valid is the last 5,000 training images.
      data_dir: a folder of local files; when given, TFDS is not used.
      tfds_data_dir: where TFDS keeps prepared data (its own default if None).
      download: without ``data_dir``, let TFDS download and prepare the data set
        if it has not (False: refuse instead, for data that is optional).

    Returns:
      A ``Dataset`` with uint8 images [m, h, w, c].

    Raises:
      DataError: naming the file or split at fault.
    """
    _, split = _info(dataset, split)
    start = time.perf_counter()
    if dataset == "mnist_two_digits":
        from draw_jax import two_digits

        source = load_split("mnist", split, data_dir, tfds_data_dir, download=download)
        loaded = Dataset(
            two_digits.make(source.images, split).images, binary=False, name=dataset, split=split
        )
    elif data_dir:
        loaded = _load_local(dataset, split, data_dir)
    else:
        loaded = _load_tfds(dataset, split, tfds_data_dir, download)
    m, h, w, c = loaded.images.shape
    logging.info("loaded %s/%s: %d images of %dx%dx%d from %s in %.1fs", dataset, split, m, h, w, c,
                 data_dir or "TFDS", time.perf_counter() - start)  # fmt: skip
    return loaded


# -- batches ----------------------------------------------------------------


def preprocess(images: jax.Array, binary: bool, binarize: str, key: jax.Array | None) -> jax.Array:
    """uint8 [b, h, w, c] -> float32 targets in [0, 1].

    Args:
      images: uint8 batch (0/1 if ``binary`` else 0..255).
      binary: whether the data set is already binary.
      binarize: 'dynamic' (Bernoulli sample of the grey level, needs ``key``),
        'threshold' (grey > 0.5) or 'none'.
      key: PRNG key for 'dynamic'.
    """
    x = images.astype(jnp.float32)
    if binary:
        return x
    p = x / 255.0
    if binarize == "dynamic":
        if key is None:
            raise ValueError("dynamic binarisation needs a PRNG key")
        return jax.random.bernoulli(key, p).astype(jnp.float32)
    if binarize == "threshold":
        return (p > 0.5).astype(jnp.float32)
    return p
