"""``fedhosp audit``: what an auditor runs on ledgers, trusting neither the coordinator nor the sites.

verify: chain, hashes, signatures, and the head hash kept elsewhere (MLflow tag,
site ledger) which is the only way to see a cut-off tail. show / export: the
ledger as a per-round table. reconcile: every update a site says it sent is the
update the coordinator recorded, and the other way round.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from models.ledger import parse_public_key, read_records, verify as verify_ledger

audit_app = typer.Typer(no_args_is_help=True, help="Check and read coordinator and site ledgers.")
console = Console()


def _short(h: str | None) -> str:
    return h[:12] if h else "–"


def _fmt_metrics(metrics: dict | None) -> str:
    if not metrics:
        return ""
    return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items()))


@audit_app.command()
def verify(
    ledger: Path = typer.Argument(..., exists=True, dir_okay=False, help="A coordinator or site ledger (.jsonl)."),
    public_key: str = typer.Option(None, "--public-key", help="The signer's public key: a PEM file, or its base64."),
    head: str = typer.Option(None, "--head", help="The head hash kept elsewhere (MLflow tag fedhosp.ledger_head)."),
) -> None:
    """Exit 0 when the ledger is intact; otherwise name the first bad record and what is wrong."""
    key = None
    if public_key:
        text = Path(public_key).read_text() if Path(public_key).is_file() else public_key
        key = parse_public_key(text)
    verdict = verify_ledger(ledger, key, head)
    if not verdict.ok:
        console.print(f"[red bold]TAMPERED[/] {ledger}: {verdict.problem}")
        raise typer.Exit(1)
    signer = "the given public key" if key else "the key named in its first record (pass --public-key to pin it)"
    tail = "and ends at the given head" if head else "(no --head given: a cut-off tail cannot be ruled out)"
    console.print(f"[green bold]INTACT[/] {ledger}: {verdict.records} records, signed by {signer}, {tail}; "
                  f"head {verdict.head}")


def rows(records: list[dict]) -> list[dict]:
    """One flat row per record: the columns of show and export."""
    out = []
    for r in records:
        d = r["data"]
        sent, received = d.get("sent") or {}, d.get("received") or {}
        out.append({
            "seq": r["seq"], "time": r["time"], "event": r["event"], "round": d.get("round"), "site": d.get("site"),
            "num_examples": d.get("num_examples", sent.get("num_examples")),
            "model_hash": d.get("update_hash") or sent.get("update_hash") or d.get("global_model_hash")
            or received.get("model_hash") or d.get("final_model_hash") or d.get("initial_model_hash")
            or d.get("model_hash"),
            "metrics": d.get("metrics", sent.get("metrics")),
            "epsilon": (d.get("metrics") or sent.get("metrics") or {}).get("epsilon"),
            "detail": d.get("reason") or (", ".join(d["sites"]) if isinstance(d.get("sites"), list) else "")
            or (d.get("verdict") and f"{d['verdict']}: " + ", ".join(
                f"{site}={v.get('verdict')}" for site, v in (d.get("sites") or {}).items()))
            or (d.get("data_fingerprint") and f"data {d['data_fingerprint'][:12]}") or "",
            "hash": r["hash"],
        })
    return out


@audit_app.command()
def show(ledger: Path = typer.Argument(..., exists=True, dir_okay=False)) -> None:
    """A readable per-round table: sites, examples, model hashes (shortened), metrics, failures."""
    records = read_records(ledger)
    table = Table(title=f"{ledger.name}: {len(records)} records")
    every = rows(records)
    private = any(row["epsilon"] is not None for row in every)  # a dp run: ε of the run at each update
    for column in ("seq", "round", "event", "site", "examples", "model", *(["ε"] if private else []), "metrics",
                   "sites / reason"):
        table.add_column(column)
    for row in every:
        style = "red" if row["event"].endswith("failed") else None
        epsilon = [] if not private else ["" if row["epsilon"] is None else f"{row['epsilon']:.3f}"]
        table.add_row(str(row["seq"]), str(row["round"] or ""), row["event"], row["site"] or "",
                      "" if row["num_examples"] is None else str(int(row["num_examples"])),
                      _short(row["model_hash"]), *epsilon, _fmt_metrics(row["metrics"]), row["detail"], style=style)
    console.print(table)


def _updates_by_coordinator(records: list[dict]) -> dict[tuple[int, str], dict]:
    return {(r["data"]["round"], r["data"]["site"]): r["data"] for r in records
            if r["event"] == "update" and "update_hash" in r["data"]}


def _updates_by_site(records: list[dict]) -> dict[tuple[int, str], dict]:
    """Plain updates only: a secure round's masked update is reconciled against the secure sum instead."""
    return {(int(r["data"]["round"]), r["data"]["site"]): r["data"] for r in records
            if r["event"] == "train" and r["data"].get("sent", {}).get("update_hash")
            and "secure_aggregation" not in r["data"]["sent"]}


MASKED = "collect_masked_vectors"  # the secure round's stage that carries a site's (masked) update


def reconcile_secure(coordinator: list[dict], sites: list[list[dict]]) -> list[str]:
    """Secure rounds: a site that masked an update is in the coordinator's secure sum (unless the round produced
    none), trained from the global model the coordinator sent, and declared the examples the coordinator
    weighed it by; every site in a sum whose ledger is given masked one."""
    in_sum = {r["data"]["round"]: set(r["data"]["secure_aggregation"]["in_sum"]) for r in coordinator
              if r["event"] == "aggregation" and "secure_aggregation" in r["data"]}
    sent_global = {r["data"]["round"]: r["data"]["global_model_hash"] for r in coordinator if r["event"] == "round-start"}
    weighed = {(r["data"]["round"], r["data"]["site"]): r["data"].get("num_examples") for r in coordinator
               if r["event"] == "update" and "update_hash" not in r["data"]}
    problems: list[str] = []
    masked: set[tuple[int, str]] = set()
    covered: set[str] = set()
    for site_records in sites:
        covered.add(next((r["data"].get("site") for r in site_records if r["event"] == "ledger-open"), None))
        for r in site_records:
            sent = r["data"].get("sent", {}) if r["event"] == "train" else {}
            if sent.get("secure_aggregation") != MASKED:
                continue
            rnd, site = int(r["data"]["round"]), r["data"]["site"]
            masked.add((rnd, site))
            if rnd in in_sum and site not in in_sum[rnd]:
                problems.append(f"round {rnd}, {site}: the site masked update {_short(sent.get('update_hash'))} "
                                "but the coordinator's secure sum leaves it out")
            if sent.get("received_model_hash") != sent_global.get(rnd):
                problems.append(f"round {rnd}, {site}: the site trained from {_short(sent.get('received_model_hash'))}"
                                f" but the coordinator sent {_short(sent_global.get(rnd))}")
            if (rnd, site) in weighed and weighed[(rnd, site)] != sent.get("num_examples"):
                problems.append(f"round {rnd}, {site}: num-examples {sent.get('num_examples')} sent, "
                                f"{weighed[(rnd, site)]} recorded")
    for rnd, names in sorted(in_sum.items()):
        for site in sorted(names & covered):
            if (rnd, site) not in masked:
                problems.append(f"round {rnd}, {site}: the coordinator's secure sum includes it, but the site's "
                                "ledger records no masked update")
    return problems


def reconcile_ledgers(coordinator: list[dict], sites: list[list[dict]]) -> list[str]:
    """Mismatches between what sites say they sent and what the coordinator recorded."""
    recorded = _updates_by_coordinator(coordinator)
    problems: list[str] = []
    sent: dict[tuple[int, str], dict] = {}
    covered: set[str] = set()
    run_id = next((r["data"].get("run_id") for r in coordinator if r["event"] == "ledger-open"), None)
    for site_records in sites:
        opening = next((r["data"] for r in site_records if r["event"] == "ledger-open"), {})
        if run_id is not None and opening.get("run_id") not in (None, run_id):
            problems.append(f"site ledger of {opening.get('site')} is for run {opening.get('run_id')}, not {run_id}")
            continue
        covered.add(opening.get("site"))
        sent.update(_updates_by_site(site_records))
    for (rnd, site), s in sorted(sent.items()):
        c = recorded.get((rnd, site))
        if c is None:
            problems.append(f"round {rnd}, {site}: the site sent update {_short(s['sent']['update_hash'])} "
                            "but the coordinator recorded none")
        elif c["update_hash"] != s["sent"]["update_hash"]:
            problems.append(f"round {rnd}, {site}: the site sent {_short(s['sent']['update_hash'])} but the "
                            f"coordinator recorded {_short(c['update_hash'])}")
        elif c.get("num_examples") != s["sent"].get("num_examples"):
            problems.append(f"round {rnd}, {site}: num-examples {s['sent'].get('num_examples')} sent, "
                            f"{c.get('num_examples')} recorded")
    for (rnd, site), c in sorted(recorded.items()):
        if site in covered and (rnd, site) not in sent:
            problems.append(f"round {rnd}, {site}: the coordinator recorded update {_short(c['update_hash'])} "
                            "that the site never sent")
    return problems


def _same(a, b) -> bool:
    """Equal figures; an undefined one (NaN, which ledgers write as "nan") equals another undefined one."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))

    def undefined(v) -> bool:
        return v == "nan" or (isinstance(v, float) and math.isnan(v))

    return (undefined(a) and undefined(b)) or a == b


def reconcile_validation(coordinator: list[dict], sites: list[list[dict]]) -> list[str]:
    """A validation: the figures each site says it sent are exactly those the coordinator recorded."""
    from models.wire import flatten

    start = next((r["data"] for r in coordinator if r["event"] == "run-start"), {})
    result = next((r["data"] for r in coordinator if r["event"] == "validation-result"), None)
    if result is None or start.get("mode") != "validate":
        return []
    problems, covered, sent = [], set(), {}
    for site_records in sites:
        covered.add(next((r["data"].get("site") for r in site_records if r["event"] == "ledger-open"), None))
        sent.update({r["data"]["site"]: r["data"]["sent"] for r in site_records if r["event"] == "evaluate-validate"})
    for site, figures in sorted(sent.items()):
        recorded = result["sites"].get(site) or {}
        if recorded.get("status") != "ok":
            problems.append(f"{site}: the site sent validation figures but the coordinator recorded none")
            continue
        expected = flatten({k: v for k, v in recorded.items() if v is not None})
        got = {k: v for k, v in (figures.get("metrics") or {}).items() if k != "validate_seconds"}
        differ = sorted(k for k in set(expected) | set(got) if not _same(expected.get(k), got.get(k)))
        if differ:
            problems.append(f"{site}: the validation figures the site sent differ from the coordinator's record "
                            f"in {len(differ)} entries ({', '.join(differ[:4])})")
    for site, recorded in sorted(result["sites"].items()):
        if site in covered and recorded.get("status") == "ok" and site not in sent:
            problems.append(f"{site}: the coordinator recorded validation figures that the site never sent")
    return problems


def reconcile_analysis(coordinator: list[dict], sites: list[list[dict]]) -> list[str]:
    """An analysis: the digest of every reply each site says it sent (describe, each Newton iteration) is the one
    the coordinator recorded, and the Cox sums are equal."""
    recorded: dict[tuple[str, int | None], dict[str, dict]] = {}
    for r in coordinator:
        if r["event"] == "analysis-describe":
            recorded[("describe", None)] = r["data"]["sites"]
        elif r["event"] == "analysis-iteration":
            recorded[("newton", int(r["data"]["iteration"]))] = r["data"]["sites"]
    if not recorded:
        return []
    problems, covered, sent = [], set(), {}
    for site_records in sites:
        covered.add(next((r["data"].get("site") for r in site_records if r["event"] == "ledger-open"), None))
        for r in site_records:
            if r["event"] == "query-analyse":
                step = r["data"]["received"]["config"].get("step")
                iteration = r["data"].get("iteration")
                sent[(step, None if iteration is None else int(iteration), r["data"]["site"])] = r["data"]["sent"]
    for (step, iteration, site), view in sorted(sent.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2])):
        what = "describe" if step == "describe" else f"iteration {iteration}"
        theirs = recorded.get((step, iteration), {}).get(site)
        if theirs is None:
            problems.append(f"{site}: the site sent its analysis {what} but the coordinator recorded none")
        elif theirs.get("digest") != view.get("digest") or not _same_tree(theirs.get("sums"), view.get("sums")):
            problems.append(f"{site}: the analysis {what} the site sent differs from the coordinator's record")
    for (step, iteration), by_site in sorted(recorded.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        for site in sorted(set(by_site) & covered):
            if (step, iteration, site) not in sent:
                problems.append(f"{site}: the coordinator recorded an analysis "
                                f"{'describe' if step == 'describe' else f'iteration {iteration}'} "
                                "that the site never sent")
    return problems


def _same_tree(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_same_tree(a[k], b[k]) for k in a)
    return _same(a, b)


@audit_app.command()
def reconcile(
    coordinator_ledger: Path = typer.Argument(..., exists=True, dir_okay=False),
    site_ledgers: list[Path] = typer.Argument(..., exists=True, dir_okay=False),
) -> None:
    """Every update a site says it sent matches the coordinator's record, and vice versa. Exit 1 on any mismatch."""
    coordinator, sites = read_records(coordinator_ledger), [read_records(p) for p in site_ledgers]
    problems = (reconcile_ledgers(coordinator, sites) + reconcile_secure(coordinator, sites)
                + reconcile_validation(coordinator, sites) + reconcile_analysis(coordinator, sites))
    if problems:
        console.print(f"[red bold]MISMATCH[/]: {len(problems)} problem(s)")
        for line in problems:
            console.print(f"  - {line}")
        raise typer.Exit(1)
    n = len(_updates_by_coordinator(coordinator))
    secure = sum(len(r["data"]["secure_aggregation"]["in_sum"]) for r in coordinator
                 if r["event"] == "aggregation" and "secure_aggregation" in r["data"])
    console.print(f"[green bold]RECONCILED[/]: {len(site_ledgers)} site ledger(s) agree with the coordinator "
                  f"({n} updates recorded" + (f", {secure} in secure sums" if secure else "") + ")")


HTML = """<!doctype html><html><head><meta charset="utf-8"><title>{{ name }}</title>
<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;
font-size:13px}tr.failed{background:#fdd}code{font-size:12px}</style></head><body>
<h1>Ledger {{ name }}</h1><p>{{ records|length }} records; head <code>{{ head }}</code>.
Verify with <code>fedhosp audit verify {{ name }} --head {{ head }}</code>.</p>
<table><tr>{% for c in columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for r in records %}<tr class="{{ 'failed' if r.event.endswith('failed') else '' }}">
{% for c in columns %}<td>{{ r[c] if r[c] is not none else '' }}</td>{% endfor %}</tr>{% endfor %}
</table></body></html>"""


@audit_app.command()
def export(
    ledger: Path = typer.Argument(..., exists=True, dir_okay=False),
    format: str = typer.Option("csv", "--format", help="csv or html"),
    out: Path = typer.Option(None, "--out", "-o", help="Write here instead of standard output."),
) -> None:
    """The ledger as CSV or a self-contained HTML table."""
    records = rows(read_records(ledger))
    for r in records:
        r["metrics"] = json.dumps(r["metrics"], sort_keys=True) if r["metrics"] else ""
    columns = list(records[0]) if records else []
    if format == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
        text = buffer.getvalue()
    elif format == "html":
        from jinja2 import Environment

        text = Environment(autoescape=True).from_string(HTML).render(
            name=ledger.name, records=records, columns=columns, head=records[-1]["hash"] if records else "")
    else:
        raise typer.BadParameter("choose csv or html", param_hint="--format")
    if out:
        out.write_text(text, encoding="utf-8")
        console.print(f"wrote {out}")
    else:
        typer.echo(text, nl=False)
