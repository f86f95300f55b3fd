"""A run's folder: its config.json, the check that a restart continues the same run,
its results.json, and loading the trained model back (``settings.resumed_config``
gives the config a resumed run continues with).

Layout of ``<workdir>``: ``config.json`` (the resolved ``TrainConfig``),
``checkpoints/`` (orbax, see ``checkpoint``), ``tb/`` (TensorBoard events,
see ``metrics``), ``results.json`` (the last figures of the run).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
from flax import nnx

from draw_jax import train_step
from draw_jax.checkpoint import Checkpointer
from draw_jax.config import ConfigError, TrainConfig
from draw_jax.model import DRAW

__all__ = [
    "CONFIG_FILE",
    "RESULTS_FILE",
    "Trained",
    "check_same_run",
    "load_config",
    "load_trained",
    "previous_config",
    "save_config",
]

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"


def save_config(config: TrainConfig, workdir: str) -> None:
    """Writes ``<workdir>/config.json`` (atomically)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def load_config(workdir: str) -> TrainConfig:
    """Reads ``<workdir>/config.json``.

    Raises:
      ConfigError: missing or unreadable, naming the file.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found: is --workdir={workdir} a draw_jax training workdir?")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    return TrainConfig.from_dict(d)


def previous_config(workdir: str) -> TrainConfig | None:
    """The config of the run ``workdir`` already holds, or None for a new run.

    Raises:
      ConfigError: checkpoints without a config.json (refusing to guess theirs).
    """
    if os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
        return load_config(workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):
        raise ConfigError(f"{workdir} has checkpoints but no {CONFIG_FILE}; refusing to guess their config")
    return None


def check_same_run(config: TrainConfig, previous: TrainConfig | None, workdir: str) -> None:
    """Refuses to continue a different run in ``workdir``.

    Raises:
      ConfigError: the model, optimiser, data or seed differ (listed); continuing
        would silently mix two experiments. Run length and intervals may differ.
    """
    if previous is None:
        return
    old, new = previous.identity(), config.identity()
    if old == new:
        return
    diffs = []
    for part in old:
        for k in sorted(set(old[part]) | set(new[part])):
            if old[part].get(k) != new[part].get(k):
                diffs.append(f"{part}.{k}: {old[part].get(k)!r} -> {new[part].get(k)!r}")
    raise ConfigError(
        f"--workdir={workdir} holds a different run ({'; '.join(diffs)}). Use a new --workdir, "
        "or the same flags to resume it; nothing there was changed."
    )


@dataclasses.dataclass(frozen=True)
class Trained:
    """A finished (or interrupted) run's model: config, graph, parameters, step.

    ``params`` are the ones the run evaluated with: its parameter average if it
    kept one (``--ema_decay``), else its parameters.
    """

    config: TrainConfig
    graphdef: nnx.GraphDef
    params: train_step.Params
    step: int

    @property
    def model(self) -> DRAW:
        """The DRAW module with these parameters, ready to call and to sample from."""
        return train_step.apply_model(self.graphdef, self.params)


def load_trained(workdir: str, step: int | None = None) -> Trained:
    """The model of ``workdir`` at checkpoint ``step`` (default: the latest).

    The model config comes from ``<workdir>/config.json``, never from flags.

    Raises:
      ConfigError: no config.json. FileNotFoundError: no such checkpoint.
    """
    config = load_config(workdir)
    graphdef, params = train_step.init_model(config.model, seed=0)
    like = train_step.create_train_state(
        params, train_step.make_optimizer(config.optim), ema=config.optim.ema_decay > 0
    )
    with Checkpointer(workdir, read_only=True) as checkpoints:
        restored = checkpoints.restore(like, step)
    return Trained(
        config=config,
        graphdef=graphdef,
        params=train_step.eval_params(restored),
        step=int(jax.device_get(restored.step)),
    )
