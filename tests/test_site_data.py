"""The oncology site-folder contract and the demo generator."""

import numpy as np
import pandas as pd
import pytest

from client.data import demo
from client.data.tabular import load_cohort
from models.errors import SiteDataError


def _write(folder, frame):
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_csv(folder / "cohort.csv", index=False)
    return folder


def _good(n=80, seed=0):
    return demo.cohort(demo.REGIONS[4], seed).head(n).copy()


def test_demo_is_deterministic_and_regions_differ():
    a, b = demo.cohort(demo.REGIONS[0], 7), demo.cohort(demo.REGIONS[0], 7)
    pd.testing.assert_frame_equal(a, b)
    sizes = [len(demo.cohort(r)) for r in demo.REGIONS]
    ages = [demo.cohort(r)["age"].mean() for r in demo.REGIONS]
    assert len(set(sizes)) == 5 and max(ages) - min(ages) > 3
    assert {"time", "event", "label", "patient_id", "treatment"} <= set(a.columns)
    assert 0.2 < a["event"].mean() < 0.9


def test_demo_regions_beyond_five_get_their_own_names():
    names = [r.name for r in demo.regions(7)]
    assert names[:5] == [r.name for r in demo.REGIONS] and len(set(names)) == 7


def test_load_splits_standardises_on_train_and_keeps_patient_id_off_the_features(tmp_path):
    cohort = load_cohort(_write(tmp_path / "A", _good(200)), "A")
    assert "patient_id" not in cohort.features and "time" not in cohort.features
    assert cohort.features == sorted(demo.FEATURES)
    assert len(cohort.train) + len(cohort.test) == 200
    np.testing.assert_allclose(cohort.train.x.mean(axis=0), 0, atol=1e-5)
    # the split is stratified by event: both parts keep roughly the event rate
    assert abs(cohort.train.event.mean() - cohort.test.event.mean()) < 0.05


def test_split_is_reproducible_and_a_split_column_is_honoured(tmp_path):
    frame = _good(100)
    one = load_cohort(_write(tmp_path / "A", frame), "A", seed=1)
    two = load_cohort(tmp_path / "A", "A", seed=1)
    np.testing.assert_array_equal(one.test.time, two.test.time)
    frame["split"] = ["test"] * 10 + ["train"] * 90
    fixed = load_cohort(_write(tmp_path / "B", frame), "B")
    assert len(fixed.test) == 10


def test_rows_with_invalid_time_or_event_or_missing_features_are_skipped_and_counted(tmp_path):
    frame = _good(100)
    frame.loc[0, "time"] = -1
    frame.loc[1, "time"] = np.nan
    frame.loc[2, "event"] = 3
    frame.loc[3, "age"] = np.nan
    cohort = load_cohort(_write(tmp_path / "A", frame), "A")
    assert cohort.skipped == {"invalid time/event": 3, "missing feature": 1}
    assert len(cohort.train) + len(cohort.test) == 96


@pytest.mark.parametrize("column", ["time", "event"])
def test_missing_required_column_names_site_and_column(tmp_path, column):
    with pytest.raises(SiteDataError, match=rf"site Aarhus: cohort.csv has no column '{column}'"):
        load_cohort(_write(tmp_path / "A", _good().drop(columns=[column])), "Aarhus")


def test_response_endpoint_needs_a_label_column(tmp_path):
    with pytest.raises(SiteDataError, match="no column 'label'"):
        load_cohort(_write(tmp_path / "A", _good().drop(columns=["label"])), "A", endpoint="response")


def test_non_numeric_feature_names_the_column_but_not_its_values(tmp_path):
    frame = _good()
    frame["smoker"] = [f"CPR-0101{i:04d}" for i in range(len(frame))]  # an identifier pasted into a feature
    with pytest.raises(SiteDataError) as err:
        load_cohort(_write(tmp_path / "A", frame), "Odense")
    text = str(err.value)
    assert "site Odense" in text and "'smoker'" in text and "not numeric" in text
    assert "CPR" not in text and str(tmp_path) not in text


def test_missing_file_unparseable_file_bad_split_and_no_events_are_clear_errors(tmp_path):
    with pytest.raises(SiteDataError, match="site A: no cohort.csv"):
        load_cohort(tmp_path / "nothing", "A")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cohort.csv").write_bytes(b"\x00\xff\xfe garbage \"unterminated\n1,2")
    with pytest.raises(SiteDataError, match="site B: cohort.csv"):
        load_cohort(bad, "B")
    frame = _good()
    frame["split"] = "validation"
    with pytest.raises(SiteDataError, match="column 'split'"):
        load_cohort(_write(tmp_path / "C", frame), "C")
    frame = _good().assign(event=0)
    with pytest.raises(SiteDataError, match="no events"):
        load_cohort(_write(tmp_path / "D", frame), "D")


def test_too_few_usable_rows_is_an_error(tmp_path):
    frame = _good(10).assign(time=-1.0)
    with pytest.raises(SiteDataError, match="too few usable patients"):
        load_cohort(_write(tmp_path / "A", frame), "A")
