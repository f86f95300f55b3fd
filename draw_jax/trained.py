"""Loads a trained model from a workdir: its config.json and a checkpoint."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from draw_jax import training
from draw_jax.checkpoint import Checkpointer
from draw_jax.config import TrainConfig, load_config

__all__ = ["Trained", "load_trained"]


@dataclasses.dataclass(frozen=True)
class Trained:
    config: TrainConfig
    graphdef: nnx.GraphDef
    params: training.Params
    step: int


def load_trained(workdir: str, step: int | None = None) -> Trained:
    """The model of ``workdir`` at checkpoint ``step`` (default: the latest).

    The model config comes from ``<workdir>/config.json``, never from flags.
    """
    config = load_config(workdir)
    graphdef, params = training.init_model(config.model, seed=0)
    like = training.create_train_state(params, training.make_optimizer(config.optim))
    checkpoints = Checkpointer(workdir, read_only=True)
    try:
        restored = checkpoints.restore(like, step)
        step = int(jax.device_get(restored.step))
    finally:
        checkpoints.close()
    return Trained(config=config, graphdef=graphdef, params=restored.params, step=step)
