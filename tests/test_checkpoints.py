"""Checkpoints verify every byte: damage is found, named, and a resumed run falls back past it."""

from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from draw_jax import checkpoint
from draw_jax.checkpoint import Checkpointer, CheckpointError
from draw_jax.train_loop import train_and_evaluate
from draw_jax.workdir import load_trained
from tests.test_train import final_params, run_cli, tiny_config


def data_files(step_dir: str) -> list[str]:
    """The array files of a checkpoint, largest first (where a flipped byte changes numbers)."""
    files = [p for p in glob.glob(f"{step_dir}/**/*", recursive=True) if os.path.isfile(p)]
    files = [p for p in files if os.path.basename(p) != checkpoint.CHECKSUMS_FILE]
    return sorted(files, key=os.path.getsize, reverse=True)


def flip_bytes(path: str, count: int = 64) -> None:
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        middle = len(data) // 2
        for i in range(middle, min(middle + count, len(data))):
            data[i] ^= 0xFF
        f.seek(0)
        f.write(data)


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


DAMAGE = {"flipped bytes": flip_bytes, "truncated file": truncate, "missing file": os.remove}


@pytest.fixture
def saved(tmp_path):
    """A workdir with checkpoints 1 and 2 of a small pytree, and the trees saved."""
    trees = {s: {"w": jnp.arange(4096.0) * s, "b": jnp.full((64,), float(s))} for s in (1, 2)}
    with Checkpointer(str(tmp_path), keep=3) as ckpt:
        for s, tree in trees.items():
            ckpt.save(s, tree)
    return str(tmp_path), trees


def test_each_save_records_every_file_and_an_intact_checkpoint_verifies(saved):
    workdir, trees = saved
    step_dir = os.path.join(workdir, "checkpoints", "2")
    with open(os.path.join(step_dir, checkpoint.CHECKSUMS_FILE)) as f:
        record = json.load(f)["files"]
    assert sorted(os.path.join(step_dir, r) for r in record) == sorted(data_files(step_dir))
    assert checkpoint.verify(step_dir)
    with Checkpointer(workdir, read_only=True) as ckpt:
        restored = ckpt.restore(jax.tree.map(jnp.zeros_like, trees[2]))
    np.testing.assert_array_equal(restored["w"], trees[2]["w"])


@pytest.mark.parametrize("damage", DAMAGE)
def test_damage_is_one_error_naming_the_checkpoint_and_the_file(saved, damage):
    workdir, trees = saved
    step_dir = os.path.join(workdir, "checkpoints", "2")
    victim = data_files(step_dir)[0]
    DAMAGE[damage](victim)
    with Checkpointer(workdir, read_only=True) as ckpt, pytest.raises(CheckpointError) as err:
        ckpt.restore(jax.tree.map(jnp.zeros_like, trees[2]))
    assert step_dir in str(err.value) and victim in str(err.value)
    assert "\n" not in str(err.value)


def test_a_checkpoint_without_a_record_restores_with_a_warning(saved, caplog):
    workdir, trees = saved
    step_dir = os.path.join(workdir, "checkpoints", "2")
    os.remove(os.path.join(step_dir, checkpoint.CHECKSUMS_FILE))  # as written before records existed
    assert not checkpoint.verify(step_dir)
    with Checkpointer(workdir, read_only=True) as ckpt:
        restored = ckpt.restore(jax.tree.map(jnp.zeros_like, trees[2]))
    np.testing.assert_array_equal(restored["w"], trees[2]["w"])
    assert any("cannot be verified" in r.getMessage() for r in caplog.records)


def test_a_resumed_run_falls_back_past_a_damaged_checkpoint_and_keeps_it(small_data, tmp_path):
    cfg = tiny_config(small_data, num_steps=12, checkpoint_every=4, keep_checkpoints=2, eval_every=0)
    clean, damaged = str(tmp_path / "clean"), str(tmp_path / "damaged")
    train_and_evaluate(cfg, clean)
    train_and_evaluate(cfg, damaged)
    flip_bytes(data_files(os.path.join(damaged, "checkpoints", "12"))[0])

    # What evaluate and sample see: the damaged checkpoint refused by name.
    with pytest.raises(CheckpointError, match=r"checkpoints/12 is damaged"):
        load_trained(damaged)
    for command in (["experiments.evaluate"], ["experiments.sample", f"--output_dir={tmp_path / 'out'}"]):
        proc = run_cli(*command, f"--workdir={damaged}", ok=False)
        message = " ".join(proc.stderr.split())  # the message is wrapped at 100 columns
        assert proc.returncode == 2 and "checkpoints/12 is damaged" in message, command
        assert "Traceback" not in proc.stderr

    # The same command resumes from step 8, sets step 12 aside, and redoes 8 -> 12 exactly.
    train_and_evaluate(cfg, damaged)
    kept = glob.glob(os.path.join(damaged, checkpoint.SET_ASIDE_DIR, "12-*"))
    assert len(kept) == 1 and data_files(kept[0])
    redone = final_params(damaged, cfg)
    assert int(redone.step) == 12
    jax.tree.map(np.testing.assert_array_equal, redone.params, final_params(clean, cfg).params)


def test_a_run_whose_every_checkpoint_is_damaged_stops_and_keeps_them_all(small_data, tmp_path):
    cfg = tiny_config(small_data, num_steps=8, checkpoint_every=4, keep_checkpoints=2, eval_every=0)
    workdir = str(tmp_path / "run")
    train_and_evaluate(cfg, workdir)
    for step in (4, 8):
        os.remove(data_files(os.path.join(workdir, "checkpoints", str(step)))[0])
    with pytest.raises(CheckpointError, match="no checkpoint of the run") as err:
        train_and_evaluate(cfg, workdir)
    assert "4 (moved to" in str(err.value) and "8 (moved to" in str(err.value)
    assert len(glob.glob(os.path.join(workdir, checkpoint.SET_ASIDE_DIR, "*"))) == 2


def saved_steps(workdir: str) -> list[int]:
    return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "*")))


def test_checkpoints_by_time_as_well_as_by_steps(small_data, tmp_path):
    # Steps alone (every 0 = at the end): one checkpoint. With a clock that is
    # always due (a millisecond), one after every call of the 2 steps between log lines.
    common = dict(num_steps=6, log_every=2, checkpoint_every=0, keep_checkpoints=10, eval_every=0)
    by_steps, by_time = str(tmp_path / "steps"), str(tmp_path / "time")
    train_and_evaluate(tiny_config(small_data, checkpoint_minutes=0.0, **common), by_steps)
    train_and_evaluate(tiny_config(small_data, checkpoint_minutes=1e-5, **common), by_time)
    assert saved_steps(by_steps) == [6]
    assert saved_steps(by_time) == [2, 4, 6]
