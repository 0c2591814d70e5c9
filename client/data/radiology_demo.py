"""Synthetic regional knee radiographs as real DICOM files, for a federated KL-grading demo.

Each region's folder looks like a PACS export from that region's scanner: nested
study/series folders with non-obvious names, files with and without ``.dcm``,
and the quirks a reader must handle (vendor, bit depth, pixel spacing, matrix
size, intensity curve, noise, rescale and window attributes, one region storing
MONOCHROME1). Grade prevalence and patient age differ by region, so the
federation is non-IID. ``labels.csv`` holds the Kellgren-Lawrence grade (0-4)
per ``SOPInstanceUID``; the reader does its own seeded patient-level split.

The grade is drawn into the anatomy strongly enough for a small CNN at 64x64:
the joint space narrows with grade, spurs grow at the joint margins from grade
2, and the bone under the joint turns brighter (sclerosis) from grade 3.

The region with ``broken=True`` (Syddanmark) also holds what real exports
contain and a site check has to report: one image without a label row, one
truncated DICOM file, one DICOM object without pixel data (a Basic Text SR),
and one file that is not DICOM at all (``Thumbs.db``). ``n_images`` counts only
the labelled images. Output depends only on the seed: no clock, no randomness
outside it.
"""

from __future__ import annotations

import datetime
import functools
import io
import math
import os
import tempfile
import uuid
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    PYDICOM_IMPLEMENTATION_UID,
)

LABELS_FILE = "labels.csv"
GRADES = (0, 1, 2, 3, 4)

# Per KL grade, in units of the image half-height (the reader sees 64x64, so 0.15 is ~5 px there).
JOINT_SPACE = (0.15, 0.11, 0.075, 0.04, 0.012)
MEDIAL_NARROWING = (0.0, 0.1, 0.2, 0.3, 0.3)  # OA narrows the medial compartment first
SPUR_LENGTH = (0.0, 0.0, 0.07, 0.11, 0.16)
SCLEROSIS = (0.0, 0.0, 0.0, 0.6, 1.0)

_SOP_CLASS = {"CR": ComputedRadiographyImageStorage, "DX": DigitalXRayImageStorageForPresentation}
_FIRST_STUDY = datetime.date(2019, 1, 1)


@dataclass(frozen=True)
class RadiologyRegion:
    """One region's scanner and population: everything that makes its site folder differ from the others."""

    name: str
    code: str  # ASCII prefix of the PatientID pseudonyms
    n_images: int  # labelled images written by default
    manufacturer: str
    model: str
    modality: str  # "CR" or "DX"
    bits_stored: int  # BitsAllocated is always 16
    shape: tuple[int, int]  # native matrix, rows x columns
    spacing: tuple[float, float]  # mm, row x column (DICOM order)
    spacing_tags: tuple[str, ...]  # which of PixelSpacing / ImagerPixelSpacing the scanner writes
    gamma: float  # detector/processing curve applied to the anatomy
    noise: float  # Gaussian noise sd, fraction of the display range
    rescale: tuple[float, float] | None  # RescaleSlope, RescaleIntercept
    window: bool  # writes WindowCenter / WindowWidth
    monochrome1: bool  # stores inverted pixels (bone dark), as some CR vendors do
    file_suffix: str  # "" or ".dcm": exports differ
    grade_probs: tuple[float, float, float, float, float]  # KL 0..4 prevalence
    age_mean: float
    bilateral: float  # share of patients with both knees imaged
    broken: bool = False  # also writes the broken objects described in the module docstring


RADIOLOGY_REGIONS = (
    RadiologyRegion(
        name="Hovedstaden", code="HOV", n_images=180,
        manufacturer="Agfa", model="DX-G", modality="CR", bits_stored=12,
        shape=(320, 320), spacing=(0.15, 0.15), spacing_tags=("PixelSpacing",),
        gamma=0.9, noise=0.015, rescale=None, window=True, monochrome1=False, file_suffix="",
        grade_probs=(0.32, 0.28, 0.20, 0.13, 0.07), age_mean=61.0, bilateral=0.30,
    ),
    RadiologyRegion(
        name="Midtjylland", code="MID", n_images=150,
        manufacturer="Fujifilm", model="FCR PROFECT CS", modality="CR", bits_stored=10,
        shape=(256, 256), spacing=(0.2, 0.2), spacing_tags=("PixelSpacing", "ImagerPixelSpacing"),
        gamma=1.25, noise=0.025, rescale=None, window=False, monochrome1=True, file_suffix=".dcm",
        grade_probs=(0.27, 0.26, 0.22, 0.16, 0.09), age_mean=63.0, bilateral=0.25,
    ),
    RadiologyRegion(
        name="Syddanmark", code="SYD", n_images=140,
        manufacturer="Carestream", model="DRX-Evolution", modality="DX", bits_stored=14,
        shape=(352, 288), spacing=(0.139, 0.139), spacing_tags=("ImagerPixelSpacing",),
        gamma=1.0, noise=0.02, rescale=(1.0, -1024.0), window=True, monochrome1=False, file_suffix="",
        grade_probs=(0.25, 0.25, 0.23, 0.17, 0.10), age_mean=64.0, bilateral=0.35, broken=True,
    ),
    RadiologyRegion(
        name="Sjælland", code="SJA", n_images=120,
        manufacturer="Philips", model="DigitalDiagnost", modality="DX", bits_stored=16,
        shape=(384, 384), spacing=(0.143, 0.143), spacing_tags=("ImagerPixelSpacing", "PixelSpacing"),
        gamma=0.8, noise=0.012, rescale=(0.5, 0.0), window=True, monochrome1=False, file_suffix=".dcm",
        grade_probs=(0.20, 0.24, 0.24, 0.20, 0.12), age_mean=66.0, bilateral=0.30,
    ),
    RadiologyRegion(
        name="Nordjylland", code="NOR", n_images=100,
        manufacturer="Siemens", model="Ysio Max", modality="DX", bits_stored=12,
        shape=(288, 344), spacing=(0.15, 0.125), spacing_tags=("ImagerPixelSpacing",),
        gamma=1.1, noise=0.03, rescale=(1.0, 0.0), window=True, monochrome1=False, file_suffix="",
        grade_probs=(0.10, 0.16, 0.24, 0.28, 0.22), age_mean=70.0, bilateral=0.40,
    ),
)


def radiology_regions(n: int, seed: int = 42) -> list[RadiologyRegion]:
    """The five Danish regions first; more sites get seeded variations of them, never the broken files."""
    out = list(RADIOLOGY_REGIONS[:n])
    rng = np.random.default_rng(seed + 7919)
    for k in range(len(out), n):
        base = RADIOLOGY_REGIONS[k % len(RADIOLOGY_REGIONS)]
        probs = rng.dirichlet(np.asarray(base.grade_probs) * 40.0)
        out.append(
            replace(
                base,
                name=f"Site-{k + 1:02d}",
                code=f"S{k + 1:02d}",
                n_images=int(rng.integers(80, 180)),
                noise=float(base.noise * rng.uniform(0.8, 1.2)),
                gamma=float(base.gamma * rng.uniform(0.9, 1.1)),
                grade_probs=tuple(float(p) for p in probs / probs.sum()),
                age_mean=float(base.age_mean + rng.normal(0, 2)),
                broken=False,
            )
        )
    return out


# --- anatomy -----------------------------------------------------------------


def render_knee(
    grade: int, rng: np.random.Generator, size: int | tuple[int, int], *, pixel_aspect: float = 1.0
) -> np.ndarray:
    """A right knee, AP view (lateral side and fibula on the image's left), before scanner effects.

    Returns float32 in [0, 1], bright = dense. ``pixel_aspect`` is column over
    row spacing, so non-square detector pixels stretch the anatomy as they do on
    a real detector. Geometry is in units of the image half-height.
    """
    rows, cols = (size, size) if isinstance(size, int) else size
    x, y, pixel = _anatomy_coordinates(rng, rows, cols, pixel_aspect)
    width = rng.uniform(0.9, 1.1)
    lateral = JOINT_SPACE[grade] * rng.uniform(0.85, 1.15)
    medial = lateral * (1.0 - MEDIAL_NARROWING[grade])

    gap = lateral + (medial - lateral) * _step(x, 0.05)  # the medial side is +x on a right knee
    femur_surface = _condyle_line(x, gap, width) - y
    tibia_surface = y - _plateau_line(x, gap, width)
    femur = np.minimum(femur_surface, 0.22 * width + 0.26 * width * _step(y + 0.4, 0.12) - np.abs(x))
    tibia = np.minimum(tibia_surface, 0.24 * width + 0.28 * width * _step(0.42 - y, 0.12) - np.abs(x))
    spurs = _spurs(x, y, (lateral, medial), width, SPUR_LENGTH[grade], rng)
    bone = np.maximum(np.maximum(femur, tibia), spurs)
    inside = _inside(bone, pixel)
    cortex = inside * np.exp(-np.maximum(bone, 0.0) / (0.02 + 0.035 * _step(np.abs(y) - 0.55, 0.1)))  # shafts: thick
    sclerosis = 0.0
    if SCLEROSIS[grade]:
        sclerosis = SCLEROSIS[grade] * inside * (
            np.exp(-np.maximum(femur_surface, 0.0) / 0.07) + np.exp(-np.maximum(tibia_surface, 0.0) / 0.07)
        )
    texture = _texture(rng, rows, cols)

    attenuation = (
        0.05
        + 0.42 * _soft_tissue(x, width) * (1.0 + 0.05 * texture)
        + inside * (0.55 + 0.08 * texture)
        + 0.35 * cortex
        + 0.5 * sclerosis
        + 0.35 * _inside(_fibula(x, y, width), pixel)
        + 0.12 * _inside(_ellipse(x, y, 0.0, -0.25, 0.22 * width, 0.26), pixel)  # patella, seen through the femur
    )
    return 1.0 - np.exp(-1.2 * attenuation)


def _anatomy_coordinates(
    rng: np.random.Generator, rows: int, cols: int, pixel_aspect: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Pixel grid in anatomy units with the patient's positioning (shift, tilt, magnification) applied.

    float32 throughout: the demo writes hundreds of images and float64 would double the time.
    """
    half = rows / 2.0
    v = ((np.arange(rows, dtype=np.float32) - (rows - 1) / 2.0) / half)[:, None]
    u = ((np.arange(cols, dtype=np.float32) - (cols - 1) / 2.0) * pixel_aspect / half)[None, :]
    tilt = math.radians(float(np.clip(rng.normal(0.0, 3.0), -6.0, 6.0)))
    shift_u, shift_v = (float(d) for d in rng.uniform(-0.06, 0.06, 2))
    scale = rng.uniform(0.92, 1.08)
    c, s = math.cos(tilt) / scale, math.sin(tilt) / scale
    x = c * (u - shift_u) + s * (v - shift_v)
    y = c * (v - shift_v) - s * (u - shift_u)
    return x, y, 1.0 / (half * scale)


def _condyle_line(x, gap, width: float):
    """Lower edge of the femur: two rounded condyles with the intercondylar notch between."""
    ax = np.abs(x)
    rounding = 0.9 * (ax - 0.24 * width) ** 2 + 2.5 * np.maximum(ax - 0.36 * width, 0.0) ** 2
    return -gap / 2 - rounding - 0.09 * np.exp(-((x / 0.07) ** 2))


def _plateau_line(x, gap, width: float):
    """Upper edge of the tibia: a flat plateau, rounded at the margins, with the spines rising into the notch."""
    ax = np.abs(x)
    spines = 0.07 * np.exp(-(((ax - 0.05) / 0.035) ** 2))
    return gap / 2 + 2.0 * np.maximum(ax - 0.44 * width, 0.0) ** 2 - spines


def _spurs(
    x: np.ndarray, y: np.ndarray, gaps: tuple[float, float], width: float, length: float, rng: np.random.Generator
) -> np.ndarray:
    """Osteophytes: blunt, broad-based outgrowths at the four joint margins, femoral ones down, tibial up."""
    out = np.full(x.shape, -1.0, dtype=x.dtype)
    if length == 0.0:
        return out
    near_joint = np.flatnonzero(np.abs(y).min(axis=1) < 0.35)  # spurs stay near the joint: skip other rows
    band = slice(near_joint[0], near_joint[-1] + 1)
    out[band] = _spur_band(x[band], y[band], gaps, width, length, rng)
    return out


def _spur_band(
    x: np.ndarray, y: np.ndarray, gaps: tuple[float, float], width: float, length: float, rng: np.random.Generator
) -> np.ndarray:
    out = np.full(x.shape, -1.0, dtype=x.dtype)
    for side, gap in zip((-1, 1), gaps):
        for down, edge in ((1, 0.47), (-1, 0.51)):
            base_x = side * edge * width
            surface = _condyle_line(base_x, gap, width) if down > 0 else _plateau_line(base_x, gap, width)
            base_y = float(surface) - down * 0.015  # starts just inside the bone
            spur = length * rng.uniform(0.7, 1.3)
            angle = math.radians(rng.uniform(25.0, 45.0))
            dx, dy = side * math.cos(angle), down * math.sin(angle)
            along = (x - base_x) * dx + (y - base_y) * dy
            across = (y - base_y) * dx - (x - base_x) * dy
            thickness = (0.3 * spur + 0.01) * np.sqrt(np.clip(1.0 - along / spur, 0.0, None))
            out = np.maximum(out, np.minimum(np.minimum(along + 0.03, spur - along), thickness - np.abs(across)))
    return out


def _fibula(x: np.ndarray, y: np.ndarray, width: float) -> np.ndarray:
    head = _ellipse(x, y, -0.44 * width, 0.45, 0.09 * width, 0.12)
    shaft = np.minimum(0.045 * width - np.abs(x + 0.41 * width), y - 0.45)
    return np.maximum(head, shaft)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return (1.0 - np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)) * min(a, b)


def _soft_tissue(x: np.ndarray, width: float) -> np.ndarray:
    """Relative thickness of a limb-shaped cylinder of soft tissue around the bones."""
    return np.sqrt(np.clip(1.0 - (x / (0.8 * width)) ** 2, 0.0, 1.0))


def _texture(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A randomly shifted view of one periodic texture: each image looks different at a fraction of an FFT's cost."""
    shift = (int(rng.integers(rows)), int(rng.integers(cols)))
    return np.roll(_texture_field(rows, cols), shift, axis=(0, 1))


@functools.lru_cache(maxsize=8)
def _texture_field(rows: int, cols: int) -> np.ndarray:
    """Unit-variance noise smoothed more vertically than across, like trabeculae along the load lines."""
    white = np.random.default_rng([rows, cols]).standard_normal((rows, cols))
    fy = np.fft.fftfreq(rows)[:, None]
    fx = np.fft.rfftfreq(cols)[None, :]
    sigma_y, sigma_x = rows / 60.0, rows / 180.0
    transfer = np.exp(-2.0 * np.pi**2 * ((fy * sigma_y) ** 2 + (fx * sigma_x) ** 2))
    smooth = np.fft.irfft2(np.fft.rfft2(white) * transfer, s=(rows, cols))
    field = (smooth / smooth.std()).astype(np.float32)
    field.setflags(write=False)
    return field


def _step(d: np.ndarray, scale: float) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(d / scale)


def _inside(distance: np.ndarray, pixel: float) -> np.ndarray:
    """Anti-aliased membership: a soft edge about one pixel wide."""
    return _step(distance, pixel)


# --- scanner and DICOM ---------------------------------------------------------


@dataclass(frozen=True)
class _Knee:
    index: int
    patient: int
    laterality: str  # "R" or "L"
    grade: int
    sex: str
    age: int
    study_date: str
    study_time: str


def _cohort(region: RadiologyRegion, n_images: int, seed: int) -> list[_Knee]:
    """Patients with one knee or both imaged; both knees of a patient have similar grades."""
    rng = np.random.default_rng([seed, zlib.crc32(region.name.encode())])
    knees: list[_Knee] = []
    patient = 0
    while len(knees) < n_images:
        grade = int(rng.choice(GRADES, p=region.grade_probs))
        grades = [grade]
        if rng.random() < region.bilateral:
            grades.append(int(np.clip(grade + rng.choice([-1, 0, 0, 1]), 0, 4)))
        sides = ["R", "L"] if len(grades) == 2 else [str(rng.choice(["R", "L"]))]
        sex = "F" if rng.random() < 0.58 else "M"
        age = int(np.clip(rng.normal(region.age_mean + 4.0 * (grade - 2), 8.0), 35, 92))  # worse knees, older
        date = _FIRST_STUDY + datetime.timedelta(days=int(rng.integers(0, 6 * 365)))
        time = f"{int(rng.integers(7, 17)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
        for side, knee_grade in zip(sides, grades):
            if len(knees) < n_images:
                knees.append(_Knee(len(knees), patient, side, knee_grade, sex, age, date.strftime("%Y%m%d"), time))
        patient += 1
    return knees


def _uid(seed: int, region: RadiologyRegion, *parts: object) -> str:
    """A UUID-derived UID (2.25.*) from a name-based UUID, so the same seed gives the same UIDs.

    pydicom's ``generate_uid(prefix=None, ...)`` ignores its entropy sources and is random.
    """
    name = "/".join(["fedhosp-radiology-demo", str(seed), region.name, *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def _stored_pixels(region: RadiologyRegion, knee: _Knee, seed: int) -> np.ndarray:
    """The scanner's view of the knee: its geometry, curve, noise, bit depth and polarity."""
    rng = np.random.default_rng([seed, zlib.crc32(region.name.encode()), knee.index])
    rows, cols = region.shape
    image = render_knee(knee.grade, rng, (rows, cols), pixel_aspect=region.spacing[1] / region.spacing[0])
    if knee.laterality == "L":
        image = image[:, ::-1]
    noise = region.noise * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.clip(image**region.gamma + noise, 0.0, 1.0)
    top = 2**region.bits_stored - 1
    stored = np.round(top * (0.04 + 0.88 * image))  # detectors keep clear of both ends of their range
    if region.monochrome1:
        stored = top - stored
    return stored.astype(np.uint16)


def _image_dataset(region: RadiologyRegion, knee: _Knee, seed: int) -> Dataset:
    ds = _base_dataset(region, seed, knee, _SOP_CLASS[region.modality], _uid(seed, region, "image", knee.index))
    ds.SeriesInstanceUID = _uid(seed, region, "series", knee.index)
    ds.SeriesNumber = 1 if knee.laterality == "R" else 2
    ds.SeriesDescription = f"KNEE AP {'RIGHT' if knee.laterality == 'R' else 'LEFT'}"
    ds.Modality = region.modality
    ds.Manufacturer = region.manufacturer
    ds.ManufacturerModelName = region.model
    ds.BodyPartExamined = "KNEE"
    ds.ViewPosition = "AP"
    ds.Laterality = knee.laterality
    ds.ImageLaterality = knee.laterality
    ds.PatientOrientation = ["L", "F"]  # AP: the patient's left to the image's right, feet down
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = knee.study_date, knee.study_time

    pixels = _stored_pixels(region, knee, seed)
    photometric = "MONOCHROME1" if region.monochrome1 else "MONOCHROME2"
    ds.set_pixel_data(pixels, photometric, region.bits_stored, generate_instance_uid=False)
    for tag in region.spacing_tags:
        setattr(ds, tag, [f"{region.spacing[0]:g}", f"{region.spacing[1]:g}"])
    slope, intercept = region.rescale or (1.0, 0.0)
    if region.rescale:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "US"
    if region.window:
        low, high = np.percentile(pixels[::4, ::4], [1, 99]) * slope + intercept  # a subsample is plenty
        ds.WindowCenter, ds.WindowWidth = f"{(low + high) / 2:.1f}", f"{(high - low) * 1.1:.1f}"
    if region.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.PresentationLUTShape = "INVERSE" if region.monochrome1 else "IDENTITY"
        ds.DetectorType = "SCINTILLATOR"
        ds.LossyImageCompression = "00"
        ds.BurnedInAnnotation = "NO"
    return ds


def _report_dataset(region: RadiologyRegion, knee: _Knee, seed: int) -> Dataset:
    """A Basic Text SR filed in a patient's study, as PACS exports carry: DICOM, but no image."""
    ds = _base_dataset(region, seed, knee, BasicTextSRStorage, _uid(seed, region, "report", knee.index))
    ds.Modality = "SR"
    ds.SeriesInstanceUID = _uid(seed, region, "report-series", knee.index)
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.Manufacturer = region.manufacturer
    ds.ContentDate, ds.ContentTime = knee.study_date, knee.study_time
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ConceptNameCodeSequence = [_code("11528-7", "LN", "Radiology Report")]
    finding = Dataset()
    finding.RelationshipType = "CONTAINS"
    finding.ValueType = "TEXT"
    finding.ConceptNameCodeSequence = [_code("121071", "DCM", "Finding")]
    finding.TextValue = "Knee AP. Degenerative changes, see images."
    ds.ContentSequence = [finding]
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _base_dataset(region: RadiologyRegion, seed: int, knee: _Knee, sop_class: str, sop_instance: str) -> Dataset:
    """File meta, SOP, patient and study attributes shared by every object of the knee's study."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance
    ds.PatientName = ""
    ds.PatientID = _patient_id(region, knee)
    ds.PatientBirthDate = ""
    ds.PatientSex = knee.sex
    ds.PatientAge = f"{knee.age:03d}Y"
    ds.StudyInstanceUID = _uid(seed, region, "study", knee.patient)
    ds.StudyDate, ds.StudyTime = knee.study_date, knee.study_time
    ds.StudyID = str(knee.patient + 1)
    ds.StudyDescription = "KNEE AP"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    return ds


def _patient_id(region: RadiologyRegion, knee: _Knee) -> str:
    return f"{region.code}-P{knee.patient + 1:04d}"


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _write_atomically(path: Path, data: bytes) -> None:
    """Concurrent writers of the same site produce the same bytes; a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _image_paths(folder: Path, region: RadiologyRegion, seed: int, knees: list[_Knee]) -> dict[int, Path]:
    """One series per knee, numbered within the patient's study; PACS exports name folders opaquely."""
    paths: dict[int, Path] = {}
    series: dict[int, int] = {}
    for knee in knees:
        series[knee.patient] = series.get(knee.patient, 0) + 1
        study = folder / f"{zlib.crc32(_uid(seed, region, 'study', knee.patient).encode()):08X}"
        paths[knee.index] = study / f"SER{series[knee.patient]:05d}" / f"IMG0001{region.file_suffix}"
    return paths


def _write_broken_objects(region: RadiologyRegion, seed: int, paths: dict[int, Path], knees: list[_Knee]) -> None:
    """What a real export mixes in: an image nobody labelled, a truncated copy, an SR, a Windows thumbnail cache."""
    first, unlabelled, truncated = knees
    _write_atomically(paths[unlabelled.index], _encode(_image_dataset(region, unlabelled, seed)))
    whole = _encode(_image_dataset(region, truncated, seed))
    _write_atomically(paths[truncated.index], whole[: len(whole) // 2])
    report = paths[first.index].parent.parent / "SER00099" / f"IMG0001{region.file_suffix}"
    _write_atomically(report, _encode(_report_dataset(region, first, seed)))
    ole_signature = bytes.fromhex("D0CF11E0A1B11AE1")  # Windows' thumbnail cache is an OLE compound file
    thumbs = ole_signature + np.random.default_rng([seed, zlib.crc32(b"Thumbs.db")]).bytes(1528)
    _write_atomically(paths[first.index].parent / "Thumbs.db", thumbs)


def write_radiology_site(
    folder: Path, region: RadiologyRegion, seed: int = 42, n_images: int | None = None, scanner_shift: float = 0.0
) -> Path:
    """Write one region's DICOM export and ``labels.csv`` (last, atomically); returns the labels file.

    A folder that already has ``labels.csv`` is complete and left alone, so
    concurrent or repeated writers are safe. ``scanner_shift`` > 0 simulates a
    new detector at the site (more noise, a different response curve, and pixel
    spacing that no longer corrects for magnification, so anatomy is resampled
    at the wrong scale): write it into an empty folder to re-validate a model
    after the change.
    """
    folder = Path(folder)
    target = folder / LABELS_FILE
    if target.exists():
        return target
    if scanner_shift > 0:  # noisier, another response curve, and magnification left uncorrected in PixelSpacing
        region = replace(region, noise=region.noise * (1 + 6 * scanner_shift), gamma=region.gamma * (1 + scanner_shift),
                         spacing=tuple(s * (1 + 0.25 * scanner_shift) for s in region.spacing))
    count = region.n_images if n_images is None else n_images
    knees = _cohort(region, count + (2 if region.broken else 0), seed)
    labelled = knees[:count]
    paths = _image_paths(folder, region, seed, knees)
    for knee in labelled:
        _write_atomically(paths[knee.index], _encode(_image_dataset(region, knee, seed)))
    if region.broken:
        _write_broken_objects(region, seed, paths, [knees[0], *knees[count:]])

    labels = pd.DataFrame(
        {
            "SOPInstanceUID": [_uid(seed, region, "image", k.index) for k in labelled],
            "label": [k.grade for k in labelled],
            "PatientID": [_patient_id(region, k) for k in labelled],
        }
    )
    _write_atomically(target, labels.to_csv(index=False, lineterminator="\n").encode())
    return target


def write_radiology_demo(
    root: Path, n_sites: int = 5, seed: int = 42, n_images: int | None = None
) -> list[Path]:
    """Write one site folder per region under ``root``; returns the folders."""
    root = Path(root)
    folders = []
    for region in radiology_regions(n_sites, seed):
        write_radiology_site(root / region.name, region, seed, n_images)
        folders.append(root / region.name)
    return folders
