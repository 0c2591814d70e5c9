"""Flower's own strategies, chosen by name, and a wrapper that reports each round.

The wrapper delegates every decision to the wrapped strategy (as Flower's DP
wrappers do) and only watches: which site answered, with what numbers, what
failed, and how long the round took. It never changes an update.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedProx, FedYogi, Strategy

from server.settings import RunSettings
from server.sites import reason_text


def build_strategy(settings: RunSettings, num_sites: int) -> Strategy:
    """Flower's strategy for ``settings.strategy``, waiting for every discovered site."""
    common = dict(min_train_nodes=num_sites, min_evaluate_nodes=num_sites, min_available_nodes=num_sites)
    name = settings.strategy
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(proximal_mu=settings.proximal_mu, **common)
    # Server-side optimisers: eta is the server learning rate, eta_l the clients'.
    optimisers = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}
    return optimisers[name](eta=settings.server_lr, eta_l=settings.lr, **common)


@dataclass
class SiteRound:
    """What one round produced, per site and aggregated, for tracking and the summary."""

    server_round: int
    started: float
    duration_s: float = 0.0
    train: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    train_aggregate: dict[str, float] = field(default_factory=dict)
    evaluate_aggregate: dict[str, float] = field(default_factory=dict)


class ReportingStrategy(Strategy):
    """Wraps a strategy; calls ``on_round(SiteRound)`` once each round has been evaluated."""

    def __init__(self, inner: Strategy, site_names: dict[int, str], on_round: Callable[[SiteRound], None]):
        self.inner = inner
        self.site_names = site_names
        self.on_round = on_round
        self.current: SiteRound | None = None

    def summary(self) -> None:
        self.inner.summary()

    def _site(self, msg: Message) -> str:
        return self.site_names.get(msg.metadata.src_node_id, f"node-{msg.metadata.src_node_id}")

    def _collect(self, replies: Iterable[Message], into: dict[str, dict[str, float]]) -> list[Message]:
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                self.current.failures[self._site(msg)] = reason_text(msg.error.reason)
            elif "metrics" in msg.content.metric_records:
                numbers = {k: float(v) for k, v in msg.content["metrics"].items() if isinstance(v, (int, float))}
                if "arrays" in msg.content.array_records:  # what actually left the site, in bytes
                    numbers["update_bytes"] = float(sum(len(a.data) for a in msg.content["arrays"].values()))
                into[self._site(msg)] = numbers
        return replies

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.current = SiteRound(server_round, time.perf_counter())
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = self._collect(replies, self.current.train)
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if metrics is not None:
            self.current.train_aggregate = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = self._collect(replies, self.current.evaluate)
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.current.evaluate_aggregate = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.current.duration_s = time.perf_counter() - self.current.started
        self.on_round(self.current)
        return metrics
