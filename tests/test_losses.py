"""The bound of eq. 9-12: Bernoulli reconstruction from logits and the Gaussian KL."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from draw_jax import losses


def test_kl_matches_monte_carlo_estimate():
    # Given a diagonal Gaussian Q, when we average log q(z) - log p(z) over many
    # z ~ Q, then the estimate matches 0.5 * sum(mu^2 + sigma^2 - 2 log sigma - 1).
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    mu = jax.random.normal(k1, (3, 2, 4))
    logsigma = 0.5 * jax.random.normal(k2, (3, 2, 4))
    n = 200_000
    eps = jax.random.normal(k3, (n, 3, 2, 4))
    z = mu + jnp.exp(logsigma) * eps
    log_q = jnp.sum(-0.5 * eps**2 - logsigma - 0.5 * jnp.log(2 * jnp.pi), -1)
    log_p = jnp.sum(-0.5 * z**2 - 0.5 * jnp.log(2 * jnp.pi), -1)
    mc = jnp.mean(log_q - log_p, axis=0)
    analytic = losses.kl_per_step(mu, logsigma)
    assert analytic.shape == (3, 2)
    np.testing.assert_allclose(analytic, mc, atol=0.05, rtol=0.02)


def test_kl_is_zero_at_the_prior():
    # The popular TF code's "- 0.5 * T" constant would make this -0.5*T*..., not 0.
    kl = losses.kl_per_step(jnp.zeros((64, 5, 100)), jnp.zeros((64, 5, 100)))
    np.testing.assert_array_equal(kl, 0.0)


def test_bernoulli_nll_matches_naive_formula_where_stable():
    logits = jax.random.normal(jax.random.key(0), (4, 7, 5, 1)) * 3
    x = jax.random.bernoulli(jax.random.key(1), 0.4, logits.shape).astype(jnp.float32)
    p = jax.nn.sigmoid(logits)
    naive = -jnp.sum(x * jnp.log(p) + (1 - x) * jnp.log1p(-p), axis=(1, 2, 3))
    np.testing.assert_allclose(losses.bernoulli_nll(logits, x), naive, rtol=1e-5)


def test_bernoulli_nll_is_exact_at_huge_logits():
    # At |logit| = 200, sigmoid rounds to exactly 0 or 1 in float32: log(sigmoid + eps)
    # would give -log(eps) instead of the true 200 nats.
    logits = jnp.array([[200.0, -200.0, 200.0, -200.0]])
    x = jnp.array([[1.0, 0.0, 0.0, 1.0]])
    nll = losses.bernoulli_nll(logits, x)
    np.testing.assert_allclose(nll, [400.0], rtol=1e-6)
    g = jax.grad(lambda lg: losses.bernoulli_nll(lg, x).sum())(logits)
    assert np.all(np.isfinite(g))


def test_bound_parts_add_up_and_kl_weight_only_touches_loss():
    T, b, z = 6, 3, 4
    k = jax.random.split(jax.random.key(2), 3)
    from draw_jax.model import DrawOutputs

    out = DrawOutputs(
        logits=jax.random.normal(k[0], (b, 8, 8, 1)),
        canvases=None,
        mu=jax.random.normal(k[1], (T, b, z)),
        logsigma=0.3 * jax.random.normal(k[2], (T, b, z)),
        read_window=None,
        write_window=None,
    )
    x = jnp.ones((b, 8, 8, 1))
    full = losses.draw_bound(out, x)
    half = losses.draw_bound(out, x, kl_weight=0.5)
    np.testing.assert_allclose(full.loss, full.recon + full.kl, rtol=1e-6)
    np.testing.assert_allclose(full.kl, full.kl_per_step.sum(), rtol=1e-6)
    np.testing.assert_allclose(full.per_example.mean(), full.loss, rtol=1e-6)
    np.testing.assert_allclose(half.loss, full.recon + 0.5 * full.kl, rtol=1e-6)
    np.testing.assert_allclose(half.kl, full.kl)
