"""Releases a trained workdir as a named pretrained model (parameters + card).

``python -m tools.export_pretrained --workdir=W --name=binarized_mnist_attention --data_dir=DIR``
measures the bound on the whole valid split (and on the slice the tests
re-measure), then writes ``draw_jax/pretrained/<name>.npz`` and ``<name>.json``
(see ``draw_jax.pretrained``). Existing files are kept unless --overwrite.
``--param_dtype=float16`` stores the parameters in half the space, where
rounding moves the valid bound by at most ``--max_bound_change`` nats.

A cluttered-MNIST classifier's workdir (``experiments.classify_cluttered``) is
released the same way, with ``--data_dir`` the MNIST IDX folder: its card
holds the valid error and the test error for each of ``--test_seeds``.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags

from draw_jax import cluttered, pretrained
from draw_jax import data as data_lib
from draw_jax.classifier_training import ClassifierRunConfig, evaluate_error, load_classifier
from draw_jax.evaluation import SplitEvaluator
from draw_jax.workdir import load_trained
from experiments import cli

flags.DEFINE_string("workdir", None, "The training workdir to release.", required=True)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("name", None, "The name users load it by, e.g. binarized_mnist_attention.", required=True)
flags.DEFINE_string("output_dir", pretrained.PRETRAINED_DIR, "Where the .npz and .json go.")
flags.DEFINE_string("data_dir", None, "Local data files for measuring the valid bound (default: TFDS).")
flags.DEFINE_integer("slice_size", 500, "Valid images in the slice the tests re-measure.")
flags.DEFINE_integer("num_importance_samples", 0, "k for an IWAE figure on valid in the card (0: none).")
flags.DEFINE_multi_string("note", [], "key=value lines for the card's notes (recipe, command, machine, ...).")
flags.DEFINE_bool("overwrite", False, "Replace a released model of the same name.")
flags.DEFINE_integer(
    "previous_steps",
    0,
    "Steps its starting parameters had already been trained (a run started with --init_from): "
    "the card records the total.",
)

flags.DEFINE_enum(
    "param_dtype",
    "float32",
    list(pretrained.PARAM_DTYPES),
    "How the .npz stores the parameters. float16 halves the file; it is refused where rounding "
    "moves the valid bound by more than --max_bound_change.",
)
flags.DEFINE_float(
    "max_bound_change",
    0.01,
    "Nats: how far rounding to --param_dtype may move the valid bound (seed 0) and still count as unchanged.",
)
flags.DEFINE_list("test_seeds", ["0", "1", "2"], "A classifier's card: the clutter seeds of its test errors.")

FLAGS = flags.FLAGS


def _is_classifier_run(workdir: str) -> bool:
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            return "variant" in json.load(f)
    except (OSError, ValueError):
        return False  # load_trained names what is wrong with it


def export_classifier(notes: dict[str, str]) -> None:
    """Releases a classifier run: valid error (the run's data seed) and test error per --test_seeds."""
    if FLAGS.step is not None:
        raise cli.ConfigError("--step is for DRAW runs; a classifier is released at its latest step")
    if FLAGS.param_dtype != "float32":
        raise cli.ConfigError("--param_dtype is for DRAW releases; a classifier is released in float32")
    try:
        seeds = sorted({int(s) for s in FLAGS.test_seeds})
    except ValueError as e:
        raise cli.ConfigError(f"--test_seeds must be integers, got {FLAGS.test_seeds}") from e
    with open(os.path.join(FLAGS.workdir, "config.json")) as f:
        config = ClassifierRunConfig.from_dict(json.load(f))
    config = dataclasses.replace(config, data_dir=FLAGS.data_dir, tfds_data_dir=None)
    if FLAGS.previous_steps and config.init_from is None:
        raise cli.ConfigError(f"--previous_steps: {FLAGS.workdir} did not start from --init_from parameters")
    graphdef, params, step = load_classifier(config, FLAGS.workdir)
    step += FLAGS.previous_steps

    def error(split: str, seed: int) -> float:
        images = cluttered.load(split, variant=config.variant, seed=seed, data_dir=FLAGS.data_dir)
        return evaluate_error(graphdef, params, images)["error_percent"]

    valid = error("valid", config.data_seed)
    tests = {seed: error("test", seed) for seed in seeds}
    card = pretrained.save_classifier(
        config,
        params,
        step,
        os.path.join(FLAGS.output_dir, FLAGS.name),
        name=FLAGS.name,
        valid_error=valid,
        test_error=tests,
        notes=notes,
        overwrite=FLAGS.overwrite,
    )
    shown = ", ".join(f"seed {k}: {v:.2f}%" for k, v in card.test_error.items())
    print(f"released {FLAGS.name}: step {card.step}, valid error {card.valid_error:.2f}%, "
          f"test error {shown}, sha256 {card.sha256}")  # fmt: skip


@cli.user_errors_as_messages
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.ConfigError(f"unexpected arguments {argv[1:]}")
    notes = {}
    for line in FLAGS.note:
        key, sep, value = line.partition("=")
        if not sep:
            raise cli.ConfigError(f"--note must be key=value, got {line!r}")
        notes[key] = value
    if FLAGS.previous_steps < 0:
        raise cli.ConfigError(f"--previous_steps must be >= 0, got {FLAGS.previous_steps}")
    if FLAGS.max_bound_change < 0:
        raise cli.ConfigError(f"--max_bound_change must be >= 0, got {FLAGS.max_bound_change}")
    if _is_classifier_run(FLAGS.workdir):
        export_classifier(notes)
        return
    trained = load_trained(FLAGS.workdir, FLAGS.step)
    if FLAGS.previous_steps and trained.config.run.init_from is None:
        raise cli.ConfigError(f"--previous_steps: {FLAGS.workdir} did not start from --init_from parameters")
    trained = dataclasses.replace(trained, step=trained.step + FLAGS.previous_steps)
    data = trained.config.data
    split = data_lib.load_split(data.dataset, "valid", FLAGS.data_dir, data.tfds_data_dir)
    if not 1 <= FLAGS.slice_size <= len(split.images):
        raise cli.ConfigError(f"--slice_size must be in [1, {len(split.images)}], got {FLAGS.slice_size}")

    def bound(images, k=0):
        evaluator = SplitEvaluator(
            trained.graphdef,
            binary=split.binary,
            binarize=data.binarize,
            batch_size=100,
            num_importance_samples=k,
        )
        return evaluator(trained.params, images, seed=0)

    if FLAGS.param_dtype != "float32":  # the card's figures are the stored parameters'
        full = bound(split.images).bound
        trained = dataclasses.replace(
            trained, params=pretrained.stored_params(trained.params, FLAGS.param_dtype)
        )
    whole = bound(split.images, FLAGS.num_importance_samples)
    if FLAGS.param_dtype != "float32":
        if abs(whole.bound - full) > FLAGS.max_bound_change:
            raise cli.ConfigError(
                f"--param_dtype={FLAGS.param_dtype} moves the valid bound from {full:.4f} to "
                f"{whole.bound:.4f} nats, more than --max_bound_change={FLAGS.max_bound_change}; "
                "release it in float32"
            )
        notes["valid_bound_float32"] = f"{full:.4f} (stored in {FLAGS.param_dtype}: {whole.bound:.4f})"
    part = bound(split.images[: FLAGS.slice_size])
    if whole.iwae is not None:
        notes[f"valid_iwae_k{whole.num_importance_samples}"] = f"{whole.iwae:.2f}"
    notes["valid_recon_kl"] = f"{whole.recon:.2f} + {whole.kl:.2f}"
    card = pretrained.save(
        trained,
        os.path.join(FLAGS.output_dir, FLAGS.name),
        name=FLAGS.name,
        valid_bound=whole.bound,
        slice_bound=part.bound,
        slice_size=FLAGS.slice_size,
        notes=notes,
        overwrite=FLAGS.overwrite,
        param_dtype=FLAGS.param_dtype,
    )
    print(
        f"released {FLAGS.name}: step {card.step}, valid bound {card.valid_bound:.2f} nats "
        f"(first {card.slice_size}: {card.slice_bound:.2f}), sha256 {card.sha256}"
    )


if __name__ == "__main__":
    app.run(main)
