"""Configuration is declared once: flags, presets, derivations and checks all come from it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from draw_jax import config as config_lib
from draw_jax import settings as settings_lib
from draw_jax.config import ConfigError, TrainConfig
from draw_jax.presets import PRESETS
from draw_jax.settings import build_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_setting_is_a_train_flag_with_its_declared_default_and_help():
    # One absl flag per dataclass field, same name, default and help: the
    # dataclasses are the only place a setting is written.
    from absl import flags

    import experiments.train  # noqa: F401 - defines the flags

    fields = {
        f.name: f
        for part in (
            config_lib.DrawConfig,
            config_lib.OptimConfig,
            config_lib.DataConfig,
            config_lib.RunConfig,
        )
        for f in dataclasses.fields(part)
        if f.metadata["flag"]
    }
    assert len(fields) == len(settings_lib.settings()) > 30
    for name, field in fields.items():
        assert flags.FLAGS[name].default == field.default, name
        assert flags.FLAGS[name].help.endswith(field.metadata["help"]), name  # enums prefix their choices
    assert {"attention", "preset", "workdir"} <= set(flags.FLAGS)
    assert "height" not in flags.FLAGS  # derived from the data set, not typed


def test_train_help_lists_every_flag_with_default():
    out = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for s in settings_lib.settings():
        assert f"--{s.name}" in out or f"--[no]{s.name}" in out, s.name
    assert "(default: '64')" in out and "--preset" in out and "--[no]attention" in out


def test_presets_apply_under_explicit_settings():
    cfg = build_config("small_attention", z_size=7)
    assert cfg.model.T == PRESETS["small_attention"]["T"] and cfg.model.z_size == 7
    no_att = build_config("paper_no_attention")
    assert not no_att.model.read_attention and not no_att.model.write_attention
    mixed = build_config(attention=False, write_attention=True)  # the shorthand, then the override
    assert not mixed.model.read_attention and mixed.model.write_attention
    assert build_config() == build_config("paper_attention") == TrainConfig()
    for name in PRESETS:
        build_config(name)  # every preset builds


def test_derivations_happen_in_the_config_not_the_command():
    cfg = build_config("tiny", num_epochs=3, batch_size=64, lr_schedule="cosine")
    resolved = cfg.resolve(num_train_images=1000)
    assert resolved.run.num_steps == 3 * (1000 // 64)
    assert resolved.optim.decay_steps == resolved.run.num_steps
    previous = cfg.resolve(num_train_images=2000)
    again = build_config("tiny", num_epochs=5, batch_size=64, lr_schedule="cosine").resolve(1000, previous)
    assert again.optim.decay_steps == previous.optim.decay_steps  # a resumed run keeps its schedule
    with pytest.raises(ConfigError, match=r"--batch_size=64 is larger than the training split \(10 images\)"):
        cfg.resolve(num_train_images=10)
    assert build_config(dataset="mnist").data.binarize == "dynamic"
    assert build_config(dataset="mnist").data.eval_split == "valid"
    assert build_config(eval_split="validation").data.eval_split == "valid"


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"T": 0}, "--T must be a positive integer"),
        ({"read_n": 0}, "--read_n (glimpse size) must be a positive integer"),
        ({"compute_dtype": "float16"}, "--compute_dtype must be one of float32, bfloat16"),
        ({"adam_b1": 1.0}, "--adam_b1 must be in [0, 1)"),
        ({"ema_decay": 1.0}, "--ema_decay must be in [0, 1) (0 = no average)"),
        ({"clip_mode": "per_layer"}, "--clip_mode must be one of global, per_variable"),
        ({"dataset": "cifar"}, "--dataset must be one of binarized_mnist, mnist"),
        ({"binarize": "dynamic"}, "does not apply to binarized_mnist"),
        ({"likelihood": "discretized_logistic"}, "--likelihood=discretized_logistic models 8-bit pixel"),
        ({"dataset": "mnist", "likelihood": "discretized_logistic"}, "with --binarize=dynamic gives binary"),
        ({"likelihood": "gaussian"}, "--likelihood must be one of bernoulli, discretized_logistic"),
        ({"eval_split": "train"}, "--eval_split must be a held-out split"),
        ({"steps_per_call": 0}, "--steps_per_call must be a positive integer"),
        ({"num_epochs": 2, "num_steps": 10}, "give one run length"),
        ({"no_such": 1}, "unknown setting(s) no_such"),
        ({"data_dir": "/nonexistent"}, "--data_dir=/nonexistent is not a directory"),
    ],
)
def test_each_bad_setting_raises_one_config_error_naming_its_flag(settings, message):
    with pytest.raises(ConfigError) as e:
        build_config(**settings)
    assert message in str(e.value)


def test_config_json_round_trips():
    cfg = build_config("small_no_attention", learning_rate=3e-3).resolve(500)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="does not match this version"):
        TrainConfig.from_dict({"model": {"T": 3}})


def test_steps_per_call_divides_every_interval_and_fits_an_epoch():
    run = build_config(steps_per_call=10, log_every=25, checkpoint_every=100, eval_every=0).run
    assert run.steps_per_call_for(steps_per_epoch=500) == 5
    assert run.steps_per_call_for(steps_per_epoch=4) == 1


def test_a_version_0_1_config_json_still_loads():
    cfg = build_config(compute_dtype="bfloat16").resolve(500)
    old = cfg.to_dict()
    old["model"]["dtype"] = old["model"].pop("compute_dtype")  # 0.1's name for it
    del old["run"]["num_epochs"]  # 0.1 had no such setting
    assert TrainConfig.from_dict(old) == cfg


def test_optimiser_settings_newer_than_a_config_json_read_as_what_that_run_did():
    # A run written before KL warm-up, the parameter average and the clipping
    # mode existed had none of them (and clipped the global norm), whatever
    # today's defaults are: reading it with the defaults would resume it with a
    # different objective or a checkpoint it never had.
    cfg = build_config(kl_warmup_steps=0, ema_decay=0.0, clip_mode="global").resolve(500)
    old = cfg.to_dict()
    del old["optim"]["kl_warmup_steps"], old["optim"]["ema_decay"], old["optim"]["clip_mode"]
    assert TrainConfig.from_dict(old) == cfg
    newer = build_config(kl_warmup_steps=7, ema_decay=0.5, clip_mode="per_variable").resolve(500)
    assert TrainConfig.from_dict(newer.to_dict()) == newer


def test_presets_hold_the_papers_table_3():
    # Gregor et al. 2015, Table 3 ("Experimental Hyper-Parameters"): MNIST model
    # T=64, LSTM #h 256, #z 100, read 2x2, write 5x5 (with attention).
    paper = build_config("paper_attention").model
    assert (paper.T, paper.enc_size, paper.dec_size, paper.z_size, paper.read_n, paper.write_n) == (
        64, 256, 256, 100, 2, 5,
    )  # fmt: skip
    # Two-digit MNIST (no row in Table 3): the MNIST row on 60x60 with a 5x5 read.
    two = build_config("paper_two_digits")
    assert two.model.image_shape == (60, 60, 1) and two.data.dataset == "mnist_two_digits"
    assert (two.model.T, two.model.enc_size, two.model.z_size, two.model.read_n, two.model.write_n) == (
        64, 256, 100, 5, 5,
    )  # fmt: skip
    # Table 3's colour rows. SVHN: T=32, 800, z 100, read 12x12, write 12x12.
    # CIFAR: T=64, 400, z 200, read 5x5, write 5x5. Both model 8-bit values.
    for name, dataset, row in (
        ("paper_svhn", "svhn_cropped", (32, 800, 800, 100, 12, 12)),
        ("paper_cifar10", "cifar10", (64, 400, 400, 200, 5, 5)),
    ):
        cfg = build_config(name)
        m = cfg.model
        assert (m.T, m.enc_size, m.dec_size, m.z_size, m.read_n, m.write_n) == row
        assert cfg.data.dataset == dataset and m.image_shape == (32, 32, 3)
        assert m.likelihood == "discretized_logistic" and cfg.data.binarize == "none"
        assert cfg.bound_is_likelihood
    # Binarised colour targets default to the Bernoulli; grey targets under it are no likelihood.
    assert build_config("paper_cifar10", binarize="dynamic").model.likelihood == "bernoulli"
    assert not build_config("paper_cifar10", likelihood="bernoulli").bound_is_likelihood


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_compiles_and_takes_a_finite_step(name):
    import jax
    import numpy as np

    from draw_jax import train_step

    cfg = build_config(name).resolve(1000)
    graphdef, params = train_step.init_model(cfg.model, seed=0)
    optimizer = train_step.make_optimizer(cfg.optim)
    state = train_step.create_train_state(params, optimizer)
    step = train_step.make_train_step(graphdef, optimizer, binary=False, binarize=cfg.data.binarize)
    images = np.random.default_rng(0).integers(0, 256, (2, *cfg.model.image_shape), dtype=np.uint8)
    state, metrics = step(state, images, jax.random.key(0))
    assert int(state.step) == 1 and np.isfinite(float(metrics["bound"])) and float(metrics["bound"]) > 0


@pytest.mark.parametrize("command", ["train", "evaluate", "sample", "benchmark", "classify_cluttered"])
def test_help_exits_zero_with_h_as_well(command):
    for asked in (["-h"], ["--help"]) if command == "train" else (["-h"],):
        proc = subprocess.run([sys.executable, "-m", f"experiments.{command}", *asked], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, (asked, proc.stderr[-2000:])
        assert "--workdir" in proc.stdout or "--configs" in proc.stdout  # the flags are listed
    # A flag that does not exist is still an error.
    proc = subprocess.run([sys.executable, "-m", f"experiments.{command}", "--no_such_flag"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "no_such_flag" in proc.stderr
