"""Training the cluttered-MNIST attention classifier: ``train_classifier(config, workdir)``.

The classifier is a task of the one training loop (``loop.run``), as DRAW is:
the loop restores, logs, checkpoints, evaluates and handles divergence and
interrupts; this module gives the classifier's config, state, train step,
feeder and evaluation. It shares DRAW's clipped Adam and its schedules
(``train_step.make_optimizer``), ``TrainState``, the data order
(``feeding.train_indices``) and data parallelism (``parallel.Parallel``).
Resuming repeats an uninterrupted run: the batches of step s depend only on
the seeds and s.

Workdir: ``config.json``, ``checkpoints/``, ``tb/{train,valid}``, ``results.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from draw_jax import cluttered, feeding, pretrained, train_step
from draw_jax.checkpoint import Checkpointer
from draw_jax.classifier import loss_and_accuracy
from draw_jax.classifier_run import ClassifierRunConfig, init_classifier
from draw_jax.config import ConfigError
from draw_jax.loop import Schedule
from draw_jax.loop import run as run_loop
from draw_jax.metrics import MetricWriter, write_json
from draw_jax.parallel import Parallel, data_parallel_grad

__all__ = [
    "ClassifierRunConfig",
    "evaluate_error",
    "init_classifier",
    "load_classifier",
    "make_classifier_step",
    "train_classifier",
]


def _init(config: ClassifierRunConfig):
    optim = config.optim
    if optim.decay_steps is None:
        optim = dataclasses.replace(optim, decay_steps=config.num_steps)
    optimizer = train_step.make_optimizer(optim)
    graphdef, params = init_classifier(config)
    state = train_step.create_train_state(params, optimizer, ema=optim.ema_decay > 0)
    return graphdef, state, optimizer


def load_classifier(config: ClassifierRunConfig, workdir: str) -> tuple[nnx.GraphDef, Any, int]:
    """(graphdef, params, step) of the latest checkpoint of a classifier run in ``workdir``.

    The parameters are the ones it is evaluated with: the moving average if the run keeps one.
    """
    graphdef, like, _ = _init(config)
    with Checkpointer(workdir, read_only=True) as checkpoints:
        state = checkpoints.restore(like)
    return graphdef, train_step.eval_params(state), int(state.step)


def make_classifier_step(
    graphdef: nnx.GraphDef, optimizer, batch_sharding=None, *, ema_decay: float = 0.0, jit: bool = True
):
    """``step(state, images uint8 [b,h,w,c], labels int32 [b]) -> (state, {loss, accuracy, grad_norm})``.

    With ``ema_decay`` > 0 the state carries a moving average of the parameters
    (``train_step.update_ema``), which evaluation and releases use.
    """

    def step(state: train_step.TrainState, images: jax.Array, labels: jax.Array):
        if batch_sharding is not None:
            images = jax.lax.with_sharding_constraint(images, batch_sharding)

        def loss_fn(params, images, labels):
            loss, acc = loss_and_accuracy(nnx.merge(graphdef, params)(images).logits, labels)
            return loss, {"loss": loss, "accuracy": acc}

        grads, means = data_parallel_grad(loss_fn, batch_sharding)(state.params, images, labels)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = jax.tree.map(jnp.add, state.params, updates)
        ema = state.ema
        if ema is not None:
            ema = train_step.update_ema(ema, params, state.step + 1, ema_decay)
        metrics = {**means, "grad_norm": optax.tree.norm(grads)}
        new = train_step.TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
        return new, metrics

    return jax.jit(step, donate_argnums=0) if jit else step


def evaluate_error(
    graphdef: nnx.GraphDef,
    params: Any,
    data: cluttered.ClutteredMNIST,
    count: int = 0,
    batch_size: int = 100,
    parallel: Parallel | None = None,
) -> dict[str, float]:
    """Classification error (%) and mean cross-entropy over the first ``count`` examples (0 = all).

    With ``parallel``, each batch is split over all devices (as ``evaluation.SplitEvaluator``).
    """
    count = count or len(data)
    if parallel is not None:
        batch_size = parallel.eval_batch_size(batch_size)
    put = parallel.put_batch if parallel else (lambda batch: batch)
    gather = parallel.gather if parallel else jax.device_get

    @jax.jit
    def per_batch(params, images, labels):
        logits = nnx.merge(graphdef, params)(images).logits
        wrong = jnp.argmax(logits, -1) != labels
        xent = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
        return wrong, xent

    wrong = xent = 0.0
    for start in range(0, count, batch_size):
        idx = np.arange(start, min(start + batch_size, count))
        images, labels = data.batch(idx)
        pad = batch_size - len(idx)  # one compiled shape: pad the last batch, mask it out
        if pad:
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
            labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
        w, x = gather(per_batch(params, put(images), put(labels)))
        wrong += float(w[: len(idx)].sum())
        xent += float(x[: len(idx)].sum())
    return {"error_percent": 100.0 * wrong / count, "xent": xent / count, "num_images": count}


class _ClassifierFeeder:
    """One host batch per step, in ``feeding.train_indices``' order (the ``feeding.Feeder`` protocol)."""

    steps_per_call = 1

    def __init__(self, step_fn, train: cluttered.ClutteredMNIST, config: ClassifierRunConfig,
                 parallel: Parallel, start_step: int) -> None:  # fmt: skip
        self._step_fn, self._train, self._parallel = step_fn, train, parallel
        self._order = feeding.train_indices(len(train), config.batch_size, config.seed, start_step)
        self._steps_per_epoch = len(train) // config.batch_size
        self._redraw, self._next_step = config.redraw_clutter, start_step

    def __call__(self, state, step, num_steps):
        epoch = self._next_step // self._steps_per_epoch if self._redraw else 0
        self._next_step += 1
        images, labels = self._train.batch(next(self._order), epoch)
        put = self._parallel.put_batch
        state, metrics = self._step_fn(state, put(images), put(labels))
        return state, jax.tree.map(lambda a: a[None], metrics), 1


class _ClassifierTask:
    """The classifier as ``loop.run`` trains it (see ``loop.Task``)."""

    eval_split = "valid"

    def __init__(self, config: ClassifierRunConfig, train, valid, parallel: Parallel) -> None:
        self.config, self.train, self.valid, self.parallel = config, train, valid, parallel
        self.schedule = Schedule(
            num_steps=config.num_steps,
            batch_size=config.batch_size,
            log_every=config.log_every,
            checkpoint_every=config.checkpoint_every,
            eval_every=config.eval_every,
            keep_checkpoints=config.keep_checkpoints,
            checkpoint_minutes=config.checkpoint_minutes,
        )
        self.replicated = parallel.replicated
        self.graphdef, self._state, optimizer = _init(config)
        self._optimizer = optimizer
        self._step_fn = make_classifier_step(
            self.graphdef, optimizer, parallel.batch, ema_decay=config.optim.ema_decay
        )

    def init_state(self) -> train_step.TrainState:
        return self._state

    def first_state(self, state: train_step.TrainState) -> train_step.TrainState:
        # Only a new run reads the release: a resumed one continues from its checkpoint.
        released = _released_start(self.config)
        if released is None:
            return state
        params, card = released
        logging.info("starting from the released classifier %s (trained %d steps)", card.name, card.step)
        return train_step.create_train_state(params, self._optimizer, ema=self.config.optim.ema_decay > 0)

    def feeder(self, start_step: int) -> _ClassifierFeeder:
        return _ClassifierFeeder(self._step_fn, self.train, self.config, self.parallel, start_step)

    def summary(self, means: dict[str, float]) -> str:
        return f"loss {means['loss']:.4f}  accuracy {means['accuracy']:.3f}  |g| {means['grad_norm']:.2f}"

    def evaluate(
        self, state: train_step.TrainState, step: int, writer: MetricWriter | None
    ) -> dict[str, float]:
        res = evaluate_error(
            self.graphdef, train_step.eval_params(state), self.valid, self.config.eval_examples,
            parallel=self.parallel,
        )  # fmt: skip
        if writer is not None:
            writer.scalars(step, {"error_percent": res["error_percent"], "loss": res["xent"]})
        logging.info("step %d  valid error %.2f%%  xent %.4f (%d images)", step,
                     res["error_percent"], res["xent"], res["num_images"])  # fmt: skip
        return res

    def divergence_advice(self) -> str:
        return "Try a lower --learning_rate or --clip_norm."

    def results(self) -> dict[str, Any]:
        return {"config": self.config.to_dict()}


def _released_start(config: ClassifierRunConfig) -> tuple[Any, Any] | None:
    """(params, card) of ``config.init_from``'s release, or None without one.

    Raises:
      PretrainedError: unknown, missing or corrupted release (naming it).
      ConfigError: the release is another model or variant than ``config``'s, naming what differs.
    """
    if config.init_from is None:
        return None
    card = pretrained.load_classifier_card(config.init_from)
    ours = {"variant": config.variant, **dataclasses.asdict(config.model)}
    theirs = {"variant": card.config.variant, **dataclasses.asdict(card.config.model)}
    clashes = [f"{k} {ours[k]!r} (it has {theirs[k]!r})" for k in sorted(ours) if ours[k] != theirs[k]]
    if clashes:
        raise ConfigError(f"--init_from={config.init_from} is a different classifier: {', '.join(clashes)}")
    _, params, card = pretrained.load_classifier(config.init_from)
    return params, card


def train_classifier(config: ClassifierRunConfig, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the classifier in ``workdir``; returns the final figures (also results.json).

    With ``config.init_from`` a new run starts from that release's parameters
    (a resumed one from its checkpoint).

    Raises:
      ConfigError: the workdir holds a different run, or a setting does not fit.
      PretrainedError: ``config.init_from`` is unknown, missing or corrupted.
      DataError: MNIST files missing or malformed.
      TrainingDiverged: the loss became non-finite (the last good checkpoint is kept).
      TrainingInterrupted: Ctrl-C or SIGTERM (the last completed checkpoint is kept).
    """
    config_path = os.path.join(workdir, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            previous = ClassifierRunConfig.from_dict(json.load(f))
        if previous.identity() != config.identity():
            diffs = [k for k in config.identity() if config.identity()[k] != previous.identity()[k]]
            raise ConfigError(f"--workdir={workdir} holds a different classifier run (differs in: "
                              f"{', '.join(diffs)}); use a new --workdir or the same flags to resume")  # fmt: skip
    load = dict(variant=config.variant, seed=config.data_seed, data_dir=config.data_dir,
                tfds_data_dir=config.tfds_data_dir)  # fmt: skip
    train, valid = cluttered.load("train", **load), cluttered.load("valid", **load)
    if config.batch_size > len(train):
        raise ConfigError(
            f"--batch_size={config.batch_size} is larger than the training split ({len(train)})"
        )
    task = _ClassifierTask(config, train, valid, Parallel.create(config.batch_size))
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        write_json(config_path, config.to_dict())
    return run_loop(task, workdir)
