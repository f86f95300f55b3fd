"""draw_jax: DRAW (Gregor et al. 2015, arXiv:1502.04623) in JAX and Flax.

``draw_jax.attention`` is pure JAX (no Flax) and can be used on its own: the
package imports its modules lazily, on first use, so ``import
draw_jax.attention`` loads JAX and nothing of Flax or optax.

Notation, the same in every module's shapes and docstrings:
  b  batch                           T  glimpses (steps of the recurrence)
  t  one step, 0 .. T-1              z  latent size per step
  h  image height (the paper's B)    e  encoder LSTM size
  w  image width (the paper's A)     d  decoder LSTM size
  c  channels                        n  glimpse size: an n x n grid of filters
  m  images in a split or a picture  k  importance samples, or steps per compiled call
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# Public names, and the module each comes from.
_NAMES = {
    "DRAW": "model",
    "DrawOutputs": "model",
    "Generation": "model",
    "Bound": "losses",
    "draw_bound": "losses",
    "ConfigError": "config",
    "DrawConfig": "config",
    "TrainConfig": "config",
    "build_config": "settings",
}
# Public modules (``draw_jax.pretrained.load_model(...)`` works after ``import draw_jax``).
_MODULES = (
    "attention",
    "config",
    "data",
    "evaluation",
    "losses",
    "model",
    "pretrained",
    "settings",
    "train_loop",
)

__all__ = sorted([*_NAMES, *_MODULES])

if TYPE_CHECKING:  # what a type checker and an IDE see; at run time, __getattr__ below
    from draw_jax import attention, config, data, evaluation, losses, model, pretrained, settings, train_loop  # noqa: F401
    from draw_jax.config import ConfigError, DrawConfig, TrainConfig  # noqa: F401
    from draw_jax.losses import Bound, draw_bound  # noqa: F401
    from draw_jax.model import DRAW, DrawOutputs, Generation  # noqa: F401
    from draw_jax.settings import build_config  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"draw_jax.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"draw_jax.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'draw_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
