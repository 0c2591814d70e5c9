"""Who is in the federation: ask every node for its site name and feature schema.

This happens before any MLflow run is opened, so a site with broken data stops
the run with a clear error and leaves no half-finished run behind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from models.errors import REFUSAL


class FederationError(RuntimeError):
    """The federation cannot run as configured; the message says which site and why."""


@dataclass(frozen=True)
class SiteInfo:
    node_id: int
    name: str
    features: tuple[str, ...]
    num_train: int
    num_test: int
    skipped_rows: int
    privacy: dict[str, float] = field(default_factory=dict)  # a dp run's plan against the site's budget

    def budget_warning(self, rounds: int) -> str:
        """Said before round 1 when the site's privacy budget carries fewer rounds than the run asks for."""
        allowed = self.privacy.get("dp-rounds-allowed")
        if allowed is None or allowed >= rounds:
            return ""
        return (f"site {self.name}: its privacy budget carries {int(allowed)} of the {rounds} rounds "
                f"(ε spent {self.privacy['epsilon-spent']:.3f} of max-epsilon {self.privacy['max-epsilon']:g}); "
                f"it will refuse round {int(allowed) + 1} and later")


@dataclass(frozen=True)
class Refusal:
    """A site's policy refused the work (read from the reply's ``"refusal"`` record, never from text)."""

    site: str
    rule: str  # the policy key that refused
    reason: str  # for display


def refusal_of(msg: Message) -> Refusal | None:
    """The refusal a reply carries, if it is one."""
    if msg.has_error() or REFUSAL not in msg.content.config_records:
        return None
    record = msg.content[REFUSAL]
    return Refusal(str(record["site"]), str(record["rule"]), str(record["reason"]))


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} of the required {minimum} nodes connected within {timeout:.0f}s")
        time.sleep(1.0)


def exchange(grid: Grid, contents: dict[int, RecordDict], message_type: str, timeout: float
             ) -> tuple[dict[int, Message], dict[int, str], dict[int, Refusal]]:
    """One message per node: the good replies by node, for every other node why it gave none (its error's text,
    which names the site, or "no reply within ..."), and the refusals."""
    messages = [Message(content, dst_node_id=node, message_type=message_type) for node, content in contents.items()]
    replies = {m.metadata.src_node_id: m for m in grid.send_and_receive(messages, timeout=timeout)}
    ok, failed, refused = {}, {}, {}
    for node in contents:
        reply = replies.get(node)
        if reply is None:
            failed[node] = f"no reply within {timeout:.0f}s"
        elif reply.has_error():
            failed[node] = reply.error.reason
        elif (refusal := refusal_of(reply)) is not None:
            refused[node] = refusal
        else:
            ok[node] = reply
    return ok, failed, refused


PRIVACY_PLAN = ("epsilon-spent", "epsilon-planned", "delta", "dp-rounds-allowed", "max-epsilon")


def discover_sites(grid: Grid, minimum: int, timeout: float, config: dict | None = None
                   ) -> tuple[dict[int, SiteInfo], dict[int, tuple[str, str]]]:
    """Sites that accept the run, and those whose policy refuses it (node -> (site, reason)).

    A refusal is the hospital's right and does not stop the run; broken data does.
    ``config`` adds the task keys of a model under validation (names and numbers only).
    """
    nodes = wait_for_nodes(grid, minimum, timeout)
    config = ConfigRecord({"request": "describe", **(config or {})})
    replies, failed, refusals = exchange(grid, {node: RecordDict({"config": config}) for node in nodes},
                                         MessageType.QUERY, timeout)
    sites: dict[int, SiteInfo] = {}
    refused = {node: (r.site, r.reason) for node, r in refusals.items()}
    problems = [reason if reason.startswith("site ") else f"node {node}: {reason}" for node, reason in failed.items()]
    for node, msg in replies.items():
        info, metrics = msg.content["site"], msg.content["metrics"]
        privacy = {k: float(metrics[k]) for k in PRIVACY_PLAN if k in metrics}
        sites[node] = SiteInfo(node, str(info["site-name"]), tuple(info["features"]), int(metrics["num-train"]),
                               int(metrics["num-test"]), int(metrics["skipped-rows"]), privacy)
    if problems:
        raise FederationError("site check failed:\n  - " + "\n  - ".join(problems))
    if not sites:
        raise FederationError("every site's policy refuses this run:\n  - " +
                              "\n  - ".join(reason for _, reason in refused.values()))
    names = [s.name for s in sites.values()]
    if len(set(names)) != len(names):
        raise FederationError(f"two nodes claim the same site name: {sorted(names)}")
    reference = min(sites.values(), key=lambda s: s.name)
    for site in sites.values():
        if site.features != reference.features:
            missing = sorted(set(reference.features) - set(site.features))
            extra = sorted(set(site.features) - set(reference.features))
            raise FederationError(
                f"site {site.name} has different feature columns from {reference.name}: "
                f"missing {missing}, extra {extra}"
            )
    return sites, refused
