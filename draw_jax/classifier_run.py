"""A cluttered-MNIST classifier run's settings and its initial parameters.

``ClassifierRunConfig`` is what a run's ``config.json`` and a released
classifier's card hold (``classifier_training`` trains it, ``pretrained``
releases it); ``init_classifier`` builds its model's parameters.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from flax import nnx

from draw_jax import cluttered
from draw_jax.classifier import AttentionClassifier, ClassifierConfig
from draw_jax.config import ConfigError, OptimConfig

__all__ = ["ClassifierRunConfig", "init_classifier"]


@dataclasses.dataclass(frozen=True)
class ClassifierRunConfig:
    """A classifier run: model, optimiser, data and schedule (what config.json holds).

    ``init_from``: a released classifier (name or path) whose parameters a new
    run starts from, with a fresh optimiser and schedule; its model and variant
    must be this run's. A resumed run continues from its checkpoint.
    """

    model: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(
            learning_rate=1e-3, adam_b1=0.9, lr_schedule="constant", warmup_steps=0
        )
    )
    variant: str = "100x100"
    data_seed: int = 0
    # Each epoch of training images with a fresh digit position and clutter
    # (cluttered.py, "Redrawn clutter"); False: the one fixed set every epoch.
    redraw_clutter: bool = True
    data_dir: str | None = None
    tfds_data_dir: str | None = None
    batch_size: int = 64
    num_steps: int = 20_000
    seed: int = 0
    log_every: int = 100
    eval_every: int = 1_000
    checkpoint_every: int = 500
    checkpoint_minutes: float = 10.0
    keep_checkpoints: int = 2
    eval_examples: int = 0
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.variant not in cluttered.VARIANTS:
            raise ConfigError(
                f"--variant must be one of {', '.join(cluttered.VARIANTS)}, got {self.variant!r}"
            )
        size = cluttered.VARIANTS[self.variant][0]
        if (self.model.height, self.model.width) != (size, size):
            raise ConfigError(f"--variant={self.variant} makes {size}x{size} images; the model is for "
                              f"{self.model.height}x{self.model.width}")  # fmt: skip
        for name in ("batch_size", "num_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("log_every", "eval_every", "checkpoint_every", "checkpoint_minutes", "eval_examples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.data_dir is not None and not os.path.isdir(self.data_dir):
            raise ConfigError(f"--data_dir={self.data_dir} is not a directory")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifierRunConfig:
        d = dict(d)
        if "redraw_clutter" not in d:  # written before redrawn clutter and the parameter average
            d["redraw_clutter"] = False
            d["optim"] = {**d.get("optim", {}), "ema_decay": 0.0}
        try:
            d["model"], d["optim"] = ClassifierConfig(**d["model"]), OptimConfig(**d["optim"])
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"classifier config does not match this version of draw_jax: {e}") from e

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the one it continues (not length, intervals, paths)."""
        d = self.to_dict()
        for k in ("num_steps", "log_every", "eval_every", "checkpoint_every", "checkpoint_minutes", "keep_checkpoints", "eval_examples",
                  "data_dir", "tfds_data_dir"):  # fmt: skip
            d.pop(k)
        return d


def init_classifier(config: ClassifierRunConfig) -> tuple[nnx.GraphDef, Any]:
    """(graphdef, initial parameters as a pure dict) of the run's model, seeded by ``config.seed``."""
    graphdef, state = nnx.split(AttentionClassifier(config.model, rngs=nnx.Rngs(config.seed)))
    return graphdef, nnx.to_pure_dict(state)
