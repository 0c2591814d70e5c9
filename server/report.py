"""The validation report: one HTML file a clinician and an auditor can read without fedhosp.

A federated validation ends in numbers scattered over sites, subgroups and
bootstrap intervals. The report puts them on one page next to the acceptance
criteria they were judged by, so a reader can see why the model passed or
failed, where it is weak (forest plots, subgroups, calibration), whether it got
worse since the last validation, and how well site-trained models travel. It is
a single self-contained file (inline CSS, PNGs as data URIs, no scripts) so it
can be archived, mailed and logged to MLflow and still open in ten years.

Privacy: groups and calibration bins below ``min_cell`` cases are shown only as
the word "suppressed"; their counts and metrics never reach the template.
"""

from __future__ import annotations

import base64
import io
import math
import os
import tempfile
from pathlib import Path

from jinja2 import Environment
from matplotlib.figure import Figure

_DECIMALS = {"ece": 3, "brier": 3}
_VERDICT_CLASS = {"PASS": "pass", "FAIL": "fail"}


def _finite(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _num(v, metric: str = "") -> str:
    x = _finite(v)
    return "n/a" if x is None else f"{x:.{_DECIMALS.get(metric.lower(), 2)}f}"


def _estimate(entry) -> tuple[float | None, float | None, float | None]:
    """Tolerates a bare number as well as ``{"value", "low", "high"}``: producers differ."""
    if isinstance(entry, dict):
        return _finite(entry.get("value")), _finite(entry.get("low")), _finite(entry.get("high"))
    return _finite(entry), None, None


def _cell(entry, metric: str) -> str:
    value, low, high = _estimate(entry)
    if value is None:
        return "n/a"
    if low is None or high is None:
        return _num(value, metric)
    return f"{_num(value, metric)} ({_num(low, metric)}–{_num(high, metric)})"


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _save(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _suppressed(group, min_cell: int) -> bool:
    """Also suppresses a group the producer forgot to flag: a small n must never be printed.

    A group without ``n`` but with metrics is shown: the node withholds the
    counts of every group of an attribute that has a suppressed one (so none can
    be recovered by subtraction), yet their metrics are fine to show.
    """
    if not isinstance(group, dict) or group.get("suppressed"):
        return True
    n = group.get("n")
    if n is None:
        return not group.get("metrics")
    return isinstance(n, (int, float)) and n < min_cell


def _metric_names(result: dict) -> list[str]:
    if result.get("metrics"):
        return list(result["metrics"])
    seen: dict[str, None] = {}
    for site in result.get("sites", {}).values():
        seen.update(dict.fromkeys((site or {}).get("metrics") or {}))
    return list(seen)


def forest_plot_png(result: dict, metric: str) -> bytes:
    """One row per site so a reader sees at a glance which hospital drags the model below the bar."""
    sites = list(result.get("sites", {}).items())
    rules = [r for r in (result.get("criteria") or {}).get("rules", []) if r.get("metric") == metric]
    ax = (fig := Figure(figsize=(6.4, 0.45 * max(len(sites), 1) + 1.2))).subplots()
    for i, (name, site) in enumerate(sites):
        y = len(sites) - 1 - i
        value, low, high = _estimate(((site or {}).get("metrics") or {}).get(metric))
        if value is None:
            ax.text(0.01, y, "n/a", transform=ax.get_yaxis_transform(), va="center", color="grey")
            continue
        if low is not None and high is not None:
            ax.hlines(y, low, high, color="#1f4e79", lw=2)
        ax.plot([value], [y], "s", color="#1f4e79", ms=7)
    for rule in rules:
        for key, style in (("min", "--"), ("max", ":")):
            if _finite(rule.get(key)) is not None:
                ax.axvline(rule[key], color="#b22222", ls=style, lw=1.2,
                           label=f"{'≥' if key == 'min' else '≤'} {_num(rule[key], metric)}")
    ax.set_yticks(range(len(sites)), [str(n) for n, _ in reversed(sites)], parse_math=False)
    ax.set_ylim(-0.7, len(sites) - 0.3)
    ax.set_xlabel(metric, parse_math=False)
    ax.set_title(f"{metric} by site (point estimate and interval)", parse_math=False)
    ax.grid(axis="x", alpha=0.3)
    if rules:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title="acceptance bar", title_fontsize=8)
    return _save(fig)


def reliability_png(site: str, reliability: dict, min_cell: int = 0) -> bytes:
    """Calibration matters to a clinician who reads the score as a risk; suppressed bins are drawn blank."""
    edges = list(reliability.get("edges") or [])
    counts = list(reliability.get("count") or [])
    predicted = list(reliability.get("mean_predicted") or [])
    observed = list(reliability.get("observed") or [])
    top_label = reliability.get("kind") == "top-label"
    ax = (fig := Figure(figsize=(3.6, 3.6))).subplots()
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    xs, ys = [], []
    for i, count in enumerate(counts):
        x = _finite(predicted[i]) if i < len(predicted) else None
        y = _finite(observed[i]) if i < len(observed) else None
        if _finite(count) is None or count < min_cell or x is None or y is None:
            if i + 1 < len(edges):  # a blank band, no number: the bin exists but is too small to show
                ax.axvspan(edges[i], edges[i + 1], color="#eeeeee", lw=0)
            continue
        xs.append(x)
        ys.append(y)
        ax.annotate(str(int(count)), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.plot(xs, ys, "o-", color="#1f4e79", ms=4, label="observed")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean confidence" if top_label else "mean predicted probability")
    ax.set_ylabel("accuracy" if top_label else "observed fraction positive")
    ax.set_title(str(site), parse_math=False)
    ax.legend(loc="upper left", fontsize=7)
    return _save(fig)


def _rule_rows(criteria: dict) -> list[dict]:
    lower = criteria.get("use_lower_bound", True)
    rows = []
    for rule in criteria.get("rules", []):
        metric = str(rule.get("metric", ""))
        for key, sign, bound in (("min", "≥", "lower"), ("max", "≤", "upper")):
            if key in rule:
                rows.append({"metric": metric, "bar": f"{sign} {_num(rule[key], metric)}",
                             "judged": f"{bound} bound of the interval" if lower else "point estimate"})
    return rows


def _site_view(name: str, site: dict, metrics: list[str], min_cell: int, include_plots: bool) -> dict:
    failed, values, groups = site.get("status") == "failed", site.get("metrics") or {}, []
    for attribute, members in (site.get("subgroups") or {}).items():
        for group, data in (members or {}).items():
            if _suppressed(data, min_cell):  # nothing but the labels leaves this branch
                label = group
                if isinstance(data, dict) and data.get("groups"):  # the node sent only how many there were
                    label = f"{int(data['groups'])} group{'s' if int(data['groups']) > 1 else ''} under {min_cell} cases"
                groups.append({"attribute": attribute, "group": label, "suppressed": True})
            else:
                groups.append({"attribute": attribute, "group": group, "suppressed": False,
                               "n": data.get("n") if data.get("n") is not None else "withheld",
                               "cells": [_cell((data.get("metrics") or {}).get(m), m) for m in metrics]})
    reliability = site.get("reliability")
    plot = (_png_uri(reliability_png(name, reliability, min_cell))
            if include_plots and isinstance(reliability, dict) and not failed else None)
    verdict = "NO RESULT" if failed else str(site.get("verdict") or "NO RESULT")
    return {"name": name, "n": site.get("n") if site.get("n") is not None else "n/a", "error": site.get("error"),
            "cells": [_cell(values.get(m), m) for m in metrics], "verdict": verdict,
            "verdict_class": _VERDICT_CLASS.get(verdict, "none"), "reasons": site.get("reasons") or [],
            "groups": groups, "reliability": plot}


def _cross_site(cross: dict | None) -> dict | None:
    if not cross:
        return None
    metric = str(cross.get("metric", ""))
    matrix = cross.get("matrix") or {}
    rows = [{"model": model, "cells": [{"text": _cell((matrix.get(model) or {}).get(site), metric),
                                        "diagonal": model == site} for site in cross.get("sites", [])]}
            for model in cross.get("models", [])]
    return {"metric": metric, "sites": cross.get("sites", []), "rows": rows}


def _drift(result: dict) -> tuple[list[str], str]:
    drift = result.get("drift") or {}
    flags = list(drift.get("flags") or [])
    for site in result.get("sites", {}).values():
        flags += [d.get("message") for d in (site or {}).get("drift") or [] if isinstance(d, dict)]
    flags = list(dict.fromkeys(f for f in flags if f))
    if flags:
        return flags, ""
    if not drift.get("previous_mlflow_run_id"):
        return [], "No previous validation of this model to compare against."
    return [], f"No drift beyond the margin of {result.get('criteria', {}).get('drift_margin', 'n/a')} " \
               f"since MLflow run {drift['previous_mlflow_run_id']}."


def render_report(result: dict) -> str:
    """Everything goes through autoescape: site names and error texts come from hospitals."""
    metrics = _metric_names(result)
    sites = result.get("sites") or {}
    min_cell = int(result.get("min_cell") or 0)
    model = result.get("model") or {}
    criteria = result.get("criteria") or {}
    full_hash = str(model.get("hash") or "")
    forests = [{"metric": m, "png": _png_uri(forest_plot_png(result, m))} for m in metrics
               if any(_estimate(((s or {}).get("metrics") or {}).get(m))[0] is not None for s in sites.values())]
    flags, no_flags = _drift(result)
    verdict = str(result.get("verdict") or "NO RESULT")
    return _TEMPLATE.render(
        style=STYLE, r=result, model=model, criteria=criteria, metrics=metrics, min_cell=min_cell,
        short_hash=full_hash[:12] + ("…" if len(full_hash) > 12 else ""), full_hash=full_hash,
        verdict=verdict, verdict_class=_VERDICT_CLASS.get(verdict, "none"), rules=_rule_rows(criteria),
        sites=[_site_view(name, s or {}, metrics, min_cell, True) for name, s in sites.items()],
        forests=forests, flags=flags, no_flags=no_flags, cross=_cross_site(result.get("cross_site")),
        confidence=f"{float(result.get('confidence') or 0.95) * 100:g}%", threshold=_num(model.get("threshold")))


def write_report(result: dict, path: Path, html: str | None = None) -> Path:
    """Atomic so a crash or a concurrent MLflow upload never sees half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    html = render_report(result) if html is None else html
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(html)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# One look for every fedhosp report (validation, analysis).
STYLE = """body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0} th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;white-space:nowrap} .muted{color:#666;font-size:.9em}
.verdict{padding:.8em 1.2em;border-radius:6px;margin:1em 0} .verdict .big{font-size:2.4em;font-weight:bold}
.pass{background:#e3f4e1;color:#1b5e20} .fail{background:#fbe3e3;color:#b71c1c} .none{background:#eee;color:#555}
span.pass,span.fail,span.none{padding:.1em .4em;border-radius:3px;font-weight:bold} .error{color:#b71c1c}
td.diag{background:#fff5cc;font-weight:bold} tr.suppressed td{color:#888;font-style:italic} img{max-width:100%}
.plots{display:flex;flex-wrap:wrap;gap:1em}
"""

_TEMPLATE = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ r.title or "fedhosp validation report" }}</title>
<style>{{ style | safe }}</style></head><body>
<h1>{{ r.title or "fedhosp validation report" }}</h1>
<p class="muted">Created {{ r.created or "n/a" }} · mode {{ r.mode or "validate" }} · Flower run {{ r.flwr_run_id or "n/a" }} · MLflow run <code>{{ r.mlflow_run_id or "n/a" }}</code></p>
<table>
<tr><th>Model</th><td><code>{{ model.uri or "n/a" }}</code></td></tr>
<tr><th>SHA-256</th><td><code title="{{ full_hash }}">{{ short_hash or "n/a" }}</code></td></tr>
<tr><th>Task / outcome</th><td>{{ model.task or "n/a" }} / {{ model.outcome or "n/a" }}</td></tr>
<tr><th>Architecture</th><td>{{ model.model or "n/a" }}</td></tr>
<tr><th>Decision threshold</th><td>{{ threshold }}</td></tr>
{% if r.mode != "cross-site" %}<tr><th>Differential privacy</th><td>{% if model.privacy %}trained with DP-SGD (Opacus); what the model reveals about one
patient of each site's training data is bounded by:
{% for site, p in model.privacy | dictsort %}{{ site }} ε = {{ "%.2f" | format(p.epsilon) }} at δ = {{ p.delta }}{{ "; " if not loop.last else "" }}{% endfor %}
{% else %}none (trained without dp){% endif %}</td></tr>{% endif %}
</table>
<div class="verdict {{ verdict_class }}"><div class="big">{{ verdict }}</div>
{% if r.reasons %}<ul>{% for reason in r.reasons %}<li>{{ reason }}</li>{% endfor %}</ul>{% endif %}</div>
<h2>Acceptance criteria{% if criteria.name %}: {{ criteria.name }}{% endif %}</h2>
{% if criteria.file %}<p class="muted">From <code>{{ criteria.file }}</code>.</p>{% endif %}
<table><tr><th>Metric</th><th>Bar</th><th>Judged on</th></tr>
{% for rule in rules %}<tr><td>{{ rule.metric }}</td><td>{{ rule.bar }}</td><td>{{ rule.judged }}</td></tr>
{% else %}<tr><td colspan="3">No rules.</td></tr>{% endfor %}
</table>
<p>Intervals: {{ confidence }} bootstrap ({{ r.bootstrap_samples or "n/a" }} samples). Drift margin: {{ criteria.drift_margin if criteria.drift_margin is not none else "n/a" }}. Smallest reported cell: {{ min_cell }} cases.</p>
<h2>Sites</h2>
<table><tr><th>Site</th><th>n</th>{% for m in metrics %}<th>{{ m }}</th>{% endfor %}<th>Verdict</th><th>Reasons</th></tr>
{% for s in sites %}<tr><td>{{ s.name }}</td><td class="num">{{ s.n }}</td>{% for c in s.cells %}<td class="num">{{ c }}</td>{% endfor %}
<td><span class="{{ s.verdict_class }}">{{ s.verdict }}</span></td><td>{% if s.error %}<div class="error">{{ s.error }}</div>{% endif %}
{% if s.reasons %}<ul>{% for reason in s.reasons %}<li>{{ reason }}</li>{% endfor %}</ul>{% endif %}</td></tr>
{% endfor %}</table>
<p class="muted">Cells: point estimate ({{ confidence }} interval); n/a where the metric could not be computed.</p>
{% if forests %}<h2>Forest plots</h2><p class="muted">Red lines: the acceptance bar (dashed: minimum, dotted: maximum).</p>
<div class="plots">{% for f in forests %}<img alt="forest plot of {{ f.metric }}" src="{{ f.png }}">{% endfor %}</div>{% endif %}
{% if sites | selectattr("reliability") | list %}<h2>Calibration</h2>
<p class="muted">Observed outcome against predicted probability per bin; the diagonal is perfect calibration, numbers are cases per bin. Bins with fewer than {{ min_cell }} cases are suppressed (grey band, no numbers).</p>
<div class="plots">{% for s in sites if s.reliability %}<img alt="reliability diagram for {{ s.name }}" src="{{ s.reliability }}">{% endfor %}</div>{% endif %}
{% if sites | selectattr("groups") | list %}<h2>Subgroups</h2>
<p>Groups with fewer than {{ min_cell }} cases are suppressed. Where an attribute has a suppressed (or unknown) group, the other groups' counts are withheld too, so that no suppressed count can be recovered by subtraction.</p>
{% for s in sites if s.groups %}<h3>{{ s.name }}</h3>
<table><tr><th>Attribute</th><th>Group</th><th>n</th>{% for m in metrics %}<th>{{ m }}</th>{% endfor %}</tr>
{% for g in s.groups %}{% if g.suppressed %}<tr class="suppressed"><td>{{ g.attribute }}</td><td>{{ g.group }}</td><td colspan="{{ metrics | length + 1 }}">suppressed</td></tr>
{% else %}<tr><td>{{ g.attribute }}</td><td>{{ g.group }}</td><td class="num">{{ g.n }}</td>{% for c in g.cells %}<td class="num">{{ c }}</td>{% endfor %}</tr>
{% endif %}{% endfor %}</table>
{% endfor %}{% endif %}
<h2>Drift</h2>
{% if flags %}<ul>{% for f in flags %}<li class="error">{{ f }}</li>{% endfor %}</ul>{% else %}<p>{{ no_flags }}</p>{% endif %}
{% if r.drift and r.drift.previous_mlflow_run_id %}<p class="muted">Compared with MLflow run <code>{{ r.drift.previous_mlflow_run_id }}</code>.</p>{% endif %}
{% if cross %}<h2>Cross-site validation ({{ cross.metric }})</h2>
<p>Each row is a model trained at one place ("global" is the federated model), each column the site whose data it was evaluated on. Highlighted cells are a site's own model on its own data, which tends to flatter it; the other cells show how well a model travels.</p>
<table><tr><th>trained at ↓ / evaluated at →</th>{% for site in cross.sites %}<th>{{ site }}</th>{% endfor %}</tr>
{% for row in cross.rows %}<tr><th>{{ row.model }}</th>{% for c in row.cells %}<td class="num{% if c.diagonal %} diag{% endif %}">{{ c.text }}</td>{% endfor %}</tr>
{% endfor %}</table>{% endif %}
</body></html>
""")
