"""Flags shared by the entry points that read a trained workdir (evaluate, sample)."""

from __future__ import annotations

from absl import flags

from draw_jax import data as data_lib
from draw_jax.config import TrainConfig

flags.DEFINE_string("workdir", None, "A training workdir (config.json + checkpoints/).", required=True)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("split", "valid", "Split to use: valid or test (binarized_mnist), test (mnist).")
flags.DEFINE_integer("seed", 0, "Seed of every random draw; results are deterministic given it.")
flags.DEFINE_enum("dataset", None, list(data_lib.DATASETS), "Default: the workdir's.")
flags.DEFINE_string("data_dir", None, "Local data folder (default: the workdir's, else TFDS).")
flags.DEFINE_string("tfds_data_dir", None, "TFDS's data folder.")
flags.DEFINE_enum("binarize", None, list(data_lib.BINARIZE_CHOICES), "Default: the workdir's.")

FLAGS = flags.FLAGS


def load_data(config: TrainConfig) -> tuple[data_lib.Dataset, str]:
    """The --split of the workdir's data set (flags override), and the binarisation."""
    dataset = FLAGS.dataset or config.data.dataset
    binarize = data_lib.resolve_binarize(
        dataset, FLAGS.binarize or (config.data.binarize if dataset == config.data.dataset else None)
    )
    data_dir = FLAGS.data_dir or (config.data.data_dir if dataset == config.data.dataset else None)
    tfds_dir = FLAGS.tfds_data_dir or config.data.tfds_data_dir
    return data_lib.load_split(dataset, FLAGS.split, data_dir, tfds_dir), binarize
