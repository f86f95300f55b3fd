"""Trains DRAW: ``python -m experiments.train --attention=true [--data_dir=...]``.

Flags -> one ``TrainConfig`` -> ``draw_jax.train_loop.train_and_evaluate``.
Defaults are the paper's MNIST setup (binarized MNIST, T=64, 256/256 LSTMs,
z 100, read 2x2, write 5x5, batch 100). Re-running the same command in the
same --workdir resumes it.
"""

from __future__ import annotations

import jax
from absl import app, flags, logging

from draw_jax import data as data_lib
from draw_jax.config import ConfigError, DataConfig, RunConfig, TrainConfig
from draw_jax.model import DrawConfig
from draw_jax.train_loop import TrainingDiverged, train_and_evaluate
from draw_jax.training import OptimConfig
from experiments import cli

# Model (DrawConfig).
flags.DEFINE_bool("attention", True, "Selective attention for read and write (the paper's two variants).")
flags.DEFINE_bool("read_attention", None, "Override --attention for the read only.")
flags.DEFINE_bool("write_attention", None, "Override --attention for the write only.")
flags.DEFINE_integer("T", 64, "Glimpses / canvas updates.")
flags.DEFINE_integer("read_n", 2, "Read glimpse size N (an N x N grid).")
flags.DEFINE_integer("write_n", 5, "Write patch size N.")
flags.DEFINE_integer("enc_size", 256, "Encoder LSTM size.")
flags.DEFINE_integer("dec_size", 256, "Decoder LSTM size.")
flags.DEFINE_integer("z_size", 100, "Latent size per step.")
flags.DEFINE_enum(
    "compute_dtype", "float32", ["float32", "bfloat16"], "Matmul dtype (parameters stay float32)."
)
# Optimiser (OptimConfig).
flags.DEFINE_float("learning_rate", 1e-3, "Adam step size (peak of the schedule).")
flags.DEFINE_float("adam_b1", 0.5, "Adam beta1.")
flags.DEFINE_float("adam_b2", 0.999, "Adam beta2.")
flags.DEFINE_float("clip_norm", 5.0, "Global gradient-norm clipping (0 = off).")
flags.DEFINE_enum("lr_schedule", "constant", ["constant", "cosine"], "Learning-rate schedule.")
flags.DEFINE_integer("warmup_steps", 0, "Linear learning-rate warm-up steps.")
flags.DEFINE_integer("decay_steps", 0, "Cosine decay length (default: the run length).")
flags.DEFINE_integer(
    "kl_warmup_steps", 0, "Linear KL-weight warm-up steps (0 = the paper's objective throughout)."
)
# Data (DataConfig).
flags.DEFINE_enum("dataset", "binarized_mnist", list(data_lib.DATASETS), "Data set.")
flags.DEFINE_string(
    "data_dir",
    None,
    "Folder of local files (MNIST IDX or binarized_mnist_*.amat[.gz]); when set, TFDS is not used.",
)
flags.DEFINE_string("tfds_data_dir", None, "TFDS's data folder (its default if unset).")
flags.DEFINE_enum(
    "binarize",
    None,
    list(data_lib.BINARIZE_CHOICES),
    "mnist only: dynamic (default), threshold or none. binarized_mnist is already binary.",
)
flags.DEFINE_integer("batch_size", 100, "Images per step (global, over all devices).")
flags.DEFINE_string("eval_split", "valid", "Held-out split evaluated during training.")
flags.DEFINE_bool("device_data", True, "Keep the training split on the device; draw batches inside the step.")
# Run (RunConfig).
flags.DEFINE_integer("num_steps", 100_000, "Optimiser steps in all.")
flags.DEFINE_integer("num_epochs", None, "Alternative to --num_steps: whole passes over the training split.")
flags.DEFINE_integer("seed", 0, "Seeds parameters, data order and all noise.")
flags.DEFINE_string("workdir", "runs/draw", "Checkpoints, config.json, TensorBoard events, results.json.")
flags.DEFINE_integer("log_every", 100, "Steps between console lines and train summaries.")
flags.DEFINE_integer("eval_every", 5_000, "Steps between held-out evaluations (0 = at the end only).")
flags.DEFINE_integer("checkpoint_every", 1_000, "Steps between checkpoints (0 = at the end only).")
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.")
flags.DEFINE_integer("eval_examples", 0, "Held-out images used by periodic evaluation (0 = all).")
flags.DEFINE_integer(
    "steps_per_call", 10, "Train steps per compiled call (with --device_data; capped at one epoch)."
)
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host TPU pods).")

FLAGS = flags.FLAGS

_TRAIN_SIZES = {"binarized_mnist": 50_000, "mnist": 60_000}


def config_from_flags() -> TrainConfig:
    """Builds and validates the whole config before anything is compiled or loaded."""
    f = FLAGS
    read_att = f.attention if f.read_attention is None else f.read_attention
    write_att = f.attention if f.write_attention is None else f.write_attention
    num_steps = f.num_steps
    if f.num_epochs is not None:
        if f.num_epochs < 1:
            raise ConfigError(f"--num_epochs must be >= 1, got {f.num_epochs}")
        num_steps = f.num_epochs * max(1, _TRAIN_SIZES[f.dataset] // max(f.batch_size, 1))
    try:
        model = DrawConfig(
            T=f.T,
            read_n=f.read_n,
            write_n=f.write_n,
            enc_size=f.enc_size,
            dec_size=f.dec_size,
            z_size=f.z_size,
            read_attention=read_att,
            write_attention=write_att,
            dtype=f.compute_dtype,
        )
        decay = f.decay_steps or (num_steps if f.lr_schedule == "cosine" else 0)
        optim = OptimConfig(
            learning_rate=f.learning_rate,
            adam_b1=f.adam_b1,
            adam_b2=f.adam_b2,
            clip_norm=f.clip_norm,
            lr_schedule=f.lr_schedule,
            warmup_steps=f.warmup_steps,
            decay_steps=decay,
            kl_warmup_steps=f.kl_warmup_steps,
        )
        data = DataConfig(
            dataset=f.dataset,
            data_dir=f.data_dir,
            tfds_data_dir=f.tfds_data_dir,
            binarize=f.binarize,
            batch_size=f.batch_size,
            eval_split=f.eval_split,
            device_data=f.device_data,
        )
        run = RunConfig(
            num_steps=num_steps,
            seed=f.seed,
            log_every=f.log_every,
            eval_every=f.eval_every,
            checkpoint_every=f.checkpoint_every,
            keep_checkpoints=f.keep_checkpoints,
            eval_examples=f.eval_examples,
            steps_per_call=f.steps_per_call,
        )
    except ConfigError:
        raise
    except ValueError as e:  # DrawConfig / OptimConfig validation
        raise ConfigError(str(e).replace("DrawConfig.", "--")) from e
    if data.eval_split == "train":
        raise ConfigError("--eval_split must be a held-out split (valid or test), not train")
    return TrainConfig(model=model, optim=optim, data=data, run=run)


@cli.user_errors_as_messages
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
    config = config_from_flags()
    if FLAGS.distributed:
        jax.distributed.initialize()
    logging.info("devices: %s", jax.devices())
    try:
        results = train_and_evaluate(config, FLAGS.workdir)
    except TrainingDiverged as e:
        cli.fail(str(e), code=3)
    split = config.data.eval_split
    logging.info(
        "done: step %d, %s bound %.2f nats", results["step"], split, results[split].get("bound", float("nan"))
    )


if __name__ == "__main__":
    app.run(main)
