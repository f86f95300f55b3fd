"""Cluttered translated MNIST classification with attention glimpses (DRAW Table 1).

``python -m experiments.classify_cluttered [--data_dir=../shared/data/mnist] --workdir=runs/cluttered``

Defaults are the paper's (Table 3): 100 x 100 images with 8 pieces of clutter,
8 glimpses of 12 x 12, an LSTM of 256 cells. ``--variant=60x60`` is the RAM
paper's smaller set (4 pieces). Re-running the same command resumes;
``--init_from=NAME`` starts a new run from a released classifier;
``--pictures_dir`` draws the glimpse windows on test images from a finished
run. The model lives in ``draw_jax.classifier`` (a user of
``draw_jax.attention``), its training in ``draw_jax.classifier_training`` (a task of
``draw_jax.loop``, DRAW's loop). One process (no ``--coordinator_address``;
``experiments.train`` is the entry point that runs as several).
"""

from __future__ import annotations

from draw_jax import interrupts

if __name__ == "__main__":  # Ctrl-C or SIGTERM from the first moment: one line, never a traceback
    interrupts.exit_promptly(
        lambda sig: f"error: {interrupts.describe(sig)} while starting up: nothing was trained"
    )

import dataclasses
import os

import jax
import numpy as np
from absl import flags, logging
from flax import nnx
from PIL import Image, ImageDraw

from draw_jax import cluttered, pictures, pretrained
from draw_jax.classifier import ClassifierConfig
from draw_jax.classifier_training import (
    ClassifierRunConfig,
    evaluate_error,
    load_classifier,
    train_classifier,
)
from draw_jax.config import OptimConfig
from draw_jax.loop import TrainingDiverged, TrainingInterrupted
from draw_jax.metrics import write_json
from experiments import cli

_RUN = ClassifierRunConfig()
_MODEL, _OPTIM = _RUN.model, _RUN.optim

flags.DEFINE_string(
    "workdir", "runs/cluttered", "Checkpoints, config.json, TensorBoard events, results.json."
)
flags.DEFINE_enum(
    "variant", _RUN.variant, list(cluttered.VARIANTS), "100x100 (8 pieces of clutter) or 60x60 (4)."
)
flags.DEFINE_string("data_dir", None, "Folder with the MNIST IDX files (offline); default: TFDS mnist.")
flags.DEFINE_string("tfds_data_dir", None, "Where TFDS keeps prepared data (its default if unset).")
flags.DEFINE_integer("data_seed", _RUN.data_seed, "Seed of the cluttered images (placements, clutter).")
flags.DEFINE_bool("redraw_clutter", _RUN.redraw_clutter,
                  "Give the training images a fresh digit position and fresh clutter every epoch "
                  "(valid and test stay one fixed set).")  # fmt: skip
flags.DEFINE_integer("glimpses", _MODEL.glimpses, "Glimpses per image (the paper: 8; also 4).")
flags.DEFINE_integer("glimpse_n", _MODEL.glimpse_n, "Glimpse size n (n x n filters; the paper: 12).")
flags.DEFINE_integer("hidden", _MODEL.hidden, "LSTM cells (the paper: 256).")
flags.DEFINE_integer("batch_size", _RUN.batch_size, "Images per step (global, over all devices).")
flags.DEFINE_integer("num_steps", _RUN.num_steps, "Optimiser steps in all (a resumed run continues to this).")
flags.DEFINE_float("learning_rate", _OPTIM.learning_rate, "Adam step size (peak of the schedule).")
flags.DEFINE_float("adam_b1", _OPTIM.adam_b1, "Adam beta1.")
flags.DEFINE_float("clip_norm", _OPTIM.clip_norm, "Global gradient-norm clipping (0 = off).")
flags.DEFINE_enum("lr_schedule", _OPTIM.lr_schedule, ["constant", "cosine"], "Learning-rate schedule.")
flags.DEFINE_integer("warmup_steps", _OPTIM.warmup_steps, "Linear learning-rate warm-up steps.")
flags.DEFINE_float("ema_decay", _OPTIM.ema_decay,
                   "Decay of the parameters' moving average, which evaluation and releases use (0 = none).")  # fmt: skip
flags.DEFINE_integer("seed", _RUN.seed, "Seeds parameters and data order.")
flags.DEFINE_integer("log_every", _RUN.log_every, "Steps between console lines and train summaries.")
flags.DEFINE_integer("eval_every", _RUN.eval_every, "Steps between valid evaluations (0 = at the end).")
flags.DEFINE_integer("checkpoint_every", _RUN.checkpoint_every, "Steps between checkpoints (0 = at the end).")
flags.DEFINE_float("checkpoint_minutes", _RUN.checkpoint_minutes,
                   "Also checkpoint after this many minutes since the last one (0 = by steps only).")  # fmt: skip
flags.DEFINE_integer("keep_checkpoints", _RUN.keep_checkpoints, "Checkpoints kept.")
flags.DEFINE_integer("eval_examples", _RUN.eval_examples, "Valid images per evaluation (0 = all 10,000).")
flags.DEFINE_bool("test", False, "After training, also measure the test error (MNIST test images).")
flags.DEFINE_string("pictures_dir", None, "Draw the glimpse windows on test images here (after training).")
flags.DEFINE_string(
    "init_from",
    None,
    "Start a new run from a released classifier's parameters (a name in draw_jax/pretrained, or the path "
    "of its .json) with a fresh optimiser and schedule; --variant, --glimpses, --glimpse_n and --hidden "
    "default to the release's.",
)
flags.DEFINE_string(
    "pretrained",
    None,
    "Evaluate a released classifier (a name: "
    + ", ".join(pretrained.available("classifier"))
    + "; or the path of its .json) and train "
    "nothing: the valid error, or with --test the test error, on images cluttered with --data_seed. "
    "Writes only NAME_SPLIT_seedS.json into --workdir (and glimpses.png into --pictures_dir).",
)

FLAGS = flags.FLAGS


_MODEL_FLAGS = ("variant", "glimpses", "glimpse_n", "hidden")


def config_from_flags() -> ClassifierRunConfig:
    size = cluttered.VARIANTS[FLAGS.variant][0]
    model = ClassifierConfig(height=size, width=size, glimpses=FLAGS.glimpses, glimpse_n=FLAGS.glimpse_n,
                             hidden=FLAGS.hidden)  # fmt: skip
    variant = FLAGS.variant
    if FLAGS.init_from:  # the release's model, unless a flag typed says otherwise (refused)
        released = pretrained.load_classifier_card(FLAGS.init_from).config
        theirs = {"variant": released.variant, **dataclasses.asdict(released.model)}
        clashes = [f"--{k}={FLAGS[k].value!r} (it has {theirs[k]!r})" for k in _MODEL_FLAGS
                   if FLAGS[k].present and FLAGS[k].value != theirs[k]]  # fmt: skip
        if clashes:
            raise cli.ConfigError(
                f"--init_from={FLAGS.init_from} is a different classifier: {', '.join(clashes)}"
            )
        model, variant = released.model, released.variant
    optim = OptimConfig(learning_rate=FLAGS.learning_rate, adam_b1=FLAGS.adam_b1, clip_norm=FLAGS.clip_norm,
                        lr_schedule=FLAGS.lr_schedule, warmup_steps=FLAGS.warmup_steps,
                        ema_decay=FLAGS.ema_decay)  # fmt: skip
    names = ("data_seed", "redraw_clutter", "data_dir", "tfds_data_dir", "batch_size", "num_steps", "seed", "log_every",
             "eval_every", "checkpoint_every", "checkpoint_minutes", "keep_checkpoints", "eval_examples", "init_from")  # fmt: skip
    return ClassifierRunConfig(
        model=model, optim=optim, variant=variant, **{n: getattr(FLAGS, n) for n in names}
    )


def draw_glimpses(
    config: ClassifierRunConfig, graphdef: nnx.GraphDef, params, out_dir: str, count: int = 8
) -> str:
    """glimpses.png: a row per test image, its G glimpse windows left to right as boxes, labels at the left."""
    path = os.path.join(out_dir, "glimpses.png")
    if os.path.exists(path):
        raise cli.ConfigError(f"{path} exists; remove it or choose another --pictures_dir")
    test = _split("test", config)
    images, labels = test.batch(np.arange(count))
    out = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, images)
    predicted = np.asarray(out.logits.argmax(-1))
    g = config.model.glimpses
    frames = np.broadcast_to(images[None].astype(np.float32) / 255.0, (g, *images.shape))
    win = out.windows
    boxes = [(np.asarray(win.gx[t]), np.asarray(win.gy[t]), np.asarray(win.delta[t])) for t in range(g)]
    boxed = pictures.frames_with_boxes(
        frames, boxes, config.model.glimpse_n, scale=2, ncols=1, color=(255, 48, 48)
    )
    # frames_with_boxes gives one column per glimpse; side by side, a row per image,
    # with "true -> predicted" in a margin on the left.
    strip = np.concatenate(boxed, axis=1)
    margin = np.zeros((strip.shape[0], 64, 3), np.uint8)
    picture = Image.fromarray(np.concatenate([margin, strip], axis=1))
    draw = ImageDraw.Draw(picture)
    row = strip.shape[0] / count
    for i in range(count):
        colour = (255, 255, 255) if predicted[i] == labels[i] else (255, 96, 96)
        draw.text((6, int(row * (i + 0.5)) - 12), f"true {labels[i]}", fill=(255, 255, 255))
        draw.text((6, int(row * (i + 0.5)) + 2), f"pred {predicted[i]}", fill=colour)
    os.makedirs(out_dir, exist_ok=True)
    pictures.save_png(path, np.asarray(picture))
    return path


def _split(split: str, config: ClassifierRunConfig) -> cluttered.ClutteredMNIST:
    return cluttered.load(split, variant=config.variant, seed=config.data_seed, data_dir=config.data_dir,
                          tfds_data_dir=config.tfds_data_dir)  # fmt: skip


# What --pretrained takes besides where the data is and where to write: the
# model and its training are the release's.
_RELEASE_FLAGS = ("pretrained", "workdir", "data_dir", "tfds_data_dir", "data_seed", "test", "pictures_dir")


def evaluate_release(name: str) -> None:
    """--pretrained: the release's error on valid (or, with --test, test) cluttered with --data_seed."""
    extra = sorted(
        f.name for f in FLAGS.get_key_flags_for_module(__name__) if f.present and f.name not in _RELEASE_FLAGS
    )
    if extra:
        names = ", ".join(f"--{n}" for n in extra)
        raise cli.ConfigError(f"--pretrained={name} evaluates a released classifier as it was trained; "
                              f"{names} would train or change it (leave them out)")  # fmt: skip
    graphdef, params, card = pretrained.load_classifier(name)
    config = dataclasses.replace(card.config, data_seed=FLAGS.data_seed, data_dir=FLAGS.data_dir,
                                 tfds_data_dir=FLAGS.tfds_data_dir)  # fmt: skip
    split = "test" if FLAGS.test else "valid"
    workdir = FLAGS.workdir
    cli.check_folder("workdir", workdir)
    if os.path.isfile(os.path.join(workdir, "config.json")):
        raise cli.ConfigError(
            f"--workdir={workdir} holds a training run; give --pretrained its own --workdir"
        )
    if FLAGS.pictures_dir:
        cli.check_folder("pictures_dir", FLAGS.pictures_dir)
    data = _split(split, config)
    logging.info("evaluating %s (step %d) on %d %s images, data seed %d", card.name, card.step, len(data),
                 split, config.data_seed)  # fmt: skip
    result = evaluate_error(graphdef, params, data)
    os.makedirs(workdir, exist_ok=True)
    out = os.path.join(workdir, f"{card.name}_{split}_seed{config.data_seed}.json")
    write_json(out, {"pretrained": card.name, "step": card.step, "split": split,
                     "data_seed": config.data_seed, split: result})  # fmt: skip
    print(f"{split} error {result['error_percent']:.2f}% on {result['num_images']} images "
          f"({card.name}, data seed {config.data_seed}); wrote {out}")  # fmt: skip
    if FLAGS.pictures_dir:
        print(f"wrote {draw_glimpses(config, graphdef, params, FLAGS.pictures_dir)}")


@cli.user_errors_as_messages
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.ConfigError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
    logging.info("devices: %s", jax.devices())
    if FLAGS.pretrained:
        evaluate_release(FLAGS.pretrained)
        return
    config = config_from_flags()
    try:
        results = train_classifier(config, FLAGS.workdir)
    except TrainingDiverged as e:
        cli.fail(str(e), code=3)
    except TrainingInterrupted as e:
        cli.fail(str(e), code=128 + e.signal, at_once=True)  # 130 for Ctrl-C, 143 for SIGTERM
    graphdef = params = None
    if FLAGS.test or FLAGS.pictures_dir:
        graphdef, params, _ = load_classifier(config, FLAGS.workdir)
    if FLAGS.test:
        results["test"] = evaluate_error(graphdef, params, _split("test", config))
        write_json(os.path.join(FLAGS.workdir, "results.json"), results)
        print(f"test error {results['test']['error_percent']:.2f}% on {results['test']['num_images']} images")
    if FLAGS.pictures_dir:
        print(f"wrote {draw_glimpses(config, graphdef, params, FLAGS.pictures_dir)}")
    print(f"done: step {results['step']}, valid error {results['valid']['error_percent']:.2f}%")


if __name__ == "__main__":
    cli.run(main)
