"""A small wrapper over orbax's CheckpointManager for ``TrainState``, with verified restores.

Orbax writes each checkpoint into a temporary folder and renames it when the
write is complete, so an interrupted save never leaves a folder that looks
like a valid checkpoint; ``latest_step`` only sees finished ones.

Orbax and TensorStore keep no checksum of the bytes they write (a flipped
byte restores silently as another number), so each save ends with a record,
``<step>/checksums.json``: the SHA-256 and size of every file of the
checkpoint, written once orbax has finalised it. ``restore`` verifies every
byte against it first; a mismatch, a truncated, missing or unreadable file,
or any error of orbax's restore is one ``CheckpointError`` naming the
checkpoint and the file. A checkpoint from before the record existed restores
with a warning that it cannot be verified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from draw_jax import interrupts

__all__ = ["CHECKSUMS_FILE", "CheckpointError", "Checkpointer", "file_sha256", "verify"]

CHECKSUMS_FILE = "checksums.json"
# Where a run moves a checkpoint that failed to restore (never deleted), beside checkpoints/.
SET_ASIDE_DIR = "unreadable_checkpoints"


class _MissingFields(ValueError):
    """The checkpoint lacks a field the state needs (another kind of run, or an older one)."""


class CheckpointError(RuntimeError):
    """A checkpoint that fails verification or cannot be restored; the message names it and the file."""


def file_sha256(path: str) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(directory: str) -> list[str]:
    """Every file under ``directory`` (relative paths, sorted), the record itself excluded."""
    out = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != CHECKSUMS_FILE:
                out.append(rel)
    return sorted(out)


def write_checksums(directory: str) -> None:
    """Writes ``<directory>/checksums.json``: SHA-256 and size of each file of a finished checkpoint."""
    record = {rel: {"sha256": file_sha256(os.path.join(directory, rel)),
                    "bytes": os.path.getsize(os.path.join(directory, rel))} for rel in _files(directory)}  # fmt: skip
    tmp = os.path.join(directory, CHECKSUMS_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": record}, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(directory, CHECKSUMS_FILE))


def verify(directory: str) -> bool:
    """Checks every file of the checkpoint in ``directory`` against its record.

    Returns:
      True if verified; False if the checkpoint has no record (written before
      records existed: it cannot be verified).

    Raises:
      CheckpointError: a file is missing, of another size, or has other bytes
        (naming it), or the record is unreadable.
    """
    path = os.path.join(directory, CHECKSUMS_FILE)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            record = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); the checkpoint cannot be verified") from e
    for rel, want in sorted(record.items()):
        file = os.path.join(directory, rel)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {directory} is incomplete: {file} is missing")
        size = os.path.getsize(file)
        if size != want["bytes"]:
            raise CheckpointError(
                f"checkpoint {directory} is damaged: {file} has {size} bytes, {want['bytes']} were written "
                "(truncated?)"
            )
        if file_sha256(file) != want["sha256"]:
            raise CheckpointError(
                f"checkpoint {directory} is damaged: the bytes of {file} differ from those written "
                "(SHA-256 mismatch)"
            )
    return True


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of a run under ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, keep: int = 3, *, read_only: bool = False) -> None:
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        if read_only:
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, max_to_keep=None, save_interval_steps=0
            )
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False
            )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Saves ``state`` (any pytree of arrays) as checkpoint ``step`` and waits for it.

        A Ctrl-C or SIGTERM during the save is held back until the save has
        finished, then raised: an interrupted run always leaves a complete last
        checkpoint (``draw_jax.interrupts``).
        """
        with interrupts.deferred():
            self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
            self._manager.wait_until_finished()
            if jax.process_index() == 0:
                write_checksums(self.step_directory(step))

    def step_directory(self, step: int) -> str:
        """The folder of checkpoint ``step``."""
        return os.path.join(self.directory, str(step))

    def set_aside(self, step: int) -> str:
        """Moves checkpoint ``step`` out of the run (beside ``checkpoints/``, never deleted); returns where."""
        folder = os.path.join(os.path.dirname(self.directory), SET_ASIDE_DIR)
        os.makedirs(folder, exist_ok=True)
        target = os.path.join(folder, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(self.step_directory(step), target)
        self._manager.reload()
        return target

    def restore(self, like: Any, step: int | None = None) -> Any:
        """Restores checkpoint ``step`` (default: the latest) into the structure of ``like``.

        ``like`` may be a dataclass (``TrainState``) with fields added after the
        checkpoint was written: a field that is None in ``like`` and absent from
        the checkpoint stays None (a run from before ``TrainState.ema`` existed
        restores as a run without a parameter average).

        Every byte is verified against the checkpoint's record first (see the
        module docstring).

        Raises:
          FileNotFoundError: no checkpoint, or no checkpoint ``step``, naming what exists.
          ValueError: the checkpoint lacks a field that ``like`` needs, naming both.
          CheckpointError: the checkpoint fails verification or cannot be
            restored, naming it and the file at fault.
        """
        steps = self.all_steps()
        if step is None:
            step = self.latest_step()
        if step is None or step not in steps:
            have = ", ".join(map(str, steps)) or "none"
            want = "any" if step is None else f"step {step}"
            raise FileNotFoundError(f"no checkpoint for {want} in {self.directory} (saved steps: {have})")
        directory = self.step_directory(step)
        if not verify(directory):
            logging.warning(
                "checkpoint %s has no %s (written by an older draw_jax): its bytes cannot be verified",
                directory, CHECKSUMS_FILE,
            )  # fmt: skip
        try:
            return self._restore(like, step)
        except (_MissingFields, CheckpointError):
            raise
        except Exception as e:  # orbax and TensorStore raise many kinds; one message names the checkpoint
            raise CheckpointError(f"checkpoint {directory} cannot be restored: {_first_line(e)}") from e

    def _restore(self, like: Any, step: int) -> Any:
        absent = self._absent_fields(like, step)
        if not absent:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        needed = [name for name in absent if getattr(like, name) is not None]
        if needed:
            raise _MissingFields(
                f"checkpoint {step} in {self.directory} has no {', '.join(needed)} (written by an "
                "older version or another kind of run); restore it with settings that do not need them"
            )
        present = {f.name: getattr(like, f.name) for f in dataclasses.fields(like) if f.name not in absent}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, present)
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return dataclasses.replace(like, **restored)

    def _absent_fields(self, like: Any, step: int) -> list[str]:
        """Fields of dataclass ``like`` that checkpoint ``step`` does not hold."""
        if not dataclasses.is_dataclass(like):
            return []
        metadata = self._manager.item_metadata(step)
        on_disk = getattr(metadata, "tree", metadata)
        if not isinstance(on_disk, dict):
            return []
        return [f.name for f in dataclasses.fields(like) if f.name not in on_disk]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
