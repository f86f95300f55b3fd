"""What each train step sees: the data order, and one feeder for host or device data.

The order of epoch e is a permutation that is a pure function of (seed, e),
and the noise of step s is ``fold_in(base_key, s)``, so a resumed run sees
exactly the batches and keys of an uninterrupted one. Each epoch drops its
last partial batch (a different set each epoch).

A feeder runs the train step on the next batches: ``feeder(state, step,
num_steps) -> (state, metrics, k)``, metrics stacked over the k steps it ran.
``HostFeeder`` copies one host batch per step; ``DeviceFeeder`` keeps the
training split on the device and runs k steps per compiled call. The loop
does not know which one it has.

Notation (``draw_jax/__init__.py``): m = images in a split, b = batch,
k = steps per compiled call.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from draw_jax import train_step
from draw_jax.parallel import Parallel

__all__ = [
    "DeviceFeeder",
    "Feeder",
    "HostFeeder",
    "device_epoch_permutation",
    "epoch_permutation",
    "permutation_key",
    "train_batches",
    "train_indices",
]

# Keeps the data-order stream apart from the parameter and training-noise streams.
_DATA_STREAM = 0x0DA7A


def permutation_key(seed: int, epoch: jax.Array | int) -> jax.Array:
    """The key that orders ``epoch`` of a run with ``seed``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _DATA_STREAM), epoch)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _permutation(seed: int, epoch: jax.Array, m: int) -> jax.Array:
    return jax.random.permutation(permutation_key(seed, epoch), m)


def device_epoch_permutation(seed: int, epoch: int, m: int) -> jax.Array:
    """[m] ``epoch_permutation`` left on the device (for device-resident data)."""
    return _permutation(seed, jnp.asarray(epoch, jnp.int32), m)


def epoch_permutation(seed: int, epoch: int, m: int) -> np.ndarray:
    """[m] the order of the m training images in ``epoch`` (a pure function of seed and epoch)."""
    return np.asarray(device_epoch_permutation(seed, epoch, m))


def train_indices(m: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[np.ndarray]:
    """Endless [b] indices of each step's training batch into a split of m, from ``start_step`` on.

    Step s takes batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``'s
    order (the device step, ``train_step.make_device_train_step``, does the same
    on the device). Starting at ``start_step`` gives exactly the batches an
    uninterrupted run would have seen from that step on (what resuming relies
    on). The batch size must not exceed the split.
    """
    steps_per_epoch = m // batch_size
    epoch, offset = divmod(start_step, steps_per_epoch)
    while True:
        perm = epoch_permutation(seed, epoch, m)
        for i in range(offset, steps_per_epoch):
            yield perm[i * batch_size : (i + 1) * batch_size]
        epoch, offset = epoch + 1, 0


def train_batches(
    images: np.ndarray, batch_size: int, seed: int, start_step: int = 0
) -> Iterator[np.ndarray]:
    """Endless shuffled training batches, uint8 [b, h, w, c], from ``start_step`` on (``train_indices``)."""
    for idx in train_indices(images.shape[0], batch_size, seed, start_step):
        yield images[idx]


class Feeder(Protocol):
    """Runs the train step on the next batches."""

    steps_per_call: int

    def __call__(
        self, state: train_step.TrainState, step: int, num_steps: int
    ) -> tuple[train_step.TrainState, dict[str, jax.Array], int]: ...


class HostFeeder:
    """One host batch copied to the devices per step, one step per call."""

    steps_per_call = 1

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        optimizer: optax.GradientTransformation,
        images: np.ndarray,
        *,
        batch_size: int,
        seed: int,
        start_step: int,
        base_key: jax.Array,
        parallel: Parallel,
        **step_kwargs,
    ) -> None:
        self._step = train_step.make_train_step(
            graphdef, optimizer, batch_sharding=parallel.batch, **step_kwargs
        )
        self._batches = train_batches(images, batch_size, seed, start_step=start_step)
        self._base_key, self._parallel = base_key, parallel

    def __call__(self, state, step, num_steps):
        batch = self._parallel.put_batch(next(self._batches))
        state, metrics = self._step(state, batch, jax.random.fold_in(self._base_key, step))
        return state, jax.tree.map(lambda a: a[None], metrics), 1


class DeviceFeeder:
    """The training split on the device; ``steps_per_call`` steps per compiled call.

    Calls start at multiples of ``steps_per_call``; a step off that grid (a
    resumed run) or the last few steps of a run go one per call, so every
    step runs exactly once with the batch and key an uninterrupted run gives it.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        optimizer: optax.GradientTransformation,
        images: np.ndarray,
        *,
        batch_size: int,
        seed: int,
        steps_per_call: int,
        base_key: jax.Array,
        parallel: Parallel,
        **step_kwargs,
    ) -> None:
        self.steps_per_call = steps_per_call
        self._m = images.shape[0]
        self._steps_per_epoch = self._m // batch_size
        self._images = jax.device_put(images, parallel.replicated)
        self._seed, self._base_key = seed, base_key
        self._calls = {
            k: train_step.make_device_train_step(
                graphdef,
                optimizer,
                batch_size=batch_size,
                steps_per_epoch=self._steps_per_epoch,
                steps_per_call=k,
                batch_sharding=parallel.batch,
                **step_kwargs,
            )
            for k in {steps_per_call, 1}
        }
        self._perms_epoch, self._perms = None, None

    def __call__(self, state, step, num_steps):
        whole = step % self.steps_per_call == 0 and num_steps - step >= self.steps_per_call
        k = self.steps_per_call if whole else 1
        epoch = step // self._steps_per_epoch
        if self._perms_epoch != epoch:  # this epoch's order and the next (a call may cross into it)
            self._perms = jnp.stack(
                [device_epoch_permutation(self._seed, e, self._m) for e in (epoch, epoch + 1)]
            )
            self._perms_epoch = epoch
        state, metrics = self._calls[k](state, self._images, self._perms, jnp.int32(epoch), self._base_key)
        return state, metrics, k
