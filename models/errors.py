"""The error types both sides know, and the texts both sides must say alike.

A node raises :class:`SiteDataError` (its data breaks the contract) or
:class:`PolicyRefusal` (the hospital's policy refuses the work); the node's
error boundary (client/boundary.py) turns them into replies whose text names
the site and the rule, never data. A refusal travels as a structured record
(``"refusal"``: site, rule, reason), so the coordinator never parses text.
"""

from __future__ import annotations


class SiteDataError(ValueError):
    """A site's data breaks the contract. The message is safe to leave the node."""


class PolicyRefusal(SiteDataError):
    """The site's policy refuses this work. The message is safe to leave the node.

    ``rule`` names the policy key that refused (``tasks``, ``max-rounds``, ``max-epsilon``, ...).
    """

    def __init__(self, message: str, rule: str = "policy"):
        super().__init__(message)
        self.rule = rule


# Both the coordinator (run-config check) and the node (before any training) refuse dp for the Cox model.
COX_REFUSAL = ("dp is refused for the survival endpoint: the Cox partial likelihood couples every patient in a risk "
               "set, so per-sample clipping does not bound one patient's influence and no reported ε would hold; "
               "use endpoint = 'response', or train survival without dp")

# The name of the ConfigRecord a refusing node replies with: {"site", "rule", "reason"} (client/mods.py).
REFUSAL = "refusal"
