"""Metrics of a run: accumulating and checking them, progress, TensorBoard, JSON.

``MetricAccumulator`` fetches the train step's metrics from the device at log
and checkpoint steps only, and stops the run (``TrainingDiverged``) at the
first non-finite value. ``Progress`` times training (images/s, ETA) apart from
compilation and evaluation. Event files are written with tensorboardX (no
TensorFlow needed) under ``<workdir>/tb/{train,valid}``; each process start
adds new event files and never rewrites old ones.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

__all__ = [
    "MetricAccumulator",
    "MetricWriter",
    "Progress",
    "TrainingDiverged",
    "format_duration",
    "write_json",
]


class TrainingDiverged(RuntimeError):
    """A training metric became NaN or infinite."""


class MetricAccumulator:
    """Sums the train step's metrics between log lines; checks every value is finite."""

    def __init__(self) -> None:
        self._pending: list[dict[str, jax.Array]] = []
        self._sums: dict[str, np.ndarray] = {}
        self._count = 0

    def add(self, metrics: dict[str, jax.Array]) -> None:
        """Metrics of one call, each with a leading [k] steps axis (left on the device).

        Waits for the previous call to finish first, so the host dispatches at
        most one call ahead of the one running. Without the wait it ran up to a
        whole log interval ahead (ten calls of ten steps by default), and a run
        stopped by Ctrl-C or SIGTERM went on computing those queued calls for a
        minute or more before the process could exit. One call ahead keeps the
        device as busy: a call takes far longer than dispatching the next.
        """
        if self._pending:
            jax.block_until_ready(self._pending[-1])
        self._pending.append(metrics)

    def drain(self, step: int, hint: str = "") -> None:
        """Fetches pending metrics and checks them.

        Raises:
          TrainingDiverged: a value is not finite; the message names it, the step
            reached, and ``hint`` (what is kept, what to try).
        """
        for m in jax.device_get(self._pending):
            for k, v in m.items():
                v = np.asarray(v, np.float64)
                if not np.all(np.isfinite(v)):
                    raise TrainingDiverged(
                        f"the training {k} became {v[~np.isfinite(v)][0]} by step {step}. {hint}"
                    )
                self._sums[k] = self._sums.get(k, 0) + v.sum(axis=0)
            self._count += np.shape(next(iter(m.values())))[0]
        self._pending = []

    def means(self) -> dict[str, np.ndarray]:
        """Means since the last call (call ``drain`` first)."""
        out = {k: v / max(self._count, 1) for k, v in self._sums.items()}
        self._sums, self._count = {}, 0
        return out


class Progress:
    """Training images/s and ETA, timing only training (not compilation or evaluation)."""

    def __init__(self, step: int, num_steps: int, batch_size: int) -> None:
        self.num_steps, self.batch_size = num_steps, batch_size
        self._step, self._t = step, time.time()
        self.steps, self.seconds = 0, 0.0

    def restart(self, step: int) -> None:
        """Time from here on (after compiling, after an evaluation)."""
        self._step, self._t = step, time.time()

    def update(self, step: int) -> None:
        now = time.time()
        if step > self._step:
            self.steps += step - self._step
            self.seconds += now - self._t
        self._step, self._t = step, now

    @property
    def images_per_s(self) -> float:
        return self.steps * self.batch_size / self.seconds if self.seconds > 0 else float("nan")

    def eta(self, step: int) -> str:
        if not self.steps:
            return "?"
        return format_duration((self.num_steps - step) * self.seconds / self.steps)


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

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def write_json(path: str, payload: Mapping[str, Any]) -> None:
    """Writes JSON atomically (temporary file, then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=float)
    os.replace(tmp, path)
    logging.info("wrote %s", path)
