"""The attention math of the paper's section 3.2, pinned as properties."""

from __future__ import annotations

import dataclasses

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
    window_from_params = staticmethod(
        jax.jit(_attention.window_from_params, static_argnames=("n", "height", "width"))
    )
    filterbank = staticmethod(jax.jit(_attention.filterbank, static_argnames=("height", "width")))
    read = staticmethod(jax.jit(_attention.read))
    read_channels_first = staticmethod(jax.jit(_attention.read_channels_first))
    write = staticmethod(jax.jit(_attention.write, static_argnames=("height", "width")))


attention = _JittedAttention()


def random_window(key, b, height, width, n):
    """Windows spread over (and partly outside) the image."""
    params = jax.random.uniform(key, (b, 5), minval=-1.0, maxval=1.0)
    params = params.at[:, 2].multiply(2.0)  # log sigma^2 in [-2, 2]
    return attention.window_from_params(params, n=n, height=height, width=width)


def centred_window(b, height, width, n, log_sigma2=0.0, log_delta=0.0, log_gamma=0.0):
    params = jnp.tile(jnp.array([[0.0, 0.0, log_sigma2, log_delta, log_gamma]]), (b, 1))
    return attention.window_from_params(params, n=n, height=height, width=width)


@pytest.mark.parametrize("height,width", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 5, 12])
def test_filter_rows_sum_to_one(height, width, n):
    # Given random windows, when the filterbank is built, then each filter
    # (row) is a normalised distribution over its image axis (eq. 25-26's Z).
    win = random_window(jax.random.key(n), 16, height, width, n)
    fx, fy = attention.filterbank(win, height=height, width=width)
    assert fx.shape == (16, n, width) and fy.shape == (16, n, height)
    np.testing.assert_allclose(fx.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(fy.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.asarray(fx) >= 0) and np.all(np.asarray(fy) >= 0)


def test_window_entirely_outside_image_stays_finite():
    params = jnp.array([[40.0, -40.0, -3.0, 0.0, 0.0]])
    win = attention.window_from_params(params, n=3, height=28, width=28)
    fx, fy = attention.filterbank(win, height=28, width=28)
    assert np.all(np.isfinite(fx)) and np.all(np.isfinite(fy))


def test_centre_of_unit_params_is_image_centre():
    win = centred_window(1, 20, 33, 4)
    np.testing.assert_allclose(win.gx, (33 - 1) / 2)
    np.testing.assert_allclose(win.gy, (20 - 1) / 2)
    np.testing.assert_allclose(win.delta, (33 - 1) / 3)  # eq. 24 with delta~ = 1
    # g~ = -1 and +1 put the grid centre half a pixel outside the image edges.
    edge = attention.window_from_params(jnp.array([[-1.0, 1.0, 0, 0, 0]]), n=4, height=20, width=33)
    np.testing.assert_allclose(edge.gx, -1.0)
    np.testing.assert_allclose(edge.gy, 20.0)


@pytest.mark.parametrize("height,width", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_grid_is_mirror_symmetric_about_centre(height, width, n):
    # With g~ = 0 the grid is symmetric about the image centre:
    # F[i, a] == F[n-1-i, size-1-a]. A grid shifted by a stride fails this.
    win = centred_window(1, height, width, n, log_sigma2=0.5, log_delta=-0.3)
    fx, fy = attention.filterbank(win, height=height, width=width)
    np.testing.assert_allclose(fx[0], fx[0, ::-1, ::-1], atol=1e-6)
    np.testing.assert_allclose(fy[0], fy[0, ::-1, ::-1], atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_filter_centre_of_mass_is_mu(n):
    # Inside the image and with sigma small against it, the centre of mass of
    # filter i is mu_i = g + (i - (n - 1) / 2) * delta (eq. 19-20).
    height, width = 40, 36
    params = jnp.array([[0.1, -0.15, 0.0, np.log(0.3), 0.0], [-0.2, 0.05, 0.3, np.log(0.2), 0.0]])
    win = attention.window_from_params(params, n=n, height=height, width=width)
    fx, fy = attention.filterbank(win, height=height, width=width)
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
    np.testing.assert_allclose(attention.read(x, win), x, atol=1e-5)
    xc = jax.random.uniform(jax.random.key(1), (3, 28, 28, 3))
    np.testing.assert_allclose(attention.read(xc, win), xc, atol=1e-5)


def test_tiny_sigma_full_grid_write_is_identity():
    w = jax.random.normal(jax.random.key(0), (2, 16, 16))
    win = centred_window(2, 16, 16, 16, log_sigma2=np.log(1e-3))
    np.testing.assert_allclose(attention.write(w, win, height=16, width=16), w, atol=1e-5)


def test_gamma_scales_read_and_divides_write():
    x = jax.random.uniform(jax.random.key(0), (2, 10, 12))
    w1 = centred_window(2, 10, 12, 3)
    w2 = centred_window(2, 10, 12, 3, log_gamma=np.log(2.5))
    np.testing.assert_allclose(attention.read(x, w2), 2.5 * attention.read(x, w1), rtol=1e-5)
    p = jax.random.normal(jax.random.key(1), (2, 3, 3))
    np.testing.assert_allclose(
        attention.write(p, w2, height=10, width=12),
        attention.write(p, w1, height=10, width=12) / 2.5,
        rtol=1e-5,
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
    r = attention.read(x, win)
    wr = attention.write(p, win, height=height, width=width)
    assert r.shape == pshape and wr.shape == xshape
    axes = tuple(range(1, r.ndim))
    lhs = jnp.sum(r * p, axis=axes) / win.gamma
    rhs = win.gamma * jnp.sum(x * wr, axis=axes)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-4)


def test_colour_reads_each_channel_through_the_same_window():
    x = jax.random.uniform(jax.random.key(0), (4, 20, 24, 3))
    win = random_window(jax.random.key(1), 4, 20, 24, 5)
    rc = attention.read(x, win)
    per_channel = jax.vmap(lambda xc: attention.read(xc, win), in_axes=-1, out_axes=-1)(x)
    np.testing.assert_allclose(rc, per_channel, rtol=1e-5, atol=1e-6)


def test_channels_first_read_is_the_same_glimpse():
    # A non-square image, so a swapped height/width cannot pass.
    x = jax.random.uniform(jax.random.key(0), (4, 20, 24, 3))
    win = random_window(jax.random.key(1), 4, 20, 24, 5)
    cf = attention.read_channels_first(jnp.moveaxis(x, -1, 1), win)
    assert cf.shape == (4, 3, 5, 5)
    np.testing.assert_allclose(jnp.moveaxis(cf, 1, -1), attention.read(x, win), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="channels, height, width"):
        attention.read_channels_first(x[..., 0], win)


def test_colour_writes_each_channel_through_the_same_window():
    patch = jax.random.normal(jax.random.key(0), (4, 5, 5, 3))
    win = random_window(jax.random.key(1), 4, 20, 24, 5)
    wc = attention.write(patch, win, height=20, width=24)
    per_channel = jax.vmap(lambda pc: attention.write(pc, win, height=20, width=24), in_axes=-1, out_axes=-1)(
        patch
    )
    assert wc.shape == (4, 20, 24, 3)
    np.testing.assert_allclose(wc, per_channel, rtol=1e-5, atol=1e-6)


def _enable_x64():
    """jax.enable_x64 (newer JAX), or jax.experimental.enable_x64 (the oldest JAX we support)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64

    return enable_x64(True)


def _finite_difference_check(f, params, eps=1e-4):
    with _enable_x64():
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
        win = attention.window_from_params(p, n=3, height=12, width=14)
        return jnp.sum(jnp.sin(attention.read(jnp.asarray(x), win)))

    _finite_difference_check(f, params)


def test_write_gradient_matches_finite_differences():
    patch = np.asarray(jax.random.normal(jax.random.key(0), (2, 4, 4)), np.float64)
    params = jax.random.uniform(jax.random.key(1), (2, 5), minval=-0.5, maxval=0.5)

    def f(p):
        win = attention.window_from_params(p, n=4, height=12, width=14)
        return jnp.sum(jnp.cos(attention.write(jnp.asarray(patch), win, height=12, width=14)))

    _finite_difference_check(f, params)


def test_float32_gradients_finite_for_extreme_windows():
    x = jax.random.uniform(jax.random.key(0), (3, 28, 28))
    params = jnp.array(
        [[30.0, -30.0, -6.0, 2.0, 1.0], [0.0, 0.0, 6.0, -4.0, -1.0], [0.5, 0.5, -8.0, 0.0, 0.0]]
    )

    def f(p):
        win = attention.window_from_params(p, n=5, height=28, width=28)
        return jnp.sum(attention.read(x, win)) + jnp.sum(
            attention.write(jnp.ones((3, 5, 5)), win, height=28, width=28)
        )

    assert np.all(np.isfinite(jax.grad(f)(params)))


def test_jit_and_vmap_agree_with_eager():
    x = jax.random.uniform(jax.random.key(0), (4, 28, 28))
    params = jax.random.uniform(jax.random.key(1), (4, 5), minval=-1, maxval=1)

    def glimpse(p, img):
        return attention.read(img, attention.window_from_params(p, n=5, height=28, width=28))

    with jax.disable_jit():
        eager = glimpse(params, x)
    np.testing.assert_allclose(jax.jit(glimpse)(params, x), eager, rtol=1e-5, atol=1e-6)
    # vmap over an extra leading axis (e.g. ensembles) of the batched function
    stacked = jax.vmap(glimpse)(jnp.stack([params, params]), jnp.stack([x, x]))
    np.testing.assert_allclose(stacked[1], eager, rtol=1e-5, atol=1e-6)


def test_bfloat16_matches_float32():
    x = jax.random.uniform(jax.random.key(0), (4, 28, 28))
    params = jax.random.uniform(jax.random.key(1), (4, 5), minval=-1, maxval=1)
    win32 = attention.window_from_params(params, n=5, height=28, width=28)
    win16 = attention.window_from_params(params.astype(jnp.bfloat16), n=5, height=28, width=28)
    r16 = attention.read(x.astype(jnp.bfloat16), win16)
    assert r16.dtype == jnp.bfloat16
    r32 = attention.read(x, win32)
    np.testing.assert_allclose(np.asarray(r16, np.float32), r32, rtol=0.05, atol=0.02)
    w16 = attention.write(r16, win16, height=28, width=28)
    assert w16.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(w16, np.float32)))


def test_bad_shapes_are_named():
    win = centred_window(2, 28, 28, 5)
    with pytest.raises(ValueError, match="images must be"):
        attention.read(jnp.zeros((28, 28)), win)
    with pytest.raises(ValueError, match=r"patches must be \[batch, 5, 5"):
        attention.write(jnp.zeros((2, 5, 4)), win, height=28, width=28)
    with pytest.raises(ValueError, match=r"must be \[batch, 5\]"):
        attention.window_from_params(jnp.zeros((2, 4)), n=5, height=28, width=28)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        attention.window_from_params(jnp.zeros((2, 5)), n=0, height=28, width=28)


# -- what the popular implementations got wrong, and the API's traps ----------


def paper_filterbank_1_indexed(params: np.ndarray, n: int, height: int, width: int):
    """An independent transcription of the paper's eq. 19-26, 1-indexed as printed.

    g_X = (A + 1) / 2 (g~_X + 1), g_Y = (B + 1) / 2 (g~_Y + 1), delta =
    (max(A, B) - 1) / (N - 1) delta~, mu^i_X = g_X + (i - N/2 - 0.5) delta for
    i = 1..N, F_X[i, a] = exp(-(a - mu^i_X)^2 / (2 sigma^2)) / Z_X for a = 1..A.
    Plain Python loops in float64, nothing shared with ``draw_jax.attention``.
    Returns (fx [b, n, w], fy [b, n, h]) indexed from 0 (entry [i-1, a-1]).
    """
    b = params.shape[0]
    A, B, N = width, height, n
    fx, fy = np.zeros((b, N, A)), np.zeros((b, N, B))
    for k in range(b):
        gx_t, gy_t, log_s2, log_d, _ = (float(v) for v in params[k])
        g_x = (A + 1) / 2 * (gx_t + 1)
        g_y = (B + 1) / 2 * (gy_t + 1)
        sigma2 = np.exp(log_s2)
        delta = (max(A, B) - 1) / (N - 1) * np.exp(log_d)
        for i in range(1, N + 1):
            mu_x = g_x + (i - N / 2 - 0.5) * delta
            mu_y = g_y + (i - N / 2 - 0.5) * delta
            row_x = [np.exp(-((a - mu_x) ** 2) / (2 * sigma2)) for a in range(1, A + 1)]
            row_y = [np.exp(-((bb - mu_y) ** 2) / (2 * sigma2)) for bb in range(1, B + 1)]
            fx[k, i - 1] = np.array(row_x) / sum(row_x)
            fy[k, i - 1] = np.array(row_y) / sum(row_y)
    return fx, fy


@pytest.mark.parametrize("height,width,n", [(28, 28, 5), (20, 33, 3), (33, 20, 2), (60, 60, 12)])
def test_filterbank_equals_the_papers_1_indexed_equations(height, width, n):
    # Given windows over (and partly off) the image, the filterbank equals the
    # paper's equations 19-26 transcribed literally, 1-indexed: the 0-indexed
    # conventions here are the same filters, not a shifted grid.
    # Windows reaching partly off the image, but not so far that the literal
    # 1/Z underflows to 0/0 (where this module's softmax guard takes over).
    u = np.array(jax.random.uniform(jax.random.key(n), (6, 5), minval=-1.0, maxval=1.0))
    params = u * np.array([0.6, 0.6, 1.0, 0.5, 1.0]) + np.array([0.0, 0.0, 1.0, -0.5, 0.0])
    fx, fy = attention.filterbank(
        attention.window_from_params(jnp.asarray(params), n=n, height=height, width=width),
        height=height,
        width=width,
    )
    ref_x, ref_y = paper_filterbank_1_indexed(params, n, height, width)
    np.testing.assert_allclose(fx, ref_x, atol=2e-6)
    np.testing.assert_allclose(fy, ref_y, atol=2e-6)


@pytest.mark.parametrize("sigma2", [0.5, 2.0, 6.0])
def test_each_filter_has_variance_sigma2_inside_the_image(sigma2):
    # A Gaussian filter well inside the image is a discretised N(mu_i, sigma^2):
    # its variance over the pixel axis is sigma^2 (eq. 25). Squaring sigma twice,
    # or the whole exponent, keeps rows normalised, symmetric and centred, but
    # fails this.
    height, width, n = 64, 72, 3
    params = jnp.array([[0.05, -0.04, np.log(sigma2), np.log(0.15), 0.0]])
    win = attention.window_from_params(params, n=n, height=height, width=width)
    fx, fy = attention.filterbank(win, height=height, width=width)
    for f, size in ((fx, width), (fy, height)):
        f = np.asarray(f[0], np.float64)
        a = np.arange(size)
        mean = f @ a
        assert np.all((mean > 6 * np.sqrt(sigma2)) & (mean < size - 6 * np.sqrt(sigma2))), "set-up"
        var = f @ a**2 - mean**2
        # (a sampled Gaussian narrower than ~1 pixel is off by a few 1e-3)
        np.testing.assert_allclose(var, sigma2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int32, jnp.bool_])
def test_integer_images_are_read_in_floating_point(dtype):
    # uint8 is how the project stores MNIST: reading it must give the same
    # glimpse as reading its float32 values, not all zeros.
    x = jax.random.bernoulli(jax.random.key(0), 0.4, (3, 14, 12)).astype(jnp.float32)
    if dtype != jnp.bool_:
        x = x * 200.0
    win = random_window(jax.random.key(1), 3, 14, 12, 4)
    got = attention.read(x.astype(dtype), win)
    assert jnp.issubdtype(got.dtype, jnp.floating)
    want = attention.read(x, win)
    assert float(jnp.abs(want).max()) > 1.0
    np.testing.assert_allclose(got, want, rtol=1e-6)
    patches = jnp.round(10 * jax.random.uniform(jax.random.key(2), (3, 4, 4)))
    np.testing.assert_allclose(
        attention.write(patches.astype(jnp.int32), win, height=14, width=12),
        attention.write(patches, win, height=14, width=12),
        rtol=1e-6,
    )


def test_sizes_are_keyword_only_so_they_cannot_be_swapped():
    params = jnp.zeros((2, 5))
    with pytest.raises(TypeError):
        _attention.window_from_params(params, 28, 28, 5)
    win = _attention.window_from_params(params, n=5, height=20, width=30)
    with pytest.raises(TypeError):
        _attention.filterbank(win, 20, 30)
    with pytest.raises(TypeError):
        _attention.write(jnp.zeros((2, 5, 5)), win, 20, 30)


def test_a_window_carries_its_glimpse_size():
    # read takes n from the window; write refuses a patch of another size.
    win = _attention.window_from_params(jnp.zeros((2, 5)), n=3, height=28, width=28)
    assert win.n == 3
    assert _attention.read(jnp.ones((2, 28, 28)), win).shape == (2, 3, 3)
    with pytest.raises(ValueError, match=r"made for n=3.*\(2, 5, 5\)"):
        _attention.write(jnp.zeros((2, 5, 5)), win, height=28, width=28)
    with pytest.raises(TypeError):
        _attention.read(jnp.ones((2, 28, 28)), win, 5)  # no separate n to disagree with
    # n is static metadata of the pytree: it survives jit, vmap and lax.scan stacking.
    stacked = jax.lax.scan(lambda c, _: (c, win), 0, None, length=4)[1]
    assert stacked.n == 3 and stacked.gx.shape == (4, 2)


@pytest.mark.parametrize("field", ["gx", "gy", "sigma2", "delta", "gamma"])
def test_every_window_field_is_rank_checked(field):
    win = _attention.window_from_params(jnp.zeros((2, 5)), n=3, height=10, width=10)
    bad = dataclasses.replace(win, **{field: getattr(win, field)[:, None]})  # [b, 1]
    for call in (
        lambda: _attention.read(jnp.ones((2, 10, 10)), bad),
        lambda: _attention.write(jnp.ones((2, 3, 3)), bad, height=10, width=10),
        lambda: _attention.filterbank(bad, height=10, width=10),
    ):
        with pytest.raises(ValueError, match=rf"Window\.{field} must be \[batch\], got shape \(2, 1\)"):
            call()
    short = dataclasses.replace(win, **{field: getattr(win, field)[:1]})
    with pytest.raises(ValueError, match="disagree on the batch size"):
        _attention.read(jnp.ones((2, 10, 10)), short)
    with pytest.raises(ValueError, match="batch of 2, the images have 3"):
        _attention.read(jnp.ones((3, 10, 10)), win)


def test_a_window_records_its_image_size_and_refuses_another():
    win = _attention.window_from_params(jnp.zeros((2, 5)), n=3, height=28, width=24)
    assert (win.height, win.width) == (28, 24)
    assert _attention.read(jnp.ones((2, 28, 24)), win).shape == (2, 3, 3)
    for call in (
        lambda: _attention.read(jnp.ones((2, 32, 32)), win),
        lambda: _attention.read(jnp.ones((2, 24, 28)), win),  # height and width swapped
        lambda: _attention.read_channels_first(jnp.ones((2, 1, 32, 32)), win),
        lambda: _attention.write(jnp.ones((2, 3, 3)), win, height=32, width=24),
        lambda: _attention.filterbank(win, height=28, width=28),
    ):
        with pytest.raises(ValueError, match=r"made for 28x24 images"):
            call()
    # The size survives lax.scan stacking; a window made by hand (no size) serves any image.
    stacked = jax.lax.scan(lambda c, _: (c, win), 0, None, length=2)[1]
    assert (stacked.height, stacked.width) == (28, 24)
    any_size = dataclasses.replace(win, height=None, width=None)
    assert _attention.read(jnp.ones((2, 32, 32)), any_size).shape == (2, 3, 3)


def test_nan_window_parameters_give_nan_glimpses_as_documented():
    params = jnp.zeros((2, 5)).at[0, 0].set(jnp.nan)
    win = _attention.window_from_params(params, n=3, height=10, width=10)
    glimpse = _attention.read(jnp.ones((2, 10, 10)), win)
    assert bool(jnp.all(jnp.isnan(glimpse[0]))) and bool(jnp.all(jnp.isfinite(glimpse[1])))
