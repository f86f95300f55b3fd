"""Speed, compile time, FLOP rate and memory of the DRAW train step.

``python -m experiments.benchmark --json=bench.json`` prints a table and writes
a list of records, one per configuration. Every rate is compared with matmuls
timed in the same run on the same device, sampled between the timed calls
(these machines are noisy; see ``MatmulReference``):
``flop_fraction`` = achieved FLOP/s / a 2048x2048 float32 matmul's FLOP/s, and
``shaped_fraction`` = achieved / a matmul shaped like the encoder's fused gate
matmul ([batch, read + dec + enc] x [read + dec + enc, 4 enc]).

``gate_matmul_ms_per_step`` is what the LSTM gate matmuls alone take per
step, in its compute dtype (forward, input-gradient and weight-gradient
products each timed in a T-trip scan at the step's shapes); with ``gate_matmul_flop_share`` it bounds how close the
whole step can get to the reference matmuls.

``ops_per_time_step`` counts the ops of the compiled step's forward and
backward T-trip loops (``profiling.ops_per_time_step``; a fusion counts once):
on a GPU each is about one kernel launch per time step, which is what bounds a
latency-bound step there.

The timed step is the one ``python -m experiments.train`` runs by default: the
training split on the device and ``--steps_per_call`` steps per compiled call.
``single_call_step_ms_median`` is one host-fed step per call, for contrast.

Quick (under a minute): ``--configs=small_attention --steps=5 --compile_sweep=false``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from draw_jax import feeding, train_step
from draw_jax.config import DrawConfig, OptimConfig
from draw_jax.presets import PRESETS
from draw_jax.settings import build_config
from experiments import cli, profiling
from experiments.profiling import (
    MatmulReference,
    compile_seconds,
    flops_per_step,
    gate_matmul_bound,
    matmul_flops_per_s,
)

flags.DEFINE_list(
    "configs",
    [c for c in PRESETS if c != "tiny"],
    f"Presets to time (draw_jax/presets.py): {', '.join(PRESETS)}.",
)
cli.define_config_flags(["batch_size", "compute_dtype"])
flags.adopt_module_key_flags(cli)
flags.DEFINE_integer("steps", 20, "Timed steps per configuration (after warm-up).")
flags.DEFINE_integer(
    "steps_per_call",
    10,
    "Steps per compiled call of the timed device-data step (train.py's default); "
    "one-step calls are timed as well.",
)
flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
flags.DEFINE_bool(
    "compile_sweep", True, "Time compilation for each T of --sweep_T (and one Python-unrolled T)."
)
flags.DEFINE_list(
    "sweep_T",
    ["8", "16", "32", "64"],
    "T values of the compile-time sweep, increasing; the ratio printed is the last one's over the first's.",
)
flags.DEFINE_integer("unrolled_T", 16, "T of the Python-unrolled compile-time contrast (0 = skip).")
flags.DEFINE_string("json", None, "Write the records here.")
flags.DEFINE_bool("data_pipeline", True, "Also time the host data pipeline on its own.")
flags.DEFINE_integer("matmul_size", 2048, "Side of the square float32 reference matmul.")

FLAGS = flags.FLAGS


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _device_memory_mb() -> float | None:
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


def _device_step_seconds(
    cfg: DrawConfig, state, batch_size: int, steps: int, warmup: int, k: int, ref: MatmulReference
):
    """(compile seconds, [seconds per step of each timed call]) of train.py's default path.

    The training split on the device, k steps per compiled call
    (``train_step.make_device_train_step``); ``steps`` is rounded up to whole calls.
    """
    m = 50 * batch_size
    images = jnp.asarray(np.random.default_rng(0).integers(0, 2, (m, *cfg.image_shape)), jnp.uint8)
    perms = jnp.stack([feeding.device_epoch_permutation(0, e, m) for e in (0, 1)])
    graphdef, _ = train_step.init_model(cfg, seed=0)
    multi = train_step.make_device_train_step(
        graphdef,
        train_step.make_optimizer(OptimConfig(decay_steps=100_000)),  # the default run's schedule
        binary=True,
        binarize="none",
        batch_size=batch_size,
        steps_per_epoch=m // batch_size,
        steps_per_call=k,
    )
    args = (images, perms, jnp.int32(0), jax.random.key(0))
    t0 = time.perf_counter()
    compiled = multi.lower(state, *args).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], *args)
        # Stay within the two epochs of ``perms``.
        holder["state"] = holder["state"].replace(step=holder["state"].step % (m // batch_size))
        return metrics["bound"]

    profiling.time_calls(call, max(1, -(-warmup // k)))
    return compile_s, profiling.time_interleaved(call, -(-steps // k), ref) / k


def benchmark_config(name: str, cfg: DrawConfig, batch_size: int, steps: int, warmup: int) -> dict:
    compile_s, compiled, state, _ = compile_seconds(cfg, batch_size)
    flops = flops_per_step(cfg, batch_size)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 2, (batch_size, *cfg.image_shape)), jnp.uint8)
    holder = {"state": state}

    def one(i=[0]):  # noqa: B006 - a counter for fresh keys
        i[0] += 1
        holder["state"], metrics = compiled(holder["state"], images, jax.random.key(i[0]))
        return metrics["bound"]

    profiling.time_calls(one, warmup)
    single = profiling.time_calls(one, steps)
    k = FLAGS.steps_per_call
    gate_k = cfg.read_size + cfg.dec_size + cfg.enc_size
    ref = MatmulReference(FLAGS.matmul_size, (batch_size, gate_k, 4 * cfg.enc_size))
    multi_compile_s, times = _device_step_seconds(cfg, holder["state"], batch_size, steps, warmup, k, ref)
    med = float(np.median(times))
    achieved = flops / med
    shaped = ref.shaped
    bound = gate_matmul_bound(cfg, batch_size)
    return {
        "name": name,
        "T": cfg.T,
        "attention": cfg.read_attention and cfg.write_attention,
        "batch_size": batch_size,
        "compute_dtype": cfg.compute_dtype,
        "steps_per_call": k,
        "step_ms_median": med * 1e3,
        "step_ms_p10": float(np.percentile(times, 10)) * 1e3,
        "step_ms_p90": float(np.percentile(times, 90)) * 1e3,
        "timed_steps": len(times) * k,
        "single_call_step_ms_median": float(np.median(single)) * 1e3,
        "images_per_s": batch_size / med,
        "compile_s": compile_s,
        "compile_s_steps_per_call": multi_compile_s,
        "flops_per_step": flops,
        "achieved_flops_per_s": achieved,
        "matmul_flops_per_s": ref.matmul,
        "matmul_size": FLAGS.matmul_size,
        "flop_fraction": achieved / ref.matmul,
        "shaped_matmul_flops_per_s": shaped,
        "shaped_fraction": achieved / shaped,
        **bound,
        "ops_per_time_step": profiling.ops_per_time_step(compiled.as_text(), cfg.T),
        "gate_matmul_flop_share": bound["gate_matmul_flops_per_step"] / flops,
        "gate_matmul_time_share": bound["gate_matmul_ms_per_step"] / (med * 1e3),
        "peak_rss_mb": _peak_rss_mb(),
        "device_peak_mb": _device_memory_mb(),
        "device": str(jax.devices()[0].device_kind),
    }


def data_pipeline_images_per_s(batch_size: int, seconds: float = 1.0) -> dict:
    """Host pipeline (shuffle + gather + host->device copy) on MNIST-sized arrays."""
    images = np.random.default_rng(0).integers(0, 2, (50_000, 28, 28, 1), dtype=np.uint8)
    it = feeding.train_batches(images, batch_size, seed=0)
    seen, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        jax.block_until_ready(jax.device_put(next(it)))
        seen += batch_size
    return {
        "name": "data_pipeline_host",
        "batch_size": batch_size,
        "images_per_s": seen / (time.perf_counter() - t0),
    }


def _print_table(records: list[dict]) -> None:
    cols = [
        ("name", "{:<20}"), ("T", "{:>3}"), ("step_ms_median", "{:>9.1f}"),
        ("single_call_step_ms_median", "{:>9.1f}"), ("images_per_s", "{:>8.0f}"),
        ("compile_s", "{:>7.1f}"), ("flops_per_step", "{:>9.3g}"), ("achieved_flops_per_s", "{:>9.3g}"),
        ("flop_fraction", "{:>6.2f}"), ("shaped_fraction", "{:>6.2f}"),
        ("gate_matmul_ms_per_step", "{:>9.1f}"), ("ops_per_time_step", "{:>5d}"), ("peak_rss_mb", "{:>7.0f}"),
    ]  # fmt: skip
    print(" ".join(f"{c[:9]:>9}" if i else f"{c:<20}" for i, (c, _) in enumerate(cols)))
    for r in records:
        if "step_ms_median" in r:
            print(" ".join(fmt.format(r[c]) for c, fmt in cols))


def _sweep_T(values: list[str]) -> list[int]:
    """--sweep_T as increasing positive ints (at least two, for a ratio), or a ConfigError naming the flag."""
    try:
        ts = [int(v) for v in values]
    except ValueError:
        raise cli.ConfigError(f"--sweep_T must be integers, got {','.join(values)}") from None
    if len(ts) < 2 or min(ts) < 1 or any(a >= b for a, b in itertools.pairwise(ts)):
        raise cli.ConfigError(f"--sweep_T must be at least two increasing T >= 1, got {','.join(values)}")
    return ts


@cli.user_errors_as_messages
def main(argv: list[str]) -> None:
    unknown = [c for c in FLAGS.configs if c not in PRESETS]
    if unknown:
        raise cli.ConfigError(f"--configs: unknown {unknown}; choose from {', '.join(PRESETS)}")
    if FLAGS.steps < 1 or FLAGS.batch_size < 1 or FLAGS.steps_per_call < 1:
        raise cli.ConfigError("--steps, --batch_size and --steps_per_call must be >= 1")
    sweep_T = _sweep_T(FLAGS.sweep_T)
    configs = {name: build_config(name, compute_dtype=FLAGS.compute_dtype).model for name in FLAGS.configs}
    b = FLAGS.batch_size
    m = FLAGS.matmul_size
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; "
          f"{m}^3 float32 matmul: {matmul_flops_per_s(m, m, m) / 1e9:.1f} GFLOP/s (at start)")  # fmt: skip
    records = [benchmark_config(name, cfg, b, FLAGS.steps, FLAGS.warmup) for name, cfg in configs.items()]
    _print_table(records)
    if FLAGS.compile_sweep:
        base = configs.get("paper_attention", next(iter(configs.values())))
        sweep = {}
        for T in sweep_T:
            sweep[T] = compile_seconds(dataclasses.replace(base, T=T), b)[0]
        first, last = sweep_T[0], sweep_T[-1]
        ratio = sweep[last] / sweep[first]
        print("compile seconds by T (scan): " + ", ".join(f"T={T}: {s:.1f}" for T, s in sweep.items()))
        print(f"compile ratio T={last} / T={first}: {ratio:.2f}")
        rec = {"name": "compile_sweep", "scan_compile_s": sweep, "compile_ratio": ratio,
               "compile_ratio_T": [last, first]}  # fmt: skip
        if FLAGS.unrolled_T:
            T = FLAGS.unrolled_T
            unrolled = compile_seconds(dataclasses.replace(base, T=T), b, unrolled=True)[0]
            print(f"Python-unrolled T={T}: {unrolled:.1f}s (scan: {sweep.get(T, float('nan')):.1f}s)")
            rec["unrolled_T"], rec["unrolled_compile_s"] = T, unrolled
        records.append(rec)
    if FLAGS.data_pipeline:
        rec = data_pipeline_images_per_s(b)
        print(f"host data pipeline: {rec['images_per_s']:.0f} images/s (batch {b})")
        records.append(rec)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(records, f, indent=2, default=str)
        print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
    cli.run(main)
