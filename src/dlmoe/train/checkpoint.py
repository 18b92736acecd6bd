"""Deprecated location: the checkpoint code lives in `dlmoe.checkpoint` (shared with `dlmoe.parallel`).

Kept so `from dlmoe.train.checkpoint import save_checkpoint, ...` keeps working.
"""

from dlmoe.checkpoint import *  # noqa: F403
from dlmoe.checkpoint import __all__  # noqa: F401
