"""What both Megatron checkpoint formats share: the tracker file that names the saved iteration, and the error."""

from __future__ import annotations

import pathlib

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(ValueError):
    """The checkpoint is missing, unreadable or does not fit the model built from its args."""


def iteration_dir(path: str | pathlib.Path) -> pathlib.Path:
    """``path`` itself, or the iteration directory its tracker file names when it is a Megatron save directory."""
    path = pathlib.Path(path)
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        path = path / ("release" if text == "release" else f"iter_{int(text):07d}")
    return path
