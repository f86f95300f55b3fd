"""Data parallelism over every device of every process (``jax.sharding``).

The batch is split over a one-axis mesh (``data``); parameters and optimiser
state are replicated, and XLA inserts the gradient all-reduce. On one device
this is the identity. Multi-host: each process contributes its own slice of
every global batch, and evaluation covers a split once across processes: each
evaluates its slice of every batch, and ``gather`` gives every process the
whole batch's results.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from draw_jax.config import ConfigError

__all__ = ["Parallel"]


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
