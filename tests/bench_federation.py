"""What the simulation benchmarks share: a throwaway local SuperLink with its own store, and demo sites per task.

Not a pytest test (the bench_*.py scripts import it).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from client.data.demo import write_demo
from client.data.radiology_demo import write_radiology_demo
from server import runner


@contextmanager
def bench_superlink(prefix: str, ports: dict[str, str]) -> Iterator[tuple[Path, dict[str, str], str]]:
    """(folder, environment, MLflow URI) of a local simulation SuperLink on ``ports``, all removed on exit."""
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        folder = Path(name)
        env, uri = runner.isolated_env(folder, ports)
        with runner.local_superlink(env):
            yield folder, env, uri


def task_demo(task: str, root: Path, sites: int, seed: int) -> Path:
    """``sites`` demo site folders of ``task`` under ``root``: cohorts (oncology) or knee DICOM (radiology)."""
    if task == "oncology":
        write_demo(root, sites, seed)
    else:
        write_radiology_demo(root, sites, seed)
    return root
