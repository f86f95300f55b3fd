"""In-process speed A/B: the working tree's train step against a git commit's.

``python -m tools.compare_speed --base=e3725a8 --configs=paper_attention``

The machines this project is developed on drift by tens of percent within
minutes, so step times from separate processes cannot be compared. This
script extracts ``draw_jax`` as it was at ``--base`` (``git archive``) into a
temporary folder under another package name, builds both versions' default
training step (training split on the device, ``--steps_per_call`` steps per
compiled call) on the same synthetic batch, checks they compute the same
thing, then times them in alternating rounds (the order flips every round)
and prints the median of the per-round ratios new / base. Pin it to one core
for a quiet figure: ``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1" taskset -c 0 python -m ...``.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

flags.DEFINE_string("base", "HEAD", "Git revision to compare the working tree's draw_jax against.")
flags.DEFINE_list("configs", ["paper_attention"], "Presets to compare (draw_jax/presets.py).")
flags.DEFINE_integer("rounds", 6, "Timed rounds (each times both versions once).")
flags.DEFINE_integer("steps_per_call", 10, "Train steps per compiled call (train.py's default).")
flags.DEFINE_integer("batch_size", 100, "Images per step.")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "The working tree's --compute_dtype.")
flags.DEFINE_enum(
    "base_compute_dtype", None, ["float32", "bfloat16"], "The base's --compute_dtype (default: the same)."
)
flags.DEFINE_string("json", None, "Append one record per config to this JSON-lines file.")
FLAGS = flags.FLAGS

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_BASE_PACKAGE = "draw_jax_base"


def extract_base(revision: str, into: str) -> str:
    """Writes ``draw_jax`` at ``revision`` as package ``draw_jax_base`` under ``into``; returns its commit."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{revision}^{{commit}}"],
        cwd=_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if commit.returncode != 0:
        raise app.UsageError(f"--base={revision} is not a commit of {_ROOT}: {commit.stderr.strip()}")
    archive = subprocess.run(
        ["git", "archive", commit.stdout.strip(), "draw_jax"], cwd=_ROOT, capture_output=True, check=True
    )
    subprocess.run(["tar", "x", "-C", into], input=archive.stdout, check=True)
    package = pathlib.Path(into) / _BASE_PACKAGE
    (pathlib.Path(into) / "draw_jax").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\bdraw_jax\b", _BASE_PACKAGE, path.read_text()))
    return commit.stdout.strip()


def build(package: str, preset: str, compute_dtype: str, batch_size: int, steps_per_call: int):
    """(compiled multi-step call, fresh-state factory, its arguments, first call's metrics)."""
    ts = importlib.import_module(f"{package}.train_step")
    feeding = importlib.import_module(f"{package}.feeding")
    try:  # build_config moved from config to settings; a base revision may have either
        settings = importlib.import_module(f"{package}.settings")
    except ModuleNotFoundError:
        settings = importlib.import_module(f"{package}.config")
    cfg = settings.build_config(preset, compute_dtype=compute_dtype, batch_size=batch_size).resolve(50_000)
    m = 10 * batch_size
    rng = np.random.default_rng(0)
    images = jnp.asarray((rng.random((m, *cfg.model.image_shape)) > 0.7).astype(np.uint8))
    perms = jnp.stack([feeding.device_epoch_permutation(0, e, m) for e in (0, 1)])
    graphdef, params = ts.init_model(cfg.model, 0)
    optimizer = ts.make_optimizer(cfg.optim)
    step = ts.make_device_train_step(
        graphdef, optimizer, binary=True, binarize="none", batch_size=batch_size,
        steps_per_epoch=10, steps_per_call=steps_per_call,
    )  # fmt: skip

    def fresh():
        return jax.device_put(ts.create_train_state(jax.tree.map(jnp.copy, params), optimizer))

    args = (images, perms, jnp.int32(0), jax.random.key(0))
    t0 = time.perf_counter()
    state, metrics = step(fresh(), *args)
    jax.block_until_ready(state)
    return step, fresh, args, (state, metrics), time.perf_counter() - t0


def compare(preset: str, base_dtype: str, new_dtype: str) -> dict:
    k = FLAGS.steps_per_call
    runs = {
        "base": build(_BASE_PACKAGE, preset, base_dtype, FLAGS.batch_size, k),
        "new": build("draw_jax", preset, new_dtype, FLAGS.batch_size, k),
    }
    (sb, mb), (sn, mn) = runs["base"][3], runs["new"][3]
    loss_diff = float(jnp.max(jnp.abs(mb["bound"] - mn["bound"])))
    param_diff = float("nan")  # the versions' parameters may differ in structure
    if jax.tree.structure(sb.params) == jax.tree.structure(sn.params):
        pairs = zip(jax.tree.leaves(sb.params), jax.tree.leaves(sn.params), strict=True)
        param_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs)
    times: dict[str, list[float]] = {"base": [], "new": []}
    for r in range(FLAGS.rounds):
        for name in ("base", "new") if r % 2 == 0 else ("new", "base"):
            step, fresh, args = runs[name][:3]
            state = fresh()
            t0 = time.perf_counter()
            out, _ = step(state, *args)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / k)
    ratios = np.asarray(times["new"]) / np.asarray(times["base"])
    return {
        "config": preset,
        "base_compute_dtype": base_dtype,
        "compute_dtype": new_dtype,
        "steps_per_call": k,
        "base_ms": [round(t * 1e3, 1) for t in times["base"]],
        "new_ms": [round(t * 1e3, 1) for t in times["new"]],
        "median_ratio": float(np.median(ratios)),
        "ratio_range": [float(ratios.min()), float(ratios.max())],
        "first_call_s": {"base": runs["base"][4], "new": runs["new"][4]},
        "max_bound_diff_first_call": loss_diff,
        "max_param_diff_first_call": param_diff,
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    base_dtype = FLAGS.base_compute_dtype or FLAGS.compute_dtype
    with tempfile.TemporaryDirectory() as tmp:
        commit = extract_base(FLAGS.base, tmp)
        sys.path.insert(0, tmp)
        print(f"base {FLAGS.base} = {commit[:12]} ({base_dtype}) vs working tree ({FLAGS.compute_dtype}); "
              f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs visible")  # fmt: skip
        for preset in FLAGS.configs:
            rec = compare(preset, base_dtype, FLAGS.compute_dtype) | {"base_commit": commit}
            print(
                f"{preset}: new / base = {rec['median_ratio']:.3f} (median of {FLAGS.rounds} paired rounds, "
                f"range {rec['ratio_range'][0]:.3f}-{rec['ratio_range'][1]:.3f}); base {np.median(rec['base_ms']):.1f} "
                f"ms/step, new {np.median(rec['new_ms']):.1f}; first call's bound differs by "
                f"{rec['max_bound_diff_first_call']:.3g}, parameters by {rec['max_param_diff_first_call']:.3g}",
                flush=True,
            )
            if FLAGS.json:
                with open(FLAGS.json, "a") as f:
                    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    app.run(main)
