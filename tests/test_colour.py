"""Colour (sec. 4.4-4.5): the discretised-logistic likelihood, CIFAR-10 and SVHN files,
and train / evaluate / sample on colour images through the TFDS path under mock_data."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from draw_jax import data, losses
from draw_jax.settings import build_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVELS = jnp.arange(256, dtype=jnp.float32) / 255.0  # every 8-bit value, as the model sees it


# -- the likelihood -----------------------------------------------------------


@pytest.mark.parametrize(
    "logit,log_scale", [(0.3, -2.0), (-4.0, -6.0), (5.0, 1.0), (0.0, -4.5), (-30.0, -3.0)]
)
def test_discretized_logistic_is_a_distribution_over_the_256_values(logit, log_scale):
    # Each of the 256 values gets its bin's mass, the end bins the tails: they sum to 1.
    x = LEVELS.reshape(256, 1, 1, 1)
    nll = losses.discretized_logistic_nll(jnp.full_like(x, logit), jnp.array([log_scale]), x)
    assert np.all(np.isfinite(nll)) and np.all(nll >= 0)
    np.testing.assert_allclose(float(jnp.sum(jnp.exp(-nll))), 1.0, atol=2e-3)


def test_discretized_logistic_matches_the_cdf_difference_in_float64():
    rng = np.random.default_rng(0)
    k = rng.integers(0, 256, (4, 5, 5, 3))
    logits = rng.normal(0, 2, k.shape)
    log_scale = np.array([-1.5, -3.0, -2.2])
    got = losses.discretized_logistic_nll(jnp.asarray(logits), jnp.asarray(log_scale), jnp.asarray(k / 255.0))

    def cdf(v):
        return 1.0 / (1.0 + np.exp(-(v - 1.0 / (1.0 + np.exp(-logits))) / np.exp(log_scale)))

    upper = np.where(k == 255, 1.0, cdf(k / 255.0 + 0.5 / 255))
    lower = np.where(k == 0, 0.0, cdf(k / 255.0 - 0.5 / 255))
    want = -np.log(upper - lower).reshape(4, -1).sum(-1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)


def test_discretized_logistic_gradients_are_finite_far_from_the_mean():
    # A mean at the far end from the pixel, and a tiny scale: no NaN, no inf.
    x = jnp.array([0.0, 100 / 255, 1.0]).reshape(3, 1, 1, 1)
    logits = jnp.array([40.0, -40.0, -40.0]).reshape(3, 1, 1, 1)

    def loss(logits, log_scale):
        return jnp.sum(losses.discretized_logistic_nll(logits, log_scale, x))

    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(logits, jnp.array([-8.0]))
    assert np.isfinite(float(value)) and all(np.all(np.isfinite(g)) for g in grads)


def test_a_colour_model_learns_its_pixel_scale_and_reports_bits_per_dim():
    from draw_jax import train_step

    cfg = build_config("paper_cifar10", T=3, enc_size=16, dec_size=16, z_size=4)
    graphdef, params = train_step.init_model(cfg.model, seed=0)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)) / 255.0, jnp.float32)

    def bound(params):
        out = train_step.apply_model(graphdef, params)(x, jax.random.key(0))
        return losses.draw_bound(out, x).loss

    value, grads = jax.value_and_grad(bound)(params)
    assert grads["log_scale"].shape == (3,) and np.all(np.abs(np.asarray(grads["log_scale"])) > 0)
    # Uniform noise cannot be coded below 8 bits per dimension (plus the KL).
    assert losses.bits_per_dim(float(value), (32, 32, 3)) > 8.0
    assert math.isclose(losses.bits_per_dim(3072 * 8 * math.log(2), (32, 32, 3)), 8.0)


# -- CIFAR-10 python batches ----------------------------------------------------


def _cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _write_cifar_batch(path, images: np.ndarray, labels, protocol: int = 2) -> None:
    # The official layout: the red, green and blue 32x32 planes of each image, row-major.
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": list(labels), b"data": planes}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_batches_load_pixel_exact_from_the_official_layout(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"  # as the tarball extracts
    folder.mkdir()
    images = _cifar_images(7, seed=1)
    _write_cifar_batch(folder / "test_batch", images, [3, 1, 4, 1, 5, 9, 2], protocol)
    ds = data.load_split("cifar10", "test", str(tmp_path))
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, [3, 1, 4, 1, 5, 9, 2])
    assert not ds.binary


def test_cifar_file_errors_name_the_file(tmp_path):
    for i in (1, 2, 4, 5):
        _write_cifar_batch(tmp_path / f"data_batch_{i}", _cifar_images(3, i), [0, 1, 2])
    with pytest.raises(data.DataError, match="data_batch_3"):
        data.load_split("cifar10", "train", str(tmp_path))
    _write_cifar_batch(tmp_path / "data_batch_3", _cifar_images(3, 3), [0, 1, 2])
    with pytest.raises(data.DataError, match="holds only 15"):  # a real train set has 50,000
        data.load_split("cifar10", "valid", str(tmp_path))

    test = tmp_path / "test_batch"
    _write_cifar_batch(test, _cifar_images(4, 0), [0, 1, 2, 3])
    raw = test.read_bytes()
    test.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.DataError, match=re.escape(f"{test}: not a CIFAR-10 python batch")):
        data.load_split("cifar10", "test", str(tmp_path))
    test.write_bytes(pickle.dumps({b"data": os.getcwd}))  # a pickle that would call code
    with pytest.raises(data.DataError, match="refusing to load"):
        data.load_split("cifar10", "test", str(tmp_path))
    test.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(data.DataError, match=r"expected uint8 \[n, 3072\]"):
        data.load_split("cifar10", "test", str(tmp_path))
    _write_cifar_batch(test, _cifar_images(2, 0), [0, 11])
    with pytest.raises(data.DataError, match=r"labels outside 0\.\.9"):
        data.load_split("cifar10", "test", str(tmp_path))


# -- SVHN .mat ----------------------------------------------------------------


def test_svhn_mat_loads_pixel_exact_and_maps_label_10_to_0(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    images = _cifar_images(5, seed=2)
    y = np.array([[10], [1], [2], [10], [9]], np.uint8)
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": y})
    ds = data.load_split("svhn_cropped", "test", str(tmp_path))
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, [0, 1, 2, 0, 9])


def test_svhn_file_errors_name_the_file(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    path = tmp_path / "test_32x32.mat"
    with pytest.raises(data.DataError, match=r"missing data file .*test_32x32\.mat"):
        data.load_split("svhn_cropped", "test", str(tmp_path))
    scipy_io.savemat(path, {"X": np.zeros((28, 28, 1, 2), np.uint8), "y": np.ones((2, 1))})
    with pytest.raises(data.DataError, match=r"expected uint8 \[32, 32, 3, n\]"):
        data.load_split("svhn_cropped", "test", str(tmp_path))
    scipy_io.savemat(path, {"X": _cifar_images(40, 0).transpose(1, 2, 3, 0), "y": np.ones((40, 1))})
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(data.DataError, match=re.escape(str(path))):
        data.load_split("svhn_cropped", "test", str(tmp_path))


# -- the whole path under tfds.testing.mock_data -------------------------------

# Runs an entry point's absl main with TFDS faked (the faking cannot cross into a
# subprocess on its own): argv[1] module, argv[2] images per split, then its flags.
_UNDER_MOCK = """
import importlib, sys
import tensorflow_datasets as tfds
from absl import app
module = importlib.import_module(sys.argv[1])
with tfds.testing.mock_data(num_examples=int(sys.argv[2]), policy=tfds.testing.MockPolicy.USE_CODE):
    app.run(module.main, argv=[sys.argv[1], *sys.argv[3:]])
"""


def _under_mock(module: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", _UNDER_MOCK, module, "40", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_svhn_and_cifar_through_tfds_under_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    for name in ("cifar10", "svhn_cropped"):
        with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
            ds = data.load_split(name, "valid")
        assert ds.images.shape == (6, 32, 32, 3) and ds.images.dtype == np.uint8 and not ds.binary
        assert ds.labels is not None and ds.labels.min() >= 0 and ds.labels.max() <= 9


def test_train_evaluate_sample_on_cifar10_under_mock_data(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from PIL import Image

    workdir, pictures = str(tmp_path / "run"), str(tmp_path / "pictures")
    small = ["--T=3", "--enc_size=16", "--dec_size=16", "--z_size=4", "--read_n=2", "--write_n=3"]
    _under_mock(
        "experiments.train", "--preset=paper_cifar10", *small, f"--workdir={workdir}", "--batch_size=10",
        "--num_steps=6", "--log_every=3", "--eval_every=0", "--checkpoint_every=3",
    )  # fmt: skip
    config = json.load(open(f"{workdir}/config.json"))
    assert config["model"]["likelihood"] == "discretized_logistic" and config["model"]["channels"] == 3
    results = json.load(open(f"{workdir}/results.json"))
    assert np.isfinite(results["valid"]["bound"])

    out = str(tmp_path / "eval.json")
    _under_mock(
        "experiments.evaluate", f"--workdir={workdir}", "--split=test", "--num_importance_samples=2",
        f"--output={out}",
    )  # fmt: skip
    ev = json.load(open(out))
    assert ev["is_likelihood"] and ev["likelihood"] == "discretized_logistic" and ev["num_images"] == 40
    assert math.isclose(ev["bound_bits_per_dim"], ev["bound"] / (3072 * math.log(2)), rel_tol=1e-9)
    assert ev["iwae"] <= ev["bound"] + 1.0

    _under_mock("experiments.sample", f"--workdir={workdir}", f"--output_dir={pictures}", "--num_samples=4")
    samples = np.asarray(Image.open(f"{pictures}/samples.png").convert("RGB")).astype(int)
    assert np.any(samples[..., 0] != samples[..., 1])  # colour, not grey
    assert os.path.isfile(f"{pictures}/reconstruction.gif")
