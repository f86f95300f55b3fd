"""Plots valid bound against training steps for several runs.

``python -m tools.plot_curves --curves=docs/curves.json --output=docs/curves.png``

``--curves`` is a JSON list of {"label", "steps", "bounds", "source"}: the
recorded evaluations of each run (``source`` says where they were read: a
workdir's log, a BUILD_NOTES table); optional "color" and "linestyle"
(matplotlib's names) draw the seeds of one recipe alike. ``--log=label:path`` adds the
"valid bound" lines of a training log (``experiments.train``'s output).
"""

from __future__ import annotations

import json
import os
import re

from absl import app, flags

from experiments import cli

flags.DEFINE_string("curves", None, "JSON list of recorded curves.")
flags.DEFINE_multi_string("log", [], "label:path of an experiments.train log to read valid bounds from.")
flags.DEFINE_string("output", None, "PNG to write.", required=True)
flags.DEFINE_float("ymin", 75.0, "Bottom of the bound axis (nats).")
flags.DEFINE_float("ymax", 140.0, "Top of the bound axis (nats).")
flags.DEFINE_integer("min_step", 0, "Leave out evaluations before this step (a close view of late training).")
flags.DEFINE_bool("overwrite", False, "Replace --output if it exists.")

FLAGS = flags.FLAGS
_LINE = re.compile(r"step (\d+)\s+valid bound ([0-9.]+) nats")


def curves_from_log(label: str, path: str) -> dict:
    steps, bounds = [], []
    with open(path) as f:
        for line in f:
            m = _LINE.search(line)
            if m:
                steps.append(int(m.group(1)))
                bounds.append(float(m.group(2)))
    if not steps:
        raise cli.ConfigError(f"{path} has no 'step N  valid bound X nats' lines (--log={label}:{path})")
    return {"label": label, "steps": steps, "bounds": bounds, "source": path}


def _from_step(curve: dict, min_step: int) -> dict:
    """The curve's evaluations at or after ``min_step``."""
    if len(curve["steps"]) != len(curve["bounds"]):
        raise cli.ConfigError(
            f"curve {curve['label']!r} ({curve.get('source')}) has {len(curve['steps'])} steps "
            f"but {len(curve['bounds'])} bounds"
        )
    kept = [(s, b) for s, b in zip(curve["steps"], curve["bounds"], strict=True) if s >= min_step]
    return {**curve, "steps": [s for s, _ in kept], "bounds": [b for _, b in kept]}


@cli.user_errors_as_messages
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.ConfigError(f"unexpected arguments {argv[1:]}")
    if os.path.exists(FLAGS.output) and not FLAGS.overwrite:
        raise cli.ConfigError(f"{FLAGS.output} exists; pass --overwrite to replace it")
    curves = []
    if FLAGS.curves:
        with open(FLAGS.curves) as f:
            curves += json.load(f)
    for spec in FLAGS.log:
        label, sep, path = spec.partition(":")
        if not sep:
            raise cli.ConfigError(f"--log must be label:path, got {spec!r}")
        curves.append(curves_from_log(label, path))
    if not curves:
        raise cli.ConfigError("nothing to plot: give --curves and/or --log")
    if FLAGS.ymin >= FLAGS.ymax:
        raise cli.ConfigError(f"--ymin={FLAGS.ymin} must be below --ymax={FLAGS.ymax}")
    # Each curve keeps its colour and line style from its place in the full list,
    # so a close view (--min_step) draws every run as the full plot does.
    styles = ["-", "--", ":"]  # matplotlib's 10 colours repeat; a new line style with them
    for i, c in enumerate(curves):
        c.setdefault("color", f"C{i % 10}")
        c.setdefault("linestyle", styles[i // 10 % 3])
    many = len(curves) > 8  # then the legend goes beside the axes, not over the curves
    curves = [late for c in curves if (late := _from_step(c, FLAGS.min_step))["steps"]]
    if not curves:
        raise cli.ConfigError(f"no curve has an evaluation at or after --min_step={FLAGS.min_step}")

    try:
        import matplotlib
    except ImportError as e:
        raise cli.ConfigError("plotting needs matplotlib: pip install -e '.[plots]'") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11 if many else 7, 4.2), dpi=120)
    for c in curves:
        ax.plot(
            c["steps"],
            c["bounds"],
            marker="o",
            markersize=3,
            label=c["label"],
            color=c["color"],
            linestyle=c["linestyle"],
        )
    ax.axhline(80.97, color="grey", linestyle="--", linewidth=1, label="paper, attention: 80.97")
    ax.axhline(87.40, color="grey", linestyle=":", linewidth=1, label="paper, no attention: 87.40")
    ax.axhline(
        81.9, color="tab:red", linestyle="-.", linewidth=1, label="jbornschein/draw, attention (test): ~81.9"
    )
    ax.set_ylim(FLAGS.ymin, FLAGS.ymax)
    ax.set_xlabel("training steps (batch 100)")
    ax.set_ylabel("valid bound (nats)")
    ax.set_title("Binarized MNIST, T=64, valid split")
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    fig.savefig(FLAGS.output)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
