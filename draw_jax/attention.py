"""DRAW's selective attention: Gaussian filterbanks, read (glimpse) and write.

Pure JAX functions, no Flax: ``from draw_jax import attention`` works inside any
JAX model. Equation numbers refer to Gregor et al., "DRAW: A Recurrent Neural
Network For Image Generation", ICML 2015, https://arxiv.org/abs/1502.04623.

Notation (the project's one notation, see ``draw_jax/__init__.py``):
  b = batch, h = image height (the paper's B), w = image width (the paper's A),
  c = channels, n = glimpse size (an n x n grid of filters).

Coordinates are 0-indexed pixel coordinates: pixel ``a`` of a row of width w
has centre ``a`` for ``a = 0 .. w-1``, so the image centre is ``(w - 1) / 2``.
The paper writes its formulas 1-indexed; ``window_from_params`` converts them
so that the normalised centre ``g~ = 0`` lands exactly on the image centre.

A ``Window`` carries its glimpse size ``n`` and the image size it was made
for: ``read`` takes the grid size from the window, ``write`` refuses a patch
of another size, and ``read``, ``write`` and ``filterbank`` refuse an image of
another height or width, so a window can never be used with a grid or an
image it was not made for. Image sizes are keyword-only everywhere
(``height=``, ``width=``), so they cannot be swapped.

NaN window parameters give NaN windows, and a NaN glimpse or canvas: under
``jit`` nothing can stop there, so NaN propagates to the loss (the training
loop stops at the first non-finite metric, naming it).

Example:
  >>> import jax.numpy as jnp
  >>> from draw_jax import attention
  >>> images = jnp.ones((8, 28, 28))
  >>> params = jnp.zeros((8, 5))            # what a linear layer would emit
  >>> win = attention.window_from_params(params, n=5, height=28, width=28)
  >>> attention.read(images, win).shape
  (8, 5, 5)
  >>> attention.write(jnp.ones((8, 5, 5)), win, height=28, width=28).shape
  (8, 28, 28)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

__all__ = [
    "WINDOW_FIELDS",
    "Window",
    "filterbank",
    "read",
    "read_channels_first",
    "tiling_params",
    "window_from_params",
    "write",
]

# The array fields of a window, in the order a linear layer emits their parameters.
WINDOW_FIELDS = ("gx", "gy", "sigma2", "delta", "gamma")


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=list(WINDOW_FIELDS), meta_fields=["n", "height", "width"]
)
@dataclasses.dataclass(frozen=True, eq=False)
class Window:
    """An attention window, one per example, for an n x n grid of filters.

    A pytree: the five arrays are its leaves; ``n`` and the image size are
    static metadata (so windows stack over steps under ``lax.scan``, and
    ``jit`` specialises on them).

    Attributes:
      gx: [b] horizontal centre of the grid, 0-indexed pixels.
      gy: [b] vertical centre of the grid, 0-indexed pixels.
      sigma2: [b] isotropic variance of each Gaussian filter, pixels^2.
      delta: [b] stride between neighbouring filters, pixels.
      gamma: [b] scalar intensity (multiplies a read, divides a write).
      n: the glimpse size this window was made for (an n x n grid).
      height, width: the image size it was made for (``window_from_params``
        records it; ``read``, ``write`` and ``filterbank`` refuse another). None
        for a window made by hand for any size.
    """

    gx: jax.Array
    gy: jax.Array
    sigma2: jax.Array
    delta: jax.Array
    gamma: jax.Array
    n: int
    height: int | None = None
    width: int | None = None


def window_from_params(params: jax.Array, *, n: int, height: int, width: int) -> Window:
    """Maps a linear layer's 5 outputs to an attention window (eq. 21-24).

    Args:
      params: [b, 5] holding (g~x, g~y, log sigma^2, log delta~, log gamma).
      n: glimpse size; the grid is n x n. Stored in the window.
      height: image height h (the paper's B). Stored in the window.
      width: image width w (the paper's A). Stored in the window.

    Returns:
      A ``Window`` of [b] arrays in 0-indexed pixel coordinates:
      ``gx = (w + 1) / 2 * (g~x + 1) - 1`` (eq. 22 shifted to 0-indexing, so
      g~x = 0 is the centre (w - 1) / 2), likewise gy with h;
      ``delta = (max(h, w) - 1) / (n - 1) * delta~`` (eq. 24; for n = 1 the
      single filter sits at g and delta only scales nothing, so the divisor
      is taken as 1); ``sigma2``, ``delta~`` and ``gamma`` through exp (eq. 21).

    Raises:
      ValueError: n or a size is not a positive integer, or params is not [b, 5].
    """
    _check_size("n", n)
    _check_size("height", height)
    _check_size("width", width)
    if params.ndim != 2 or params.shape[-1] != 5:
        raise ValueError(
            "attention params must be [batch, 5] "
            f"(g~x, g~y, log sigma^2, log delta~, log gamma), got shape {params.shape}"
        )
    if not jnp.issubdtype(params.dtype, jnp.floating):
        params = params.astype(jnp.float32)
    gx_, gy_, log_sigma2, log_delta_, log_gamma = jnp.moveaxis(params, -1, 0)
    gx = (width + 1) / 2 * (gx_ + 1) - 1
    gy = (height + 1) / 2 * (gy_ + 1) - 1
    delta = (max(height, width) - 1) / max(n - 1, 1) * jnp.exp(log_delta_)
    return Window(
        gx=gx, gy=gy, sigma2=jnp.exp(log_sigma2), delta=delta, gamma=jnp.exp(log_gamma),
        n=n, height=height, width=width,
    )  # fmt: skip


def _check_size(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_window(
    window: Window, batch: int | None = None, *, height: int | None = None, width: int | None = None
) -> None:
    """Every field [b] with one b (matching ``batch`` if given), n a positive int, and the
    image size (if given) the one the window was made for (if it records one)."""
    if not isinstance(window, Window):
        raise TypeError(f"expected an attention.Window, got {type(window).__name__}")
    _check_size("Window.n", window.n)
    made_for = (window.height, window.width)
    if height is not None and made_for != (None, None) and made_for != (height, width):
        raise ValueError(
            f"the window was made for {window.height}x{window.width} images (height x width), "
            f"it is used on {height}x{width}; make it with window_from_params(..., height={height}, "
            f"width={width})"
        )
    for name in WINDOW_FIELDS:
        shape = jnp.shape(getattr(window, name))
        if len(shape) != 1:
            raise ValueError(f"Window.{name} must be [batch], got shape {shape}")
    lengths = {name: jnp.shape(getattr(window, name))[0] for name in WINDOW_FIELDS}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"Window fields disagree on the batch size: {lengths}")
    if batch is not None and lengths["gx"] != batch:
        raise ValueError(f"the window is for a batch of {lengths['gx']}, the images have {batch}")


def _as_float(x: jax.Array) -> jax.Array:
    """Integer or boolean images (uint8 MNIST) are read in float32; floats keep their dtype."""
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _filters_1d(centre: jax.Array, window: Window, size: int) -> jax.Array:
    """[b] grid centres -> [b, n, size] row-normalised Gaussian filters."""
    dtype = centre.dtype
    # Work in at least float32: exp of a squared distance loses all precision
    # in bfloat16, and these arrays are small (b * n * size).
    work = jnp.promote_types(dtype, jnp.float32)
    centre = centre.astype(work)
    delta = window.delta.astype(work)
    sigma2 = window.sigma2.astype(work)
    n = window.n
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


def filterbank(window: Window, *, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """Horizontal and vertical filterbank matrices of a window (eq. 19-26).

    Filter i (i = 0 .. n-1) is centred at ``mu_i = g + (i - (n - 1) / 2) * delta``,
    so the grid is symmetric about g, and ``F[i, a] ∝ exp(-(a - mu_i)^2 / (2 sigma2))``
    with each row normalised to sum to 1 over the image axis.

    Args:
      window: a ``Window`` of [b] arrays; its ``n`` sets the number of filters.
      height: image height h.
      width: image width w.

    Returns:
      (fx, fy): fx is [b, n, w], fy is [b, n, h], in the window's dtype.

    Raises:
      ValueError: a window field is not [b], the fields disagree on b, or the
        window was made for another image size.
    """
    _check_size("height", height)
    _check_size("width", width)
    _check_window(window, height=height, width=width)
    gx = _as_float(jnp.asarray(window.gx))
    gy = _as_float(jnp.asarray(window.gy))
    return _filters_1d(gx, window, width), _filters_1d(gy, window, height)


def _check_images(images: jax.Array, name: str) -> None:
    if images.ndim not in (3, 4):
        raise ValueError(
            f"{name} must be [batch, height, width] or [batch, height, width, channels], "
            f"got shape {images.shape}"
        )


def read(images: jax.Array, window: Window) -> jax.Array:
    """Extracts an n x n glimpse: ``gamma * Fy · x · Fx^T`` (eq. 27), n = ``window.n``.

    Every channel is read through the same window, as the paper does for colour.
    Integer (e.g. uint8) or boolean images are read in float32 with their
    values unchanged (uint8 0..255 gives a glimpse on the 0..255 scale);
    floating images keep their dtype (bfloat16 in, bfloat16 out).

    Args:
      images: [b, h, w] or [b, h, w, c].
      window: a ``Window`` of [b] arrays.

    Returns:
      [b, n, n] or [b, n, n, c] floating: glimpse rows follow Fy, columns follow Fx.

    Raises:
      ValueError: images are not rank 3 or 4, a window field is not [b], or
        the window's batch or image size differs from the images'.
    """
    _check_images(images, "images")
    height, width = images.shape[1], images.shape[2]
    _check_window(window, images.shape[0], height=height, width=width)
    images = _as_float(images)
    fx, fy = filterbank(window, height=height, width=width)
    fx, fy = fx.astype(images.dtype), fy.astype(images.dtype)
    gamma = window.gamma.astype(images.dtype)
    if images.ndim == 3:
        tmp = jnp.einsum("bhw,bmw->bhm", images, fx)
        glimpse = jnp.einsum("bnh,bhm->bnm", fy, tmp)
        return gamma[:, None, None] * glimpse
    tmp = jnp.einsum("bhwc,bmw->bhmc", images, fx)
    glimpse = jnp.einsum("bnh,bhmc->bnmc", fy, tmp)
    return gamma[:, None, None, None] * glimpse


def read_channels_first(images: jax.Array, window: Window) -> jax.Array:
    """``read`` for images laid out [b, c, h, w]: returns [b, c, n, n].

    The same glimpse as ``read`` on [b, h, w, c] (moved axes), for callers that
    stack several images on a leading axis: both contractions are then plain
    batched matmuls over a contiguous [c h, w] block, with no transposing copy.
    DRAW reads x and x_hat this way (stacked as [b, 2c, h, w]), 0.96x the
    train step's time of a channels-last read of their concatenation.

    Raises:
      ValueError: images are not rank 4, a window field is not [b], or the
        window's batch differs from the images'.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [batch, channels, height, width], got shape {images.shape}")
    height, width = images.shape[2], images.shape[3]
    _check_window(window, images.shape[0], height=height, width=width)
    images = _as_float(images)
    fx, fy = filterbank(window, height=height, width=width)
    fx, fy = fx.astype(images.dtype), fy.astype(images.dtype)
    tmp = jnp.einsum("bchw,bmw->bchm", images, fx)
    glimpse = jnp.einsum("bnh,bchm->bcnm", fy, tmp)
    return window.gamma.astype(images.dtype)[:, None, None, None] * glimpse


def write(patches: jax.Array, window: Window, *, height: int, width: int) -> jax.Array:
    """Places an n x n patch on an h x w canvas: ``(1 / gamma) * Fy^T · p · Fx`` (eq. 29).

    The adjoint of ``read`` up to gamma: ``<read(x), p> / gamma == gamma * <x, write(p)>``.
    Integer patches are written in float32; floating patches keep their dtype.

    Args:
      patches: [b, n, n] or [b, n, n, c], n = ``window.n``.
      window: a ``Window`` of [b] arrays.
      height: canvas height h.
      width: canvas width w.

    Returns:
      [b, h, w] or [b, h, w, c] floating.

    Raises:
      ValueError: patches are not [b, n, n(, c)] for the window's n and batch,
        a window field is not [b], or the window was made for another canvas size.
    """
    _check_images(patches, "patches")
    _check_size("height", height)
    _check_size("width", width)
    _check_window(window, patches.shape[0], height=height, width=width)
    n = window.n
    if patches.shape[1:3] != (n, n):
        raise ValueError(
            f"patches must be [batch, {n}, {n}(, channels)] for a window made for n={n}, "
            f"got shape {patches.shape}"
        )
    patches = _as_float(patches)
    fx, fy = filterbank(window, height=height, width=width)
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


def tiling_params(*, n: int, height: int, width: int, unit_write_gain: bool = False) -> jax.Array:
    """[5] window parameters (as ``window_from_params`` takes them) whose n x n grid tiles the whole image.

    A good initial bias for a layer that emits window parameters (DRAW's read
    and write, the cluttered-MNIST classifier's glimpse): the stride is max(h, w) / n
    (filters at the centres of n equal cells) and sigma half a stride. With
    zero biases instead, a 2 x 2 read grid starts on the image corners with
    sigma = 1 pixel; on MNIST it then reads blank pixels, the KL collapses to 0
    and attention gets no gradient (see BUILD_NOTES.md).

    gamma is 1 for a read. For a write (``unit_write_gain``), gamma starts at
    1 / (2 pi sigma^2): normalised filters spread a patch value over about
    2 pi sigma^2 pixels, and eq. 29 divides by gamma, so a unit patch value
    then changes the canvas by about one logit at its centre rather than by
    1 / (2 pi sigma^2) (which left the canvas almost still for hundreds of steps).
    """
    size = max(height, width)
    stride = size / n
    delta_tilde = stride * max(n - 1, 1) / (size - 1)  # inverts eq. 24
    sigma2 = (stride / 2) ** 2
    log_gamma = -float(jnp.log(2 * jnp.pi * sigma2)) if unit_write_gain else 0.0
    return jnp.array([0.0, 0.0, jnp.log(sigma2), jnp.log(delta_tilde), log_gamma], jnp.float32)
