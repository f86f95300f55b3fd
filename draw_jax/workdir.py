"""A run's folder: its config.json, the check that a restart continues the same run,
its results.json, and loading the trained model back.

Layout of ``<workdir>``: ``config.json`` (the resolved ``TrainConfig``),
``checkpoints/`` (orbax, see ``checkpoint``), ``tb/`` (TensorBoard events,
see ``metrics``), ``results.json`` (the last figures of the run).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
from flax import nnx

from draw_jax import train_step
from draw_jax.checkpoint import Checkpointer
from draw_jax.config import ConfigError, TrainConfig, chosen_settings, settings
from draw_jax.model import DRAW

__all__ = [
    "CONFIG_FILE",
    "RESULTS_FILE",
    "Trained",
    "check_same_run",
    "load_config",
    "load_trained",
    "previous_config",
    "resumed_config",
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


# Settings a resumed run may change: how long it runs, how often it logs, saves
# and evaluates, and where its (same) images are read from. Every other setting
# is the run's own and comes from its config.json.
RESUMABLE = frozenset(
    {"num_steps", "num_epochs", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"}
    | {"eval_examples", "steps_per_call", "data_dir", "tfds_data_dir", "device_data"}
)


def resumed_config(
    previous: TrainConfig, workdir: str, preset: str | None = None, **given: Any
) -> TrainConfig:
    """The config that resumes the run in ``workdir``: its own ``config.json``, with the settings typed.

    Only the settings given (by flag name, with ``preset`` standing for all of
    its own) are compared with the run's: the defaults of this version of
    draw_jax never are, so a run made under older defaults resumes with the
    command that started it. ``RESUMABLE`` settings (run length, intervals,
    where the data is read from) take the value given; raising ``--num_steps``
    extends the run.

    Raises:
      ConfigError: a setting given contradicts the run's model, optimiser, data
        or seed (each such flag named), or is unknown.
    """
    typed = chosen_settings(preset, **given)
    parts = {s.name: s.part for s in settings()}
    changes: dict[str, dict[str, Any]] = {"run": {}, "data": {}}
    clashes = []
    for name, value in typed.items():
        part = getattr(previous, parts[name])
        if name in RESUMABLE:
            changes[parts[name]][name] = value
            continue
        # Compared as the config would hold it (--eval_split=validation is valid).
        wanted = getattr(dataclasses.replace(part, **{name: value}), name)
        if wanted != getattr(part, name):
            clashes.append(f"--{name}={value!r} (the run has {getattr(part, name)!r})")
    if clashes:
        raise ConfigError(
            f"--workdir={workdir} holds a run with other settings: {'; '.join(clashes)}. A resumed run "
            "takes its settings from its config.json: leave these flags out to resume it, or use a new "
            "--workdir; nothing there was changed."
        )
    if "num_steps" in changes["run"] and "num_epochs" not in changes["run"]:
        changes["run"]["num_epochs"] = None
    return dataclasses.replace(
        previous,
        run=dataclasses.replace(previous.run, **changes["run"]),
        data=dataclasses.replace(previous.data, **changes["data"]),
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
