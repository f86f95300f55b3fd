"""The train step and its optimiser: pure functions of (state, batch, key).

The model is an NNX module, but the training state holds its parameters as a
plain nested dict (``nnx.split`` + ``to_pure_dict``): optax, orbax and
``jax.sharding`` all see an ordinary pytree, and the train step is a pure
function of (state, batch, key) that ``jax.jit`` compiles once. Which batch
and key each step gets is ``feeding``'s business; the loop is ``train_loop``.

Notation (``draw_jax/__init__.py``): b = batch, m = images in a split,
h, w, c = image shape, T = glimpses, k = steps per compiled call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from draw_jax import data as data_lib
from draw_jax.config import DrawConfig, OptimConfig
from draw_jax.losses import draw_bound
from draw_jax.model import DRAW
from draw_jax.parallel import data_parallel_grad

__all__ = [
    "Params",
    "TrainState",
    "apply_model",
    "clip_each_by_norm",
    "create_train_state",
    "eval_params",
    "init_model",
    "learning_rate_schedule",
    "make_optimizer",
    "make_train_step",
    "make_device_train_step",
    "update_ema",
]

Params = dict[str, Any]


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warm-up, then constant or cosine (held at its final rate after ``decay_steps``).

    ``decay_steps`` must be resolved (``TrainConfig.resolve``) for a cosine schedule.
    """
    if cfg.lr_schedule == "cosine":
        if cfg.decay_steps is None:
            raise ValueError("a cosine schedule needs decay_steps: resolve the config first")
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if cfg.warmup_steps else cfg.learning_rate,
            peak_value=cfg.learning_rate,
            warmup_steps=cfg.warmup_steps,
            decay_steps=max(cfg.decay_steps, cfg.warmup_steps + 1),
            end_value=cfg.learning_rate * cfg.final_lr_fraction,
        )
    if cfg.warmup_steps:
        return optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.constant_schedule(cfg.learning_rate)


def clip_each_by_norm(max_norm: float) -> optax.GradientTransformation:
    """Scale each array of the update to Euclidean norm at most ``max_norm`` on its own.

    ``g * max_norm / max(|g|, max_norm)`` per leaf: TensorFlow's
    ``tf.clip_by_norm(g, 5)``, which the popular DRAW ports apply to every
    variable's gradient (``optax.clip_by_global_norm`` uses one norm over all).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")

    def clip(g: jax.Array, _: Any) -> jax.Array:
        norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
        return (g * (max_norm / jnp.maximum(norm, max_norm))).astype(g.dtype)

    return optax.stateless_with_tree_map(clip)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """``optax.chain(clip, adam)``: clipping by the global norm or each variable's (``clip_mode``)."""
    adam = optax.adam(learning_rate_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2)
    if cfg.clip_norm <= 0:
        return adam
    if cfg.clip_mode == "per_variable":
        return optax.chain(clip_each_by_norm(cfg.clip_norm), adam)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adam)


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries between steps (and checkpoints).

    Attributes:
      step: int32 scalar, optimiser steps taken.
      params: the DRAW parameters as a nested dict of float32 arrays.
      opt_state: optax state for ``params``.
      ema: the exponential moving average of ``params`` over the steps taken
        (``OptimConfig.ema_decay``; already bias-corrected, see ``update_ema``),
        or None when the run keeps none.
    """

    step: jax.Array
    params: Params
    opt_state: optax.OptState
    ema: Params | None = None


def eval_params(state: TrainState) -> Params:
    """The parameters a run is evaluated, sampled and released with: the average if it keeps one."""
    return state.params if state.ema is None else state.ema


def update_ema(ema: Params, params: Params, step: jax.Array, decay: float) -> Params:
    """The moving average after update number ``step`` (1, 2, ...) has produced ``params``.

    The zero-started average m_s = decay m_{s-1} + (1 - decay) p_s divided by its
    weight 1 - decay^s (Adam's bias correction), kept in that corrected form:
    ema_s = ema_{s-1} + r_s (p_s - ema_{s-1}) with r_s = (1 - decay) / (1 - decay^s).
    r_1 = 1, so the first update replaces whatever ``ema`` started as.
    """
    step = step.astype(jnp.float32)
    rate = (1.0 - decay) / (1.0 - jnp.power(jnp.float32(decay), step))
    rate = jnp.where(step <= 1, 1.0, rate)  # exactly 1, not 1 - rounding, at the first update
    return optax.tree.update_moment(params, ema, 1.0 - rate, 1)


def init_model(config: DrawConfig, seed: int) -> tuple[nnx.GraphDef, Params]:
    """(static graph definition, parameters as a nested dict) of a fresh DRAW."""
    model = DRAW(config, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def create_train_state(
    params: Params, optimizer: optax.GradientTransformation, *, ema: bool = False
) -> TrainState:
    """Step 0 at ``params``; ``ema``: also keep a moving average of the parameters (starting at them)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema=jax.tree.map(jnp.copy, params) if ema else None,
    )


def apply_model(graphdef: nnx.GraphDef, params: Params) -> DRAW:
    """The DRAW module with ``params`` (works on tracers inside jit)."""
    return nnx.merge(graphdef, params)


def _kl_weight(step: jax.Array, kl_warmup_steps: int) -> jax.Array:
    if kl_warmup_steps <= 0:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(1.0, (step.astype(jnp.float32) + 1) / kl_warmup_steps)


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    *,
    binary: bool,
    binarize: str,
    kl_warmup_steps: int = 0,
    ema_decay: float = 0.0,
    batch_sharding: jax.sharding.Sharding | None = None,
    jit: bool = True,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds ``train_step(state, images, key) -> (state, metrics)``.

    ``images`` is a uint8 batch [b, h, w, c] as the data pipeline yields it;
    binarisation happens inside the step with a key split from ``key``.
    With ``ema_decay`` > 0 the state must carry an average (``create_train_state(ema=True)``).
    """

    train_step = _train_step_fn(
        graphdef, optimizer, binary, binarize, kl_warmup_steps, ema_decay, batch_sharding
    )
    return jax.jit(train_step, donate_argnums=0) if jit else train_step


def _gradients(graphdef, params, x, key, kl_weight, batch_sharding=None):
    """(gradients of the loss, batch means of the Bound's parts) at ``params``.

    Data parallel (``batch_sharding``): the latent noise is drawn for the whole
    batch, as on one device, and each device differentiates its slice.
    """
    eps = jnp.swapaxes(apply_model(graphdef, params).noise(key, x.shape[0]), 0, 1)  # [b, T, z]

    def loss_fn(params: Params, x: jax.Array, eps: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        out = apply_model(graphdef, params)(x, eps=jnp.swapaxes(eps, 0, 1))
        bound = draw_bound(out, x, kl_weight)
        means = {"bound": jnp.mean(bound.per_example), "recon": bound.recon, "kl": bound.kl,
                 "kl_per_step": bound.kl_per_step}  # fmt: skip
        return bound.loss, means

    return data_parallel_grad(loss_fn, batch_sharding)(params, x, eps)


def _train_step_fn(
    graphdef,
    optimizer,
    binary,
    binarize,
    kl_warmup_steps,
    ema_decay=0.0,
    batch_sharding=None,
):
    def train_step(state: TrainState, images: jax.Array, key: jax.Array):
        if (state.ema is None) != (ema_decay <= 0):
            raise ValueError(
                f"ema_decay={ema_decay} but the train state {'has no' if state.ema is None else 'has an'} "
                "average: create it with create_train_state(..., ema=ema_decay > 0)"
            )
        if batch_sharding is not None:  # data parallel: each device takes its slice
            images = jax.lax.with_sharding_constraint(images, batch_sharding)
        data_key, model_key = jax.random.split(key)
        x = data_lib.preprocess(images, binary, binarize, data_key)
        kl_weight = _kl_weight(state.step, kl_warmup_steps)

        grads, means = _gradients(graphdef, state.params, x, model_key, kl_weight, batch_sharding)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        ema = None if state.ema is None else update_ema(state.ema, params, step, ema_decay)
        metrics = {**means, "grad_norm": optax.tree.norm(grads), "kl_weight": kl_weight}
        return TrainState(step=step, params=params, opt_state=opt_state, ema=ema), metrics

    return train_step


def make_device_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    *,
    binary: bool,
    binarize: str,
    batch_size: int,
    steps_per_epoch: int,
    steps_per_call: int = 1,
    kl_warmup_steps: int = 0,
    ema_decay: float = 0.0,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Builds a jitted ``multi_step(state, images, perms, first_epoch, base_key)``.

    The training split stays on the device: ``images`` is uint8 [m, h, w, c] and
    ``perms`` [2, m] holds the orders of epochs ``first_epoch`` and the next.
    Each of the ``steps_per_call`` steps takes batch ``step % steps_per_epoch``
    of its epoch's order and the key ``fold_in(base_key, step)``: exactly the
    batches and keys of the host loop (``feeding.train_batches``), without a
    host-to-device copy per step.

    ``steps_per_call`` must not exceed ``steps_per_epoch`` (``RunConfig.steps_per_call_for``
    ensures it), so a call spans at most two epochs.

    Returns (state, metrics), each metric stacked over the steps of the call.
    """
    one_step = _train_step_fn(
        graphdef, optimizer, binary, binarize, kl_warmup_steps, ema_decay, batch_sharding
    )

    def multi_step(state: TrainState, images: jax.Array, perms: jax.Array, first_epoch: jax.Array, base_key):
        def body(state, _):
            epoch, offset = jnp.divmod(state.step, steps_per_epoch)
            order = perms[epoch - first_epoch]
            idx = jax.lax.dynamic_slice_in_dim(order, offset * batch_size, batch_size)
            batch = jnp.take(images, idx, axis=0)
            return one_step(state, batch, jax.random.fold_in(base_key, state.step))

        return jax.lax.scan(body, state, None, length=steps_per_call)

    return jax.jit(multi_step, donate_argnums=0)
