"""Two-digit MNIST (DRAW sec. 4.3): 60 x 60 images holding two real MNIST digits.

Protocol (the paper: two 28 x 28 MNIST digits "chosen at random and placed at
random locations" in a 60 x 60 black background, overlapping intensities "added
together at each point and clipped to be no greater than one"; the rest is ours):

* Example i of a split holds MNIST image i of that split and a partner drawn
  uniformly from the split's other images, each pasted whole (28 x 28) at a
  position uniform over 0..32 on each axis, independently (the two may overlap).
* Overlaps add and clip, as the paper's do: values stay MNIST's 0..255, and
  where strokes cross the sum saturates at 255.
* Splits as ``mnist``: train from MNIST train's first 50,000, valid from its
  last 10,000, test from MNIST test; partners come from the same split.
* Deterministic: every draw of split s comes from
  ``np.random.default_rng([SEED, s])``; the same files give the same images.
* Grey levels, binarised like ``mnist`` (dynamically, a fresh Bernoulli draw
  per use, by default), so the bound is a likelihood bound of binary images.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["CANVAS", "SEED", "TwoDigits", "make", "paste"]

CANVAS = 60
SEED = 0
_DIGIT = 28
_SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class TwoDigits:
    """images: uint8 [m, 60, 60, 1]; partners: [m] index of each second digit;
    positions: [m, 2, 2] (digit, (row, col)) top-left corners."""

    images: np.ndarray
    partners: np.ndarray
    positions: np.ndarray


def make(digits: np.ndarray, split: str, seed: int = SEED) -> TwoDigits:
    """Builds the two-digit split from the MNIST images [m, 28, 28, 1] of the same split."""
    m = digits.shape[0]
    if m < 2:
        raise ValueError(f"two-digit MNIST needs at least two source images, got {m}")
    rng = np.random.default_rng([seed, _SPLIT_IDS[split]])
    partners = rng.integers(0, m - 1, size=m)
    partners = partners + (partners >= np.arange(m))  # another image of the split
    positions = rng.integers(0, CANVAS - _DIGIT + 1, size=(m, 2, 2))
    return TwoDigits(paste([digits, digits[partners]], positions), partners, positions)


def paste(layers: list[np.ndarray], positions: np.ndarray) -> np.ndarray:
    """Canvases uint8 [m, 60, 60, 1]: digit ``layers[k][i]`` ([m, 28, 28, 1] each) pasted with
    its top-left corner at ``positions[i, k]`` ([m, k, 2], (row, col)); overlaps add, clipped
    at 255 (the paper's "added together ... and clipped to be no greater than one")."""
    m = positions.shape[0]
    images = np.zeros((m, CANVAS, CANVAS, 1), np.uint8)
    canvas = np.zeros((CANVAS, CANVAS, 1), np.uint16)  # one image's sum, wide enough not to wrap
    for i in range(m):
        canvas[:] = 0
        for k, layer in enumerate(layers):
            y, x = positions[i, k]
            canvas[y : y + _DIGIT, x : x + _DIGIT] += layer[i]
        np.minimum(canvas, 255, out=images[i], casting="unsafe")
    return images
