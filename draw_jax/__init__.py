"""draw_jax: DRAW (Gregor et al. 2015, arXiv:1502.04623) in JAX and Flax.

``draw_jax.attention`` is pure JAX (no Flax) and can be used on its own.
"""

from draw_jax import attention
from draw_jax.losses import Bound, draw_bound
from draw_jax.model import DRAW, DrawConfig, DrawOutputs, Generation

__all__ = ["DRAW", "Bound", "DrawConfig", "DrawOutputs", "Generation", "attention", "draw_bound"]
__version__ = "0.1.0"
