"""Flower's own strategies, chosen by name, and a wrapper that reports each round.

The wrapper delegates every decision to the wrapped strategy (as Flower's DP
wrappers do) and only watches: which site answered, with what numbers, what
failed, and how long the round took. It never changes an update.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
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
from models.builders import model_hash
from server.settings import RunSettings
from server.sites import reason_text
from server.update_checks import ValidationSettings, validate_updates


def build_strategy(settings: RunSettings, num_sites: int, num_nodes: int | None = None) -> Strategy:
    """Flower's strategy for ``settings.strategy``.

    Every connected node is sampled each round (fraction 1.0), so a site whose
    policy refuses the run answers with its refusal, which is recorded. A round
    starts once ``min-train-nodes`` nodes are connected, so a node that has gone
    away does not stall the federation; it takes part again when it is back.
    """
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


@dataclass
class SiteRound:
    """What one round produced, per site and aggregated, for tracking and the summary."""

    server_round: int
    started: float
    duration_s: float = 0.0
    train: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    skipped: str = ""  # why the round produced no new global model, if it did not
    validation_ms: float = 0.0
    train_aggregate: dict[str, float] = field(default_factory=dict)
    evaluate_aggregate: dict[str, float] = field(default_factory=dict)

    @property
    def epsilon_max(self) -> float | None:
        """Under dp, the largest ε a site reported this round (an average of ε would mean nothing)."""
        return max((m["epsilon"] for m in self.train.values() if "epsilon" in m), default=None)


def arrays_hash(arrays: ArrayRecord) -> str:
    return model_hash({k: a.numpy() for k, a in arrays.items()})


class ReportingStrategy(Strategy):
    """Wraps a Flower strategy: validates updates, records every round in the ledger, reports each round.

    Ledger events per round: ``round-start`` (sampled sites, config, hash of the
    global model sent), ``update`` / ``update-failed`` per site,
    ``update-rejected`` (validation), ``aggregation`` or ``round-skipped``,
    ``evaluation`` / ``evaluation-failed`` per site and ``round-end``.
    ``round_offset`` makes a resumed run continue its round numbers.
    """

    def __init__(self, inner: Strategy, site_names: dict[int, str], on_round: Callable[[SiteRound, ArrayRecord], None],
                 ledger: Ledger, declared: dict[str, int] | None = None,
                 validation: ValidationSettings | None = None, min_valid: int = 1, round_offset: int = 0):
        self.inner = inner
        self.site_names = site_names
        self.on_round = on_round
        self.ledger = ledger
        self.declared = declared or {}
        self.validation = validation or ValidationSettings()
        self.min_valid = min_valid
        self.offset = round_offset
        self.current: SiteRound | None = None
        self.global_arrays: ArrayRecord | None = None
        self.dtypes: dict[str, np.dtype] | None = None  # the model's own dtypes, from the initial weights
        self.sampled: dict[str, int] = {}

    def summary(self) -> None:
        self.inner.summary()

    def _name(self, node: int) -> str:
        return self.site_names.get(node, f"node-{node}")

    def _site(self, msg: Message) -> str:
        return self._name(msg.metadata.src_node_id or msg.metadata.dst_node_id)

    def _collect(self, replies: Iterable[Message], into: dict[str, dict[str, float]], kind: str) -> list[Message]:
        replies = list(replies)
        known = {msg.metadata.src_node_id for msg in replies} & set(self.sampled.values())
        silent = [site for site, node in self.sampled.items() if node not in known]
        answered = set()
        for msg in replies:
            site = self._site(msg)
            if msg.metadata.src_node_id not in self.site_names and len(silent) == 1:
                site = silent[0]  # the SuperLink answers for a node that vanished ("Node Unavailable")
            answered.add(site)
            if msg.has_error():
                reason = reason_text(msg.error.reason)
                self.current.failures[site] = reason
                self.ledger.append(f"{kind}-failed", {"round": self.current.server_round, "site": site,
                                                      "reason": reason})
            elif "metrics" in msg.content.metric_records:
                numbers = {k: float(v) for k, v in msg.content["metrics"].items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)}
                entry = {"round": self.current.server_round, "site": site,
                         "num_examples": numbers.get("num-examples"),
                         "metrics": {k: v for k, v in numbers.items() if k != "num-examples"}}
                if "arrays" in msg.content.array_records:  # what actually left the site
                    numbers["update_bytes"] = float(sum(len(a.data) for a in msg.content["arrays"].values()))
                    entry["update_hash"] = arrays_hash(msg.content["arrays"])
                    entry["update_bytes"] = numbers["update_bytes"]
                into[site] = numbers
                self.ledger.append(kind, entry)
        for site in sorted(set(self.sampled) - answered):  # died, or slower than round-timeout
            reason = f"site {site}: no reply within the round timeout"
            self.current.failures.setdefault(site, reason)
            self.ledger.append(f"{kind}-failed", {"round": self.current.server_round, "site": site, "reason": reason})
        return replies

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        server_round += self.offset
        self.current = SiteRound(server_round, time.perf_counter())
        if self.dtypes is None:
            self.dtypes = {k: a.numpy().dtype for k, a in arrays.items()}
        self.global_arrays = arrays
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.sampled = {self._name(m.metadata.dst_node_id): m.metadata.dst_node_id for m in messages}
        sent = dict(messages[0].content["config"]) if messages else dict(config)
        self.ledger.append("round-start", {"round": server_round, "sites": sorted(self.sampled), "config": sent,
                                           "global_model_hash": arrays_hash(arrays)})
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.offset
        replies = [m for m in self._collect(replies, self.current.train, "update") if not m.has_error()]
        if self.validation.enabled:
            started = time.perf_counter()
            reference = {k: a.numpy() for k, a in self.global_arrays.items()}
            replies, rejected, _ = validate_updates([(self._site(m), m) for m in replies], reference,
                                                    self.declared, self.validation)
            self.current.validation_ms = (time.perf_counter() - started) * 1000
            for site, reason in sorted(rejected.items()):
                self.current.rejected[site] = reason
                self.ledger.append("update-rejected", {"round": server_round, "site": site, "reason": reason})
        if len(replies) < self.min_valid:
            self.current.skipped = (f"{len(replies)} valid update(s), fewer than min-train-nodes = {self.min_valid}; "
                                    "the global model is unchanged")
            self.ledger.append("round-skipped", {"round": server_round, "reason": self.current.skipped,
                                                 "global_model_hash": arrays_hash(self.global_arrays)})
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None:  # the wrapped strategy declined (e.g. too few updates for Bulyan)
            self.current.skipped = f"{type(self.inner).__name__} did not aggregate {len(replies)} update(s)"
            self.ledger.append("round-skipped", {"round": server_round, "reason": self.current.skipped,
                                                 "global_model_hash": arrays_hash(self.global_arrays)})
            return None, metrics
        arrays = self._model_dtypes(arrays)
        if metrics is not None:
            self.current.train_aggregate = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.global_arrays = arrays
        self.ledger.append("aggregation", {
            "round": server_round, "sites": sorted(self._site(m) for m in replies),
            "global_model_hash": arrays_hash(arrays),
            "metrics": self.current.train_aggregate})
        return arrays, metrics

    def _model_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        """Keep the global model in the model's dtypes: FedAvg and FedOpt compute in float64 (and turn
        integer buffers into floats), which would double what is sent and make every update 'wrong'."""
        values = {k: a.numpy() for k, a in arrays.items()}
        if all(values[k].dtype == self.dtypes.get(k, values[k].dtype) for k in values):
            return arrays
        return ArrayRecord({k: Array(np.ascontiguousarray(
            np.rint(v) if np.issubdtype(self.dtypes[k], np.integer) else v).astype(self.dtypes[k]))
            for k, v in values.items()})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        messages = list(self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid))
        self.sampled = {self._name(m.metadata.dst_node_id): m.metadata.dst_node_id for m in messages}
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.offset
        replies = self._collect(replies, self.current.evaluate, "evaluation")
        metrics = self.inner.aggregate_evaluate(server_round, [m for m in replies if not m.has_error()])
        if metrics is not None:
            self.current.evaluate_aggregate = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.current.duration_s = time.perf_counter() - self.current.started
        self.ledger.append("round-end", {"round": server_round, "metrics": self.current.evaluate_aggregate,
                                         "failures": self.current.failures, "rejected": self.current.rejected,
                                         "duration_s": self.current.duration_s})
        self.on_round(self.current, self.global_arrays)
        return metrics
