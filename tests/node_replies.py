"""What a node's reply says when it did not do the work: a refusal record, or an error's text (client/mods.py)."""

import re

from flwr.app import Message


def refusal(reply: Message, match: str, rule: str | None = None) -> dict:
    """The reply is a structured refusal whose reason matches ``match`` (re.search) and, if given, names ``rule``."""
    assert not reply.has_error(), f"an error, not a refusal: {reply.error.reason}"
    assert set(reply.content.keys()) == {"refusal"}, f"not a refusal: {list(reply.content.keys())}"
    record = dict(reply.content["refusal"])
    assert re.search(match, record["reason"]), record["reason"]
    assert record["reason"].startswith(f"site {record['site']}: policy refuses") or "policy file" in record["reason"]
    if rule is not None:
        assert record["rule"] == rule
    return record


def error_text(reply: Message, match: str) -> str:
    """The reply is an error whose text (all that leaves the node) matches ``match`` (re.search)."""
    assert reply.has_error(), f"no error in the reply: {list(reply.content.keys())}"
    assert re.search(match, reply.error.reason), reply.error.reason
    return reply.error.reason
