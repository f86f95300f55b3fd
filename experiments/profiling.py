"""Measuring the train step: compile time, FLOPs, and reference matmul rates.

What ``experiments.benchmark`` (and ``tools.compare_speed``) print is built from these; the tests check
them (the FLOP count against a fully unrolled step, the gate-matmul count
against its formula). Every rate is meant to be compared with a matmul timed
in the same process: these machines drift by tens of percent within minutes.

Notation (``draw_jax/__init__.py``): b = batch, T = glimpses. A matmul's
shape is written [rows, inner] x [inner, cols], so as not to reuse m, k, n.
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from draw_jax import train_step
from draw_jax.config import DrawConfig, OptimConfig
from draw_jax.losses import draw_bound
from draw_jax.model import DRAW, DrawOutputs

__all__ = [
    "MatmulReference",
    "compile_seconds",
    "flops_per_step",
    "gate_matmul_bound",
    "loop_ops_per_trip",
    "matmul_flops_per_s",
    "ops_per_time_step",
    "scan_matmul_seconds",
    "time_calls",
    "time_interleaved",
    "unrolled_outputs",
    "xla_flops",
]


def time_calls(fn, calls: int) -> np.ndarray:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def matmul_flops_per_s(rows: int, inner: int, cols: int, reps: int = 20) -> float:
    """FLOP/s of a float32 [rows, inner] x [inner, cols] matmul (median over reps)."""
    a = jax.random.normal(jax.random.key(0), (rows, inner), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (inner, cols), jnp.float32)
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, b))
    times = time_calls(lambda: f(a, b), reps)
    return 2.0 * rows * inner * cols / float(np.median(times))


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
        rows, inner, cols = shaped
        self._shaped = [jax.random.normal(key, (rows, inner)), jax.random.normal(key, (inner, cols))]
        self._flops = (2.0 * size**3, 2.0 * rows * inner * cols * reps)
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


def time_interleaved(fn, calls: int, ref: MatmulReference) -> np.ndarray:
    """Like ``time_calls``, with a reference sample after each timed call."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
        ref.sample()
    return np.asarray(times)


def unrolled_outputs(model: DRAW, x: jax.Array, key: jax.Array) -> DrawOutputs:
    """``model(x, key)`` as a Python loop over ``DRAW.step``: the same outputs, but
    a program that grows with T (for XLA's cost analysis, which counts a loop's
    body once, and for the compile-time contrast)."""
    eps = model.noise(key, x.shape[0])
    carry, steps = model.initial_carry(x.shape[0]), []
    for t in range(model.config.T):
        carry, out = model.step(carry, x.astype(jnp.float32), eps[t])
        steps.append(out)
    s = jax.tree.map(lambda *a: jnp.stack(a), *steps)
    return DrawOutputs(carry[0], s.canvas, s.mu, s.logsigma, s.read_window, s.write_window)


def _build_step(cfg: DrawConfig, batch_size: int, unrolled: bool = False):
    graphdef, params = train_step.init_model(cfg, seed=0)
    optimizer = train_step.make_optimizer(OptimConfig(decay_steps=100_000))  # the default run's schedule
    state = train_step.create_train_state(params, optimizer)
    if not unrolled:
        return state, train_step.make_train_step(graphdef, optimizer, binary=True, binarize="none", jit=False)

    def step(state, images, key):  # the train step's work, with the T steps unrolled
        x = images.astype(jnp.float32)

        def loss(params):
            return draw_bound(unrolled_outputs(train_step.apply_model(graphdef, params), x, key), x).loss

        grads = jax.grad(loss)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)

    return state, step


def compile_seconds(cfg: DrawConfig, batch_size: int, unrolled: bool = False):
    """(seconds, compiled, state, images) of compiling the train step (``unrolled``: T steps unrolled)."""
    state, step = _build_step(cfg, batch_size, unrolled)
    images = jnp.zeros((batch_size, *cfg.image_shape), jnp.uint8)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, images, jax.random.key(0)).compile()
    return time.perf_counter() - t0, compiled, state, images


def scan_matmul_seconds(
    rows: int, inner: int, cols: int, length: int, reps: int = 5, dtype: str = "float32"
) -> dict[str, float]:
    """Seconds per product of the three matmuls of a [rows, inner] x [inner, cols] layer, as the step runs them.

    The train step's gate matmuls, as its T-step ``lax.scan`` and the scan's
    backward run them: forward ``u @ W``, input gradient ``g @ W^T`` and the
    weight gradient's ``u^T g`` accumulated over the trips (each timed alone in
    a scan of ``length`` trips over fresh [rows, .] inputs). ``dtype`` is the
    compute dtype: in bfloat16 the operands are bfloat16 with float32 results.
    Median over ``reps`` calls. Together
    with the FLOP count this estimates a floor under the step: the time its
    gate matmuls take if nothing else took any.
    """
    key = jax.random.key(0)
    dt = jnp.dtype(dtype)
    w = (jax.random.normal(key, (inner, cols), jnp.float32) / np.sqrt(inner)).astype(dt)
    xs = jax.random.normal(key, (length, rows, inner), jnp.float32).astype(dt)
    gs = jax.random.normal(key, (length, rows, cols), jnp.float32).astype(dt)

    def dot(a, b):
        return jnp.dot(a, b, preferred_element_type=jnp.float32)

    def forward(w, xs):
        return jax.lax.scan(lambda c, x: (c, dot(x, w)), 0.0, xs)[1]

    def input_grad(w, gs):
        return jax.lax.scan(lambda c, g: (c, dot(g, w.T)), 0.0, gs)[1]

    def weight_grad(xs, gs):
        zero = jnp.zeros((inner, cols), jnp.float32)
        return jax.lax.scan(lambda acc, xg: (acc + dot(xg[0].T, xg[1]), None), zero, (xs, gs))[0]

    out = {}
    for name, f, args in (
        ("forward", forward, (w, xs)),
        ("input_grad", input_grad, (w, gs)),
        ("weight_grad", weight_grad, (xs, gs)),
    ):
        compiled = jax.jit(f).lower(*args).compile()
        jax.block_until_ready(compiled(*args))
        out[name] = float(np.median(time_calls(lambda c=compiled, a=args: c(*a), reps))) / length
    return out


def gate_matmul_bound(cfg: DrawConfig, batch_size: int) -> dict:
    """The step's LSTM gate matmuls measured alone (``scan_matmul_seconds``), in its compute dtype.

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
    for name, (rows, inner, cols) in shapes.items():
        seconds = scan_matmul_seconds(rows, inner, cols, cfg.T, dtype=cfg.compute_dtype)
        flops = 2.0 * rows * inner * cols
        total_s += cfg.T * sum(seconds.values())
        total_flops += 3 * cfg.T * flops
        if name == "encoder":
            rates = {form: flops / s for form, s in seconds.items()}
    return {
        "scan_gate_matmul_flops_per_s": rates,
        "gate_matmul_flops_per_step": total_flops,
        "gate_matmul_ms_per_step": total_s * 1e3,
    }


def xla_flops(compiled) -> float:
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
        xla_flops(compile_seconds(dataclasses.replace(cfg, T=T), batch_size, unrolled=True)[1])
        for T in (3, 4)
    )
    return f3 + (cfg.T - 3) * (f4 - f3)


# Instructions of an optimised HLO module that launch no work of their own.
_FREE_OPS = frozenset({"parameter", "get-tuple-element", "tuple", "constant", "bitcast"})
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%[\w.\-]+ = (.*)$")
_OPCODE = re.compile(r"\b([a-z][a-z0-9\-]*)\(")
_WHILE = re.compile(r"body=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def loop_ops_per_trip(hlo_text: str) -> list[tuple[int, int, str]]:
    """(trip count, ops per trip, JAX op name) of each while loop in an optimised HLO module.

    ``hlo_text`` is ``compiled.as_text()``. An op is an instruction of the
    loop's body that does work of its own (a fusion, a matmul or other custom
    call, a copy, a dynamic-update-slice, ...), not a parameter, tuple,
    get-tuple-element, constant or bitcast; a fusion counts once, however many
    operations it fuses. On a GPU each is about one kernel launch per trip, so
    for the scanned train step (trip count T: the forward loop and the backward
    loop) the sum is the kernels per time step. Loops whose trip count XLA does
    not know are reported with trip count 0. The op name tells the step's
    loops (".../jvp()/while", ".../transpose(jvp())/while") from the random
    number generator's (".../jit(_threefry_split)/...").
    """
    ops: dict[str, int] = {}
    loops: list[tuple[str, int, str]] = []
    current = None
    for line in hlo_text.splitlines():
        if (m := _COMPUTATION.match(line)) is not None:
            current = m.group(1)
            ops[current] = 0
            continue
        if current is None or (m := _INSTRUCTION.match(line)) is None:
            continue
        rest = m.group(1)
        opcode = _OPCODE.search(rest)
        if opcode is None:
            continue
        if opcode.group(1) == "while":
            body = _WHILE.search(rest)
            trips = _TRIPS.search(rest)
            name = _OP_NAME.search(rest)
            if body is not None:
                loops.append(
                    (body.group(1), int(trips.group(1)) if trips else 0, name.group(1) if name else "")
                )
        if opcode.group(1) not in _FREE_OPS:
            ops[current] += 1
    return [(trips, ops.get(body, 0), name) for body, trips, name in loops]


def ops_per_time_step(hlo_text: str, T: int) -> int:
    """Ops per time step of a compiled train step: its T-trip loops' ``loop_ops_per_trip``, summed.

    The forward and the backward loop; the random number generator's loops
    (threefry) are left out, also when their trip count happens to equal T.
    """
    rng = ("threefry", "_uniform", "_normal", "random")
    return sum(
        n for trips, n, name in loop_ops_per_trip(hlo_text) if trips == T and not any(r in name for r in rng)
    )
