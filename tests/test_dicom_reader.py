"""The radiology site-folder contract: DICOM decoding, skip reasons, the split by patient, the cache, the site check.

Real files only: small radiographs written here with pydicom, and pydicom's bundled samples.
"""

import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, JPEG2000MCLossless,
                         generate_uid)
from typer.testing import CliRunner

from client.data import demo, dicom
from client.data.dicom import Skip, load_radiology_site, read_image, site_report
from models.errors import SiteDataError
from client.site_check import site_app

REPO = Path(__file__).resolve().parent.parent


def write_dicom(path, pixels, *, photometric="MONOCHROME2", patient="P001", manufacturer="Acme",
                pixel_spacing=None, imager_spacing=(0.14, 0.14), window=None, rescale=None, uid=None):
    """A single-frame 12-bit DX radiograph; returns its SOPInstanceUID."""
    uid = uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DigitalXRayImageStorageForPresentation, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.Manufacturer = "DX", patient, manufacturer
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if pixel_spacing:
        ds.PixelSpacing = list(pixel_spacing)
    if imager_spacing:
        ds.ImagerPixelSpacing = list(imager_spacing)
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = np.asarray(pixels, dtype="<u2").tobytes()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return uid


def reason(path, image_size=32):
    with pytest.raises(Skip) as caught:
        read_image(path, image_size)
    return caught.value.reason


def sample(name):
    return get_testdata_file(name)


def standardise(x):
    x = np.asarray(x, dtype=np.float64)
    return (x - x.mean()) / x.std()


# ---------------------------------------------------------------- one image


def test_modality_lut_then_window_give_the_expected_values(tmp_path):
    stored = (np.arange(64) * 60).reshape(8, 8)
    write_dicom(tmp_path / "a", stored, rescale=(2, -100), window=(3000, 4000), imager_spacing=None)
    out = read_image(tmp_path / "a", 8)
    value = stored * 2.0 - 100  # modality LUT
    centre, width = 3000 - 0.5, 4000 - 1  # PS3.3 C.11.2.1.2.1, LINEAR
    expected = np.clip((value - centre) / width + 0.5, 0, 1)
    assert out.dtype == np.float32 and out.shape == (8, 8)
    np.testing.assert_allclose(out, standardise(expected), atol=1e-5)
    assert (expected == 0).sum() > 1 and (expected == 1).sum() > 1  # the window clipped both ends


def test_monochrome1_is_inverted(tmp_path):
    stored = np.random.default_rng(0).integers(0, 4096, size=(16, 16))
    write_dicom(tmp_path / "m2", stored)
    write_dicom(tmp_path / "m1", 4095 - stored, photometric="MONOCHROME1")
    write_dicom(tmp_path / "m2-negative", 4095 - stored)
    for size in (16, 24):
        np.testing.assert_allclose(read_image(tmp_path / "m1", size), read_image(tmp_path / "m2", size), atol=1e-5)
        np.testing.assert_allclose(read_image(tmp_path / "m2-negative", size), -read_image(tmp_path / "m2", size),
                                   atol=1e-5)


def test_orientation_follows_pydicom_rows_first_and_keeps_the_aspect(tmp_path):
    stored = np.zeros((16, 16))
    stored[:4, :8] = 4000  # top left, wider than tall
    write_dicom(tmp_path / "square", stored)
    out = read_image(tmp_path / "square", 16)
    np.testing.assert_array_equal(out > 0, stored > 0)
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1) < 1e-4

    wide = np.zeros((8, 16))
    wide[:2, :4] = 4000
    write_dicom(tmp_path / "wide", wide)
    out = read_image(tmp_path / "wide", 16)
    expected = np.zeros((16, 16), dtype=bool)
    expected[4:6, :4] = True  # padded by 4 rows above and below, content unchanged
    np.testing.assert_array_equal(out > 0, expected)


@pytest.mark.parametrize("spacing", ["PixelSpacing", "ImagerPixelSpacing"])
def test_pixel_spacing_resamples_to_isotropic_pixels(tmp_path, spacing):
    stored = np.zeros((32, 64))
    stored[8:24, 16:48] = 4000  # 16 x 32 pixels of 1.0 x 0.5 mm: a 16 mm square
    options = {"pixel_spacing": (1.0, 0.5), "imager_spacing": None} if spacing == "PixelSpacing" \
        else {"imager_spacing": (1.0, 0.5)}
    write_dicom(tmp_path / "a", stored, **options)
    out = read_image(tmp_path / "a", 64)
    rows, cols = np.nonzero(out > out.mean())
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(height - 32) <= 1 and abs(width - 32) <= 1  # square again, and the whole field fills the image
    assert abs(rows.mean() - 31.5) < 0.5 and abs(cols.mean() - 31.5) < 0.5


def test_pydicom_samples_read():
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm"):
        out = read_image(sample(name), 32)
        assert out.shape == (32, 32) and out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_array_equal(read_image(sample("MR_small_RLE.dcm"), 32), read_image(sample("MR_small.dcm"), 32))


def test_bundled_monochrome1_radiograph_is_inverted():
    path = sample("6154")  # CR, MONOCHROME1, 16 x 16, square spacing
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    out = read_image(path, 16)
    assert np.corrcoef(out.ravel(), ds.pixel_array.ravel())[0, 1] < -0.9


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_jp2klossless.dcm",
                                  "JPEGLSNearLossless_08.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_compressed_samples_read(name):  # every syntax, exactly: tests/test_transfer_syntaxes.py
    out = read_image(sample(name), 32)
    assert out.shape == (32, 32) and np.isfinite(out).all() and out.std() > 0.5


def test_jpeg2000_lossless_equals_the_uncompressed_image():
    np.testing.assert_array_equal(read_image(sample("MR_small_jp2klossless.dcm"), 32),
                                  read_image(sample("MR_small.dcm"), 32))


def test_skip_reasons_of_pydicom_samples(tmp_path):
    folder = Path(sample("CT_small.dcm")).parent
    colour = sorted(folder.glob("SC_rgb*.dcm")) + [sample("examples_palette.dcm"), sample("examples_ybr_color.dcm")]
    assert len(colour) > 20
    assert {reason(p) for p in colour} == {"colour"}
    assert reason(sample("rtdose.dcm")) == "multi-frame"
    for name in ("test-SR.dcm", "rtplan.dcm", "DICOMDIR"):
        assert reason(sample(name)) == "not an image", name
    assert reason(sample("MR_truncated.dcm")) == "not DICOM"
    for name, fraction in (("CT_small.dcm", 0.5), ("JPEG2000.dcm", 0.95)):  # native / encapsulated pixel data cut
        data = Path(sample(name)).read_bytes()
        (tmp_path / name).write_bytes(data[: int(len(data) * fraction)])
        assert reason(tmp_path / name) == "not DICOM", name
    (tmp_path / "notes.txt").write_text("not an image at all")
    (tmp_path / "empty").write_bytes(b"")
    assert reason(tmp_path / "notes.txt") == reason(tmp_path / "empty") == "not DICOM"


# ---------------------------------------------------------------- a site folder

PATIENTS = [f"PAT{i:03d}" for i in range(12)]
BROKEN = {"not DICOM": 2, "not an image": 1, "colour": 1, "multi-frame": 1, "missing label": 1,
          "invalid label": 1, "duplicate": 1}


def make_site(folder, labels_by="SOPInstanceUID", patient_column=False, split=False):
    """12 patients x 2 knees (grades 0-4), in nested folders with odd names, and one broken file of each kind."""
    rng = np.random.default_rng(1)
    rows, identifiers = [], []
    for i, patient in enumerate(PATIENTS):
        for knee in range(2):
            pixels = rng.integers(0, 4096, size=(24, 20))
            relative = f"{patient[-1]}/study {i}/IMG{knee:04d}" + (".dcm" if knee else "")
            uid = write_dicom(folder / relative, pixels, patient="" if patient_column else patient,
                              manufacturer=f"vendor-{patient}")
            row = {"SOPInstanceUID": uid, "file": relative, "label": (i + knee) % 5}
            if patient_column:
                row["PatientID"] = patient
            if split:
                row["split"] = "test" if i < 3 else "train"
            rows.append(row)
            identifiers += [uid, patient, relative.split("/")[-1]]
    (folder / "copies").mkdir()
    shutil.copy(folder / "0" / "study 0" / "IMG0000", folder / "copies" / "again.dcm")  # same SOPInstanceUID
    if labels_by == "file":
        rows.append({**rows[0], "file": "copies/again.dcm"})
    (folder / "README.txt").write_text("exported from PACS")
    data = Path(sample("CT_small.dcm")).read_bytes()
    (folder / "cut.dcm").write_bytes(data[: len(data) // 2])
    shutil.copy(sample("test-SR.dcm"), folder / "report")
    shutil.copy(sample("SC_rgb_rle.dcm"), folder / "photo")
    shutil.copy(sample("rtdose.dcm"), folder / "dose")
    write_dicom(folder / "unlabelled", np.ones((8, 8)), patient="PAT999")
    bad_uid = write_dicom(folder / "badlabel", np.ones((8, 8)), patient="PAT998")
    rows.append({"SOPInstanceUID": bad_uid, "file": "badlabel", "label": 7, **(
        {"PatientID": "PAT998"} if patient_column else {}), **({"split": "train"} if split else {})})
    columns = [labels_by, "label"] + (["PatientID"] if patient_column else []) + (["split"] if split else [])
    lines = [",".join(columns)] + [",".join(str(row[c]) for c in columns) for row in rows]
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return identifiers + ["PAT999", "PAT998", bad_uid]


def test_site_folder_counts_reasons_and_splits_by_patient(tmp_path):
    make_site(tmp_path / "site")
    site = load_radiology_site(tmp_path / "site", "Aarhus", image_size=32, cache_dir=tmp_path / "cache")
    assert site.skipped == BROKEN
    assert len(site.train) + len(site.test) == 24 and len(site.test) >= 2
    assert site.train.images.shape[1:] == (1, 32, 32) and site.train.images.dtype == np.float32
    assert site.train.labels.dtype == np.int64
    # no patient is in both parts (patients are indices over the site's sorted patient ids)
    assert set(site.train.patients).isdisjoint(site.test.patients)
    assert sum(site.class_counts.values()) == 24 and set(site.class_counts) == {0, 1, 2, 3, 4}
    assert site.decoded == 24  # duplicates and unlabelled images are never decoded

    referral = load_radiology_site(tmp_path / "site", "Aarhus", image_size=32, target="referral",
                                   cache_dir=tmp_path / "cache")
    assert referral.decoded == 0 and set(referral.class_counts) == {0, 1}
    np.testing.assert_array_equal(referral.test.labels, (site.test.labels >= 2).astype(np.int64))
    np.testing.assert_array_equal(referral.test.patients, site.test.patients)  # the split ignores the target
    assert referral.fingerprint == site.fingerprint


def test_patient_column_file_column_and_split_column(tmp_path):
    make_site(tmp_path / "site", labels_by="file", patient_column=True, split=True)
    site = load_radiology_site(tmp_path / "site", "Odense", image_size=16, cache_dir=tmp_path / "cache")
    assert site.skipped == BROKEN
    assert set(site.test.patients) == {sorted(PATIENTS).index(p) for p in PATIENTS[:3]}  # the split column's
    assert set(site.test.vendors) == {"other"}  # "vendor-PAT..." is free text: only the vocabulary's word travels
    make_site(tmp_path / "seeded", labels_by="file", patient_column=True)
    seeded = load_radiology_site(tmp_path / "seeded", "Odense", image_size=16, cache_dir=tmp_path / "cache")
    assert set(seeded.train.patients).isdisjoint(seeded.test.patients)  # patients from the PatientID column


def test_fingerprint_follows_content_not_names(tmp_path):
    make_site(tmp_path / "site")
    cache = tmp_path / "cache"
    before = load_radiology_site(tmp_path / "site", "A", image_size=16, cache_dir=cache)
    (tmp_path / "site" / "0").rename(tmp_path / "site" / "renamed")
    moved = load_radiology_site(tmp_path / "site", "A", image_size=16, cache_dir=cache)
    assert moved.fingerprint == before.fingerprint and moved.decoded == 0
    with open(tmp_path / "site" / "labels.csv", "a") as labels:
        labels.write("1.2.3.4,0\n")
    assert load_radiology_site(tmp_path / "site", "A", image_size=16, cache_dir=cache).fingerprint != before.fingerprint


def test_errors_name_the_site_and_problem_only(tmp_path):
    cache = tmp_path / "cache"
    messages = []

    def error(folder):
        with pytest.raises(SiteDataError) as caught:
            load_radiology_site(folder, "Viborg", image_size=16, cache_dir=cache)
        messages.append(str(caught.value))
        return str(caught.value)

    identifiers = make_site(tmp_path / "site")
    labels = (tmp_path / "site" / "labels.csv").read_text()
    (tmp_path / "site" / "labels.csv").unlink()
    assert "no labels.csv" in error(tmp_path / "site")
    (tmp_path / "site" / "labels.csv").write_text(labels.replace(",label", ",grade"))
    assert "no column 'label'" in error(tmp_path / "site")
    (tmp_path / "site" / "labels.csv").write_text(labels.replace("SOPInstanceUID,", "uid,"))
    assert "neither" in error(tmp_path / "site")
    frame = pd.read_csv(io.StringIO(labels), dtype=str)
    frame["split"] = "validation"
    frame.to_csv(tmp_path / "site" / "labels.csv", index=False)
    assert "'split'" in error(tmp_path / "site")

    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(sample("test-SR.dcm"), broken / "sr")
    part2 = pydicom.dcmread(sample("MR_small_jp2klossless.dcm"))  # a syntax pydicom has no decoder for
    part2.file_meta.TransferSyntaxUID = JPEG2000MCLossless
    part2.save_as(broken / "part2")
    uid = write_dicom(broken / "nolabel.dcm", np.ones((8, 8)), patient="PAT777")
    (broken / "labels.csv").write_text("SOPInstanceUID,label\n1.2.826.0.1,2\n")
    text = error(broken)
    assert "no usable images" in text and "not an image: 1" in text and "missing label: 1" in text
    assert "unsupported transfer syntax: 1" in text
    assert "JPEG" not in text  # the syntax name stays on the node

    for message in messages:
        assert message.startswith("site Viborg: ")
        for secret in identifiers + [uid, "PAT777", str(tmp_path), "nolabel"]:
            assert secret not in message, (secret, message)


# Every pixel decode goes through pydicom's ``Dataset.pixel_array``; this makes it count and fail, so a load
# that still returns its images took them from the cache. (Defines ``attempts``; exec'd in this process and in
# fresh ones.)
BLOCK_DECODING = """
from pydicom.dataset import Dataset
attempts = []
def _blocked(self):
    attempts.append(1)
    raise RuntimeError("pixel decoding is blocked here")
Dataset.pixel_array = property(_blocked)
"""


def _entries(cache: Path) -> dict[str, tuple[int, int, int]]:
    """Every cache file's inode, mtime and size: an entry written again (temp file + rename) changes them."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in cache.iterdir()}


def test_a_fresh_process_decodes_nothing_and_gets_identical_arrays(tmp_path, monkeypatch):
    make_site(tmp_path / "site")
    cache = tmp_path / "cache"
    first = load_radiology_site(tmp_path / "site", "Aalborg", image_size=32, cache_dir=cache)
    assert first.decoded == 24 and len(list(cache.glob("*.npy"))) == 24
    assert not list(cache.glob(".tmp-*"))
    cut = hashlib.sha256((tmp_path / "site" / "cut.dcm").read_bytes()).hexdigest()
    assert json.loads((cache / f"{cut}-v{dicom.PREPROCESS_VERSION}h{dicom.HEADER_VERSION}.json").read_text()) == {"skip": "not DICOM"}
    entries = _entries(cache)

    # the block bites: without the cache the same folder has no decodable image, and every try is counted
    blocked: dict = {}
    with monkeypatch.context() as patch:
        patch.setattr(Dataset, "pixel_array", Dataset.pixel_array)  # restored after the block
        exec(BLOCK_DECODING, blocked)
        with pytest.raises(SiteDataError, match="no usable images"):
            load_radiology_site(tmp_path / "site", "Aalborg", image_size=32, cache_dir=tmp_path / "empty")
    assert len(blocked["attempts"]) == 24

    code = (
        "import json, sys, numpy as np\n"
        + BLOCK_DECODING +
        "from client.data import dicom\n"
        f"s = dicom.load_radiology_site({str(tmp_path / 'site')!r}, 'Aalborg', image_size=32, cache_dir={str(cache)!r})\n"
        f"np.savez({str(tmp_path / 'again.npz')!r}, train=s.train.images, test=s.test.images, y=s.test.labels)\n"
        "print(json.dumps({'decoded': s.decoded, 'count': len(attempts), 'skipped': s.skipped,"
        " 'fingerprint': s.fingerprint}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    again = json.loads(done.stdout.strip().splitlines()[-1])
    assert again == {"decoded": 0, "count": 0, "skipped": first.skipped, "fingerprint": first.fingerprint}
    assert _entries(cache) == entries  # nothing written again, nothing added
    arrays = np.load(tmp_path / "again.npz")
    np.testing.assert_array_equal(arrays["train"], first.train.images)
    np.testing.assert_array_equal(arrays["test"], first.test.images)
    np.testing.assert_array_equal(arrays["y"], first.test.labels)


# ---------------------------------------------------------------- the site check


def test_site_check_prints_counts_and_reasons(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDHOSP_HOME", str(tmp_path / "home"))
    make_site(tmp_path / "Aarhus")
    result = CliRunner().invoke(site_app, ["check", str(tmp_path / "Aarhus"), "--image-size", "16"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = site_report(tmp_path / "Aarhus", "Aarhus", image_size=16)
    assert report["usable"] == 24 and report["patients"] == 12 and report["decoded"] == 0  # the check cached them
    assert report["skipped"] == BROKEN and report["unmatched_labels"] == 0
    assert "site Aarhus: radiology" in result.output and report["fingerprint"] in result.output
    for text, count in BROKEN.items():
        assert any(text in line and line.rstrip(" │").endswith(str(count)) for line in result.output.splitlines())


def test_site_check_exits_1_when_nothing_is_usable_or_the_contract_breaks(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDHOSP_HOME", str(tmp_path / "home"))
    folder = tmp_path / "Vejle"
    folder.mkdir()
    shutil.copy(sample("rtplan.dcm"), folder / "plan")
    (folder / "labels.csv").write_text("SOPInstanceUID,label\n")
    result = CliRunner().invoke(site_app, ["check", str(folder)], env={"COLUMNS": "200"})
    assert result.exit_code == 1 and "usable images" in result.output and "not an image" in result.output
    (folder / "labels.csv").unlink()
    result = CliRunner().invoke(site_app, ["check", str(folder), "--site", "Vejle"])
    assert result.exit_code == 1 and "site Vejle: no labels.csv" in result.output


def test_site_check_oncology(tmp_path):
    folder = tmp_path / "Nordjylland"
    demo.write_site(folder, demo.REGIONS[4])
    result = CliRunner().invoke(site_app, ["check", str(folder), "--task", "oncology"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "site Nordjylland: oncology" in result.output and "usable patients" in result.output
    assert "event rate" in result.output and "age, biomarker" in result.output
    assert hashlib.sha256((folder / "cohort.csv").read_bytes()).hexdigest() in result.output
    auto = CliRunner().invoke(site_app, ["check", str(folder)], env={"COLUMNS": "200"})  # cohort.csv: oncology
    assert auto.exit_code == 0 and auto.output == result.output
