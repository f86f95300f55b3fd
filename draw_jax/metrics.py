"""Metrics out of a run: TensorBoard event files, console lines and a JSON summary.

Event files are written with tensorboardX (no TensorFlow needed) under
``<workdir>/tb/{train,valid}``; each process start adds new event files and
never rewrites old ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

__all__ = ["MetricWriter", "write_json", "format_duration"]


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricWriter:
    """Scalars, per-step KL and images for one split of a run."""

    def __init__(self, workdir: str, split: str) -> None:
        from tensorboardX import SummaryWriter  # imported lazily: heavy (protobuf)

        self._writer = SummaryWriter(os.path.join(workdir, "tb", split))

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        for name, value in values.items():
            arr = np.asarray(value)
            if arr.ndim == 0:
                self._writer.add_scalar(name, float(arr), step)
            elif name == "kl_per_step":
                # One curve per step t would flood the dashboard; a histogram-free
                # summary: the KL of every 8th glimpse as its own scalar.
                for t in range(0, arr.shape[0], max(1, arr.shape[0] // 8)):
                    self._writer.add_scalar(f"kl_per_step/t{t:02d}", float(arr[t]), step)

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        """image: uint8 [h, w, 3] or [h, w]."""
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        self._writer.add_image(name, image, step, dataformats="HWC")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def write_json(path: str, payload: Mapping[str, Any]) -> None:
    """Writes JSON atomically (temporary file, then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=float)
    os.replace(tmp, path)
    logging.info("wrote %s", path)
