"""The variational bound DRAW is trained on and reports (Gregor et al. 2015, eq. 9-12).

Notation (``draw_jax/__init__.py``): b = batch, t = step (T steps), z = latent size.

  L^x = -log D(x | c_T)                   Bernoulli, D = sigmoid(c_T)   (eq. 9)
  L^z = sum_t KL(Q(Z_t | h^enc_t) || N(0, I))
      = sum_t 0.5 * sum_z (mu^2 + sigma^2 - 2 log sigma - 1)          (eq. 11)
  bound = L^x + L^z  (nats per image; an upper bound on -log p(x))   (eq. 12)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from draw_jax.model import DrawOutputs

__all__ = ["Bound", "bernoulli_nll", "draw_bound", "kl_per_step"]


class Bound(NamedTuple):
    """Batch-averaged parts of the bound, in nats per image.

    Attributes:
      loss: scalar, recon + kl (what the paper reports as the NLL bound).
      recon: scalar, L^x.
      kl: scalar, L^z summed over steps.
      kl_per_step: [T], KL of each step.
      per_example: [b], the bound of each image (for evaluation over a split).
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
    """
    recon = bernoulli_nll(outputs.logits, x)  # [b]
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
