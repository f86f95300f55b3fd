"""Parameter averages of one finished run, compared on its own trajectory.

A run's moving average (``--ema_decay``) is a linear function of its raw
parameters, so another decay, or the plain mean of the last K steps
(Polyak-Ruppert), can be formed afterwards from raw checkpoints and evaluated
on the same trajectory: no second run, no seed-to-seed noise in the comparison.
Train with checkpoints every k steps and enough of them kept, then compare:

  python -m experiments.train ... --workdir=W --checkpoint_every=10 --keep_checkpoints=250
  python -m tools.compare_averages --workdir=W --decays=0.99,0.995,0.998 --tails=250,500

The average of decay d is updated once per kept checkpoint with decay d**k,
bias-corrected from the first kept one (``tools.averages``); with
checkpoints at every step from step 1 it is exactly the run's own average,
otherwise an approximation whose error the table shows (the run's own average
is evaluated beside the reconstruction of its decay).
"""

from __future__ import annotations

import os

from absl import app, flags

from draw_jax import train_step
from draw_jax.checkpoint import Checkpointer
from draw_jax.evaluation import SplitEvaluator
from draw_jax.metrics import write_json
from draw_jax.workdir import load_config
from experiments import cli, common_flags
from tools.averages import averages

flags.DEFINE_list("decays", ["0.99", "0.995", "0.998"], "Moving-average decays to form (per step).")
flags.DEFINE_list("tails", ["250", "500"], "Plain means of the last K steps' parameters, one per K.")
flags.DEFINE_integer("eval_examples", 0, "Evaluate on the first N images of --split (0 = all).")
flags.DEFINE_integer("batch_size", 100, "Images per evaluation batch.")
flags.DEFINE_string("output", None, "Also write the table as JSON here (refused if the file exists).")

flags.adopt_module_key_flags(common_flags)  # its flags show in --help

FLAGS = flags.FLAGS


@cli.user_errors_as_messages
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.ConfigError(f"unexpected arguments {argv[1:]}")
    if FLAGS.workdir is None or FLAGS.pretrained is not None:
        raise cli.ConfigError("--workdir (a training run with several raw checkpoints) is required")
    if FLAGS.batch_size < 1:
        raise cli.ConfigError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    if FLAGS.eval_examples < 0:
        raise cli.ConfigError(f"--eval_examples must be >= 0 (0 = all), got {FLAGS.eval_examples}")
    try:
        decays = [float(d) for d in FLAGS.decays]
        tails = [int(k) for k in FLAGS.tails]
    except ValueError as e:
        raise cli.ConfigError(f"--decays takes floats and --tails integers: {e}") from None
    if FLAGS.output is not None and os.path.exists(FLAGS.output):
        raise cli.ConfigError(f"--output={FLAGS.output} exists; nothing was changed")
    config = load_config(FLAGS.workdir)
    graphdef, params = train_step.init_model(config.model, seed=0)
    like = train_step.create_train_state(
        params, train_step.make_optimizer(config.optim), ema=config.optim.ema_decay > 0
    )
    with Checkpointer(FLAGS.workdir, read_only=True) as ckpt:
        steps = sorted(ckpt.all_steps())
        last_state = None

        def raw_params(step: int) -> train_step.Params:
            nonlocal last_state
            last_state = ckpt.restore(like, step)  # the previous one is dropped here
            return last_state.params

        try:
            candidates = averages(steps, raw_params, decays, tails)
        except ValueError as e:
            raise cli.ConfigError(f"{FLAGS.workdir}: {e}") from None
    if last_state.ema is not None:
        candidates[f"run's own average (decay {config.optim.ema_decay:g})"] = last_state.ema
    split, data_cfg = common_flags.load_data(config)
    images = split.images[: FLAGS.eval_examples or None]
    evaluator = SplitEvaluator(
        graphdef, binary=split.binary, binarize=data_cfg.binarize, batch_size=FLAGS.batch_size
    )
    print(
        f"{FLAGS.workdir}: checkpoints {steps[0]}..{steps[-1]} every {steps[1] - steps[0]} steps; "
        f"bound on {split.split} ({len(images)} images, seed {FLAGS.seed})"
    )
    table = {}
    for name, p in candidates.items():
        table[name] = evaluator(p, images, seed=FLAGS.seed).bound
        print(f"  {name:<44}{table[name]:10.2f}")
    if FLAGS.output is not None:
        write_json(FLAGS.output, {"workdir": FLAGS.workdir, "steps": steps, "split": split.split} | table)


if __name__ == "__main__":
    app.run(main)
