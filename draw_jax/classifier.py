"""A read-only attention classifier ("differentiable RAM", DRAW sec. 4.1, Table 1).

A user of ``draw_jax.attention`` like any other: this module imports only its
public functions (``window_from_params``, ``read``, ``tiling_params``) and
nothing else of DRAW.

At each of G glimpses an LSTM's previous hidden state chooses a window (the
five parameters of DRAW's read, eq. 21-24, through a linear layer), the
window reads an n x n glimpse of the image (eq. 27's read of one image), and
the glimpse is the LSTM's input. After the last glimpse a linear layer of the
final hidden state gives the logits of a softmax over the classes. The paper's
hyper-parameters for 100 x 100 cluttered MNIST (Table 3): 8 glimpses, LSTM of
256 cells, 12 x 12 read.

Notation: b = batch, g = glimpse (G of them), h, w, c = image, n = glimpse size.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from draw_jax import attention
from draw_jax.config import ConfigError

__all__ = ["AttentionClassifier", "ClassifierConfig", "ClassifierOutputs", "loss_and_accuracy"]


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """The model. Defaults: DRAW's Table 3 row for 100 x 100 MNIST classification."""

    height: int = 100
    width: int = 100
    channels: int = 1
    glimpses: int = 8
    glimpse_n: int = 12
    hidden: int = 256
    num_classes: int = 10

    def __post_init__(self) -> None:
        for name in ("height", "width", "channels", "glimpses", "glimpse_n", "hidden", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {value!r}")


class ClassifierOutputs(NamedTuple):
    """logits: [b, classes]; windows: ``attention.Window`` of [G, b] arrays; glimpses: [G, b, n, n, c]."""

    logits: jax.Array
    windows: attention.Window
    glimpses: jax.Array


class AttentionClassifier(nnx.Module):
    """LSTM + attention glimpses -> class logits."""

    def __init__(self, config: ClassifierConfig, *, rngs: nnx.Rngs) -> None:
        self.config = cfg = config
        in_size = cfg.glimpse_n * cfg.glimpse_n * cfg.channels
        self.lstm = nnx.OptimizedLSTMCell(in_size, cfg.hidden, rngs=rngs)
        # The first window sees the whole image (a coarse look), later ones where h chooses.
        cover = attention.tiling_params(n=cfg.glimpse_n, height=cfg.height, width=cfg.width)
        self.to_window = nnx.Linear(cfg.hidden, 5, bias_init=lambda *_: cover, rngs=rngs)
        self.to_logits = nnx.Linear(cfg.hidden, cfg.num_classes, rngs=rngs)
        self.h0 = nnx.Param(jnp.zeros((cfg.hidden,), jnp.float32))  # learned initial state
        self.c0 = nnx.Param(jnp.zeros((cfg.hidden,), jnp.float32))

    def glimpse(self, images: jax.Array, h: jax.Array) -> tuple[jax.Array, attention.Window]:
        """The window chosen by h [b, hidden] and its glimpse [b, n, n, c] of images [b, h, w, c]."""
        cfg = self.config
        win = attention.window_from_params(
            self.to_window(h), n=cfg.glimpse_n, height=cfg.height, width=cfg.width
        )
        return attention.read(images, win), win

    def step(
        self, carry: tuple[jax.Array, jax.Array], images: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, attention.Window]]:
        """One glimpse: window from h_{g-1}, read, LSTM update."""
        c, h = carry
        patch, win = self.glimpse(images, h)
        (c, h), _ = self.lstm((c, h), patch.reshape(patch.shape[0], -1))
        return (c, h), (patch, win)

    def initial_carry(self, batch: int) -> tuple[jax.Array, jax.Array]:
        """The learned initial LSTM state (c_0, h_0), [b, hidden] each."""
        hidden = self.config.hidden
        return jnp.broadcast_to(self.c0[...], (batch, hidden)), jnp.broadcast_to(
            self.h0[...], (batch, hidden)
        )

    def __call__(self, images: jax.Array) -> ClassifierOutputs:
        """images: [b, h, w, c], values in [0, 1] (uint8 0..255 is scaled). Returns ``ClassifierOutputs``."""
        cfg = self.config
        if images.ndim != 4 or tuple(images.shape[1:]) != (cfg.height, cfg.width, cfg.channels):
            raise ValueError(
                f"the classifier expects images [batch, {cfg.height}, {cfg.width}, {cfg.channels}], "
                f"got {tuple(images.shape)}"
            )
        if jnp.issubdtype(images.dtype, jnp.integer):
            images = images.astype(jnp.float32) / 255.0
        carry, (glimpses, windows) = jax.lax.scan(
            lambda c, _: self.step(c, images), self.initial_carry(images.shape[0]), None, length=cfg.glimpses
        )
        return ClassifierOutputs(self.to_logits(carry[1]), windows, glimpses)


def loss_and_accuracy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean softmax cross-entropy (from logits) and accuracy over the batch."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (jnp.argmax(logits, -1) == labels).mean()
