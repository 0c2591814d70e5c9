"""What `fedhosp run` shows while a run goes: the ServerApp's progress lines, read back from the log stream."""

from __future__ import annotations

import io
import json

from rich.console import Console

from server.progress import TAG, RunProgress, describe, parse, relevant_lines
from server.summary import summary_from_log


def _line(event: dict) -> str:
    return f"\x1b[92mINFO \x1b[0m:      {TAG}{json.dumps(event)}"


ROUND = {"event": "round", "round": 2, "rounds": 5, "answered": 4, "sampled": 5, "failed": ["Sjælland"],
         "metric": "c_index", "value": 0.7061, "skipped": False}


def test_a_round_reads_as_round_sites_answered_metric_and_failures():
    assert parse(_line(ROUND)) == ROUND
    assert describe(ROUND) == "round 2/5 · 4/5 sites answered · c_index 0.706 · failed: Sjælland"
    assert describe({"event": "sites", "sites": 3, "task": "oncology", "rounds": 5}) == "3 sites ready (oncology, 5 rounds)"
    assert parse("INFO :      fedhosp: 5 sites: A, B") is None and parse(TAG + "{not json") is None


def test_without_a_terminal_each_event_is_one_plain_line_and_flowers_log_stays_out():
    out = io.StringIO()
    with RunProgress(Console(file=out, force_terminal=False, width=200)) as shown:
        for line in ["INFO :      Starting Flower Simulation", _line(ROUND), "INFO :      [ROUND 3/5]"]:
            shown(line)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedhosp round 2/5 · 4/5 sites answered") and "\x1b" not in lines[0]


def test_verbose_streams_the_whole_log():
    out = io.StringIO()
    with RunProgress(Console(file=out, force_terminal=False, width=200), verbose=True) as shown:
        shown("INFO :      Starting Flower Simulation")
        shown(_line(ROUND))
    assert out.getvalue().splitlines() == ["INFO :      Starting Flower Simulation", _line(ROUND)]


def test_on_a_terminal_one_live_line_is_redrawn():
    out = io.StringIO()
    with RunProgress(Console(file=out, force_terminal=True, width=120)) as shown:
        shown(_line(ROUND))
    assert "round 2/5 · 4/5 sites answered" in out.getvalue() and out.getvalue().count("\n") <= 2


def test_a_failure_shows_the_lines_that_matter():
    log = "\n".join([
        "INFO :      Starting Flower Simulation",
        "INFO :      [ROUND 1/3]",
        "ERROR :     ServerApp thread raised an exception: site check failed:",
        "  - site Syddanmark: cohort.csv has no column 'event'",
        "INFO :      fedhosp: Syddanmark refused",
        _line(ROUND),
    ])
    assert relevant_lines(log) == [
        "ERROR :     ServerApp thread raised an exception: site check failed:",
        "  - site Syddanmark: cohort.csv has no column 'event'",
        "INFO :      fedhosp: Syddanmark refused",
    ]


def test_the_summary_is_read_back_from_the_log_for_its_own_run_only():
    summary = {"flwr_run_id": 7, "mlflow_run_id": "abc", "sites": {"A": {"c_index": 0.7}}}
    log = f"x\nINFO :      fedhosp summary: {json.dumps({**summary, 'flwr_run_id': 6})}\n" \
          f"INFO :      fedhosp summary: {json.dumps(summary)}\ny"
    assert summary_from_log(log, 7) == summary
    assert summary_from_log(log, 8) is None and summary_from_log("no summary here", 7) is None
