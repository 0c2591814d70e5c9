"""Acceptance criteria, written down before a validation, and the verdicts they give.

A hospital decides in advance what a model must achieve at every site (for a
referral model, say, AUC >= 0.85 and sensitivity >= 0.90); the criteria are a
data file in ``configs/acceptance/``, so the bar cannot move after the figures
are in. With ``use-lower-bound`` the interval's lower bound (upper for a
"max" rule) must clear the bar, not just the point estimate.

Drift compares a validation with the previous validation of the same model: a
metric that fell by more than ``drift-margin``, or whose bound no longer clears
a bar it cleared before, is flagged by site and metric.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

APP_ROOT = Path(__file__).resolve().parent.parent
ACCEPTANCE_DIR = APP_ROOT / "configs" / "acceptance"
LOWER_IS_BETTER = ("ece",)
LABELS = {"auc": "AUC", "c_index": "C-index", "ece": "ECE", "kappa": "kappa"}


@dataclass(frozen=True)
class Rule:
    metric: str
    bound: float
    kind: str  # "min" or "max"

    def as_dict(self) -> dict:
        return {"metric": self.metric, self.kind: self.bound}


@dataclass(frozen=True)
class Criteria:
    name: str
    file: str
    outcome: str
    rules: tuple[Rule, ...]
    use_lower_bound: bool = True
    drift_margin: float = 0.05

    def as_dict(self) -> dict:
        return {"name": self.name, "file": self.file, "outcome": self.outcome, "use_lower_bound": self.use_lower_bound,
                "drift_margin": self.drift_margin, "rules": [r.as_dict() for r in self.rules]}


def criteria_path(name: str, outcome: str) -> Path:
    """``criteria`` run-config value: a path, a file name in configs/acceptance/, or "" for ``<outcome>.toml``."""
    if not name:
        return ACCEPTANCE_DIR / f"{outcome}.toml"
    path = Path(name).expanduser()
    for candidate in (path, APP_ROOT / path, ACCEPTANCE_DIR / path, ACCEPTANCE_DIR / f"{name}.toml"):
        if candidate.is_file():
            return candidate
    return path


def load_criteria(name: str, outcome: str, metrics: tuple[str, ...]) -> Criteria:
    """Read and check a criteria file against the model's outcome and the metrics the sites report."""
    path = criteria_path(name, outcome)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"criteria file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"criteria file {path} is not valid TOML: {exc}") from None
    unknown = set(raw) - {"name", "description", "outcome", "use-lower-bound", "drift-margin", "rule"}
    if unknown:
        raise ValueError(f"criteria file {path}: unknown keys {sorted(unknown)}")
    if raw.get("outcome", outcome) != outcome:
        raise ValueError(f"criteria file {path} is for outcome '{raw['outcome']}', the model predicts '{outcome}'")
    rules = []
    for item in raw.get("rule", []):
        metric = item.get("metric")
        kinds = [k for k in ("min", "max") if k in item]
        if metric not in metrics or len(kinds) != 1:
            raise ValueError(f"criteria file {path}: each [[rule]] needs a metric of {list(metrics)} and one of "
                             f"min or max; got {item}")
        rules.append(Rule(metric, float(item[kinds[0]]), kinds[0]))
    if not rules:
        raise ValueError(f"criteria file {path} has no [[rule]]")
    margin = float(raw.get("drift-margin", 0.05))
    if margin < 0:
        raise ValueError(f"criteria file {path}: drift-margin must not be negative")
    try:
        shown = str(path.relative_to(APP_ROOT))
    except ValueError:
        shown = str(path)
    return Criteria(str(raw.get("name", path.stem)), shown, outcome, tuple(rules),
                    bool(raw.get("use-lower-bound", True)), margin)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def judged_value(rule: Rule, figure: dict | None, use_lower_bound: bool) -> tuple[float | None, str]:
    """The number a rule is judged on, and what it is called in a reason."""
    figure = figure or {}
    if not use_lower_bound:
        return figure.get("value"), rule.metric
    part = "low" if rule.kind == "min" else "high"
    return figure.get(part), f"{rule.metric} 95% {'lower' if part == 'low' else 'upper'} bound"


def site_verdict(criteria: Criteria, site: dict) -> tuple[str, list[str]]:
    """PASS only when every rule is met; a metric that could not be computed fails its rule."""
    if site.get("status") != "ok":
        return "NO RESULT", [f"no result: {site.get('error') or 'the site did not report'}"]
    reasons, passed = [], True
    for rule in criteria.rules:
        value, what = judged_value(rule, site["metrics"].get(rule.metric), criteria.use_lower_bound)
        sign = ">=" if rule.kind == "min" else "<="
        if value is None or (isinstance(value, float) and math.isnan(value)):
            passed = False
            reasons.append(f"{what} could not be computed (too few cases of a class?); needs {sign} {rule.bound:.2f}")
            continue
        ok = value >= rule.bound if rule.kind == "min" else value <= rule.bound
        passed &= ok
        reasons.append(f"{what} {_fmt(value)} {sign if ok else ('<' if rule.kind == 'min' else '>')} {rule.bound:.2f}")
    return ("PASS" if passed else "FAIL"), reasons


def apply_verdicts(criteria: Criteria, result: dict) -> None:
    """Per-site and overall verdicts, written into the validation result."""
    failing = []
    for name, site in result["sites"].items():
        site["verdict"], site["reasons"] = site_verdict(criteria, site)
        if site["verdict"] != "PASS":
            bad = [r for r in site["reasons"] if " < " in r or " > " in r or "could not" in r or "no result" in r]
            failing.append(f"{name}: {site['verdict']} ({'; '.join(bad)})")
    result["verdict"] = "PASS" if result["sites"] and not failing else "FAIL"
    result["reasons"] = failing or [f"every site ({len(result['sites'])}) meets {criteria.name}"]


def drift(criteria: Criteria, previous: dict | None, result: dict) -> list[str]:
    """Flags against the previous validation of the same model; also written into each site's ``drift``."""
    flags: list[str] = []
    if not previous:
        return flags
    for name, site in result["sites"].items():
        site.setdefault("drift", [])
        before = previous.get("sites", {}).get(name)
        if site.get("status") != "ok" or not before or before.get("status") != "ok":
            continue
        for metric in result["metrics"]:
            old = (before["metrics"].get(metric) or {}).get("value")
            new = (site["metrics"].get(metric) or {}).get("value")
            if old is None or new is None or math.isnan(old) or math.isnan(new):
                continue
            worse = new - old if metric in LOWER_IS_BETTER else old - new
            label = LABELS.get(metric, metric)
            if worse > criteria.drift_margin:
                message = f"drift at {name}: {label} {old:.2f} → {new:.2f}"
                site["drift"].append({"metric": metric, "before": old, "after": new, "message": message})
                flags.append(message)
        for rule in criteria.rules:
            old, what = judged_value(rule, before["metrics"].get(rule.metric), criteria.use_lower_bound)
            new, _ = judged_value(rule, site["metrics"].get(rule.metric), criteria.use_lower_bound)
            if old is None or new is None:
                continue
            cleared = (lambda v: v >= rule.bound) if rule.kind == "min" else (lambda v: v <= rule.bound)
            if cleared(old) and not cleared(new):
                message = f"drift at {name}: {what} {old:.2f} → {new:.2f} no longer clears {rule.bound:.2f}"
                site["drift"].append({"metric": rule.metric, "before": old, "after": new, "message": message})
                flags.append(message)
    return flags
