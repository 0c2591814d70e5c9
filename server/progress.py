"""What ``fedhosp run`` shows while a run goes: one live line (Rich), or plain lines without a terminal.

The ServerApp writes one ``fedhosp progress: {json}`` line to the run's log at
each step that a person waits for (the site check answered, each round ended,
the validation sent); the runner hands every log line to :class:`RunProgress`,
which turns those into "round 3/5 · 5/5 sites answered · c_index 0.706 · 23 s".
Flower's own log is kept in memory (and on disk, by the CLI) and shown whole
with ``--verbose`` or, on failure, as the lines that matter.
"""

from __future__ import annotations

import json
import re
import time
from logging import INFO

from rich.console import Console
from rich.live import Live
from rich.text import Text

TAG = "fedhosp progress: "
_LINE = re.compile(re.escape(TAG) + r"(\{.*\})\s*$")
_RELEVANT = re.compile(r"\b(ERROR|CRITICAL|FederationError|SiteDataError|fedhosp:)|Error: |failed", re.I)


def emit(event: str, **fields) -> None:
    """ServerApp side: one progress line in the run's log (names and numbers only)."""
    from flwr.common import log

    log(INFO, "%s%s", TAG, json.dumps({"event": event, **fields}, sort_keys=True))


def parse(line: str) -> dict | None:
    match = _LINE.search(line)
    if not match:
        return None
    try:
        return json.loads(match.group(1))
    except ValueError:
        return None


def describe(event: dict) -> str:
    """One progress event in words."""
    kind = event.get("event")
    if kind == "sites":
        what = f"{event.get('rounds')} rounds" if event.get("rounds") else event.get("mode", "")
        text = f"{event.get('sites')} sites ready ({event.get('task')}, {what})"
        for warning in event.get("warnings") or ():
            text += f" · {warning}"
        return text
    if kind == "round":
        text = f"round {event['round']}/{event['rounds']} · {event['answered']}/{event['sampled']} sites answered"
        if event.get("metric") and event.get("value") is not None:
            text += f" · {event['metric']} {event['value']:.3f}"
        if event.get("epsilon") is not None:
            text += f" · ε ≤ {event['epsilon']:.2f}"
        if event.get("failed"):
            text += f" · failed: {', '.join(event['failed'])}"
        if event.get("skipped"):
            text += " · skipped (global model unchanged)"
        return text
    if kind == "validation":
        return f"validating at {event.get('sites')} sites"
    if kind == "analysis":
        return f"Newton iteration {event.get('iteration')} · {event.get('models')} Cox models still moving"
    return str(event)


def relevant_lines(log_text: str, limit: int = 30) -> list[str]:
    """The log lines a person needs when a run failed: errors, fedhosp's own notes, failures (with the
    ``  - `` lines that continue them)."""
    lines: list[str] = []
    keep = False
    for line in log_text.splitlines():
        keep = (bool(_RELEVANT.search(line)) and TAG not in line) or (keep and line.startswith("  - "))
        if keep:
            lines.append(line.rstrip())
    return lines[-limit:]


class RunProgress:
    """A log-line sink: ``--verbose`` echoes every line; otherwise one live line (a terminal) or plain lines."""

    def __init__(self, console: Console, verbose: bool = False, quiet: bool = False, started: float | None = None):
        self.console = console
        self.verbose = verbose
        self.quiet = quiet
        self.started = time.monotonic() if started is None else started  # time.monotonic() of the command's start
        self.state = "starting the federation"
        self.live: Live | None = None

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self.started:.0f} s"

    def __rich__(self) -> Text:  # Live re-renders this a few times a second: the clock keeps moving
        return Text.assemble(("fedhosp ", "bold"), self.state, (f" · {self._elapsed()}", "dim"))

    def __enter__(self) -> "RunProgress":
        if not self.verbose and not self.quiet and self.console.is_terminal:
            self.live = Live(self, console=self.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
            self.live = None

    def __call__(self, line: str) -> None:
        if self.verbose:
            self.console.out(line, highlight=False)
            return
        event = parse(line)
        if event is None or self.quiet:
            return
        self.state = describe(event)
        if self.live is None:  # CI, a pipe: one plain line per event
            self.console.out(f"fedhosp {self.state} ({self._elapsed()})", highlight=False)
