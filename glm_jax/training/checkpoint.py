"""Orbax checkpoints of the train state and the data-loader state.

`CheckpointManager` saves asynchronously (training continues while arrays are written), keeps the
newest `keep` steps and writes each step to a temporary directory that is renamed when complete, so a
job killed mid-save leaves no half-written step behind. Restoring takes the target's abstract state
*with shardings*, so a checkpoint saved on one mesh restores onto any other. A step that cannot be
read (files missing, truncated or garbled) is reported by name and the previous step is tried.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from absl import logging

ITEMS = ("state", "data")


class CheckpointError(RuntimeError):
    """No usable checkpoint although some exist."""


class Checkpointer:
    def __init__(self, directory: str | os.PathLike[str], *, keep: int = 3, async_save: bool = True) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict[str, Any], *, force: bool = False) -> bool:
        """Starts saving `state` and `data_state` as `step` (returns at once when asynchronous)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        return self._manager.save(step, args=args, force=force)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, data_state) of the newest readable step, laid out as `abstract_state` says;
        None when there is no checkpoint at all."""
        steps = self.steps()
        failures = []
        for step in reversed(steps):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                logging.warning("checkpoint step %d in %s is corrupt or incomplete (%s); trying an older one",
                                step, self.directory, message)
                failures.append(f"step {step}: {message}")
                continue
            if failures:
                logging.warning("restored step %d from %s after skipping unreadable steps", step, self.directory)
            return step, restored.state, dict(restored.data)
        if failures:
            raise CheckpointError(f"no readable checkpoint in {self.directory}: " + "; ".join(failures))
        return None

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
