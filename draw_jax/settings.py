"""Settings by flag name: the view a command line and a notebook have of a run's config.

``config`` declares the settings (schema, defaults, help, validation); this
module turns names and values into a ``TrainConfig``:

  * ``settings()``: every setting as a flag sees it (``experiments.cli`` makes
    one absl flag of each);
  * ``build_config(preset=None, **settings)``: a new run's config, on top of a
    named preset (``presets.py``), with ``--init_from`` taking its model from
    the released one (``pretrained.init_from_model``);
  * ``resumed_config(previous, workdir, **typed)``: a resumed run's config,
    its own ``config.json`` with only the settings typed compared to it.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from draw_jax import data as data_lib
from draw_jax import presets as presets_lib
from draw_jax import pretrained
from draw_jax.config import PARTS, ConfigError, DataConfig, DrawConfig, OptimConfig, RunConfig, TrainConfig

__all__ = [
    "RESUMABLE",
    "SHORTHANDS",
    "Setting",
    "build_config",
    "chosen_settings",
    "resumed_config",
    "settings",
]


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting as a command line sees it (what ``experiments.cli`` makes a flag of)."""

    name: str
    part: str  # model, optim, data or run
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None


def settings() -> list[Setting]:
    """Every typed setting, in declaration order (derived fields like ``height`` excluded)."""
    out = []
    for part, klass in PARTS.items():
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            if not f.metadata["flag"]:
                continue
            kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
            out.append(Setting(f.name, part, kind, f.default, f.metadata["help"], f.metadata["choices"]))
    return out


# Settings that stand for several fields at once.
SHORTHANDS = {
    "attention": (
        ("read_attention", "write_attention"),
        "Selective attention for read and write (the paper's two variants); "
        "--read_attention / --write_attention override it for one of them. "
        "Default: as they are (both true: the paper's attention model).",
    ),
}


def chosen_settings(preset: str | None = None, **values: Any) -> dict[str, Any]:
    """The settings asked for, by name: the preset's, then ``attention`` (both read and
    write), then every other setting given; a setting given as None is left out.

    Raises:
      ConfigError: an unknown preset or setting, or both run lengths given.
    """
    if preset is not None and preset not in presets_lib.PRESETS:
        raise ConfigError(f"--preset must be one of {', '.join(presets_lib.PRESETS)}, got {preset!r}")
    chosen = dict(presets_lib.PRESETS[preset]) if preset else {}
    values = {name: value for name, value in values.items() if value is not None}  # None: the default
    for shorthand, (targets, _) in SHORTHANDS.items():
        if values.get(shorthand) is not None:
            chosen.update(dict.fromkeys(targets, values[shorthand]))
        values.pop(shorthand, None)
    unknown = sorted(set(values) - {s.name for s in settings()})
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; see --helpfull")
    if values.get("num_epochs") is not None and "num_steps" in values:
        raise ConfigError("--num_steps and --num_epochs both set: give one run length")
    chosen.update(values)
    return chosen


def build_config(preset: str | None = None, **values: Any) -> TrainConfig:
    """The ``TrainConfig`` of a named preset with some settings changed, by flag name.

    What a command line does (``experiments.train``) and what a notebook should:
    ``build_config("paper_attention", num_epochs=3, data_dir="...")``. Settings
    apply in this order: the preset, then ``attention`` (both read and write),
    then every other setting given; a setting given as None keeps its default.
    The image shape follows the data set.

    Raises:
      ConfigError: an unknown preset or setting, or a bad value (naming its flag).
    """
    chosen = chosen_settings(preset, **values)
    values = {name: value for name, value in values.items() if value is not None}
    names = {s.name: s.part for s in settings()}
    if chosen.get("num_epochs") is not None:
        chosen.pop("num_steps", None)
    parts: dict[str, dict[str, Any]] = {part: {} for part in PARTS}
    for name, value in chosen.items():
        parts[names[name]][name] = value
    data = DataConfig(**parts["data"])
    height, width, channels = data_lib.DATASETS[data.dataset].image_shape
    # Binarised targets (--binarize=dynamic on a colour set) get the Bernoulli unless asked otherwise.
    default_likelihood = (
        "bernoulli" if data.binary_targets else data_lib.DATASETS[data.dataset].default_likelihood
    )
    parts["model"].setdefault("likelihood", default_likelihood)
    model = DrawConfig(height=height, width=width, channels=channels, **parts["model"])
    if chosen.get("init_from") is not None:
        model = pretrained.init_from_model(chosen["init_from"], model, given={**values, **parts["model"]})
    return TrainConfig(
        model=model, optim=OptimConfig(**parts["optim"]), data=data, run=RunConfig(**parts["run"])
    )


# Settings a resumed run may change: how long it runs, how often it logs, saves
# and evaluates, and where its (same) images are read from. Every other setting
# is the run's own and comes from its config.json.
RESUMABLE = frozenset(
    {"num_steps", "num_epochs", "log_every", "eval_every", "checkpoint_every", "checkpoint_minutes"}
    | {"keep_checkpoints"}
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
