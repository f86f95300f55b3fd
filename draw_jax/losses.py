"""The variational bound DRAW is trained on and reports (Gregor et al. 2015, eq. 9-12).

Notation (``draw_jax/__init__.py``): b = batch, t = step (T steps), z = latent size.

  L^x = -log D(x | c_T)                   Bernoulli, D = sigmoid(c_T)   (eq. 9)
        or, for 8-bit colour, a discretised logistic with mean sigmoid(c_T)
        and a learned scale per channel (``discretized_logistic_nll``)
  L^z = sum_t KL(Q(Z_t | h^enc_t) || N(0, I))
      = sum_t 0.5 * sum_z (mu^2 + sigma^2 - 2 log sigma - 1)          (eq. 11)
  bound = L^x + L^z  (nats per image; an upper bound on -log p(x))   (eq. 12)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from draw_jax.config import LIKELIHOODS
from draw_jax.model import DrawOutputs, check_pixels

__all__ = [
    "LIKELIHOODS",
    "Bound",
    "bernoulli_nll",
    "bits_per_dim",
    "discretized_logistic_nll",
    "draw_bound",
    "kl_per_step",
    "reconstruction_nll",
]

PIXEL_LEVELS = 256


class Bound(NamedTuple):
    """Batch-averaged parts of the bound, in nats per image.

    Attributes:
      loss: scalar, the training objective: mean of recon + kl_weight * kl.
        With ``kl_weight`` 1 (the default, and always at evaluation) it is the
        paper's bound; during a KL warm-up it is smaller than the bound.
      recon: scalar, L^x (eq. 9).
      kl: scalar, L^z summed over steps (eq. 11), never weighted.
      kl_per_step: [T], KL of each step, never weighted.
      per_example: [b], each image's bound L^x + L^z (eq. 12), never weighted: the
        paper's number is its mean over a split.
    """

    loss: jax.Array
    recon: jax.Array
    kl: jax.Array
    kl_per_step: jax.Array
    per_example: jax.Array


def bernoulli_nll(logits: jax.Array, x: jax.Array) -> jax.Array:
    """-log Bernoulli(x | sigmoid(logits)) summed over all but the batch axis.

    Computed from logits (optax's stable form), never log(sigmoid + eps).

    Args:
      logits: [b, ...] canvas.
      x: [b, ...] targets in [0, 1] (binary for a proper likelihood).

    Returns:
      [b] nats per image.
    """
    ce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), x.astype(jnp.float32))
    return jnp.sum(ce.reshape(ce.shape[0], -1), axis=-1)


def discretized_logistic_nll(logits: jax.Array, log_scale: jax.Array, x: jax.Array) -> jax.Array:
    """-log P(x) of 8-bit pixels under a logistic discretised to 256 bins.

    Pixel value k in 0..255 is given as x = k / 255. Its probability is the
    logistic's mass on [x - 1/510, x + 1/510] with mean sigmoid(logits) and
    scale exp(log_scale); the two end bins take the tails (0 the mass below
    1/510, 255 the mass above 1 - 1/510), so the 256 probabilities sum to 1 and
    the result is a likelihood of discrete data in nats (the VAE form of
    Kingma et al. 2016, "Improved variational inference with inverse
    autoregressive flow", and of PixelCNN++ with one component).

    Stable for any logits and scale: log(sigmoid(a) - sigmoid(b)) is computed as
    a + log(-expm1(b - a)) - softplus(a) - softplus(b), where b - a = -1/(255 s)
    does not depend on x; nothing is ever log(0) or a difference of two numbers
    near 1.

    Args:
      logits: [b, h, w, c] canvas c_T.
      log_scale: [c] (broadcast) natural log of the logistic's scale, in units
        of the [0, 1] pixel range.
      x: [b, h, w, c] targets k / 255.

    Returns:
      [b] nats per image.
    """
    x = x.astype(jnp.float32)
    mean = jax.nn.sigmoid(logits.astype(jnp.float32))
    inv_s = jnp.exp(-log_scale.astype(jnp.float32))
    half_bin = 0.5 / (PIXEL_LEVELS - 1)
    a = (x + half_bin - mean) * inv_s  # upper edge of the bin
    b = (x - half_bin - mean) * inv_s  # lower edge
    k = jnp.round(x * (PIXEL_LEVELS - 1))
    log_lowest = -jax.nn.softplus(-a)  # log sigmoid(a): the bin of 0 takes the lower tail
    log_highest = -jax.nn.softplus(b)  # log (1 - sigmoid(b)): the bin of 255 the upper
    log_inner = a + jnp.log(-jnp.expm1(b - a)) - jax.nn.softplus(a) - jax.nn.softplus(b)
    log_p = jnp.where(k <= 0, log_lowest, jnp.where(k >= PIXEL_LEVELS - 1, log_highest, log_inner))
    return -jnp.sum(log_p.reshape(log_p.shape[0], -1), axis=-1)


def reconstruction_nll(outputs: DrawOutputs, x: jax.Array) -> jax.Array:
    """L^x per image: [b] nats, with the likelihood the model was built for.

    A model with a learned pixel scale (``outputs.log_scale``) uses the
    discretised logistic, any other the Bernoulli of eq. 9.
    """
    if outputs.log_scale is None:
        return bernoulli_nll(outputs.logits, x)
    return discretized_logistic_nll(outputs.logits, outputs.log_scale, x)


def bits_per_dim(nats: float, image_shape: tuple[int, ...]) -> float:
    """Nats per image -> bits per dimension (sub-pixel), the unit of colour benchmarks."""
    return float(nats) / (math.prod(image_shape) * math.log(2.0))


def kl_per_step(mu: jax.Array, logsigma: jax.Array) -> jax.Array:
    """KL(N(mu, sigma^2) || N(0, I)) per step and example (eq. 11).

    Args:
      mu, logsigma: [T, b, z].

    Returns:
      [T, b]: 0.5 * sum_z (mu^2 + sigma^2 - 2 log sigma - 1).
    """
    mu = mu.astype(jnp.float32)
    logsigma = logsigma.astype(jnp.float32)
    return 0.5 * jnp.sum(jnp.square(mu) + jnp.exp(2 * logsigma) - 2 * logsigma - 1, axis=-1)


def draw_bound(outputs: DrawOutputs, x: jax.Array, kl_weight: jax.Array | float = 1.0) -> Bound:
    """The negative variational bound of a batch.

    Args:
      outputs: what ``DRAW.__call__`` returned for x.
      x: [b, h, w, c] the targets.
      kl_weight: multiplies L^z in ``loss`` only (for a KL warm-up); the reported
        ``kl`` and ``per_example`` are always the true, unweighted bound.

    Returns:
      ``Bound`` (batch means, and the per-example bound).

    Raises:
      ValueError: x (given from the host, not under jit) has a NaN or a value
        outside [0, 1] (``model.check_pixels``).
    """
    check_pixels(x, "draw_bound's targets x")
    recon = reconstruction_nll(outputs, x)  # [b]
    kl_t = kl_per_step(outputs.mu, outputs.logsigma)  # [T, b]
    kl = jnp.sum(kl_t, axis=0)  # [b]
    per_example = recon + kl
    loss = jnp.mean(recon + kl_weight * kl)
    return Bound(
        loss=loss,
        recon=jnp.mean(recon),
        kl=jnp.mean(kl),
        kl_per_step=jnp.mean(kl_t, axis=1),
        per_example=per_example,
    )
