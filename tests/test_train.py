"""End to end: train on real files, resume identically, evaluate, sample; and user errors."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from draw_jax import train_step
from draw_jax.checkpoint import Checkpointer
from draw_jax.config import ConfigError, OptimConfig, TrainConfig
from draw_jax.settings import build_config
from draw_jax.train_loop import TrainingDiverged, train_and_evaluate
from draw_jax.workdir import load_trained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = ["--preset=tiny"]


def tiny_config(data_dir: str, **settings) -> TrainConfig:
    defaults = dict(num_steps=24, log_every=4, eval_every=0, checkpoint_every=8, eval_examples=100)
    return build_config("tiny", data_dir=data_dir, batch_size=50, **(defaults | settings))


def run_cli(module: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def final_params(workdir: str, config: TrainConfig):
    _, params = train_step.init_model(config.model, 0)
    config = config.resolve(10**6)  # the schedule's length does not change the state's structure
    like = train_step.create_train_state(
        params, train_step.make_optimizer(config.optim), ema=config.optim.ema_decay > 0
    )
    with Checkpointer(workdir) as checkpoints:
        return checkpoints.restore(like)


def test_train_command_writes_everything_then_evaluate_and_sample(small_data, tmp_path):
    workdir = str(tmp_path / "run")
    trained = run_cli(
        "experiments.train", *TINY_FLAGS, f"--data_dir={small_data}", f"--workdir={workdir}",
        "--num_steps=36", "--batch_size=50", "--log_every=6", "--checkpoint_every=12",
        "--eval_every=18", "--keep_checkpoints=2",
    )  # fmt: skip
    # Each phase says what it does: the data loaded, then the compile, then the steps.
    log = trained.stderr
    assert log.index("loaded binarized_mnist/train: 600 images of 28x28x1") < log.index(
        "compiling the train step"
    )
    assert sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/*")) == [24, 36]
    config = json.load(open(f"{workdir}/config.json"))
    assert config["model"]["T"] == 4 and config["data"]["dataset"] == "binarized_mnist"
    results = json.load(open(f"{workdir}/results.json"))
    assert results["step"] == 36
    assert 0 < results["valid"]["bound"] < 600 and results["valid"]["num_images"] == 200
    assert results["train"]["images_per_s"] > 0
    for split in ("train", "valid"):
        assert glob.glob(f"{workdir}/tb/{split}/events.out.tfevents.*"), split
    out = run_cli("experiments.evaluate", f"--workdir={workdir}", "--num_importance_samples=4").stdout
    assert "variational bound" in out and "IWAE" in out
    ev = json.load(open(f"{workdir}/eval_valid_step36_k4.json"))
    assert ev["num_images"] == 200 and ev["iwae"] < ev["bound"] + 1.0
    again = run_cli(
        "experiments.evaluate",
        f"--workdir={workdir}",
        "--num_importance_samples=4",
        f"--output={tmp_path}/e2.json",
    )
    assert json.load(open(f"{tmp_path}/e2.json"))["bound"] == ev["bound"]  # deterministic
    assert again.returncode == 0
    # --num_examples: the split's first images, said so, in a file of their own.
    first = run_cli(
        "experiments.evaluate", f"--workdir={workdir}", "--num_importance_samples=4", "--num_examples=50"
    )
    assert "first 50 of 200 images" in first.stdout
    sub = json.load(open(f"{workdir}/eval_valid_step36_k4_first50.json"))
    assert (sub["num_images"], sub["split_size"]) == (50, 200) and sub["bound"] != ev["bound"]
    assert json.load(open(f"{workdir}/eval_valid_step36_k4.json")) == ev  # the whole split's figures kept
    too_many = run_cli("experiments.evaluate", f"--workdir={workdir}", "--num_examples=201", ok=False)
    assert "--num_examples=201" in too_many.stderr and "200 images" in too_many.stderr

    pics = str(tmp_path / "pics")
    sampled = run_cli(
        "experiments.sample",
        f"--workdir={workdir}",
        f"--output_dir={pics}",
        "--num_samples=9",
        "--num_animated=4",
    )
    for phase in (
        "loaded the model of",
        "generating 9 samples from the prior at temperature 1 (4 steps",
        "reconstructing 4 valid",
    ):
        assert phase in sampled.stderr, sampled.stderr
    from PIL import Image

    assert Image.open(f"{pics}/samples.png").size[0] > 28 * 3
    gif = Image.open(f"{pics}/generation.gif")
    assert gif.n_frames == 4  # one frame per step
    assert Image.open(f"{pics}/reconstruction.gif").n_frames == 4
    assert os.path.isfile(f"{pics}/samples_over_time.png") and os.path.isfile(
        f"{pics}/reconstructions_over_time.png"
    )
    # Nothing a user wrote is silently overwritten.
    before = open(f"{pics}/samples.png", "rb").read()
    refused = run_cli("experiments.sample", f"--workdir={workdir}", f"--output_dir={pics}", ok=False)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    assert open(f"{pics}/samples.png", "rb").read() == before
    cold = run_cli(
        "experiments.sample", f"--workdir={workdir}", f"--output_dir={pics}", "--temperature=-1", ok=False
    )
    assert cold.returncode == 2 and "--temperature must be >= 0, got -1" in cold.stderr
    assert "Traceback" not in cold.stderr


@pytest.mark.parametrize("device_data,ema_decay", [(False, 0.0), (True, 0.9)])
def test_resume_gives_the_same_run_as_uninterrupted(small_data, tmp_path, device_data, ema_decay):
    # Interrupt after 12 steps, restart the same command: same parameters,
    # optimiser state (and parameter average) after 24 steps as a run that was
    # never interrupted. (Device data without an average resumes exactly in
    # test_a_workdir_from_before_the_parameter_average_resumes_and_loads.)
    settings = dict(device_data=device_data, ema_decay=ema_decay)
    cfg = tiny_config(small_data, num_steps=24, **settings)
    straight = str(tmp_path / "straight")
    res_a = train_and_evaluate(cfg, straight)
    interrupted = str(tmp_path / "interrupted")
    train_and_evaluate(tiny_config(small_data, num_steps=12, **settings), interrupted)
    res_b = train_and_evaluate(cfg, interrupted)
    a, b = final_params(straight, cfg), final_params(interrupted, cfg)
    assert int(a.step) == int(b.step) == 24
    assert (a.ema is None) == (ema_decay == 0)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_allclose(res_a["train"]["bound"], res_b["train"]["bound"], rtol=1e-6)


def test_a_workdir_from_before_the_parameter_average_resumes_and_loads(small_data, tmp_path):
    # Workdirs written before TrainState.ema and the KL warm-up existed have
    # neither in config.json nor "ema" in their checkpoints. They load, and
    # resume to the same run as one never interrupted.
    cfg = tiny_config(small_data, num_steps=24, kl_warmup_steps=0, ema_decay=0.0)
    straight = str(tmp_path / "straight")
    train_and_evaluate(cfg, straight)
    old = str(tmp_path / "old")
    train_and_evaluate(tiny_config(small_data, num_steps=12, kl_warmup_steps=0, ema_decay=0.0), old)
    state = final_params(old, cfg)
    for name in glob.glob(f"{old}/checkpoints/*"):
        shutil.rmtree(name)
    with Checkpointer(old) as checkpoints:  # what the old TrainState wrote: no "ema"
        checkpoints.save(12, {"step": state.step, "params": state.params, "opt_state": state.opt_state})
    config = json.load(open(f"{old}/config.json"))
    del config["optim"]["ema_decay"], config["optim"]["kl_warmup_steps"], config["optim"]["clip_mode"]
    json.dump(config, open(f"{old}/config.json", "w"))

    loaded = load_trained(old)
    assert loaded.step == 12
    for x, y in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with_average = train_step.create_train_state(
        state.params, train_step.make_optimizer(cfg.resolve(10**6).optim), ema=True
    )
    with Checkpointer(old, read_only=True) as checkpoints, pytest.raises(ValueError, match="has no ema"):
        checkpoints.restore(with_average)

    train_and_evaluate(cfg, old)
    a, b = final_params(straight, cfg), final_params(old, cfg)
    assert int(b.step) == 24 and b.ema is None
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_per_variable_clipping_is_tf_clip_by_norm_on_each_array_and_global_is_one_norm():
    # tf.clip_by_norm(g, c) = g * c / max(|g|, c), on each variable (the ports),
    # against optax.clip_by_global_norm's one norm over all of them.
    rng = np.random.default_rng(0)
    big = rng.normal(size=(7, 3)).astype(np.float32)
    big *= 12.0 / np.linalg.norm(big)  # norm 12 > 5: scaled to 5, same direction
    small = np.float32([3.0, -4.0]) / 5.0 * 2.0  # norm 2 <= 5: untouched
    grads = {"w": jnp.asarray(big), "b": jnp.asarray(small)}

    per_variable = train_step.make_optimizer(
        OptimConfig(clip_mode="per_variable", clip_norm=5.0, decay_steps=10)
    )
    clip = train_step.clip_each_by_norm(5.0)
    clipped, _ = clip.update(grads, clip.init(grads))
    np.testing.assert_allclose(clipped["w"], big * 5.0 / 12.0, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(clipped["w"]), 5.0, rtol=1e-6)
    np.testing.assert_array_equal(clipped["b"], small)
    total = np.sqrt(12.0**2 + 2.0**2)
    globally, _ = optax.clip_by_global_norm(5.0).update(grads, optax.EmptyState())
    np.testing.assert_allclose(globally["b"], small * 5.0 / total, rtol=1e-6)
    # The clipping stage keeps no state in either mode: the optimiser state
    # (what checkpoints hold) has the same structure whichever is chosen.
    globally_cfg = OptimConfig(decay_steps=10)
    state = per_variable.init(grads)
    assert jax.tree.structure(state) == jax.tree.structure(
        train_step.make_optimizer(globally_cfg).init(grads)
    )
    # And make_optimizer wires it in: over three steps whose gradient norms
    # differ per variable, Adam's updates follow the per-variable clipping.
    explicit = optax.chain(
        clip, optax.adam(train_step.learning_rate_schedule(globally_cfg), b1=globally_cfg.adam_b1)
    )
    second = {"w": grads["w"] * 0.1, "b": grads["b"] * 3.0}
    outputs = {}
    for name, opt in [
        ("wired", per_variable),
        ("explicit", explicit),
        ("global", train_step.make_optimizer(globally_cfg)),
    ]:
        opt_state = opt.init(grads)
        for g in (grads, second, grads):
            update, opt_state = opt.update(g, opt_state, grads)
        outputs[name] = update
    np.testing.assert_allclose(outputs["wired"]["w"], outputs["explicit"]["w"], rtol=1e-6)
    assert not np.allclose(outputs["wired"]["w"], outputs["global"]["w"], rtol=1e-3)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        train_step.clip_each_by_norm(0.0)


def test_update_ema_is_the_bias_corrected_average_of_the_steps_parameters():
    # After updates 1..k produced p_1..p_k: sum_s d^(k-s) (1-d) p_s / (1 - d^k),
    # whatever the average started as (the first update replaces it).
    d, rng = 0.8, np.random.default_rng(0)
    ps = [{"w": rng.normal(size=(3, 2)).astype(np.float32)} for _ in range(6)]
    ema = {"w": np.full((3, 2), 1e3, np.float32)}
    for s, p in enumerate(ps, start=1):
        ema = train_step.update_ema(ema, p, jnp.asarray(s), d)
        weights = np.array([d ** (s - r) * (1 - d) for r in range(1, s + 1)]) / (1 - d**s)
        want = sum(w * q["w"] for w, q in zip(weights, ps[:s], strict=True))
        np.testing.assert_allclose(np.asarray(ema["w"]), want, rtol=1e-5, atol=1e-6)


def test_a_run_with_a_parameter_average_evaluates_and_releases_the_average(small_data, tmp_path):
    workdir = str(tmp_path / "run")
    cfg = tiny_config(small_data, num_steps=16, eval_every=16, ema_decay=0.9)
    results = train_and_evaluate(cfg, workdir)
    state = final_params(workdir, cfg)
    trained = load_trained(workdir)
    pairs = list(zip(jax.tree.leaves(state.ema), jax.tree.leaves(state.params), strict=True))
    for got, (ema, _) in zip(jax.tree.leaves(trained.params), pairs, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ema))
    assert any(not np.allclose(ema, raw) for ema, raw in pairs)
    valid = results["valid"]
    assert np.isfinite(valid["bound_raw_params"]) and valid["bound_raw_params"] != valid["bound"]


def test_device_resident_batches_equal_host_batches(small_data, tmp_path):
    # Device data with 5 steps per compiled call replays the host pipeline
    # exactly. 600 images / 50 = 12 steps an epoch, so the call of steps 10-14
    # crosses from epoch 0 into epoch 1 inside one compiled call.
    common = dict(num_steps=15, log_every=5, checkpoint_every=0)
    host = tiny_config(small_data, device_data=False, **common)
    dev = tiny_config(small_data, steps_per_call=5, **common)
    train_and_evaluate(host, str(tmp_path / "host"))
    res = train_and_evaluate(dev, str(tmp_path / "dev"))
    assert res["steps_per_call"] == 5  # really several steps per call, not reduced to 1
    a, b = final_params(str(tmp_path / "host"), host), final_params(str(tmp_path / "dev"), dev)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_divergence_stops_with_message_and_keeps_last_good_checkpoint(small_data, tmp_path):
    cfg = tiny_config(
        small_data, num_steps=20, checkpoint_every=1, log_every=1, learning_rate=1e30, clip_norm=0.0
    )
    workdir = str(tmp_path / "nan")
    with pytest.raises(TrainingDiverged, match=r"became (nan|inf|-inf).*last good checkpoint \(step \d+\)"):
        train_and_evaluate(cfg, workdir)
    with Checkpointer(workdir) as ckpt:
        last = ckpt.latest_step()
    assert last is not None and last < 20
    restored = final_params(workdir, cfg)
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(restored.params))


def test_divergence_before_any_checkpoint_says_so(small_data, tmp_path):
    cfg = tiny_config(
        small_data, num_steps=20, checkpoint_every=20, log_every=1, learning_rate=1e30, clip_norm=0.0,
        warmup_steps=0,
    )  # fmt: skip
    with pytest.raises(TrainingDiverged, match="No checkpoint was written before it diverged"):
        train_and_evaluate(cfg, str(tmp_path / "early"))


def test_workdir_of_a_different_run_is_refused(small_data, tmp_path):
    cfg = tiny_config(small_data, num_steps=4, checkpoint_every=0)
    workdir = str(tmp_path / "w")
    train_and_evaluate(cfg, workdir)
    other = tiny_config(small_data, num_steps=4, checkpoint_every=0, z_size=9)
    with pytest.raises(ConfigError, match=r"model.z_size: 8 -> 9"):
        train_and_evaluate(other, workdir)


def test_a_resumed_run_takes_its_settings_from_its_config_json(small_data, tmp_path):
    # A run made with a non-default Adam beta1 resumes with a command that
    # leaves --adam_b1 out (a default that changed since never blocks a resume)
    # and raises --num_steps; a typed setting that contradicts the run's model
    # is refused by name, before anything is loaded, and nothing is changed.
    workdir = str(tmp_path / "b1")
    train_and_evaluate(tiny_config(small_data, num_steps=8, adam_b1=0.7, checkpoint_every=4), workdir)
    before = open(f"{workdir}/config.json").read()
    run_cli(
        "experiments.train", *TINY_FLAGS, f"--data_dir={small_data}", f"--workdir={workdir}",
        "--num_steps=12", "--batch_size=50", "--eval_examples=100",
    )  # fmt: skip
    saved = json.load(open(f"{workdir}/config.json"))
    assert saved["optim"]["adam_b1"] == 0.7 and saved["run"]["num_steps"] == 12
    assert json.load(open(f"{workdir}/results.json"))["step"] == 12
    resumed = open(f"{workdir}/config.json").read()
    refused = run_cli("experiments.train", f"--workdir={workdir}", "--z_size=9", "--adam_b1=0.7", ok=False)
    message = " ".join(refused.stderr.split())  # one wrapped paragraph
    assert refused.returncode == 2 and "Traceback" not in message
    assert "--z_size=9 (the run has 8)" in message and "adam_b1" not in message
    assert open(f"{workdir}/config.json").read() == resumed != before


def test_a_file_where_a_folder_is_expected_is_refused_at_start(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for module, flag in (("experiments.train", "--workdir"), ("experiments.sample", "--output_dir")):
        extra = ["--pretrained=binarized_mnist_attention"] if module == "experiments.sample" else []
        proc = run_cli(module, f"{flag}={a_file}", *extra, ok=False)
        message = " ".join(proc.stderr.split())
        assert proc.returncode == 2 and "Traceback" not in message, message
        assert f"{flag}={a_file} is a file, not a folder" in message
    assert a_file.read_text() == "mine"


def test_small_config_does_not_collapse_to_the_prior(small_data, tmp_path):
    # The blog ports' small configuration (T=10, z=10) on real data: with the
    # tiling window initialisation the KL stays well above 0 (no collapse).
    cfg = build_config(
        "small_attention", enc_size=64, dec_size=64, data_dir=small_data, batch_size=50,
        num_steps=120, log_every=120, eval_every=0, checkpoint_every=0, eval_examples=200,
    )  # fmt: skip
    res = train_and_evaluate(cfg, str(tmp_path / "small"))
    assert res["valid"]["kl"] > 2.0, res["valid"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--T=0"], "--T must be a positive integer"),
        (["--read_n=0"], "--read_n (glimpse size) must be a positive integer"),
        (["--z_size=-4"], "--z_size must be a positive integer"),
        (["--batch_size=0"], "--batch_size must be a positive integer"),
        (["--learning_rate=-1"], "--learning_rate must be > 0"),
        (["--dataset=cifar"], "--dataset"),
        (["--preset=huge"], "--preset"),
        (["--num_epochs=2", "--num_steps=5"], "give one run length"),
        (["--eval_split=dev"], "--eval_split=dev: binarized_mnist has splits train, valid, test"),
        (["--lr_schedule=cosine", "--decay_steps=0"], "--decay_steps must be >= 1"),
        (["--binarize=threshold"], "does not apply to binarized_mnist"),
        (["--data_dir=/nonexistent"], "--data_dir=/nonexistent is not a directory"),
        (["--eval_split=train"], "held-out split"),
    ],
)
def test_bad_flags_fail_fast_with_a_message(args, message, tmp_path):
    proc = run_cli("experiments.train", f"--workdir={tmp_path}/w", *args, ok=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(f"{tmp_path}/w/config.json")  # failed before touching the workdir


def test_missing_file_and_missing_checkpoint_messages(tmp_path, small_data):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli(
        "experiments.train", f"--workdir={tmp_path}/w", f"--data_dir={empty}", *TINY_FLAGS, ok=False
    )
    assert proc.returncode == 2 and "missing data file" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("experiments.evaluate", f"--workdir={tmp_path}/nothing", ok=False)
    message = " ".join(proc.stderr.split())  # the message is wrapped; a long tmp path moves the breaks
    assert proc.returncode == 2 and "config.json not found" in message


def test_extending_a_cosine_run_keeps_its_schedule(small_data, tmp_path):
    # A finished 12-step cosine run extended to 16 steps with the same flags
    # (--num_steps raised) is allowed, keeps decay_steps = 12 in config.json,
    # and its last 4 steps run at the schedule's final rate; asking for another
    # schedule length in the same workdir is refused.
    workdir = str(tmp_path / "cos")
    base = dict(
        lr_schedule="cosine", learning_rate=1e-2, final_lr_fraction=0.1, warmup_steps=0, checkpoint_every=4
    )
    train_and_evaluate(tiny_config(small_data, num_steps=12, **base), workdir)
    res = train_and_evaluate(tiny_config(small_data, num_steps=16, **base), workdir)
    assert res["step"] == 16
    saved = json.load(open(f"{workdir}/config.json"))
    assert saved["optim"]["decay_steps"] == 12 and saved["run"]["num_steps"] == 16
    schedule = train_step.learning_rate_schedule(TrainConfig.from_dict(saved).optim)
    np.testing.assert_allclose([float(schedule(s)) for s in (12, 15)], [1e-3, 1e-3], rtol=1e-6)
    assert float(schedule(0)) == pytest.approx(1e-2)
    with pytest.raises(ConfigError, match=r"optim.decay_steps: 12 -> 20"):
        train_and_evaluate(tiny_config(small_data, num_steps=20, decay_steps=20, **base), workdir)
    fresh = str(tmp_path / "fresh")
    train_and_evaluate(tiny_config(small_data, num_steps=8, **base), fresh)
    assert json.load(open(f"{fresh}/config.json"))["optim"]["decay_steps"] == 8  # a new run: its own length


def test_num_epochs_counts_whole_epochs_of_the_real_split(small_data, tmp_path):
    res = train_and_evaluate(
        tiny_config(small_data, num_epochs=2, num_steps=None, log_every=6), str(tmp_path / "e")
    )
    assert res["step"] == 2 * (600 // 50)


@pytest.mark.parametrize("sig, how", [("SIGINT", "interrupted"), ("SIGTERM", "stopped by SIGTERM")])
def test_ctrl_c_keeps_a_resumable_checkpoint(small_data, tmp_path, sig, how):
    # SIGINT (Ctrl-C) or SIGTERM (timeout, kill, a scheduler; by default it would
    # kill Python outright) in the middle of training: the command exits 128 +
    # the signal's number with a message naming the checkpoint, writers and
    # checkpointer closed, and the same command resumes from that checkpoint.
    import signal
    import time

    from draw_jax import workdir as workdir_lib

    workdir = str(tmp_path / "int")
    args = [
        sys.executable, "-m", "experiments.train", *TINY_FLAGS, f"--data_dir={small_data}",
        f"--workdir={workdir}", "--batch_size=50", "--checkpoint_every=3", "--log_every=3",
        "--eval_every=0", "--eval_examples=50", "--steps_per_call=1",
    ]  # fmt: skip
    # As from a terminal: SIGINT at its default action in the child. A process
    # whose parent ignores SIGINT (a pytest-xdist worker, a background job)
    # would start with it ignored, and Python then installs no Ctrl-C handler.
    proc = subprocess.Popen(
        [*args, "--num_steps=1000000"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not glob.glob(f"{workdir}/checkpoints/[0-9]*"):
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(getattr(signal, sig))
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:  # a child that did not stop must not outlive the test (its 10^6 steps hold a core)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + getattr(signal, sig), stderr[-3000:]
    message = " ".join(stderr.split())  # the message is wrapped at 100 columns
    assert f"{how} after step" in message and "run the same command to resume" in message
    assert "Traceback" not in stderr
    with Checkpointer(workdir) as ckpt:
        last = ckpt.latest_step()
    assert last is not None and last % 3 == 0
    if sig == "SIGTERM":
        return  # resuming does not depend on the signal; the SIGINT case checks it
    resumed = run_cli(*args[2:], f"--num_steps={last + 3}")
    assert f"resumed from {os.path.abspath(workdir)}/checkpoints at step {last}" in resumed.stderr
    results = json.load(open(os.path.join(workdir, workdir_lib.RESULTS_FILE)))
    assert results["step"] == last + 3


def test_grey_mnist_defaults_run_and_evaluate_honestly(shared_data, tmp_path):
    # --dataset=mnist with every other flag at its default evaluates on the
    # held-out valid split (no test images); with --binarize=none the
    # evaluation says it reports cross-entropies, not likelihoods.
    workdir = str(tmp_path / "grey")
    mnist = os.path.join(shared_data, "mnist")
    run_cli(
        "experiments.train", *TINY_FLAGS, "--dataset=mnist", f"--data_dir={mnist}", f"--workdir={workdir}",
        "--num_steps=4", "--log_every=2", "--eval_examples=100", "--binarize=none",
    )  # fmt: skip
    results = json.load(open(f"{workdir}/results.json"))
    assert results["valid"]["num_images"] == 100
    out = run_cli("experiments.evaluate", f"--workdir={workdir}", "--num_importance_samples=2").stdout
    assert "not likelihoods" in out and "IWAE estimate of -log p(x)" not in out
    ev = json.load(open(glob.glob(f"{workdir}/eval_valid_*.json")[0]))
    assert ev["is_likelihood"] is False and ev["num_images"] == 10_000


def test_ctrl_c_inside_a_c_call_is_still_an_interrupt():
    # A SIGINT landing inside numpy's dtype machinery surfaces as SystemError
    # ("returned a result with an exception set") caused by the KeyboardInterrupt:
    # it must end the run like any Ctrl-C, not as a traceback. Other SystemErrors stay errors.
    from draw_jax.loop import _is_interrupt

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as cause:
            raise SystemError("returned a result with an exception set") from cause
    except SystemError as e:
        assert _is_interrupt(e)
    assert _is_interrupt(KeyboardInterrupt())
    assert not _is_interrupt(SystemError("something else"))


def test_averages_rebuilt_from_raw_checkpoints_equal_the_runs_own(small_data, tmp_path):
    # compare_averages forms other decays after the fact: with a checkpoint at
    # every step from step 1, the rebuilt average of the run's own decay must be
    # the run's average, and a tail mean the plain mean of those steps' parameters.
    from tools.averages import averages

    workdir = str(tmp_path / "run")
    cfg = tiny_config(small_data, num_steps=6, checkpoint_every=1, keep_checkpoints=10, ema_decay=0.8)
    train_and_evaluate(cfg, workdir)
    like = final_params(workdir, cfg)
    with Checkpointer(workdir) as checkpoints:
        steps = sorted(checkpoints.all_steps())
        states = [checkpoints.restore(like, s) for s in steps]
    assert steps == [1, 2, 3, 4, 5, 6]
    by_step = {s: st.params for s, st in zip(steps, states, strict=True)}
    loaded = []

    def params_at(step):
        loaded.append(step)
        return by_step[step]

    got = averages(steps, params_at, [0.8, 0.5], [3])
    assert loaded == steps  # one pass, one checkpoint at a time, in order
    for rebuilt, own in zip(jax.tree.leaves(got["ema0.8"]), jax.tree.leaves(states[-1].ema), strict=True):
        np.testing.assert_allclose(rebuilt, own, rtol=1e-5, atol=1e-7)
    last3 = [st.params for st in states[3:]]
    for mean, *xs in zip(jax.tree.leaves(got["tail3"]), *map(jax.tree.leaves, last3), strict=True):
        np.testing.assert_allclose(mean, sum(xs) / 3, rtol=1e-5, atol=1e-7)
    ema5, ema8 = jax.tree.leaves(got["ema0.5"]), jax.tree.leaves(got["ema0.8"])
    assert any(not np.allclose(a, b) for a, b in zip(ema5, ema8, strict=True))
    # Every second checkpoint: decay d**2 per checkpoint, still from the first kept one.
    evens = averages([2, 4, 6], by_step.__getitem__, [0.8], [])
    p = [st.params for st in states[1::2]]  # steps 2, 4, 6
    r2, r3 = 0.36 / (1 - 0.64**2), 0.36 / (1 - 0.64**3)
    expected = jax.tree.map(lambda a, b, c: ((1 - r2) * a + r2 * b) * (1 - r3) + r3 * c, *p)
    for rebuilt, want in zip(jax.tree.leaves(evens["ema0.8"]), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(rebuilt, want, rtol=1e-5, atol=1e-7)
    loaded.clear()
    with pytest.raises(ValueError, match="evenly spaced"):
        averages([1, 2, 4, 5], params_at, [0.8], [])
    with pytest.raises(ValueError, match="decays must be in"):
        averages(steps, params_at, [1.5], [])
    assert loaded == []  # refused before restoring anything
    # The command prints the rebuilt and the run's own average side by side, equal.
    out = run_cli(
        "tools.compare_averages", f"--workdir={workdir}", "--decays=0.8", "--tails=3",
        "--eval_examples=100", f"--output={tmp_path / 'avg.json'}",
    ).stdout  # fmt: skip
    table = json.load(open(tmp_path / "avg.json"))
    assert table["ema0.8"] == pytest.approx(table["run's own average (decay 0.8)"], abs=1e-3), out
    assert table["raw"] != table["ema0.8"] and "tail3" in out
    again = run_cli(
        "tools.compare_averages", f"--workdir={workdir}", f"--output={tmp_path / 'avg.json'}", ok=False
    )
    assert again.returncode != 0 and "exists" in again.stderr
    negative = run_cli("tools.compare_averages", f"--workdir={workdir}", "--eval_examples=-5", ok=False)
    assert negative.returncode != 0 and "--eval_examples must be >= 0" in negative.stderr


def test_signals_during_a_checkpoint_write_are_held_back_then_handled_as_before():
    # What Checkpointer.save relies on: a signal inside `deferred` waits for the
    # block's end, then gets the handling it had: Ctrl-C a KeyboardInterrupt,
    # SIGTERM under sigterm_as_interrupt a Terminated, an ignored signal nothing.
    import signal

    from draw_jax import interrupts

    finished = []
    # Ctrl-C's Python default, whatever this process inherited (a job started in the
    # background of a non-interactive shell starts with SIGINT ignored).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            with interrupts.deferred():
                signal.raise_signal(signal.SIGINT)
                finished.append("sigint")
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert finished == ["sigint"] and not isinstance(info.value, interrupts.Terminated)
    assert interrupts.signal_of(info.value) == signal.SIGINT

    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with interrupts.sigterm_as_interrupt():
        with pytest.raises(interrupts.Terminated) as info:
            with interrupts.deferred():
                signal.raise_signal(signal.SIGTERM)
                finished.append("sigterm")
        assert interrupts.signal_of(info.value) == signal.SIGTERM
        assert interrupts.signal_of(SystemError()) == signal.SIGINT
    assert finished == ["sigint", "sigterm"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after training

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. a background job's SIGINT
    try:
        with interrupts.deferred():
            signal.raise_signal(signal.SIGINT)
            finished.append("ignored")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert finished[-1] == "ignored"


def test_a_program_s_own_sigterm_handler_is_left_alone():
    import signal

    from draw_jax import interrupts

    mine = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with interrupts.sigterm_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_host_dispatches_at_most_one_call_ahead_of_the_device(monkeypatch):
    # A stopped run must wait for the calls already queued before its process
    # can exit: MetricAccumulator.add waits for the previous call, so at most
    # one is queued behind the running one (not a whole log interval's ten).
    from draw_jax import metrics as metrics_lib

    waited = []
    monkeypatch.setattr(metrics_lib.jax, "block_until_ready", lambda x: waited.append(x) or x)
    acc = metrics_lib.MetricAccumulator()
    calls = [{"bound": jnp.full((2,), float(i))} for i in range(4)]
    for m in calls:
        acc.add(m)
    assert [id(m) for m in waited] == [id(m) for m in calls[:-1]]  # each call's predecessor, in order
    acc.drain(8)
    assert acc.means()["bound"] == pytest.approx(1.5)  # nothing lost by the waiting
