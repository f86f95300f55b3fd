"""Cluttered translated MNIST (Mnih, Heess, Graves, Kavukcuoglu 2014, "Recurrent
Models of Visual Attention", sec. 4.1), the data of DRAW's Table 1.

Protocol (choices the papers leave open are marked *):

* A canvas of ``size`` x ``size`` zeros (uint8, 0..255 as MNIST stores them).
* The digit: one 28 x 28 MNIST image pasted whole at a uniformly random
  position fully inside the canvas (top-left corner uniform over
  0..size-28 on each axis).
* Clutter: ``num_clutter`` pieces, each an ``8 x 8`` sub-patch cut at a
  uniformly random position of another MNIST image* (uniform over the same
  split, excluding the digit's own image), pasted at a uniformly random
  position fully inside the canvas. Clutter may overlap the digit and each
  other*.
* Pixels combine by maximum* (an overlap never saturates or wraps, and a
  pixel keeps the value range 0..255 of MNIST).
* 100 x 100 with 8 pieces (DRAW's Table 1, RAM's largest set) or 60 x 60 with
  4 pieces (RAM's smaller set).

Splits: ``train`` from MNIST train's first 50,000 images, ``valid`` from its
last 10,000, ``test`` from MNIST test; each image's clutter comes from the
same split, so no pixel of test reaches train. Example ``i`` of a split is a
pure function of (seed, split, i): the set is the same for the same seed on
every machine, generated lazily batch by batch (no cache to go stale).

Redrawn clutter (training only): ``epoch=e`` makes example i again from
MNIST image i with a fresh digit position and fresh clutter, drawn from
``np.random.default_rng([seed, split, i, e])`` (``epoch=0`` is the fixed set
above). RAM's generator makes every training image afresh; a fixed set of
50,000 lets a 256-cell LSTM memorise its clutter (100% train accuracy, valid
cross-entropy rising) long before the error converges.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from draw_jax import data as data_lib
from draw_jax.config import ConfigError

__all__ = ["DIGIT", "PATCH", "VARIANTS", "ClutteredMNIST", "Placement", "load"]

DIGIT = 28
PATCH = 8
# (canvas size, pieces of clutter) by the name --variant selects.
VARIANTS = {"100x100": (100, 8), "60x60": (60, 4)}
_SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where example i's pieces went (for tests and pictures).

    Attributes:
      digit: index of the placed digit in the source split.
      digit_yx: (row, col) of its top-left corner in the canvas.
      clutter_sources: [num_clutter] source image of each piece.
      clutter_cut_yx: [num_clutter, 2] where each piece was cut from its source.
      clutter_yx: [num_clutter, 2] where each piece was pasted.
    """

    digit: int
    digit_yx: tuple[int, int]
    clutter_sources: np.ndarray
    clutter_cut_yx: np.ndarray
    clutter_yx: np.ndarray


class ClutteredMNIST:
    """One split of cluttered translated MNIST, made on demand from an MNIST split.

    ``len(ds)`` examples; ``ds.batch(indices)`` gives (uint8 [b, size, size, 1],
    int32 labels [b]); ``ds.placement(i)`` says where example i's pieces are.
    Example i is made from MNIST image i of the source split (the set has as
    many examples as its source), with its clutter drawn from
    ``np.random.default_rng([seed, split, i])``.
    """

    def __init__(self, source: data_lib.Dataset, *, size: int, num_clutter: int, seed: int) -> None:
        if source.labels is None:
            raise ConfigError(
                f"{source.name}/{source.split} has no labels; cluttered MNIST needs them "
                "(train-labels-idx1-ubyte[.gz] / t10k-labels-idx1-ubyte[.gz] beside the images in --data_dir)"
            )
        if size < DIGIT:
            raise ConfigError(f"a cluttered canvas must hold a {DIGIT}x{DIGIT} digit, got size {size}")
        if num_clutter < 0:
            raise ConfigError(f"num_clutter must be >= 0, got {num_clutter}")
        if len(source) < 2:
            raise ConfigError(f"{source.name}/{source.split} has {len(source)} images; clutter needs another")
        self.images = source.images
        self.labels = source.labels
        self.split = source.split
        self.size, self.num_clutter, self.seed = size, num_clutter, seed

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def placement(self, i: int, epoch: int = 0) -> Placement:
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of a split of {len(self)}")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        key = [self.seed, _SPLIT_IDS[self.split], i] + ([epoch] if epoch else [])
        rng = np.random.default_rng(key)
        room = self.size - DIGIT + 1
        digit_yx = tuple(int(v) for v in rng.integers(0, room, size=2))
        # Another image of the split: uniform over the other len - 1.
        sources = rng.integers(0, len(self) - 1, size=self.num_clutter)
        sources = sources + (sources >= i)
        cut = rng.integers(0, DIGIT - PATCH + 1, size=(self.num_clutter, 2))
        where = rng.integers(0, self.size - PATCH + 1, size=(self.num_clutter, 2))
        return Placement(i, digit_yx, sources, cut, where)

    def example(self, i: int, epoch: int = 0) -> tuple[np.ndarray, int]:
        """(uint8 [size, size, 1] canvas, label) of example i (drawn afresh for ``epoch`` > 0)."""
        p = self.placement(i, epoch)
        canvas = np.zeros((self.size, self.size, 1), np.uint8)
        y, x = p.digit_yx
        canvas[y : y + DIGIT, x : x + DIGIT] = self.images[i]
        for src, (cy, cx), (py, px) in zip(p.clutter_sources, p.clutter_cut_yx, p.clutter_yx, strict=True):
            piece = self.images[src, cy : cy + PATCH, cx : cx + PATCH]
            region = canvas[py : py + PATCH, px : px + PATCH]
            np.maximum(region, piece, out=region)
        return canvas, int(self.labels[i])

    def batch(self, indices: np.ndarray, epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 [b, size, size, 1], int32 [b]) for the given example indices (of ``epoch``'s draw)."""
        out = [self.example(int(i), epoch) for i in np.asarray(indices)]
        return np.stack([o[0] for o in out]), np.array([o[1] for o in out], np.int32)


def load(
    split: str,
    *,
    variant: str = "100x100",
    seed: int = 0,
    data_dir: str | None = None,
    tfds_data_dir: str | None = None,
) -> ClutteredMNIST:
    """A split of cluttered MNIST from the real MNIST files (``data_dir``, IDX) or TFDS ``mnist``.

    Raises:
      ConfigError: unknown variant. DataError: missing or malformed MNIST files.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"--variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    size, num_clutter = VARIANTS[variant]
    source = data_lib.load_split("mnist", split, data_dir, tfds_data_dir)
    return ClutteredMNIST(source, size=size, num_clutter=num_clutter, seed=seed)
