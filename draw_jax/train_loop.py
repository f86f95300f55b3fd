"""Training DRAW: ``train_and_evaluate(config, workdir)``.

Reads top to bottom: check the workdir, load the data, resolve the config,
then hand DRAW's task to the one training loop (``loop.run``): its initial
state (fresh, or ``--init_from`` a released model), its feeder (``feeding``:
host batches, or the split kept on the device), its console line and its
evaluation (the bound on the held-out split, and samples for TensorBoard).
The other pieces live elsewhere: the step (``train_step``), the devices
(``parallel``), the folder (``workdir``), the numbers (``metrics``,
``evaluation``).

Resumable: data order and every random draw are pure functions of the seed and
the step, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging

from draw_jax import data as data_lib
from draw_jax import feeding, pictures, pretrained, train_step
from draw_jax import workdir as workdir_lib
from draw_jax.config import ConfigError, TrainConfig
from draw_jax.evaluation import SplitEvaluator
from draw_jax.loop import Schedule, TrainingDiverged, TrainingInterrupted
from draw_jax.loop import run as run_loop
from draw_jax.losses import bits_per_dim
from draw_jax.metrics import MetricWriter
from draw_jax.parallel import Parallel

__all__ = ["TrainingDiverged", "TrainingInterrupted", "train_and_evaluate", "train_key"]

# Streams derived from the seed, kept apart from one another.
_TRAIN_STREAM = 0x57E9
_EVAL_STREAM = 0xE7A1
_SAMPLE_STREAM = 0x5A3E


def train_key(seed: int) -> jax.Array:
    """Base key of the training noise; step s uses ``fold_in(train_key(seed), s)``."""
    return jax.random.fold_in(jax.random.key(seed), _TRAIN_STREAM)


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


class _DrawTask:
    """DRAW as ``loop.run`` trains it (see ``loop.Task``)."""

    def __init__(
        self, cfg: TrainConfig, train: data_lib.Dataset, held_out: data_lib.Dataset, parallel: Parallel
    ) -> None:
        run = cfg.run
        self.cfg, self.train, self.parallel = cfg, train, parallel
        self.schedule = Schedule(
            num_steps=run.num_steps,
            batch_size=cfg.data.batch_size,
            log_every=run.log_every,
            checkpoint_every=run.checkpoint_every,
            eval_every=run.eval_every,
            keep_checkpoints=run.keep_checkpoints,
            checkpoint_minutes=run.checkpoint_minutes,
        )
        self.eval_split = cfg.data.eval_split
        self.replicated = parallel.replicated
        steps_per_epoch = len(train) // cfg.data.batch_size
        self.steps_per_call = run.steps_per_call_for(steps_per_epoch) if cfg.data.device_data else 1
        if cfg.data.device_data and self.steps_per_call < run.steps_per_call:
            logging.info(
                "--steps_per_call=%d reduced to %d: it must fit in an epoch (%d steps) and divide "
                "--log_every, --checkpoint_every and --eval_every",
                run.steps_per_call, self.steps_per_call, steps_per_epoch,
            )  # fmt: skip
        self.graphdef, self._params = train_step.init_model(cfg.model, run.seed)
        self.optimizer = train_step.make_optimizer(cfg.optim)
        self.keep_average = cfg.optim.ema_decay > 0
        self.evaluator = SplitEvaluator(
            self.graphdef,
            binary=held_out.binary,
            binarize=cfg.data.binarize,
            batch_size=100,
            parallel=parallel,
        )
        self.eval_images = held_out.images[: run.eval_examples or None]
        graphdef = self.graphdef
        self.generate = jax.jit(lambda p, k: train_step.apply_model(graphdef, p).generate(k, 64).canvases[-1])

    def init_state(self) -> train_step.TrainState:
        return train_step.create_train_state(self._params, self.optimizer, ema=self.keep_average)

    def first_state(self, state: train_step.TrainState) -> train_step.TrainState:
        name = self.cfg.run.init_from
        if name is None:
            return state
        released = pretrained.load(name)
        logging.info("starting from the released model %s (trained %d steps)", name, released.step)
        return train_step.create_train_state(released.params, self.optimizer, ema=self.keep_average)

    def feeder(self, start_step: int) -> feeding.Feeder:
        cfg = self.cfg
        common = dict(
            batch_size=cfg.data.batch_size,
            seed=cfg.run.seed,
            base_key=train_key(cfg.run.seed),
            parallel=self.parallel,
            binary=self.train.binary,
            binarize=cfg.data.binarize,
            kl_warmup_steps=cfg.optim.kl_warmup_steps,
            ema_decay=cfg.optim.ema_decay,
        )
        images = self.train.images
        if cfg.data.device_data:
            return feeding.DeviceFeeder(
                self.graphdef, self.optimizer, images, steps_per_call=self.steps_per_call, **common
            )
        return feeding.HostFeeder(self.graphdef, self.optimizer, images, start_step=start_step, **common)

    def summary(self, means: dict[str, float]) -> str:
        return (
            f"bound {means['bound']:.2f}  recon {means['recon']:.2f}  kl {means['kl']:.2f}  "
            f"|g| {means['grad_norm']:.2f}"
        )

    def evaluate(
        self, state: train_step.TrainState, step: int, writer: MetricWriter | None
    ) -> dict[str, float]:
        # The run's model is its parameter average when it keeps one; the raw
        # parameters' bound is measured beside it (what the average gained).
        cfg, seed = self.cfg, self.cfg.run.seed
        params = train_step.eval_params(state)
        res = self.evaluator(params, self.eval_images, seed=seed + _EVAL_STREAM)
        bpd = bits_per_dim(res.bound, cfg.model.image_shape)
        out = dict(
            bound=res.bound, recon=res.recon, kl=res.kl, step=step, num_images=res.num_images,
            bits_per_dim=bpd,
        )  # fmt: skip
        scalars = {"bound": res.bound, "recon": res.recon, "kl": res.kl}
        if self.keep_average:
            raw = self.evaluator(state.params, self.eval_images, seed=seed + _EVAL_STREAM)
            out["bound_raw_params"] = scalars["bound_raw_params"] = raw.bound
        if writer is not None:
            key = jax.random.fold_in(jax.random.key(seed), _SAMPLE_STREAM)
            samples = np.asarray(jax.nn.sigmoid(self.generate(params, key)))
            writer.scalars(step, scalars)
            writer.image(step, "samples", pictures.grid(samples, ncols=8))
            writer.flush()
        bound_name = (
            "bound" if cfg.bound_is_likelihood else "cross-entropy bound (grey targets: not a likelihood)"
        )
        logging.info(
            "step %d  %s %s %.2f nats = %.3f bits/dim (recon %.2f + KL %.2f) on %d images%s",
            step, self.eval_split, bound_name, res.bound, bpd, res.recon, res.kl, res.num_images,
            f" (parameter average; raw parameters {out['bound_raw_params']:.2f})"
            if self.keep_average else "",
        )  # fmt: skip
        return out

    def divergence_advice(self) -> str:
        return "Try a lower --learning_rate or --clip_norm, or --kl_warmup_steps."

    def results(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict()}


def train_and_evaluate(config: TrainConfig, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) DRAW in ``workdir``; returns the final figures (also in results.json).

    Raises:
      ConfigError: the workdir holds a different run, or a setting does not fit the data.
      DataError: a data file is missing or malformed.
      TrainingDiverged: a metric became non-finite (the last good checkpoint is kept).
      TrainingInterrupted: Ctrl-C or SIGTERM (the last completed checkpoint is kept).
    """
    previous = workdir_lib.previous_config(workdir)
    parallel = Parallel.create(config.data.batch_size)
    train, held_out = _load_data(config)
    cfg = config.resolve(len(train), previous)
    workdir_lib.check_same_run(cfg, previous, workdir)
    task = _DrawTask(cfg, train, held_out, parallel)
    if jax.process_index() == 0:
        workdir_lib.save_config(cfg, workdir)
    return run_loop(task, workdir)
