"""Cluttered MNIST and the attention classifier: the builder's protocol, the
classifier's use of draw_jax.attention, scan == loop, overfitting real images,
and the entry point end to end with resume."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from draw_jax import attention, cluttered, data, feeding, pretrained, train_step
from draw_jax.classifier import AttentionClassifier, ClassifierConfig
from draw_jax.classifier_training import (
    ClassifierRunConfig,
    _ClassifierFeeder,
    evaluate_error,
    load_classifier,
    make_classifier_step,
)
from draw_jax.config import ConfigError, OptimConfig
from tests.test_train import run_cli


@pytest.fixture(scope="module")
def mnist_dir(shared_data):
    return os.path.join(shared_data, "mnist")


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return {s: data.load_split("mnist", s, mnist_dir) for s in ("train", "valid", "test")}


def _layers(ds: cluttered.ClutteredMNIST, i: int) -> np.ndarray:
    """Every piece of example i on its own zero canvas: [1 + clutter, size, size, 1]."""
    p = ds.placement(i)
    layers = np.zeros((1 + ds.num_clutter, ds.size, ds.size, 1), np.uint8)
    y, x = p.digit_yx
    layers[0, y : y + 28, x : x + 28] = ds.images[i]
    for k, (src, (cy, cx), (py, px)) in enumerate(
        zip(p.clutter_sources, p.clutter_cut_yx, p.clutter_yx, strict=True)
    ):
        layers[1 + k, py : py + 8, px : px + 8] = ds.images[src, cy : cy + 8, cx : cx + 8]
    return layers


@pytest.mark.parametrize("variant", ["100x100", "60x60"])
def test_builder_follows_the_protocol(mnist_dir, mnist, variant):
    size, pieces = cluttered.VARIANTS[variant]
    for split in ("train", "valid", "test"):
        ds = cluttered.load(split, variant=variant, seed=3, data_dir=mnist_dir)
        source = mnist[split]
        assert len(ds) == len(source)
        for i in (0, 17, len(ds) - 1):
            image, label = ds.example(i)
            p = ds.placement(i)
            assert image.shape == (size, size, 1) and image.dtype == np.uint8
            # The digit: MNIST image i of the same split, whole and inside the canvas.
            y, x = p.digit_yx
            assert 0 <= y <= size - 28 and 0 <= x <= size - 28
            assert label == source.labels[i]
            assert np.all(image[y : y + 28, x : x + 28] >= source.images[i])
            # Exactly `pieces` pieces of clutter, from other images of the same split only.
            assert len(p.clutter_sources) == pieces
            assert np.all((p.clutter_sources >= 0) & (p.clutter_sources < len(source)))
            assert i not in p.clutter_sources
            assert np.all((p.clutter_yx >= 0) & (p.clutter_yx <= size - 8))
            # Nothing else: the canvas is the pixelwise max of those layers.
            np.testing.assert_array_equal(image, _layers(ds, i).max(axis=0))


def test_builder_is_deterministic_per_seed_and_differs_across_seeds(mnist_dir):
    a = cluttered.load("valid", seed=0, data_dir=mnist_dir).batch(np.arange(8))[0]
    b = cluttered.load("valid", seed=0, data_dir=mnist_dir).batch(np.arange(8))[0]
    c = cluttered.load("valid", seed=1, data_dir=mnist_dir).batch(np.arange(8))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ConfigError, match="--variant"):
        cluttered.load("valid", variant="50x50", data_dir=mnist_dir)


def test_a_redrawn_epoch_places_and_clutters_the_same_digit_afresh(mnist_dir, mnist):
    ds = cluttered.load("train", seed=3, data_dir=mnist_dir)
    moved = 0
    for i in (0, 5, 17, 123):
        fixed = ds.example(i)
        np.testing.assert_array_equal(ds.example(i, epoch=0)[0], fixed[0])  # epoch 0 is the fixed set
        for epoch in (1, 2):
            image, label = ds.example(i, epoch)
            p = ds.placement(i, epoch)
            assert label == fixed[1] == mnist["train"].labels[i]
            y, x = p.digit_yx
            assert np.all(image[y : y + 28, x : x + 28] >= mnist["train"].images[i])
            assert i not in p.clutter_sources and len(p.clutter_sources) == 8
            np.testing.assert_array_equal(image, ds.example(i, epoch)[0])  # a pure function of (i, epoch)
            assert not np.array_equal(image, fixed[0])
            moved += p.digit_yx != ds.placement(i).digit_yx
    assert moved >= 6  # positions are redrawn, not only the clutter
    with pytest.raises(ValueError, match="epoch"):
        ds.placement(0, epoch=-1)


class _Identity:
    @staticmethod
    def put_batch(a):
        return a


@pytest.mark.parametrize("redraw", [True, False])
def test_the_feeder_redraws_each_epoch_and_resumes_mid_run_exactly(mnist, redraw):
    source = mnist["valid"]
    small = data.Dataset(source.images[:40], False, "mnist", "valid", source.labels[:40])
    ds = cluttered.ClutteredMNIST(small, size=60, num_clutter=4, seed=0)
    config = ClassifierRunConfig(model=ClassifierConfig(height=60, width=60), variant="60x60",
                                 batch_size=8, redraw_clutter=redraw)  # fmt: skip

    def fed(start, steps):
        seen = []

        def step_fn(state, images, labels):
            seen.append((images, labels))
            return state, {"loss": jnp.zeros(())}

        feeder = _ClassifierFeeder(step_fn, ds, config, _Identity(), start)
        for s in range(start, start + steps):
            feeder(None, s, 100)
        return seen

    whole = fed(0, 12)  # 5 steps per epoch: epochs 0, 1 and part of 2
    order = feeding.train_indices(40, 8, config.seed)
    for s, (images, labels) in enumerate(whole):
        idx = next(order)
        epoch = s // 5 if redraw else 0
        np.testing.assert_array_equal(images, ds.batch(idx, epoch)[0])
        np.testing.assert_array_equal(labels, small.labels[idx])
    for (a, _), (b, _) in zip(whole[7:], fed(7, 5), strict=True):  # a resumed run sees the same images
        np.testing.assert_array_equal(a, b)


def test_a_config_written_before_redrawn_clutter_resumes_the_fixed_set():
    d = ClassifierRunConfig().to_dict()
    assert d["redraw_clutter"] is True
    del d["redraw_clutter"]
    assert ClassifierRunConfig.from_dict(d).redraw_clutter is False


def _model(size=100, glimpses=3, n=12, hidden=32, seed=0):
    cfg = ClassifierConfig(height=size, width=size, glimpses=glimpses, glimpse_n=n, hidden=hidden)
    return AttentionClassifier(cfg, rngs=nnx.Rngs(seed))


def test_the_glimpse_is_draw_jax_attention_read(mnist_dir):
    images, _ = cluttered.load("valid", data_dir=mnist_dir).batch(np.arange(4))
    x = jnp.asarray(images, jnp.float32) / 255.0
    model = _model()
    h = jax.random.normal(jax.random.key(1), (4, 32))
    patch, win = model.glimpse(x, h)
    params = model.to_window(h)
    direct = attention.read(x, attention.window_from_params(params, n=12, height=100, width=100))
    np.testing.assert_array_equal(patch, direct)
    assert win.n == 12 and patch.shape == (4, 12, 12, 1)


def test_scanned_glimpses_equal_a_python_loop(mnist_dir):
    images, _ = cluttered.load("valid", data_dir=mnist_dir).batch(np.arange(4))
    model = _model(glimpses=4)
    a = model(images)
    x = jnp.asarray(images, jnp.float32) / 255.0
    carry, windows = model.initial_carry(4), []
    for _ in range(4):  # the oracle: the step in a Python loop
        carry, (_, win) = model.step(carry, x)
        windows.append(win.gx)
    np.testing.assert_allclose(a.logits, model.to_logits(carry[1]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.windows.gx, jnp.stack(windows), rtol=1e-5, atol=1e-5)
    assert a.glimpses.shape == (4, 4, 12, 12, 1)


def test_classifier_overfits_a_small_batch_of_real_cluttered_images(mnist_dir):
    images, labels = cluttered.load("train", variant="60x60", data_dir=mnist_dir).batch(np.arange(32))
    model = _model(size=60, glimpses=4, hidden=64)
    graphdef, state = nnx.split(model)
    optimizer = train_step.make_optimizer(
        OptimConfig(learning_rate=3e-3, adam_b1=0.9, lr_schedule="constant", warmup_steps=0)
    )
    ts = train_step.create_train_state(nnx.to_pure_dict(state), optimizer)
    step = make_classifier_step(graphdef, optimizer)
    first = None
    for _ in range(250):
        ts, m = step(ts, images, labels)
        first = float(m["loss"]) if first is None else first
    assert float(m["loss"]) < 0.2 * first, (first, float(m["loss"]))
    logits = nnx.merge(graphdef, ts.params)(images).logits
    assert float((logits.argmax(-1) == labels).mean()) >= 0.95


def test_the_classifier_keeps_the_moving_average_it_is_evaluated_with(mnist_dir):
    images, labels = cluttered.load("train", variant="60x60", data_dir=mnist_dir).batch(np.arange(8))
    graphdef, state = nnx.split(_model(size=60, glimpses=2, hidden=16))
    optimizer = train_step.make_optimizer(
        OptimConfig(learning_rate=1e-2, lr_schedule="constant", warmup_steps=0)
    )
    ts = train_step.create_train_state(nnx.to_pure_dict(state), optimizer, ema=True)
    step = make_classifier_step(graphdef, optimizer, ema_decay=0.9)
    # The oracle: the bias-corrected average of the parameters after each update.
    m, w = jax.tree.map(jnp.zeros_like, ts.params), 0.0
    for _ in range(4):
        ts, _ = step(ts, images, labels)
        m, w = jax.tree.map(lambda a, p: 0.9 * a + 0.1 * p, m, ts.params), 0.9 * w + 0.1
    for got, want in zip(jax.tree.leaves(ts.ema), jax.tree.leaves(m), strict=True):
        np.testing.assert_allclose(got, want / w, rtol=1e-5, atol=1e-6)
    assert train_step.eval_params(ts) is ts.ema
    # A config written before the average existed resumes without one.
    d = ClassifierRunConfig().to_dict()
    assert d["optim"]["ema_decay"] > 0
    del d["redraw_clutter"]
    assert ClassifierRunConfig.from_dict(d).optim.ema_decay == 0.0


def test_run_config_refuses_bad_settings():
    with pytest.raises(ConfigError, match="--variant=60x60"):
        ClassifierRunConfig(variant="60x60")  # the default model is for 100x100
    with pytest.raises(ConfigError, match="--glimpses"):
        ClassifierConfig(glimpses=0)
    with pytest.raises(ValueError, match="expects images"):
        _model()(jnp.zeros((2, 60, 60, 1)))


def test_entry_point_runs_and_resumes_identically(mnist_dir, tmp_path):
    common = [
        f"--data_dir={mnist_dir}", "--variant=60x60", "--glimpses=2", "--hidden=16", "--glimpse_n=6",
        "--batch_size=16", "--log_every=2", "--eval_every=4", "--eval_examples=32", "--checkpoint_every=2",
    ]  # fmt: skip
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    run_cli("experiments.classify_cluttered", *common, f"--workdir={whole}", "--num_steps=8")
    run_cli("experiments.classify_cluttered", *common, f"--workdir={parts}", "--num_steps=4")
    out = run_cli("experiments.classify_cluttered", *common, f"--workdir={parts}", "--num_steps=8").stdout
    assert "valid error" in out
    a, b = (json.load(open(f"{w}/results.json")) for w in (whole, parts))
    assert a["step"] == b["step"] == 8
    assert a["train"]["loss"] == b["train"]["loss"] and a["valid"] == b["valid"]
    for split in ("train", "valid"):
        assert os.listdir(f"{whole}/tb/{split}")
    # A different run in the same workdir is refused with a message, not a traceback.
    bad = run_cli("experiments.classify_cluttered", *common, f"--workdir={whole}", "--hidden=8", ok=False)
    assert bad.returncode == 2 and "different classifier run" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_cli("experiments.classify_cluttered", "--data_dir=/nonexistent", ok=False)
    assert missing.returncode == 2 and "--data_dir=/nonexistent" in missing.stderr


def test_a_released_classifier_is_evaluated_without_training(mnist_dir, tmp_path):
    run = str(tmp_path / "run")
    run_cli("experiments.classify_cluttered", f"--data_dir={mnist_dir}", "--variant=60x60", "--glimpses=2",
            "--hidden=16", "--glimpse_n=6", "--batch_size=16", "--num_steps=6", "--eval_examples=32",
            f"--workdir={run}")  # fmt: skip
    out = run_cli("tools.export_pretrained", f"--workdir={run}", "--name=tiny_classifier",
                  f"--data_dir={mnist_dir}", f"--output_dir={tmp_path}", "--test_seeds=0,1",
                  "--note=recipe=a test").stdout  # fmt: skip
    card = pretrained.load_classifier_card(str(tmp_path / "tiny_classifier.json"))
    assert "released tiny_classifier" in out and card.step == 6 and set(card.test_error) == {"0", "1"}
    assert (
        card.config.data_dir is None and card.config.variant == "60x60" and card.notes["recipe"] == "a test"
    )
    # The error printed is the card's, seed by seed, and differs between clutter draws only by the draw.
    evald = tmp_path / "eval"
    before = sorted(os.listdir(tmp_path))
    for seed in (0, 1):
        got = run_cli("experiments.classify_cluttered", f"--pretrained={tmp_path / 'tiny_classifier.json'}",
                      f"--data_dir={mnist_dir}", f"--data_seed={seed}", "--test", f"--workdir={evald}").stdout  # fmt: skip
        assert f"test error {card.test_error[str(seed)]:.2f}% on 10000 images" in got, got
    assert sorted(os.listdir(evald)) == ["tiny_classifier_test_seed0.json", "tiny_classifier_test_seed1.json"]
    assert sorted(os.listdir(tmp_path)) == sorted([*before, "eval"])  # it wrote nowhere else
    # Training flags are refused by name; a DRAW release is refused by the classifier loader and back.
    bad = run_cli("experiments.classify_cluttered", f"--pretrained={tmp_path / 'tiny_classifier.json'}",
                  "--num_steps=5", "--glimpses=3", f"--workdir={evald}", ok=False)  # fmt: skip
    assert (
        bad.returncode == 2
        and "--glimpses, --num_steps would" in bad.stderr
        and "Traceback" not in bad.stderr
    )
    with pytest.raises(pretrained.PretrainedError, match="is a classifier release"):
        pretrained.load(str(tmp_path / "tiny_classifier.json"))
    with pytest.raises(pretrained.PretrainedError, match="is a draw release"):
        pretrained.load_classifier("binarized_mnist_attention")
    # A new run from the release: its model by default, a clashing model flag refused by name; at a
    # vanishing rate it keeps the release's parameters, and its export counts the release's steps.
    release = f"--init_from={tmp_path / 'tiny_classifier.json'}"
    common = [f"--data_dir={mnist_dir}", "--batch_size=16", "--num_steps=2", "--eval_examples=32"]
    clash = run_cli("experiments.classify_cluttered", release, *common, "--glimpses=3", "--variant=60x60",
                    f"--workdir={tmp_path / 'clash'}", ok=False)  # fmt: skip
    assert (
        clash.returncode == 2 and "--glimpses=3 (it has 2)" in clash.stderr and "variant" not in clash.stderr
    )
    assert not (tmp_path / "clash").exists()
    warm = tmp_path / "warm"
    run_cli("experiments.classify_cluttered", release, *common, "--learning_rate=1e-12", f"--workdir={warm}")
    config = ClassifierRunConfig.from_dict(json.load(open(warm / "config.json")))
    assert config.model == card.config.model and config.init_from.endswith("tiny_classifier.json")
    _, released, _ = pretrained.load_classifier(str(tmp_path / "tiny_classifier.json"))
    _, after, step = load_classifier(config, str(warm))
    assert step == 2
    for a, b in zip(jax.tree.leaves(released), jax.tree.leaves(after), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-9)
    run_cli("tools.export_pretrained", f"--workdir={warm}", "--name=warm_classifier", f"--data_dir={mnist_dir}",
            f"--output_dir={tmp_path}", "--test_seeds=0", "--previous_steps=6")  # fmt: skip
    assert pretrained.load_classifier_card(str(tmp_path / "warm_classifier.json")).step == 8
    # Corrupted parameters are refused, naming the file.
    npz = tmp_path / "tiny_classifier.npz"
    raw = bytearray(npz.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    npz.write_bytes(bytes(raw))
    with pytest.raises(pretrained.PretrainedError, match="corrupted or truncated"):
        pretrained.load_classifier(str(npz))
    # A run started from it resumes from its own checkpoint, without reading the release again.
    run_cli("experiments.classify_cluttered", release, *common, "--num_steps=3", "--learning_rate=1e-12",
            f"--workdir={warm}")  # fmt: skip
    assert json.load(open(warm / "results.json"))["step"] == 3


@pytest.mark.parametrize("name", ["cluttered_mnist_8_glimpses", "cluttered_mnist_4_glimpses"])
def test_shipped_classifier_scores_its_recorded_valid_error(name, mnist_dir):
    if name not in pretrained.available():
        pytest.skip(f"{name} is not released in this checkout")
    graphdef, params, card = pretrained.load_classifier(name)
    valid = cluttered.load(
        "valid", variant=card.config.variant, seed=card.config.data_seed, data_dir=mnist_dir
    )
    got = evaluate_error(graphdef, params, valid)["error_percent"]
    assert abs(got - card.valid_error) <= 0.05, (got, card.valid_error)  # 5 of 10,000 images
