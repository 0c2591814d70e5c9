"""The oncology site-folder contract: ``cohort.csv`` read, checked and split on the node.

Errors raised here are :class:`SiteDataError`; their messages name the site and
the column or problem, never a value, a row, a path or an identifier, because
Flower forwards a ClientApp's exception text to the coordinator.
"""

from __future__ import annotations

import logging
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.errors import SiteDataError
from models.wire import AGE_BANDS

if TYPE_CHECKING:  # pandas is imported when a cohort is read, not by every ClientApp process
    import pandas as pd

log = logging.getLogger(__name__)

COHORT_FILE = "cohort.csv"
RESERVED = ("time", "event", "split", "patient_id", "label")
TEST_FRACTION = 0.25


# Column names that look like a patient identifier, matched case-insensitively as a word part ("patientID",
# "cpr_nr", "MRN"): never a feature unless run-config ``features`` names the column on purpose.
IDENTIFIER_WORDS = ("id", "ids", "cpr", "mrn", "ssn", "name", "accession", "personnummer", "nhs", "dob", "birth",
                    "birthdate", "address", "phone", "email", "zip", "postcode", "initials")


def identifier_like(column: str) -> bool:
    """True for a column name with an identifier word as one of its parts (``_``/``-``/space/camelCase split)."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", str(column))
    parts = [p for p in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if p]
    return any(part in IDENTIFIER_WORDS for part in parts)


def age_band(age: float) -> str:
    """The validation report's age bands; "" for an unknown age."""
    for low, high, name in AGE_BANDS:
        if low <= age < high:
            return name
    return ""


@dataclass
class Split:
    x: np.ndarray  # float32, standardised with the site's training statistics
    time: np.ndarray
    event: np.ndarray
    label: np.ndarray | None
    # Subgroup labels per patient for validation reports (``sex``: 0 = F, 1 = M; ``age`` bands), when the
    # cohort has those columns; "" where unknown. They stay on the node.
    groups: dict[str, list[str]] | None = None

    def __len__(self) -> int:
        return len(self.time)


@dataclass
class SiteCohort:
    site: str
    features: list[str]
    train: Split
    test: Split
    skipped: dict[str, int] = field(default_factory=dict)
    # Standardisation statistics stay on the node; they are never put in a reply.
    mean: np.ndarray | None = None
    std: np.ndarray | None = None


def load_cohort(folder: Path, site: str, endpoint: str = "survival", seed: int = 42,
                validation: bool = False, features: list[str] | None = None) -> SiteCohort:
    """Read ``folder/cohort.csv``, skip unusable rows (counted), split and standardise."""
    return prepare_cohort(read_cohort(folder, site), site, endpoint, seed, validation, features)


def read_cohort(folder: Path, site: str) -> pd.DataFrame:
    """``folder/cohort.csv`` as a frame with stripped column names; a missing or unparsable file is a
    :class:`SiteDataError` that names the site only (pandas' own messages can quote file content)."""
    path = Path(folder) / COHORT_FILE
    if not path.is_file():
        log.error("site %s: %s not found", site, path)
        raise SiteDataError(f"site {site}: no {COHORT_FILE} in the site's data folder")
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except Exception as exc:
        log.error("site %s: cannot parse %s (%s)", site, path, type(exc).__name__)
        raise SiteDataError(f"site {site}: {COHORT_FILE} cannot be parsed as CSV ({type(exc).__name__})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def cohort_fingerprint(folder: Path) -> str:
    """SHA-256 of cohort.csv: tells later whether the data changed, names nothing."""
    import hashlib

    return hashlib.sha256((Path(folder) / COHORT_FILE).read_bytes()).hexdigest()


def prepare_cohort(frame: pd.DataFrame, site: str, endpoint: str = "survival", seed: int = 42,
                   validation: bool = False, features: list[str] | None = None) -> SiteCohort:
    """Check the contract on an in-memory cohort; see :func:`load_cohort`.

    ``validation``: the cohort is only used to test a model, so a ``split``
    column may mark every patient ``test`` (a held-out validation cohort); the
    features are then standardised with that cohort's own statistics.
    """
    import pandas as pd

    frame.columns = [str(c).strip() for c in frame.columns]
    for column in ("time", "event") + (("label",) if endpoint == "response" else ()):
        if column not in frame.columns:
            raise SiteDataError(f"site {site}: {COHORT_FILE} has no column '{column}'")
    if features:  # declared: exactly these, in this order; every other column stays unnamed on the node
        missing = [c for c in features if c not in frame.columns]
        if missing:
            raise SiteDataError(f"site {site}: {COHORT_FILE} has no column '{missing[0]}' (named in features)")
        features = list(features)
    else:
        features = sorted(c for c in frame.columns if c not in RESERVED)
        suspicious = [c for c in features if identifier_like(c)]
        if suspicious:  # its name is not sent: an identifier column's name can be as telling as its values
            log.error("site %s: columns that look like identifiers: %s", site, suspicious)
            raise SiteDataError(
                f"site {site}: {COHORT_FILE} has {len(suspicious)} column(s) whose name looks like an identifier; "
                "remove them, or declare the features to use (run-config features); `fedhosp site check` names them")
    if not features:
        raise SiteDataError(f"site {site}: {COHORT_FILE} has no feature columns")
    for column in features:
        if not pd.api.types.is_numeric_dtype(frame[column]) or pd.api.types.is_bool_dtype(frame[column]):
            raise SiteDataError(f"site {site}: {COHORT_FILE} column '{column}' is not numeric")

    skipped: dict[str, int] = {}
    time = pd.to_numeric(frame["time"], errors="coerce")
    event = pd.to_numeric(frame["event"], errors="coerce")
    keep = time.gt(0) & np.isfinite(time) & event.isin([0, 1])
    skipped["invalid time/event"] = int((~keep).sum())
    feature_ok = np.isfinite(frame[features].to_numpy(dtype=float)).all(axis=1)
    skipped["missing feature"] = int((keep & ~feature_ok).sum())
    keep &= feature_ok
    label = None
    if endpoint == "response":
        label = pd.to_numeric(frame["label"], errors="coerce")
        label_ok = label.isin([0, 1])
        skipped["invalid label"] = int((keep & ~label_ok).sum())
        keep &= label_ok
    skipped = {k: v for k, v in skipped.items() if v}
    if skipped:
        log.warning("site %s: skipped rows %s", site, skipped)

    data = frame.loc[keep]
    strata = (label[keep] if label is not None else event[keep]).to_numpy(dtype=int)
    if "split" in frame.columns:
        split = data["split"].astype(str).str.strip().str.lower()
        if not split.isin(["train", "test"]).all():
            raise SiteDataError(f"site {site}: {COHORT_FILE} column 'split' holds values other than train/test")
        is_test = (split == "test").to_numpy()
    else:
        is_test = _stratified_test_mask(strata, seed, site)
    n_train, n_test = int((~is_test).sum()), int(is_test.sum())
    if (n_train < 2 and not validation) or n_test < 1:
        raise SiteDataError(
            f"site {site}: too few usable patients ({n_train} train, {n_test} test) after skipping invalid rows"
        )
    if endpoint == "survival" and int(event[keep][~is_test].sum()) == 0 and not validation:
        raise SiteDataError(f"site {site}: no events in the training split; a Cox model cannot learn from it")

    x = data[features].to_numpy(dtype=np.float64)
    reference = x[~is_test] if n_train >= 2 else x  # a validation-only cohort: its own statistics
    mean = reference.mean(axis=0)
    std = reference.std(axis=0)
    std[std == 0] = 1.0
    x = ((x - mean) / std).astype(np.float32)
    t = time[keep].to_numpy(dtype=np.float64)
    e = event[keep].to_numpy(dtype=np.int64)
    y = label[keep].to_numpy(dtype=np.int64) if label is not None else None

    groups = _subgroups(data)

    def part(mask: np.ndarray) -> Split:
        return Split(x[mask], t[mask], e[mask], None if y is None else y[mask],
                     {k: [v for v, m in zip(values, mask) if m] for k, values in groups.items()})

    return SiteCohort(site, features, part(~is_test), part(is_test), skipped, mean, std)


def _subgroups(data: pd.DataFrame) -> dict[str, list[str]]:
    groups = {}
    if "sex" in data.columns:
        groups["sex"] = [{0: "F", 1: "M"}.get(int(v), "") if np.isfinite(v) else "" for v in data["sex"].to_numpy(float)]
    if "age" in data.columns:
        groups["age"] = [age_band(v) if np.isfinite(v) else "" for v in data["age"].to_numpy(float)]
    return groups


def _stratified_test_mask(strata: np.ndarray, seed: int, site: str) -> np.ndarray:
    """Seeded split, stratified by outcome, reproducible per (seed, site)."""
    rng = np.random.default_rng([seed, zlib.crc32(site.encode())])
    mask = np.zeros(len(strata), dtype=bool)
    for value in np.unique(strata):
        idx = np.flatnonzero(strata == value)
        rng.shuffle(idx)
        mask[idx[: int(round(len(idx) * TEST_FRACTION))]] = True
    return mask
