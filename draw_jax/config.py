"""Every setting of a training run, declared once.

Each setting is a field of one of four frozen dataclasses (model, optimiser,
data, run), with its default and its help text in the field's metadata
(``setting(...)``). Everything else is derived from these declarations:

  * the settings by flag name (``settings``: ``build_config``, the config a
    command line or a notebook asks for, and the absl flags of ``experiments/``,
    one flag per field, same name, type, default and help);
  * ``TrainConfig.resolve``: what only the data and the workdir can decide (run
    length from ``num_epochs``, the cosine schedule's length, the batch size
    against the split), done once when a run starts;
  * ``config.json`` in the workdir (``to_dict`` / ``from_dict``).

Each setting, and each combination of settings, is validated here when its
dataclass is built; every error is a ``ConfigError`` whose message names the
flag at fault (``--read_n ...``). What only the data or the devices decide is
checked where they are known (the image shape against the data set in
``train_loop``, the batch against the device count in ``parallel``, the batch
against the split in ``TrainConfig.resolve``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

from draw_jax import data as data_lib

__all__ = [
    "LIKELIHOODS",
    "ConfigError",
    "DataConfig",
    "DrawConfig",
    "OptimConfig",
    "RunConfig",
    "PARTS",
    "TrainConfig",
]


# D(x | c_T): Bernoulli for binary pixels (the paper's MNIST), a discretised
# logistic for 8-bit pixel values (colour; ``losses.discretized_logistic_nll``).
LIKELIHOODS = ("bernoulli", "discretized_logistic")


class ConfigError(ValueError):
    """A bad setting; the message names the flag or file at fault."""


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None, flag: bool = True) -> Any:
    """A dataclass field declared as a setting: its default, help and allowed values.

    ``flag=False`` marks a field that is derived (from the data set), not typed.
    """
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


def _positive_int(name: str, value: Any, what: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"--{name}{what} must be a positive integer, got {value!r}")


def _non_negative(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name} must be >= 0, got {getattr(cfg, name)}")


@dataclasses.dataclass(frozen=True)
class DrawConfig:
    """Everything that fixes the network's shape. Defaults: the paper's MNIST setup (sec. 4.2)."""

    height: int = setting(28, "Image height (from the data set).", flag=False)
    width: int = setting(28, "Image width (from the data set).", flag=False)
    channels: int = setting(1, "Image channels (from the data set).", flag=False)
    T: int = setting(64, "Glimpses / canvas updates.")
    enc_size: int = setting(256, "Encoder LSTM size.")
    dec_size: int = setting(256, "Decoder LSTM size.")
    peepholes: bool = setting(
        False,
        "Peephole connections in both LSTMs (the cell state feeding the gates, as in Blocks' LSTM); "
        "the paper does not say, the TensorFlow ports have none.",
    )
    z_size: int = setting(100, "Latent size per step.")
    read_n: int = setting(2, "Read glimpse size n (an n x n grid of filters).")
    write_n: int = setting(5, "Write patch size n.")
    read_attention: bool = setting(
        True, "Selective attention for the read (eq. 27); else the whole image (eq. 17)."
    )
    write_attention: bool = setting(
        True, "Selective attention for the write (eq. 29); else a whole canvas (eq. 18)."
    )
    compute_dtype: str = setting(
        "float32",
        "Matmul dtype; parameters, LSTM cells, canvas and loss stay float32.",
        choices=("float32", "bfloat16"),
    )
    likelihood: str = setting(
        "bernoulli",
        "D(x | c_T): bernoulli (binary pixels, the paper's eq. 9) or discretized_logistic (8-bit "
        "pixel values, with a learned scale per channel). Default: the data set's (bernoulli for "
        "the MNIST sets and binarised targets, discretized_logistic for cifar10 and svhn_cropped).",
        choices=LIKELIHOODS,
    )

    def __post_init__(self) -> None:
        for name in ("height", "width", "channels", "T", "enc_size", "dec_size", "z_size"):
            _positive_int(name, getattr(self, name))
        for name in ("read_n", "write_n"):
            _positive_int(name, getattr(self, name), " (glimpse size)")
        _check_choice(self, "compute_dtype")
        _check_choice(self, "likelihood")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    @property
    def read_size(self) -> int:
        """Length of r_t: two glimpses (x and x_hat) with attention, two images without."""
        per = self.read_n * self.read_n if self.read_attention else self.height * self.width
        return 2 * per * self.channels


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam on clipped gradients.

    Defaults: the recipe search's winner (BUILD_NOTES.md, "The default recipe"):
    lr 5e-3 peak, beta1 0.8, 100 warm-up steps, cosine decay to 0.1x over the
    run, KL weight warmed up over the first 300 steps, and the run evaluated
    (and released) with its parameters' moving average of decay 0.995. The
    popular ports' settings (ericjang/draw: lr 1e-3, beta1 0.5, constant, no
    KL warm-up, no average, each variable's gradient clipped to norm 5) are
    ``--learning_rate=1e-3 --adam_b1=0.5 --lr_schedule=constant --warmup_steps=0
    --kl_warmup_steps=0 --ema_decay=0 --clip_mode=per_variable``.
    """

    learning_rate: float = setting(5e-3, "Adam step size (peak of the schedule).")
    adam_b1: float = setting(0.8, "Adam beta1.")
    adam_b2: float = setting(0.999, "Adam beta2.")
    clip_norm: float = setting(5.0, "Gradient-norm clipping threshold (0 = off); see --clip_mode.")
    clip_mode: str = setting(
        "global",
        "How --clip_norm applies: global (one norm over all gradients, optax.clip_by_global_norm) or "
        "per_variable (each parameter array's own norm, as the popular TF ports' tf.clip_by_norm(g, 5)).",
        choices=("global", "per_variable"),
    )
    lr_schedule: str = setting(
        "cosine",
        "Learning-rate schedule after the warm-up: constant, or cosine decay to "
        "--final_lr_fraction of the peak over --decay_steps.",
        choices=("constant", "cosine"),
    )
    warmup_steps: int = setting(100, "Linear learning-rate warm-up steps.")
    decay_steps: int | None = setting(
        None,
        "Cosine schedule length in steps. Default: the run length when the run starts; "
        "a resumed run keeps its schedule (extending a run continues at the final rate).",
    )
    final_lr_fraction: float = setting(0.1, "Cosine schedule's final rate, as a fraction of the peak.")
    kl_warmup_steps: int = setting(
        300,
        "Linear KL-weight warm-up steps: the KL term's weight rises from 1/N to 1 over the first N "
        "steps (0 = the paper's objective throughout). Reported bounds are always unweighted.",
    )
    ema_decay: float = setting(
        0.995,
        "Keep an exponential moving average of the parameters with this decay (0 = none) and "
        "evaluate, sample and release it; the raw parameters' bound is logged beside it.",
    )

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning_rate must be > 0, got {self.learning_rate}")
        for name in ("adam_b1", "adam_b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.clip_norm < 0:
            raise ConfigError(f"--clip_norm must be >= 0 (0 disables), got {self.clip_norm}")
        _check_choice(self, "lr_schedule")
        _check_choice(self, "clip_mode")
        _non_negative(self, "warmup_steps", "kl_warmup_steps")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ConfigError(f"--decay_steps must be >= 1, got {self.decay_steps}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ConfigError(f"--final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"--ema_decay must be in [0, 1) (0 = no average), got {self.ema_decay}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which images, from where, in what batches."""

    dataset: str = setting(
        "binarized_mnist",
        "binarized_mnist (the paper's benchmark: the fixed binarisation), mnist (grey levels), "
        "mnist_two_digits (two digits on 60x60, the paper's sec. 4.3), cifar10 or svhn_cropped "
        "(32x32 colour).",
        choices=tuple(data_lib.DATASETS),
    )
    data_dir: str | None = setting(
        None, "Folder of local files (MNIST IDX or binarized_mnist_*.amat[.gz]); when set, TFDS is not used."
    )
    tfds_data_dir: str | None = setting(None, "TFDS's data folder (its default if unset).")
    binarize: str | None = setting(
        None,
        "mnist only: dynamic (a fresh Bernoulli sample per use; default), threshold (> 0.5) or none "
        "(grey targets: the bound is then a cross-entropy, not a likelihood). binarized_mnist is "
        "already binary.",
        choices=data_lib.BINARIZE_CHOICES,
    )
    batch_size: int = setting(100, "Images per step (global, over all devices).")
    eval_split: str = setting(
        "valid", "Held-out split evaluated during training (valid or test; every data set has both)."
    )
    device_data: bool = setting(
        True, "Keep the training split on the device and draw batches inside the jitted step."
    )

    def __post_init__(self) -> None:
        _check_choice(self, "dataset")
        info = data_lib.DATASETS[self.dataset]
        if self.binarize is None:
            object.__setattr__(self, "binarize", info.default_binarize)
        _check_choice(self, "binarize")
        if info.binary and self.binarize != "none":
            raise ConfigError(
                f"--binarize={self.binarize} does not apply to {self.dataset}, which is already the fixed "
                "binarisation the paper reports on; use --binarize=none or --dataset=mnist"
            )
        _positive_int("batch_size", self.batch_size)
        split = data_lib.canonical_split(self.eval_split)
        if split == "train":
            raise ConfigError("--eval_split must be a held-out split (valid or test), not train")
        if split not in info.splits:
            raise ConfigError(
                f"--eval_split={self.eval_split}: {self.dataset} has splits {', '.join(info.splits)}"
            )
        object.__setattr__(self, "eval_split", split)
        if self.data_dir is not None and not os.path.isdir(self.data_dir):
            raise ConfigError(f"--data_dir={self.data_dir} is not a directory")

    @property
    def binary_targets(self) -> bool:
        """Whether the model is fit to 0/1 pixels (the bound is then a likelihood bound)."""
        return data_lib.DATASETS[self.dataset].binary or self.binarize != "none"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How long, how seeded, how often to log, evaluate and save."""

    num_steps: int = setting(100_000, "Optimiser steps in all (a resumed run continues to this number).")
    num_epochs: int | None = setting(
        None, "Instead of --num_steps: whole passes over the training split (steps from its size)."
    )
    seed: int = setting(0, "Seeds parameters, data order and every random draw.")
    log_every: int = setting(100, "Steps between console lines and train summaries (0 = at the end only).")
    eval_every: int = setting(5_000, "Steps between held-out evaluations (0 = at the end only).")
    checkpoint_every: int = setting(1_000, "Steps between checkpoints (0 = at the end only).")
    checkpoint_minutes: float = setting(
        10.0,
        "Also checkpoint after this many minutes of training since the last checkpoint, whatever the "
        "step (0 = by steps only), so an interrupted run loses minutes at most.",
    )
    keep_checkpoints: int = setting(3, "Checkpoints kept.")
    init_from: str | None = setting(
        None,
        "Start from a released pretrained model's parameters (a name such as binarized_mnist_attention, "
        "or a .npz path) instead of random ones; the model settings default to its own. Fresh optimiser.",
    )
    eval_examples: int = setting(0, "Held-out images used by the periodic evaluation (0 = all).")
    steps_per_call: int = setting(
        10,
        "Train steps per compiled call with --device_data (reduced to fit in an epoch and to divide "
        "the log, checkpoint and eval intervals; 0.82x the time per step at 10 on the paper config).",
    )

    def __post_init__(self) -> None:
        _positive_int("num_steps", self.num_steps)
        if self.num_epochs is not None:
            _positive_int("num_epochs", self.num_epochs)
        _non_negative(
            self, "log_every", "eval_every", "checkpoint_every", "checkpoint_minutes", "eval_examples"
        )
        _positive_int("keep_checkpoints", self.keep_checkpoints)
        _positive_int("steps_per_call", self.steps_per_call)

    def steps_per_call_for(self, steps_per_epoch: int) -> int:
        """The steps per call actually used: calls of k steps start at multiples of k,
        and k divides every interval, so no call runs past a log, checkpoint or eval step."""
        return math.gcd(
            min(self.steps_per_call, steps_per_epoch), self.log_every, self.checkpoint_every, self.eval_every
        )


PARTS = {"model": DrawConfig, "optim": OptimConfig, "data": DataConfig, "run": RunConfig}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole training run: what ``config.json`` holds."""

    model: DrawConfig = dataclasses.field(default_factory=DrawConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.model.likelihood == "discretized_logistic" and (
            data_lib.DATASETS[self.data.dataset].binary or self.data.binarize != "none"
        ):
            raise ConfigError(
                f"--likelihood=discretized_logistic models 8-bit pixel values, but --dataset="
                f"{self.data.dataset} with --binarize={self.data.binarize} gives binary targets; "
                "use --likelihood=bernoulli, or --binarize=none on a grey or colour data set"
            )

    @property
    def bound_is_likelihood(self) -> bool:
        """Whether the reported bound bounds -log p(x) of the data (binary pixels under a
        Bernoulli, or 8-bit pixels under the discretised logistic); a Bernoulli on grey
        or colour levels is a cross-entropy, not a likelihood."""
        if self.model.likelihood == "discretized_logistic":
            return True
        return self.data.binary_targets

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """The config a ``to_dict`` wrote, also from draw_jax 0.1's config.json.

        0.1 called ``model.compute_dtype`` ``model.dtype`` and had no
        ``run.num_epochs``; their workdirs still load, evaluate and resume.
        Optimiser settings added since are absent from older files and read as
        what those runs did (no KL warm-up, no parameter average), not as
        today's defaults.
        """
        d = {part: dict(values) for part, values in d.items()}
        model = d.get("model", {})
        if "dtype" in model and "compute_dtype" not in model:
            model["compute_dtype"] = model.pop("dtype")
        if "optim" in d:
            for name, before in _OPTIM_SINCE_ADDED.items():
                d["optim"].setdefault(name, before)
        try:
            return cls(**{part: klass(**d[part]) for part, klass in PARTS.items()})
        except (KeyError, TypeError) as e:
            raise ConfigError(f"config does not match this version of draw_jax: {e}") from e

    def resolve(self, num_train_images: int, previous: TrainConfig | None = None) -> TrainConfig:
        """The concrete config of a run on a training split of ``num_train_images``.

        * ``--num_epochs`` becomes ``num_steps`` (whole epochs of full batches).
        * ``decay_steps`` unset: a resumed run (``previous`` is its config) keeps
          its own schedule length, so extending a finished cosine run continues
          at the final rate rather than jumping back up; a new run decays over
          its own length.

        Raises:
          ConfigError: the batch is larger than the training split.
        """
        steps_per_epoch = num_train_images // self.data.batch_size
        if steps_per_epoch == 0:
            raise ConfigError(
                f"--batch_size={self.data.batch_size} is larger than the training split "
                f"({num_train_images} images)"
            )
        run, optim = self.run, self.optim
        if run.num_epochs is not None:
            run = dataclasses.replace(run, num_steps=run.num_epochs * steps_per_epoch)
        if optim.decay_steps is None:
            inherited = previous.optim.decay_steps if previous is not None else None
            optim = dataclasses.replace(optim, decay_steps=inherited or run.num_steps)
        return dataclasses.replace(self, run=run, optim=optim)

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues.

        Run length and logging intervals may change between restarts (to extend
        a run); the model, optimiser, data and seed may not.
        """
        d = self.to_dict()
        d["run"] = {"seed": self.run.seed}
        for where in ("data_dir", "tfds_data_dir", "device_data"):  # same images, same batches
            d["data"].pop(where)
        return d


# Optimiser settings added after the first config.json files were written, and
# the value that reproduces what a run without the setting did.
_OPTIM_SINCE_ADDED = {"kl_warmup_steps": 0, "ema_decay": 0.0, "clip_mode": "global"}


def _check_choice(cfg: Any, name: str) -> None:
    choices = _FIELDS[type(cfg).__name__][name].metadata["choices"]
    value = getattr(cfg, name)
    if value not in choices:
        raise ConfigError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")


_FIELDS = {klass.__name__: {f.name: f for f in dataclasses.fields(klass)} for klass in PARTS.values()}
