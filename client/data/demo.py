"""Synthetic regional oncology cohorts with known effects, for demos and tests.

Each region differs in size, case mix (age, stage, ECOG, biomarker, treatment
rate), baseline hazard, follow-up and share of ``mutation`` carriers, so the federation
is non-IID the way real regions are. Survival times are drawn from a Weibull
proportional-hazards model with the coefficients in ``TRUE_LOG_HR`` (per natural
unit) plus the treatment's effect, which lives only in carriers of the targeted
therapy's marker (``TRUE_TREATMENT_LOG_HR``: log HR −0.9 in carriers, 0 in
non-carriers), so an analysis can be checked against the truth and must find
the patients who respond. Follow-up is recorded in whole days. Treatment
response is drawn from a logistic model with ``TRUE_RESPONSE_LOGIT``. Output
depends only on the seed.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

FEATURES = ("age", "sex", "stage", "ecog", "biomarker", "mutation", "treatment")
# Main effects per natural unit; the treatment has none of its own: its effect depends on the marker.
TRUE_LOG_HR = {"age": 0.03, "sex": 0.2, "stage": 0.5, "ecog": 0.4, "biomarker": 0.6, "mutation": 0.0,
               "treatment": 0.0}
# The treatment's log hazard ratio by mutation status: a targeted drug works only in carriers.
TRUE_TREATMENT_LOG_HR = {0: 0.0, 1: -0.9}
DAYS_PER_MONTH = 30.4375
TRUE_RESPONSE_LOGIT = {"intercept": 0.8, "age": -0.02, "stage": -0.5, "biomarker": -0.8, "treatment": 1.2}


@dataclass(frozen=True)
class Region:
    name: str
    size: int
    age_mean: float
    stage_probs: tuple[float, float, float, float]
    biomarker_mean: float
    treated: float
    baseline_scale: float  # Weibull scale of the baseline hazard, months
    shape: float  # Weibull shape
    follow_up: float  # administrative censoring, months
    mutation_rate: float = 0.3  # share of carriers of the targeted therapy's marker


REGIONS = (
    Region("Hovedstaden", 900, 64.0, (0.30, 0.30, 0.25, 0.15), 0.0, 0.55, 60.0, 1.2, 60.0, 0.33),
    Region("Midtjylland", 700, 66.0, (0.25, 0.30, 0.28, 0.17), 0.2, 0.50, 55.0, 1.1, 54.0, 0.30),
    Region("Syddanmark", 650, 67.0, (0.20, 0.30, 0.30, 0.20), 0.3, 0.45, 50.0, 1.3, 48.0, 0.28),
    Region("Sjælland", 400, 68.0, (0.18, 0.27, 0.32, 0.23), 0.4, 0.40, 45.0, 1.0, 48.0, 0.25),
    Region("Nordjylland", 300, 70.0, (0.15, 0.25, 0.35, 0.25), 0.5, 0.35, 40.0, 1.15, 42.0, 0.35),
)


def regions(n: int, seed: int = 42) -> list[Region]:
    """The five Danish regions first; more sites get seeded variations of them."""
    out = list(REGIONS[:n])
    rng = np.random.default_rng(seed + 7919)
    for k in range(len(out), n):
        base = REGIONS[k % len(REGIONS)]
        out.append(
            Region(
                f"Site-{k + 1:02d}",
                int(rng.integers(200, 800)),
                float(base.age_mean + rng.normal(0, 2)),
                base.stage_probs,
                float(base.biomarker_mean + rng.normal(0, 0.2)),
                float(np.clip(base.treated + rng.normal(0, 0.05), 0.2, 0.8)),
                float(base.baseline_scale * rng.uniform(0.8, 1.2)),
                base.shape,
                base.follow_up,
                base.mutation_rate,
            )
        )
    return out


def cohort(region: Region, seed: int = 42, shift: float = 0.0) -> pd.DataFrame:
    """One region's cohort, in the site-folder contract's columns.

    ``shift`` > 0 simulates a change of biomarker assay at the site: the recorded
    biomarker gains measurement noise (sd ``3 * shift``) while outcomes still
    follow the true value, so a model validated before the change does worse
    after it (what re-validation must catch as drift). Everything else is unchanged.
    """
    rng = np.random.default_rng([seed, zlib.crc32(region.name.encode())])
    n = region.size
    age = np.clip(rng.normal(region.age_mean, 9.0, n), 30, 95).round(0)
    sex = rng.integers(0, 2, n)
    stage = rng.choice([1, 2, 3, 4], size=n, p=region.stage_probs)
    ecog = rng.choice([0, 1, 2], size=n, p=[0.5, 0.35, 0.15])
    biomarker = rng.normal(region.biomarker_mean, 1.0, n).round(3)
    treatment = (rng.random(n) < region.treated).astype(int)
    # the marker from its own stream, so that adding it left every other column as it was
    mutation = (np.random.default_rng([seed, zlib.crc32(region.name.encode()), 2]).random(n)
                < region.mutation_rate).astype(int)
    x = {"age": age, "sex": sex, "stage": stage, "ecog": ecog, "biomarker": biomarker, "mutation": mutation,
         "treatment": treatment}

    # Centre the natural-unit predictor so baseline scales stay interpretable.
    lp = sum(TRUE_LOG_HR[f] * (x[f] - _CENTRE[f]) for f in FEATURES)
    lp = lp + treatment * np.where(mutation == 1, TRUE_TREATMENT_LOG_HR[1], TRUE_TREATMENT_LOG_HR[0])
    # Weibull PH: S(t) = exp(-(t/scale)^k * exp(lp))  =>  t = scale * (E / exp(lp))^(1/k)
    e = rng.exponential(1.0, n)
    event_time = region.baseline_scale * (e / np.exp(lp)) ** (1.0 / region.shape)
    dropout = rng.exponential(region.follow_up * 3.0, n)
    censor = np.minimum(region.follow_up * rng.uniform(0.6, 1.0, n), dropout)
    time = np.minimum(event_time, censor)
    event = (event_time <= censor).astype(int)
    # Follow-up is recorded in whole days, which yields tied times as in registries.
    time = np.maximum(np.round(time * DAYS_PER_MONTH), 1.0)

    logit = TRUE_RESPONSE_LOGIT["intercept"] + sum(
        TRUE_RESPONSE_LOGIT[f] * (x[f] - _CENTRE[f]) for f in ("age", "stage", "biomarker", "treatment")
    )
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(int)

    if shift > 0:
        assay = np.random.default_rng([seed, zlib.crc32(region.name.encode()), 1])
        x["biomarker"] = (biomarker + assay.normal(0.0, 3.0 * shift, n)).round(3)
    prefix = region.name[:3].upper()
    return pd.DataFrame(
        {"patient_id": [f"{prefix}-{i:06d}" for i in range(n)], **x, "time": time, "event": event, "label": label}
    )


_CENTRE = {"age": 65.0, "sex": 0.5, "stage": 2.5, "ecog": 0.6, "biomarker": 0.0, "mutation": 0.3, "treatment": 0.5}


def write_site(folder: Path, region: Region, seed: int = 42, shift: float = 0.0, overwrite: bool = False) -> Path:
    """Write ``folder/cohort.csv`` atomically (concurrent writers are safe); see :func:`cohort` for ``shift``."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "cohort.csv"
    if target.exists() and not overwrite:
        return target
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        cohort(region, seed, shift).to_csv(fh, index=False)
    os.replace(tmp, target)
    return target


def write_demo(root: Path, n_sites: int = 5, seed: int = 42) -> list[Path]:
    """Write one site folder per region under ``root``; returns the folders."""
    root = Path(root)
    folders = []
    for region in regions(n_sites, seed):
        write_site(root / region.name, region, seed)
        folders.append(root / region.name)
    return folders
