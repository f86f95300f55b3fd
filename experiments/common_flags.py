"""Flags shared by the entry points that read a trained workdir (evaluate, sample)."""

from __future__ import annotations

import dataclasses

from absl import flags, logging

from draw_jax import data as data_lib
from draw_jax import pretrained
from draw_jax.config import DataConfig, TrainConfig
from draw_jax.workdir import Trained, load_trained
from experiments import cli

flags.DEFINE_string("workdir", None, "A training workdir (config.json + checkpoints/); or --pretrained.")
flags.DEFINE_string(
    "pretrained",
    None,
    "Instead of --workdir: a released model, by name ("
    + ", ".join(pretrained.available("draw"))
    + ") or .npz path.",
)
flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
flags.DEFINE_string("split", "valid", "Split to use: valid, test or train.")
flags.DEFINE_integer("seed", 0, "Seed of every random draw; results are deterministic given it.")
DATA_SETTINGS = cli.define_config_flags(
    ["dataset", "data_dir", "tfds_data_dir", "binarize"], defaults_from="none"
)
flags.adopt_module_key_flags(cli)

FLAGS = flags.FLAGS


def load_model() -> tuple[Trained, str]:
    """The model of --workdir (at --step) or of --pretrained, and a name for it in messages."""
    if (FLAGS.workdir is None) == (FLAGS.pretrained is None):
        raise cli.ConfigError(
            "give exactly one of --workdir (a training run) and --pretrained (a released model)"
        )
    if FLAGS.pretrained is not None:
        if FLAGS.step is not None:
            raise cli.ConfigError("--step picks a checkpoint of --workdir; a --pretrained model has one")
        trained, name = pretrained.load(FLAGS.pretrained), f"pretrained {FLAGS.pretrained}"
    else:
        trained, name = load_trained(FLAGS.workdir, FLAGS.step), FLAGS.workdir
    logging.info("loaded the model of %s (step %d)", name, trained.step)
    return trained, name


def data_config(config: TrainConfig) -> DataConfig:
    """The workdir's data settings with the data flags given applied (validated by ``DataConfig``).

    Another --dataset drops the workdir's data_dir and binarisation unless given too.
    """
    given = {name: FLAGS[name].value for name in DATA_SETTINGS if FLAGS[name].value is not None}
    base = config.data
    if given.get("dataset", base.dataset) != base.dataset:
        base = dataclasses.replace(base, data_dir=None, binarize=None)
    return dataclasses.replace(base, **given)


def load_data(config: TrainConfig, *, download: bool = True) -> tuple[data_lib.Dataset, DataConfig]:
    """The --split of the workdir's data set (flags override), and the data settings used.

    ``download=False`` for data a command can do without: TFDS is then not asked to fetch it.
    """
    d = data_config(config)
    return data_lib.load_split(d.dataset, FLAGS.split, d.data_dir, d.tfds_data_dir, download=download), d
