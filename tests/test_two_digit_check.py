"""The two-digit check (tools/two_digit_check.py): its labels, its one-digit images, and that it learns."""

from __future__ import annotations

import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from draw_jax import DRAW, DrawConfig, data, two_digits
from tools import two_digit_check as check


@pytest.fixture
def mnist_dir(shared_data):
    return os.path.join(shared_data, "mnist")


def test_counts_count_each_class_also_twice():
    got = check.counts(np.array([3, 7, 0]), np.array([3, 1, 9]))
    assert got.tolist()[0] == [0, 0, 0, 2, 0, 0, 0, 0, 0, 0]
    assert got[1, 7] == got[1, 1] == 1 and got[2, 0] == got[2, 9] == 1
    assert (got.sum(-1) == 2).all()


def test_one_digit_images_hold_the_whole_digit_where_two_digits_would_place_it():
    digits = np.random.default_rng(0).integers(0, 256, (50, 28, 28, 1)).astype(np.uint8)
    images, positions = check.one_digit(digits, seed=3)
    assert images.shape == (50, two_digits.CANVAS, two_digits.CANVAS, 1)
    assert positions.min() >= 0 and positions.max() <= two_digits.CANVAS - 28
    for image, digit, (y, x) in zip(images, digits, positions, strict=True):
        np.testing.assert_array_equal(image[y : y + 28, x : x + 28], digit)
        assert image.astype(int).sum() == digit.astype(int).sum()  # nothing else on the canvas


def test_layout_counts_pieces_and_measures_how_far_apart_the_ink_lies():
    canvas = np.zeros((4, 60, 60, 1), np.float32)
    canvas[0, 10:20, 10:20] = 1  # one square
    canvas[1, 10:20, 10:20] = canvas[1, 40:50, 40:50] = 1  # two squares far apart
    canvas[2, 10:20, 10:20] = canvas[2, 18:28, 18:28] = 1  # two overlapping: one piece
    canvas[3] = canvas[1]
    canvas[3, 30:33, 5:8] = 1  # and a stray stroke of 9 pixels
    canvas[3, 55, 55] = 1  # a speck below the piece size is not a piece
    each = [check.layout(canvas[i : i + 1]) for i in range(4)]
    assert [(e["pieces_1"], e["pieces_2"], e["pieces_3+"]) for e in each] == [
        (1, 0, 0),
        (0, 1, 0),
        (1, 0, 0),
        (0, 0, 1),
    ]
    # One 10 x 10 square: RMS distance sqrt(2 * (10**2 - 1) / 12); two, 30 px apart per axis, add 15 * sqrt(2).
    np.testing.assert_allclose(each[0]["spread"], np.sqrt(2 * 99 / 12), rtol=1e-6)
    np.testing.assert_allclose(each[1]["spread"], np.sqrt(2 * 99 / 12 + 2 * 15**2), rtol=1e-6)
    whole = check.layout(canvas)
    assert whole["pieces_1"] == 0.5 and whole["pieces_2"] == 0.25 and whole["pieces_3+"] == 0.25


def test_fresh_batches_count_the_digits_they_paste_and_never_repeat():
    # Digit i is a solid square of odd grey level 2i + 1; overlaps add to even levels (below 255,
    # so unclipped), so the odd levels on a canvas name its digits.
    m = 64
    digits = np.broadcast_to((2 * np.arange(m, dtype=np.uint8) + 1)[:, None, None, None], (m, 28, 28, 1))
    labels = np.random.default_rng(1).integers(0, 10, m)
    rng = np.random.default_rng(2)
    x, target = check.fresh_batch(digits, labels, rng, 30, 20)
    assert x.shape == (50, two_digits.CANVAS, two_digits.CANVAS, 1) and x.dtype == np.float32
    assert target[:30].sum(-1).tolist() == [2] * 30 and target[30:].sum(-1).tolist() == [1] * 20

    def present(image):
        levels = np.unique(image)
        return (levels[levels % 2 == 1] - 1) // 2

    for image, want in zip(np.rint(x * 255).astype(int), target, strict=True):
        assert (image > 0).sum() >= 28 * 28
        found = present(image)
        if len(found) == want.sum():  # one square may hide the other only when they coincide
            np.testing.assert_array_equal(check.counts(*labels[found][:, None])[0], want)
    assert np.mean([len(present(im)) == 2 for im in np.rint(x[:30] * 255).astype(int)]) > 0.9
    again, _ = check.fresh_batch(digits, labels, rng, 30, 20)
    assert not np.array_equal(again, x)


def test_the_counter_learns_the_counts_of_real_two_digit_images(mnist_dir):
    source = data.load_split("mnist", "valid", mnist_dir)
    two = two_digits.make(source.images[:64], "valid")
    x = two.images.astype(np.float32) / 255
    target = check.counts(source.labels[:64], source.labels[:64][two.partners])
    model = check.Counter(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(check.loss_fn)(model, x, target)
        optimizer.update(model, grads)
        return loss

    first = float(step(model, optimizer))
    for _ in range(150):
        loss = float(step(model, optimizer))
    assert loss < 0.1 * first, (first, loss)
    found, _ = check.predict(model, x)
    assert (found == target).all(-1).mean() >= 0.9
    assert check.share_of_two(model, x, 0.5) >= 0.9


def _tiny_source(m: int = 40) -> tuple[data.Dataset, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (m, 28, 28, 1)).astype(np.uint8)
    labels = rng.integers(0, 10, m)
    valid = (rng.integers(0, 256, (6, two_digits.CANVAS, two_digits.CANVAS, 1)).astype(np.uint8),
             check.counts(labels[:6], labels[6:12]))  # fmt: skip
    return data.Dataset(images=images, binary=False, name="mnist", split="train", labels=labels), valid


def test_an_interrupted_counter_training_resumes_to_the_same_counter(tmp_path, monkeypatch):
    source, valid = _tiny_source()
    whole = check.train_counter(source, valid, num_steps=5, seed=0, run_dir=str(tmp_path / "whole"),
                                checkpoint_every=2)  # fmt: skip

    real_batch, calls = check.fresh_batch, []

    def interrupted_at_step_3(*args):
        calls.append(1)
        if len(calls) == 4:  # step index 3: after the step-2 checkpoint, before the step-4 one
            raise KeyboardInterrupt
        return real_batch(*args)

    monkeypatch.setattr(check, "fresh_batch", interrupted_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        check.train_counter(source, valid, 5, 0, str(tmp_path / "cut"), checkpoint_every=2)
    monkeypatch.setattr(check, "fresh_batch", real_batch)
    resumed = check.train_counter(source, valid, 5, 0, str(tmp_path / "cut"), checkpoint_every=2)

    for a, b in zip(jax.tree.leaves(nnx.state(whole)), jax.tree.leaves(nnx.state(resumed)), strict=True):
        np.testing.assert_array_equal(a, b)
    fresh = check.Counter(nnx.Rngs(0))
    assert not np.array_equal(
        nnx.state(fresh)["out"]["kernel"][...], nnx.state(resumed)["out"]["kernel"][...]
    )


def test_a_counter_training_is_not_resumed_with_other_settings(tmp_path):
    source, valid = _tiny_source()
    check.train_counter(source, valid, 3, 0, str(tmp_path), checkpoint_every=2)
    with pytest.raises(Exception, match=r"num_steps=4.*another --workdir"):
        check.train_counter(source, valid, 4, 0, str(tmp_path), checkpoint_every=2)


def test_the_released_model_redraws_each_real_pair_nearer_to_it_than_to_any_other(mnist_dir):
    # The posterior's path that the counter's reconstructions figure reads: each real test pair
    # binarised, encoded and drawn again (in batches of 100, the last one short) comes back
    # as that pair, in its place in the batch.
    source = data.load_split("mnist", "test", mnist_dir)
    pairs = two_digits.make(source.images, "test").images[:150]
    redrawn = check.reconstructions(check.load_draw("mnist_two_digits_attention")[0], pairs, seed=0)
    assert redrawn.shape == (150, two_digits.CANVAS, two_digits.CANVAS, 1)
    assert redrawn.min() >= 0 and redrawn.max() <= 1
    real = pairs.reshape(150, -1).astype(np.float32) / 255
    distance = ((redrawn.reshape(150, -1)[:, None] - real[None]) ** 2).sum(-1)  # [redrawn, real]
    assert (distance.argmin(1) == np.arange(150)).mean() >= 0.95
    # by a wide margin: under half the typical distance to another pair
    assert np.median(np.diag(distance)) < 0.5 * np.median(distance)


def test_each_model_step_and_temperature_keeps_its_own_report(tmp_path):
    # A run's checkpoints, and a candidate named as its release, must not overwrite each other.
    workdir = str(tmp_path)
    paths = {
        check.report_path(workdir, None, None, 1.0),
        check.report_path(workdir, "mnist_two_digits_attention", 44000, 1.0),
        check.report_path(workdir, "/elsewhere/mnist_two_digits_attention", 54000, 1.0),
        check.report_path(workdir, "mnist_two_digits_attention", 44000, 0.7),
        check.report_path(workdir, "runs/two_digits/", 2500, 1.0),
        check.report_path(workdir, "runs/two_digits", 5000, 1.0),
    }
    assert len(paths) == 6
    assert all(os.path.dirname(p) == workdir and p.endswith(".json") for p in paths)
    assert "step54000" in check.report_path(workdir, "a/mnist_two_digits_attention", 54000, 1.0)


def test_posterior_prefix_runs_from_the_prior_to_the_reconstruction():
    # All T steps from the posterior redraw the reconstructions; none, prior samples that do
    # not depend on the pairs; in between, the pictures depend on the pairs.
    cfg = DrawConfig(height=60, width=60, T=4, enc_size=8, dec_size=8, z_size=2, read_n=2, write_n=3)
    model = DRAW(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, 256, (130, 60, 60, 1)).astype(np.uint8)
    others = rng.integers(0, 256, (130, 60, 60, 1)).astype(np.uint8)
    np.testing.assert_allclose(
        check.posterior_prefix(model, pairs, cfg.T, seed=1),
        check.reconstructions(model, pairs, seed=1),
        atol=1e-5,
    )
    np.testing.assert_array_equal(
        check.posterior_prefix(model, pairs, 0, seed=1), check.posterior_prefix(model, others, 0, seed=1)
    )
    assert not np.allclose(
        check.posterior_prefix(model, pairs, 2, seed=1), check.posterior_prefix(model, others, 2, seed=1)
    )
