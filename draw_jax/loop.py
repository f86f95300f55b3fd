"""The one training loop: ``run(task, workdir)``, for DRAW and for the classifier.

A ``Task`` says what is trained: its initial state, a feeder that runs the
train step on the next batches, a console summary of the train metrics, and
an evaluation. The loop owns everything else, the same for every task:
restore the latest checkpoint or start fresh, feed steps until
``num_steps``, log, checkpoint and evaluate on the way, stop at the first
non-finite metric (``TrainingDiverged``), and end on Ctrl-C or SIGTERM with
the last completed checkpoint named (``TrainingInterrupted``). The
checkpointer and the metric writers are closed on every way out.

DRAW's task is in ``train_loop`` (``train_and_evaluate``), the classifier's in
``classifier_training`` (``train_classifier``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
from typing import Any, Protocol

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from draw_jax import feeding, interrupts
from draw_jax.checkpoint import Checkpointer, CheckpointError
from draw_jax.metrics import MetricAccumulator, MetricWriter, Progress, TrainingDiverged, write_json
from draw_jax.train_step import TrainState
from draw_jax.workdir import RESULTS_FILE

__all__ = ["ProcessGone", "Schedule", "Task", "TrainingDiverged", "TrainingInterrupted", "run"]


class ProcessGone(RuntimeError):
    """In a run of several processes, another process stopped answering; the message names the
    checkpoint to resume from (all processes restarted with the same command)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM during training; the message names the checkpoint to resume from.

    ``signal``: which of the two ended the run (a command exits 128 + its number).
    """

    def __init__(self, message: str, sig: signal.Signals = signal.SIGINT) -> None:
        super().__init__(message)
        self.signal = sig


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long a run trains and how often it logs, saves and evaluates (0 = only at the end)."""

    num_steps: int
    batch_size: int
    log_every: int
    checkpoint_every: int
    eval_every: int
    keep_checkpoints: int
    checkpoint_minutes: float = 0.0  # also save once this much training time has passed (0 = off)


class Task(Protocol):
    """What ``run`` trains."""

    schedule: Schedule
    eval_split: str  # the name of the evaluation's TensorBoard folder and results entry
    replicated: jax.sharding.Sharding  # where the state lives

    def init_state(self) -> TrainState:
        """A freshly initialised state (also the structure a checkpoint restores into)."""

    def first_state(self, state: TrainState) -> TrainState:
        """The state a new run starts from (``state`` from ``init_state``)."""

    def feeder(self, start_step: int) -> feeding.Feeder:
        """Runs the train step from ``start_step`` on."""

    def summary(self, means: dict[str, float]) -> str:
        """The console line's figures for the mean train metrics."""

    def evaluate(self, state: TrainState, step: int, writer: MetricWriter | None) -> dict[str, float]:
        """Evaluates, logs one line, writes its summaries to ``writer`` (None off the chief)."""

    def divergence_advice(self) -> str:
        """What to try when the training diverges."""

    def results(self) -> dict[str, Any]:
        """The task's own entries in results.json (its config, for one)."""


def _crossed(prev: int, now: int, every: int) -> bool:
    return every > 0 and prev // every != now // every


def _is_interrupt(e: BaseException) -> bool:
    """Ctrl-C or SIGTERM, also when it landed inside a C call that re-raised it as a SystemError.

    (numpy's dtype machinery reports "returned a result with an exception set"
    with the KeyboardInterrupt as its cause when the signal arrives mid-call.)
    """
    return isinstance(e, KeyboardInterrupt) or isinstance(e.__cause__ or e.__context__, KeyboardInterrupt)


def _restore_newest_readable(checkpoints: Checkpointer, like: TrainState) -> TrainState | None:
    """The newest checkpoint that verifies and restores, or None if the run has none.

    A checkpoint that fails is moved aside (``Checkpointer.set_aside``: kept,
    never deleted) with a warning, and the one before it is tried.

    Raises:
      CheckpointError: the run had checkpoints and none of them restores.
    """
    failed = []
    while (step := checkpoints.latest_step()) is not None:
        try:
            return checkpoints.restore(like)
        except CheckpointError as e:
            where = checkpoints.set_aside(step)
            failed.append(f"{step} (moved to {where})")
            logging.warning("%s. Moved it to %s for inspection; trying the checkpoint before it.", e, where)
    if failed:
        raise CheckpointError(
            f"no checkpoint of the run in {checkpoints.directory} restores: {', '.join(failed)}. The same "
            "command now starts the run over from step 0."
        )
    return None


def _previous_results(path: str) -> dict[str, Any]:
    """What an earlier process wrote to results.json (figures such as a test error are kept)."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            previous = json.load(f)
    except json.JSONDecodeError:
        logging.warning("%s is not valid JSON; it will be replaced", path)
        return {}
    return previous if isinstance(previous, dict) else {}


def run(task: Task, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) ``task`` in ``workdir``; returns the final figures (also in results.json).

    Workdir: ``checkpoints/`` (see ``checkpoint``), ``tb/{train,<eval_split>}``
    (see ``metrics``) and ``results.json``; the task writes its ``config.json``.

    Raises:
      TrainingDiverged: a metric became non-finite (the last good checkpoint is kept).
      TrainingInterrupted: Ctrl-C or SIGTERM (the last completed checkpoint is kept).
      ProcessGone: another process of a multi-process run is gone (likewise).
    """
    is_chief = jax.process_index() == 0
    sched = task.schedule
    # Restored straight into the mesh's sharding: in a run of several processes a
    # checkpoint restored onto each process's own device could not be moved there.
    state = jax.device_put(task.init_state(), task.replicated)
    with contextlib.ExitStack() as stack:
        stack.enter_context(interrupts.sigterm_as_interrupt())  # SIGTERM ends the run as Ctrl-C does
        checkpoints = stack.enter_context(Checkpointer(workdir, keep=sched.keep_checkpoints))
        restored = _restore_newest_readable(checkpoints, state)
        if restored is not None:
            state = restored
            logging.info("resumed from %s at step %d", checkpoints.directory, int(state.step))
        else:
            state = task.first_state(state)
        state = jax.device_put(state, task.replicated)
        start = step = int(state.step)
        if start >= sched.num_steps:
            logging.info("already at step %d of --num_steps=%d: nothing to train", start, sched.num_steps)
        feeder = task.feeder(start)

        writers: dict[str, MetricWriter] = {}
        if is_chief:
            writers = {s: stack.enter_context(MetricWriter(workdir, s)) for s in ("train", task.eval_split)}
        last_eval: dict[str, float] = {}
        last_train: dict[str, float] = {}

        def evaluate(step: int) -> None:
            last_eval.clear()
            last_eval.update(task.evaluate(state, step, writers.get(task.eval_split)))

        def divergence_hint() -> str:
            last = checkpoints.latest_step()
            kept = (
                f"The last good checkpoint (step {last}) is kept in {checkpoints.directory}."
                if last is not None
                else "No checkpoint was written before it diverged; a rerun starts over."
            )
            return f"{kept} {task.divergence_advice()}"

        acc, progress = MetricAccumulator(), Progress(start, sched.num_steps, sched.batch_size)
        t_start, compiled = time.time(), False
        t_saved = t_start  # the clock of --checkpoint_minutes: since the last save (or the start)
        completed = start  # the last step whose computation has finished

        def resume_hint(how: str) -> str:
            saved = checkpoints.latest_step()
            if saved is None:
                return (
                    f"{how} after step {completed}, before the first checkpoint (every "
                    f"--checkpoint_every={sched.checkpoint_every} steps or --checkpoint_minutes="
                    f"{sched.checkpoint_minutes:g}): the same command starts the run over"
                )
            return (
                f"{how} after step {completed}; the last completed checkpoint (step {saved}) is in "
                f"{checkpoints.directory}: run the same command to resume"
            )

        def prompt_message(sig: signal.Signals) -> str:
            return f"error: {resume_hint(interrupts.describe(sig))}"

        # Where a command asked for it (interrupts.exit_promptly), Ctrl-C or SIGTERM
        # during the first compile and during evaluations ends the process at once
        # (nothing there can be lost); steps and saves run under as_exceptions, so
        # that an interrupt there ends the loop below, cleanly.
        if interrupts.prompt_exit_active():
            interrupts.exit_promptly(prompt_message)
        # A run of several processes must stop at one step, and save at the same steps: a signal
        # (which reaches the processes at slightly different moments) is only recorded, and
        # after every call the processes agree, by one all-gather, whether any was signalled
        # and whether --checkpoint_minutes is due by any one's clock.
        several = jax.process_count() > 1
        hold = interrupts.recorded if several else interrupts.as_exceptions
        pending: list[signal.Signals] = []

        try:
            while step < sched.num_steps:
                t0 = time.time()
                if not compiled:
                    logging.info(
                        "compiling the train step (%d step(s) per call) and running it", feeder.steps_per_call
                    )
                with hold() if compiled else contextlib.nullcontext() as got:
                    state, metrics, k = feeder(state, step, sched.num_steps)
                    acc.add(metrics)  # returns once the call before this one has finished
                    if compiled:
                        completed = step
                    prev, step = step, step + k
                    if not compiled:
                        jax.block_until_ready(state.step)
                        completed = step
                        logging.info("first step (compile + run) took %.1fs", time.time() - t0)
                        compiled = True
                        progress.restart(step)
                pending += got or []
                with hold() as got:
                    last = step >= sched.num_steps
                    if _crossed(prev, step, sched.log_every) or last:
                        acc.drain(step, divergence_hint())
                        completed = step
                        progress.update(step)
                        means = acc.means()
                        if np.isfinite(progress.images_per_s):  # none yet right after the compile
                            means["images_per_s"] = progress.images_per_s
                        last_train = {name: float(v) for name, v in means.items() if np.ndim(v) == 0}
                        if is_chief:
                            writers["train"].scalars(step, means)
                        logging.info(
                            "step %d/%d  %s  %.0f img/s  eta %s",
                            step, sched.num_steps, task.summary(last_train), progress.images_per_s,
                            progress.eta(step),
                        )  # fmt: skip
                    minutes = sched.checkpoint_minutes
                    due = minutes > 0 and time.time() - t_saved >= 60 * minutes
                    if several and compiled:
                        stop, due = interrupts.agree(
                            pending + (got or []), due, multihost_utils.process_allgather
                        )
                        if stop:
                            raise interrupts.Terminated() if stop == signal.SIGTERM else KeyboardInterrupt()
                    if _crossed(prev, step, sched.checkpoint_every) or last or due:
                        acc.drain(step, divergence_hint())  # never save parameters a NaN has touched
                        completed = step
                        checkpoints.save(step, state)
                        t_saved = time.time()
                    if _crossed(prev, step, sched.eval_every) or last:
                        acc.drain(step, divergence_hint())
                        completed = step
                        for writer in writers.values():
                            writer.flush()  # an evaluation may end the process at once
                pending += got or []
                if _crossed(prev, step, sched.eval_every) or last:
                    evaluate(step)
                    progress.restart(step)  # evaluation time is not training time
        except (jax.errors.JaxRuntimeError, ValueError) as e:
            # (gloo reports a lost peer in an all-gather as a ValueError)
            if jax.process_count() == 1 or (isinstance(e, ValueError) and "Gloo" not in str(e)):
                raise
            # In a run of several processes a collective fails when another process is gone.
            first = (str(e).strip().splitlines() or [""])[0]
            raise ProcessGone(
                f"process {jax.process_index()} of {jax.process_count()}: a collective failed, so "
                f"another process of the run is gone ({first[:300]}). "
                + resume_hint("stopped").replace("stopped after", "Stopped after", 1)
            ) from None
        except (KeyboardInterrupt, SystemError) as e:
            if not _is_interrupt(e):
                raise
            sig = interrupts.signal_of(e)
            raise TrainingInterrupted(resume_hint(interrupts.describe(sig)), sig) from None

        if not last_eval:  # a finished run run again: its figures, measured now
            evaluate(step)
        results_path = os.path.join(workdir, RESULTS_FILE)
        results = _previous_results(results_path) if is_chief else {}
        results.update(
            {
                "step": int(step),
                "train": last_train or results.get("train", {}),
                task.eval_split: dict(last_eval),
                "wall_clock_s_this_process": time.time() - t_start,
                "train_images_per_s": progress.images_per_s if progress.steps else None,
                "steps_per_call": feeder.steps_per_call,
                "devices": [str(d) for d in jax.devices()],
            }
            | task.results()
        )
        if is_chief:
            write_json(results_path, results)
    return results
