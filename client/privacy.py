"""Differential privacy at the site: DP-SGD through Opacus, and the hospital's own ε budget on its disk.

Why here: what a site's weights reveal about one patient is bounded only if the
bound is applied where the patients are. With run-config ``dp = true`` a node
trains with Opacus (per-sample clipping to ``dp-max-grad-norm``, Gaussian noise
``dp-noise-multiplier`` × that norm, Poisson sampling of the training rows) and
counts what it spent with Opacus' RDP accountant. Every DP release of a data set
is appended to ``<ledger-dir>/privacy/<data fingerprint>.json``, so the budget
survives runs and restarts, and the node refuses a round that would take the
data set past the policy's ``max-epsilon`` (client/policy.py).

The unit of privacy is the patient: a cohort row is one patient; a radiology
round draws one image per patient, so one Poisson-sampled row is one patient.
The sampler's and the noise's random generators are seeded from the operating
system, never from the run's seed, which the coordinator knows (it could
otherwise regenerate the noise and subtract it).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import secrets
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from models.errors import COX_REFUSAL, SiteDataError

ACCOUNTANT = "rdp"  # Opacus' Rényi-DP accountant: its history composes across rounds and runs by concatenation
BUDGET_FOLDER = "privacy"
# The Cox partial likelihood couples every patient of a risk set: clipping one row's gradient does not bound one
# patient's influence on the others' terms, so no ε that Opacus would print holds for it.


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float
    delta: float

    @classmethod
    def from_config(cls, config) -> "DPSettings | None":
        """The message config's ``dp-*`` keys; ``None`` when the run does not ask for dp."""
        if not bool(config.get("dp", False)):
            return None
        return cls(float(config["dp-noise-multiplier"]), float(config["dp-max-grad-norm"]), float(config["dp-delta"]))


def sample_plan(units: int, batch_size: int, local_epochs: int, local_steps: int) -> tuple[float, int]:
    """(sample rate, steps) of one round, as Opacus' Poisson loader will take them.

    Opacus sets the sample rate to 1 / (the batches of the non-private loader) and
    draws that many batches per epoch; ``local_steps > 0`` stops after that many.
    """
    batches = max(1, math.ceil(units / max(1, min(batch_size, units))))
    return 1.0 / batches, (local_steps if local_steps > 0 else local_epochs * batches)


def epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε at ``delta`` of a list of (noise multiplier, sample rate, steps), by Opacus' RDP accountant."""
    history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = history
    return float(accountant.get_epsilon(delta=delta))


class PrivacyBudget:
    """Every DP release of one data set on this node: ``<folder>/privacy/<fingerprint>.json``.

    Entries: ``{"time", "run", "round", "noise_multiplier", "sample_rate", "steps"}``.
    Written under a lock, to a temporary file that replaces the old one (fsynced), so
    a node killed mid-write keeps the previous state.
    """

    def __init__(self, folder: Path, fingerprint: str):
        self.fingerprint = fingerprint
        self.path = Path(folder) / BUDGET_FOLDER / f"{fingerprint}.json"

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        try:
            return list(json.loads(self.path.read_text(encoding="utf-8"))["entries"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # an unreadable budget must not read as "nothing spent"
            raise BudgetUnreadable(f"the privacy budget file {self.path.name} cannot be read "
                                   f"({type(exc).__name__}); refusing dp work until it is restored") from None

    def history(self, run: str | None = None) -> list[tuple[float, float, int]]:
        return _history(self.entries(), run)

    def spent(self, delta: float, run: str | None = None) -> float:
        return epsilon(self.history(run), delta)

    def record(self, run: str, server_round: int, noise_multiplier: float, sample_rate: float, steps: int,
               check: Callable[[float, float], None] | None = None, delta: float = 0.0) -> None:
        """Append one release. ``check(spent, total)`` (at ``delta``) runs under the lock with the file as it is
        now, so two runs training on the same data at once cannot both spend the last of the budget: it raises
        to refuse, and then nothing is recorded (and the caller sends nothing)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path.with_suffix(".lock")):
            entries = self.entries()
            if check is not None:
                history = _history(entries)
                check(epsilon(history, delta), epsilon(history + [(noise_multiplier, sample_rate, steps)], delta))
            entries.append({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run": run,
                            "round": server_round, "noise_multiplier": noise_multiplier,
                            "sample_rate": sample_rate, "steps": steps})
            text = json.dumps({"fingerprint": self.fingerprint, "accountant": ACCOUNTANT, "entries": entries},
                              indent=1)
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)


def _history(entries: list[dict], run: str | None = None) -> list[tuple[float, float, int]]:
    """The accountant's (noise multiplier, sample rate, steps) of the entries (of one run, if given)."""
    return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries if run is None or e["run"] == run]


class BudgetUnreadable(SiteDataError):
    """The budget file exists but cannot be read (its text names no data)."""


@contextmanager
def _locked(path: Path):
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def budgets(folder: Path) -> list[PrivacyBudget]:
    """Every data set's budget kept under a ledger folder."""
    return [PrivacyBudget(folder, p.stem) for p in sorted((Path(folder) / BUDGET_FOLDER).glob("*.json"))]


def private_fit(model, units: int, batch_loss: Callable, optimiser, dp: DPSettings, batch_size: int,
                local_epochs: int, local_steps: int, augment_generator
                ) -> tuple[list[float], list[tuple[float, float, int]]]:
    """DP-SGD with Opacus over ``units`` rows: the losses, and Opacus' accountant history of this round.

    ``batch_loss(idx, generator)`` is the task's loss of the rows ``idx`` (an empty
    ``idx`` must give a zero loss through the model: Poisson batches can be empty).
    """
    import torch
    from opacus import PrivacyEngine

    _, steps = sample_plan(units, batch_size, local_epochs, local_steps)
    with _quiet():
        engine = PrivacyEngine(accountant=ACCOUNTANT)
    sampler = torch.Generator().manual_seed(secrets.randbits(63))
    noise = torch.Generator().manual_seed(secrets.randbits(63))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(units)),
                                         batch_size=max(1, min(batch_size, units)), generator=sampler)
    private, optimiser, loader = engine.make_private(
        module=model, optimizer=optimiser, data_loader=loader, noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm, poisson_sampling=True, noise_generator=noise)
    losses: list[float] = []
    private.train()
    try:
        while len(losses) < steps:
            for (idx,) in loader:
                with _quiet():
                    loss = batch_loss(idx, augment_generator)
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                losses.append(float(loss.detach()))
                if len(losses) >= steps:
                    break
    finally:
        private._close()  # the hooks go; the original module keeps the trained weights
    return losses, list(engine.accountant.history)


@contextmanager
def _quiet():
    """Opacus warns about its non-cryptographic RNG (we seed it from the OS) and about backward hooks on inputs."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


@dataclass(frozen=True)
class RoundBudget:
    """One data set's privacy budget as a dp round or run sees it: the site's policy, the run's dp settings, the
    budget file, the δ it is counted at, what was spent before, and this run's sampling plan."""

    policy: object  # client.policy.SitePolicy
    dp: DPSettings
    store: PrivacyBudget
    delta: float
    history: list
    sample_rate: float
    steps: int  # per round

    def after(self, rounds: int) -> float:
        """The data set's ε after ``rounds`` more rounds of this run."""
        return epsilon(self.history + [(self.dp.noise_multiplier, self.sample_rate, self.steps * rounds)], self.delta)


def round_budget(policy, site: str, cfg, ledger_folder: Path, fingerprint: str, units: int, survival: bool,
                 server_round: int | None) -> RoundBudget | None:
    """The budget of this round's data set, or ``None`` without dp; refuses dp where no ε would hold, and training
    without dp where the policy sets a budget."""

    dp = DPSettings.from_config(cfg)
    policy.check_privacy(site, dp is not None, server_round, 0.0, 0.0)
    if dp is None:
        return None
    if survival:
        raise SiteDataError(f"site {site}: {COX_REFUSAL}")
    store = PrivacyBudget(ledger_folder, fingerprint)
    rate, steps = sample_plan(units, int(cfg["batch-size"]), int(cfg["local-epochs"]), int(cfg["local-steps"]))
    return RoundBudget(policy, dp, store, policy.privacy_delta(dp.delta), store.history(), rate, steps)


def privacy_plan(budget: RoundBudget | None, site: str, rounds: int) -> dict[str, float]:
    """What the planned run would spend of this data set's budget, as numbers (the coordinator warns when fewer
    rounds fit than the run asks for); a refusal when not one round fits."""
    if budget is None:
        return {}
    out = {"epsilon-spent": budget.after(0), "epsilon-planned": budget.after(rounds), "delta": budget.delta,
           "dp-rounds-allowed": float(rounds)}
    maximum = budget.policy.max_epsilon
    if maximum:
        allowed = next((r for r in range(rounds, 0, -1) if budget.after(r) <= maximum), 0)
        budget.policy.check_privacy(site, True, 1, out["epsilon-spent"], budget.after(1))  # not one round fits
        out.update({"dp-rounds-allowed": float(allowed), "max-epsilon": maximum})
    return out
