"""Where medtta keeps data and results, resolved lazily from the environment (as nnU-Net does)."""

from __future__ import annotations

import os
from pathlib import Path


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def data_root() -> Path:
    """`$MEDTTA_DATA`, else `<user cache>/medtta/data`: where generated and prepared datasets live."""
    env = os.environ.get("MEDTTA_DATA")
    return Path(env).expanduser() if env else _cache_home() / "medtta" / "data"


def results_root(override: str | os.PathLike | None = None) -> Path:
    """`--results`, else `$MEDTTA_RESULTS`, else `./medtta-results`: models, tables and the MLflow store."""
    chosen = override or os.environ.get("MEDTTA_RESULTS") or "medtta-results"
    return Path(chosen).expanduser().resolve()
