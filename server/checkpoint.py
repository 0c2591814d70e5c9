"""Round checkpoints: what the coordinator needs to continue a killed run at the next round.

After every completed round: the global weights, the round number, the
strategy's own state (FedAdam / FedYogi / FedAdagrad moments), the run config
and seed, the MLflow run id and the ledger path. Plain data (``.npz`` arrays and
a JSON header, no pickle), written to a temporary file and renamed over the
previous one, so a crash mid-write leaves the previous checkpoint intact. Sites
need nothing: their training is seeded by (seed, round, site).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# Strategy attributes that carry state across rounds (Flower's FedOpt family): dicts of arrays.
STRATEGY_STATE = ("m_t", "v_t")


@dataclass
class Checkpoint:
    server_round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    run_config: dict = field(default_factory=dict)
    mlflow_run_id: str = ""
    ledger_path: str = ""
    flwr_run_id: int = 0


def save(path: Path, checkpoint: Checkpoint) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {k: v for k, v in asdict(checkpoint).items() if k not in ("arrays", "strategy_state")}
    header["strategy_state"] = {name: list(values) for name, values in checkpoint.strategy_state.items()}
    payload = {f"arrays/{k}": v for k, v in checkpoint.arrays.items()}
    for name, values in checkpoint.strategy_state.items():
        payload.update({f"state/{name}/{k}": v for k, v in values.items()})
    payload["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, **payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load(path: Path) -> Checkpoint:
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(data["header"].tobytes().decode())
        arrays = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("arrays/")}
        state = {name: {k: data[f"state/{name}/{k}"] for k in keys} for name, keys in header.pop("strategy_state").items()}
    return Checkpoint(arrays=arrays, strategy_state=state, **header)


def _moments_kept(strategy) -> bool:
    """FedAdam / FedYogi / FedAdagrad keep their moments in ``m_t`` / ``v_t``: a Flower version that keeps them
    elsewhere must stop the checkpoint loudly, or a resumed run would silently restart them."""
    from flwr.serverapp.strategy.fedopt import FedOpt

    if not isinstance(strategy, FedOpt):
        return False
    missing = [name for name in STRATEGY_STATE if name not in vars(strategy)]
    if missing:
        raise RuntimeError(f"checkpoint: {type(strategy).__name__} has no attribute(s) {missing}; this Flower "
                           "version keeps FedOpt's moments elsewhere, so a checkpoint could not resume them "
                           "(server/checkpoint.py:STRATEGY_STATE)")
    return True


def strategy_state(strategy) -> dict[str, dict[str, np.ndarray]]:
    """The strategy's own state after a round: FedOpt's moments (nothing for a strategy without state)."""
    if not _moments_kept(strategy):
        return {}
    return {name: dict(getattr(strategy, name)) for name in STRATEGY_STATE if getattr(strategy, name) is not None}


def restore_strategy(strategy, state: dict[str, dict[str, np.ndarray]]) -> None:
    """Put a checkpoint's strategy state back (where :func:`strategy_state` found it)."""
    if state and not _moments_kept(strategy):
        raise RuntimeError(f"checkpoint: it holds {sorted(state)}, which {type(strategy).__name__} does not keep")
    for name, values in state.items():
        setattr(strategy, name, dict(values))
