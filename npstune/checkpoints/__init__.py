"""Checkpoint I/O: lazy per-tensor reading and atomic streaming writing of every form."""

from npstune.checkpoints.io import (
    FORMS,
    CheckpointWriter,
    LazyCheckpoint,
    checkpoint_name,
    open_checkpoint,
    write_sharded,
    write_state_dict,
)

__all__ = [
    "FORMS",
    "CheckpointWriter",
    "LazyCheckpoint",
    "checkpoint_name",
    "open_checkpoint",
    "write_sharded",
    "write_state_dict",
]
