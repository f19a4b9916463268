"""Checkpoint I/O: lazy per-tensor reading and atomic streaming writing of every form,
and PEFT LoRA adapters read as checkpoints over their base."""

from npstune.checkpoints.adapter import (
    AdapterCheckpoint,
    is_adapter_dir,
    write_combined_adapter,
)
from npstune.checkpoints.io import (
    FORMS,
    CheckpointWriter,
    LazyCheckpoint,
    checkpoint_name,
    open_checkpoint,
    output_form,
    write_sharded,
    write_state_dict,
)

__all__ = [
    "FORMS",
    "AdapterCheckpoint",
    "CheckpointWriter",
    "LazyCheckpoint",
    "checkpoint_name",
    "is_adapter_dir",
    "open_checkpoint",
    "output_form",
    "write_combined_adapter",
    "write_sharded",
    "write_state_dict",
]
