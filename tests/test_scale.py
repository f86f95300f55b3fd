"""Scale-out correctness: sharded == single-device step, bfloat16 trains, the benchmark's JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from draw_jax import train_step
from draw_jax.config import DrawConfig, OptimConfig
from draw_jax.presets import PRESETS
from experiments import profiling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHARDED_SCRIPT = textwrap.dedent(
    """
    import os, re
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    import jax, numpy as np
    from draw_jax import train_step
    from draw_jax.config import DrawConfig, OptimConfig
    from draw_jax.parallel import Parallel

    assert jax.device_count() == 4, jax.devices()
    cfg = DrawConfig(T=4, enc_size=32, dec_size=32, z_size=6, read_n=2, write_n=3)
    graphdef, params = train_step.init_model(cfg, 0)
    # The ports' settings: a small constant rate that moves at step 0 (Adam's first step is
    # ~lr per parameter, so rounding differences grow with lr).
    opt = train_step.make_optimizer(OptimConfig(learning_rate=1e-3, adam_b1=0.5, lr_schedule="constant", warmup_steps=0))
    state = train_step.create_train_state(params, opt)
    images = np.random.default_rng(0).integers(0, 2, (16, 28, 28, 1)).astype(np.uint8)
    key = jax.random.key(5)
    kw = dict(binary=True, binarize="none")

    # Each step donates its state: give each its own copy.
    one = jax.tree.map(lambda a: a.copy(), state)
    s1, m1 = train_step.make_train_step(graphdef, opt, **kw)(one, jax.device_put(images, jax.devices()[0]), key)

    par = Parallel.create(16)
    s4, m4 = train_step.make_train_step(graphdef, opt, batch_sharding=par.batch, **kw)(
        jax.device_put(jax.tree.map(lambda a: a.copy(), state), par.replicated), par.put_batch(images), key)
    assert len(s4.params["to_mu"]["kernel"].sharding.device_set) == 4
    np.testing.assert_allclose(m4["bound"], m1["bound"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    # One gradient all-reduce per step, none inside the T-step loops (left to
    # XLA's partitioner, the scan's weight gradients were all-reduced every step t).
    step = train_step.make_train_step(graphdef, opt, batch_sharding=par.batch, **kw)
    hlo = step.lower(jax.device_put(state, par.replicated), par.put_batch(images), key).compile().as_text()
    bodies = {}
    for block in re.split(r"\\n(?=\\S)", hlo):
        header = block.split("\\n", 1)[0]
        if header.startswith("%") and header.rstrip().endswith("{"):
            bodies[header.split()[0][1:]] = block
    in_loops = set(re.findall(r"body=%([\\w.\\-]+)", hlo))
    todo = list(in_loops)
    while todo:  # everything a loop body calls runs in the loop too
        for name in re.findall(r"(?:calls|to_apply|body|condition)=%([\\w.\\-]+)", bodies.get(todo.pop(), "")):
            if name not in in_loops:
                in_loops.add(name)
                todo.append(name)
    assert in_loops and all("all-reduce(" not in bodies.get(n, "") for n in in_loops), "all-reduce in a loop"
    assert "all-reduce(" in hlo
    # The classifier's step too (the glimpse loop, T = 4 here).
    from flax import nnx
    from draw_jax.classifier import AttentionClassifier, ClassifierConfig
    from draw_jax.classifier_training import make_classifier_step
    ccfg = ClassifierConfig(height=28, width=28, glimpses=4, glimpse_n=5, hidden=32)
    cgraph, cstate = nnx.split(AttentionClassifier(ccfg, rngs=nnx.Rngs(0)))
    cstate = train_step.create_train_state(nnx.to_pure_dict(cstate), opt)
    labels = np.arange(16, dtype=np.int32) % 10
    c1, n1 = make_classifier_step(cgraph, opt)(jax.tree.map(lambda a: a.copy(), cstate), images, labels)
    c4, n4 = make_classifier_step(cgraph, opt, par.batch)(
        jax.device_put(cstate, par.replicated), par.put_batch(images), par.put_batch(labels))
    np.testing.assert_allclose(n4["loss"], n1["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(c1.params), jax.tree.leaves(c4.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    try:
        Parallel.create(18)
    except ValueError as e:
        assert "does not divide evenly over 4 devices" in str(e)
    else:
        raise AssertionError("batch 18 over 4 devices must fail")
    print("SHARDED_OK", float(m1["bound"]), float(m4["bound"]))
    """
)


def test_sharded_step_equals_single_device_step():
    # Given 4 forced CPU devices (set before JAX starts, hence a subprocess),
    # the data-parallel step gives the single-device loss and parameters.
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SHARDED_OK" in proc.stdout


def test_bfloat16_compute_trains_and_stays_finite():
    cfg = DrawConfig(T=4, enc_size=32, dec_size=32, z_size=6, read_n=2, write_n=3, compute_dtype="bfloat16")
    graphdef, params = train_step.init_model(cfg, 0)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))  # parameters stay float32
    opt = train_step.make_optimizer(OptimConfig(learning_rate=3e-3, lr_schedule="constant", warmup_steps=0))
    state = train_step.create_train_state(params, opt)
    step = train_step.make_train_step(graphdef, opt, binary=True, binarize="none")
    images = np.random.default_rng(0).binomial(1, 0.15, (32, 28, 28, 1)).astype(np.uint8)
    bounds = []
    for i in range(40):
        state, m = step(state, images, jax.random.key(i))
        bounds.append(float(m["bound"]))
    assert np.all(np.isfinite(bounds))
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(state.params))
    assert np.mean(bounds[-5:]) < bounds[0] - 100


@pytest.mark.parametrize("attention", [True, False], ids=["attention", "no_attention"])
def test_bfloat16_gradients_match_float32_to_bfloat16_precision(attention):
    # The bfloat16 mode (bf16 x bf16 -> f32 matmuls, everything else float32)
    # computes the float32 model's bound and gradients to bfloat16 precision.
    cfg = DrawConfig(T=5, enc_size=32, dec_size=32, z_size=6, read_n=2, write_n=3, compute_dtype="bfloat16")
    if not attention:
        cfg = dataclasses.replace(cfg, read_attention=False, write_attention=False)
    graphdef, params = train_step.init_model(cfg, 0)
    graphdef32, _ = train_step.init_model(dataclasses.replace(cfg, compute_dtype="float32"), 0)
    x = jnp.asarray(np.random.default_rng(1).binomial(1, 0.2, (6, 28, 28, 1)), jnp.float32)
    key = jax.random.key(2)
    low, lb = train_step._gradients(graphdef, params, x, key, 1.0)
    exact, eb = train_step._gradients(graphdef32, params, x, key, 1.0)
    np.testing.assert_allclose(lb["bound"], eb["bound"], rtol=2e-2)
    assert float(jnp.abs(lb["bound"] - eb["bound"])) > 0  # really computed in a lower precision
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(exact), jax.tree.leaves(low), strict=True):
        scale = float(jnp.max(jnp.abs(a))) + 1e-6
        np.testing.assert_allclose(b, a, rtol=0, atol=0.1 * scale, err_msg=jax.tree_util.keystr(path))


def test_ops_per_time_step_counts_the_step_s_two_loops_and_does_not_grow_with_t():
    # The benchmark's ops (on a GPU: kernels) per time step: the compiled step's
    # forward and backward T-trip loops, the random number generator's loops
    # (threefry, whose trip count here equals T = 5) left out.
    counts = {}
    for T in (5, 8):
        cfg = DrawConfig(T=T, enc_size=16, dec_size=16, z_size=4, read_n=2, write_n=3)
        text = profiling.compile_seconds(cfg, 4)[1].as_text()
        step_loops = [(n, name) for trips, n, name in profiling.loop_ops_per_trip(text) if trips == T]
        names = [name for _, name in step_loops if "threefry" not in name and "_uniform" not in name]
        assert sorted(name.rsplit("/", 2)[-2] for name in names) == ["jvp()", "transpose(jvp())"], names
        counts[T] = profiling.ops_per_time_step(text, T)
        assert counts[T] == sum(n for n, name in step_loops if name in names) > 0
    assert counts[5] == counts[8]  # one scan body, whatever T
    unrolled = profiling.compile_seconds(dataclasses.replace(cfg, T=3), 4, unrolled=True)[1]
    assert profiling.ops_per_time_step(unrolled.as_text(), 3) == 0  # no loop to count


def test_benchmark_emits_every_field(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "--configs=tiny", "--steps=3", "--warmup=1",
         "--unrolled_T=3", "--sweep_T=2,4", "--matmul_size=256", f"--json={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())
    step = next(r for r in records if r["name"] == "tiny")
    required = [
        "name", "T", "attention", "batch_size", "step_ms_median", "images_per_s", "compile_s",
        "flops_per_step", "achieved_flops_per_s", "matmul_flops_per_s", "flop_fraction",
        "shaped_matmul_flops_per_s", "peak_rss_mb", "steps_per_call", "timed_steps",
        "single_call_step_ms_median", "scan_gate_matmul_flops_per_s", "gate_matmul_flops_per_step",
        "gate_matmul_ms_per_step", "gate_matmul_flop_share", "gate_matmul_time_share", "ops_per_time_step",
    ]  # fmt: skip
    for field in required:
        assert field in step, field
    assert step["T"] == PRESETS["tiny"]["T"] and step["flops_per_step"] > 0 and 0 < step["flop_fraction"]
    np.testing.assert_allclose(
        step["flop_fraction"], step["achieved_flops_per_s"] / step["matmul_flops_per_s"]
    )
    # The gate matmuls (3 products x 2 LSTMs x T steps) are part of the FLOPs
    # XLA counts for the whole step, and each was timed in its scan.
    tiny = PRESETS["tiny"]
    T, b, e, d, z = tiny["T"], 100, tiny["enc_size"], tiny["dec_size"], tiny["z_size"]
    read = 2 * tiny["read_n"] ** 2
    gate = T * 3 * 2 * b * ((read + d + e) * 4 * e + (z + d) * 4 * d)
    assert step["gate_matmul_flops_per_step"] == gate < step["flops_per_step"]
    assert set(step["scan_gate_matmul_flops_per_s"]) == {"forward", "input_grad", "weight_grad"}
    assert min(step["scan_gate_matmul_flops_per_s"].values()) > 0 and step["gate_matmul_ms_per_step"] > 0
    # The timed path is train.py's default: whole calls of --steps_per_call steps.
    assert step["steps_per_call"] == 10 and step["timed_steps"] >= 3 and step["timed_steps"] % 10 == 0
    assert step["ops_per_time_step"] > 0  # the scanned loops were found in the compiled step
    sweep = next(r for r in records if r["name"] == "compile_sweep")
    assert set(map(int, sweep["scan_compile_s"])) == {2, 4} and sweep["unrolled_T"] == 3
    np.testing.assert_allclose(
        sweep["compile_ratio"], sweep["scan_compile_s"]["4"] / sweep["scan_compile_s"]["2"]
    )
    assert next(r for r in records if r["name"] == "data_pipeline_host")["images_per_s"] > 0
    assert "tiny" in proc.stdout and "compile ratio T=4 / T=2" in proc.stdout  # the printed table


@pytest.mark.parametrize("sweep", ["8,4", "8,x"])
def test_benchmark_refuses_a_bad_sweep_before_timing_anything(sweep):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "--configs=tiny", f"--sweep_T={sweep}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "--sweep_T" in proc.stderr and sweep in proc.stderr and "Traceback" not in proc.stderr


def test_flops_per_step_is_affine_in_T():
    # The benchmark's FLOP count (unrolled T=3, 4 extrapolated) matches XLA's
    # count of a fully unrolled T=6 step to a few percent.
    cfg = DrawConfig(T=6, enc_size=16, dec_size=16, z_size=4)
    unrolled = profiling.xla_flops(profiling.compile_seconds(cfg, 8, unrolled=True)[1])
    np.testing.assert_allclose(profiling.flops_per_step(cfg, 8), unrolled, rtol=0.03)


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, ".git")), reason="needs the git checkout")
def test_speed_comparison_against_a_commit_runs_the_same_step(tmp_path):
    # tools.compare_speed extracts draw_jax at a commit under another name
    # and times it against the working tree in one process. Against HEAD (the
    # same code in a clean checkout, as CI runs it) both compute the same step.
    out = tmp_path / "cmp.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.compare_speed", "--base=HEAD", "--configs=tiny", "--rounds=2",
         "--steps_per_call=2", "--batch_size=10", f"--json={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["config"] == "tiny" and len(record["base_ms"]) == len(record["new_ms"]) == 2
    assert record["median_ratio"] > 0 and np.isfinite(record["median_ratio"])
    if not subprocess.run(["git", "status", "--porcelain", "draw_jax"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip():  # fmt: skip
        assert record["max_bound_diff_first_call"] == 0 and record["max_param_diff_first_call"] == 0
    bad = subprocess.run(
        [sys.executable, "-m", "tools.compare_speed", "--base=no-such-revision"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and "--base=no-such-revision is not a commit" in bad.stderr
