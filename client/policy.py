"""A hospital's own policy: which work its node accepts, checked on the node before any data is read.

Node config ``policy`` names a TOML file (example: ``configs/site-policy.example.toml``).
Without one, the defaults apply: every task, any number of rounds, any app,
and at least 20 patients or images (smaller cohorts leak). A refusal is raised
as :class:`PolicyRefusal` with the rule's key; its text names the site and the rule, never data, and the
node's error boundary sends it as a structured refusal (client/mods.py).

``allowed-app-hashes`` (full FAB SHA-256s) is enforced outside the app, by the launcher
(client/launcher.py: :meth:`SitePolicy.check_app` before the FAB is installed); what the app
checks itself (:meth:`SitePolicy.check_run`) only catches a node that pins apps without it.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from models.errors import PolicyRefusal

DEFAULT_MIN_EXAMPLES = 20
DEFAULT_MAX_ANALYSIS_ITERATIONS = 25  # each Newton iteration of an analysis is a query of the site's data
# Set by the launcher in each ClientApp process it lets run: the full FAB hash it verified (client/launcher.py).
VERIFIED_APP_ENV = "FEDHOSP_VERIFIED_APP"
FULL_HASH = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class SitePolicy:
    tasks: tuple[str, ...] = ()  # empty: every task
    max_rounds: int = 0  # 0: no limit
    min_examples: int = DEFAULT_MIN_EXAMPLES
    app_hashes: tuple[str, ...] = ()  # empty: any app
    modes: tuple[str, ...] = ()  # empty: every mode (train, validate, cross-site, analyse)
    max_analysis_iterations: int = DEFAULT_MAX_ANALYSIS_ITERATIONS
    max_epsilon: float = 0.0  # > 0: training must use dp, and each data set's total ε stays within this
    delta: float = 0.0  # the δ at which this site's ε is counted; 0: the run's dp-delta
    require_secure_aggregation: bool = False  # train only under secure aggregation (client/secure_update.py)
    min_sites: int = 3  # the fewest sites a secure round may have

    @classmethod
    def load(cls, path: str | Path | None, site: str) -> "SitePolicy":
        if not path:
            return cls()
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PolicyRefusal(f"site {site}: policy file cannot be read ({type(exc).__name__}); refusing all work",
                                rule="policy-file") from None
        unknown = set(raw) - {"tasks", "max-rounds", "min-examples", "allowed-app-hashes", "modes",
                              "max-analysis-iterations", "max-epsilon", "delta",
                              "require-secure-aggregation", "min-sites"}
        if unknown:
            raise PolicyRefusal(f"site {site}: policy file has unknown keys {sorted(unknown)}; refusing all work",
                                rule="policy-file")
        app_hashes = tuple(str(h).strip().lower() for h in raw.get("allowed-app-hashes", ()))
        if not all(FULL_HASH.fullmatch(h) for h in app_hashes):
            raise PolicyRefusal(f"site {site}: policy file's allowed-app-hashes must be full FAB SHA-256 hashes "
                                "(64 hex digits, as `fedhosp site app-hash` prints them); refusing all work",
                                rule="policy-file")
        return cls(tuple(raw.get("tasks", ())), int(raw.get("max-rounds", 0)),
                   int(raw.get("min-examples", DEFAULT_MIN_EXAMPLES)), app_hashes,
                   tuple(str(m) for m in raw.get("modes", ())),
                   int(raw.get("max-analysis-iterations", DEFAULT_MAX_ANALYSIS_ITERATIONS)),
                   float(raw.get("max-epsilon", 0.0)), float(raw.get("delta", 0.0)),
                   bool(raw.get("require-secure-aggregation", False)), int(raw.get("min-sites", 3)))

    def check_run(self, site: str, task: str, num_rounds: int, server_round: int | None, app_hash: str | None,
                  mode: str = "train") -> None:
        """Rules that need no data: mode, task, rounds, app."""
        if self.modes and mode not in self.modes:
            raise PolicyRefusal(f"site {site}: policy refuses mode '{mode}' (accepts {', '.join(self.modes)})", rule="modes")
        if self.tasks and task not in self.tasks:
            raise PolicyRefusal(f"site {site}: policy refuses task '{task}' (accepts {', '.join(self.tasks)})", rule="tasks")
        if self.max_rounds and max(num_rounds, server_round or 0) > self.max_rounds:
            raise PolicyRefusal(f"site {site}: policy refuses runs of more than {self.max_rounds} rounds "
                                f"(this run has {num_rounds})", rule="max-rounds")
        if self.app_hashes:
            # The launcher checked the full hash before this app was installed; this only catches a node that pins
            # apps but does not start its ClientApps through the launcher (a changed app would skip it anyway).
            if not app_hash:
                raise PolicyRefusal(f"site {site}: policy refuses to run an app it has not checked: it pins "
                                    "allowed-app-hashes, but this ClientApp was not started by fedhosp's launcher",
                                    rule="allowed-app-hashes")
            self.check_app(site, app_hash)

    def check_app(self, site: str, fab_hash: str) -> None:
        """``fab_hash``: the SHA-256 of the FAB's bytes, full (the launcher computes it before installing)."""
        if self.app_hashes and fab_hash.lower() not in self.app_hashes:
            raise PolicyRefusal(f"site {site}: policy refuses app {fab_hash} (not in allowed-app-hashes)",
                                rule="allowed-app-hashes")

    def check_analysis_iteration(self, site: str, iteration: int) -> None:
        if iteration > self.max_analysis_iterations:
            raise PolicyRefusal(f"site {site}: policy refuses more than {self.max_analysis_iterations} Newton "
                                "iterations of one analysis (each is a query of its data)", rule="max-analysis-iterations")

    def privacy_delta(self, run_delta: float) -> float:
        """The δ this site counts its ε at: its own when the policy sets one."""
        return self.delta or run_delta

    def check_privacy(self, site: str, dp: bool, server_round: int | None, spent: float, after: float) -> None:
        """With a budget (``max-epsilon``), training needs dp and must keep the data set's ε within it.

        ``spent``: the data set's ε before this round; ``after``: with it.
        """
        if not self.max_epsilon:
            return
        if not dp:
            raise PolicyRefusal(f"site {site}: policy refuses training without differential privacy (its budget is "
                                f"max-epsilon = {self.max_epsilon:g}); run with dp = true", rule="max-epsilon")
        if after > self.max_epsilon:
            raise PolicyRefusal(f"site {site}: policy refuses round {server_round}: the privacy budget would be "
                                f"exceeded (ε spent {spent:.3f} of max-epsilon {self.max_epsilon:g}; this round "
                                f"would bring it to {after:.3f})", rule="max-epsilon")

    def check_examples(self, site: str, count: int, unit: str, work: str = "train on") -> None:
        if count < self.min_examples:
            raise PolicyRefusal(f"site {site}: policy refuses to {work} {count} {unit}; "
                                f"the minimum is {self.min_examples}", rule="min-examples")


def installed_app_hash(module_file: str) -> str | None:
    """The full FAB hash the launcher verified for this ClientApp process, if ``module_file`` lies in that FAB's
    install folder (Flower names it ``<publisher>.<name>.<version>.<first 8 hex digits>``); None without the
    launcher."""
    verified = os.environ.get(VERIFIED_APP_ENV, "").lower()
    folder = Path(module_file).resolve().parent.parent.name
    return verified if FULL_HASH.fullmatch(verified) and folder.endswith("." + verified[:8]) else None
