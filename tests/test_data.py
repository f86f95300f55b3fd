"""Data: the real local files, the TFDS path under mock_data, and every bad-input message."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

from draw_jax import data, evaluation, feeding


def _bin_dir(shared_data: str) -> str:
    return os.path.join(shared_data, "binarized_mnist")


def test_real_binarized_mnist_valid_split(shared_data):
    ds = data.load_split("binarized_mnist", "valid", _bin_dir(shared_data))
    assert ds.images.shape == (10000, 28, 28, 1) and ds.images.dtype == np.uint8
    assert ds.binary and set(np.unique(ds.images)) == {0, 1}
    # Fixed binarisation of digits: about 13% of pixels on, borders off.
    assert 0.10 < ds.images.mean() < 0.16
    assert ds.images[:, 0, :, :].mean() < 0.01
    # 'validation' (the TFDS name) is the same split.
    same = data.load_split("binarized_mnist", "validation", _bin_dir(shared_data))
    np.testing.assert_array_equal(same.images[:5], ds.images[:5])


def test_real_mnist_idx_files(shared_data):
    test = data.load_split("mnist", "test", os.path.join(shared_data, "mnist"))
    assert test.images.shape == (10000, 28, 28, 1) and not test.binary
    assert test.images.max() == 255


def test_missing_test_split_names_the_file(shared_data):
    # shared/data holds no test split: a clear message naming what was looked for.
    with pytest.raises(data.DataError, match=r"binarized_mnist_test\.amat"):
        data.load_split("binarized_mnist", "test", _bin_dir(shared_data))


def test_unknown_dataset_and_split():
    with pytest.raises(data.DataError, match="unknown dataset 'cifar'"):
        data.load_split("cifar", "train", "/tmp")
    with pytest.raises(data.DataError, match=r"has no split 'dev'.*train, valid, test"):
        data.load_split("mnist", "dev", "/tmp")


def _write_amat(path, rows, gz=True):
    text = "\n".join(" ".join(r) for r in rows) + "\n"
    opener = gzip.open if gz else open
    with opener(path, "wt") as f:
        f.write(text)


def _rows(n, value="0"):
    return [[value] * 784 for _ in range(n)]


def test_amat_plain_and_gz_agree(tmp_path):
    rows = _rows(3)
    rows[1][5] = "1"
    _write_amat(tmp_path / "binarized_mnist_train.amat", rows, gz=False)
    ds = data.load_split("binarized_mnist", "train", str(tmp_path))
    assert ds.images.shape == (3, 28, 28, 1) and ds.images[1, 0, 5, 0] == 1 and ds.images.sum() == 1


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda r: r[1].__setitem__(10, "0.5"), r"line 2: value 0\.5 is not 0 or 1"),
        (lambda r: r[2].__setitem__(0, "nan"), r"line 3: contains NaN"),
        (lambda r: r[0].pop(), r"line 1: 783 values, expected 784"),
        (lambda r: r[1].__setitem__(3, "x"), r"line 2: not a number"),
        (lambda r: r[2].__setitem__(0, "2"), r"line 3: value 2\.0 is not 0 or 1"),
    ],
)
def test_bad_amat_values_are_named(tmp_path, mutate, message):
    rows = _rows(3)
    mutate(rows)
    _write_amat(tmp_path / "binarized_mnist_valid.amat.gz", rows)
    with pytest.raises(data.DataError, match=message):
        data.load_split("binarized_mnist", "valid", str(tmp_path))


def test_truncated_gzip_is_named(tmp_path):
    good = tmp_path / "good.gz"
    _write_amat(good, _rows(50))
    raw = good.read_bytes()
    (tmp_path / "binarized_mnist_train.amat.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.DataError, match=r"binarized_mnist_train\.amat\.gz.*truncated or corrupt"):
        data.load_split("binarized_mnist", "train", str(tmp_path))


def test_corrupt_gzip_is_named(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte\.gz.*truncated or corrupt"):
        data.load_split("mnist", "train", str(tmp_path))


def _write_idx(path, magic, n, rows, cols, payload_len=None):
    payload = bytes(payload_len if payload_len is not None else n * rows * cols)
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">iiii", magic, n, rows, cols) + payload)


@pytest.mark.parametrize(
    "magic,rows,cols,payload,message",
    [
        (2049, 28, 28, None, "wrong IDX magic 2049"),
        (2051, 32, 32, None, "images are 32x32, expected 28x28"),
        (2051, 28, 28, 4 * 784 - 10, "header says 4 images .* holds"),
    ],
)
def test_bad_idx_files_are_named(tmp_path, magic, rows, cols, payload, message):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", magic, 4, rows, cols, payload)
    with pytest.raises(data.DataError, match=message):
        data.load_split("mnist", "test", str(tmp_path))


def test_missing_data_dir():
    with pytest.raises(data.DataError, match=r"missing data file.*--data_dir=/nonexistent/folder"):
        data.load_split("mnist", "train", "/nonexistent/folder")


def test_mnist_valid_is_held_out_of_train(shared_data):
    # MNIST has no validation split: valid is training images 50,000-59,999,
    # train the first 50,000 (the cut binarized MNIST makes), test stays t10k.
    folder = os.path.join(shared_data, "mnist")
    train = data.load_split("mnist", "train", folder)
    valid = data.load_split("mnist", "validation", folder)
    assert train.images.shape[0] == 50_000 and valid.images.shape[0] == 10_000
    raw = data._read_idx_images(os.path.join(folder, "train-images-idx3-ubyte.gz"))
    np.testing.assert_array_equal(valid.images, raw[50_000:])
    np.testing.assert_array_equal(train.images, raw[:50_000])


def test_a_short_mnist_train_file_is_named(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", 2051, 40, 28, 28)
    with pytest.raises(
        data.DataError, match=r"mnist/valid is images 50000 of the train file, which holds only 40"
    ):
        data.load_split("mnist", "valid", str(tmp_path))


def test_preprocess_binarisations():
    import jax

    grey = np.array([[[[0], [100], [200], [255]]]], np.uint8)  # [1, 1, 4, 1]
    np.testing.assert_allclose(
        data.preprocess(grey, False, "none", None).ravel(), [0, 100 / 255, 200 / 255, 1]
    )
    np.testing.assert_array_equal(data.preprocess(grey, False, "threshold", None).ravel(), [0, 0, 1, 1])
    # Dynamic: a Bernoulli sample with p = grey level, fresh for each key.
    many = np.full((2000, 1, 1, 1), 77, np.uint8)
    sample = np.asarray(data.preprocess(many, False, "dynamic", jax.random.key(0)))
    assert set(np.unique(sample)) <= {0.0, 1.0}
    assert abs(sample.mean() - 77 / 255) < 0.03
    other = np.asarray(data.preprocess(many, False, "dynamic", jax.random.key(1)))
    assert not np.array_equal(sample, other)


def test_train_batches_shuffle_per_epoch_drop_last_and_resume():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    it = feeding.train_batches(images, batch_size=3, seed=7)
    batches = [next(it).ravel() for _ in range(6)]  # 3 per epoch (10 // 3), 1 image dropped
    epoch0 = np.concatenate(batches[:3])
    assert len(set(epoch0)) == 9  # no repeats within an epoch
    assert not np.array_equal(np.concatenate(batches[:3]), np.concatenate(batches[3:]))
    resumed = feeding.train_batches(images, batch_size=3, seed=7, start_step=4)
    np.testing.assert_array_equal(next(resumed).ravel(), batches[4])
    other_seed = feeding.train_batches(images, batch_size=3, seed=8)
    assert not np.array_equal(next(other_seed).ravel(), batches[0])


def test_eval_batches_pad_and_mask_every_image_once():
    images = np.arange(7, dtype=np.uint8).reshape(7, 1, 1, 1)
    seen = []
    for batch, mask in evaluation.eval_batches(images, 3):
        assert batch.shape[0] == 3
        seen.extend(batch.ravel()[mask].tolist())
    assert seen == list(range(7))


def _mock_source(images):
    def as_data_source(*args, **kwargs):
        return [{"image": im, "label": 0} for im in images]

    return as_data_source


def test_tfds_path_under_mock_data():
    # The TFDS source, offline: tfds.testing.mock_data fakes the prepared data.
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(0)
    binary = rng.integers(0, 2, (12, 28, 28, 1), dtype=np.uint8)
    with tfds.testing.mock_data(as_data_source_fn=_mock_source(binary)):
        ds = data.load_split("binarized_mnist", "valid")
    assert ds.binary
    np.testing.assert_array_equal(ds.images, binary)
    with tfds.testing.mock_data(num_examples=9, policy=tfds.testing.MockPolicy.USE_CODE):
        grey = data.load_split("mnist", "train")
    assert grey.images.shape == (9, 28, 28, 1) and not grey.binary


def test_tfds_binarized_values_outside_01_are_rejected():
    tfds = pytest.importorskip("tensorflow_datasets")
    bad = np.full((3, 28, 28, 1), 7, np.uint8)
    with tfds.testing.mock_data(as_data_source_fn=_mock_source(bad)):
        with pytest.raises(data.DataError, match="values above 1 in a binarized set"):
            data.load_split("binarized_mnist", "train")


def test_two_digit_mnist_holds_both_digits_and_is_deterministic(shared_data):
    from draw_jax import two_digits

    mnist_dir = os.path.join(shared_data, "mnist")
    source = data.load_split("mnist", "valid", mnist_dir).images
    a = two_digits.make(source, "valid")
    ds = data.load_split("mnist_two_digits", "valid", mnist_dir)
    np.testing.assert_array_equal(ds.images, a.images)  # the loader is the builder, deterministically
    assert ds.images.shape == (10_000, 60, 60, 1) and not ds.binary
    assert not np.array_equal(two_digits.make(source, "valid", seed=1).images, a.images)
    assert not np.array_equal(two_digits.make(source, "test").images, a.images)  # streams per split
    overlapping = 0
    for i in range(200):
        assert a.partners[i] != i
        assert np.all((0 <= a.positions[i]) & (a.positions[i] <= 32))
        # The paper's rule, built another way: each digit alone on a black 60 x 60 background,
        # intensities added and clipped to be no greater than one (255).
        layers = []
        for digit, (y, x) in zip((source[i], source[a.partners[i]]), a.positions[i], strict=True):
            layers.append(np.pad(digit[..., 0].astype(int), ((y, 32 - y), (x, 32 - x))))
        np.testing.assert_array_equal(a.images[i, ..., 0], np.minimum(layers[0] + layers[1], 255))
        overlapping += bool(np.any((layers[0] > 0) & (layers[1] > 0) & (layers[0] + layers[1] > 255)))
    assert overlapping > 0  # the clip was exercised, not only the sum
