"""MNIST and binarized MNIST as in-memory arrays, from local files or TensorFlow Datasets.

Two sources behind one function, ``load_split``:
  * local files (``data_dir`` given): the standard MNIST IDX files
    (``train-images-idx3-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``) and
    Larochelle's ``binarized_mnist_{train,valid,test}.amat[.gz]``. An explicit
    ``data_dir`` always wins: TFDS is never consulted then.
  * TensorFlow Datasets (``data_dir`` None): ``tfds.data_source``, which reads
    prepared ArrayRecord files without TensorFlow. Only the first download and
    preparation needs TensorFlow (the ``[prepare]`` extra).

Images are held as uint8 [N, 28, 28, 1]: 0/1 for a binary set, 0..255 for
grey MNIST. ``preprocess`` turns a batch into float32 targets inside the jitted
step (dynamic binarisation needs the step's key).

Notation: n = number of images, b = batch, h, w, c = height, width, channels.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import struct
import zlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BINARIZE_CHOICES",
    "DATASETS",
    "DataError",
    "Dataset",
    "epoch_permutation",
    "device_epoch_permutation",
    "permutation_key",
    "eval_batches",
    "load_split",
    "preprocess",
    "resolve_binarize",
    "train_batches",
]

BINARIZE_CHOICES = ("dynamic", "threshold", "none")

# dataset -> split -> local file stem; the names TFDS uses for each split.
_LOCAL_FILES = {
    "mnist": {"train": "train", "test": "t10k"},
    "binarized_mnist": {
        "train": "binarized_mnist_train",
        "valid": "binarized_mnist_valid",
        "test": "binarized_mnist_test",
    },
}
_TFDS_SPLITS = {
    "mnist": {"train": "train", "test": "test"},
    "binarized_mnist": {"train": "train", "valid": "validation", "test": "test"},
}
DATASETS = tuple(_LOCAL_FILES)
_SPLIT_ALIASES = {"validation": "valid", "val": "valid"}


class DataError(ValueError):
    """Bad or missing input data. The message names the file or split at fault."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One split held in host memory.

    Attributes:
      images: uint8 [n, 28, 28, 1].
      binary: True when values are 0/1 (binarized MNIST), False for 0..255 grey.
      name, split: where it came from (for messages).
    """

    images: np.ndarray
    binary: bool
    name: str
    split: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


def resolve_binarize(dataset: str, binarize: str | None) -> str:
    """The binarisation to use: binarized_mnist is already binary ('none');
    grey mnist defaults to 'dynamic' (a fresh Bernoulli sample per use)."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if binarize is None:
        return "none" if dataset == "binarized_mnist" else "dynamic"
    if binarize not in BINARIZE_CHOICES:
        raise DataError(f"--binarize must be one of {', '.join(BINARIZE_CHOICES)}, got {binarize!r}")
    if dataset == "binarized_mnist" and binarize != "none":
        raise DataError(
            f"--binarize={binarize} does not apply to binarized_mnist, which is already the fixed "
            "binarisation the paper reports on; use --binarize=none or --dataset=mnist"
        )
    return binarize


def _canonical_split(dataset: str, split: str) -> str:
    split = _SPLIT_ALIASES.get(split, split)
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if split not in _LOCAL_FILES[dataset]:
        raise DataError(
            f"dataset {dataset!r} has no split {split!r}; its splits are {', '.join(_LOCAL_FILES[dataset])}"
        )
    return split


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


def _load_local(dataset: str, split: str, data_dir: str) -> Dataset:
    if not os.path.isdir(data_dir):
        raise DataError(f"--data_dir={data_dir} is not a directory")
    stem = _LOCAL_FILES[dataset][split]
    if dataset == "mnist":
        images = _read_idx_images(_find_file(data_dir, stem, "-images-idx3-ubyte"))
        return Dataset(images, binary=False, name=dataset, split=split)
    images = _read_amat(_find_file(data_dir, stem, ".amat"))
    return Dataset(images, binary=True, name=dataset, split=split)


# -- TensorFlow Datasets ----------------------------------------------------


def _load_tfds(dataset: str, split: str, tfds_data_dir: str | None) -> Dataset:
    import tensorflow_datasets as tfds  # heavy import, only on this path

    tfds_split = _TFDS_SPLITS[dataset][split]
    try:
        source = tfds.data_source(dataset, split=tfds_split, data_dir=tfds_data_dir, download=True)
    except ImportError as e:
        raise DataError(
            f"tensorflow-datasets needs TensorFlow to download and prepare {dataset!r} the first "
            f"time ({e}). Install it with `pip install 'draw_jax[prepare]'`, or pass --data_dir "
            "with local copies of the files."
        ) from e
    except Exception as e:  # network errors, missing split, ...
        raise DataError(
            f"tensorflow-datasets could not provide {dataset}/{tfds_split}: {type(e).__name__}: {e}. "
            "Offline, pass --data_dir with local copies of the files."
        ) from e
    images = np.stack([np.asarray(source[i]["image"]) for i in range(len(source))]).astype(np.uint8)
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[1:] != (28, 28, 1):
        raise DataError(
            f"tfds {dataset}/{tfds_split}: images have shape {images.shape[1:]}, expected (28, 28, 1)"
        )
    binary = dataset == "binarized_mnist"
    if binary and images.max(initial=0) > 1:
        raise DataError(f"tfds {dataset}/{tfds_split}: values above 1 in a binarized set")
    return Dataset(images, binary=binary, name=dataset, split=split)


def load_split(
    dataset: str, split: str, data_dir: str | None = None, tfds_data_dir: str | None = None
) -> Dataset:
    """Loads one split into memory.

    Args:
      dataset: 'binarized_mnist' or 'mnist'.
      split: 'train', 'valid' ('validation' too; binarized_mnist only) or 'test'.
      data_dir: a folder of local files; when given, TFDS is not used.
      tfds_data_dir: where TFDS keeps prepared data (its own default if None).

    Returns:
      A ``Dataset`` with uint8 images [n, 28, 28, 1].

    Raises:
      DataError: naming the file or split at fault.
    """
    split = _canonical_split(dataset, split)
    if data_dir:
        return _load_local(dataset, split, data_dir)
    return _load_tfds(dataset, split, tfds_data_dir)


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


# Keeps the data-order stream apart from the parameter and training-noise streams.
_DATA_STREAM = 0x0DA7A


def permutation_key(seed: int, epoch: jax.Array | int) -> jax.Array:
    """The key that orders ``epoch`` of a run with ``seed``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _DATA_STREAM), epoch)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _permutation(seed: int, epoch: jax.Array, n: int) -> jax.Array:
    return jax.random.permutation(permutation_key(seed, epoch), n)


def device_epoch_permutation(seed: int, epoch: int, n: int) -> jax.Array:
    """``epoch_permutation`` left on the device (for device-resident data)."""
    return _permutation(seed, jnp.asarray(epoch, jnp.int32), n)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the n training images in ``epoch`` (a pure function of seed and epoch)."""
    return np.asarray(device_epoch_permutation(seed, epoch, n))


def train_batches(
    images: np.ndarray, batch_size: int, seed: int, start_step: int = 0
) -> Iterator[np.ndarray]:
    """Endless shuffled training batches, uint8 [b, h, w, c].

    Each epoch is a fresh permutation (``epoch_permutation``); the last partial
    batch of an epoch is dropped, so every batch has ``batch_size`` images.
    Starting at ``start_step`` gives exactly the batches an uninterrupted run
    would have seen from that step on (what resuming relies on).
    """
    n = images.shape[0]
    steps_per_epoch = n // batch_size
    if steps_per_epoch == 0:
        raise DataError(f"--batch_size={batch_size} is larger than the training split ({n} images)")
    epoch, offset = divmod(start_step, steps_per_epoch)
    while True:
        perm = epoch_permutation(seed, epoch, n)
        for i in range(offset, steps_per_epoch):
            yield images[perm[i * batch_size : (i + 1) * batch_size]]
        epoch, offset = epoch + 1, 0


def eval_batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every image once, in order: (uint8 [b, h, w, c], bool mask [b]).

    The last batch is padded with zeros to ``batch_size`` (one compiled shape)
    and the mask marks the real images, so no image is dropped or counted twice.
    """
    n = images.shape[0]
    for start in range(0, n, batch_size):
        batch = images[start : start + batch_size]
        mask = np.ones(batch_size, bool)
        if batch.shape[0] < batch_size:
            pad = batch_size - batch.shape[0]
            mask[batch.shape[0] :] = False
            batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
        yield batch, mask
