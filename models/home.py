"""``$FEDHOSP_HOME``: where fedhosp keeps its local state on either side (ledgers, keys, caches, MLflow store)."""

from __future__ import annotations

import os
from pathlib import Path


def fedhosp_home() -> Path:
    """``$FEDHOSP_HOME``, else ``~/.fedhosp``."""
    return Path(os.environ.get("FEDHOSP_HOME") or Path.home() / ".fedhosp").expanduser().resolve()
