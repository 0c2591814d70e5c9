"""Who is in the federation: ask every node for its site name and feature schema.

This happens before any MLflow run is opened, so a site with broken data stops
the run with a clear error and leaves no half-finished run behind.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid


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


def reason_text(reason: str) -> str:
    """The ClientApp's own error text, without the runtime's wrapping.

    A SuperNode sends "<class 'X'>:<'text'>"; the simulation sends Ray's whole
    traceback ending in "... Message: text". Keep just the text.
    """
    simulated = re.findall(r"Message: (.*)", reason)
    if simulated:
        return simulated[-1].strip().removesuffix("'>")
    match = re.search(r":<'(.*)'>\s*$", reason, flags=re.S)
    if match:
        return match.group(1)
    lines = [line for line in reason.strip().splitlines() if line.strip()]
    return lines[-1] if lines else reason


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
             ) -> tuple[dict[int, Message], dict[int, str]]:
    """One message per node; the good replies by node, and for every other node why it gave none."""
    messages = [Message(content, dst_node_id=node, message_type=message_type) for node, content in contents.items()]
    replies = {m.metadata.src_node_id: m for m in grid.send_and_receive(messages, timeout=timeout)}
    ok, failed = {}, {}
    for node in contents:
        reply = replies.get(node)
        if reply is None:
            failed[node] = f"no reply within {timeout:.0f}s"
        elif reply.has_error():
            failed[node] = reason_text(reply.error.reason)
        else:
            ok[node] = reply
    return ok, failed


PRIVACY_PLAN = ("epsilon-spent", "epsilon-planned", "delta", "dp-rounds-allowed", "max-epsilon")
REFUSAL = re.compile(r"^site (?P<site>.+?): policy refuses")


def discover_sites(grid: Grid, minimum: int, timeout: float, config: dict | None = None
                   ) -> tuple[dict[int, SiteInfo], dict[int, tuple[str, str]]]:
    """Sites that accept the run, and those whose policy refuses it (node -> (site, reason)).

    A refusal is the hospital's right and does not stop the run; broken data does.
    ``config`` adds the task keys of a model under validation (names and numbers only).
    """
    nodes = wait_for_nodes(grid, minimum, timeout)
    messages = [
        Message(RecordDict({"config": ConfigRecord({"request": "describe", **(config or {})})}), dst_node_id=node,
                message_type=MessageType.QUERY)
        for node in nodes
    ]
    replies = {msg.metadata.src_node_id: msg for msg in grid.send_and_receive(messages, timeout=timeout)}
    sites: dict[int, SiteInfo] = {}
    refused: dict[int, tuple[str, str]] = {}
    problems: list[str] = []
    for node in nodes:
        msg = replies.get(node)
        if msg is None:
            problems.append(f"node {node} did not answer within {timeout:.0f}s")
        elif msg.has_error() and REFUSAL.match(reason_text(msg.error.reason)):
            reason = reason_text(msg.error.reason)
            refused[node] = (REFUSAL.match(reason).group("site"), reason)
        elif msg.has_error():
            problems.append(reason_text(msg.error.reason))
        else:
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
