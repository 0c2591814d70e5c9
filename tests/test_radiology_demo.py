"""The radiology demo generator: real DICOM per region, scanner differences, determinism, a visible grade."""

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)
from sklearn.linear_model import LogisticRegression

from client.data import radiology_demo as rd

SOP_CLASS = {"CR": ComputedRadiographyImageStorage, "DX": DigitalXRayImageStorageForPresentation}
N_IMAGES = 8


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != rd.LABELS_FILE)


def _read_all(folder: Path) -> tuple[dict[str, pydicom.Dataset], list[Path], list[pydicom.Dataset], list[Path]]:
    """Images by SOPInstanceUID, plus what a site check must report: non-DICOM, non-image, truncated files."""
    images, not_dicom, not_image, truncated = {}, [], [], []
    for path in _files(folder):
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            not_dicom.append(path)
            continue
        if "PixelData" not in ds:
            not_image.append(ds)
        elif len(ds.PixelData) < ds.Rows * ds.Columns * ds.BitsAllocated // 8:
            truncated.append(path)
        else:
            images[ds.SOPInstanceUID] = ds
    return images, not_dicom, not_image, truncated


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("radiology")
    folders = rd.write_radiology_demo(root, n_sites=5, seed=3, n_images=N_IMAGES)
    assert [f.name for f in folders] == [r.name for r in rd.RADIOLOGY_REGIONS]
    return root


@pytest.mark.parametrize("region", rd.RADIOLOGY_REGIONS, ids=lambda r: r.code)
def test_files_are_dicom_with_the_regions_scanner(demo_root, region):
    images, *_ = _read_all(demo_root / region.name)
    assert len(images) == N_IMAGES + (1 if region.broken else 0)  # the broken region has one unlabelled image
    for ds in images.values():
        meta = ds.file_meta
        assert ds.preamble == b"\0" * 128
        assert meta.TransferSyntaxUID == ExplicitVRLittleEndian and meta.ImplementationClassUID
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == SOP_CLASS[region.modality]
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == region.modality and ds.Manufacturer == region.manufacturer
        assert (ds.BodyPartExamined, ds.ViewPosition) == ("KNEE", "AP")
        assert ds.Laterality == ds.ImageLaterality and ds.Laterality in ("L", "R")
        assert ds.PatientID.startswith(f"{region.code}-P") and ds.PatientSex in ("F", "M")
        assert ds.PatientAge.endswith("Y") and len(ds.StudyDate) == 8
        assert len({ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}) == 3
        assert (ds.Rows, ds.Columns) == region.shape and ds.SamplesPerPixel == 1
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, region.bits_stored, region.bits_stored - 1)
        assert ds.PixelRepresentation == 0
        assert ds.PhotometricInterpretation == ("MONOCHROME1" if region.monochrome1 else "MONOCHROME2")
        for tag in region.spacing_tags:
            assert [float(v) for v in ds[tag].value] == list(region.spacing)
        assert ("RescaleSlope" in ds) == (region.rescale is not None)
        assert ("WindowCenter" in ds) == region.window
        pixels = ds.pixel_array
        assert pixels.shape == region.shape and int(pixels.max()) < 2**region.bits_stored
        assert pixels.std() > 0.05 * 2**region.bits_stored  # an image, not a flat field


def test_regions_differ_like_scanners_do():
    regions = rd.RADIOLOGY_REGIONS
    assert len({r.manufacturer for r in regions}) == len(regions)
    assert sum(r.monochrome1 for r in regions) == 1
    assert {r.bits_stored for r in regions} >= {10, 12, 14, 16}
    assert len({r.spacing for r in regions}) == len(regions) and any(r.spacing[0] != r.spacing[1] for r in regions)
    assert all(0.1 <= s <= 0.2 for r in regions for s in r.spacing)
    assert len({r.shape for r in regions}) == len(regions)
    assert {r.modality for r in regions} == {"CR", "DX"} and len({r.n_images for r in regions}) == len(regions)
    assert 0 < sum(r.rescale is not None for r in regions) < len(regions)
    assert 0 < sum(r.window for r in regions) < len(regions)
    assert sum(r.broken for r in regions) == 1 and {r.file_suffix for r in regions} == {"", ".dcm"}


def test_labels_point_at_existing_images_in_nested_pacs_folders(demo_root):
    for region in rd.RADIOLOGY_REGIONS:
        folder = demo_root / region.name
        labels = pd.read_csv(folder / rd.LABELS_FILE, dtype={"SOPInstanceUID": str})
        assert list(labels.columns) == ["SOPInstanceUID", "label", "PatientID"] and len(labels) == N_IMAGES
        images, *_ = _read_all(folder)
        assert set(labels.SOPInstanceUID) <= set(images)
        for row in labels.itertuples():
            assert images[row.SOPInstanceUID].PatientID == row.PatientID and row.label in rd.GRADES
        for path in _files(folder):
            assert len(path.relative_to(folder).parts) == 3  # <study>/<series>/<file>
            if path.name.startswith("IMG"):
                assert path.suffix == region.file_suffix


def test_some_patients_have_both_knees_in_one_study(tmp_path):
    region = rd.RADIOLOGY_REGIONS[4]
    rd.write_radiology_site(tmp_path, region, n_images=24)
    images, *_ = _read_all(tmp_path)
    knees: dict[str, set[str]] = {}
    studies: dict[str, set[str]] = {}
    for ds in images.values():
        knees.setdefault(ds.PatientID, set()).add(ds.ImageLaterality)
        studies.setdefault(ds.PatientID, set()).add(ds.StudyInstanceUID)
    assert any(sides == {"L", "R"} for sides in knees.values())
    assert all(len(uids) == 1 for uids in studies.values())


def test_only_the_broken_region_holds_broken_objects(demo_root):
    for region in rd.RADIOLOGY_REGIONS:
        folder = demo_root / region.name
        images, not_dicom, not_image, truncated = _read_all(folder)
        unlabelled = set(images) - set(pd.read_csv(folder / rd.LABELS_FILE, dtype=str).SOPInstanceUID)
        if not region.broken:
            assert not (not_dicom or not_image or truncated or unlabelled)
            continue
        assert [p.name for p in not_dicom] == ["Thumbs.db"]
        assert [ds.SOPClassUID for ds in not_image] == [BasicTextSRStorage]
        assert len(truncated) == 1 and len(unlabelled) == 1
        with pytest.raises(ValueError):
            pydicom.dcmread(truncated[0]).pixel_array


def test_same_seed_same_bytes_other_seed_other_uids(tmp_path):
    region = rd.RADIOLOGY_REGIONS[2]
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        rd.write_radiology_site(tmp_path / name, region, seed=seed, n_images=4)
    a, b = (tmp_path / "a", tmp_path / "b")
    assert [p.relative_to(a) for p in _files(a)] == [p.relative_to(b) for p in _files(b)]
    assert all(p.read_bytes() == (b / p.relative_to(a)).read_bytes() for p in _files(a))
    assert (a / rd.LABELS_FILE).read_bytes() == (b / rd.LABELS_FILE).read_bytes()
    uids_a = set(pd.read_csv(a / rd.LABELS_FILE, dtype=str).SOPInstanceUID)
    assert not uids_a & set(pd.read_csv(tmp_path / "c" / rd.LABELS_FILE, dtype=str).SOPInstanceUID)


def test_a_written_site_is_left_alone(tmp_path):
    region = rd.RADIOLOGY_REGIONS[0]
    labels = rd.write_radiology_site(tmp_path, region, n_images=3)
    first = _files(tmp_path)[0]
    first.unlink()
    assert rd.write_radiology_site(tmp_path, region, n_images=3) == labels and not first.exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_prevalence_differs_and_nordjylland_is_oldest_and_most_severe(tmp_path):
    expected = [np.dot(r.grade_probs, rd.GRADES) for r in rd.RADIOLOGY_REGIONS]
    assert len({round(e, 2) for e in expected}) == len(expected)
    severe = {}
    for region in (rd.RADIOLOGY_REGIONS[0], rd.RADIOLOGY_REGIONS[4]):
        rd.write_radiology_site(tmp_path / region.name, region, n_images=60)
        severe[region.name] = (pd.read_csv(tmp_path / region.name / rd.LABELS_FILE).label >= 3).mean()
    assert severe["Nordjylland"] > severe["Hovedstaden"] + 0.15
    assert max(rd.RADIOLOGY_REGIONS, key=lambda r: r.age_mean).name == "Nordjylland"


def test_regions_beyond_five_get_their_own_names_and_no_broken_files():
    regions = rd.radiology_regions(8)
    assert regions[:5] == list(rd.RADIOLOGY_REGIONS)
    assert len({r.name for r in regions}) == 8 and len({r.code for r in regions}) == 8
    assert sum(r.broken for r in regions) == 1
    assert all(abs(sum(r.grade_probs) - 1) < 1e-9 for r in regions)
    assert rd.radiology_regions(8) == regions


def test_render_knee_is_a_unit_range_image_of_the_requested_shape():
    image = rd.render_knee(2, np.random.default_rng(0), (48, 40), pixel_aspect=0.8)
    assert image.shape == (48, 40) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.1
    again = rd.render_knee(2, np.random.default_rng(0), (48, 40), pixel_aspect=0.8)
    np.testing.assert_array_equal(image, again)


def _joint_space_rows(image: np.ndarray) -> int:
    """Rows darker than bone in a vertical band through both condyles, near the joint line."""
    n = image.shape[0]
    centre, inner, outer = n // 2, int(0.2 * n / 2), int(0.28 * n / 2)
    left, right = image[:, centre - outer : centre - inner], image[:, centre + inner : centre + outer]
    band = np.concatenate([left, right], axis=1)
    profile = band.mean(axis=1)[centre - n // 5 : centre + n // 5]
    return int((profile < 0.57).sum())


def test_joint_space_narrows_monotonically_with_grade():
    gaps = [
        np.mean([_joint_space_rows(rd.render_knee(g, np.random.default_rng([g, i]), 256)) for i in range(10)])
        for g in rd.GRADES
    ]
    assert all(later < earlier for earlier, later in zip(gaps, gaps[1:])), gaps
    assert gaps[0] > 12 and gaps[4] < 2  # wide open at KL 0 (256 px image), almost closed at KL 4


def test_a_linear_model_on_32px_images_tells_mild_from_severe():
    def sample(n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        grades = [g for g in (0, 1, 3, 4) for _ in range(n)]
        images = [rd.render_knee(g, np.random.default_rng([stream, i]), 128) for i, g in enumerate(grades)]
        x = np.stack([im.reshape(32, 4, 32, 4).mean(axis=(1, 3)).ravel() for im in images])
        return x, np.array(grades) >= 3

    x_train, y_train = sample(40, 1)
    x_test, y_test = sample(20, 2)
    model = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    assert model.score(x_test, y_test) > 0.8
