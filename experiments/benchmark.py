"""Speed, compile time, FLOP rate and memory of the DRAW train step.

``python -m experiments.benchmark --json=bench.json`` prints a table and writes
a list of records, one per configuration. Every rate is compared with matmuls
timed in the same run on the same device, sampled between the timed calls
(these machines are noisy; see ``MatmulReference``):
``flop_fraction`` = achieved FLOP/s / a 2048x2048 float32 matmul's FLOP/s, and
``shaped_fraction`` = achieved / a matmul shaped like the encoder's fused gate
matmul ([batch, read + dec + enc] x [read + dec + enc, 4 enc]).

``gate_matmul_ms_per_step`` is what the LSTM gate matmuls alone take per
step (forward, input- and weight-gradient products timed in a T-trip scan at
the step's shapes); with ``gate_matmul_flop_share`` it bounds how close the
whole step can get to the reference matmuls.

The timed step is the one ``python -m experiments.train`` runs by default: the
training split on the device and ``--steps_per_call`` steps per compiled call.
``single_call_step_ms_median`` is one host-fed step per call, for contrast.

Quick (under a minute): ``--configs=small_attention --steps=5 --compile_sweep=false``.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from draw_jax import data as data_lib
from draw_jax import training
from draw_jax.model import DrawConfig
from experiments import cli

CONFIGS = {
    # The paper's MNIST setup (sec. 4.2).
    "paper_attention": DrawConfig(),
    "paper_no_attention": DrawConfig(read_attention=False, write_attention=False),
    # The popular blog ports' small setup (ericjang/draw: T=10, z=10).
    "small_attention": DrawConfig(T=10, z_size=10),
    "small_no_attention": DrawConfig(T=10, z_size=10, read_attention=False, write_attention=False),
    # For tests of this script only.
    "tiny": DrawConfig(T=3, enc_size=16, dec_size=16, z_size=4),
}

flags.DEFINE_list("configs", [c for c in CONFIGS if c != "tiny"], f"Which of {', '.join(CONFIGS)}.")
flags.DEFINE_integer("batch_size", 100, "Images per step.")
flags.DEFINE_integer("steps", 20, "Timed steps per configuration (after warm-up).")
flags.DEFINE_integer(
    "steps_per_call",
    10,
    "Steps per compiled call of the timed device-data step (train.py's default); "
    "one-step calls are timed as well.",
)
flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
flags.DEFINE_bool(
    "compile_sweep", True, "Time compilation for T in 8, 16, 32, 64 (and one Python-unrolled T)."
)
flags.DEFINE_integer("unrolled_T", 16, "T of the Python-unrolled compile-time contrast (0 = skip).")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "Matmul dtype.")
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


def _time_calls(fn, n: int) -> np.ndarray:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def matmul_flops_per_s(m: int, k: int, n: int, reps: int = 20) -> float:
    """FLOP/s of a float32 [m, k] x [k, n] matmul (median over reps)."""
    a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, b))
    times = _time_calls(lambda: f(a, b), reps)
    return 2.0 * m * k * n / float(np.median(times))


class MatmulReference:
    """Float32 matmul FLOP/s, sampled between the timed train-step calls.

    On a shared machine the speed drifts by tens of percent within minutes, so
    a reference measured once at the start can flatter or wrong the step. Each
    ``sample()`` times one [size, size] x [size, size] matmul and ``reps``
    matmuls shaped like the encoder's gate matmul right next to a timed call;
    the rates are medians over those samples.
    """

    def __init__(self, size: int, shaped: tuple[int, int, int], reps: int = 50) -> None:
        key = jax.random.key(0)
        self._big = [jax.random.normal(key, (size, size), jnp.float32)] * 2
        m, k, n = shaped
        self._shaped = [jax.random.normal(key, (m, k)), jax.random.normal(key, (k, n))]
        self._flops = (2.0 * size**3, 2.0 * m * k * n * reps)
        self._reps = reps
        self._mm = jax.jit(jnp.matmul)
        jax.block_until_ready((self._mm(*self._big), self._mm(*self._shaped)))
        self.big_samples: list[float] = []
        self.shaped_samples: list[float] = []

    def sample(self) -> None:
        t0 = time.perf_counter()
        jax.block_until_ready(self._mm(*self._big))
        t1 = time.perf_counter()
        for _ in range(self._reps):
            out = self._mm(*self._shaped)
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        self.big_samples.append(self._flops[0] / (t1 - t0))
        self.shaped_samples.append(self._flops[1] / (t2 - t1))

    @property
    def matmul(self) -> float:
        return float(np.median(self.big_samples))

    @property
    def shaped(self) -> float:
        return float(np.median(self.shaped_samples))


def _time_interleaved(fn, n: int, ref: MatmulReference) -> np.ndarray:
    """Like ``_time_calls``, with a reference sample after each timed call."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
        ref.sample()
    return np.asarray(times)


def _build_step(cfg: DrawConfig, batch_size: int, python_loop: bool = False):
    graphdef, params = training.init_model(cfg, seed=0)
    optimizer = training.make_optimizer(training.OptimConfig())
    state = training.create_train_state(params, optimizer)
    step = training.make_train_step(
        graphdef, optimizer, binary=True, binarize="none", jit=False, python_loop=python_loop
    )
    return state, step


def compile_seconds(cfg: DrawConfig, batch_size: int, python_loop: bool = False):
    state, step = _build_step(cfg, batch_size, python_loop)
    images = jnp.zeros((batch_size, *cfg.image_shape), jnp.uint8)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, images, jax.random.key(0)).compile()
    return time.perf_counter() - t0, compiled, state, images


def scan_matmul_seconds(m: int, k: int, n: int, length: int, reps: int = 5) -> dict[str, float]:
    """Seconds per product of the three matmuls of a [m, k] x [k, n] layer inside a scan.

    The train step's gate matmuls run inside the T-step ``lax.scan``: forward
    ``x @ W``, input gradient ``g @ W^T`` and weight gradient ``W += x^T g``.
    Each form is timed alone in a scan of ``length`` trips over fresh [m, .]
    inputs (the first two stack their outputs, as the scan does; the third
    accumulates), median over ``reps`` calls. Together with the FLOP count
    this estimates a floor under the step: the time its gate matmuls take,
    compiled as XLA compiles the step's own, if nothing else took any.
    """
    key = jax.random.key(0)
    w = jax.random.normal(key, (k, n), jnp.float32) / np.sqrt(k)
    xs = jax.random.normal(key, (length, m, k), jnp.float32)
    gs = jax.random.normal(key, (length, m, n), jnp.float32)

    def forward(w, xs):
        return jax.lax.scan(lambda c, x: (c, x @ w), 0.0, xs)[1]

    def input_grad(w, gs):
        return jax.lax.scan(lambda c, g: (c, g @ w.T), 0.0, gs)[1]

    def weight_grad(xs, gs):
        return jax.lax.scan(lambda acc, xg: (acc + xg[0].T @ xg[1], None), jnp.zeros((k, n)), (xs, gs))[0]

    out = {}
    for name, f, args in (
        ("forward", forward, (w, xs)),
        ("input_grad", input_grad, (w, gs)),
        ("weight_grad", weight_grad, (xs, gs)),
    ):
        compiled = jax.jit(f).lower(*args).compile()
        jax.block_until_ready(compiled(*args))
        out[name] = float(np.median(_time_calls(lambda c=compiled, a=args: c(*a), reps))) / length
    return out


def gate_matmul_bound(cfg: DrawConfig, batch_size: int) -> dict:
    """The step's LSTM gate matmuls measured alone (``scan_matmul_seconds``).

    Returns the FLOP/s of each form for the encoder's shape, the gate
    matmuls' FLOPs per step, and ``gate_matmul_ms_per_step``: the time both
    LSTMs' forward, input-gradient and weight-gradient products take per
    train step at those in-scan rates (an estimate of the floor under the
    step time; in context XLA may run a product somewhat faster or slower).
    """
    shapes = {
        "encoder": (batch_size, cfg.read_size + cfg.dec_size + cfg.enc_size, 4 * cfg.enc_size),
        "decoder": (batch_size, cfg.z_size + cfg.dec_size, 4 * cfg.dec_size),
    }
    total_s, total_flops, rates = 0.0, 0.0, {}
    for name, (m, k, n) in shapes.items():
        seconds = scan_matmul_seconds(m, k, n, cfg.T)
        flops = 2.0 * m * k * n
        total_s += cfg.T * sum(seconds.values())
        total_flops += 3 * cfg.T * flops
        if name == "encoder":
            rates = {form: flops / s for form, s in seconds.items()}
    return {
        "scan_gate_matmul_flops_per_s": rates,
        "gate_matmul_flops_per_step": total_flops,
        "gate_matmul_ms_per_step": total_s * 1e3,
    }


def _xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


def flops_per_step(cfg: DrawConfig, batch_size: int) -> float:
    """FLOPs of one train step from XLA's cost analysis.

    XLA's HloCostAnalysis counts a while loop's body once, not once per trip,
    so the scanned step under-reports by about a factor T. The step's FLOPs
    are affine in T (identical steps), so we cost-analyse the Python-unrolled
    step at T=3 and T=4 and extrapolate: flops(T) = f3 + (T - 3) * (f4 - f3).
    (T=1 lets XLA simplify more away; the unrolled loop's stacking of per-step
    outputs adds a little that grows with T, which the scan does not have, so
    this is within a few percent of a fully unrolled count.)
    """
    f3, f4 = (
        _xla_flops(compile_seconds(dataclasses.replace(cfg, T=T), batch_size, python_loop=True)[1])
        for T in (3, 4)
    )
    return f3 + (cfg.T - 3) * (f4 - f3)


def _device_step_seconds(
    cfg: DrawConfig, state, batch_size: int, steps: int, warmup: int, k: int, ref: MatmulReference
):
    """(compile seconds, [seconds per step of each timed call]) of train.py's default path.

    The training split on the device, k steps per compiled call
    (``training.make_device_train_step``); ``steps`` is rounded up to whole calls.
    """
    n = 50 * batch_size
    images = jnp.asarray(np.random.default_rng(0).integers(0, 2, (n, *cfg.image_shape)), jnp.uint8)
    perms = jnp.stack([data_lib.device_epoch_permutation(0, e, n) for e in (0, 1)])
    graphdef, _ = training.init_model(cfg, seed=0)
    multi = training.make_device_train_step(
        graphdef,
        training.make_optimizer(training.OptimConfig()),
        binary=True,
        binarize="none",
        batch_size=batch_size,
        steps_per_epoch=n // batch_size,
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
        holder["state"] = holder["state"].replace(step=holder["state"].step % (n // batch_size))
        return metrics["bound"]

    _time_calls(call, max(1, -(-warmup // k)))
    return compile_s, _time_interleaved(call, -(-steps // k), ref) / k


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

    _time_calls(one, warmup)
    single = _time_calls(one, steps)
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
        "compute_dtype": cfg.dtype,
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
        "gate_matmul_flop_share": bound["gate_matmul_flops_per_step"] / flops,
        "gate_matmul_time_share": bound["gate_matmul_ms_per_step"] / (med * 1e3),
        "peak_rss_mb": _peak_rss_mb(),
        "device_peak_mb": _device_memory_mb(),
        "device": str(jax.devices()[0].device_kind),
    }


def data_pipeline_images_per_s(batch_size: int, seconds: float = 1.0) -> dict:
    """Host pipeline (shuffle + gather + host->device copy) on MNIST-sized arrays."""
    images = np.random.default_rng(0).integers(0, 2, (50_000, 28, 28, 1), dtype=np.uint8)
    it = data_lib.train_batches(images, batch_size, seed=0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        jax.block_until_ready(jax.device_put(next(it)))
        n += batch_size
    return {
        "name": "data_pipeline_host",
        "batch_size": batch_size,
        "images_per_s": n / (time.perf_counter() - t0),
    }


def _print_table(records: list[dict]) -> None:
    cols = [
        ("name", "{:<20}"), ("T", "{:>3}"), ("step_ms_median", "{:>9.1f}"),
        ("single_call_step_ms_median", "{:>9.1f}"), ("images_per_s", "{:>8.0f}"),
        ("compile_s", "{:>7.1f}"), ("flops_per_step", "{:>9.3g}"), ("achieved_flops_per_s", "{:>9.3g}"),
        ("flop_fraction", "{:>6.2f}"), ("shaped_fraction", "{:>6.2f}"),
        ("gate_matmul_ms_per_step", "{:>9.1f}"), ("peak_rss_mb", "{:>7.0f}"),
    ]  # fmt: skip
    print(" ".join(f"{c[:9]:>9}" if i else f"{c:<20}" for i, (c, _) in enumerate(cols)))
    for r in records:
        if "step_ms_median" in r:
            print(" ".join(fmt.format(r[c]) for c, fmt in cols))


@cli.user_errors_as_messages
def main(argv: list[str]) -> None:
    unknown = [c for c in FLAGS.configs if c not in CONFIGS]
    if unknown:
        raise cli.ConfigError(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    if FLAGS.steps < 1 or FLAGS.batch_size < 1 or FLAGS.steps_per_call < 1:
        raise cli.ConfigError("--steps, --batch_size and --steps_per_call must be >= 1")
    configs = {n: dataclasses.replace(CONFIGS[n], dtype=FLAGS.compute_dtype) for n in FLAGS.configs}
    b = FLAGS.batch_size
    m = FLAGS.matmul_size
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; "
          f"{m}^3 float32 matmul: {matmul_flops_per_s(m, m, m) / 1e9:.1f} GFLOP/s (at start)")  # fmt: skip
    records = [benchmark_config(n, cfg, b, FLAGS.steps, FLAGS.warmup) for n, cfg in configs.items()]
    _print_table(records)
    if FLAGS.compile_sweep:
        base = configs.get("paper_attention", next(iter(configs.values())))
        sweep = {}
        for T in (8, 16, 32, 64):
            sweep[T] = compile_seconds(dataclasses.replace(base, T=T), b)[0]
        print("compile seconds by T (scan): " + ", ".join(f"T={T}: {s:.1f}" for T, s in sweep.items()))
        print(f"compile ratio T=64 / T=8: {sweep[64] / sweep[8]:.2f}")
        rec = {"name": "compile_sweep", "scan_compile_s": sweep, "ratio_64_to_8": sweep[64] / sweep[8]}
        if FLAGS.unrolled_T:
            T = FLAGS.unrolled_T
            unrolled = compile_seconds(dataclasses.replace(base, T=T), b, python_loop=True)[0]
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
    app.run(main)
