"""The DRAW module: the paper's step equations, scanned; shapes; and learning on real data."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from draw_jax import DRAW, DrawConfig, DrawOutputs, attention, draw_bound, train_step
from draw_jax.config import OptimConfig

SMALL = DrawConfig(height=12, width=10, T=5, enc_size=16, dec_size=16, z_size=3, read_n=3, write_n=4)


def batch(cfg: DrawConfig, b: int = 3, seed: int = 0) -> jax.Array:
    shape = (b, *cfg.image_shape)
    return jax.random.bernoulli(jax.random.key(seed), 0.3, shape).astype(jnp.float32)


def python_loop(model: DRAW, x: jax.Array, key: jax.Array) -> DrawOutputs:
    """The oracle for DRAW.__call__: DRAW.step T times in a Python loop, nothing saved or recomputed."""
    eps, carry, steps = model.noise(key, x.shape[0]), model.initial_carry(x.shape[0]), []
    for t in range(model.config.T):
        carry, out = model.step(carry, x, eps[t])
        steps.append(out)
    canvas, mu, logsigma, read_win, write_win = jax.tree.map(lambda *a: jnp.stack(a), *steps)
    log_scale = model.log_scale[...] if model.config.likelihood == "discretized_logistic" else None
    return DrawOutputs(carry[0], canvas, mu, logsigma, read_win, write_win, log_scale)


VARIANTS = {
    "attention": SMALL,
    "no_attention": dataclasses.replace(SMALL, read_attention=False, write_attention=False),
    "read_only": dataclasses.replace(SMALL, write_attention=False),
    "colour": dataclasses.replace(SMALL, channels=3),
    "peepholes": dataclasses.replace(SMALL, peepholes=True),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_scan_equals_python_unrolled_loop(name):
    # Given the same parameters and noise, the lax.scan loop and a Python loop
    # over DRAW.step give the same outputs, the same bound and the same
    # gradients (the scan's backward pass recomputes most of each step from
    # the saved gate pre-activations; the Python loop keeps everything).
    cfg = VARIANTS[name]
    graphdef, params = train_step.init_model(cfg, seed=1)
    x = batch(cfg)

    def loss(params, key, unrolled):
        model = train_step.apply_model(graphdef, params)
        out = python_loop(model, x, key) if unrolled else model(x, key)
        return draw_bound(out, x).loss, out

    @jax.jit
    def run(params, key):
        (loss_s, scanned), grad_s = jax.value_and_grad(loss, has_aux=True)(params, key, False)
        (loss_u, unrolled), grad_u = jax.value_and_grad(loss, has_aux=True)(params, key, True)
        return scanned, unrolled, loss_s, loss_u, grad_s, grad_u

    scanned, unrolled, loss_s, loss_u, grad_s, grad_u = run(params, jax.random.key(3))
    for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(unrolled), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    assert any(float(jnp.abs(g).max()) > 1e-3 for g in jax.tree.leaves(grad_s))
    for a, b in zip(jax.tree.leaves(grad_s), jax.tree.leaves(grad_u), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _count_eqns(jaxpr) -> int:
    """Equations of a jaxpr and of every jaxpr nested in its equations' parameters."""
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    total += _count_eqns(inner)
    return total


def _loss_jaxpr(cfg: DrawConfig):
    graphdef, params = train_step.init_model(cfg, seed=0)
    x = batch(cfg, b=2)

    def loss(params, key):
        return draw_bound(train_step.apply_model(graphdef, params)(x, key), x).loss

    return jax.make_jaxpr(jax.value_and_grad(loss))(params, jax.random.key(0)).jaxpr


def test_traced_program_does_not_grow_with_T():
    # The loop is one scan of length T (forward, and one for the backward pass),
    # so the program for T=64 has exactly as many equations as for T=8.
    jaxprs = {T: _loss_jaxpr(dataclasses.replace(SMALL, T=T)) for T in (8, 64)}
    for T, jaxpr in jaxprs.items():
        scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
        assert scans, "the T-step loop must be a lax.scan"
        assert all(e.params["length"] == T for e in scans)
    assert _count_eqns(jaxprs[8]) == _count_eqns(jaxprs[64])


def test_shapes_of_every_variant_and_generate():
    for name, cfg in VARIANTS.items():
        model = DRAW(cfg, rngs=nnx.Rngs(0))
        x = batch(cfg, b=2)
        out = jax.jit(lambda x, k: model(x, k))(x, jax.random.key(0))
        T, h, w, c, z = cfg.T, cfg.height, cfg.width, cfg.channels, cfg.z_size
        assert out.logits.shape == (2, h, w, c), name
        assert out.canvases.shape == (T, 2, h, w, c), name
        assert out.mu.shape == out.logsigma.shape == (T, 2, z), name
        assert (out.read_window is None) == (not cfg.read_attention), name
        assert (out.write_window is None) == (not cfg.write_attention), name
        for win in (out.read_window, out.write_window):
            if win is not None:
                assert all(a.shape == (T, 2) for a in jax.tree.leaves(win)), name
        np.testing.assert_allclose(out.canvases[-1], out.logits)
        gen = jax.jit(lambda k: model.generate(k, 4))(jax.random.key(1))
        assert gen.canvases.shape == (T, 4, h, w, c), name
        assert (gen.write_window is None) == (not cfg.write_attention), name
        assert np.all(np.isfinite(gen.canvases))


def test_wrong_image_shape_is_named():
    model = DRAW(SMALL, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[batch, 12, 10, 1\].*got \(2, 28, 28, 1\)"):
        model(jnp.zeros((2, 28, 28, 1)), jax.random.key(0))


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="read_n"):
        DrawConfig(read_n=0)
    with pytest.raises(ValueError, match="z_size"):
        DrawConfig(z_size=-3)
    with pytest.raises(ValueError, match="compute_dtype"):
        DrawConfig(compute_dtype="float16")


def test_initial_states_are_learned_parameters():
    # c_0, h^enc_0, h^dec_0 are parameters with non-zero gradients, not fixed zeros.
    graphdef, params = train_step.init_model(SMALL, seed=0)
    x = batch(SMALL)

    def loss(params):
        return draw_bound(train_step.apply_model(graphdef, params)(x, jax.random.key(0)), x).loss

    grads = jax.jit(jax.grad(loss))(params)
    for name in ("canvas0", "h_enc0", "cell_enc0", "h_dec0", "cell_dec0"):
        assert name in grads
        assert float(jnp.abs(grads[name]).max()) > 0, name


def test_generation_uses_decoder_and_canvas_only():
    # generate() starts from the learned c_0: with T steps of zero writes it
    # would return c_0; perturbing c_0 shifts every sample's canvas by the same.
    graphdef, params = train_step.init_model(SMALL, seed=0)
    shifted = jax.tree.map(lambda a: a, params)
    shifted["canvas0"] = params["canvas0"] + 1.5

    @jax.jit
    def gen(p):
        return train_step.apply_model(graphdef, p).generate(jax.random.key(0), 2).canvases

    np.testing.assert_allclose(gen(shifted), gen(params) + 1.5, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decoding_the_posteriors_draws_redraws_the_reconstruction(name):
    # Generation (sec. 2.3) runs the decoder and write alone; fed the z_t = mu + sigma * eps that
    # the encoder drew, it must retrace the reconstruction's canvases and write windows step by step.
    cfg = VARIANTS[name]
    model = DRAW(cfg, rngs=nnx.Rngs(0))
    x = batch(cfg, b=3)
    eps = model.noise(jax.random.key(4), 3)
    out = model(x, eps=eps)
    z = out.mu + jnp.exp(out.logsigma) * eps
    redrawn = jax.jit(model.decode)(z)
    np.testing.assert_allclose(redrawn.canvases, out.canvases, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(redrawn.write_window), jax.tree.leaves(out.write_window), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # other latents draw another picture
    assert float(jnp.abs(model.decode(z + 1.0).canvases[-1] - out.logits).max()) > 1e-3


def test_decode_names_latents_of_the_wrong_shape():
    model = DRAW(SMALL, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[T=5, batch, z=3\], got \(4, 2, 3\)"):
        model.decode(jnp.zeros((4, 2, 3)))


def test_sampling_temperature_scales_the_prior_draws():
    # z_t ~ N(0, temperature^2 I): 1 is the prior, 0 one image whatever the key, and
    # near 0 the samples move linearly in the temperature (z is scaled by it, not by its square).
    model = DRAW(SMALL, rngs=nnx.Rngs(0))
    gen = jax.jit(lambda k, t: model.generate(k, 3, t).canvases)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    np.testing.assert_array_equal(gen(k1, 1.0), jax.jit(lambda k: model.generate(k, 3).canvases)(k1))
    zero = gen(k1, 0.0)
    np.testing.assert_array_equal(zero, gen(k2, 0.0))
    np.testing.assert_array_equal(zero, jnp.broadcast_to(zero[:, :1], zero.shape))
    small, double = gen(k1, 1e-3) - zero, gen(k1, 2e-3) - zero
    assert float(jnp.abs(small).max()) > 1e-5
    np.testing.assert_allclose(double, 2 * small, rtol=0.02, atol=1e-6)
    with pytest.raises(ValueError, match=r"temperature must be >= 0, got -0\.5"):
        model.generate(k1, 3, -0.5)


def test_initial_window_tiles_the_image():
    # The window layers start (bias) on a grid tiling the image evenly: centred,
    # stride max(h, w) / n, first filter half a stride in from the edge.
    for n in (2, 5):
        p = np.asarray(__import__("draw_jax").attention.tiling_params(n=n, height=28, width=28))
        win = attention.window_from_params(jnp.asarray(p)[None], n=n, height=28, width=28)
        np.testing.assert_allclose(win.gx, 13.5, atol=1e-5)
        np.testing.assert_allclose(win.delta, 28 / n, rtol=1e-5)
        first = win.gx - (n - 1) / 2 * win.delta
        np.testing.assert_allclose(first, 28 / n / 2 - 0.5, atol=1e-4)


@pytest.mark.parametrize("attention_on", [False, True])
def test_small_model_overfits_real_binarized_mnist(binarized_train, attention_on):
    # A T=8 model trained on 256 real binarized-MNIST images drives its bound far
    # below where it starts and below what the learned mean image alone gives.
    cfg = DrawConfig(
        T=8,
        enc_size=128,
        dec_size=128,
        z_size=10,
        read_n=5,
        write_n=7,
        read_attention=attention_on,
        write_attention=attention_on,
    )
    images = binarized_train.images[:256]
    graphdef, params = train_step.init_model(cfg, seed=0)
    opt = train_step.make_optimizer(
        OptimConfig(learning_rate=3e-3, adam_b1=0.9, lr_schedule="constant", warmup_steps=0)
    )
    state = train_step.create_train_state(params, opt)
    step = train_step.make_train_step(graphdef, opt, binary=True, binarize="none")
    bounds = []
    for i in range(300):
        state, m = step(state, images[(i % 4) * 64 : (i % 4 + 1) * 64], jax.random.key(i))
        bounds.append(float(m["bound"]))
    # The Bernoulli entropy of the per-pixel mean of these images: the best a
    # model that ignores its latents can do (about 206 nats on MNIST).
    p = np.clip(images.reshape(256, -1).mean(0), 1e-6, 1 - 1e-6)
    mean_image_nll = float(-(p * np.log(p) + (1 - p) * np.log1p(-p)).sum())
    final = float(np.mean(bounds[-20:]))
    assert np.all(np.isfinite(bounds))
    assert final < bounds[0] - 250
    limit = 0.6 * mean_image_nll if not attention_on else 0.9 * mean_image_nll
    assert final < limit, (final, mean_image_nll)


# -- the module against the paper's equations, written out independently ------


def _paper_filters(p, n, height, width):
    """Eq. 19-26 as printed, 1-indexed, vectorised: p [b, 5] -> Fx [b, n, A], Fy [b, n, B]."""
    A, B = width, height
    g_x = (A + 1) / 2 * (p[:, 0] + 1)
    g_y = (B + 1) / 2 * (p[:, 1] + 1)
    sigma2 = jnp.exp(p[:, 2])
    delta = (max(A, B) - 1) / max(n - 1, 1) * jnp.exp(p[:, 3])
    i = jnp.arange(1, n + 1)
    mu_x = g_x[:, None] + (i - n / 2 - 0.5)[None] * delta[:, None]
    mu_y = g_y[:, None] + (i - n / 2 - 0.5)[None] * delta[:, None]
    fx = jnp.exp(-((jnp.arange(1, A + 1)[None, None] - mu_x[..., None]) ** 2) / (2 * sigma2[:, None, None]))
    fy = jnp.exp(-((jnp.arange(1, B + 1)[None, None] - mu_y[..., None]) ** 2) / (2 * sigma2[:, None, None]))
    return fx / fx.sum(-1, keepdims=True), fy / fy.sum(-1, keepdims=True), jnp.exp(p[:, 4])


def paper_forward(params, cfg: DrawConfig, x, eps):
    """DRAW's eq. 3-8 written from the paper with the module's parameters, single channel.

    x [b, h, w, 1], eps [T, b, z] -> (canvases [T, b, h, w, 1], mu, logsigma [T, b, z]).
    """
    sig = jax.nn.sigmoid
    b, h, w = x.shape[0], cfg.height, cfg.width
    X = x[..., 0]

    def linear(layer, v):
        p = params[layer]
        return v @ p["kernel"] + p["bias"]

    def lstm(cell, inp, state):  # gates i, f, g, o from one affine map of [input, h]
        hid, c = state
        gates, p = params[cell]["gates"], params[cell]
        i, f, g, o = jnp.split(jnp.concatenate([inp, hid], -1) @ gates["kernel"] + gates["bias"], 4, -1)
        if cfg.peepholes:  # Gers & Schmidhuber 2000: i and f see c_{t-1}, o sees c_t
            i, f = i + p["cell_to_in"] * c, f + p["cell_to_forget"] * c
        c = sig(f) * c + sig(i) * jnp.tanh(g)
        if cfg.peepholes:
            o = o + p["cell_to_out"] * c
        return sig(o) * jnp.tanh(c), c

    canvas = jnp.broadcast_to(params["canvas0"][..., 0], (b, h, w))
    enc = tuple(jnp.broadcast_to(params[k], (b, cfg.enc_size)) for k in ("h_enc0", "cell_enc0"))
    dec = tuple(jnp.broadcast_to(params[k], (b, cfg.dec_size)) for k in ("h_dec0", "cell_dec0"))
    canvases, mus, logsigmas = [], [], []
    for t in range(cfg.T):
        h_dec_prev = dec[0]
        x_hat = X - sig(canvas)  # (3)
        if cfg.read_attention:  # (4) with eq. 27, the window from h^dec_{t-1}
            fx, fy, gamma = _paper_filters(linear("read_window", h_dec_prev), cfg.read_n, h, w)
            glimpse = lambda img: (gamma[:, None, None] * fy @ img @ fx.transpose(0, 2, 1)).reshape(b, -1)  # noqa: E731
            r = jnp.concatenate([glimpse(X), glimpse(x_hat)], -1)
        else:  # (4) with eq. 17
            r = jnp.concatenate([X.reshape(b, -1), x_hat.reshape(b, -1)], -1)
        enc = lstm("encoder", jnp.concatenate([r, h_dec_prev], -1), enc)  # (5)
        mu, logsigma = linear("to_mu", enc[0]), linear("to_logsigma", enc[0])
        z = mu + jnp.exp(logsigma) * eps[t]  # (6)
        dec = lstm("decoder", z, dec)  # (7)
        patch = linear("write_patch", dec[0])
        if cfg.write_attention:  # (8) with eq. 28-29, the window from h^dec_t
            fx, fy, gamma = _paper_filters(linear("write_window", dec[0]), cfg.write_n, h, w)
            p = patch.reshape(b, cfg.write_n, cfg.write_n)
            canvas = canvas + (fy.transpose(0, 2, 1) @ p @ fx) / gamma[:, None, None]
        else:  # (8) with eq. 18
            canvas = canvas + patch.reshape(b, h, w)
        canvases.append(canvas[..., None])
        mus.append(mu)
        logsigmas.append(logsigma)
    return jnp.stack(canvases), jnp.stack(mus), jnp.stack(logsigmas)


@pytest.mark.parametrize("name", ["attention", "no_attention", "read_only", "peepholes"])
def test_module_equals_the_papers_equations_written_out(name):
    # The scanned module and a forward pass written directly from eq. 3-8
    # (own filterbanks from eq. 19-26, own LSTM, own loop) agree step by
    # step: reading with h^dec_t instead of h^dec_{t-1}, writing before the
    # decoder update, or a shifted filter grid would all fail here.
    cfg = VARIANTS[name]
    graphdef, params = train_step.init_model(cfg, seed=2)
    # Spread the windows away from their tiling start so the check sees them move.
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(a.size), a.shape), params)
    x = batch(cfg, b=4)
    eps = jax.random.normal(jax.random.key(9), (cfg.T, 4, cfg.z_size))
    out = jax.jit(lambda p: train_step.apply_model(graphdef, p)(x, eps=eps))(params)
    canvases, mu, logsigma = jax.jit(lambda p: paper_forward(p, cfg, x, eps))(params)
    np.testing.assert_allclose(out.mu, mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.logsigma, logsigma, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.canvases, canvases, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.full((2, 12, 10, 1), 0.5, np.float32).copy(), "NaN"),
        (np.full((2, 12, 10, 1), 200.0, np.float32), r"from 200.0 to 200.0 \(8-bit pixels\? divide by 255\)"),
        (np.full((2, 12, 10, 1), 200, np.uint8), "divide by 255"),
        (np.full((2, 12, 10, 1), -0.5, np.float32), "from -0.5"),
    ],
)
def test_pixels_outside_0_1_or_nan_are_refused_from_the_host(bad, message):
    if message == "NaN":
        bad[0, 3, 4, 0] = np.nan
    model = DRAW(SMALL, rngs=nnx.Rngs(0))
    good = np.full((2, 12, 10, 1), 0.5, np.float32)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=rf"DRAW's images x .*{message}"):
        model(bad, key)
    with pytest.raises(ValueError, match=rf"draw_bound's targets x .*{message}"):
        draw_bound(model(good, key), bad)
    # Under jit nothing is checked (the compiled steps pay nothing): the values flow through.
    graphdef, params = nnx.split(model)
    loss = jax.jit(lambda p, x: draw_bound(nnx.merge(graphdef, p)(x, key), x).loss)(params, bad)
    assert loss.shape == ()
    # Binary and boolean images, and values at the ends of [0, 1], are fine.
    for ok in (np.ones((2, 12, 10, 1), np.uint8), np.zeros((2, 12, 10, 1), bool), good):
        assert np.isfinite(float(draw_bound(model(ok, key), ok).loss))


def test_a_new_peephole_model_computes_what_the_plain_one_does():
    # Peephole weights start at zero and take no random draws, so with one
    # seed the two models share every other parameter and agree exactly; the
    # plain model's parameters are the peephole model's minus the peepholes.
    plain, peep = SMALL, dataclasses.replace(SMALL, peepholes=True)
    (g_plain, p_plain), (g_peep, p_peep) = (train_step.init_model(c, seed=4) for c in (plain, peep))
    names = {cell: set(p_peep[cell]) - set(p_plain[cell]) for cell in ("encoder", "decoder")}
    assert names == {cell: {"cell_to_in", "cell_to_forget", "cell_to_out"} for cell in names}
    x, key = batch(SMALL), jax.random.key(5)
    out_plain = train_step.apply_model(g_plain, p_plain)(x, key)
    out_peep = train_step.apply_model(g_peep, p_peep)(x, key)
    for a, b in zip(jax.tree.leaves(out_plain), jax.tree.leaves(out_peep), strict=True):
        np.testing.assert_array_equal(a, b)
