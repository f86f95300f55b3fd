"""The numbers the paper reports, over a whole split: the bound and an IWAE estimate.

Notation (``draw_jax/__init__.py``): b = batch, m = images in a split,
k = importance samples, T = glimpses, z = latent size.

For one image, a posterior sample z_{1:T} ~ Q gives the log importance weight
  log w = log D(x | c_T) + sum_t [log N(z_t; 0, I) - log Q(z_t | h^enc_t)].
The paper's bound is E_Q[-log D] + KL (the KL analytic, eq. 11);
the importance-weighted estimate (Burda et al. 2016, arXiv:1509.00519)
  -log p(x) ≈ -(logsumexp_k log w_k - log k)
is the bound in expectation for k = 1 and tightens as k grows.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from draw_jax import data as data_lib
from draw_jax.losses import draw_bound, reconstruction_nll
from draw_jax.metrics import format_duration
from draw_jax.parallel import Parallel
from draw_jax.train_step import Params, apply_model

__all__ = ["SplitEvaluator", "SplitResult", "eval_batches", "log_importance_weights"]


def eval_batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every image once, in order: (uint8 [b, h, w, c], bool mask [b]).

    The last batch is padded with zeros to ``batch_size`` (one compiled shape)
    and the mask marks the real images, so no image is dropped or counted twice.
    """
    m = images.shape[0]
    for start in range(0, m, batch_size):
        batch = images[start : start + batch_size]
        mask = np.ones(batch_size, bool)
        if batch.shape[0] < batch_size:
            pad = batch_size - batch.shape[0]
            mask[batch.shape[0] :] = False
            batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
        yield batch, mask


def log_importance_weights(model, x: jax.Array, key: jax.Array, k: int) -> jax.Array:
    """[k, b] log w for k independent posterior samples per image (``model`` a ``DRAW``)."""

    def one(key):
        eps = model.noise(key, x.shape[0])
        out = model(x, eps=eps)
        log_px = -reconstruction_nll(out, x)  # [b]
        z = out.mu + jnp.exp(out.logsigma) * eps
        # log N(z; 0, 1) - log N(z; mu, sigma): the 0.5 log(2 pi) terms cancel.
        log_ratio = jnp.sum(-0.5 * jnp.square(z) + 0.5 * jnp.square(eps) + out.logsigma, axis=(0, 2))
        return log_px + log_ratio

    return jax.lax.map(one, jax.random.split(key, k))


@dataclasses.dataclass(frozen=True)
class SplitResult:
    """Nats per image over a split. ``iwae`` is None when not computed."""

    bound: float
    recon: float
    kl: float
    iwae: float | None
    num_images: int
    num_importance_samples: int


class SplitEvaluator:
    """Evaluates parameters on a whole split; compiles once, reusable during training.

    Deterministic for a given seed: batch i uses ``fold_in(key(seed), i)``.
    A grey data set with dynamic binarisation gets one fixed binarisation per
    seed (the same for the bound and the IWAE estimate).

    With ``parallel``, every batch is split over all devices of all processes
    (each process evaluates its slice; the batch size rounds up to a multiple of
    the devices) and every process gets the same figures. Every process must
    then call it with the same images and parameters replicated over the mesh.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        *,
        binary: bool,
        binarize: str,
        batch_size: int,
        num_importance_samples: int = 0,
        parallel: Parallel | None = None,
    ) -> None:
        if num_importance_samples < 0:
            raise ValueError(f"--num_importance_samples must be >= 0, got {num_importance_samples}")
        self.batch_size = parallel.eval_batch_size(batch_size) if parallel else batch_size
        self._put = parallel.put_batch if parallel else (lambda batch: batch)
        self._gather = parallel.gather if parallel else jax.device_get
        self.k = k = num_importance_samples

        @jax.jit
        def batch_eval(params, batch, key):
            data_key, bound_key, iw_key = jax.random.split(key, 3)
            x = data_lib.preprocess(batch, binary, binarize, data_key)
            model = apply_model(graphdef, params)
            out = model(x, bound_key)
            bound = draw_bound(out, x)
            recon = reconstruction_nll(out, x)
            per = (bound.per_example, recon, bound.per_example - recon)
            if k > 0:
                log_w = log_importance_weights(model, x, iw_key, k)
                per = (*per, -(jax.nn.logsumexp(log_w, axis=0) - math.log(k)))
            return per

        self._batch_eval = batch_eval

    def __call__(
        self, params: Params, images: np.ndarray, seed: int = 0, *, progress_every_s: float = 15.0
    ) -> SplitResult:
        """The figures over ``images``; logs progress (images done, ETA) every ``progress_every_s``."""
        base = jax.random.key(seed)
        sums = np.zeros(4 if self.k > 0 else 3)
        count, total = 0, len(images)
        t_start = t_logged = time.time()
        for i, (batch, mask) in enumerate(eval_batches(images, self.batch_size)):
            per = self._gather(self._batch_eval(params, self._put(batch), jax.random.fold_in(base, i)))
            sums += np.array([np.sum(np.asarray(p, np.float64)[mask]) for p in per])
            count += int(mask.sum())
            now = time.time()
            if progress_every_s > 0 and now - t_logged >= progress_every_s and count < total:
                t_logged = now
                eta = (total - count) * (now - t_start) / count
                logging.info("evaluated %d/%d images, eta %s", count, total, format_duration(eta))
        means = sums / max(count, 1)
        return SplitResult(
            bound=float(means[0]),
            recon=float(means[1]),
            kl=float(means[2]),
            iwae=float(means[3]) if self.k > 0 else None,
            num_images=count,
            num_importance_samples=self.k,
        )
