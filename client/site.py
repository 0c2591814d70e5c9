"""Which site this node is, and where its data lies.

Deployment: the SuperNode's ``--node-config`` names ``site-name`` and
``data-dir``. Simulation: node ``partition-id = k`` serves the k-th site folder
(sorted by name) under run-config ``data-root``, or, with no ``data-root``, the
k-th demo region of the task, generated once under ``$FEDHOSP_HOME/demo``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.errors import SiteDataError


@dataclass(frozen=True)
class Site:
    name: str
    folder: Path


def resolve_site(node_config: dict, data_root: str, demo_site: Callable[[int, int], Site]) -> Site:
    """``demo_site(partition_id, num_partitions)`` writes (once) and returns a demo site."""
    if node_config.get("data-dir"):
        folder = Path(str(node_config["data-dir"])).expanduser()
        return Site(str(node_config.get("site-name") or folder.name), folder)
    if "partition-id" not in node_config:
        raise SiteDataError("this node has neither node-config 'data-dir' nor a simulation partition-id")
    pid, count = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if data_root:
        root = Path(data_root).expanduser()
        folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        if len(folders) != count:
            raise SiteDataError(
                f"data-root holds {len(folders)} site folders but the federation has {count} nodes; "
                f"run with --federation-config \"num-supernodes={len(folders)}\""
            )
        return Site(folders[pid].name, folders[pid])
    return demo_site(pid, count)
