"""Does a prior conditioned on the decoder's state close DRAW's sample gap? Fitted after the fact.

DRAW's prior is N(0, I) at every step (sec. 2.3). This tool freezes a trained two-digit
model and fits a diagonal Gaussian prior p(z_t | h^dec_{t-1}) (a linear map of the decoder's
state, or one tanh layer of ``--hidden`` units first; it starts as N(0, I)) by minimising the
bound's KL term, sum_t KL(Q(z_t | x, z_<t) || p(z_t | h^dec_{t-1})), on training pairs: the
reconstruction term does not change, so the valid bound improves by exactly what the KL loses.
It then samples from the fitted prior (z_t drawn step by step from p, fed to the decoder) and
counts two confident digits with ``two_digit_check``'s counter.

``python -m tools.fit_prior --data_dir=../shared/data/mnist --workdir=runs/two_digit_check
--model=mnist_two_digits_attention [--hidden=512]`` (the counter from that workdir, trained
there if missing). About 6 minutes for 1,500 steps on one core.

A maintainers' tool, as ``two_digit_check``.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from draw_jax import data as data_lib
from draw_jax import losses, two_digits
from experiments import cli
from tools import two_digit_check as check

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("data_dir", None, "Folder with the MNIST IDX files.", required=True)
    flags.DEFINE_string(
        "workdir", None, "two_digit_check's workdir: its counter, and this report.", required=True
    )
    flags.DEFINE_string("model", "mnist_two_digits_attention", "A released two-digit DRAW or a workdir.")
    flags.DEFINE_integer("hidden", 0, "Units of a tanh layer before the prior's linear map (0: linear).")
    flags.DEFINE_integer("num_steps", 1500, "Adam steps of the fit, batches of 100 training pairs.")
    flags.DEFINE_float("learning_rate", 1e-3, "Adam's rate, cosine to 0 over --num_steps.")
    flags.DEFINE_integer("num_samples", 1000, "Samples drawn from the fitted prior.")
    flags.DEFINE_integer("seed", 0, "Seed of the fit, the evaluation and the samples.")


def gaussian_kl(mu_q: jax.Array, logsigma_q: jax.Array, mu_p: jax.Array, logsigma_p: jax.Array) -> jax.Array:
    """KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)) per dimension (any matching shapes); with
    mu_p = logsigma_p = 0 it is the paper's 0.5 (mu^2 + sigma^2 - 2 log sigma - 1)."""
    var_ratio = jnp.exp(2 * (logsigma_q - logsigma_p))
    return logsigma_p - logsigma_q + 0.5 * (var_ratio + ((mu_q - mu_p) / jnp.exp(logsigma_p)) ** 2 - 1)


def init_prior(key: jax.Array, dec_size: int, z_size: int, hidden: int) -> dict[str, jax.Array]:
    """Parameters of p(z_t | h^dec_{t-1}); the output layer starts at zero, so p starts as N(0, I)."""
    width = hidden or dec_size
    params = {"w": jnp.zeros((width, 2 * z_size)), "b": jnp.zeros(2 * z_size)}
    if hidden:
        params["w_hidden"] = jax.random.normal(key, (dec_size, hidden)) / np.sqrt(dec_size)
        params["b_hidden"] = jnp.zeros(hidden)
    return params


def prior_moments(params: dict[str, jax.Array], h_dec: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mu, logsigma) [..., z] of p(z_t | h^dec_{t-1}) from h_dec [..., d]."""
    if "w_hidden" in params:
        h_dec = jnp.tanh(h_dec @ params["w_hidden"] + params["b_hidden"])
    out = h_dec @ params["w"] + params["b"]
    return jnp.split(out, 2, axis=-1)


def posterior_path(model, x: jax.Array, key: jax.Array):
    """Along the posterior's path of binary images x [b, h, w, c]: (Q's mu, logsigma [T, b, z],
    h^dec_{t-1} [T, b, d], the per-image reconstruction term [b]), all held fixed by the fit."""
    eps = model.noise(key, x.shape[0])
    out = model(x, eps=eps)
    z = out.mu + jnp.exp(out.logsigma) * eps
    _, _, _, h, cell = model.initial_carry(x.shape[0])

    def body(carry, z_t):
        return model.decoder(carry, z_t), carry[0]

    _, h_before = jax.lax.scan(body, (h, cell), z)
    recon = losses.bernoulli_nll(out.logits, x)
    return jax.lax.stop_gradient((out.mu, out.logsigma, h_before, recon))


def kl_term(params, mu_q, logsigma_q, h_before) -> jax.Array:
    """The bound's KL term [b] under the prior ``params``: summed over steps and latents."""
    return gaussian_kl(mu_q, logsigma_q, *prior_moments(params, h_before)).sum((0, 2))


def fit(model, params, images: np.ndarray, num_steps: int, learning_rate: float, seed: int):
    """Adam on the mean KL term over batches of 100 of uint8 ``images``, binarised afresh."""
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps))
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, x, key):
        mu_q, logsigma_q, h_before, _ = posterior_path(model, x, key)
        grads = jax.grad(lambda p: kl_term(p, mu_q, logsigma_q, h_before).mean())(params)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng([seed, 21])
    for i in range(num_steps):
        batch = images[rng.integers(0, len(images), 100)]
        x = (rng.random(batch.shape) < batch / 255).astype(np.float32)
        params, state = step(params, state, x, jax.random.fold_in(jax.random.key(seed), i))
    return params


def bound_terms(model, params, images: np.ndarray, seed: int) -> dict[str, float]:
    """Mean reconstruction and KL terms over uint8 ``images`` under N(0, I) and under ``params``."""

    def terms(x, key):
        mu_q, logsigma_q, h_before, recon = posterior_path(model, x, key)
        standard = losses.kl_per_step(mu_q, logsigma_q).sum(0)
        return recon, standard, kl_term(params, mu_q, logsigma_q, h_before)

    out = check.over_binarised_pairs(lambda x, key: jnp.stack(terms(x, key), -1), images, seed)
    recon, standard, fitted = out.mean(0)
    return {"recon": float(recon), "kl_standard": float(standard), "kl_fitted": float(fitted)}


def sample(model, params, key: jax.Array, num: int) -> jax.Array:
    """sigmoid(c_T) [num, h, w, c] of samples with z_t ~ p(z_t | h^dec_{t-1}), step by step."""
    canvas, _, _, h, cell = model.initial_carry(num)
    noise = jax.random.normal(key, (model.config.T, num, model.config.z_size))

    def body(carry, eps_t):
        canvas, h, cell = carry
        mu, logsigma = prior_moments(params, h)
        h, cell = model.decoder((h, cell), mu + jnp.exp(logsigma) * eps_t)
        update, _ = model._write(h)
        return (canvas + update, h, cell), None

    (canvas, _, _), _ = jax.lax.scan(body, (canvas, h, cell), noise)
    return jax.nn.sigmoid(canvas)


@cli.user_errors_as_messages
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    for name in ("num_steps", "num_samples"):
        if getattr(FLAGS, name) < 1:
            raise app.UsageError(f"--{name} must be >= 1, got {getattr(FLAGS, name)}")
    if FLAGS.hidden < 0:
        raise app.UsageError(f"--hidden must be >= 0, got {FLAGS.hidden}")
    model, step = check.load_draw(FLAGS.model)
    counter = check.load_or_train(FLAGS.workdir, FLAGS.data_dir, 20000, 0)
    split = {s: data_lib.load_split("mnist", s, FLAGS.data_dir).images for s in ("train", "valid")}
    train = two_digits.make(split["train"], "train").images
    valid = two_digits.make(split["valid"], "valid").images[:2000]
    cfg = model.config
    params = init_prior(jax.random.key(FLAGS.seed), cfg.dec_size, cfg.z_size, FLAGS.hidden)
    params = fit(model, params, train, FLAGS.num_steps, FLAGS.learning_rate, FLAGS.seed)
    report = {"model": FLAGS.model, "model_step": step, "hidden": FLAGS.hidden, "num_steps": FLAGS.num_steps}
    report.update(bound_terms(model, params, valid, FLAGS.seed))
    draw = jax.jit(lambda key: sample(model, params, key, 100))
    keys = jax.random.split(jax.random.key(FLAGS.seed), -(-FLAGS.num_samples // 100))
    drawn = np.concatenate([np.asarray(draw(k)) for k in keys])[: FLAGS.num_samples]
    report["samples_share"] = check.share_of_two(counter, drawn, 0.5)
    report.update({f"samples_{k}": v for k, v in check.layout(drawn).items()})
    for key, value in report.items():
        print(f"{key:<20}{value:.4f}" if isinstance(value, float) else f"{key:<20}{value}")
    stem = f"fit_prior_{os.path.basename(os.path.normpath(FLAGS.model))}_step{step}_hidden{FLAGS.hidden}"
    with open(os.path.join(FLAGS.workdir, f"{stem}.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
