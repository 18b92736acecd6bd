"""The experiments' figures: one headless pyplot and one way to write a PNG.

Saved without matplotlib's version stamp, so a re-rendered figure's bytes follow its data and not
the matplotlib that drew it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display; imported on demand)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 120) -> Path:
    """Lay out, write `path` (PNG, no version stamp) and close `fig`."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, metadata={"Software": None})
    pyplot().close(fig)
    return path
