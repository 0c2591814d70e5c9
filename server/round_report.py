"""What each round produced, and the outermost strategy wrapper that records it (ledger, tracking, progress).

:class:`RoundReporter` wraps the strategy the way Flower's DP wrappers do and
only watches: which site answered, with what numbers, which failed, refused
or was rejected (the update guard tells it), what was aggregated and how long
the round took. A reply is attributed to a site by the node its instruction
was sent to (``reply_to_message_id``), so an error the SuperLink writes for a
vanished node is attributed exactly, never guessed.

A wrapped strategy that runs the round's training itself (``runs_the_round``:
secure aggregation, server/secure_aggregation.py) sends nothing from
``configure_train``; its ``planned`` messages name the sampled sites and its
``replies`` (metrics only, or errors) are recorded as the round's updates, with
its protocol record (who is in the sum, who was left out) on ``aggregation``.

Ledger events per round: ``round-start`` (sampled sites, config, hash of the
global model sent), ``update`` / ``update-failed`` per site,
``update-rejected`` (the guard), ``aggregation`` or ``round-skipped``,
``evaluation`` / ``evaluation-failed`` per site and ``round-end``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from models.builders import model_hash
from models.ledger import Ledger
from server.sites import refusal_of


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
    secure: dict = field(default_factory=dict)  # secure aggregation: who is in the sum, who was left out, the bound

    @property
    def epsilon_max(self) -> float | None:
        """Under dp, the largest ε a site reported this round (an average of ε would mean nothing)."""
        return max((m["epsilon"] for m in self.train.values() if "epsilon" in m), default=None)


def arrays_hash(arrays: ArrayRecord) -> str:
    return model_hash({k: a.numpy() for k, a in arrays.items()})


def _numbers(record: MetricRecord | None) -> dict[str, float]:
    return {k: float(v) for k, v in (record or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RoundReporter(Strategy):
    """The outermost wrapper: records every round in the ledger and hands each finished round to ``on_round``.

    ``round_offset`` makes a resumed run continue its round numbers. The inner
    strategy is set with :meth:`wrapping` (the update guard reports its
    rejections and skips to this reporter, so the reporter exists first).
    """

    def __init__(self, site_names: dict[int, str], on_round: Callable[[SiteRound, ArrayRecord], None],
                 ledger: Ledger, round_offset: int = 0):
        self.inner: Strategy | None = None
        self.site_names, self.on_round, self.ledger, self.offset = site_names, on_round, ledger, round_offset
        self.current: SiteRound | None = None
        self.global_arrays: ArrayRecord | None = None
        self.sent: list[Message] = []  # this phase's instructions: their ids attribute the replies

    def wrapping(self, inner: Strategy) -> "RoundReporter":
        self.inner = inner
        return self

    def summary(self) -> None:
        self.inner.summary()

    # ------------------------------------------------------------ told by the update guard

    def rejected(self, site: str, reason: str) -> None:
        self.current.rejected[site] = reason
        self.ledger.append("update-rejected", {"round": self.current.server_round, "site": site, "reason": reason})

    def skipped(self, reason: str) -> None:
        self.current.skipped = reason

    def checked(self, milliseconds: float) -> None:
        self.current.validation_ms = milliseconds

    # ------------------------------------------------------------ attribution

    def _name(self, node: int) -> str:
        return self.site_names.get(node, f"node-{node}")

    def _sampled(self) -> dict[str, int]:
        return {self._name(m.metadata.dst_node_id): m.metadata.dst_node_id for m in self.sent}

    def _collect(self, replies: Iterable[Message], into: dict[str, dict[str, float]], kind: str) -> list[Message]:
        """Record each reply under its site; the good replies, in order."""
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent if m.metadata.message_id}
        answered, good = set(), []
        for msg in replies:
            site = self._name(node_of.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id))
            answered.add(site)
            refusal = refusal_of(msg)
            if msg.has_error() or refusal is not None:
                reason = refusal.reason if refusal is not None else msg.error.reason
                self.current.failures[site] = reason
                self.ledger.append(f"{kind}-failed", {"round": self.current.server_round, "site": site,
                                                      "reason": reason,
                                                      **({"refused": refusal.rule} if refusal else {})})
                continue
            numbers = _numbers(msg.content["metrics"] if "metrics" in msg.content.metric_records else None)
            entry = {"round": self.current.server_round, "site": site, "num_examples": numbers.get("num-examples"),
                     "metrics": {k: v for k, v in numbers.items() if k != "num-examples"}}
            if "arrays" in msg.content.array_records:  # what actually left the site
                numbers["update_bytes"] = float(sum(len(a.data) for a in msg.content["arrays"].values()))
                entry["update_hash"] = arrays_hash(msg.content["arrays"])
                entry["update_bytes"] = numbers["update_bytes"]
            into[site] = numbers
            self.ledger.append(kind, entry)
            good.append(msg)
        for site in sorted(set(self._sampled()) - answered):  # slower than round-timeout
            reason = f"site {site}: no reply within the round timeout"
            self.current.failures.setdefault(site, reason)
            self.ledger.append(f"{kind}-failed", {"round": self.current.server_round, "site": site, "reason": reason})
        return good

    # ------------------------------------------------------------ the strategy's four steps

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        server_round += self.offset
        self.current = SiteRound(server_round, time.perf_counter())
        self.global_arrays = arrays
        # a strategy that runs the round itself (secure aggregation) returns nothing to send; it says what it
        # planned, which only attributes the replies (never sent from here)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.sent = messages or list(getattr(self.inner, "planned", []))
        config_sent = dict(self.sent[0].content["config"]) if self.sent else dict(config)
        self.ledger.append("round-start", {"round": server_round, "sites": sorted(self._sampled()),
                                           "config": config_sent, "global_model_hash": arrays_hash(arrays)})
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.offset
        if getattr(self.inner, "runs_the_round", False):  # secure aggregation: the replies come out of its protocol
            arrays, metrics = self.inner.aggregate_train(server_round, replies)
            good = self._collect(self.inner.replies, self.current.train, "update")
        else:
            good = self._collect(replies, self.current.train, "update")
            arrays, metrics = self.inner.aggregate_train(server_round, good)
        secure = _secure_record(self.inner, self._name)
        self.current.secure = secure.get("secure_aggregation", {})
        if arrays is None:
            if not self.current.skipped:  # the wrapped strategy declined (e.g. too few updates for Bulyan)
                self.current.skipped = getattr(self.inner, "skip_reason", "") or \
                    f"{type(_innermost(self)).__name__} did not aggregate {len(good)} update(s)"
            self.ledger.append("round-skipped", {"round": server_round, "reason": self.current.skipped,
                                                 "global_model_hash": arrays_hash(self.global_arrays), **secure})
            return None, metrics
        self.current.train_aggregate = _numbers(metrics)
        self.global_arrays = arrays
        used = set(self.current.train) - set(self.current.rejected)
        self.ledger.append("aggregation", {"round": server_round, "sites": sorted(used),
                                           "global_model_hash": arrays_hash(arrays),
                                           "metrics": self.current.train_aggregate, **secure})
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.sent = list(self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid))
        return self.sent

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.offset
        good = self._collect(replies, self.current.evaluate, "evaluation")
        metrics = self.inner.aggregate_evaluate(server_round, good)
        self.current.evaluate_aggregate = _numbers(metrics)
        self.current.duration_s = time.perf_counter() - self.current.started
        self.ledger.append("round-end", {"round": server_round, "metrics": self.current.evaluate_aggregate,
                                         "failures": self.current.failures, "rejected": self.current.rejected,
                                         "duration_s": self.current.duration_s})
        self.on_round(self.current, self.global_arrays)
        return metrics


def _secure_record(strategy: Strategy, name: Callable[[int], str]) -> dict:
    """A secure round's protocol record for the ledger: who is in the sum, the bound, the quantisation step."""
    last = getattr(strategy, "last", None)
    if last is None:
        return {}
    from server.secure_aggregation import quantisation_step

    return {"secure_aggregation": {
        "in_sum": sorted(name(n) for n in last.answered) if last.mean_update else [],
        "left_out": {name(n): reason for n, reason in sorted(last.failed.items())},
        "update_norm_bound": strategy.update_norm, "quantisation_step": quantisation_step(strategy.update_norm),
        "protocol_stages": last.stages, "protocol_seconds": round(last.seconds, 3)}}


def _innermost(strategy: Strategy) -> Strategy:
    while getattr(strategy, "inner", None) is not None:
        strategy = strategy.inner
    return strategy
