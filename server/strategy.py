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

from client.ledger import Ledger
from models.registry import model_hash
from server.settings import RunSettings
from server.sites import reason_text


def build_strategy(settings: RunSettings, num_sites: int, num_nodes: int | None = None) -> Strategy:
    """Flower's strategy for ``settings.strategy``, waiting for every discovered node.

    All connected nodes are sampled each round (fraction 1.0): a site whose policy
    refuses the run answers each round with its refusal, which is recorded.
    """
    common = dict(min_train_nodes=num_sites, min_evaluate_nodes=num_sites,
                  min_available_nodes=max(num_sites, num_nodes or 0))
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


def arrays_hash(arrays: ArrayRecord) -> str:
    return model_hash({k: a.numpy() for k, a in arrays.items()})


class ReportingStrategy(Strategy):
    """Wraps a strategy; records every round in the ledger and calls ``on_round(SiteRound)``.

    Ledger events per round: ``round-start`` (sampled sites, config, hash of the
    global model sent), ``update`` / ``update-failed`` per site, ``aggregation``
    (hash of the new global model), ``evaluation`` / ``evaluation-failed`` per
    site and ``round-end`` (aggregated evaluation, duration).
    """

    def __init__(self, inner: Strategy, site_names: dict[int, str], on_round: Callable[[SiteRound], None],
                 ledger: Ledger):
        self.inner = inner
        self.site_names = site_names
        self.on_round = on_round
        self.ledger = ledger
        self.current: SiteRound | None = None

    def summary(self) -> None:
        self.inner.summary()

    def _site(self, msg: Message) -> str:
        node = msg.metadata.src_node_id if msg.metadata.src_node_id else msg.metadata.dst_node_id
        return self.site_names.get(node, f"node-{node}")

    def _collect(self, replies: Iterable[Message], into: dict[str, dict[str, float]], kind: str) -> list[Message]:
        replies = list(replies)
        for msg in replies:
            site = self._site(msg)
            if msg.has_error():
                reason = reason_text(msg.error.reason)
                self.current.failures[site] = reason
                self.ledger.append(f"{kind}-failed", {"round": self.current.server_round, "site": site,
                                                      "reason": reason})
            elif "metrics" in msg.content.metric_records:
                numbers = {k: float(v) for k, v in msg.content["metrics"].items() if isinstance(v, (int, float))}
                entry = {"round": self.current.server_round, "site": site,
                         "num_examples": numbers.get("num-examples"),
                         "metrics": {k: v for k, v in numbers.items() if k != "num-examples"}}
                if "arrays" in msg.content.array_records:  # what actually left the site
                    numbers["update_bytes"] = float(sum(len(a.data) for a in msg.content["arrays"].values()))
                    entry["update_hash"] = arrays_hash(msg.content["arrays"])
                    entry["update_bytes"] = numbers["update_bytes"]
                into[site] = numbers
                self.ledger.append(kind, entry)
        return replies

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.current = SiteRound(server_round, time.perf_counter())
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        sent = dict(messages[0].content["config"]) if messages else dict(config)
        self.ledger.append("round-start", {
            "round": server_round, "sites": sorted(self.site_names.get(m.metadata.dst_node_id, "?") for m in messages),
            "config": sent, "global_model_hash": arrays_hash(arrays)})
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = self._collect(replies, self.current.train, "update")
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if metrics is not None:
            self.current.train_aggregate = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.ledger.append("aggregation", {
            "round": server_round, "sites": sorted(self.current.train),
            "global_model_hash": arrays_hash(arrays) if arrays is not None else None,
            "metrics": self.current.train_aggregate})
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = self._collect(replies, self.current.evaluate, "evaluation")
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.current.evaluate_aggregate = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.current.duration_s = time.perf_counter() - self.current.started
        self.ledger.append("round-end", {"round": server_round, "metrics": self.current.evaluate_aggregate,
                                         "failures": self.current.failures, "duration_s": self.current.duration_s})
        self.on_round(self.current)
        return metrics
