"""The validation report: self-contained, names every site, escapes hospital-supplied text, never leaks a small cell."""

from __future__ import annotations

import base64
import copy
import re
from pathlib import Path

from server.report import forest_plot_png, reliability_png, render_report, write_report

PNG = b"\x89PNG\r\n\x1a\n"
METRICS = ["auc", "sensitivity", "specificity", "ece"]


def est(value, low, high):
    return {"value": value, "low": low, "high": high}


def site_metrics(auc, sens, spec, ece):
    return {"auc": est(*auc), "sensitivity": est(*sens), "specificity": est(*spec), "ece": est(*ece)}


def reliability(counts):
    edges = [i / 10 for i in range(11)]
    mids = [None if c is None else (i + 0.5) / 10 for i, c in enumerate(counts)]
    return {"edges": edges, "count": counts, "mean_predicted": mids,
            "observed": [None if m is None else min(1.0, m + 0.03) for m in mids], "kind": "positive-class"}


def make_result() -> dict:
    ok_group = {"n": 25, "metrics": site_metrics((0.91, 0.85, 0.96), (0.93, 0.80, 0.99), (0.88, 0.77, 0.95),
                                                 (0.041, 0.02, 0.07))}
    # The producer leaked n and metrics of the suppressed group (n=7, auc 0.6137): the report must not show them.
    leaked = {"suppressed": True, "n": 7, "metrics": {"auc": est(0.6137, 0.5111, 0.7111)}}
    return {
        "mode": "validate",
        "title": "Validation of fedhosp-radiology-referral v3",
        "created": "2026-11-30T19:00:00Z",
        "flwr_run_id": 123, "mlflow_run_id": "abc123",
        "model": {"uri": "models:/fedhosp-radiology-referral/3", "hash": "f" * 64, "task": "radiology",
                  "outcome": "referral", "model": "small-cnn", "threshold": 0.5},
        "criteria": {"name": "knee-referral", "file": "configs/acceptance/knee-referral.toml",
                     "use_lower_bound": True, "drift_margin": 0.05,
                     "rules": [{"metric": "auc", "min": 0.85}, {"metric": "sensitivity", "min": 0.9},
                               {"metric": "ece", "max": 0.1}]},
        "min_cell": 10, "bootstrap_samples": 1000, "confidence": 0.95,
        "metrics": METRICS,
        "sites": {
            "Hovedstaden": {
                "status": "ok", "error": None, "n": 45,
                "metrics": site_metrics((0.93, 0.88, 0.97), (0.95, 0.91, 0.99), (0.87, 0.80, 0.93),
                                        (0.052, 0.031, 0.081)),
                "subgroups": {"sex": {"F": ok_group, "M": leaked},
                              "age": {"<50": {"n": 4, "metrics": {"auc": est(0.6789, 0.5432, 0.7777)}}},  # unflagged
                              "vendor": {"Agfa": ok_group}},
                "reliability": reliability([12, None, 3, 15, 20, 11, None, 14, 18, 30]),
                "verdict": "PASS", "reasons": ["auc 95% lower bound 0.88 >= 0.85"], "drift": [],
            },
            "Sjælland": {
                "status": "ok", "error": None, "n": 38,
                "metrics": {"auc": est(0.90, 0.86, 0.94), "sensitivity": est(0.86, 0.82, 0.91),
                            "specificity": est(float("nan"), None, None), "ece": est(0.071, 0.05, 0.09)},
                "subgroups": {}, "reliability": reliability([10, 11, 12, 13, 14, 15, 16, 17, 18, 19]),
                "verdict": "FAIL", "reasons": ["sensitivity 95% lower bound 0.82 < 0.90"],
                "drift": [{"metric": "auc", "before": 0.91, "after": 0.83,
                           "message": "drift at Sjælland: AUC 0.91 → 0.83"}],
            },
            "Midtjylland": {
                "status": "failed", "error": "site Midtjylland: evaluate failed (ValueError)",
                "n": None, "metrics": {}, "verdict": "NO RESULT", "reasons": [],
            },
        },
        "verdict": "FAIL", "reasons": ["Sjælland: sensitivity 95% lower bound 0.82 < 0.90"],
        "drift": {"previous_mlflow_run_id": "def456", "flags": ["drift at Sjælland: AUC 0.91 → 0.83"]},
        "cross_site": {
            "metric": "auc", "models": ["global", "Hovedstaden", "Sjælland"], "sites": ["Hovedstaden", "Sjælland"],
            "matrix": {"global": {"Hovedstaden": est(0.93, 0.88, 0.97), "Sjælland": est(0.90, 0.86, 0.94)},
                       "Hovedstaden": {"Hovedstaden": est(0.95, 0.90, 0.98), "Sjælland": est(0.81, 0.74, 0.87)},
                       "Sjælland": {"Hovedstaden": None}},
        },
    }


def images(html: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_written_report_is_complete_and_self_contained(tmp_path: Path):
    path = write_report(make_result(), tmp_path / "reports" / "validation.html")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["validation.html"]  # no temp file left
    html = path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in html and html.rstrip().endswith("</html>")
    for site in ("Hovedstaden", "Sjælland", "Midtjylland"):
        assert site in html
    assert '<div class="big">FAIL</div>' in html
    assert "drift at Sjælland: AUC 0.91 → 0.83" in html
    assert "site Midtjylland: evaluate failed (ValueError)" in html and "NO RESULT" in html
    assert "0.93 (0.88–0.97)" in html and "0.052 (0.031–0.081)" in html and "n/a" in html
    assert "≥ 0.85" in html and "≤ 0.100" in html
    assert 'class="num diag">0.95 (0.90–0.98)' in html  # own model on own data is highlighted
    assert "Groups with fewer than 10 cases are suppressed." in html
    for forbidden in ('src="http', "<script", "<link", "@import", "url("):
        assert forbidden not in html
    pngs = images(html)
    assert len(pngs) == 4 + 2  # a forest plot per metric, a reliability diagram per site that has one
    assert all(p.startswith(PNG) for p in pngs)


def test_suppressed_groups_show_no_numbers():
    html = render_report(make_result())
    rows = re.findall(r'<tr class="suppressed">(.*?)</tr>', html, re.S)
    assert len(rows) == 2  # the flagged one, and the unflagged one below min_cell
    for row in rows:
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        assert cells[2:] == ["suppressed"]
    for leaked in ("0.61", "0.51", "0.71", "0.68", "0.54", "0.78"):
        assert leaked not in html


def test_hospital_supplied_text_is_escaped():
    result = make_result()
    evil = '<script>alert("x")</script>'
    result["sites"][evil] = copy.deepcopy(result["sites"]["Hovedstaden"])
    result["sites"][evil]["error"] = "<b>bold</b>"
    result["reasons"].append(f"{evil}: fails")
    html = render_report(result)
    assert "<script" not in html and "<b>bold" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html


def test_sparse_input_still_renders():
    """No previous run, no cross-site, a metric nobody could compute, no reliability: still a readable report."""
    result = make_result()
    result.update(cross_site=None, drift={"previous_mlflow_run_id": None, "flags": []}, verdict="PASS", reasons=[])
    for site in result["sites"].values():
        site.pop("reliability", None)
        site["drift"] = []
        site.get("metrics", {}).pop("specificity", None)
    html = render_report(result)
    assert '<div class="big">PASS</div>' in html and "No previous validation of this model" in html
    assert "Cross-site" not in html and "Calibration" not in html
    assert len(images(html)) == 3  # no forest plot for specificity


def test_plots_are_png():
    result = make_result()
    result["sites"]["$odd_name^"] = result["sites"]["Hovedstaden"]  # no mathtext surprises
    assert forest_plot_png(result, "auc").startswith(PNG)
    assert forest_plot_png(result, "not-a-metric").startswith(PNG)
    assert reliability_png("Sjælland", reliability([None] * 10), min_cell=10).startswith(PNG)


def test_the_report_says_how_private_the_model_under_validation_is():
    plain = render_report(make_result())
    assert "Differential privacy" in plain and "none (trained without dp)" in plain
    result = make_result()
    result["model"]["privacy"] = {"Hovedstaden": {"epsilon": 2.9876, "delta": 1e-05},
                                  "Sjælland": {"epsilon": 1.5, "delta": 1e-05}}
    html = render_report(result)
    assert "trained with DP-SGD (Opacus)" in html
    assert "Hovedstaden ε = 2.99 at δ = 1e-05" in html and "Sjælland ε = 1.50 at δ = 1e-05" in html
