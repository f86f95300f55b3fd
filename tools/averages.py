"""Parameter averages formed after a run from its raw checkpoints (``tools.compare_averages``).

A moving average of the parameters is linear in them, so any decay (and the
plain mean of the last K steps, Polyak-Ruppert) can be rebuilt from raw
parameters saved every k steps, and compared on one training trajectory.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from draw_jax import train_step
from draw_jax.train_step import Params

__all__ = ["averages"]


def averages(
    steps: Sequence[int], params_at: Callable[[int], Params], decays: Sequence[float], tails: Sequence[int]
) -> dict[str, Params]:
    """Averages of a run's raw parameters, saved every k steps, in one pass.

    Checkpoints are restored one at a time, in order, and each is dropped once
    it is folded into the running averages and sums: memory holds one
    checkpoint and one parameter set per average, however many steps there are
    (a run kept every 10 steps over 2,500 steps has 250).

    Args:
      steps: the checkpoints' steps, increasing and evenly spaced (k apart).
      params_at: step -> that checkpoint's raw parameters; called once per step, in order.
      decays: per-step moving-average decays d in (0, 1); each is applied as d**k per checkpoint.
      tails: K > 0: the plain mean of the checkpoints in the last K steps (steps > last - K).

    Returns:
      {"ema<d>": ..., "tail<K>": ..., "raw": the last parameters}.

    Raises:
      ValueError: fewer than two checkpoints, uneven steps, or a decay or K out
      of range; raised before any checkpoint is restored.
    """
    steps = list(steps)
    if len(steps) < 2:
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
    params = None
    for i, step in enumerate(steps, start=1):
        params = params_at(step)
        for d in decays:
            emas[d] = train_step.update_ema(emas.get(d, params), params, jnp.asarray(i), d**every)
        for k in tails:
            if step > last - k:
                total, count = sums.get(k, (jax.tree.map(jnp.zeros_like, params), 0))
                sums[k] = (jax.tree.map(jnp.add, total, params), count + 1)
    out = {f"ema{d:g}": emas[d] for d in decays}
    out |= {f"tail{k}": jax.tree.map(lambda x, n=n: x / n, total) for k, (total, n) in sums.items()}
    out["raw"] = params
    return out
