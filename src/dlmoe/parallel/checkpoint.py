"""Deprecated location: sharded checkpoints live in `dlmoe.checkpoint.dcp_layout`.

Kept so `from dlmoe.parallel.checkpoint import save_sharded_checkpoint, ...` keeps working.
"""

from dlmoe.checkpoint.dcp_layout import (  # noqa: F401
    full_model_state,
    init_optimizer_state,
    load_full_state,
    load_sharded_checkpoint,
    optimizer_hyperparameters,
    save_sharded_checkpoint,
    sharded_state,
)
