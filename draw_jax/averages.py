"""Parameter averages formed after a run from its raw checkpoints (``experiments.compare_averages``).

A moving average of the parameters is linear in them, so any decay (and the
plain mean of the last K steps, Polyak-Ruppert) can be rebuilt from raw
parameters saved every k steps, and compared on one training trajectory.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp

from draw_jax import train_step
from draw_jax.train_step import Params

__all__ = ["averages"]


def averages(
    checkpoints: Iterable[tuple[int, Params]], decays: Sequence[float], tails: Sequence[int]
) -> dict[str, Params]:
    """Averages of a run's raw parameters, saved every k steps, in one pass.

    Args:
      checkpoints: (step, raw parameters) in increasing, evenly spaced steps (k apart).
      decays: per-step moving-average decays d in (0, 1); each is applied as d**k per checkpoint.
      tails: K > 0: the plain mean of the checkpoints in the last K steps (steps > last - K).

    Returns:
      {"ema<d>": ..., "tail<K>": ..., "raw": the last parameters}.

    Raises:
      ValueError: fewer than two checkpoints, uneven steps, or a decay or K out of range.
    """
    items = list(checkpoints)
    steps = [s for s, _ in items]
    if len(items) < 2:
        raise ValueError(f"need at least two checkpoints to average, got steps {steps}")
    every = steps[1] - steps[0]
    if every <= 0 or any(b - a != every for a, b in itertools.pairwise(steps)):
        raise ValueError(f"checkpoint steps must be evenly spaced and increasing, got {steps}")
    for d in decays:
        if not 0 < d < 1:
            raise ValueError(f"--decays must be in (0, 1), got {d}")
    for k in tails:
        if k <= 0:
            raise ValueError(f"--tails must be > 0, got {k}")
    last = steps[-1]
    emas: dict[float, Params] = {}
    sums: dict[int, tuple[Params, int]] = {}
    for i, (step, params) in enumerate(items, start=1):
        for d in decays:
            emas[d] = train_step.update_ema(emas.get(d, params), params, jnp.asarray(i), d**every)
        for k in tails:
            if step > last - k:
                total, count = sums.get(k, (jax.tree.map(jnp.zeros_like, params), 0))
                sums[k] = (jax.tree.map(jnp.add, total, params), count + 1)
    out = {f"ema{d:g}": emas[d] for d in decays}
    out |= {f"tail{k}": jax.tree.map(lambda x, n=n: x / n, total) for k, (total, n) in sums.items()}
    out["raw"] = items[-1][1]
    return out
