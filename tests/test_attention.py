"""The attention math of the paper's section 3.2, pinned as properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from draw_jax import attention as _attention

SHAPES = [(28, 28), (20, 33), (33, 20)]


# Op-by-op (eager) dispatch compiles every primitive separately, which is slow
# on CPU; jitting the public functions keeps the suite quick and also runs
# every property under jit.
class _JittedAttention:
    """``draw_jax.attention`` with its public functions under ``jax.jit``."""

    Window = _attention.Window
    window_from_params = staticmethod(jax.jit(_attention.window_from_params, static_argnums=(1, 2, 3)))
    filterbank = staticmethod(jax.jit(_attention.filterbank, static_argnums=(1, 2, 3)))
    read = staticmethod(jax.jit(_attention.read, static_argnums=2))
    write = staticmethod(jax.jit(_attention.write, static_argnums=(2, 3)))


attention = _JittedAttention()


def random_window(key, b, height, width, n):
    """Windows spread over (and partly outside) the image."""
    params = jax.random.uniform(key, (b, 5), minval=-1.0, maxval=1.0)
    params = params.at[:, 2].multiply(2.0)  # log sigma^2 in [-2, 2]
    return attention.window_from_params(params, height, width, n)


def centred_window(b, height, width, n, log_sigma2=0.0, log_delta=0.0, log_gamma=0.0):
    params = jnp.tile(jnp.array([[0.0, 0.0, log_sigma2, log_delta, log_gamma]]), (b, 1))
    return attention.window_from_params(params, height, width, n)


@pytest.mark.parametrize("height,width", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 5, 12])
def test_filter_rows_sum_to_one(height, width, n):
    # Given random windows, when the filterbank is built, then each filter
    # (row) is a normalised distribution over its image axis (eq. 25-26's Z).
    win = random_window(jax.random.key(n), 16, height, width, n)
    fx, fy = attention.filterbank(win, n, height, width)
    assert fx.shape == (16, n, width) and fy.shape == (16, n, height)
    np.testing.assert_allclose(fx.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(fy.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.asarray(fx) >= 0) and np.all(np.asarray(fy) >= 0)


def test_window_entirely_outside_image_stays_finite():
    params = jnp.array([[40.0, -40.0, -3.0, 0.0, 0.0]])
    win = attention.window_from_params(params, 28, 28, 3)
    fx, fy = attention.filterbank(win, 3, 28, 28)
    assert np.all(np.isfinite(fx)) and np.all(np.isfinite(fy))


def test_centre_of_unit_params_is_image_centre():
    win = centred_window(1, 20, 33, 4)
    np.testing.assert_allclose(win.gx, (33 - 1) / 2)
    np.testing.assert_allclose(win.gy, (20 - 1) / 2)
    np.testing.assert_allclose(win.delta, (33 - 1) / 3)  # eq. 24 with delta~ = 1
    # g~ = -1 and +1 put the grid centre half a pixel outside the image edges.
    edge = attention.window_from_params(jnp.array([[-1.0, 1.0, 0, 0, 0]]), 20, 33, 4)
    np.testing.assert_allclose(edge.gx, -1.0)
    np.testing.assert_allclose(edge.gy, 20.0)


@pytest.mark.parametrize("height,width", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_grid_is_mirror_symmetric_about_centre(height, width, n):
    # With g~ = 0 the grid is symmetric about the image centre:
    # F[i, a] == F[n-1-i, size-1-a]. A grid shifted by a stride fails this.
    win = centred_window(1, height, width, n, log_sigma2=0.5, log_delta=-0.3)
    fx, fy = attention.filterbank(win, n, height, width)
    np.testing.assert_allclose(fx[0], fx[0, ::-1, ::-1], atol=1e-6)
    np.testing.assert_allclose(fy[0], fy[0, ::-1, ::-1], atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_filter_centre_of_mass_is_mu(n):
    # Inside the image and with sigma small against it, the centre of mass of
    # filter i is mu_i = g + (i - (n - 1) / 2) * delta (eq. 19-20).
    height, width = 40, 36
    params = jnp.array([[0.1, -0.15, 0.0, np.log(0.3), 0.0], [-0.2, 0.05, 0.3, np.log(0.2), 0.0]])
    win = attention.window_from_params(params, height, width, n)
    fx, fy = attention.filterbank(win, n, height, width)
    offsets = np.arange(n) - (n - 1) / 2
    for f, g, size in ((fx, win.gx, width), (fy, win.gy, height)):
        mu = np.asarray(g)[:, None] + offsets[None] * np.asarray(win.delta)[:, None]
        assert np.all((mu > 4) & (mu < size - 5)), "test set-up: filters must lie inside"
        com = np.einsum("bia,a->bi", np.asarray(f), np.arange(size))
        np.testing.assert_allclose(com, mu, atol=1e-3)


def test_tiny_sigma_full_grid_read_is_identity():
    # n = h = w, delta~ = 1 (stride 1 pixel), g~ = 0, gamma = 1, tiny sigma:
    # every filter is a one-hot at its own pixel, so the glimpse is the image.
    x = jax.random.uniform(jax.random.key(0), (3, 28, 28))
    win = centred_window(3, 28, 28, 28, log_sigma2=np.log(1e-3))
    np.testing.assert_allclose(attention.read(x, win, 28), x, atol=1e-5)
    xc = jax.random.uniform(jax.random.key(1), (3, 28, 28, 3))
    np.testing.assert_allclose(attention.read(xc, win, 28), xc, atol=1e-5)


def test_tiny_sigma_full_grid_write_is_identity():
    w = jax.random.normal(jax.random.key(0), (2, 16, 16))
    win = centred_window(2, 16, 16, 16, log_sigma2=np.log(1e-3))
    np.testing.assert_allclose(attention.write(w, win, 16, 16), w, atol=1e-5)


def test_gamma_scales_read_and_divides_write():
    x = jax.random.uniform(jax.random.key(0), (2, 10, 12))
    w1 = centred_window(2, 10, 12, 3)
    w2 = centred_window(2, 10, 12, 3, log_gamma=np.log(2.5))
    np.testing.assert_allclose(attention.read(x, w2, 3), 2.5 * attention.read(x, w1, 3), rtol=1e-5)
    p = jax.random.normal(jax.random.key(1), (2, 3, 3))
    np.testing.assert_allclose(
        attention.write(p, w2, 10, 12), attention.write(p, w1, 10, 12) / 2.5, rtol=1e-5
    )


@pytest.mark.parametrize(
    "height,width,n,channels",
    [(28, 28, 5, None), (20, 33, 3, None), (33, 20, 1, None), (20, 33, 5, 3), (28, 28, 2, 2)],
)
def test_read_and_write_are_adjoint(height, width, n, channels):
    # <read(x), p> / gamma == gamma * <x, write(p)>: both are Fy x Fx^T's adjoint pair.
    kx, kp, kw = jax.random.split(jax.random.key(height * 100 + width + n), 3)
    b = 6
    xshape = (b, height, width) + ((channels,) if channels else ())
    pshape = (b, n, n) + ((channels,) if channels else ())
    x = jax.random.normal(kx, xshape)
    p = jax.random.normal(kp, pshape)
    win = random_window(kw, b, height, width, n)
    r = attention.read(x, win, n)
    wr = attention.write(p, win, height, width)
    assert r.shape == pshape and wr.shape == xshape
    axes = tuple(range(1, r.ndim))
    lhs = jnp.sum(r * p, axis=axes) / win.gamma
    rhs = win.gamma * jnp.sum(x * wr, axis=axes)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-4)


def test_colour_reads_each_channel_through_the_same_window():
    x = jax.random.uniform(jax.random.key(0), (4, 20, 24, 3))
    win = random_window(jax.random.key(1), 4, 20, 24, 5)
    rc = attention.read(x, win, 5)
    per_channel = jax.vmap(lambda xc: attention.read(xc, win, 5), in_axes=-1, out_axes=-1)(x)
    np.testing.assert_allclose(rc, per_channel, rtol=1e-5, atol=1e-6)


def _finite_difference_check(f, params, eps=1e-4):
    with jax.enable_x64(True):
        f = jax.jit(f)
        params = params.astype(jnp.float64)
        grad = np.asarray(jax.grad(f)(params))
        assert np.all(np.isfinite(grad))
        num = np.zeros_like(grad)
        flat = np.asarray(params).ravel()
        for i in range(flat.size):
            up, down = flat.copy(), flat.copy()
            up[i] += eps
            down[i] -= eps
            num.ravel()[i] = (
                f(jnp.asarray(up).reshape(params.shape)) - f(jnp.asarray(down).reshape(params.shape))
            ) / (2 * eps)
        np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-7)


def test_read_gradient_matches_finite_differences():
    x = np.asarray(jax.random.uniform(jax.random.key(0), (2, 12, 14)), np.float64)
    params = jax.random.uniform(jax.random.key(1), (2, 5), minval=-0.5, maxval=0.5)

    def f(p):
        win = attention.window_from_params(p, 12, 14, 3)
        return jnp.sum(jnp.sin(attention.read(jnp.asarray(x), win, 3)))

    _finite_difference_check(f, params)


def test_write_gradient_matches_finite_differences():
    patch = np.asarray(jax.random.normal(jax.random.key(0), (2, 4, 4)), np.float64)
    params = jax.random.uniform(jax.random.key(1), (2, 5), minval=-0.5, maxval=0.5)

    def f(p):
        win = attention.window_from_params(p, 12, 14, 4)
        return jnp.sum(jnp.cos(attention.write(jnp.asarray(patch), win, 12, 14)))

    _finite_difference_check(f, params)


def test_float32_gradients_finite_for_extreme_windows():
    x = jax.random.uniform(jax.random.key(0), (3, 28, 28))
    params = jnp.array(
        [[30.0, -30.0, -6.0, 2.0, 1.0], [0.0, 0.0, 6.0, -4.0, -1.0], [0.5, 0.5, -8.0, 0.0, 0.0]]
    )

    def f(p):
        win = attention.window_from_params(p, 28, 28, 5)
        return jnp.sum(attention.read(x, win, 5)) + jnp.sum(attention.write(jnp.ones((3, 5, 5)), win, 28, 28))

    assert np.all(np.isfinite(jax.grad(f)(params)))


def test_jit_and_vmap_agree_with_eager():
    x = jax.random.uniform(jax.random.key(0), (4, 28, 28))
    params = jax.random.uniform(jax.random.key(1), (4, 5), minval=-1, maxval=1)

    def glimpse(p, img):
        return attention.read(img, attention.window_from_params(p, 28, 28, 5), 5)

    with jax.disable_jit():
        eager = glimpse(params, x)
    np.testing.assert_allclose(jax.jit(glimpse)(params, x), eager, rtol=1e-5, atol=1e-6)
    # vmap over an extra leading axis (e.g. ensembles) of the batched function
    stacked = jax.vmap(glimpse)(jnp.stack([params, params]), jnp.stack([x, x]))
    np.testing.assert_allclose(stacked[1], eager, rtol=1e-5, atol=1e-6)


def test_bfloat16_matches_float32():
    x = jax.random.uniform(jax.random.key(0), (4, 28, 28))
    params = jax.random.uniform(jax.random.key(1), (4, 5), minval=-1, maxval=1)
    win32 = attention.window_from_params(params, 28, 28, 5)
    win16 = attention.window_from_params(params.astype(jnp.bfloat16), 28, 28, 5)
    r16 = attention.read(x.astype(jnp.bfloat16), win16, 5)
    assert r16.dtype == jnp.bfloat16
    r32 = attention.read(x, win32, 5)
    np.testing.assert_allclose(np.asarray(r16, np.float32), r32, rtol=0.05, atol=0.02)
    w16 = attention.write(r16, win16, 28, 28)
    assert w16.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(w16, np.float32)))


def test_bad_shapes_are_named():
    win = centred_window(2, 28, 28, 5)
    with pytest.raises(ValueError, match="images must be"):
        attention.read(jnp.zeros((28, 28)), win, 5)
    with pytest.raises(ValueError, match="square"):
        attention.write(jnp.zeros((2, 5, 4)), win, 28, 28)
    with pytest.raises(ValueError, match="last axis of 5"):
        attention.window_from_params(jnp.zeros((2, 4)), 28, 28, 5)
    with pytest.raises(ValueError, match="n must be >= 1"):
        attention.window_from_params(jnp.zeros((2, 5)), 28, 28, 0)
