"""The training loop: ``train_and_evaluate(config, workdir)``.

Resumable (orbax checkpoints; the data order and every random draw are pure
functions of the seed and the step, so a resumed run repeats an uninterrupted
one), with TensorBoard metrics, periodic evaluation of the bound on a held-out
split and a JSON summary. The step itself lives in ``training``; this module
only feeds it, on one device or data-parallel over all of them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from draw_jax import data as data_lib
from draw_jax import pictures, training
from draw_jax.checkpoint import Checkpointer
from draw_jax.config import CONFIG_FILE, ConfigError, TrainConfig, load_config, save_config
from draw_jax.evaluation import SplitEvaluator
from draw_jax.metrics import MetricWriter, format_duration, write_json

__all__ = ["TrainingDiverged", "train_and_evaluate", "check_workdir", "Parallel", "RESULTS_FILE"]

RESULTS_FILE = "results.json"
# Streams derived from the seed, kept apart from one another.
_TRAIN_STREAM = 0x57E9
_EVAL_STREAM = 0xE7A1
_SAMPLE_STREAM = 0x5A3E


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def train_key(seed: int) -> jax.Array:
    """Base key of the training noise; step s uses ``fold_in(train_key(seed), s)``."""
    return jax.random.fold_in(jax.random.key(seed), _TRAIN_STREAM)


def check_workdir(config: TrainConfig, workdir: str) -> bool:
    """Whether ``workdir`` holds a run this config may continue (True) or is new (False).

    Raises:
      ConfigError: the workdir holds a different run (model, optimiser, data or
        seed differ); continuing it would silently mix two experiments.
    """
    if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
        if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(
            os.path.join(workdir, "checkpoints")
        ):
            raise ConfigError(
                f"{workdir} has checkpoints but no {CONFIG_FILE}; refusing to guess their config"
            )
        return False
    previous = load_config(workdir)
    old, new = previous.identity(), config.identity()
    if old != new:
        diffs = []
        for part in old:
            for k in sorted(set(old[part]) | set(new[part])):
                if old[part].get(k) != new[part].get(k):
                    diffs.append(f"{part}.{k}: {old[part].get(k)!r} -> {new[part].get(k)!r}")
        raise ConfigError(
            f"--workdir={workdir} holds a different run ({'; '.join(diffs)}). Use a new --workdir, "
            "or the same flags to resume it; nothing there was changed."
        )
    return True


@dataclasses.dataclass
class Parallel:
    """Data parallelism over every device of every process (jax.sharding).

    The batch is split over the mesh's 'data' axis; parameters and optimiser
    state are replicated. On one device this is the identity.
    """

    mesh: jax.sharding.Mesh
    batch_size: int

    @classmethod
    def create(cls, batch_size: int) -> Parallel:
        n = jax.device_count()
        if batch_size % n:
            raise ConfigError(
                f"--batch_size={batch_size} does not divide evenly over {n} devices; use a multiple of {n}"
            )
        mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        return cls(mesh=mesh, batch_size=batch_size)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data"))

    def put_batch(self, global_batch: np.ndarray) -> jax.Array:
        """Each process contributes its own slice of the global batch."""
        if jax.process_count() == 1:
            return jax.device_put(global_batch, self.batch)
        per = global_batch.shape[0] // jax.process_count()
        local = global_batch[jax.process_index() * per : (jax.process_index() + 1) * per]
        return jax.make_array_from_process_local_data(self.batch, local, global_batch.shape)


class _Accumulator:
    """Sums metrics fetched from the device; checks every value is finite."""

    def __init__(self) -> None:
        self.pending: list[dict[str, jax.Array]] = []
        self.sums: dict[str, np.ndarray] = {}
        self.count = 0

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self.pending.append(metrics)

    def drain(self, step: int, checkpoints: Checkpointer) -> None:
        """Fetches pending metrics (each with a leading [steps] axis) and checks them."""
        for m in jax.device_get(self.pending):
            for k, v in m.items():
                v = np.asarray(v, np.float64)
                if not np.all(np.isfinite(v)):
                    raise TrainingDiverged(
                        f"the training {k} became {v[~np.isfinite(v)][0]} by step {step}. "
                        f"The last good checkpoint (step {checkpoints.latest_step()}) is kept in "
                        f"{checkpoints.directory}. Try a lower --learning_rate or --clip_norm, "
                        "or --kl_warmup_steps."
                    )
                self.sums[k] = self.sums.get(k, 0) + v.sum(axis=0)
            self.count += np.shape(m["bound"])[0]
        self.pending = []

    def means(self) -> dict[str, np.ndarray]:
        out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return out


def _crossed(prev: int, now: int, every: int) -> bool:
    return every > 0 and prev // every != now // every


def train_and_evaluate(config: TrainConfig, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) DRAW in ``workdir``; returns the final figures (also in results.json)."""
    cfg, run = config, config.run
    is_chief = jax.process_index() == 0
    resuming = check_workdir(cfg, workdir)
    parallel = Parallel.create(cfg.data.batch_size)

    train = data_lib.load_split(cfg.data.dataset, "train", cfg.data.data_dir, cfg.data.tfds_data_dir)
    held_out = data_lib.load_split(
        cfg.data.dataset, cfg.data.eval_split, cfg.data.data_dir, cfg.data.tfds_data_dir
    )
    eval_images = held_out.images[: run.eval_examples or None]
    steps_per_epoch = len(train) // cfg.data.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"--batch_size={cfg.data.batch_size} is larger than the training split ({len(train)} images)"
        )

    # Calls of k steps start at multiples of k, and k divides every interval,
    # so no call runs past a log, checkpoint or evaluation step.
    steps_per_call = math.gcd(
        min(run.steps_per_call, steps_per_epoch), run.log_every, run.checkpoint_every, run.eval_every
    )
    if cfg.data.device_data and steps_per_call < run.steps_per_call:
        logging.info(
            "--steps_per_call=%d reduced to %d: it must fit in an epoch (%d steps) and divide "
            "--log_every, --checkpoint_every and --eval_every",
            run.steps_per_call,
            steps_per_call,
            steps_per_epoch,
        )

    graphdef, params = training.init_model(cfg.model, run.seed)
    optimizer = training.make_optimizer(cfg.optim)
    state = training.create_train_state(params, optimizer)
    checkpoints = Checkpointer(workdir, keep=run.keep_checkpoints)
    if checkpoints.latest_step() is not None:
        state = checkpoints.restore(state)
        logging.info("resumed from %s at step %d", checkpoints.directory, int(state.step))
    elif resuming:
        logging.info("%s has a config but no checkpoint yet: starting at step 0", workdir)
    if is_chief:
        save_config(cfg, workdir)
    state = jax.device_put(state, parallel.replicated)
    start = int(state.step)
    if start >= run.num_steps:
        logging.info("already at step %d of --num_steps=%d: nothing to train", start, run.num_steps)

    step_kwargs = dict(
        binary=train.binary, binarize=cfg.data.binarize, kl_warmup_steps=cfg.optim.kl_warmup_steps
    )
    base_key = train_key(run.seed)
    if cfg.data.device_data:
        images_dev = jax.device_put(train.images, parallel.replicated)
        multi = {
            k: training.make_device_train_step(
                graphdef,
                optimizer,
                batch_size=cfg.data.batch_size,
                steps_per_epoch=steps_per_epoch,
                steps_per_call=k,
                batch_sharding=parallel.batch,
                **step_kwargs,
            )
            for k in {steps_per_call, 1}
        }
        perms_epoch, perms = None, None
    else:
        single = training.make_train_step(graphdef, optimizer, batch_sharding=parallel.batch, **step_kwargs)
        batches = data_lib.train_batches(train.images, cfg.data.batch_size, run.seed, start_step=start)

    evaluator = SplitEvaluator(graphdef, binary=held_out.binary, binarize=cfg.data.binarize, batch_size=100)
    generate = jax.jit(lambda p, k: training.apply_model(graphdef, p).generate(k, 64).canvases[-1])
    writers = {s: MetricWriter(workdir, s) for s in ("train", cfg.data.eval_split)} if is_chief else {}
    acc = _Accumulator()
    last_valid: dict[str, float] = {}
    last_train: dict[str, float] = {}
    t_start = t_log = time.time()
    step_at_log, timed_steps, timed_seconds = start, 0, 0.0
    compile_done = False

    def evaluate(step: int) -> None:
        res = evaluator(state.params, eval_images, seed=run.seed + _EVAL_STREAM)
        last_valid.update(bound=res.bound, recon=res.recon, kl=res.kl, step=step, num_images=res.num_images)
        samples = jax.nn.sigmoid(
            generate(state.params, jax.random.fold_in(jax.random.key(run.seed), _SAMPLE_STREAM))
        )
        if is_chief:
            w = writers[cfg.data.eval_split]
            w.scalars(step, {"bound": res.bound, "recon": res.recon, "kl": res.kl})
            w.image(step, "samples", pictures.grid(np.asarray(samples), ncols=8))
            w.flush()
        logging.info(
            "step %d  %s bound %.2f nats (recon %.2f + KL %.2f) on %d images",
            step,
            cfg.data.eval_split,
            res.bound,
            res.recon,
            res.kl,
            res.num_images,
        )

    step = start
    while step < run.num_steps:
        t0 = time.time()
        if cfg.data.device_data:
            whole = step % steps_per_call == 0 and run.num_steps - step >= steps_per_call
            k = steps_per_call if whole else 1
            epoch = step // steps_per_epoch
            if perms_epoch != epoch:
                perms = jnp.stack(
                    [data_lib.device_epoch_permutation(run.seed, e, len(train)) for e in (epoch, epoch + 1)]
                )
                perms_epoch = epoch
            state, metrics = multi[k](state, images_dev, perms, jnp.int32(epoch), base_key)
        else:
            k = 1
            batch = parallel.put_batch(next(batches))
            state, metrics = single(state, batch, jax.random.fold_in(base_key, step))
            metrics = jax.tree.map(lambda a: a[None], metrics)
        acc.add(metrics)
        prev, step = step, step + k
        if not compile_done:
            jax.block_until_ready(state.step)
            logging.info("first step (compile + run) took %.1fs", time.time() - t0)
            compile_done, t_log, step_at_log = True, time.time(), step
        last = step >= run.num_steps
        if _crossed(prev, step, run.log_every) or last:
            acc.drain(step, checkpoints)
            means = acc.means()
            now = time.time()
            if step > step_at_log:
                timed_steps += step - step_at_log
                timed_seconds += now - t_log
            ips = (
                timed_steps * cfg.data.batch_size / max(timed_seconds, 1e-9) if timed_steps else float("nan")
            )
            eta = (run.num_steps - step) * timed_seconds / timed_steps if timed_steps else float("nan")
            means["images_per_s"] = ips
            last_train = {k2: float(v) for k2, v in means.items() if np.ndim(v) == 0}
            if is_chief:
                writers["train"].scalars(step, means)
            logging.info(
                "step %d/%d  bound %.2f  recon %.2f  kl %.2f  |g| %.2f  %.0f img/s  eta %s",
                step,
                run.num_steps,
                means["bound"],
                means["recon"],
                means["kl"],
                means["grad_norm"],
                ips,
                format_duration(eta) if np.isfinite(eta) else "?",
            )
            t_log, step_at_log = time.time(), step
        if _crossed(prev, step, run.checkpoint_every) or last:
            acc.drain(step, checkpoints)  # never save parameters a NaN has touched
            checkpoints.save(step, state)
        if _crossed(prev, step, run.eval_every) or last:
            evaluate(step)
            t_log = time.time()  # evaluation time is not training time

    if not last_valid and start >= run.num_steps:
        evaluate(start)
    results = {
        "step": int(step),
        "train": last_train,
        cfg.data.eval_split: last_valid,
        "wall_clock_s_this_process": time.time() - t_start,
        "train_images_per_s": (timed_steps * cfg.data.batch_size / timed_seconds) if timed_seconds else None,
        "devices": [str(d) for d in jax.devices()],
        "config": cfg.to_dict(),
    }
    if is_chief:
        write_json(os.path.join(workdir, RESULTS_FILE), results)
        for w in writers.values():
            w.close()
    checkpoints.close()
    return results
