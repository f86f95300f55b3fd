"""A small wrapper over orbax's CheckpointManager for ``TrainState``.

Orbax writes each checkpoint into a temporary folder and renames it when the
write is complete, so an interrupted save never leaves a folder that looks
like a valid checkpoint; ``latest_step`` only sees finished ones.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from draw_jax import interrupts

__all__ = ["Checkpointer"]


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

    def restore(self, like: Any, step: int | None = None) -> Any:
        """Restores checkpoint ``step`` (default: the latest) into the structure of ``like``.

        ``like`` may be a dataclass (``TrainState``) with fields added after the
        checkpoint was written: a field that is None in ``like`` and absent from
        the checkpoint stays None (a run from before ``TrainState.ema`` existed
        restores as a run without a parameter average).

        Raises:
          FileNotFoundError: no checkpoint, or no checkpoint ``step``, naming what exists.
          ValueError: the checkpoint lacks a field that ``like`` needs, naming both.
        """
        steps = self.all_steps()
        if step is None:
            step = self.latest_step()
        if step is None or step not in steps:
            have = ", ".join(map(str, steps)) or "none"
            want = "any" if step is None else f"step {step}"
            raise FileNotFoundError(f"no checkpoint for {want} in {self.directory} (saved steps: {have})")
        absent = self._absent_fields(like, step)
        if not absent:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        needed = [name for name in absent if getattr(like, name) is not None]
        if needed:
            raise ValueError(
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
