"""Released trained models, loadable by name.

Example (the released model's valid bound is in its card; see README.md):
  >>> import jax
  >>> from draw_jax import pretrained
  >>> model, config = pretrained.load_model("binarized_mnist_attention")
  >>> model.generate(jax.random.key(0), 4).canvases.shape  # T canvases of 4 samples
  (64, 4, 28, 28, 1)

A released model is two files in ``draw_jax/pretrained/``:

* ``<name>.npz`` — the parameters only, ``numpy.savez_compressed``; one
  array per parameter, keyed by its path in the model's parameter tree; stored
  in float32, or in float16 where the card says so (``param_dtype``: half the
  size, and ``tools.export_pretrained`` refuses it unless the valid bound is
  unchanged). Loading always gives float32.
* ``<name>.json`` — its card: the ``TrainConfig`` it was trained with, the
  step, the recipe's command, the measured valid bound, and the SHA-256 of
  the ``.npz``. Loading verifies the checksum before reading a byte of the
  parameters, so a corrupted or truncated file is refused with its name.

``tools.export_pretrained`` writes both from a training workdir;
``experiments.sample`` / ``experiments.evaluate`` take ``--pretrained=NAME``
and ``experiments.train`` ``--init_from=NAME``.

The cluttered-MNIST attention classifiers are released the same way, with a
``ClassifierCard`` (``"kind": "classifier"`` in the ``.json``):
``load_classifier(name)`` and ``save_classifier``; ``experiments.classify_cluttered
--pretrained=NAME`` evaluates one. Each loader refuses the other kind by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import numpy as np

from draw_jax import train_step
from draw_jax.checkpoint import file_sha256
from draw_jax.classifier_run import ClassifierRunConfig, init_classifier
from draw_jax.config import ConfigError, DrawConfig, TrainConfig
from draw_jax.model import DRAW
from draw_jax.workdir import Trained, load_trained

__all__ = [
    "FORMAT_VERSION",
    "PARAM_DTYPES",
    "PRETRAINED_DIR",
    "Card",
    "ClassifierCard",
    "PretrainedError",
    "available",
    "init_from_model",
    "load",
    "load_card",
    "load_classifier",
    "load_classifier_card",
    "load_model",
    "resolve",
    "save",
    "save_classifier",
    "stored_params",
]

PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
FORMAT_VERSION = 1
PARAM_DTYPES = ("float32", "float16")  # how a release's .npz may store its parameters


class PretrainedError(ConfigError):
    """A released model that is unknown, missing, corrupted or does not match its card."""


class _CardJSON:
    """A card's JSON form: its fields, with ``config`` through its own ``to_dict`` / ``from_dict``."""

    _config_type: ClassVar[type]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["config"] = self.config.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        d = dict(d)
        d["config"] = cls._config_type.from_dict(d["config"])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Card(_CardJSON):
    """What a released model is and how well it does.

    Attributes:
      name: the name it is loaded by.
      config: the run's ``TrainConfig`` (data paths removed).
      step: training steps taken.
      sha256: of the ``.npz``.
      valid_bound: variational bound (nats) on the whole valid split, seed 0.
      slice_bound: the same on the first ``slice_size`` valid images (what the tests re-measure).
      slice_size: images in that slice.
      notes: recipe, command, machine, wall-clock: free text for people.
      param_dtype: how the ``.npz`` stores the parameters (``PARAM_DTYPES``);
        the bounds are those of the stored parameters.
    """

    name: str
    config: TrainConfig
    step: int
    sha256: str
    valid_bound: float
    slice_bound: float
    slice_size: int
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.param_dtype not in PARAM_DTYPES:
            raise ConfigError(f"param_dtype must be one of {PARAM_DTYPES}, got {self.param_dtype!r}")

    _config_type: ClassVar[type] = TrainConfig


@dataclasses.dataclass(frozen=True)
class ClassifierCard(_CardJSON):
    """What a released cluttered-MNIST classifier is and how well it does.

    Attributes:
      name: the name it is loaded by.
      config: the run's ``ClassifierRunConfig`` (data paths removed).
      step: training steps taken.
      sha256: of the ``.npz``.
      valid_error: error (%) on the whole valid split, cluttered with the run's data seed.
      test_error: data seed (as a string) -> error (%) on the 10,000 test images cluttered with it.
      notes: recipe, command, machine, wall-clock: free text for people.
    """

    name: str
    config: ClassifierRunConfig
    step: int
    sha256: str
    valid_error: float
    test_error: dict[str, float]
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    kind: str = "classifier"
    format_version: int = FORMAT_VERSION

    _config_type: ClassVar[type] = ClassifierRunConfig


def available(kind: str | None = None) -> list[str]:
    """Names of the released models present in this installation; of one kind ("draw", "classifier")."""
    if not os.path.isdir(PRETRAINED_DIR):
        return []
    names = sorted(f[: -len(".json")] for f in os.listdir(PRETRAINED_DIR) if f.endswith(".json"))
    if kind is None:
        return names

    def kind_of(name: str) -> str | None:
        try:
            with open(os.path.join(PRETRAINED_DIR, name + ".json")) as f:
                return json.load(f).get("kind", "draw")
        except (OSError, ValueError, AttributeError):
            return None  # not a card: the loaders name what is wrong with it

    return [n for n in names if kind_of(n) == kind]


def resolve(name_or_path: str) -> tuple[str, str]:
    """(card path, npz path) of a released model's name, or of a path to either of its files."""
    if os.sep in name_or_path or name_or_path.endswith((".npz", ".json")):
        stem = name_or_path.removesuffix(".npz").removesuffix(".json")
    else:
        stem = os.path.join(PRETRAINED_DIR, name_or_path)
        if not os.path.isfile(stem + ".json"):
            have = ", ".join(available()) or "none"
            raise PretrainedError(f"no released model named {name_or_path!r} (available: {have})")
    return stem + ".json", stem + ".npz"


def _read_card(name_or_path: str, kind: str) -> Any:
    card_path, _ = resolve(name_or_path)
    if not os.path.isfile(card_path):
        raise PretrainedError(f"{card_path} not found")
    try:
        with open(card_path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise PretrainedError(f"{card_path} is not a draw_jax model card: {e}") from e
    found = d.get("kind", "draw") if isinstance(d, dict) else None
    if found != kind:
        how = {"draw": "pretrained.load or --pretrained of sample and evaluate",
               "classifier": "pretrained.load_classifier or classify_cluttered --pretrained"}  # fmt: skip
        if found in how:
            raise PretrainedError(
                f"{card_path} is a {found} release, not a {kind} one; load it with {how[found]}"
            )
        raise PretrainedError(f"{card_path} is not a draw_jax model card")
    try:
        return (Card if kind == "draw" else ClassifierCard).from_dict(d)
    except (KeyError, TypeError, ConfigError) as e:
        raise PretrainedError(f"{card_path} is not a draw_jax model card: {e}") from e


def load_card(name_or_path: str) -> Card:
    """The card of a released DRAW model.

    Raises:
      PretrainedError: unknown name, missing or malformed card, or a classifier's (naming the file).
    """
    return _read_card(name_or_path, "draw")


def load_classifier_card(name_or_path: str) -> ClassifierCard:
    """The card of a released classifier (errors as ``load_card``; a DRAW model's card is refused)."""
    return _read_card(name_or_path, "classifier")


def _flat(params: train_step.Params) -> tuple[dict[str, Any], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}, treedef


def _read_params(
    name_or_path: str, sha256: str, like: train_step.Params, param_dtype: str = "float32"
) -> train_step.Params:
    """A release's parameters (stored as ``param_dtype``) as float32, checksum verified, fitted to ``like``."""
    _, npz_path = resolve(name_or_path)
    if not os.path.isfile(npz_path):
        raise PretrainedError(f"{npz_path} not found (its card is there, its parameters are not)")
    digest = file_sha256(npz_path)
    if digest != sha256:
        raise PretrainedError(
            f"{npz_path} is corrupted or truncated: SHA-256 {digest[:12]}... does not match its card's "
            f"{sha256[:12]}...; fetch the file again (git checkout / reinstall)"
        )
    want, treedef = _flat(like)
    try:
        with np.load(npz_path, allow_pickle=False) as stored:
            got = {k: stored[k] for k in stored.files}
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise PretrainedError(f"{npz_path} is not a readable .npz: {e}") from e
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise PretrainedError(
            f"{npz_path} does not fit its card's model: missing {missing}, unexpected {extra}"
        )
    leaves = []
    for key, ref in want.items():
        if got[key].shape != ref.shape or got[key].dtype != np.dtype(param_dtype):
            raise PretrainedError(
                f"{npz_path}: parameter {key} is {got[key].dtype}{list(got[key].shape)}, "
                f"its card says {param_dtype}{list(ref.shape)}"
            )
        leaves.append(jax.numpy.asarray(got[key], dtype=np.float32))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def stored_params(params: train_step.Params, param_dtype: str) -> train_step.Params:
    """``params`` as a release stored in ``param_dtype`` gives them back: rounded to it, as float32.

    What to measure before releasing in float16 (``tools.export_pretrained`` does).

    Raises:
      PretrainedError: an unknown dtype, or a parameter that does not fit in it (naming the parameter).
    """
    if param_dtype not in PARAM_DTYPES:
        raise PretrainedError(f"param_dtype must be one of {PARAM_DTYPES}, got {param_dtype!r}")
    flat, treedef = _flat(params)
    leaves = []
    for key, value in flat.items():
        value = np.asarray(jax.device_get(value), dtype=np.float32)
        with np.errstate(over="ignore"):
            rounded = value.astype(param_dtype)
        if np.any(np.isfinite(value) & ~np.isfinite(rounded)):
            raise PretrainedError(
                f"parameter {key} does not fit in {param_dtype} (largest |value| {np.max(np.abs(value)):.4g}); "
                "release it in float32"
            )
        leaves.append(jax.numpy.asarray(rounded, dtype=np.float32))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _write_params(params: train_step.Params, npz_path: str, param_dtype: str = "float32") -> str:
    """Writes the parameters to ``npz_path`` in ``param_dtype`` (atomically); returns its SHA-256."""
    os.makedirs(os.path.dirname(os.path.abspath(npz_path)), exist_ok=True)
    flat, _ = _flat(stored_params(params, param_dtype))
    arrays = {k: np.asarray(jax.device_get(v)).astype(param_dtype) for k, v in flat.items()}
    tmp = npz_path + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, npz_path)
    return file_sha256(npz_path)


def _write_card(card: Any, card_path: str) -> None:
    with open(card_path + ".tmp", "w") as f:
        json.dump(card.to_dict(), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(card_path + ".tmp", card_path)


def _refuse_overwrite(path_stem: str, overwrite: bool) -> tuple[str, str]:
    """(card path, npz path) of ``path_stem``, refusing existing files unless ``overwrite``."""
    card_path, npz_path = path_stem + ".json", path_stem + ".npz"
    for path in (card_path, npz_path):
        if os.path.exists(path) and not overwrite:
            raise PretrainedError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    return card_path, npz_path


def load(name_or_path: str, step: int | None = None) -> Trained:
    """A trained model's config, graph and parameters: a released one, or a training run's.

    The one way to load a trained DRAW model, whatever it is: a released
    model (checksum verified) or a training workdir (its ``config.json`` and
    the checkpoint at ``step``, every byte verified; ``workdir.load_trained``).

    Args:
      name_or_path: a name from ``available()``, the path of a ``.npz`` /
        ``.json`` pair written by ``save``, or a training workdir.
      step: a workdir's checkpoint (default: the latest); a released model has one.

    Raises:
      PretrainedError: unknown name, missing file, checksum mismatch (corrupted
        or truncated), or parameters that do not fit the card's model; each
        naming the file at fault.
      ConfigError, CheckpointError, FileNotFoundError: a workdir's, as
        ``workdir.load_trained`` raises them.
    """
    if os.path.isdir(name_or_path):
        return load_trained(name_or_path, step)
    if step is not None:
        raise PretrainedError(
            f"step={step} picks a checkpoint of a workdir; released model {name_or_path} has one"
        )
    card = load_card(name_or_path)
    graphdef, like = train_step.init_model(card.config.model, seed=0)
    params = _read_params(name_or_path, card.sha256, like, card.param_dtype)
    return Trained(config=card.config, graphdef=graphdef, params=params, step=card.step)


def load_model(name_or_path: str, step: int | None = None) -> tuple[DRAW, TrainConfig]:
    """A trained model (released, or a workdir's, as ``load`` takes it) as a DRAW module ready
    to call and sample, and the config it was trained with.

    ``model(x, key)`` encodes and reconstructs images x [b, h, w, c] in [0, 1]
    (``draw_bound(model(x, key), x)`` is their bound); ``model.generate(key, b)``
    draws b samples from the prior. Same checks and errors as ``load``.
    """
    trained = load(name_or_path, step)
    return trained.model, trained.config


def save(
    trained: Trained,
    path_stem: str,
    *,
    name: str,
    valid_bound: float,
    slice_bound: float,
    slice_size: int,
    notes: dict[str, Any] | None = None,
    overwrite: bool = False,
    param_dtype: str = "float32",
) -> Card:
    """Writes ``<path_stem>.npz`` (parameters in ``param_dtype``) and ``<path_stem>.json`` (its card).

    Data paths are dropped from the config (they were the trainer's machine's).
    The bounds given are recorded as the stored parameters' (measure them on
    ``stored_params(params, param_dtype)``).

    Raises:
      PretrainedError: the files exist and ``overwrite`` is False; an unknown
        ``param_dtype`` or a parameter that does not fit in it.
    """
    card_path, npz_path = _refuse_overwrite(path_stem, overwrite)
    sha256 = _write_params(trained.params, npz_path, param_dtype)
    config = trained.config
    config = dataclasses.replace(
        config, data=dataclasses.replace(config.data, data_dir=None, tfds_data_dir=None)
    )
    card = Card(
        name=name,
        config=config,
        step=trained.step,
        sha256=sha256,
        valid_bound=float(valid_bound),
        slice_bound=float(slice_bound),
        slice_size=int(slice_size),
        notes=dict(notes or {}),
        param_dtype=param_dtype,
    )
    _write_card(card, card_path)
    return card


def load_classifier(name_or_path: str) -> tuple[Any, train_step.Params, ClassifierCard]:
    """(graphdef, params, card) of a released classifier, checksum verified.

    ``nnx.merge(graphdef, params)(images)`` is an ``AttentionClassifier``'s output.

    Raises:
      PretrainedError: as ``load`` (unknown, missing, corrupted, not fitting), or a DRAW release.
    """
    card = load_classifier_card(name_or_path)
    graphdef, like = init_classifier(card.config)
    return graphdef, _read_params(name_or_path, card.sha256, like), card


def save_classifier(
    config: ClassifierRunConfig,
    params: train_step.Params,
    step: int,
    path_stem: str,
    *,
    name: str,
    valid_error: float,
    test_error: Mapping[int, float],
    notes: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> ClassifierCard:
    """Writes a classifier's ``<path_stem>.npz`` and ``<path_stem>.json``; ``test_error``: data seed -> %.

    Raises:
      PretrainedError: the files exist and ``overwrite`` is False.
    """
    card_path, npz_path = _refuse_overwrite(path_stem, overwrite)
    sha256 = _write_params(params, npz_path)
    card = ClassifierCard(
        name=name,
        config=dataclasses.replace(config, data_dir=None, tfds_data_dir=None),
        step=int(step),
        sha256=sha256,
        valid_error=float(valid_error),
        test_error={str(k): float(v) for k, v in test_error.items()},
        notes=dict(notes or {}),
    )
    _write_card(card, card_path)
    return card


def init_from_model(name: str, model: DrawConfig, given: Mapping[str, Any]) -> DrawConfig:
    """The model config of ``--init_from=name``: the released model's, with ``model``'s compute dtype.

    ``model`` is the config the flags built (its image shape is the data set's);
    ``given`` the settings typed, which must agree with the released model.

    Raises:
      PretrainedError: unknown name or unreadable card. ConfigError: a model
        setting given differs from the released model's, or the image shape does.
    """
    released = load_card(name).config.model
    clashes = [
        f"--{k}={given[k]!r} (it has {getattr(released, k)!r})"
        for k in sorted(given)
        if hasattr(released, k) and k not in _NOT_PARAMETERS and given[k] != getattr(released, k)
    ]
    if clashes:
        raise ConfigError(f"--init_from={name} is a different model: {', '.join(clashes)}")
    if released.image_shape != model.image_shape:
        raise ConfigError(
            f"--init_from={name} is a model of {released.image_shape} images; the data set has {model.image_shape}"
        )
    return dataclasses.replace(released, compute_dtype=model.compute_dtype)


# Model settings that do not shape the parameters (an --init_from model takes any).
_NOT_PARAMETERS = ("height", "width", "channels", "compute_dtype")
