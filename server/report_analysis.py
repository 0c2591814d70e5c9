"""The treatment-effect report: one self-contained HTML page a clinician reads (the validation report's family).

A plain-language sentence first, then the Kaplan–Meier curves per arm with
their bands and a numbers-at-risk table under the plot, the Cox model's every
term, the stratified log-rank test, and the forest plot of the treatment's
effect per subgroup level with raw and Holm-adjusted interaction p-values.
Inline CSS and PNG data URIs only: no script, no external request, so it opens
anywhere and can be archived with the MLflow run. Every figure says how many
sites it rests on; suppressed cells show the word only.
"""

from __future__ import annotations

import math
from pathlib import Path

from jinja2 import Environment
from matplotlib.figure import Figure

from server.report import STYLE, _png_uri, _save, write_report

ARM_NAMES = {"0": "control (0)", "1": "treated (1)"}
ARM_COLOURS = {"0": "#1f77b4", "1": "#d62728"}


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _p(value) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _p_is(value) -> str:
    """"p < 0.001" or "p = 0.261", for a sentence."""
    text = _p(value)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def at_risk_table(km: dict, every: int) -> tuple[list[float], dict[str, list[int]]]:
    """Numbers at risk at every ``every``-th bin end, per arm, where the curve is still published."""
    longest = max(km.values(), key=lambda c: len(c["time"]))
    times = longest["time"][::every]
    rows = {arm: [curve["at_risk"][i] if i < len(curve["at_risk"]) else None
                  for i in range(0, len(longest["time"]), every)] for arm, curve in km.items()}
    return times, rows


def km_png(km: dict, times: list[float], rows: dict[str, list[int | None]]) -> bytes:
    fig = Figure(figsize=(7.5, 4.8), dpi=100)
    ax = fig.add_axes((0.1, 0.36, 0.86, 0.58))
    for arm, curve in sorted(km.items()):
        colour = ARM_COLOURS.get(arm, "#555")
        ax.step(curve["time"], curve["survival"], where="post", color=colour, label=ARM_NAMES.get(arm, arm))
        ax.fill_between(curve["time"], curve["low"], curve["high"], step="post", color=colour, alpha=0.18, lw=0)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("survival")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    table = fig.add_axes((0.1, 0.04, 0.86, 0.2))
    table.axis("off")
    table.set_xlim(ax.get_xlim())
    table.set_ylim(-0.5, len(rows) + 0.3)
    table.text(ax.get_xlim()[0], len(rows), "number at risk", fontsize=9, weight="bold")
    for row, (arm, counts) in enumerate(sorted(rows.items())):
        y = len(rows) - 1 - row
        for t, n in zip(times, counts):
            if n is not None:
                table.text(t, y, str(n), ha="center", fontsize=8, color=ARM_COLOURS.get(arm, "#555"))
    ax.set_xlabel("follow-up time (the cohort's time unit)")
    return _save(fig)


def forest_png(rows: list[dict], overall: dict) -> bytes:
    shown = [r for r in rows if r.get("hr")]
    fig = Figure(figsize=(7.5, 0.45 * (len(shown) + 2) + 1), dpi=100)
    ax = fig.add_subplot(111)
    labels, y = [], []
    entries = [{"label": "overall", **overall}] + shown
    for i, row in enumerate(entries):
        pos = len(entries) - 1 - i
        ax.plot([row["hr_low"], row["hr_high"]], [pos, pos], color="#333")
        ax.plot(row["hr"], pos, "s" if i == 0 else "o", color="#d62728" if i == 0 else "#1f77b4")
        labels.append(row["label"])
        y.append(pos)
    ax.axvline(1.0, color="#888", ls="--", lw=1)
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    low = min(r["hr_low"] for r in entries)
    high = max(r["hr_high"] for r in entries)
    ticks = [t for t in (0.1, 0.2, 0.25, 0.33, 0.5, 0.75, 1.0, 1.33, 2.0, 3.0, 4.0, 5.0, 10.0) if low / 1.3 <= t <= high * 1.3]
    ax.xaxis.set_major_locator(FixedLocator(ticks or [1.0]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_yticks(y)
    ax.set_yticklabels(labels)
    ax.set_xlabel("hazard ratio of treatment (log scale; < 1 favours treatment)")
    fig.tight_layout()
    return _save(fig)


def render_analysis(result: dict) -> str:
    """Everything through autoescape: column names come from the run config, site names from hospitals."""
    treatment = result["treatment"]
    terms = [{"name": name, **{k: _fmt(v, 3) for k, v in term.items() if k != "p"}, "p": _p(term["p"])}
             for name, term in result["cox"]["terms"].items()]
    km = result.get("km") or {}
    bins = max((len(c["time"]) for c in km.values()), default=1)
    every = max(1, math.ceil(bins / 10))
    times, at_risk = at_risk_table(km, every) if km else ([], {})
    forest_rows, groups = [], []
    for column, levels in result["subgroups"].items():
        for level, figure in levels.items():
            if level.startswith("interaction"):
                continue
            label = f"{column} = {level}"
            if figure == "suppressed":
                groups.append({"label": label, "suppressed": True})
            elif "not_estimable" in figure:
                groups.append({"label": label, "gap": figure["not_estimable"]})
            else:
                forest_rows.append({"label": label, **figure})
                groups.append({"label": label, "hr": _fmt(figure["hr"]), "ci": f"{_fmt(figure['hr_low'])}–"
                               f"{_fmt(figure['hr_high'])}", "p": _p(figure["p"]), "n": figure["n"],
                               "sites": figure["sites"]})
        groups.append({"label": f"{column}: treatment × {column} interaction", "interaction": True,
                       "p": _p_is(levels.get("interaction_p")), "holm": _p(levels.get("interaction_p_holm")),
                       "note": levels.get("interaction_note", "")})
    overall = result["cox"]["terms"][treatment]
    medians = [{"arm": ARM_NAMES.get(a, a), "value": _fmt(c["median"]["value"], 0) if c["median"]["value"] is not None
                else "not reached", "low": _fmt(c["median"]["low"], 0) if c["median"]["low"] is not None else "n/r",
                "high": _fmt(c["median"]["high"], 0) if c["median"]["high"] is not None else "not reached",
                "sites": c["sites"], "ends": _fmt(c["ends_at"], 0)} for a, c in sorted(km.items())]
    return _TEMPLATE.render(
        style=STYLE, r=result, terms=terms, treatment=treatment, medians=medians,
        km_png=_png_uri(km_png(km, times, at_risk)) if km else None, times=[_fmt(t, 0) for t in times],
        at_risk=[{"arm": ARM_NAMES.get(a, a), "counts": [("" if n is None else n) for n in counts]}
                 for a, counts in sorted(at_risk.items())],
        forest=_png_uri(forest_png(forest_rows, overall)) if forest_rows else None, groups=groups,
        logrank={"chi2": _fmt(result["logrank"]["chi2"]), "p": _p_is(result["logrank"]["p"]),
                 "sites": result["logrank"].get("sites")})


def write_analysis_report(result: dict, path: Path) -> Path:
    return write_report(result, path, html=render_analysis(result))


_TEMPLATE = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ r.title }}</title>
<style>{{ style | safe }}</style></head><body>
<h1>{{ r.title }}</h1>
<p class="muted">Created {{ r.created }} · Flower run {{ r.flwr_run_id }} · MLflow run <code>{{ r.mlflow_run_id }}</code> · sites: {{ r.sites | join(", ") }}</p>
<div class="verdict none"><div style="font-size:1.3em">{{ r.sentence }}</div></div>
<p>Cox proportional-hazards model stratified by site (each hospital keeps its own baseline hazard), Efron's method for ties, adjusted for {{ r.covariates | join(", ") if r.covariates else "nothing" }}; fitted by Newton–Raphson on the sites' summed gradients and Hessians ({{ r.cox.iterations }} iterations{{ "" if r.cox.converged else ", NOT converged" }}), the same fit as all rows in one place. Columns in their natural units. Rests on {{ r.cox.sites }} sites.</p>
{% if r.refused %}<p class="error">Refused by their hospitals' policy: {% for site, reason in r.refused.items() %}{{ reason }}{% if not loop.last %}; {% endif %}{% endfor %}</p>{% endif %}
<h2>Survival by arm (Kaplan–Meier)</h2>
{% if km_png %}<img alt="Kaplan-Meier curves per treatment arm with 95% bands" src="{{ km_png }}">
<table><tr><th>number at risk</th>{% for t in times %}<th>{{ t }}</th>{% endfor %}</tr>
{% for row in at_risk %}<tr><td>{{ row.arm }}</td>{% for n in row.counts %}<td class="num">{{ n }}</td>{% endfor %}</tr>{% endfor %}</table>
<p class="muted">Follow-up rounded up to the end of a {{ r.km_bin }}-unit bin at each site; 95 % bands by the exponential Greenwood formula. A curve ends where fewer than {{ r.min_cell }} patients remain at risk.</p>
<table><tr><th>Arm</th><th>Median survival</th><th>95 % interval</th><th>Curve published to</th><th>Sites</th></tr>
{% for m in medians %}<tr><td>{{ m.arm }}</td><td class="num">{{ m.value }}</td><td class="num">{{ m.low }}–{{ m.high }}</td><td class="num">{{ m.ends }}</td><td class="num">{{ m.sites }}</td></tr>{% endfor %}</table>
{% else %}<p>No arm has enough patients to publish a curve.</p>{% endif %}
<p>Log-rank test stratified by site: χ² = {{ logrank.chi2 }} (1 degree of freedom), {{ logrank.p }}; rests on {{ logrank.sites }} sites.</p>
<h2>Cox model: every term</h2>
<table><tr><th>Term</th><th>coef</th><th>se</th><th>HR</th><th>95 % CI</th><th>p (Wald)</th></tr>
{% for t in terms %}<tr><td>{{ t.name }}</td><td class="num">{{ t.coef }}</td><td class="num">{{ t.se }}</td><td class="num">{{ t.hr }}</td><td class="num">{{ t.hr_low }}–{{ t.hr_high }}</td><td class="num">{{ t.p }}</td></tr>{% endfor %}</table>
<p class="muted">HR per natural unit of each column (per year of age, per stage, …).</p>
{% if groups %}<h2>Subgroups: who responds?</h2>
{% if forest %}<img alt="forest plot of the treatment's hazard ratio per subgroup level" src="{{ forest }}">{% endif %}
<table><tr><th>Subgroup</th><th>HR of treatment</th><th>95 % CI</th><th>p</th><th>Patients</th><th>Sites</th></tr>
{% for g in groups %}{% if g.suppressed %}<tr class="suppressed"><td>{{ g.label }}</td><td colspan="5">suppressed</td></tr>
{% elif g.gap %}<tr><td>{{ g.label }}</td><td colspan="5" class="error">not estimable: {{ g.gap }}</td></tr>
{% elif g.interaction %}<tr><td><b>{{ g.label }}</b></td><td colspan="5">likelihood-ratio {{ g.p }} (Holm-adjusted {{ g.holm }}){% if g.note %} · {{ g.note }}{% endif %}</td></tr>
{% else %}<tr><td>{{ g.label }}</td><td class="num">{{ g.hr }}</td><td class="num">{{ g.ci }}</td><td class="num">{{ g.p }}</td><td class="num">{{ g.n }}</td><td class="num">{{ g.sites }}</td></tr>{% endif %}
{% endfor %}</table>
<p>Each level's HR comes from the same stratified Cox model fitted on that level's patients. The interaction p-value is a likelihood-ratio test of treatment × subgroup terms. Many subgroups are hypothesis-generating, not proof: Holm-adjusted p-values (across the {{ r.subgroups | length }} subgroup columns) are shown next to the raw ones. A level with fewer than {{ r.min_cell }} patients or events in an arm is suppressed; a site whose own arm in a level is under {{ r.min_cell }} is left out of that level.</p>{% endif %}
</body></html>
""")
