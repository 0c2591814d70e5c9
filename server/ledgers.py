"""The coordinator's signed ledger: where it lives, its key, and the one way a failed run is recorded.

``$FEDHOSP_HOME/ledgers/run-<flwr run id>.jsonl``, signed with
``$FEDHOSP_HOME/keys/coordinator_ed25519.pem``; the format and its verification
are models/ledger.py's (the sites' ledgers share it).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from models.home import fedhosp_home
from models.ledger import Ledger, load_or_create_key
from server.sites import FederationError


def coordinator_key():
    """``$FEDHOSP_HOME/keys/coordinator_ed25519.pem`` (0600, created on first use)."""
    return load_or_create_key(fedhosp_home() / "keys" / "coordinator_ed25519.pem")


def run_ledger_path(flwr_run_id: int) -> Path:
    return fedhosp_home() / "ledgers" / f"run-{flwr_run_id}.jsonl"


def open_ledger(flwr_run_id: int, path: Path | None = None) -> Ledger:
    """The run's ledger (a resumed run continues the original run's file: ``path``)."""
    return Ledger(path or run_ledger_path(flwr_run_id), coordinator_key(), {"role": "coordinator",
                                                                           "run_id": flwr_run_id})


@contextmanager
def failure_recorded(ledger: Ledger, flwr_run_id: int):
    """Any exception inside becomes a ``run-failed`` event with its reason (what ``fedhosp run`` reports), then is
    raised again. Inside an open MLflow run, the tracker closing as FAILED uploads the ledger with the event in it.

    A :class:`FederationError` explains itself (it names the sites and the fix): its message is the reason; any
    other error is named by its type as well.
    """
    try:
        yield
    except Exception as exc:
        reason = str(exc) if isinstance(exc, FederationError) else f"{type(exc).__name__}: {exc}"
        ledger.append("run-failed", {"flwr_run_id": flwr_run_id, "reason": reason})
        raise
