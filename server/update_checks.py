"""Update checks on the coordinator, before any aggregation, and the wrapper that applies them (UpdateGuard).

An update must have the global model's tensor names, shapes and dtypes, only
finite values, a distance from the global model under the configured bound
(absolute, or a multiple of the round's median distance), and a ``num-examples``
that is a positive integer no larger than what the site declared when the run
started (or a configured cap). Anything else is left out with its reason: one
buggy or compromised hospital must not be able to steer or break the model.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


@dataclass(frozen=True)
class ValidationSettings:
    enabled: bool = True
    max_update_norm: float = 0.0  # absolute L2 bound on (update - global); 0 = off
    max_update_ratio: float = 10.0  # bound as a multiple of the round's median distance; 0 = off
    max_examples: int = 0  # cap on num-examples; 0 = what the site declared at the start


def _distance(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """L2 distance over the floating-point tensors (weights, BatchNorm statistics). Integer buffers are counters
    (BatchNorm's ``num_batches_tracked`` grows with a site's minibatches, i.e. with its size), not what it learned:
    counted in, they would make a large hospital's update look like an outlier."""
    return float(np.sqrt(sum(float(np.sum((update[k].astype(np.float64) - ref) ** 2))
                             for k, ref in reference.items() if np.issubdtype(ref.dtype, np.floating))))


def validate_updates(replies: list[tuple[str, Message]], reference: dict[str, np.ndarray], declared: dict[str, int],
                     settings: ValidationSettings) -> tuple[list[Message], dict[str, str], dict[str, float]]:
    """Split ``(site, reply)`` pairs into accepted replies and rejected sites with reasons; also the distances."""
    rejected: dict[str, str] = {}
    candidates: list[tuple[str, Message, float]] = []
    for site, msg in replies:
        reason = structural_problem(msg, reference)
        if reason is None:
            reason = _examples_problem(msg, declared.get(site), settings.max_examples)
        if reason is not None:
            rejected[site] = reason
            continue
        arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        candidates.append((site, msg, _distance(arrays, reference)))
    distances = {site: d for site, _, d in candidates}
    median = float(np.median(list(distances.values()))) if len(distances) >= 3 else None
    accepted = []
    for site, msg, distance in candidates:
        if settings.max_update_norm and distance > settings.max_update_norm:
            rejected[site] = f"update distance {distance:.3g} exceeds the bound {settings.max_update_norm:.3g}"
        elif settings.max_update_ratio and median and distance > settings.max_update_ratio * median:
            rejected[site] = (f"update distance {distance:.3g} exceeds {settings.max_update_ratio:g} x the round's "
                              f"median {median:.3g}")
        else:
            accepted.append(msg)
    return accepted, rejected, distances


def structural_problem(msg: Message, reference: dict[str, np.ndarray]) -> str | None:
    if "arrays" not in msg.content.array_records:
        return "no weights in the reply"
    arrays = msg.content["arrays"]
    if set(arrays.keys()) != set(reference):
        missing, extra = sorted(set(reference) - set(arrays.keys())), sorted(set(arrays.keys()) - set(reference))
        return f"tensor names differ from the global model (missing {missing[:3]}, extra {extra[:3]})"
    for name, expected in reference.items():
        value = arrays[name].numpy()
        if value.shape != expected.shape:
            return f"tensor '{name}' has shape {tuple(value.shape)}, expected {tuple(expected.shape)}"
        if value.dtype != expected.dtype:
            return f"tensor '{name}' has dtype {value.dtype}, expected {expected.dtype}"
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return f"tensor '{name}' holds NaN or infinite values"
    return None


def _examples_problem(msg: Message, declared: int | None, cap: int) -> str | None:
    metrics = msg.content["metrics"] if "metrics" in msg.content.metric_records else {}
    n = metrics.get("num-examples")
    if not isinstance(n, (int, float)) or n != int(n) or n <= 0:
        return f"num-examples {n!r} is not a positive integer"
    limit = cap or declared
    if limit and n > limit:
        return f"num-examples {int(n)} exceeds the {'cap' if cap else 'declared training cohort'} of {limit}"
    return None


class UpdateGuard(Strategy):
    """Wraps a strategy: only updates that pass :func:`validate_updates` reach it (as Flower's DP wrappers wrap).

    A rejected update is left out and reported to ``events`` (the round
    reporter: ``rejected(site, reason)``, ``checked(ms)``); with fewer than
    ``min_valid`` valid updates the round is not aggregated (the wrapped
    strategy is not asked, ``events.skipped(reason)``) and the global model
    stays. Every other decision is the wrapped strategy's.
    """

    def __init__(self, inner: Strategy, site_names: dict[int, str], declared: dict[str, int],
                 settings: ValidationSettings, min_valid: int, events):
        self.inner, self.site_names, self.declared = inner, site_names, declared
        self.settings, self.min_valid, self.events = settings, min_valid, events
        self.reference: dict[str, np.ndarray] = {}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.reference = {k: a.numpy() for k, a in arrays.items()}
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        if self.settings.enabled:
            started = time.perf_counter()
            labelled = [(self.site_names.get(m.metadata.src_node_id, f"node-{m.metadata.src_node_id}"), m)
                        for m in replies]
            replies, rejected, _ = validate_updates(labelled, self.reference, self.declared, self.settings)
            self.events.checked((time.perf_counter() - started) * 1000)
            for site, reason in sorted(rejected.items()):
                self.events.rejected(site, reason)
        if len(replies) < self.min_valid:
            self.events.skipped(f"{len(replies)} valid update(s), fewer than min-train-nodes = {self.min_valid}; "
                                "the global model is unchanged")
            return None, None
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return self.inner.aggregate_evaluate(server_round, replies)
