"""DRAW's pictures from a trained workdir.

``python -m experiments.sample --workdir=W --output_dir=DIR`` (or ``--pretrained=NAME``
instead of ``--workdir``) writes:
  samples.png                  a grid of samples from the prior (sigmoid(c_T);
                               --temperature below 1 draws z nearer the prior's centre)
  samples_over_time.png        rows: samples; columns: sigmoid(c_t) over t
  generation.gif               generation step by step, write window as a box
  reconstructions_over_time.png  the same for held-out images (--split)
  reconstruction.gif           reconstruction step by step, read (red) and write (green) boxes
Existing files are not overwritten unless --overwrite. The reconstructions need
the held-out data (--data_dir offline); where it cannot be loaded they are
skipped with the reason, and the samples are still written. One process.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from absl import flags, logging

from draw_jax import data as data_lib
from draw_jax import pictures, train_step
from experiments import cli, common_flags

flags.DEFINE_string("output_dir", None, "Where the pictures go.", required=True)
flags.DEFINE_integer("num_samples", 64, "Samples in samples.png.")
flags.DEFINE_integer("num_animated", 16, "Examples in each GIF and strip.")
flags.DEFINE_float(
    "temperature",
    1.0,
    "Samples take z_t ~ N(0, temperature^2 I): 1 is the prior (the paper's samples), below 1 nearer its centre.",
)
flags.DEFINE_bool("overwrite", False, "Replace pictures already in --output_dir.")

flags.adopt_module_key_flags(common_flags)  # its flags show in --help

FLAGS = flags.FLAGS

OUTPUTS = (
    "samples.png",
    "samples_over_time.png",
    "generation.gif",
    "reconstructions_over_time.png",
    "reconstruction.gif",
)
READ_COLOUR, WRITE_COLOUR = (255, 48, 48), (48, 220, 48)


def _boxes(window):
    if window is None:
        return None
    gx, gy, delta = (np.asarray(a) for a in (window.gx, window.gy, window.delta))
    return [(gx[t], gy[t], delta[t]) for t in range(gx.shape[0])]


def _overlay(base: list[np.ndarray], extra: list[np.ndarray], like: list[np.ndarray]) -> list[np.ndarray]:
    """Puts the pixels that ``extra`` boxed (differ from ``like``) on top of ``base``."""
    return [
        np.where((e != plain).any(-1, keepdims=True), e, b)
        for b, e, plain in zip(base, extra, like, strict=True)
    ]


@cli.user_errors_as_messages
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.ConfigError(f"unexpected arguments {argv[1:]}")
    for name in ("num_samples", "num_animated"):
        if getattr(FLAGS, name) < 1:
            raise cli.ConfigError(f"--{name} must be >= 1, got {getattr(FLAGS, name)}")
    if not FLAGS.temperature >= 0:
        raise cli.ConfigError(f"--temperature must be >= 0, got {FLAGS.temperature}")
    out_dir = FLAGS.output_dir
    cli.check_folder("output_dir", out_dir)
    existing = [f for f in OUTPUTS if os.path.exists(os.path.join(out_dir, f))]
    if existing and not FLAGS.overwrite:
        raise cli.ConfigError(
            f"--output_dir={out_dir} already holds {', '.join(existing)}; pass --overwrite to replace them "
            "or choose another folder"
        )
    trained, _ = common_flags.load_model()
    cfg = trained.config.model
    model = train_step.apply_model(trained.graphdef, trained.params)
    key = jax.random.key(FLAGS.seed)
    gen_key, data_key, rec_key = jax.random.split(key, 3)

    def wrote(path: str) -> None:
        print(f"wrote {path}", flush=True)

    # Samples from the prior.
    num = max(FLAGS.num_samples, FLAGS.num_animated)
    logging.info(
        "generating %d samples from the prior at temperature %g (%d steps; compiling first)",
        num,
        FLAGS.temperature,
        cfg.T,
    )
    gen = jax.jit(model.generate, static_argnums=1)(gen_key, num, FLAGS.temperature)
    means = np.asarray(jax.nn.sigmoid(gen.canvases))  # [T, m, h, w, c]
    wrote(
        pictures.save_png(os.path.join(out_dir, "samples.png"), pictures.grid(means[-1, : FLAGS.num_samples]))
    )
    few = means[:, : FLAGS.num_animated]
    wrote(pictures.save_png(os.path.join(out_dir, "samples_over_time.png"), pictures.canvas_strip(few)))
    frames = pictures.frames_with_boxes(few, _boxes(gen.write_window), cfg.write_n, color=WRITE_COLOUR)
    wrote(pictures.save_gif(os.path.join(out_dir, "generation.gif"), frames))

    # Reconstructions of held-out images: they need the data (samples did not).
    try:
        split, data_cfg = common_flags.load_data(trained.config, download=False)
    except data_lib.DataError as e:
        print(f"skipped reconstructions_over_time.png and reconstruction.gif: {e}", file=sys.stderr)
        return
    images = split.images[: FLAGS.num_animated]
    logging.info("reconstructing %d %s images (%d steps; compiling first)", len(images), split.split, cfg.T)
    x = data_lib.preprocess(images, split.binary, data_cfg.binarize, data_key)
    out = jax.jit(lambda x, k: model(x, k))(x, rec_key)
    rec = np.asarray(jax.nn.sigmoid(out.canvases))
    wrote(
        pictures.save_png(os.path.join(out_dir, "reconstructions_over_time.png"), pictures.canvas_strip(rec))
    )
    plain = pictures.frames_with_boxes(rec, None, 1)
    read = pictures.frames_with_boxes(rec, _boxes(out.read_window), cfg.read_n, color=READ_COLOUR)
    both = _overlay(
        read,
        pictures.frames_with_boxes(rec, _boxes(out.write_window), cfg.write_n, color=WRITE_COLOUR),
        plain,
    )
    wrote(pictures.save_gif(os.path.join(out_dir, "reconstruction.gif"), both))


if __name__ == "__main__":
    cli.run(main)
