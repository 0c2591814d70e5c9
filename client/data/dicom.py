"""The radiology site-folder contract: knee radiographs (DICOM) graded by Kellgren-Lawrence, on the node.

A site folder holds DICOM files anywhere below it (any names, any extension or
none) and ``labels.csv`` at its root: a ``SOPInstanceUID`` column (or ``file``,
a path relative to the folder; ``SOPInstanceUID`` wins when both are there), a
``label`` column (KL grade 0..4; for target ``binary`` the class itself, 0 or 1),
optionally ``split`` (``train``/``test``) and ``PatientID`` (else the DICOM
header's is used).

Errors raised here are :class:`SiteDataError`; their messages name the site and
the problem, never a path, a file name, a UID, a PatientID or any other DICOM
value, because Flower forwards a ClientApp's exception text to the coordinator.
Files that cannot be used are skipped and counted under a short reason from a
fixed vocabulary; paths are logged at DEBUG level only.

Preprocessing (:data:`PREPROCESS_VERSION`; change it whenever the output changes):

1. the modality LUT (rescale slope/intercept or a Modality LUT Sequence), then
   the first VOI LUT or window, i.e. the grey levels the modality meant for display;
2. ``MONOCHROME1`` is negated so that bone is bright in every image (a DX
   Presentation LUT Shape ``INVERSE`` restates the same inversion, so it is not
   applied again);
3. one resampling straight onto isotropic pixels at the target resolution,
   using ``PixelSpacing`` (else ``ImagerPixelSpacing``, else square pixels), so
   that a 3000-pixel radiograph is never upsampled in full first; bilinear with
   antialiasing (torch; MONAI's ``Resize`` would do the same but importing MONAI
   costs seconds per node process); the aspect ratio is kept and the short side
   padded symmetrically with the image's darkest value;
4. standardised to zero mean and unit variance over the whole square (a flat
   image becomes zeros), so sites with different detectors and windows meet on
   one scale.

Orientation is pydicom's ``pixel_array`` convention: the first axis is the
rows, row 0 is the top of the image (MONAI's ``PydicomReader`` returns the
transpose).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import posixpath
import re
import tempfile
import warnings
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import torch
import torch.nn.functional as F
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder

from client.data.tabular import TEST_FRACTION, age_band
from models.errors import SiteDataError
from models.home import fedhosp_home

log = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
UID_COLUMN = "SOPInstanceUID"
FILE_COLUMN = "file"
PATIENT_COLUMN = "PatientID"
PREPROCESS_VERSION = "1"
HEADER_VERSION = "2"  # what a cached verdict holds of the header (2: sex and age)
KL_GRADES = 5
REFERRAL_GRADE = 2  # KL >= 2: definite osteoarthritis, referred
TARGETS = {"kl-grade": KL_GRADES, "referral": 2, "binary": 2}
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")

NOT_DICOM = "not DICOM"
NOT_AN_IMAGE = "not an image"
UNSUPPORTED_SYNTAX = "unsupported transfer syntax"
MULTI_FRAME = "multi-frame"
COLOUR = "colour"
MISSING_LABEL = "missing label"
INVALID_LABEL = "invalid label"
UNREADABLE = "unreadable pixel data"
DUPLICATE = "duplicate"


class Skip(Exception):
    """A file the site cannot use; ``reason`` is one of the fixed skip reasons, safe to count and show."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class ImageSplit:
    images: np.ndarray  # float32 [N, 1, H, W]
    labels: np.ndarray  # int64 [N], the target
    vendors: list[str]  # vendor group per image (dicom.vendor_group), for subgroup metrics
    # Per image, all on the node only: the patient (index, for patient-level bootstrap) and the
    # subgroup labels validation reports on (sex, age band, vendor); "" where the header has none.
    patients: np.ndarray | None = None
    groups: dict[str, list[str]] | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class RadiologySite:
    site: str
    train: ImageSplit
    test: ImageSplit
    skipped: dict[str, int]
    class_counts: dict[int, int]  # target class -> images, every class listed
    fingerprint: str
    decoded: int


def read_image(path: str | Path, image_size: int) -> np.ndarray:
    """Decode and preprocess one DICOM file (see the module docstring), or raise :class:`Skip`."""
    return _pixels(_inspect(_read_bytes(Path(path))), image_size)


def stored_pixels(path: str | Path) -> np.ndarray:
    """One file's pixel values as :func:`read_image` decodes them (no LUT, no resampling), or raise :class:`Skip`."""
    return _decoded(_inspect(_read_bytes(Path(path))), lambda ds: ds.pixel_array)


def load_radiology_site(
    folder: str | Path,
    site: str,
    image_size: int = 64,
    seed: int = 42,
    target: str = "kl-grade",
    cache_dir: str | Path | None = None,
    validation: bool = False,
    images: str | Path | None = None,
) -> RadiologySite:
    """Read the site folder (through the cache), skip unusable files (counted) and split by patient.

    ``validation``: only testing a model, so ``labels.csv`` may mark every image ``test``.
    ``images``: where the DICOM files are, when not in the site folder (a PACS site's copy, client/data/pacs.py).
    """
    if target not in TARGETS:
        raise ValueError(f"unknown radiology target {target!r}; expected one of {sorted(TARGETS)}")
    scan = _scan(Path(folder), site, image_size, cache_dir, images)
    if not scan.images:
        raise SiteDataError(f"site {site}: no usable images in the site's data folder ({_summary(scan.skipped)})")
    is_test = _test_mask(scan, seed, site)
    n_train, n_test = int((~is_test).sum()), int(is_test.sum())
    if (n_train < 2 and not validation) or n_test < 1:
        raise SiteDataError(f"site {site}: too few usable images ({n_train} train, {n_test} test)")
    grades = np.array([image.grade for image in scan.images], dtype=np.int64)
    if target == "binary" and grades.max() > 1:  # KL grades read as classes would train a wrong model
        raise SiteDataError(f"site {site}: target 'binary' needs labels 0 and 1; {LABELS_FILE} holds other values")
    labels = (grades >= REFERRAL_GRADE).astype(np.int64) if target == "referral" else grades
    pixels = np.stack([image.pixels for image in scan.images])[:, None].astype(np.float32)
    vendors = [vendor_group(image.vendor) for image in scan.images]  # the only use of the header's free text
    patients = np.unique([image.group for image in scan.images], return_inverse=True)[1].astype(np.int64)
    groups = {"sex": [image.sex for image in scan.images],
              "age": [age_band(image.age) for image in scan.images], "vendor": vendors}

    def part(mask: np.ndarray) -> ImageSplit:
        return ImageSplit(pixels[mask], labels[mask], [v for v, m in zip(vendors, mask) if m], patients[mask],
                          {k: [v for v, m in zip(values, mask) if m] for k, values in groups.items()})

    counts = np.bincount(labels, minlength=TARGETS[target])
    return RadiologySite(site, part(~is_test), part(is_test), scan.skipped,
                         {k: int(n) for k, n in enumerate(counts)}, scan.fingerprint, scan.decoded)


def site_report(folder: str | Path, site: str, image_size: int = 64, cache_dir: str | Path | None = None,
                images: str | Path | None = None) -> dict:
    """What the node would use, for people checking a site folder; it never raises for unusable images."""
    scan = _scan(Path(folder), site, image_size, cache_dir, images)
    grades = np.bincount([image.grade for image in scan.images], minlength=KL_GRADES)
    return {
        "site": site,
        "usable": len(scan.images),
        "patients": len({image.group for image in scan.images}),
        "skipped": scan.skipped,
        "class_counts": {k: int(n) for k, n in enumerate(grades)},
        "unmatched_labels": scan.unmatched,
        "fingerprint": scan.fingerprint,
        "decoded": scan.decoded,
    }


# ---------------------------------------------------------------- one file


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        raise Skip(NOT_DICOM) from None


def _inspect(data: bytes) -> Dataset:
    """Parse and check one file; pydicom's warnings about odd values are dropped (its logger has them)."""
    ds = _open(data)
    with warnings.catch_warnings(action="ignore"):
        _check(ds)
    return ds


def _open(data: bytes) -> Dataset:
    """Parse a whole file; pydicom reads truncated files leniently, so truncation is checked here.

    A cut that falls exactly between two header elements still reads as a shorter
    header ("not an image"); in a radiograph the pixel data is nearly all of the
    file, so a cut almost always lands there and is caught.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
        except Exception:
            raise Skip(NOT_DICOM) from None
    # pydicom turns a missing delimiter (truncated encapsulated data) into this warning
    if any(str(w.message).startswith("End of file reached") for w in caught) or _short_last_element(ds):
        raise Skip(NOT_DICOM)
    return ds


def _short_last_element(ds: Dataset) -> bool:
    """A file cut inside its last element's value: pydicom keeps the short value without a word."""
    if not len(ds):
        return False
    last = ds.get_item(max(ds.keys()), keep_deferred=True)
    return (isinstance(last, RawDataElement) and last.length != 0xFFFFFFFF
            and len(last.value or b"") < last.length)


def _check(ds: Dataset) -> None:
    """Refuse what is not one greyscale frame, in an order that makes the last reason actionable.

    Permanent reasons come first, so "unsupported transfer syntax" counts exactly
    the images that installing the named plugin would recover.
    """
    if "PixelData" not in ds:
        raise Skip(NOT_AN_IMAGE)
    photometric = _photometric(ds)
    if _int(ds, "SamplesPerPixel", 1) != 1 or (photometric and photometric not in MONOCHROME):
        raise Skip(COLOUR)
    if _int(ds, "NumberOfFrames", 1) > 1:
        raise Skip(MULTI_FRAME)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None:
        _require_decoder(syntax)


def _photometric(ds: Dataset) -> str:
    return str(ds.get("PhotometricInterpretation", "")).strip().upper()


def _int(ds: Dataset, keyword: str, default: int) -> int:
    """A count the header gets wrong leaves the pixel data uninterpretable."""
    try:
        return int(ds.get(keyword) or default)
    except (TypeError, ValueError):
        raise Skip(UNREADABLE) from None


# Public transfer syntaxes newer than pydicom's dictionary, so that a skip reason can name them.
NEWER_SYNTAXES = {
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
    "1.2.840.10008.1.2.8.1": "Deflated Image Frame Compression",
}


def _require_decoder(syntax: pydicom.uid.UID) -> None:
    """Pass every syntax pydicom can decode here (with our pylibjpeg plugins, all it has a decoder for).

    A skip names the syntax by the standard's name only: a private or unknown UID reads "unknown", never itself.
    """
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:  # pydicom has no decoder for it, whatever is installed
        raise Skip(f"{UNSUPPORTED_SYNTAX}: {_syntax_name(syntax)} (no decoder)") from None
    if not decoder.is_available:
        raise Skip(f"{UNSUPPORTED_SYNTAX}: {syntax.name} (needs {_plugins(decoder.missing_dependencies)})")


def _syntax_name(syntax: pydicom.uid.UID) -> str:
    if str(syntax) in NEWER_SYNTAXES:
        return NEWER_SYNTAXES[str(syntax)]
    return syntax.name if syntax.type == "Transfer Syntax" else "unknown"


def _plugins(missing: list[str]) -> str:
    """Package names from pydicom's "<plugin> - requires a>=1 and b>=2" notes: the last one is the decoder."""
    names = []
    for note in missing:
        requirement = note.split("requires", 1)[-1].split(" and ")[-1]
        names.append(re.split(r"[<>=!~\s]", requirement.strip(), maxsplit=1)[0])
    return " or ".join(dict.fromkeys(names))


def _pixels(ds: Dataset, image_size: int) -> np.ndarray:
    values, spacing = _decoded(ds, lambda ds: (_display_values(ds), _spacing(ds)))
    return _standardise(_isotropic_square(values, spacing, image_size))


def _decoded(ds: Dataset, step):
    """``step(ds)``, which decodes the pixel data: any failure in it is the file's, counted as unreadable."""
    try:
        with warnings.catch_warnings(action="ignore"):  # pydicom logs its notes as well
            return step(ds)
    except Exception as exc:
        log.debug("pixel data cannot be decoded (%s: %s)", type(exc).__name__, exc)
        raise Skip(UNREADABLE) from None


def _display_values(ds: Dataset) -> np.ndarray:
    values = _voi(apply_modality_lut(ds.pixel_array, ds), ds)
    values = np.asarray(values, dtype=np.float64)
    return -values if _photometric(ds) == "MONOCHROME1" else values


def _voi(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The display window; one that cannot be applied is ignored rather than losing the image."""
    if ds.get("VOILUTSequence"):
        values = np.rint(values).astype(np.int64)  # a LUT is indexed by integer values
    try:
        return apply_voi_lut(values, ds, index=0, prefer_lut=True)
    except Exception as exc:
        log.debug("VOI not applied (%s: %s)", type(exc).__name__, exc)
        return values


def _spacing(ds: Dataset) -> tuple[float, float]:
    """Row and column spacing; square pixels when the header gives none usable."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            rows, cols = (float(v) for v in ds.get(keyword) or ())
        except (TypeError, ValueError):
            continue
        if rows > 0 and cols > 0 and math.isfinite(rows) and math.isfinite(cols):
            return rows, cols
    return 1.0, 1.0


def _isotropic_square(values: np.ndarray, spacing: tuple[float, float], size: int) -> np.ndarray:
    """One resampling onto isotropic pixels of the final size: anatomy keeps its proportions across detectors."""
    height, width = values.shape[0] * spacing[0], values.shape[1] * spacing[1]
    scale = size / max(height, width)
    shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=shape, mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()
    pad_rows, pad_cols = size - shape[0], size - shape[1]
    pad = ((pad_rows // 2, pad_rows - pad_rows // 2), (pad_cols // 2, pad_cols - pad_cols // 2))
    return np.pad(resized, pad, constant_values=resized.min())


def _standardise(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    std = values.std()
    return ((values - values.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


# ---------------------------------------------------------------- the cache


class _Cache:
    """Preprocessed images and per-file verdicts, keyed by content, so renamed or moved files still hit.

    It holds patient images and identifiers: it stays on the node, readable by its owner.
    """

    def __init__(self, root: Path):
        self.root = root.expanduser().resolve()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def verdict(self, sha: str) -> dict | None:
        try:
            return json.loads((self.root / self._verdict_name(sha)).read_text())
        except (OSError, ValueError):
            return None

    def put_verdict(self, sha: str, verdict: dict) -> None:
        self._write(self._verdict_name(sha), json.dumps(verdict).encode())

    def image(self, sha: str, size: int) -> np.ndarray | None:
        try:
            return np.load(self.root / self._image_name(sha, size), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None

    def put_image(self, sha: str, size: int, pixels: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, pixels, allow_pickle=False)
        self._write(self._image_name(sha, size), buffer.getvalue())

    @staticmethod
    def _verdict_name(sha: str) -> str:
        return f"{sha}-v{PREPROCESS_VERSION}h{HEADER_VERSION}.json"

    @staticmethod
    def _image_name(sha: str, size: int) -> str:
        return f"{sha}-{size}px-v{PREPROCESS_VERSION}.npy"

    def _write(self, name: str, data: bytes) -> None:
        """Atomic (temp file + rename), so a killed node never leaves a half entry; a failed write only costs speed."""
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(tmp, self.root / name)
        except OSError as exc:
            log.warning("radiology cache entry not written (%s)", type(exc).__name__)
            if tmp:
                Path(tmp).unlink(missing_ok=True)


# ---------------------------------------------------------------- the folder


@dataclass(frozen=True)
class _Header:
    uid: str
    patient: str
    vendor: str
    sex: str = ""  # PatientSex: F, M or O
    age: int = -1  # years, from PatientAge (else birth and study dates); -1: unknown


@dataclass(frozen=True)
class _Row:
    grade: int | None  # None: the row's label is not a KL grade
    split: str | None
    patient: str


@dataclass(frozen=True)
class _Labels:
    by: str  # UID_COLUMN or FILE_COLUMN
    rows: dict[str, _Row]
    has_split: bool
    raw: bytes


@dataclass(frozen=True)
class _Image:
    sha: str
    grade: int
    split: str | None
    group: str  # the patient, or the image itself when no PatientID is known
    vendor: str
    pixels: np.ndarray
    sex: str = ""
    age: int = -1


@dataclass
class _Scan:
    images: list[_Image]
    skipped: dict[str, int]
    unmatched: int  # labels.csv rows that matched no file
    has_split: bool
    fingerprint: str
    decoded: int


def _scan(folder: Path, site: str, image_size: int, cache_dir: str | Path | None,
          images_dir: str | Path | None = None) -> _Scan:
    labels = _read_labels(folder, site)
    source = Path(images_dir) if images_dir else folder  # a PACS site's files are the node's copy, in the cache
    if images_dir and labels.by != UID_COLUMN:
        raise SiteDataError(f"site {site}: a PACS site's {LABELS_FILE} must name images by '{UID_COLUMN}'")
    cache = _Cache(Path(cache_dir) if cache_dir else fedhosp_home() / "cache" / "radiology")
    decoded: list[str] = []  # the files whose pixels this scan decoded (missed the cache)
    images: list[_Image] = []
    skipped: Counter[str] = Counter()
    matched: set[str] = set()
    used_uids: set[str] = set()
    for path in _candidates(source, cache.root):
        try:
            images.append(_load(path, source, labels, matched, used_uids, image_size, cache, decoded))
        except Skip as skip:
            log.debug("site %s: skipped %s (%s)", site, path, skip.reason)
            skipped[skip.reason] += 1
    unmatched = len(labels.rows) - len(matched)
    log.info("site %s: %d usable images, skipped %s, %d %s rows matched no file",
             site, len(images), dict(skipped), unmatched, LABELS_FILE)
    digest = hashlib.sha256()
    for sha in sorted(image.sha for image in images):
        digest.update(bytes.fromhex(sha))
    digest.update(labels.raw)
    return _Scan(images, dict(skipped), unmatched, labels.has_split, digest.hexdigest(), len(decoded))


def _candidates(folder: Path, cache_root: Path) -> list[Path]:
    """Every file below the folder but labels.csv (and the cache, should it live inside, unless the folder is
    a PACS site's copy in the cache)."""
    labels = folder / LABELS_FILE
    in_cache = folder.resolve().is_relative_to(cache_root)
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p != labels and (in_cache or not p.resolve().is_relative_to(cache_root)))


def _load(path: Path, folder: Path, labels: _Labels, matched: set[str], used_uids: set[str],
          image_size: int, cache: _Cache, decoded: list[str]) -> _Image:
    data = _read_bytes(path)
    sha = hashlib.sha256(data).hexdigest()
    header, ds = _header(data, sha, cache)
    key = header.uid if labels.by == UID_COLUMN else path.relative_to(folder).as_posix()
    row = labels.rows.get(key)
    if row is None:
        raise Skip(MISSING_LABEL)
    matched.add(key)
    if row.grade is None:
        raise Skip(INVALID_LABEL)
    if header.uid and header.uid in used_uids:
        raise Skip(DUPLICATE)
    pixels = cache.image(sha, image_size)
    if pixels is None:
        ds = ds or _open(data)
        decoded.append(sha)
        pixels = _decode(ds, sha, image_size, cache)
    used_uids.add(header.uid)
    return _Image(sha, row.grade, row.split, row.patient or header.patient or f"image:{sha}", header.vendor, pixels,
                  header.sex, header.age)


# The vendor subgroup's fixed vocabulary: the main X-ray vendors, else "other" ("unknown" when the header has
# none). The Manufacturer header is free text (a PACS can put a department or a person there), so nothing of it
# travels but the word of this list it matches.
VENDORS = {
    "Agfa": ("agfa",), "Canon": ("canon", "toshiba"), "Carestream": ("carestream", "kodak"),
    "Fujifilm": ("fujifilm", "fuji"), "GE": ("general electric", "ge healthcare", "ge medical", "gehc", "ge"),
    "Hologic": ("hologic",), "Konica Minolta": ("konica", "minolta"), "Philips": ("philips",),
    "Samsung": ("samsung",), "Shimadzu": ("shimadzu",), "Siemens": ("siemens",),
}


def vendor_group(manufacturer: str) -> str:
    """The vendor subgroup label for a Manufacturer header: a word of :data:`VENDORS`, ``other`` or ``unknown``."""
    text = str(manufacturer or "").strip().lower()
    if not text:
        return "unknown"
    if text in ("other", "unknown"):
        return text
    for name, tokens in VENDORS.items():
        if any(re.search(rf"\b{re.escape(token)}\b", text) for token in tokens):
            return name
    return "other"


def _header(data: bytes, sha: str, cache: _Cache) -> tuple[_Header, Dataset | None]:
    """The file's verdict, from the cache when it has one, so that a broken file is parsed once."""
    cached = cache.verdict(sha)
    if cached is not None:
        if "skip" in cached:
            raise Skip(cached["skip"])
        return _Header(**cached), None
    try:
        ds = _inspect(data)
    except Skip as skip:
        if not skip.reason.startswith(UNSUPPORTED_SYNTAX):  # installing the plugin must take effect
            cache.put_verdict(sha, {"skip": skip.reason})
        raise
    header = _Header(
        uid=str(ds.get("SOPInstanceUID", "")).strip(),
        patient=str(ds.get("PatientID", "")).strip(),
        vendor=str(ds.get("Manufacturer", "")).strip(),  # free text: only vendor_group() of it is used
        sex=_sex(ds),
        age=_age(ds),
    )
    cache.put_verdict(sha, asdict(header))
    return header, ds


def _sex(ds: Dataset) -> str:
    value = str(ds.get("PatientSex", "") or "").strip().upper()
    return value if value in ("F", "M", "O") else ""


def _age(ds: Dataset) -> int:
    """PatientAge ("061Y"; D/W/M count as under one year), else StudyDate minus PatientBirthDate."""
    text = str(ds.get("PatientAge", "") or "").strip().upper()
    match = re.fullmatch(r"(\d{1,3})([DWMY])", text)
    if match:
        return int(match.group(1)) if match.group(2) == "Y" else int(match.group(1)) // {"D": 365, "W": 52, "M": 12}[match.group(2)]
    born, seen = str(ds.get("PatientBirthDate", "") or ""), str(ds.get("StudyDate", "") or "")
    if re.fullmatch(r"\d{8}", born) and re.fullmatch(r"\d{8}", seen):
        years = int(seen[:4]) - int(born[:4]) - (seen[4:] < born[4:])
        return years if 0 <= years < 130 else -1
    return -1


def _decode(ds: Dataset, sha: str, image_size: int, cache: _Cache) -> np.ndarray:
    try:
        pixels = _pixels(ds, image_size)
    except Skip as skip:
        cache.put_verdict(sha, {"skip": skip.reason})
        raise
    cache.put_image(sha, image_size, pixels)
    return pixels


def _read_labels(folder: Path, site: str) -> _Labels:
    path = folder / LABELS_FILE
    if not path.is_file():
        log.debug("site %s: %s not found", site, path)
        raise SiteDataError(f"site {site}: no {LABELS_FILE} in the site's data folder")
    raw = path.read_bytes()
    try:
        frame = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas' messages can quote file content
        raise SiteDataError(f"site {site}: {LABELS_FILE} cannot be parsed as CSV ({type(exc).__name__})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    by = UID_COLUMN if UID_COLUMN in frame.columns else FILE_COLUMN if FILE_COLUMN in frame.columns else None
    if by is None:
        raise SiteDataError(f"site {site}: {LABELS_FILE} has neither a '{UID_COLUMN}' nor a '{FILE_COLUMN}' column")
    if "label" not in frame.columns:
        raise SiteDataError(f"site {site}: {LABELS_FILE} has no column 'label'")
    keys = frame[by].str.strip()
    if by == FILE_COLUMN:
        keys = keys.map(lambda value: posixpath.normpath(value.replace("\\", "/")) if value else value)
    grades = pd.to_numeric(frame["label"].str.strip(), errors="coerce")
    grades = grades.where(grades.isin(range(KL_GRADES)))
    has_split = "split" in frame.columns
    splits = frame["split"].str.strip().str.lower() if has_split else pd.Series(None, index=frame.index)
    if has_split and not splits.isin(["train", "test"]).all():
        raise SiteDataError(f"site {site}: {LABELS_FILE} column 'split' holds values other than train/test")
    patients = frame[PATIENT_COLUMN].str.strip() if PATIENT_COLUMN in frame.columns else pd.Series("", index=frame.index)
    table = pd.DataFrame({"key": keys, "grade": grades, "split": splits, "patient": patients})
    table = table[keys != ""].drop_duplicates()  # a row without a key labels nothing
    if table["key"].duplicated().any():
        raise SiteDataError(f"site {site}: {LABELS_FILE} lists an image more than once, with different values")
    rows = {
        r.key: _Row(None if pd.isna(r.grade) else int(r.grade), r.split, r.patient)
        for r in table.itertuples(index=False)
    }
    return _Labels(by, rows, has_split, raw)


def _test_mask(scan: _Scan, seed: int, site: str) -> np.ndarray:
    if scan.has_split:
        return np.array([image.split == "test" for image in scan.images])
    return _grouped_test_mask([image.group for image in scan.images],
                              [image.grade for image in scan.images], seed, site)


def _grouped_test_mask(groups: list[str], grades: list[int], seed: int, site: str) -> np.ndarray:
    """Seeded split by patient, stratified by each patient's worst KL grade, reproducible per (seed, site).

    Patients, not images, are drawn so that no patient is in both parts; the
    strata are KL grades whatever the target, so one seed gives one test set.
    """
    worst: dict[str, int] = {}
    for group, grade in zip(groups, grades):
        worst[group] = max(grade, worst.get(group, grade))
    rng = np.random.default_rng([seed, zlib.crc32(site.encode())])
    test: set[str] = set()
    for grade in sorted(set(worst.values())):
        members = sorted(g for g, w in worst.items() if w == grade)
        rng.shuffle(members)
        test.update(members[: int(round(len(members) * TEST_FRACTION))])
    return np.array([group in test for group in groups])


def _summary(skipped: dict[str, int]) -> str:
    """Skip counts by reason family: the transfer syntax stays out of a message that leaves the node."""
    families: Counter[str] = Counter()
    for reason, count in skipped.items():
        families[reason.split(":")[0]] += count
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(families.items())) or "no DICOM files"
