"""Training checkpoints: one commit protocol, two layouts, imported by `train` and `parallel` alike.

commit.py             scratch folder → fsync → meta.json (sizes, sha256; the commit record) → rename;
                      finding the newest valid checkpoint; verified reads; disk-full reporting
state.py              what `state.pt` may hold (weights_only), RNG capture / restore
safetensors_layout.py one process: model.safetensors + state.pt
dcp_layout.py         torchrun: torch.distributed.checkpoint shards, saved at one world size and
                      loaded at any (or by one process)
dcp_metadata.py       DCP's pickled `.metadata` read through an allow-list before DCP reads it
"""

from dlmoe.checkpoint.commit import (
    CHECKPOINTS,
    DCP_DIR,
    FORMAT_VERSION,
    META_FILE,
    MODEL_FILE,
    REQUIRED_FILES,
    STATE_FILE,
    begin_checkpoint,
    checkpoint_layout,
    disk_full_message,
    finish_checkpoint,
    fsync_file,
    is_disk_full,
    latest_checkpoint,
    raise_save_failure,
    verified_bytes,
)
from dlmoe.checkpoint.safetensors_layout import load_checkpoint, save_checkpoint
from dlmoe.checkpoint.state import (
    capture_rng_state,
    check_weights_only,
    load_state_bytes,
    restore_rng_state,
    write_state_file,
)

__all__ = [
    "CHECKPOINTS",
    "DCP_DIR",
    "FORMAT_VERSION",
    "META_FILE",
    "MODEL_FILE",
    "REQUIRED_FILES",
    "STATE_FILE",
    "begin_checkpoint",
    "capture_rng_state",
    "check_weights_only",
    "checkpoint_layout",
    "disk_full_message",
    "finish_checkpoint",
    "fsync_file",
    "is_disk_full",
    "latest_checkpoint",
    "load_checkpoint",
    "load_sharded_checkpoint",
    "load_state_bytes",
    "raise_save_failure",
    "restore_rng_state",
    "save_checkpoint",
    "save_sharded_checkpoint",
    "verified_bytes",
    "write_state_file",
]


def __getattr__(name: str) -> object:
    """The DCP layout needs torch.distributed and dlmoe.parallel: imported on first use only."""
    if name in ("load_sharded_checkpoint", "save_sharded_checkpoint", "full_model_state", "load_full_state"):
        from dlmoe.checkpoint import dcp_layout

        return getattr(dcp_layout, name)
    raise AttributeError(f"module 'dlmoe.checkpoint' has no attribute {name!r}")
