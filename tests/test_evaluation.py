"""The numbers evaluation reports: the bound and the importance-weighted estimate (IWAE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm

from draw_jax import train_step
from draw_jax.config import DrawConfig
from draw_jax.evaluation import SplitEvaluator, log_importance_weights

CFG = DrawConfig(height=10, width=9, T=4, enc_size=16, dec_size=16, z_size=3, read_n=3, write_n=3)


def _model_and_images(b: int = 6):
    graphdef, params = train_step.init_model(CFG, seed=4)
    images = jax.random.bernoulli(jax.random.key(1), 0.3, (b, *CFG.image_shape)).astype(jnp.uint8)
    return graphdef, params, images


def test_log_weights_equal_an_independent_estimator():
    # log w = log p(x | z) + log N(z; 0, I) - log N(z; mu, sigma), each density
    # from jax.scipy.stats.norm and the Bernoulli log-likelihood written out.
    # Dropping log p(z) - log q(z), or flipping its sign, fails this.
    graphdef, params, images = _model_and_images()
    x = images.astype(jnp.float32)
    key, k = jax.random.key(7), 5
    model = train_step.apply_model(graphdef, params)
    got = jax.jit(lambda x: log_importance_weights(model, x, key, k))(x)

    def independent(sample_key):
        eps = jax.random.normal(sample_key, (CFG.T, x.shape[0], CFG.z_size))
        out = model(x, eps=eps)
        sigma = jnp.exp(out.logsigma)
        z = out.mu + sigma * eps
        logits = out.logits.reshape(x.shape[0], -1)
        targets = x.reshape(x.shape[0], -1)
        log_px = jnp.sum(
            targets * jax.nn.log_sigmoid(logits) + (1 - targets) * jax.nn.log_sigmoid(-logits), -1
        )
        log_prior = jnp.sum(norm.logpdf(z), axis=(0, 2))
        log_q = jnp.sum(norm.logpdf(z, out.mu, sigma), axis=(0, 2))
        return log_px + log_prior - log_q

    want = jnp.stack([jax.jit(independent)(s) for s in jax.random.split(key, k)])
    assert got.shape == (k, x.shape[0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)


def test_k_equal_1_averages_to_the_bound():
    # With one sample, -log w is an unbiased estimate of the bound
    # E_q[-log p(x|z)] + KL: averaged over many draws the two agree.
    graphdef, params, images = _model_and_images(b=8)
    x = images.astype(jnp.float32)
    model = train_step.apply_model(graphdef, params)
    draws = 400
    neg_log_w = jax.jit(lambda key: -log_importance_weights(model, x, key, draws))(
        jax.random.key(3)
    )  # [k, b]

    @jax.jit
    def bound(key):
        from draw_jax.losses import draw_bound

        return draw_bound(model(x, key), x).per_example

    bounds = jnp.stack([bound(k) for k in jax.random.split(jax.random.key(4), draws)])  # [draws, b]
    diff = neg_log_w.mean(0) - bounds.mean(0)
    stderr = np.sqrt(neg_log_w.var(0) / draws + bounds.var(0) / draws)
    assert np.all(np.abs(diff) < 4 * stderr + 1e-3), (diff, stderr)


def test_iwae_estimate_does_not_increase_with_k():
    # The importance-weighted estimate tightens with more samples (Burda et
    # al. 2016, Theorem 1): on a fixed model and images, k = 1 >= 4 >= 32,
    # and k = 1 is the bound up to sampling noise.
    graphdef, params, images = _model_and_images(b=60)
    estimates = {}
    for k in (1, 4, 32):
        evaluator = SplitEvaluator(
            graphdef, binary=True, binarize="none", batch_size=20, num_importance_samples=k
        )
        res = evaluator(params, np.asarray(images), seed=11)
        estimates[k] = res.iwae
    assert estimates[32] < estimates[4] < estimates[1], estimates
    assert abs(estimates[1] - res.bound) < 0.05 * res.bound
