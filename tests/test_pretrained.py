"""Released models: the shipped ones still score what their cards say; files are checked."""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest

from draw_jax import data, pretrained, train_step
from draw_jax.config import ConfigError
from draw_jax.evaluation import SplitEvaluator
from draw_jax.model import DRAW
from draw_jax.settings import build_config
from draw_jax.train_loop import train_and_evaluate
from draw_jax.workdir import Trained, load_trained
from tests.test_train import run_cli, tiny_config

# A re-measured bound may move by float rounding across machines and jax
# versions (the seed fixes every draw); more than this means the loading or the
# model's math changed.
MARGIN_NATS = 0.3
SHIPPED = ("binarized_mnist_attention", "binarized_mnist_no_attention", "mnist_two_digits_attention")
# The folder of ../shared/data each released model's data set is built from.
DATA_FOLDER = {"binarized_mnist": "binarized_mnist", "mnist_two_digits": "mnist"}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_scores_its_recorded_bound(name, shared_data):
    if name not in pretrained.available():
        pytest.skip(f"{name} is not released in this checkout")
    model = pretrained.load(name)
    card = pretrained.load_card(name)
    settings = card.config.data
    assert settings.dataset in DATA_FOLDER and card.config.model.T == 64
    valid = data.load_split(
        settings.dataset, "valid", os.path.join(shared_data, DATA_FOLDER[settings.dataset])
    )
    evaluator = SplitEvaluator(
        model.graphdef, binary=valid.binary, binarize=settings.binarize, batch_size=100
    )
    got = evaluator(model.params, valid.images[: card.slice_size], seed=0)
    assert abs(got.bound - card.slice_bound) < MARGIN_NATS, (got.bound, card.slice_bound)
    assert abs(card.slice_bound - card.valid_bound) < 5  # the slice is typical of valid


def _released_tiny(folder) -> tuple[Trained, str]:
    config = build_config("tiny").resolve(1000)
    graphdef, params = train_step.init_model(config.model, seed=3)
    trained = Trained(config=config, graphdef=graphdef, params=params, step=7)
    stem = os.path.join(folder, "tiny_model")
    pretrained.save(trained, stem, name="tiny_model", valid_bound=200.0, slice_bound=201.0, slice_size=10)
    return trained, stem


def test_save_then_load_gives_the_same_parameters_and_refuses_to_overwrite(tmp_path):
    trained, stem = _released_tiny(tmp_path)
    loaded = pretrained.load(stem + ".npz")
    assert loaded.step == 7 and loaded.config.model == trained.config.model
    assert loaded.config.data.data_dir is None
    for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(loaded.params), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(pretrained.PretrainedError, match="exists"):
        pretrained.save(trained, stem, name="x", valid_bound=0, slice_bound=0, slice_size=1)


@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate"])
def test_a_damaged_file_is_refused_naming_it(tmp_path, damage):
    _, stem = _released_tiny(tmp_path)
    path = stem + ".npz"
    raw = bytearray(open(path, "rb").read())
    if damage == "flip_a_byte":
        raw[len(raw) // 2] ^= 0xFF
    else:
        raw = raw[: len(raw) // 2]
    open(path, "wb").write(bytes(raw))
    with pytest.raises(pretrained.PretrainedError, match="corrupted or truncated") as e:
        pretrained.load(path)
    assert path in str(e.value)


def test_the_names_offered_for_each_kind_are_the_ones_its_loader_takes():
    draw, classifiers = pretrained.available("draw"), pretrained.available("classifier")
    assert sorted(draw + classifiers) == pretrained.available() and not set(draw) & set(classifiers)
    for name in draw:
        pretrained.load_card(name)
    for name in classifiers:
        pretrained.load_classifier_card(name)
    assert "binarized_mnist_attention" in draw and "cluttered_mnist_8_glimpses" in classifiers


def test_unknown_name_and_missing_parameters(tmp_path):
    with pytest.raises(pretrained.PretrainedError, match="no released model named 'nope'"):
        pretrained.load("nope")
    _, stem = _released_tiny(tmp_path)
    os.remove(stem + ".npz")
    with pytest.raises(pretrained.PretrainedError, match="not found"):
        pretrained.load(stem)


def test_init_from_takes_the_released_model_and_its_parameters(small_data, tmp_path):
    trained, stem = _released_tiny(tmp_path)
    # The model settings come from the release; a clashing one is refused by name.
    assert build_config(init_from=stem + ".npz").model == trained.config.model
    with pytest.raises(ConfigError, match="--T=5"):
        build_config(init_from=stem + ".npz", T=5)
    # With a vanishing learning rate, training from it keeps its parameters.
    config = tiny_config(small_data, init_from=stem + ".npz", learning_rate=1e-12, num_steps=2, seed=11)
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir)
    after = load_trained(workdir).params
    for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(after), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-9)
    # One loader for both: a workdir through pretrained.load is the workdir's own model.
    model, config = pretrained.load_model(workdir)
    assert config == load_trained(workdir).config and isinstance(model, DRAW)
    for a, b in zip(
        jax.tree.leaves(pretrained.load(workdir, step=2).params), jax.tree.leaves(after), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(pretrained.PretrainedError, match="picks a checkpoint of a workdir"):
        pretrained.load(stem + ".npz", step=2)


def test_sample_from_a_release_without_data_writes_the_samples(tmp_path):
    _, stem = _released_tiny(tmp_path)
    shutil.copy(stem + ".npz", tmp_path / "copy.npz")  # any path works, not only the package's
    shutil.copy(stem + ".json", tmp_path / "copy.json")
    out = tmp_path / "pics"
    proc = run_cli(
        "experiments.sample",
        f"--pretrained={tmp_path / 'copy.npz'}",
        f"--output_dir={out}",
        "--num_samples=4",
        "--num_animated=2",
        "--tfds_data_dir=/nonexistent-tfds",
        ok=False,
    )
    assert os.path.isfile(out / "samples.png") and os.path.isfile(out / "generation.gif")
    assert proc.returncode == 0 and "skipped reconstructions" in proc.stderr, proc.stderr[-2000:]
    # Optional data is never fetched: no TFDS download is started, and the reason says what to pass.
    assert "not prepared" in proc.stderr and "--data_dir" in proc.stderr
    assert "Downloading and preparing" not in proc.stdout + proc.stderr
    both = run_cli(
        "experiments.sample", f"--pretrained={stem}", "--workdir=x", f"--output_dir={out}2", ok=False
    )
    assert both.returncode == 2 and "exactly one of --workdir" in both.stderr


def test_the_gpu_session_script_trains_and_releases_a_model(shared_data, tmp_path):
    # tools/gpu_session.sh runs once, on a GPU machine with 15 minutes in all:
    # its train and release stages, here on the CPU at a tiny size, must leave a
    # loadable released model whose card holds the bound the log reports.
    import subprocess
    import sys

    out, root = tmp_path / "out", os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = os.environ | {
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],  # python3 = this one
        "OUT": str(out),
        "RUN": str(tmp_path / "run"),
        "STAGES": "train release",  # no benchmark: the step count falls back to its guess (100 steps)
        "TRAIN_SECONDS": "1",
        "TRAIN_BATCH": "20",
        "TRAIN_FLAGS": "--T=2 --enc_size=8 --dec_size=8 --z_size=2",
        "DATA": os.path.join(shared_data, "binarized_mnist"),
    }
    proc = subprocess.run(
        ["bash", "tools/gpu_session.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "train: 100 steps at batch 20" in summary and "train: exit 0" in summary, summary
    card = pretrained.load_card(str(out / "binarized_mnist_attention_gpu.json"))
    trained = pretrained.load(str(out / "binarized_mnist_attention_gpu.json"))
    assert trained.step == 100 and trained.config.model.T == 2
    logged = float(summary.split("step 100  valid bound ")[1].split()[0])
    assert np.isfinite(card.valid_bound) and abs(card.valid_bound - logged) < 1.0  # another eval seed only
    assert "done" in summary.splitlines()[-1]


def test_a_float16_release_is_half_the_size_and_loads_as_the_rounded_parameters(tmp_path):
    trained, stem32 = _released_tiny(tmp_path)
    stem16 = str(tmp_path / "tiny_float16")
    card = pretrained.save(
        trained, stem16, name="t", valid_bound=0, slice_bound=0, slice_size=1, param_dtype="float16"
    )
    assert card.param_dtype == "float16" and pretrained.load_card(stem16).param_dtype == "float16"
    assert pretrained.load_card(stem32).param_dtype == "float32"
    with np.load(stem16 + ".npz") as stored:
        assert {stored[k].dtype for k in stored.files} == {np.dtype(np.float16)}
    assert os.path.getsize(stem16 + ".npz") < 0.6 * os.path.getsize(stem32 + ".npz")
    loaded = pretrained.load(stem16).params
    rounded = pretrained.stored_params(trained.params, "float16")
    for a, r, b in zip(
        jax.tree.leaves(trained.params), jax.tree.leaves(rounded), jax.tree.leaves(loaded), strict=True
    ):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(b, r)  # what export measures is what users load
        np.testing.assert_allclose(b, a, rtol=2.0**-11, atol=2.0**-24)  # float16's half an ulp
    # A card that disagrees with its file about the dtype is refused, naming the file.
    path = stem16 + ".json"
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace('"param_dtype": "float16"', '"param_dtype": "float32"'))
    with pytest.raises(pretrained.PretrainedError, match="its card says float32") as e:
        pretrained.load(stem16)
    assert stem16 + ".npz" in str(e.value)


def test_a_parameter_beyond_float16_is_refused_by_name(tmp_path):
    trained, _ = _released_tiny(tmp_path)
    flat, treedef = jax.tree_util.tree_flatten_with_path(trained.params)
    leaves = [leaf for _, leaf in flat]
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(1e5)  # float16's largest is 65504
    big = jax.tree_util.tree_unflatten(treedef, leaves)
    with pytest.raises(pretrained.PretrainedError, match="does not fit in float16") as e:
        pretrained.save(
            dataclasses.replace(trained, params=big), str(tmp_path / "big"), name="big",
            valid_bound=0, slice_bound=0, slice_size=1, param_dtype="float16",
        )  # fmt: skip
    assert jax.tree_util.keystr(flat[0][0]) in str(e.value)
    assert not os.path.exists(tmp_path / "big.json")
    with pytest.raises(pretrained.PretrainedError, match="param_dtype must be one of"):
        pretrained.save(trained, str(tmp_path / "b"), name="b", valid_bound=0, slice_bound=0,
                        slice_size=1, param_dtype="bfloat16")  # fmt: skip


def test_export_in_float16_gives_the_stored_parameters_bound_and_float32s_beside_it(small_data, tmp_path):
    workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
    train_and_evaluate(tiny_config(small_data, num_steps=8, checkpoint_every=8), workdir)
    export = ("tools.export_pretrained", f"--workdir={workdir}", "--name=tiny16", f"--output_dir={out}",
              f"--data_dir={small_data}", "--slice_size=50", "--param_dtype=float16")  # fmt: skip
    # Rounding moves the bound by something; where that is more than allowed, nothing is written.
    refused = run_cli(*export, "--max_bound_change=0", ok=False)
    assert refused.returncode != 0 and "--max_bound_change=0.0" in refused.stderr, refused.stderr[-2000:]
    assert "release it in float32" in refused.stderr and not os.path.exists(out)
    run_cli(*export, "--max_bound_change=1")
    card = pretrained.load_card(os.path.join(out, "tiny16"))
    full, _, stored = card.notes["valid_bound_float32"].partition(" (stored in float16: ")
    assert card.param_dtype == "float16" and f"{card.valid_bound:.4f}" == stored.rstrip(")")
    assert 0 < abs(card.valid_bound - float(full)) <= 1
    # The card's bound is the released parameters': re-measured from the file, it is the same figure.
    released = pretrained.load(os.path.join(out, "tiny16"))
    valid = data.load_split("binarized_mnist", "valid", small_data)
    evaluator = SplitEvaluator(released.graphdef, binary=True, binarize="none", batch_size=100)
    assert abs(evaluator(released.params, valid.images, seed=0).bound - card.valid_bound) < 1e-4
