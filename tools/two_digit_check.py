"""An objective check of two-digit MNIST pictures: does an image hold two legible digits?

A small convolutional counter, trained on real MNIST training digits pasted
as ``draw_jax.two_digits`` pastes them (fresh pairs and positions every
step, so it cannot learn the fixed split by heart), predicts for each digit class 0-9 how
many times it appears (0, 1 or 2). It learns from two-digit images and from
one-digit ones (one MNIST digit pasted the same way), so that "two" is a
decision, not the only answer it knows. An image **holds two confident
digits** when the predicted counts sum to two and the probability of that
prediction (the product over the ten classes) is at least ``--confidence``.

``python -m tools.two_digit_check --data_dir=../shared/data/mnist --workdir=runs/two_digit_check``
trains the counter (once, 50-95 minutes on one core; later calls reuse it; an interrupted
training resumes from its checkpoints, saved every 1,000 steps) and prints the share of real
test images with two confident digits, for two-digit and for one-digit
images. ``--model=NAME_OR_WORKDIR`` (a released DRAW or a training run of
``mnist_two_digits``) adds the share for ``--num_samples`` samples from it
(the canvas means sigmoid(c_T), grey like the real images; ``--temperature`` below 1
draws them nearer the prior's centre) and, at temperature 1, for its reconstructions of as
many real test pairs (at most the 10,000): the same renderer fed z_t from the posterior, so that the gap between
the two is the prior's and not the counter's reading of DRAW's strokes. ``--step`` picks a
workdir's checkpoint (default: its latest). ``--posterior_steps=k,...`` adds pictures of the
same pairs drawn with z_t from the posterior for the first k steps and from the prior after
(``posterior_prefix``): where between the two the share is lost. Each call writes ``<workdir>/report.json``, or with
``--model`` ``report_<model>_step<N>[_temperature_<t>].json`` (``report_path``), N the model's
training steps, so that a run's checkpoints and a candidate beside its release each keep
their own report.

Beside the counter, the layout of the ink, for real images and samples alike:
``spread``, the median over images of the root-mean-square distance (pixels)
of the ink from its centre, says whether two digits lie as far apart as real
pairs do; ``pieces_1`` / ``pieces_2`` / ``pieces_3+``, the shares of images
whose ink (pixels above 0.5, 8-connected, pieces of at least 5 pixels) forms
one piece (touching or overlapping digits), two, or more (stray strokes).

A maintainers' tool, written for flax 0.12 on (``nnx.List``, ``Optimizer.update(model,
grads)``), above the lower bound that ``draw_jax`` itself keeps.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from flax import nnx
from scipy import ndimage

from draw_jax import checkpoint, pretrained, two_digits
from draw_jax import data as data_lib
from experiments import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined only when it runs (the tests import this module beside
    ``experiments``, whose flags share some names)."""
    flags.DEFINE_string("data_dir", None, "Folder with the MNIST IDX files.", required=True)
    flags.DEFINE_string("workdir", None, "Where the counter and the reports live.", required=True)
    flags.DEFINE_integer("num_steps", 20000, "Training steps of the counter (batch 128, fresh images each).")
    flags.DEFINE_float(
        "confidence",
        0.5,
        "Probability a prediction of two digits needs to count (0.5: more likely than all others together).",
    )
    flags.DEFINE_string("model", None, "A released DRAW model or a workdir of mnist_two_digits to sample.")
    flags.DEFINE_integer("step", None, "The checkpoint of a workdir --model to read (default: its latest).")
    flags.DEFINE_integer("num_samples", 1000, "Samples drawn from --model.")
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature of --model (1: its prior).")
    flags.DEFINE_list(
        "posterior_steps",
        [],
        "At temperature 1, also count pictures of the real pairs drawn with z_t from the posterior for "
        "the first k steps and from the prior after, for each k listed (posterior_prefix).",
    )
    flags.DEFINE_integer("seed", 0, "Seed of the counter's training and of the samples.")


MAX_COUNT = 2  # counts 0, 1, 2 of each class
_CHANNELS = ((1, 32), (32, 64), (64, 128), (128, 128))


def one_digit(digits: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each MNIST image [m, 28, 28, 1] pasted alone on a 60 x 60 canvas, at a position uniform
    over 0..32 per axis as ``two_digits.make`` places its digits: (uint8 [m, 60, 60, 1], rows [m, 2])."""
    m, d = digits.shape[0], digits.shape[1]
    positions = np.random.default_rng([seed, 7]).integers(0, two_digits.CANVAS - d + 1, size=(m, 2))
    return two_digits.paste([digits], positions[:, None]), positions


def fresh_batch(
    digits: np.ndarray, labels: np.ndarray, rng: np.random.Generator, num_two: int, num_one: int
) -> tuple[np.ndarray, np.ndarray]:
    """A new draw of training images, as ``two_digits.make`` and ``one_digit`` build them but from
    fresh pairs and positions each call, so the counter never sees the same picture twice:
    (float [num_two + num_one, 60, 60, 1] in [0, 1], counts int32 [num_two + num_one, 10])."""
    m = digits.shape[0]
    first = rng.integers(0, m, num_two + num_one)
    second = (first[:num_two] + rng.integers(1, m, num_two)) % m  # another image, as make's partners
    corners = rng.integers(0, two_digits.CANVAS - digits.shape[1] + 1, size=(num_two + num_one, 2, 2))
    two = two_digits.paste([digits[first[:num_two]], digits[second]], corners[:num_two])
    one = two_digits.paste([digits[first[num_two:]]], corners[num_two:, :1])
    images = np.concatenate([two, one]).astype(np.float32) / 255
    target = np.concatenate(
        [counts(labels[first[:num_two]], labels[second]), counts(labels[first[num_two:]])]
    )
    return images, target


def counts(*labels: np.ndarray) -> np.ndarray:
    """int32 [m, 10]: how many times each class appears among the given label arrays [m]."""
    out = np.zeros((labels[0].shape[0], 10), np.int32)
    for lab in labels:
        np.add.at(out, (np.arange(len(lab)), lab), 1)
    return out


def labelled_split(split: str, data_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"two": (images, counts), "one": (images, counts)} of one split, built from the MNIST files."""
    source = data_lib.load_split("mnist", split, data_dir)
    two = two_digits.make(source.images, split)
    one, _ = one_digit(source.images, {"train": 0, "valid": 1, "test": 2}[split])
    return {
        "two": (two.images, counts(source.labels, source.labels[two.partners])),
        "one": (one, counts(source.labels)),
    }


class Counter(nnx.Module):
    """[b, 60, 60, 1] in [0, 1] -> logits [b, 10, 3] of each class's count."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        # 60 -> 30 -> 15 -> 8 -> 4: each cell of the last map sees about a digit's width.
        self.convs = nnx.List(
            [nnx.Conv(c_in, c_out, (3, 3), strides=2, rngs=rngs) for c_in, c_out in _CHANNELS]
        )
        self.hidden = nnx.Linear(4 * 4 * 128, 256, rngs=rngs)
        self.out = nnx.Linear(256, 10 * (MAX_COUNT + 1), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        x = jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1)))
        return self.out(x).reshape(x.shape[0], 10, MAX_COUNT + 1)


def loss_fn(model: Counter, x: jax.Array, target: jax.Array) -> jax.Array:
    """Cross-entropy of each class's count, summed over the classes, mean over the batch."""
    return optax.softmax_cross_entropy_with_integer_labels(model(x), target).sum(-1).mean()


def train_counter(
    source: data_lib.Dataset,
    valid: tuple[np.ndarray, np.ndarray],
    num_steps: int,
    seed: int,
    run_dir: str,
    checkpoint_every: int = 1000,
) -> Counter:
    """Adam 1e-3 with a cosine decay over ``num_steps``, batches of 128 fresh images
    (``fresh_batch``): two thirds two-digit, one third one-digit. Logs the share of the
    ``valid`` two-digit images (uint8 images, counts) whose counts it gets exactly right.

    Every ``checkpoint_every`` steps the counter and its optimizer are saved under
    ``run_dir``, and a later call resumes from the latest save. Step i's batch is drawn
    from a generator seeded with (seed, 1, i), so a resumed training gives the same
    counter as an uninterrupted one. A ``run_dir`` holding a training with another
    ``num_steps`` or ``seed`` is refused, naming both.
    """
    model = Counter(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(optax.cosine_decay_schedule(1e-3, num_steps)), wrt=nnx.Param)
    _check_same_training(run_dir, num_steps, seed)

    @nnx.jit
    def step(model, optimizer, x, target):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, target)
        optimizer.update(model, grads)
        return loss

    with checkpoint.Checkpointer(run_dir, keep=1) as checkpointer:
        start = checkpointer.latest_step() or 0
        if start:
            state = checkpointer.restore({"model": nnx.state(model), "optimizer": nnx.state(optimizer)})
            nnx.update(model, state["model"])
            nnx.update(optimizer, state["optimizer"])
            logging.info("counter resumed from its step-%d checkpoint in %s", start, run_dir)
        for i in range(start, num_steps):
            rng = np.random.default_rng([seed, 1, i])
            loss = step(model, optimizer, *fresh_batch(source.images, source.labels, rng, 85, 43))
            if (i + 1) % 500 == 0:
                logging.info("counter step %d/%d  loss %.4f", i + 1, num_steps, float(loss))
            if (i + 1) % 2000 == 0 or i + 1 == num_steps:
                found, _ = predict(model, valid[0].astype(np.float32) / 255)
                logging.info(
                    "counter step %d  valid two-digit counts exact %.4f",
                    i + 1,
                    np.mean((found == valid[1]).all(-1)),
                )
            if (i + 1) % checkpoint_every == 0 and i + 1 < num_steps:
                checkpointer.save(i + 1, {"model": nnx.state(model), "optimizer": nnx.state(optimizer)})
    return model


def _check_same_training(run_dir: str, num_steps: int, seed: int) -> None:
    """Records the training's settings in ``run_dir`` on its first call; refuses other settings later."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "settings.json")
    settings = {"num_steps": num_steps, "seed": seed}
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        if before != settings:
            raise app.UsageError(
                f"{run_dir} holds an unfinished counter training with {before}, not --num_steps={num_steps} "
                f"--seed={seed}: pass its settings to resume it, or another --workdir"
            )
    else:
        with open(path, "w") as f:
            json.dump(settings, f)


def predict(model: Counter, images: np.ndarray, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(counts int [m, 10], probability of those counts [m]) for float images [m, 60, 60, 1] in [0, 1]."""
    apply = nnx.jit(lambda model, x: jax.nn.softmax(model(x), -1))
    probs = np.concatenate(
        [np.asarray(apply(model, images[i : i + batch])) for i in range(0, len(images), batch)]
    )
    return probs.argmax(-1), probs.max(-1).prod(-1)


def share_of_two(model: Counter, images: np.ndarray, confidence: float) -> float:
    """Share of ``images`` (float, [0, 1]) that hold two confident digits."""
    found, p = predict(model, images)
    return float(np.mean((found.sum(-1) == 2) & (p >= confidence)))


def layout(images: np.ndarray, min_piece: int = 5) -> dict[str, float]:
    """The ink's layout in float images [m, H, W, 1] in [0, 1] (see the module's docstring)."""
    x = images[..., 0].astype(np.float64)
    rows, cols = np.mgrid[: x.shape[1], : x.shape[2]]
    mass = np.maximum(x.sum((1, 2)), 1e-9)
    cy, cx = (x * rows).sum((1, 2)) / mass, (x * cols).sum((1, 2)) / mass
    square = (rows - cy[:, None, None]) ** 2 + (cols - cx[:, None, None]) ** 2
    spread = np.sqrt((x * square).sum((1, 2)) / mass)
    pieces = []
    for on in x > 0.5:
        labels, _ = ndimage.label(on, structure=np.ones((3, 3)))
        pieces.append(int((np.bincount(labels.ravel())[1:] >= min_piece).sum()))
    pieces = np.array(pieces)
    return {
        "spread": float(np.median(spread)),
        "pieces_1": float(np.mean(pieces == 1)),
        "pieces_2": float(np.mean(pieces == 2)),
        "pieces_3+": float(np.mean(pieces >= 3)),
    }


def _counter_path(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "counter")


def load_or_train(workdir: str, data_dir: str, num_steps: int, seed: int) -> Counter:
    path = _counter_path(workdir)
    model = Counter(nnx.Rngs(seed))
    with ocp.StandardCheckpointer() as checkpointer:
        if os.path.isdir(path):
            graphdef, state = nnx.split(model)
            return nnx.merge(graphdef, checkpointer.restore(path, target=state))
        valid = labelled_split("valid", data_dir)["two"]
        run_dir = os.path.join(os.path.abspath(workdir), "counter_training")
        model = train_counter(
            data_lib.load_split("mnist", "train", data_dir), valid, num_steps, seed, run_dir
        )
        checkpointer.save(path, nnx.state(model))
    return model


def load_draw(name_or_workdir: str, step: int | None = None) -> tuple[Any, int]:
    """(the DRAW module of ``--model``, its training steps), refused by name unless it makes
    60 x 60 x 1 images; ``step`` picks a workdir's checkpoint (default: the latest)."""
    trained = pretrained.load(name_or_workdir, step)
    shape = trained.config.model.image_shape
    if tuple(shape) != (two_digits.CANVAS, two_digits.CANVAS, 1):
        raise app.UsageError(
            f"--model={name_or_workdir} makes {shape} images, not two-digit MNIST's 60 x 60 x 1"
        )
    from draw_jax import train_step

    return train_step.apply_model(trained.graphdef, trained.params), trained.step


def report_path(workdir: str, model: str | None, step: int | None, temperature: float) -> str:
    """Where a call's report goes: ``report.json`` for real images alone, else named after the
    model's basename, its training ``step`` and a temperature other than 1."""
    if not model:
        return os.path.join(workdir, "report.json")
    stem = f"report_{os.path.basename(os.path.normpath(model))}_step{step}"
    if temperature != 1:
        stem += f"_temperature_{temperature:g}"
    return os.path.join(workdir, f"{stem}.json")


def samples(model, num: int, seed: int, temperature: float = 1.0) -> np.ndarray:
    """float [num, 60, 60, 1]: sigmoid(c_T) of ``num`` samples from the prior of a DRAW module
    (``load_draw``; at ``temperature``, as ``DRAW.generate``)."""
    generate = jax.jit(lambda key: jax.nn.sigmoid(model.generate(key, 100, temperature).canvases[-1]))
    keys = jax.random.split(jax.random.key(seed), -(-num // 100))
    return np.concatenate([np.asarray(generate(k)) for k in keys])[:num]


def reconstructions(model, images: np.ndarray, seed: int) -> np.ndarray:
    """float [m, 60, 60, 1]: sigmoid(c_T) of a DRAW module's reconstructions of uint8 ``images``
    [m, 60, 60, 1], each binarised once (a Bernoulli draw, as the model trains) and encoded with
    z_t drawn from its posterior: the counter's figure on pictures the model draws from a real pair."""
    return over_binarised_pairs(lambda x, key: jax.nn.sigmoid(model(x, key).logits), images, seed)


def over_binarised_pairs(draw, images: np.ndarray, seed: int) -> np.ndarray:
    """``draw(x, key)`` jitted over uint8 ``images`` binarised once (a Bernoulli draw from seed),
    in batches of 100, batch i with key i of ``seed``'s split: concatenated."""
    rng = np.random.default_rng([seed, 11])
    binary = (rng.random(images.shape) < images / 255).astype(np.float32)
    draw = jax.jit(draw)
    keys = jax.random.split(jax.random.key(seed), -(-len(images) // 100))
    return np.concatenate([np.asarray(draw(binary[i * 100 : (i + 1) * 100], k)) for i, k in enumerate(keys)])


def posterior_prefix(model, images: np.ndarray, k: int, seed: int) -> np.ndarray:
    """float [m, 60, 60, 1]: sigmoid(c_T) of pictures whose z_t come from the posterior of a real
    pair for t < k and from the prior after (``DRAW.decode``). k = T gives ``reconstructions``
    (the same binarisation and draws), k = 0 samples from the prior: the counter's share between
    the two says at which steps the prior falls short."""

    def draw(x, key):
        eps = model.noise(key, x.shape[0])
        out = model(x, eps=eps)
        posterior = out.mu + jnp.exp(out.logsigma) * eps
        prior = jax.random.normal(jax.random.fold_in(key, 1), posterior.shape)
        z = jnp.where((jnp.arange(posterior.shape[0]) < k)[:, None, None], posterior, prior)
        return jax.nn.sigmoid(model.decode(z).canvases[-1])

    return over_binarised_pairs(draw, images, seed)


@cli.user_errors_as_messages
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not FLAGS.temperature >= 0:
        raise app.UsageError(f"--temperature must be >= 0, got {FLAGS.temperature}")
    if FLAGS.step is not None and not FLAGS.model:
        raise app.UsageError("--step picks a checkpoint of a workdir --model; no --model was given")
    try:
        prefixes = [int(k) for k in FLAGS.posterior_steps]
    except ValueError:
        raise app.UsageError(f"--posterior_steps takes step counts, got {FLAGS.posterior_steps}") from None
    if prefixes and (not FLAGS.model or FLAGS.temperature != 1):
        raise app.UsageError("--posterior_steps needs a --model at --temperature=1")
    # the model first, so that a wrong --model or --step fails before the counter's training
    model, step = load_draw(FLAGS.model, FLAGS.step) if FLAGS.model else (None, None)
    if any(not 0 <= k <= model.config.T for k in prefixes):
        raise app.UsageError(
            f"--posterior_steps={FLAGS.posterior_steps}: each must be in 0..T={model.config.T}"
        )
    os.makedirs(FLAGS.workdir, exist_ok=True)
    counter = load_or_train(FLAGS.workdir, FLAGS.data_dir, FLAGS.num_steps, FLAGS.seed)
    test = labelled_split("test", FLAGS.data_dir)
    report = {"confidence": FLAGS.confidence, "counter_steps": FLAGS.num_steps}
    for kind, (images, truth) in test.items():
        x = images.astype(np.float32) / 255
        found, _ = predict(counter, x)
        report[f"real_{kind}_digit_share"] = share_of_two(counter, x, FLAGS.confidence)
        report[f"real_{kind}_digit_counts_exact"] = float(np.mean((found == truth).all(-1)))
        if kind == "two":
            report.update({f"real_two_digit_{k}": v for k, v in layout(x).items()})
    if FLAGS.model:
        report["model"] = FLAGS.model
        report["model_step"] = step
        report["num_samples"] = FLAGS.num_samples
        report["temperature"] = FLAGS.temperature
        drawn = samples(model, FLAGS.num_samples, FLAGS.seed, FLAGS.temperature)
        report["samples_share"] = share_of_two(counter, drawn, FLAGS.confidence)
        report.update({f"samples_{k}": v for k, v in layout(drawn).items()})
        if FLAGS.temperature == 1:  # the posterior's path: the same count of real test pairs, redrawn
            pairs = test["two"][0][: FLAGS.num_samples]
            redrawn = reconstructions(model, pairs, FLAGS.seed)
            report["reconstructed_pairs_share"] = share_of_two(
                counter, pairs / np.float32(255), FLAGS.confidence
            )
            report["reconstructions_share"] = share_of_two(counter, redrawn, FLAGS.confidence)
            report.update({f"reconstructions_{k}": v for k, v in layout(redrawn).items()})
            for k in prefixes:
                mixed = posterior_prefix(model, pairs, k, FLAGS.seed)
                report[f"posterior_{k}_steps_share"] = share_of_two(counter, mixed, FLAGS.confidence)
                report.update({f"posterior_{k}_steps_{name}": v for name, v in layout(mixed).items()})
    for key, value in report.items():
        print(f"{key:<34}{value:.4f}" if isinstance(value, float) else f"{key:<34}{value}")
    path = report_path(FLAGS.workdir, FLAGS.model, step, FLAGS.temperature)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
