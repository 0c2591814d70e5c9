"""The wire format of a site's validation figures: nested figures as flat MetricRecord entries and back.

Both sides use it: the node flattens what it computed (client/validation.py),
the coordinator unflattens it (server/validate.py) and the auditor's
reconciliation re-flattens what the coordinator recorded (server/audit.py).
Keys carry attribute and group labels only (age bands, sex), never identifiers.
"""

from __future__ import annotations

import math

# Age bands: the only age a figure or a subgroup label carries.
AGE_BANDS = ((0, 50, "<50"), (50, 65, "50-64"), (65, 80, "65-79"), (80, 200, "80+"))
AGE_ORDER = {name: k for k, (_, _, name) in enumerate(AGE_BANDS)}
# Where an attribute's groups under min-cell are counted: one entry, no label (``g/<attribute>/~suppressed`` on
# the wire), so that neither a group's size nor its label leaves the node.
SUPPRESSED = "(suppressed)"


def flatten(result: dict, prefix: str = "") -> dict[str, float | list[float]]:
    """A site's figures as MetricRecord entries (``m/auc/low``, ``g/sex/F/m/auc``, ``rel/count``)."""
    flat: dict[str, float | list[float]] = {f"{prefix}n": float(result["n"])}

    def metrics(key: str, values: dict) -> None:
        for name, ci in values.items():
            for part in ("value", "low", "high"):
                flat[f"{key}m/{name}/{part}"] = float(ci[part])

    metrics(prefix, result["metrics"])
    for attribute, groups in result.get("subgroups", {}).items():
        for value, group in groups.items():
            if value == SUPPRESSED:
                flat[f"{prefix}g/{_safe_key(attribute)}/~suppressed"] = float(group["groups"])
                continue
            key = f"{prefix}g/{_safe_key(attribute)}/{_safe_key(value)}/"
            if "n" in group:
                flat[key + "n"] = float(group["n"])
            metrics(key, group["metrics"])
    if "reliability" in result:
        rel = result["reliability"]
        flat[f"{prefix}rel/top-label"] = 1.0 if rel["kind"] == "top-label" else 0.0
        for part in ("edges", "count", "mean_predicted", "observed"):
            flat[f"{prefix}rel/{part}"] = [float("nan") if v is None else float(v) for v in rel[part]]
    return flat


def unflatten(flat: dict, prefix: str = "") -> dict:
    """The inverse of :func:`flatten` (NaN becomes None), for the coordinator."""
    def number(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    result: dict = {"n": int(flat[f"{prefix}n"]), "metrics": {}}
    subgroups: dict = {}
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        parts = key[len(prefix):].split("/")
        if parts[0] == "m" and len(parts) == 3:
            result["metrics"].setdefault(parts[1], {})[parts[2]] = number(value)
        elif parts[0] == "g" and parts[2] == "~suppressed":
            subgroups.setdefault(parts[1], {})[SUPPRESSED] = {"suppressed": True, "groups": int(value)}
        elif parts[0] == "g":
            group = subgroups.setdefault(parts[1], {}).setdefault(parts[2], {})
            if not group.get("suppressed"):
                if parts[3] == "n":
                    group["n"] = int(value)
                elif parts[3] == "m":
                    group.setdefault("metrics", {}).setdefault(parts[4], {})[parts[5]] = number(value)
    if subgroups:  # the wire does not keep order: attributes by name, groups in band order
        result["subgroups"] = {attribute: {v: groups[v] for v in sorted(groups, key=group_order)}
                               for attribute, groups in sorted(subgroups.items())}
    if f"{prefix}rel/count" in flat:
        result["reliability"] = {
            "kind": "top-label" if flat.get(f"{prefix}rel/top-label") else "positive-class",
            **{part: [number(v) for v in flat[f"{prefix}rel/{part}"]]
               for part in ("edges", "count", "mean_predicted", "observed")},
        }
    return result


def group_order(value: str) -> tuple[int, str]:
    if value == SUPPRESSED:
        return len(AGE_ORDER) + 1, value  # the suppressed groups' line comes last
    return AGE_ORDER.get(value, len(AGE_ORDER)), value


def _safe_key(text: str) -> str:
    return str(text).replace("/", "-").strip() or "unknown"
