"""Evaluates a trained DRAW on a whole split: the bound and an importance-weighted NLL.

``python -m experiments.evaluate --workdir=W --split=test [--num_importance_samples=100]``
prints a table and writes ``<workdir>/eval_<split>_step<N>_k<K>.json``
(``..._first<M>.json`` with ``--num_examples=M``, the split's first M images). With
``--pretrained=NAME`` instead of ``--workdir`` it evaluates a released model
(``--data_dir`` for local files) and writes JSON only where ``--output`` says.
It runs as one process on one device; the workdir of a multi-process run is
evaluated the same way, from any machine that reaches it.
"""

from __future__ import annotations

import dataclasses
import os

from absl import flags

from draw_jax.evaluation import SplitEvaluator
from draw_jax.losses import bits_per_dim
from draw_jax.metrics import write_json
from experiments import cli, common_flags

flags.DEFINE_integer("num_importance_samples", 10, "k for the IWAE estimate (1 = the bound, in expectation).")
flags.DEFINE_integer("batch_size", 100, "Images per evaluation batch.")
flags.DEFINE_integer(
    "num_examples", None, "Evaluate only the split's first this many images (default: all of them)."
)
flags.DEFINE_string("output", None, "JSON path (default: in the workdir; none for --pretrained).")

flags.adopt_module_key_flags(common_flags)  # its flags show in --help

FLAGS = flags.FLAGS


@cli.user_errors_as_messages
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.ConfigError(f"unexpected arguments {argv[1:]}")
    if FLAGS.num_importance_samples < 1:
        raise cli.ConfigError(f"--num_importance_samples must be >= 1, got {FLAGS.num_importance_samples}")
    if FLAGS.batch_size < 1:
        raise cli.ConfigError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    if FLAGS.num_examples is not None and FLAGS.num_examples < 1:
        raise cli.ConfigError(f"--num_examples must be >= 1, got {FLAGS.num_examples}")
    trained, source = common_flags.load_model()
    split, data_cfg = common_flags.load_data(trained.config)
    images, total = split.images, len(split.images)
    if FLAGS.num_examples is not None:
        if FLAGS.num_examples > total:
            raise cli.ConfigError(
                f"--num_examples={FLAGS.num_examples}, but {split.name}/{split.split} has {total} images"
            )
        images = images[: FLAGS.num_examples]
    evaluator = SplitEvaluator(
        trained.graphdef,
        binary=split.binary,
        binarize=data_cfg.binarize,
        batch_size=FLAGS.batch_size,
        num_importance_samples=FLAGS.num_importance_samples,
    )
    res = evaluator(trained.params, images, seed=FLAGS.seed)
    k = res.num_importance_samples
    which = (
        f"{res.num_images} images"
        if res.num_images == total
        else f"its first {res.num_images} of {total} images"
    )
    print(f"DRAW {source} step {trained.step} on {split.name}/{split.split} ({which})")
    is_likelihood = trained.config.bound_is_likelihood
    if is_likelihood:
        bound_label, iwae_label = "variational bound (nats)", f"IWAE estimate of -log p(x), k={k}"
    else:  # a Bernoulli loss on grey levels is a cross-entropy, not a likelihood
        print("  (grey targets, --binarize=none: cross-entropies, not likelihoods)")
        bound_label, iwae_label = "cross-entropy bound (nats)", f"importance-weighted cross-entropy, k={k}"
    print(f"  {bound_label:<44}{res.bound:10.2f}")
    print(f"  {'  reconstruction':<44}{res.recon:10.2f}")
    print(f"  {'  KL':<44}{res.kl:10.2f}")
    print(f"  {iwae_label:<44}{res.iwae:10.2f}")
    shape = trained.config.model.image_shape
    bpd = {
        "bound_bits_per_dim": bits_per_dim(res.bound, shape),
        "iwae_bits_per_dim": bits_per_dim(res.iwae, shape),
    }
    if is_likelihood:  # the unit of colour benchmarks (CIFAR-10); nats per image above
        print(f"  {'bound, bits per dimension':<44}{bpd['bound_bits_per_dim']:10.3f}")
        print(f"  {'IWAE estimate, bits per dimension':<44}{bpd['iwae_bits_per_dim']:10.3f}")
    path = FLAGS.output
    if path is None and FLAGS.workdir is not None:
        subset = "" if res.num_images == total else f"_first{res.num_images}"
        path = os.path.join(FLAGS.workdir, f"eval_{split.split}_step{trained.step}_k{k}{subset}.json")
    if path is None:
        return
    payload = {
        "model": source,
        "step": trained.step,
        "dataset": split.name,
        "split": split.split,
        "split_size": total,
        "seed": FLAGS.seed,
        "binarize": data_cfg.binarize,
        "is_likelihood": is_likelihood,
        "likelihood": trained.config.model.likelihood,
    }
    write_json(path, payload | dataclasses.asdict(res) | bpd)
    print(f"wrote {path}")


if __name__ == "__main__":
    cli.run(main)
