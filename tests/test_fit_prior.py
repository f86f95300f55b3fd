"""The fitted-prior tool (tools/fit_prior.py): its KL, its start at the paper's prior, its fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from draw_jax import DRAW, DrawConfig, losses
from tools import fit_prior

SMALL = DrawConfig(height=12, width=10, T=4, enc_size=16, dec_size=16, z_size=3, read_n=3, write_n=4)


def test_gaussian_kl_is_the_papers_kl_at_the_standard_prior_and_matches_monte_carlo():
    k = jax.random.split(jax.random.key(0), 5)
    mu_q, ls_q, mu_p, ls_p = (0.5 * jax.random.normal(key, (4, 6)) for key in k[:4])
    zero = jnp.zeros_like(mu_q)
    np.testing.assert_allclose(
        fit_prior.gaussian_kl(mu_q, ls_q, zero, zero).sum(-1), losses.kl_per_step(mu_q, ls_q), rtol=1e-5
    )
    z = mu_q + jnp.exp(ls_q) * jax.random.normal(k[4], (200_000, 4, 6))
    log_q = -0.5 * ((z - mu_q) / jnp.exp(ls_q)) ** 2 - ls_q
    log_p = -0.5 * ((z - mu_p) / jnp.exp(ls_p)) ** 2 - ls_p
    np.testing.assert_allclose(
        fit_prior.gaussian_kl(mu_q, ls_q, mu_p, ls_p), (log_q - log_p).mean(0), rtol=0.01, atol=0.01
    )


def test_the_prior_starts_as_the_papers_and_samples_as_generate_does():
    model = DRAW(SMALL, rngs=nnx.Rngs(0))
    for hidden in (0, 8):
        params = fit_prior.init_prior(jax.random.key(1), SMALL.dec_size, SMALL.z_size, hidden)
        mu, logsigma = fit_prior.prior_moments(
            params, jax.random.normal(jax.random.key(2), (5, SMALL.dec_size))
        )
        np.testing.assert_array_equal(mu, 0)
        np.testing.assert_array_equal(logsigma, 0)
        key = jax.random.key(3)
        np.testing.assert_allclose(
            fit_prior.sample(model, params, key, 6),
            jax.nn.sigmoid(model.generate(key, 6).canvases[-1]),
            rtol=1e-5,
            atol=1e-6,
        )


def test_the_fit_lowers_the_kl_term_below_the_standard_priors():
    model = DRAW(SMALL, rngs=nnx.Rngs(0))
    images = np.random.default_rng(0).integers(0, 256, (200, 12, 10, 1)).astype(np.uint8)
    start = fit_prior.init_prior(jax.random.key(1), SMALL.dec_size, SMALL.z_size, 0)
    before = fit_prior.bound_terms(model, start, images, seed=0)
    assert abs(before["kl_fitted"] - before["kl_standard"]) < 1e-4  # the same prior at the start
    fitted = fit_prior.fit(model, start, images, num_steps=200, learning_rate=1e-2, seed=0)
    after = fit_prior.bound_terms(model, fitted, images, seed=0)
    assert after["recon"] == before["recon"] and after["kl_standard"] == before["kl_standard"]
    assert after["kl_fitted"] < before["kl_standard"] - 0.05
