"""draw_jax: DRAW (Gregor et al. 2015, arXiv:1502.04623) in JAX and Flax.

``draw_jax.attention`` is pure JAX (no Flax) and can be used on its own.

Notation, the same in every module's shapes and docstrings:
  b  batch                           T  glimpses (steps of the recurrence)
  t  one step, 0 .. T-1              z  latent size per step
  h  image height (the paper's B)    e  encoder LSTM size
  w  image width (the paper's A)     d  decoder LSTM size
  c  channels                        n  glimpse size: an n x n grid of filters
  m  images in a split or a picture  k  importance samples, or steps per compiled call
"""

from draw_jax import attention
from draw_jax.config import ConfigError, DrawConfig, TrainConfig, build_config
from draw_jax.losses import Bound, draw_bound
from draw_jax.model import DRAW, DrawOutputs, Generation

__all__ = [
    "DRAW",
    "Bound",
    "ConfigError",
    "DrawConfig",
    "DrawOutputs",
    "Generation",
    "TrainConfig",
    "attention",
    "build_config",
    "draw_bound",
]
__version__ = "0.2.0"
