"""One frozen config for a training run: model, optimiser, data and run length.

Flags (``experiments/train.py``) build it; the run writes it to
``<workdir>/config.json`` so that evaluation, sampling and resuming read the
model from the workdir instead of from re-typed flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from draw_jax import data as data_lib
from draw_jax.model import DrawConfig
from draw_jax.training import OptimConfig

__all__ = ["DataConfig", "RunConfig", "TrainConfig", "ConfigError", "save_config", "load_config"]

CONFIG_FILE = "config.json"


class ConfigError(ValueError):
    """A bad setting; the message names the flag or file at fault."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Attributes:
    dataset: 'binarized_mnist' (the paper's benchmark) or 'mnist'.
    data_dir: folder of local files; when set, TFDS is not used.
    tfds_data_dir: TFDS's own data folder (None = its default).
    binarize: 'dynamic', 'threshold' or 'none' (resolved from the dataset if None).
    batch_size: images per step (the last partial batch of an epoch is dropped).
    eval_split: the held-out split evaluated during training.
    device_data: keep the training split on the device and draw batches inside
      the jitted step (no host-to-device copy per step).
    """

    dataset: str = "binarized_mnist"
    data_dir: str | None = None
    tfds_data_dir: str | None = None
    binarize: str | None = None
    batch_size: int = 100
    eval_split: str = "valid"
    device_data: bool = True

    def __post_init__(self) -> None:
        if self.dataset not in data_lib.DATASETS:
            raise ConfigError(
                f"--dataset must be one of {', '.join(data_lib.DATASETS)}, got {self.dataset!r}"
            )
        try:
            object.__setattr__(self, "binarize", data_lib.resolve_binarize(self.dataset, self.binarize))
        except data_lib.DataError as e:
            raise ConfigError(str(e)) from e
        if self.batch_size < 1:
            raise ConfigError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.data_dir is not None and not os.path.isdir(self.data_dir):
            raise ConfigError(f"--data_dir={self.data_dir} is not a directory")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Attributes:
    num_steps: optimiser steps in all (a resumed run continues to this number).
    seed: seeds parameters, data order and every random draw.
    log_every, eval_every, checkpoint_every: intervals in steps (0 = only at the end).
    keep_checkpoints: how many recent checkpoints to keep.
    eval_examples: images of the eval split used during training (0 = all).
    steps_per_call: train steps per compiled call (device data only; reduced to fit
      in an epoch and to divide the log, checkpoint and eval intervals). Several steps per call amortise the
      per-call dispatch and the fresh allocation of the step's working memory
      (measured: 0.82x the time per step at 10 on the paper config, CPU).
    """

    num_steps: int = 100_000
    seed: int = 0
    log_every: int = 100
    eval_every: int = 5_000
    checkpoint_every: int = 1_000
    keep_checkpoints: int = 3
    eval_examples: int = 0
    steps_per_call: int = 10

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ConfigError(f"--num_steps must be >= 1, got {self.num_steps}")
        for name in ("log_every", "eval_every", "checkpoint_every", "eval_examples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"--keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.steps_per_call < 1:
            raise ConfigError(f"--steps_per_call must be >= 1, got {self.steps_per_call}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: DrawConfig = dataclasses.field(default_factory=DrawConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        try:
            return cls(
                model=DrawConfig(**d["model"]),
                optim=OptimConfig(**d["optim"]),
                data=DataConfig(**d["data"]),
                run=RunConfig(**d["run"]),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"config does not match this version of draw_jax: {e}") from e

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues.

        Run length and logging intervals may change between restarts (to extend
        a run); the model, optimiser, data and seed may not.
        """
        d = self.to_dict()
        d["run"] = {"seed": self.run.seed}
        d["data"].pop("data_dir")  # the same files may move
        d["data"].pop("tfds_data_dir")
        d["data"].pop("device_data")  # same batches either way
        return d


def save_config(config: TrainConfig, workdir: str) -> None:
    """Writes ``<workdir>/config.json`` (atomically)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def load_config(workdir: str) -> TrainConfig:
    """Reads ``<workdir>/config.json``."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found: is --workdir={workdir} a draw_jax training workdir?")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    return TrainConfig.from_dict(d)
