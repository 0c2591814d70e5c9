"""Secure aggregation: each round's training through Flower's SecAgg+, so the coordinator learns only the sum.

Run-config ``secure-aggregation = true``. Every site masks its update with
pairwise and private masks (Flower's ``secaggplus_mod`` on the node, client/mods.py);
the masks cancel only in the sum of all sites' updates, weighted by their
number of examples, so the coordinator never sees one site's update. Sites
that drop out after sharing their keys are recovered from the others' key
shares (Shamir), as long as at least the reconstruction threshold of them remain.

Flower 1.42 runs SecAgg+ only on its legacy workflow API
(:class:`flwr.server.workflow.SecAggPlusWorkflow` inside a ``LegacyContext``), not
through ``Strategy.start``. :class:`SecureAggregation` hides that behind the
Message-API strategy interface: it wraps FedAvg or FedProx (which still sample
the nodes, write the train config and average the metrics) and runs a round's
training through the protocol; evaluation is the wrapped strategy's own. When
Flower ships a Message-API SecAgg+, only :func:`run_secagg_round` changes.

What travels (client/secure_update.py): each site sends its **update** (its
trained float weights minus the global ones; integer buffers such as BatchNorm's
step counter are not aggregated and stay the coordinator's), which the node
itself checks finite and scales to at most ``secure-update-norm`` (L2) before
masking. SecAgg+ quantises every value into ±``clipping_range``; a vector whose
L2 norm is at most the bound has no element beyond it, so ``clipping_range`` is
that bound and the quantisation never clips. Raw weights (BatchNorm's running
variances, say) could exceed any fixed range, updates are small.

What the coordinator can no longer do under it, and says so: check each
update (server/update_checks.py), robust strategies (they need every update),
per-site update hashes in its ledger. The sites' own ledgers record the hash of
what each sent before masking.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server.sites import FederationError, refusal_of

STRATEGIES = ("fedavg", "fedprox")  # the others need each site's update, which secure aggregation hides
MIN_SITES = 3  # with two, each site could subtract its own update from the sum and learn the other's
RECONSTRUCTION_THRESHOLD = 0.6  # of the shares: > 1/2 keeps masks safe, < 1 tolerates dropouts (2 of 5)
QUANTIZATION_RANGE = 2**22  # Flower's default: values are mapped to integers in [0, 2^22)
SECURE_KEYS = "secure-keys"  # the train config's list (comma-joined) of the arrays that are aggregated


def secure_keys(arrays: ArrayRecord) -> list[str]:
    """The arrays a secure round aggregates: the floating-point ones (weights, biases, BatchNorm statistics)."""
    return [k for k, a in arrays.items() if np.issubdtype(np.dtype(a.dtype), np.floating)]


def quantisation_step(clipping_range: float) -> float:
    """The spacing of SecAgg+'s integer grid over ±clipping_range. Flower rounds stochastically (unbiased), so
    each site's weighted value is off by less than one step; the mean of ``n`` sites whose weights (examples
    over the largest site's) sum to ``W`` is off by less than ``n * step / W``."""
    return 2 * clipping_range / QUANTIZATION_RANGE


@dataclass
class SecureRound:
    """What one secure round produced: the weighted mean update, and what each node sent or why not."""

    mean_update: dict[str, np.ndarray] = field(default_factory=dict)
    answered: dict[int, tuple[int, dict]] = field(default_factory=dict)  # node -> (num_examples, metrics)
    failed: dict[int, str] = field(default_factory=dict)  # node -> why it is not in the sum
    refused: dict[int, Message] = field(default_factory=dict)  # node -> its structured refusal
    bytes_received: dict[int, int] = field(default_factory=dict)  # node -> bytes of its replies, all stages
    stages: int = 0  # protocol stages that ran (4: the sum was unmasked)
    seconds: float = 0.0


class _Watched:
    """The grid as the protocol sees it: each node's replies are kept (who dropped out, and why), and a
    node's structured refusal becomes an error reply, which the protocol treats as a dropout."""

    def __init__(self, grid: Grid, result: SecureRound):
        self.grid, self.result = grid, result

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = list(messages)
        replies = list(self.grid.send_and_receive(sent, timeout=timeout))
        self.result.stages += 1
        by_id = {m.metadata.message_id: m for m in sent}
        answered, out = set(), []
        for reply in replies:
            # by the instruction it answers: the SuperLink's error for a vanished node comes from the SuperLink
            original = by_id.get(reply.metadata.reply_to_message_id)
            node = original.metadata.dst_node_id if original is not None else reply.metadata.src_node_id
            answered.add(node)
            if not reply.has_error():
                self.result.bytes_received[node] = self.result.bytes_received.get(node, 0) + _size(reply.content)
            refusal = refusal_of(reply)
            if refusal is not None:
                self.result.refused.setdefault(node, reply)
                self.result.failed.setdefault(node, refusal.reason)
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, refusal.reason), reply_to=original) \
                    if original is not None else reply
            elif reply.has_error():
                self.result.failed.setdefault(node, reply.error.reason)
            out.append(reply)
        for message in sent:
            if message.metadata.dst_node_id not in answered:
                self.result.failed.setdefault(message.metadata.dst_node_id, "no reply within the round timeout")
        return out


def _size(content: RecordDict) -> int:
    """Bytes of a reply's payload: arrays and the byte strings of its config records (masked vectors, keys)."""
    total = sum(len(a.data) for record in content.array_records.values() for a in record.values())
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) for v in items if isinstance(v, (bytes, str)))
    return total


def _secagg_plus():
    """Flower's SecAgg+ workflow, with the dropout set it unmasks corrected (see ``collect_masked_vectors_stage``)."""
    from flwr.server.workflow import SecAggPlusWorkflow

    class SecAggPlus(SecAggPlusWorkflow):
        def collect_masked_vectors_stage(self, grid, context, state) -> bool:
            # Flower 1.42 unmasks as dropouts all nodes sampled at setup that did not send a masked vector,
            # including one lost before its key shares went out: the others hold no share of it (its nodes fail
            # with a KeyError) and never masked with it. Only a node whose shares went out can drop out from here.
            shared = set(state.active_node_ids)
            state.sampled_node_ids = shared
            state.nid_to_neighbours = {nid: neighbours & shared for nid, neighbours in state.nid_to_neighbours.items()}
            return super().collect_masked_vectors_stage(grid, context, state)

    return SecAggPlus


def run_secagg_round(grid: Grid, context: Context, server_round: int, global_arrays: ArrayRecord,
                     planned: list[Message], clipping_range: float, max_weight: float, timeout: float
                     ) -> SecureRound:
    """One round's training through Flower's SecAgg+ workflow (legacy API), for the nodes in ``planned``.

    Each planned message's ``config`` travels in the legacy FitIns, with the
    global model's arrays; the nodes answer the protocol's four stages (setup,
    share keys, masked vectors, unmask). Returns the weighted mean of the
    sites' updates over :data:`SECURE_KEYS`, or an empty one if the protocol halted.
    """
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import Strategy as LegacyStrategy
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    result = SecureRound()
    keys = secure_keys(global_arrays)
    watched = _Watched(grid, result)
    fit = {m.metadata.dst_node_id: FitIns(
        ndarrays_to_parameters([global_arrays[k].numpy() for k in global_arrays]),
        {**dict(m.content["config"]), SECURE_KEYS: ",".join(keys)}) for m in planned}
    captured: dict = {}

    class Handoff(LegacyStrategy):
        """The legacy strategy the workflow drives: it hands out our instructions and keeps the sum."""

        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            return [(GridClientProxy(node, watched, context.run_id), ins) for node, ins in fit.items()]

        def aggregate_fit(self, server_round, results, failures):
            captured["results"] = results
            return (results[0][1].parameters if results else None), {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    legacy = LegacyContext(Context(run_id=context.run_id, node_id=context.node_id, node_config={},
                                   state=RecordDict(), run_config=dict(context.run_config)),
                           config=ServerConfig(num_rounds=1, round_timeout=timeout), strategy=Handoff(),
                           client_manager=SimpleClientManager())
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        fit[next(iter(fit))].parameters, keep_input=True)
    workflow = _secagg_plus()(num_shares=1.0, reconstruction_threshold=RECONSTRUCTION_THRESHOLD,
                              max_weight=max_weight, clipping_range=clipping_range,
                              quantization_range=QUANTIZATION_RANGE, timeout=timeout)
    started = time.perf_counter()
    workflow(watched, legacy)
    result.seconds = time.perf_counter() - started
    for proxy, fitres in captured.get("results", []):
        result.answered[proxy.node_id] = (int(fitres.num_examples), dict(fitres.metrics))
        result.failed.pop(proxy.node_id, None)
    if captured.get("results"):
        mean = parameters_to_ndarrays(captured["results"][0][1].parameters)
        if len(mean) != len(keys):
            raise FederationError(f"secure aggregation returned {len(mean)} arrays for {len(keys)} secure keys")
        result.mean_update = dict(zip(keys, mean))
    else:
        for node in fit:
            result.failed.setdefault(node, "secure aggregation halted: too few sites remained to unmask the sum")
    return result


class SecureAggregation(Strategy):
    """A strategy wrapper whose training rounds run through SecAgg+; everything else is the wrapped strategy's.

    ``inner`` (FedAvg or FedProx) samples the nodes and writes the train config
    (:meth:`configure_train` returns no messages of its own: the protocol sends
    them), averages the sites' training metrics and runs the evaluation. The
    new global model is the old one plus the sites' weighted mean update.
    After each round, :attr:`replies` holds one metrics-only reply per site
    that is in the sum and an error reply per site that is not, for the round
    reporter (server/round_report.py), and :attr:`last` the protocol's record.
    """

    runs_the_round = True

    def __init__(self, inner: Strategy, context: Context, update_norm: float, max_weight: float, timeout: float):
        self.inner, self.context = inner, context
        self.update_norm, self.max_weight, self.timeout = update_norm, max(1.0, float(max_weight)), timeout
        self.planned: list[Message] = []
        self.replies: list[Message] = []
        self.last: SecureRound | None = None
        self.skip_reason = ""  # why the last round produced no sum, for the round reporter
        self._grid: Grid | None = None
        self._global: ArrayRecord | None = None

    def summary(self) -> None:
        log(INFO, "\t├── Secure aggregation (SecAgg+): update norm <= %g, reconstruction threshold %g",
            self.update_norm, RECONSTRUCTION_THRESHOLD)
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.planned = list(self.inner.configure_train(server_round, arrays, config, grid))
        for message in self.planned:  # the node's own bound, in the instruction it trains by
            message.content["config"]["secure-update-norm"] = self.update_norm
        self._grid, self._global = grid, arrays
        return []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        self.replies, self.skip_reason = [], ""
        if len(self.planned) < MIN_SITES:  # sites went away: no round rather than an unsafe one
            self.last = None
            self.skip_reason = (f"only {len(self.planned)} sites connected; secure aggregation needs at least "
                                f"{MIN_SITES}")
            self.replies = [Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"secure round not held: "
                                          f"{self.skip_reason}"), reply_to=m) for m in self.planned]
            return None, None
        result = run_secagg_round(self._grid, self.context, server_round, self._global, self.planned,
                                  self.update_norm, self.max_weight, self.timeout)
        self.last = result
        for message in self.planned:
            node = message.metadata.dst_node_id
            if node in result.answered and result.mean_update:
                num_examples, metrics = result.answered[node]
                numbers = {k: float(v) for k, v in metrics.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)}
                numbers.update({"num-examples": float(num_examples),
                                "update_bytes": float(result.bytes_received.get(node, 0))})
                self.replies.append(Message(RecordDict({"metrics": MetricRecord(numbers)}), reply_to=message))
            elif node in result.refused:
                self.replies.append(result.refused[node])
            else:
                reason = result.failed.get(node, "not in the secure sum")
                self.replies.append(Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message))
        if not result.mean_update:
            kept = len(self.planned) - len(result.failed)
            self.skip_reason = (f"secure aggregation halted after {result.stages} of 4 stages: {kept} of "
                                f"{len(self.planned)} sites remained, too few to unmask the sum")
            return None, None
        arrays = ArrayRecord({k: Array(_added(a.numpy(), result.mean_update.get(k))) for k, a in self._global.items()})
        good = [m.content for m in self.replies if not m.has_error() and "metrics" in m.content.metric_records]
        metrics = self.inner.train_metrics_aggr_fn(good, self.inner.weighted_by_key) if good else None
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return self.inner.aggregate_evaluate(server_round, replies)


def _added(current: np.ndarray, update: np.ndarray | None) -> np.ndarray:
    """The global array plus the mean update, in the global array's own dtype (no update: unchanged)."""
    if update is None:
        return current
    return (current.astype(np.float64) + update.reshape(current.shape)).astype(current.dtype, order="C")  # 0-d stays 0-d
