"""Trains DRAW: ``python -m experiments.train --attention=true [--data_dir=...]``.

Flags (one per setting of ``draw_jax.config``, made from its declarations) ->
``build_config`` -> ``draw_jax.train_loop.train_and_evaluate``. Defaults are
the paper's MNIST setup (binarized MNIST, T=64, 256/256 LSTMs, z 100, read 2x2,
write 5x5, batch 100); ``--preset`` picks another named configuration. Re-running
the same command in the same --workdir resumes it, with the settings of the
run's own config.json (``settings.resumed_config``); Ctrl-C or SIGTERM
(``timeout``, ``kill``, a scheduler) keeps the last completed checkpoint for that.
"""

from __future__ import annotations

from draw_jax import interrupts

if __name__ == "__main__":  # Ctrl-C or SIGTERM from the first moment: one line, never a traceback
    interrupts.exit_promptly(
        lambda sig: f"error: {interrupts.describe(sig)} while starting up: nothing was trained"
    )

import jax
from absl import flags, logging

from draw_jax import settings as settings_lib
from draw_jax import workdir as workdir_lib
from draw_jax.loop import ProcessGone
from draw_jax.train_loop import TrainingDiverged, TrainingInterrupted, train_and_evaluate
from experiments import cli

SETTINGS = cli.define_config_flags()
flags.DEFINE_string("workdir", "runs/draw", "Checkpoints, config.json, TensorBoard events, results.json.")
flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() with its auto-detection (Cloud TPU, SLURM, Open MPI).",
)
cli.define_process_flags()

flags.adopt_module_key_flags(cli)  # the generated flags show in --help

FLAGS = flags.FLAGS


@cli.user_errors_as_messages
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.ConfigError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
    # Validated before anything is loaded or compiled. A run already in --workdir
    # resumes with its own config.json; only the flags typed are checked against it.
    cli.check_folder("workdir", FLAGS.workdir)
    previous = workdir_lib.previous_config(FLAGS.workdir)
    if previous is None:
        config = cli.config_from_flags(SETTINGS)
    else:
        preset, given = cli.typed_settings(SETTINGS)
        config = settings_lib.resumed_config(previous, FLAGS.workdir, preset, **given)
        logging.info("resuming the run in %s with its config.json", FLAGS.workdir)
    cli.start_processes(auto_detect=FLAGS.distributed)
    logging.info("devices: %s", jax.devices())
    try:
        results = train_and_evaluate(config, FLAGS.workdir)
    except TrainingDiverged as e:
        cli.fail(str(e), code=3)
    except TrainingInterrupted as e:
        cli.fail(str(e), code=128 + e.signal, at_once=True)  # 130 for Ctrl-C, 143 for SIGTERM
    except ProcessGone as e:  # at once: JAX's exit-time barrier would wait for the lost process, then abort
        cli.fail(str(e), code=4, at_once=True)
    split = config.data.eval_split
    logging.info(
        "done: step %d, %s bound %.2f nats", results["step"], split, results[split].get("bound", float("nan"))
    )


if __name__ == "__main__":
    cli.run(main)
