"""Flower's own strategies, chosen by name, and the wrappers composed around them.

Each wrapper does one job and delegates every other decision to the strategy
it wraps, as Flower's DP wrappers do; outermost first:

- :class:`server.round_report.RoundReporter` records each round (ledger, tracking) and changes nothing;
- :class:`server.update_checks.UpdateGuard` lets only valid updates through;
- :class:`ModelDtypes` keeps the aggregated model in the model's own dtypes;
- Flower's strategy (FedAvg, FedAdam, Krum, ..., or server/newton.py's NewtonCox).

Under secure aggregation (server/secure_aggregation.py) the reporter wraps
:class:`~server.secure_aggregation.SecureAggregation` around FedAvg or FedProx.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from models.ledger import Ledger
from server.round_report import RoundReporter, SiteRound
from server.settings import RunSettings
from server.sites import FederationError
from server.update_checks import UpdateGuard


def build_strategy(settings: RunSettings, num_sites: int, num_nodes: int | None = None) -> Strategy:
    """Flower's strategy for ``settings.strategy``.

    Every connected node is sampled each round (fraction 1.0), so a site whose
    policy refuses the run answers with its refusal, which is recorded. A round
    starts once ``min-train-nodes`` nodes are connected, so a node that has gone
    away does not stall the federation; it takes part again when it is back.
    Bulyan needs ``4 f + 3`` sites for ``f`` malicious ones: fewer is refused here.
    """
    if settings.secure_aggregation:
        from server.secure_aggregation import MIN_SITES

        if num_sites < MIN_SITES:
            raise FederationError(f"secure aggregation needs at least {MIN_SITES} sites (with two, each could "
                                  f"learn the other's update from the sum); {num_sites} take part")
    if settings.strategy == "bulyan" and num_sites < 4 * settings.num_malicious_nodes + 3:
        raise FederationError(f"bulyan with num-malicious-nodes={settings.num_malicious_nodes} needs at least "
                              f"{4 * settings.num_malicious_nodes + 3} sites; {num_sites} take part")
    minimum = max(1, min(settings.min_train_nodes, num_sites))
    common = dict(min_train_nodes=minimum, min_evaluate_nodes=minimum, min_available_nodes=minimum)
    name = settings.strategy
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(proximal_mu=settings.proximal_mu, **common)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(beta=settings.trim_beta, **common)
    if name == "krum":
        return Krum(num_malicious_nodes=settings.num_malicious_nodes, **common)
    if name == "multikrum":
        return MultiKrum(num_malicious_nodes=settings.num_malicious_nodes,
                         num_nodes_to_select=settings.num_nodes_to_select, **common)
    if name == "bulyan":
        return Bulyan(num_malicious_nodes=settings.num_malicious_nodes, **common)
    if name == "newton":  # exact Newton steps of the linear Cox model (server/newton.py)
        from server.newton import NewtonCox

        return NewtonCox(penalizer=settings.penalizer, **common)
    # Server-side optimisers: eta is the server learning rate, eta_l the clients'.
    optimisers = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}
    return optimisers[name](eta=settings.server_lr, eta_l=settings.lr, **common)


class ModelDtypes(Strategy):
    """Keeps the global model in the model's own dtypes: FedAvg and FedOpt compute in float64 (and turn integer
    buffers into floats), which would double what is sent and make every update's dtype 'wrong'."""

    def __init__(self, inner: Strategy):
        self.inner = inner
        self.dtypes: dict[str, np.dtype] | None = None  # from the first global model the strategy is given

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if self.dtypes is None:
            self.dtypes = {k: a.numpy().dtype for k, a in arrays.items()}
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        return (None if arrays is None else self._cast(arrays)), metrics

    def _cast(self, arrays: ArrayRecord) -> ArrayRecord:
        values = {k: a.numpy() for k, a in arrays.items()}
        if all(values[k].dtype == self.dtypes.get(k, values[k].dtype) for k in values):
            return arrays
        # astype(order="C"), not np.ascontiguousarray: that turns a 0-d array (BatchNorm's num_batches_tracked)
        # into shape (1,), and the update checks would then refuse every reply of the next round
        return ArrayRecord({k: Array(np.asarray(np.rint(v) if np.issubdtype(self.dtypes[k], np.integer) else v)
                                     .astype(self.dtypes[k], order="C")) for k, v in values.items()})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return self.inner.aggregate_evaluate(server_round, replies)


def wrapped(inner: Strategy, settings: RunSettings, site_names: dict[int, str], declared: dict[str, int],
            ledger: Ledger, on_round: Callable[[SiteRound, ArrayRecord], None], round_offset: int = 0,
            context: Context | None = None) -> RoundReporter:
    """``inner`` with the update guard, the dtype keeper and the round reporter around it (see the module doc);
    under secure aggregation, with :class:`server.secure_aggregation.SecureAggregation` instead of the first two
    (the coordinator cannot check an update it never sees; the nodes bound their own)."""
    reporter = RoundReporter(site_names, on_round, ledger, round_offset)
    if settings.secure_aggregation:
        from server.secure_aggregation import SecureAggregation

        return reporter.wrapping(SecureAggregation(inner, context, settings.secure_update_norm,
                                                   max(declared.values(), default=1), settings.round_timeout))
    guard = UpdateGuard(ModelDtypes(inner), site_names, declared, settings.validation(), settings.min_train_nodes,
                        events=reporter)
    return reporter.wrapping(guard)
