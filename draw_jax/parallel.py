"""Data parallelism over every device of every process (``jax.sharding``).

The batch is split over a one-axis mesh (``data``); parameters and optimiser
state are replicated. The gradient is taken per device on its slice of the
batch and averaged once per step (``data_parallel_grad``, a ``shard_map``):
left to XLA's partitioner, the weight gradients of the T-step scan were
all-reduced inside the backward loop, T times a step. On one device
this is the identity. Multi-host: each process contributes its own slice of
every global batch, and evaluation covers a split once across processes: each
evaluates its slice of every batch, and ``gather`` gives every process the
whole batch's results.
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from draw_jax.config import ConfigError

# The model's scans start from constant carries that the per-device check would
# have to be told vary over ``data``; the reduction is explicit (``pmean``).
try:
    from jax import shard_map
except ImportError:  # older jax
    from jax.experimental.shard_map import shard_map
_UNCHECKED = {("check_vma" if "check_vma" in inspect.signature(shard_map).parameters else "check_rep"): False}

__all__ = ["Parallel", "data_parallel_grad"]


@dataclasses.dataclass
class Parallel:
    """A ``data`` mesh over all devices and the shardings a train step needs."""

    mesh: jax.sharding.Mesh
    batch_size: int

    @classmethod
    def create(cls, batch_size: int) -> Parallel:
        """Raises ConfigError if ``--batch_size`` does not divide over the devices."""
        count = jax.device_count()
        if batch_size % count:
            raise ConfigError(
                f"--batch_size={batch_size} does not divide evenly over {count} devices; "
                f"use a multiple of {count}"
            )
        mesh = jax.make_mesh((count,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        return cls(mesh=mesh, batch_size=batch_size)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data"))

    def put_batch(self, global_batch: np.ndarray) -> jax.Array:
        """[b, ...] host batch -> a global array split over ``data``; each process gives its slice."""
        if jax.process_count() == 1:
            return jax.device_put(global_batch, self.batch)
        per = global_batch.shape[0] // jax.process_count()
        local = global_batch[jax.process_index() * per : (jax.process_index() + 1) * per]
        return jax.make_array_from_process_local_data(self.batch, local, global_batch.shape)

    def eval_batch_size(self, preferred: int) -> int:
        """``preferred`` rounded up to a multiple of the devices (evaluation pads and masks the last batch)."""
        count = jax.device_count()
        return -(-preferred // count) * count

    def gather(self, tree):
        """Per-example outputs of a data-parallel step ([b, ...] split over ``data``) as whole numpy
        arrays, the same on every process."""
        if jax.process_count() == 1:
            return jax.device_get(tree)
        return multihost_utils.process_allgather(tree, tiled=True)


def data_parallel_grad(loss_fn, batch_sharding: jax.sharding.Sharding | None):
    """``jax.grad(loss_fn, has_aux=True)`` over a batch split along ``data``, reduced once.

    ``loss_fn(params, *batch) -> (loss, aux)``, where every ``batch`` array is
    split along its axis 0 and ``loss`` and every leaf of ``aux`` are means over
    the examples. The returned ``grad_fn(params, *batch) -> (grads, aux)`` gives
    the whole batch's mean gradient and aux: each device differentiates its
    slice, then one ``pmean`` (the slices are equal in size). With no sharding,
    or one device, it is ``jax.grad`` itself.
    """
    grad = jax.grad(loss_fn, has_aux=True)
    if not isinstance(batch_sharding, NamedSharding) or batch_sharding.mesh.size == 1:
        return grad
    mesh = batch_sharding.mesh

    def local(params, *batch):
        return jax.lax.pmean(grad(params, *batch), "data")

    def grad_fn(params, *batch):
        specs = (P(), *(P("data") for _ in batch))
        return shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), **_UNCHECKED)(params, *batch)

    return grad_fn
