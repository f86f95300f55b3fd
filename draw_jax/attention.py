"""DRAW's selective attention: Gaussian filterbanks, read (glimpse) and write.

Pure JAX functions, no Flax: ``from draw_jax import attention`` works inside any
JAX model. Equation numbers refer to Gregor et al., "DRAW: A Recurrent Neural
Network For Image Generation", ICML 2015, https://arxiv.org/abs/1502.04623.

Notation (shapes in docstrings use these letters):
  b = batch, h = image height (the paper's B), w = image width (the paper's A),
  n = glimpse size (an n x n grid of filters), c = channels.

Coordinates are 0-indexed pixel coordinates: pixel ``a`` of a row of width w
has centre ``a`` for ``a = 0 .. w-1``, so the image centre is ``(w - 1) / 2``.
The paper writes its formulas 1-indexed; ``window_from_params`` converts them
so that the normalised centre ``g~ = 0`` lands exactly on the image centre.

Example:
  >>> import jax.numpy as jnp
  >>> from draw_jax import attention
  >>> images = jnp.ones((8, 28, 28))
  >>> params = jnp.zeros((8, 5))            # what a linear layer would emit
  >>> win = attention.window_from_params(params, height=28, width=28, n=5)
  >>> attention.read(images, win, n=5).shape
  (8, 5, 5)
  >>> attention.write(jnp.ones((8, 5, 5)), win, height=28, width=28).shape
  (8, 28, 28)
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

__all__ = ["Window", "filterbank", "read", "window_from_params", "write"]


class Window(NamedTuple):
    """An attention window, one per example.

    Attributes:
      gx: [b] horizontal centre of the grid, 0-indexed pixels.
      gy: [b] vertical centre of the grid, 0-indexed pixels.
      sigma2: [b] isotropic variance of each Gaussian filter, pixels^2.
      delta: [b] stride between neighbouring filters, pixels.
      gamma: [b] scalar intensity (multiplies a read, divides a write).
    """

    gx: jax.Array
    gy: jax.Array
    sigma2: jax.Array
    delta: jax.Array
    gamma: jax.Array


def window_from_params(params: jax.Array, height: int, width: int, n: int) -> Window:
    """Maps a linear layer's 5 outputs to an attention window (eq. 21-24).

    Args:
      params: [b, 5] holding (g~x, g~y, log sigma^2, log delta~, log gamma).
      height: image height h (the paper's B).
      width: image width w (the paper's A).
      n: glimpse size; the grid is n x n.

    Returns:
      A ``Window`` of [b] arrays in 0-indexed pixel coordinates:
      ``gx = (w + 1) / 2 * (g~x + 1) - 1`` (eq. 22 shifted to 0-indexing, so
      g~x = 0 is the centre (w - 1) / 2), likewise gy with h;
      ``delta = (max(h, w) - 1) / (n - 1) * delta~`` (eq. 24; for n = 1 the
      single filter sits at g and delta only scales nothing, so the divisor
      is taken as 1); ``sigma2``, ``delta~`` and ``gamma`` through exp (eq. 21).
    """
    if n < 1:
        raise ValueError(f"glimpse size n must be >= 1, got n={n}")
    if params.shape[-1] != 5:
        raise ValueError(
            f"attention params must have a last axis of 5 "
            f"(g~x, g~y, log sigma^2, log delta~, log gamma), got shape {params.shape}"
        )
    gx_, gy_, log_sigma2, log_delta_, log_gamma = jnp.moveaxis(params, -1, 0)
    gx = (width + 1) / 2 * (gx_ + 1) - 1
    gy = (height + 1) / 2 * (gy_ + 1) - 1
    delta = (max(height, width) - 1) / max(n - 1, 1) * jnp.exp(log_delta_)
    return Window(gx=gx, gy=gy, sigma2=jnp.exp(log_sigma2), delta=delta, gamma=jnp.exp(log_gamma))


def _filters_1d(centre: jax.Array, window: Window, n: int, size: int) -> jax.Array:
    """[b] grid centres -> [b, n, size] row-normalised Gaussian filters."""
    dtype = centre.dtype
    # Work in at least float32: exp of a squared distance loses all precision
    # in bfloat16, and these arrays are small (b * n * size).
    work = jnp.promote_types(dtype, jnp.float32)
    centre = centre.astype(work)
    delta = window.delta.astype(work)
    sigma2 = window.sigma2.astype(work)
    offsets = jnp.arange(n, dtype=work) - (n - 1) / 2  # symmetric about g
    mu = centre[:, None] + offsets[None, :] * delta[:, None]  # eq. 19-20, [b, n]
    pixels = jnp.arange(size, dtype=work)
    d2 = jnp.square(pixels[None, None, :] - mu[:, :, None])  # [b, n, size]
    # eq. 25-26: exp(-d2 / 2 sigma2) / Z is a softmax over the image axis. The
    # softmax's max-subtraction is the guard against Z = 0: a filter far
    # outside the image (every exp() underflowing) still sums to 1, with its
    # mass on the nearest edge pixel, exactly the limit of the exact formula.
    f = jax.nn.softmax(-d2 / (2 * sigma2[:, None, None]), axis=-1)
    return f.astype(dtype)


def filterbank(window: Window, n: int, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """Horizontal and vertical filterbank matrices of a window (eq. 19-26).

    Filter i (i = 0 .. n-1) is centred at ``mu_i = g + (i - (n - 1) / 2) * delta``,
    so the grid is symmetric about g, and ``F[i, a] ∝ exp(-(a - mu_i)^2 / (2 sigma2))``
    with each row normalised to sum to 1 over the image axis.

    Args:
      window: a ``Window`` of [b] arrays.
      n: glimpse size.
      height: image height h.
      width: image width w.

    Returns:
      (fx, fy): fx is [b, n, w], fy is [b, n, h], in the window's dtype.
    """
    chex.assert_rank([window.gx, window.gy, window.sigma2, window.delta], 1)
    fx = _filters_1d(window.gx, window, n, width)
    fy = _filters_1d(window.gy, window, n, height)
    return fx, fy


def _check_images(images: jax.Array, name: str) -> None:
    if images.ndim not in (3, 4):
        raise ValueError(
            f"{name} must be [batch, height, width] or [batch, height, width, channels], "
            f"got shape {images.shape}"
        )


def read(images: jax.Array, window: Window, n: int) -> jax.Array:
    """Extracts an n x n glimpse: ``gamma * Fy · x · Fx^T`` (eq. 27).

    Every channel is read through the same window, as the paper does for colour.

    Args:
      images: [b, h, w] or [b, h, w, c].
      window: a ``Window`` of [b] arrays.
      n: glimpse size.

    Returns:
      [b, n, n] or [b, n, n, c]: glimpse rows follow Fy, columns follow Fx.
    """
    _check_images(images, "images")
    height, width = images.shape[1], images.shape[2]
    fx, fy = filterbank(window, n, height, width)
    fx, fy = fx.astype(images.dtype), fy.astype(images.dtype)
    gamma = window.gamma.astype(images.dtype)
    if images.ndim == 3:
        tmp = jnp.einsum("bhw,bmw->bhm", images, fx)
        glimpse = jnp.einsum("bnh,bhm->bnm", fy, tmp)
        return gamma[:, None, None] * glimpse
    tmp = jnp.einsum("bhwc,bmw->bhmc", images, fx)
    glimpse = jnp.einsum("bnh,bhmc->bnmc", fy, tmp)
    return gamma[:, None, None, None] * glimpse


def write(patches: jax.Array, window: Window, height: int, width: int) -> jax.Array:
    """Places an n x n patch on an h x w canvas: ``(1 / gamma) * Fy^T · w · Fx`` (eq. 29).

    The adjoint of ``read`` up to gamma: ``<read(x), p> / gamma == gamma * <x, write(p)>``.

    Args:
      patches: [b, n, n] or [b, n, n, c].
      window: a ``Window`` of [b] arrays.
      height: canvas height h.
      width: canvas width w.

    Returns:
      [b, h, w] or [b, h, w, c].
    """
    _check_images(patches, "patches")
    n = patches.shape[1]
    if patches.shape[2] != n:
        raise ValueError(f"patches must be square [batch, n, n(, c)], got shape {patches.shape}")
    fx, fy = filterbank(window, n, height, width)
    fx, fy = fx.astype(patches.dtype), fy.astype(patches.dtype)
    # 1/gamma scales the n x n patch, not the h x w result (same product, and
    # its gradient then reduces over n^2 values rather than h * w).
    inv_gamma = (1.0 / window.gamma).astype(patches.dtype)
    if patches.ndim == 3:
        return _write_channels_first(patches[:, None] * inv_gamma[:, None, None, None], fx, fy)[:, 0]
    # Channels next to the batch axis: the two contractions are then plain
    # batched matmuls with no transposes (a free reshape when c == 1).
    channels_first = jnp.moveaxis(patches, -1, 1) * inv_gamma[:, None, None, None]
    return jnp.moveaxis(_write_channels_first(channels_first, fx, fy), 1, -1)


def _write_channels_first(patches: jax.Array, fx: jax.Array, fy: jax.Array) -> jax.Array:
    """[b, c, n, n] patches, fx [b, n, w], fy [b, n, h] -> [b, c, h, w] = Fy^T · p · Fx."""
    tmp = jnp.einsum("bcnm,bmw->bcnw", patches, fx)
    return jnp.einsum("bnh,bcnw->bchw", fy, tmp)
