"""The training loop: ``train_and_evaluate(config, workdir)``.

Reads top to bottom: check the workdir, load the data, resolve the config,
restore or initialise the state, then feed the train step until ``num_steps``,
logging, checkpointing and evaluating on the way. The pieces live elsewhere:
the step (``train_step``), the batches (``feeding``), the devices
(``parallel``), the folder (``workdir``), the checkpoints (``checkpoint``),
the numbers (``metrics``, ``evaluation``).

Resumable: data order and every random draw are pure functions of the seed and
the step, so a resumed run repeats an uninterrupted one. The checkpointer and
the metric writers are closed on every way out (context managers): the end,
divergence, an error, and Ctrl-C, which leaves the last completed checkpoint
valid for the same command to resume from.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from draw_jax import data as data_lib
from draw_jax import feeding, interrupts, pictures, pretrained, train_step
from draw_jax import workdir as workdir_lib
from draw_jax.checkpoint import Checkpointer
from draw_jax.config import ConfigError, TrainConfig
from draw_jax.evaluation import SplitEvaluator
from draw_jax.losses import bits_per_dim
from draw_jax.metrics import MetricAccumulator, MetricWriter, Progress, TrainingDiverged, write_json
from draw_jax.parallel import Parallel

__all__ = ["TrainingDiverged", "TrainingInterrupted", "train_and_evaluate", "train_key"]

# Streams derived from the seed, kept apart from one another.
_TRAIN_STREAM = 0x57E9
_EVAL_STREAM = 0xE7A1
_SAMPLE_STREAM = 0x5A3E


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM during training; the message names the checkpoint to resume from.

    ``signal``: which of the two ended the run (a command exits 128 + its number).
    """

    def __init__(self, message: str, sig: signal.Signals = signal.SIGINT) -> None:
        super().__init__(message)
        self.signal = sig


def train_key(seed: int) -> jax.Array:
    """Base key of the training noise; step s uses ``fold_in(train_key(seed), s)``."""
    return jax.random.fold_in(jax.random.key(seed), _TRAIN_STREAM)


def _is_interrupt(e: BaseException) -> bool:
    """Ctrl-C or SIGTERM, also when it landed inside a C call that re-raised it as a SystemError.

    (numpy's dtype machinery reports "returned a result with an exception set"
    with the KeyboardInterrupt as its cause when the signal arrives mid-call.)
    """
    return isinstance(e, KeyboardInterrupt) or isinstance(e.__cause__ or e.__context__, KeyboardInterrupt)


def _crossed(prev: int, now: int, every: int) -> bool:
    return every > 0 and prev // every != now // every


def _load_data(config: TrainConfig) -> tuple[data_lib.Dataset, data_lib.Dataset]:
    d = config.data
    train = data_lib.load_split(d.dataset, "train", d.data_dir, d.tfds_data_dir)
    held_out = data_lib.load_split(d.dataset, d.eval_split, d.data_dir, d.tfds_data_dir)
    if train.images.shape[1:] != config.model.image_shape:
        raise ConfigError(
            f"the model is for images of shape {config.model.image_shape}, but {d.dataset} has "
            f"{train.images.shape[1:]}; build the config with build_config() to take the data set's shape"
        )
    return train, held_out


def train_and_evaluate(config: TrainConfig, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) DRAW in ``workdir``; returns the final figures (also in results.json).

    Raises:
      ConfigError: the workdir holds a different run, or a setting does not fit the data.
      DataError: a data file is missing or malformed.
      TrainingDiverged: a metric became non-finite (the last good checkpoint is kept).
      TrainingInterrupted: Ctrl-C or SIGTERM (the last completed checkpoint is kept).
    """
    is_chief = jax.process_index() == 0
    previous = workdir_lib.previous_config(workdir)
    parallel = Parallel.create(config.data.batch_size)
    train, held_out = _load_data(config)
    cfg = config.resolve(len(train), previous)
    workdir_lib.check_same_run(cfg, previous, workdir)
    run, batch_size = cfg.run, cfg.data.batch_size
    steps_per_epoch = len(train) // batch_size
    steps_per_call = run.steps_per_call_for(steps_per_epoch) if cfg.data.device_data else 1
    if cfg.data.device_data and steps_per_call < run.steps_per_call:
        logging.info(
            "--steps_per_call=%d reduced to %d: it must fit in an epoch (%d steps) and divide "
            "--log_every, --checkpoint_every and --eval_every",
            run.steps_per_call, steps_per_call, steps_per_epoch,
        )  # fmt: skip

    graphdef, params = train_step.init_model(cfg.model, run.seed)
    optimizer = train_step.make_optimizer(cfg.optim)
    keep_average = cfg.optim.ema_decay > 0
    state = train_step.create_train_state(params, optimizer, ema=keep_average)
    with contextlib.ExitStack() as stack:
        stack.enter_context(interrupts.sigterm_as_interrupt())  # SIGTERM ends the run as Ctrl-C does
        checkpoints = stack.enter_context(Checkpointer(workdir, keep=run.keep_checkpoints))
        if checkpoints.latest_step() is not None:
            state = checkpoints.restore(state)
            logging.info("resumed from %s at step %d", checkpoints.directory, int(state.step))
        elif run.init_from is not None:
            released = pretrained.load(run.init_from)
            state = train_step.create_train_state(released.params, optimizer, ema=keep_average)
            logging.info(
                "starting from the released model %s (trained %d steps)", run.init_from, released.step
            )
        if is_chief:
            workdir_lib.save_config(cfg, workdir)
        state = jax.device_put(state, parallel.replicated)
        start = step = int(state.step)
        if start >= run.num_steps:
            logging.info("already at step %d of --num_steps=%d: nothing to train", start, run.num_steps)

        step_kwargs = dict(
            binary=train.binary,
            binarize=cfg.data.binarize,
            kl_warmup_steps=cfg.optim.kl_warmup_steps,
            ema_decay=cfg.optim.ema_decay,
        )
        common = dict(batch_size=batch_size, seed=run.seed, base_key=train_key(run.seed), parallel=parallel)
        if cfg.data.device_data:
            feeder = feeding.DeviceFeeder(
                graphdef, optimizer, train.images, steps_per_call=steps_per_call, **common, **step_kwargs
            )
        else:
            feeder = feeding.HostFeeder(
                graphdef, optimizer, train.images, start_step=start, **common, **step_kwargs
            )

        eval_split = cfg.data.eval_split
        writers = {}
        if is_chief:
            writers = {s: stack.enter_context(MetricWriter(workdir, s)) for s in ("train", eval_split)}
        evaluator = SplitEvaluator(
            graphdef, binary=held_out.binary, binarize=cfg.data.binarize, batch_size=100
        )
        eval_images = held_out.images[: run.eval_examples or None]
        generate = jax.jit(lambda p, k: train_step.apply_model(graphdef, p).generate(k, 64).canvases[-1])
        bound_name = (
            "bound" if cfg.bound_is_likelihood else "cross-entropy bound (grey targets: not a likelihood)"
        )
        last_eval: dict[str, float] = {}
        last_train: dict[str, float] = {}

        def evaluate(step: int) -> None:
            # The run's model is its parameter average when it keeps one; the raw
            # parameters' bound is measured beside it (what the average gained).
            params = train_step.eval_params(state)
            res = evaluator(params, eval_images, seed=run.seed + _EVAL_STREAM)
            last_eval.update(
                bound=res.bound, recon=res.recon, kl=res.kl, step=step, num_images=res.num_images
            )
            scalars = {"bound": res.bound, "recon": res.recon, "kl": res.kl}
            if keep_average:
                raw = evaluator(state.params, eval_images, seed=run.seed + _EVAL_STREAM)
                last_eval.update(bound_raw_params=raw.bound)
                scalars["bound_raw_params"] = raw.bound
            if is_chief:
                key = jax.random.fold_in(jax.random.key(run.seed), _SAMPLE_STREAM)
                samples = np.asarray(jax.nn.sigmoid(generate(params, key)))
                writers[eval_split].scalars(step, scalars)
                writers[eval_split].image(step, "samples", pictures.grid(samples, ncols=8))
                writers[eval_split].flush()
            bpd = bits_per_dim(res.bound, cfg.model.image_shape)
            last_eval.update(bits_per_dim=bpd)
            logging.info(
                "step %d  %s %s %.2f nats = %.3f bits/dim (recon %.2f + KL %.2f) on %d images%s",
                step, eval_split, bound_name, res.bound, bpd, res.recon, res.kl, res.num_images,
                f" (parameter average; raw parameters {last_eval['bound_raw_params']:.2f})"
                if keep_average else "",
            )  # fmt: skip

        def divergence_hint() -> str:
            last = checkpoints.latest_step()
            kept = (
                f"The last good checkpoint (step {last}) is kept in {checkpoints.directory}."
                if last is not None
                else "No checkpoint was written before it diverged; a rerun starts over."
            )
            return f"{kept} Try a lower --learning_rate or --clip_norm, or --kl_warmup_steps."

        acc, progress = MetricAccumulator(), Progress(start, run.num_steps, batch_size)
        t_start, compiled = time.time(), False
        try:
            while step < run.num_steps:
                t0 = time.time()
                state, metrics, k = feeder(state, step, run.num_steps)
                acc.add(metrics)
                prev, step = step, step + k
                if not compiled:
                    jax.block_until_ready(state.step)
                    logging.info("first step (compile + run) took %.1fs", time.time() - t0)
                    compiled = True
                    progress.restart(step)
                last = step >= run.num_steps
                if _crossed(prev, step, run.log_every) or last:
                    acc.drain(step, divergence_hint())
                    progress.update(step)
                    means = acc.means() | {"images_per_s": progress.images_per_s}
                    last_train = {name: float(v) for name, v in means.items() if np.ndim(v) == 0}
                    if is_chief:
                        writers["train"].scalars(step, means)
                    logging.info(
                        "step %d/%d  bound %.2f  recon %.2f  kl %.2f  |g| %.2f  %.0f img/s  eta %s",
                        step, run.num_steps, means["bound"], means["recon"], means["kl"],
                        means["grad_norm"], progress.images_per_s, progress.eta(step),
                    )  # fmt: skip
                if _crossed(prev, step, run.checkpoint_every) or last:
                    acc.drain(step, divergence_hint())  # never save parameters a NaN has touched
                    checkpoints.save(step, state)
                if _crossed(prev, step, run.eval_every) or last:
                    evaluate(step)
                    progress.restart(step)  # evaluation time is not training time
        except (KeyboardInterrupt, SystemError) as e:
            if not _is_interrupt(e):
                raise
            saved, sig = checkpoints.latest_step(), interrupts.signal_of(e)
            how = "interrupted" if sig == signal.SIGINT else f"stopped by {sig.name}"
            if saved is None:
                raise TrainingInterrupted(
                    f"{how} at step {step}, before the first checkpoint (every --checkpoint_every="
                    f"{run.checkpoint_every} steps): the same command starts the run over",
                    sig,
                ) from None
            raise TrainingInterrupted(
                f"{how} at step {step}; the last completed checkpoint (step {saved}) is in "
                f"{checkpoints.directory}: run the same command to resume",
                sig,
            ) from None

        if not last_eval and start >= run.num_steps:
            evaluate(start)
        results = {
            "step": int(step),
            "train": last_train,
            eval_split: last_eval,
            "wall_clock_s_this_process": time.time() - t_start,
            "train_images_per_s": progress.images_per_s if progress.steps else None,
            "steps_per_call": steps_per_call,
            "devices": [str(d) for d in jax.devices()],
            "config": cfg.to_dict(),
        }
        if is_chief:
            write_json(os.path.join(workdir, workdir_lib.RESULTS_FILE), results)
    return results
