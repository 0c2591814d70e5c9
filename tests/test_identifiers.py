"""Nothing that identifies a patient leaves a node: a header's free text, the label of a suppressed group."""

from __future__ import annotations

import dataclasses

import pydicom
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from client.app import app
from client.data.dicom import VENDORS, vendor_group
from client.data.radiology_demo import radiology_regions, write_radiology_site
from models.ledger import read_records
from models.builders import build_model
from tests.test_client_app import _message
from tests.node_replies import error_text

PLANTED = "St. Olav PACS, J. Hansen 010170-1234"


def test_a_manufacturer_header_becomes_a_word_of_a_fixed_vocabulary():
    cases = {"SIEMENS": "Siemens", "Siemens Healthineers": "Siemens", "GE Healthcare": "GE",
             "GE MEDICAL SYSTEMS": "GE", "Carestream Health": "Carestream", "KODAK": "Carestream",
             "FUJIFILM Corporation": "Fujifilm", "Canon Medical Systems": "Canon", "TOSHIBA MEC": "Canon",
             "Philips Medical Systems": "Philips", "Agfa": "Agfa", "Hologic, Inc.": "Hologic",
             "Konica Minolta": "Konica Minolta", "": "unknown", "  ": "unknown", PLANTED: "other",
             "Gerät 4, Station Ø": "other", "Hansen": "other"}
    for header, group in cases.items():
        assert vendor_group(header) == group, header
    assert {vendor_group(h) for h in cases} <= set(VENDORS) | {"other", "unknown"}


def test_a_radiology_validation_sends_no_header_free_text_not_even_as_a_suppressed_groups_label(tmp_path):
    folder = tmp_path / "Hovedstaden"
    region = dataclasses.replace(radiology_regions(3)[0], manufacturer="SIEMENS")
    write_radiology_site(folder, region, n_images=120)
    planted = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "labels.csv"):
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # the demo's broken files
            continue
        if "PixelData" in ds and planted < 24:  # some images from a PACS that put a person in the header
            ds.Manufacturer = PLANTED
            ds.save_as(path)
            planted += 1
    assert planted == 24
    ctx = Context(run_id=1, node_id=7, node_config={"site-name": "Hovedstaden", "data-dir": str(folder),
                                                    "cache-dir": str(tmp_path / "cache"),
                                                    "ledger-dir": str(tmp_path / "ledger")},
                  state=RecordDict(), run_config={"task": "radiology", "seed": 42, "data-root": ""})
    net = build_model("radiology", "small-cnn", target="kl-grade", image_size=32)
    config = {"task": "radiology", "target": "kl-grade", "model": "small-cnn", "image-size": 32,
              "bootstrap-samples": 20, "min-cell": 10, "threshold": 0.5, "seed": 42}
    reply = app(_message("evaluate.validate", RecordDict({"arrays": ArrayRecord(net.state_dict()),
                                                          "config": ConfigRecord(config)})), ctx)
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content["metrics"])
    assert metrics["g/vendor/~suppressed"] == 1.0  # the planted images in the test split: that they exist, nothing else
    assert any(k.startswith("g/vendor/Siemens/") for k in metrics)
    ledger = "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "ledger").glob("*.jsonl"))
    assert read_records(next((tmp_path / "ledger").glob("run-*.jsonl")))[-1]["event"] == "evaluate-validate"
    for text in (repr(metrics), ledger):
        for fragment in ("Olav", "Hansen", "010170", "other/"):
            assert fragment not in text, fragment


def test_identifier_like_column_names_are_recognised_as_word_parts():
    from client.data.tabular import identifier_like

    for name in ("cpr", "CPR_nr", "mrn", "patientID", "subject_id", "SSN", "full name", "accession-number", "DOB"):
        assert identifier_like(name), name
    for name in ("age", "stage", "ecog", "biomarker", "mutation", "treatment", "idx", "tsize", "horTh", "pnodes"):
        assert not identifier_like(name), name


def test_an_identifier_like_column_is_refused_unnamed_unless_the_run_declares_its_features(tmp_path):
    import pandas as pd
    from flwr.app import MessageType

    from client.data import demo
    from tests.test_client_app import _context

    folder = tmp_path / "site"
    folder.mkdir()
    frame = demo.cohort(demo.REGIONS[3])
    frame["cpr"] = [f"0101{i:02d}-{1000 + i}"[:11].replace("-", "") for i in range(len(frame))]
    frame["cpr"] = pd.to_numeric(frame["cpr"])  # numeric, so it would have been trained on
    frame.to_csv(folder / "cohort.csv", index=False)
    query = _message(MessageType.QUERY, RecordDict({"config": ConfigRecord({"request": "describe"})}))
    text = error_text(app(query, _context(folder)), "looks? like an identifier")
    assert "cpr" not in text  # the unused column is not named outside the node
    declared = ",".join(demo.FEATURES)
    reply = app(query, _context(folder, features=declared))
    assert list(reply.content["site"]["features"]) == list(demo.FEATURES)
    assert "cpr" not in repr(reply.content)


def test_site_check_names_identifier_columns_and_a_cohort_under_the_policy_minimum(tmp_path):
    import numpy as np
    import pandas as pd
    from typer.testing import CliRunner

    from client.site_check import site_app

    folder = tmp_path / "small"
    folder.mkdir()
    n = 16
    pd.DataFrame({"time": np.arange(1, n + 1) * 10.0, "event": [1, 0] * (n // 2), "age": np.arange(n) + 40,
                  "cpr": np.arange(n) + 101010}).to_csv(folder / "cohort.csv", index=False)
    result = CliRunner().invoke(site_app, ["check", str(folder)], env={"COLUMNS": "300"})
    assert result.exit_code == 1, result.output
    assert "columns whose names look like identifiers: cpr" in result.output
    assert "fewer than the policy's minimum of 20" in result.output
    result = CliRunner().invoke(site_app, ["check", str(folder), "--features", "age"], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "identifiers" not in result.output  # declared: only the minimum remains
