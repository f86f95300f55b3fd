"""Real colour photographs, cut into 32x32 patches, written as CIFAR-10 python batches.

``python -m tools.make_photo_patches --output_dir=DIR`` (needs the
``[photos]`` extra: scikit-image, whose wheel ships a few colour photographs)
writes ``DIR/cifar-10-batches-py/{data_batch_1..5, test_batch}`` in CIFAR-10's
own format, so that the colour path can be trained and evaluated offline on
real pixels through the ordinary commands:

    python -m experiments.train --preset=paper_cifar10 --data_dir=DIR --workdir=W

The three splits come from different photographs, so valid and test share no
pixels with train: train (data_batch_1..5's first 45,000 patches) from
``astronaut``, ``coffee``, ``hubble_deep_field`` and the left view of
``stereo_motorcycle``; valid (the last 5,000, which draw_jax's cifar10 split
holds out) from ``rocket``; test (10,000) from ``chelsea``. Each photograph is
first shrunk (area averaging) so that its short side is 128 pixels, so that a
patch holds a recognisable part of the scene rather than a texture; patch
corners are uniform over the photograph, from ``--seed``. Labels are the index of
the source photograph. Existing files are never overwritten.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
from absl import app, flags
from PIL import Image

from experiments import cli

flags.DEFINE_string("output_dir", None, "Folder to write cifar-10-batches-py/ into.", required=True)
flags.DEFINE_integer("seed", 0, "Seeds the patch positions.")
flags.DEFINE_integer("short_side", 128, "Each photograph is shrunk to this short side first.")

FLAGS = flags.FLAGS

PATCH = 32
TRAIN, VALID, TEST = 45_000, 5_000, 10_000  # CIFAR-10's sizes; valid ends data_batch_5
PHOTOS = {
    "train": ("astronaut", "coffee", "hubble_deep_field", "stereo_motorcycle"),
    "valid": ("rocket",),
    "test": ("chelsea",),
}


def _photo(name: str, short_side: int) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        image = image[0]  # (left, right, disparity): the left view
    h, w = image.shape[:2]
    scale = short_side / min(h, w)
    size = (max(PATCH, round(w * scale)), max(PATCH, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX), np.uint8)


def patches(names: tuple[str, ...], count: int, rng: np.random.Generator, short_side: int) -> tuple:
    """``count`` patches [count, 32, 32, 3], spread evenly over the photographs, and their labels."""
    photos = [_photo(n, short_side) for n in names]
    which = np.arange(count) % len(photos)
    out = np.empty((count, PATCH, PATCH, 3), np.uint8)
    for i, p in enumerate(which):
        photo = photos[p]
        y = rng.integers(0, photo.shape[0] - PATCH + 1)
        x = rng.integers(0, photo.shape[1] - PATCH + 1)
        out[i] = photo[y : y + PATCH, x : x + PATCH]
    order = rng.permutation(count)
    return out[order], which[order]


def _write(path: str, images: np.ndarray, labels: np.ndarray, label: str) -> None:
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), PATCH * PATCH * 3)
    batch = {b"batch_label": label.encode(), b"labels": [int(v) for v in labels], b"data": planes}
    with open(path, "xb") as f:  # never overwrite
        pickle.dump(batch, f, protocol=4)


@cli.user_errors_as_messages
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.ConfigError(f"unexpected arguments {argv[1:]}")
    try:
        import skimage.data  # noqa: F401
    except ImportError as e:
        raise cli.ConfigError(f"this needs scikit-image: pip install 'draw_jax[photos]' ({e})") from e
    folder = os.path.join(FLAGS.output_dir, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    existing = [n for n in names if os.path.exists(os.path.join(folder, n))]
    if existing:
        raise cli.ConfigError(f"{folder} already holds {', '.join(existing)}; choose another --output_dir")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(FLAGS.seed)
    train, train_labels = patches(PHOTOS["train"], TRAIN, rng, FLAGS.short_side)
    valid, valid_labels = patches(PHOTOS["valid"], VALID, rng, FLAGS.short_side)
    test, test_labels = patches(PHOTOS["test"], TEST, rng, FLAGS.short_side)
    everything = np.concatenate([train, valid])
    labels = np.concatenate([train_labels, valid_labels + len(PHOTOS["train"])])
    for i in range(5):
        part = slice(i * 10_000, (i + 1) * 10_000)
        _write(os.path.join(folder, f"data_batch_{i + 1}"), everything[part], labels[part], f"photos {i + 1}")
    _write(os.path.join(folder, "test_batch"), test, test_labels + len(PHOTOS["train"]) + 1, "photos test")
    with open(os.path.join(folder, "README.txt"), "w") as f:
        f.write(
            "32x32 patches of scikit-image's bundled photographs in CIFAR-10's python format, "
            f"made by tools.make_photo_patches (seed {FLAGS.seed}, short side {FLAGS.short_side}).\n"
            + "".join(f"{split}: {', '.join(p)}\n" for split, p in PHOTOS.items())
        )
    print(f"wrote {len(names)} batches to {folder}")


if __name__ == "__main__":
    app.run(main)
