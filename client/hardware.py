"""Which device and how many CPU threads a node computes with: node config ``device`` and ``threads``.

Hospitals run nodes on anything from a two-core VM to a GPU workstation, so the
node, not the run, says what it has: ``device`` = ``auto`` (CUDA when this node
has it, else CPU), ``cpu`` or ``cuda``; ``threads`` = the CPU threads torch may
use, by default what this process is given (``OMP_NUM_THREADS`` when the
runtime sets it, as Ray does for each simulated node, else every CPU this
process may run on). ``configure`` is the one place that sets torch's thread
count; a task calls it when it builds a model (a site-check message never
imports torch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from models.errors import SiteDataError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Hardware:
    device: str  # "cpu" or "cuda"
    threads: int


def _who(node_config: dict) -> str:
    if node_config.get("site-name"):
        return f"site {node_config['site-name']}"
    return f"node partition {node_config.get('partition-id', '?')}"


def available_threads() -> int:
    """What this process is given: ``OMP_NUM_THREADS`` when set (Ray sets it per simulated node), else its CPUs."""
    try:
        given = int(os.environ.get("OMP_NUM_THREADS", "0"))
    except ValueError:
        given = 0
    if given > 0:
        return given
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve(node_config: dict) -> Hardware:
    """The node's device and thread count from its node config; a bad value names the key and the node."""
    device = str(node_config.get("device", "auto") or "auto").lower()
    if device not in DEVICES:
        raise SiteDataError(f"{_who(node_config)}: node config device={device!r}; choose one of {list(DEVICES)}")
    if device in ("auto", "cuda"):
        import torch

        cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    elif device == "cuda" and not cuda:
        raise SiteDataError(f"{_who(node_config)}: node config device='cuda', but torch sees no CUDA device here")
    raw = node_config.get("threads", 0)
    try:
        threads = int(raw)
    except (TypeError, ValueError):
        raise SiteDataError(f"{_who(node_config)}: node config threads={raw!r} is not a whole number") from None
    if threads < 0:
        raise SiteDataError(f"{_who(node_config)}: node config threads={threads} must be 0 (all) or more")
    return Hardware(device, threads or available_threads())


def configure(node_config: dict) -> Hardware:
    """Resolve the node's hardware and set torch's CPU thread count from it (the one place that does)."""
    import torch

    hardware = resolve(node_config)
    if torch.get_num_threads() != hardware.threads:
        torch.set_num_threads(hardware.threads)
    return hardware


def describe(node_config: dict | None = None) -> str:
    """What a node with this node config computes on, in words (the benchmarks print it)."""
    import torch

    hardware = resolve(node_config or {})
    name = torch.cuda.get_device_name(0) if hardware.device == "cuda" else "CPU"
    return f"device {hardware.device} ({name}), {hardware.threads} torch threads, torch {torch.__version__}"
