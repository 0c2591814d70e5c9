"""Benchmark: DICOM pixel decoding per transfer syntax (and per pydicom plugin), and the reader's cost per image.

Two sets of files, each decoded from bytes in memory (``dcmread`` + ``pixel_array``,
so parsing is included, disk is not):

* a radiograph-sized knee X-ray (default 2560 x 2048, 12 bits stored in 16;
  ``client.data.radiology_demo.render_knee``) written in every transfer syntax
  that can be encoded here: native and Deflated, RLE, JPEG Lossless (SV1),
  JPEG-LS lossless and near-lossless, JPEG 2000 lossless and lossy, and JPEG
  Baseline (the image windowed to 8 bits, as an 8-bit export would);
* pydicom's own greyscale samples, one per syntax they cover (small images:
  their rates are mostly per-file overhead).

For every syntax it times each decoding plugin pydicom has for it (the
``reader`` column marks the one the node's reader uses), and, for the
radiograph, ``client.data.dicom.read_image`` (decode, LUTs, resampling to
64 x 64, standardising: what one image costs a node when the cache misses).
Lossless syntaxes are checked to decode to the original pixels exactly; lossy
ones show their largest error. MB/s counts decoded pixel bytes (rows x columns
x BitsAllocated / 8). Single-threaded (torch at 1 thread, as on a node; the
decoders use one thread).

Not a pytest test: ``make bench-decode`` (``ARGS="--quick"`` for a smaller image
and shorter timings) or ``.venv/bin/python tests/bench_decode.py --rows 3072 --cols 2500``.
"""

from __future__ import annotations

import io
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python tests/bench_decode.py` puts tests/ first, not the checkout
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
import typer  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402
from pydicom.uid import (  # noqa: E402
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from client.data import dicom  # noqa: E402
from client.data.radiology_demo import render_knee  # noqa: E402
from tests.dicom_encodings import bytes_of, encoded  # noqa: E402

console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200, log_path=False)

# (syntax, encoder options, lossless); JPEG Baseline is encoded from the 8-bit windowed image
RADIOGRAPH_SYNTAXES = (
    (ExplicitVRLittleEndian, {}, True),
    (DeflatedExplicitVRLittleEndian, {}, True),
    (RLELossless, {}, True),
    (JPEGLosslessSV1, {}, True),
    (JPEGLSLossless, {}, True),
    (JPEGLSNearLossless, {"jls_error": 2}, False),
    (JPEG2000Lossless, {}, True),
    (JPEG2000, {"j2k_cr": [20]}, False),
    (JPEGBaseline8Bit, {"quality": 90}, False),
)
# pydicom's greyscale single-frame samples, one per transfer syntax, and the uncompressed image they encode
SAMPLES = (
    ("MR_small.dcm", None),
    ("MR_small_implicit.dcm", "MR_small.dcm"),
    ("MR_small_bigendian.dcm", "MR_small.dcm"),
    ("image_dfl.dcm", None),
    ("MR_small_RLE.dcm", "MR_small.dcm"),
    ("JPGExtended.dcm", None),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
    ("JPEGLSNearLossless_16.dcm", None),
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
    ("JPEG2000.dcm", None),
)
PACKAGES = ("pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "pyjpegls", "pillow")
READER_SIZE = 64


def radiograph(rows: int, cols: int, bits: int = 12, seed: int = 0) -> Dataset:
    """A DX knee radiograph with the demo's anatomy and detector noise, ``bits`` stored in 16, 0.14 mm pixels."""
    rng = np.random.default_rng(seed)
    image = render_knee(2, rng, (rows, cols))
    image = np.clip(image + 0.01 * rng.standard_normal(image.shape, dtype=np.float32), 0.0, 1.0)
    top = 2**bits - 1
    stored = np.round(top * (0.04 + 0.88 * image)).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DigitalXRayImageStorageForPresentation, uid
    ds.Modality, ds.PatientID = "DX", "BENCH"
    ds.ImagerPixelSpacing = [0.14, 0.14]
    ds.set_pixel_data(stored, "MONOCHROME2", bits)
    ds.WindowCenter, ds.WindowWidth = top // 2, top
    return ds


def eight_bit(ds: Dataset) -> Dataset:
    """The radiograph windowed to 8 bits (what a JPEG Baseline export holds)."""
    out = pydicom.dcmread(io.BytesIO(bytes_of(ds)))
    values = np.round(out.pixel_array / (2 ** int(out.BitsStored) - 1) * 255).astype(np.uint8)
    out.set_pixel_data(values, "MONOCHROME2", 8)
    del out.WindowCenter, out.WindowWidth
    return out


@dataclass
class Row:
    group: str
    syntax: str
    plugin: str
    reader: bool  # the plugin the node's reader uses (the first pydicom tries)
    size: str
    ratio: float  # decoded pixel bytes / file bytes
    images_per_s: float
    mb_per_s: float
    error: str  # "exact", or the largest absolute difference from the original


def decode_rate(data: bytes, plugin: str, seconds: float) -> tuple[float, np.ndarray]:
    """Images per second of dcmread + pixel_array with one plugin, the median of repeated timed batches."""

    def once() -> np.ndarray:
        ds = pydicom.dcmread(io.BytesIO(data))
        if plugin:
            ds.pixel_array_options(decoding_plugin=plugin)
        return ds.pixel_array

    with warnings.catch_warnings(action="ignore"):
        pixels = once()
        started, times = time.perf_counter(), []
        while time.perf_counter() - started < seconds or len(times) < 3:
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times), pixels


def plugins_of(syntax: pydicom.uid.UID) -> tuple[list[str], str]:
    """pydicom's available plugins for ``syntax`` (native syntaxes have none: "") and the one the reader uses.

    pydicom tries them in the order they were registered, which ``available_plugins`` (sorted) does not show:
    the private ``_available`` does. The reader leaves the choice to pydicom, so it uses the first.
    """
    available = list(get_decoder(syntax)._available)
    return (available or [""]), (available[0] if available else "")


def error_of(decoded: np.ndarray, original: np.ndarray | None) -> str:
    if original is None:
        return "-"
    if np.array_equal(decoded, original):
        return "exact"
    return f"max {int(np.abs(decoded.astype(np.int64) - original.astype(np.int64)).max())}"


def measure(group: str, ds: Dataset, data: bytes, original: np.ndarray | None, seconds: float) -> list[Row]:
    syntax = ds.file_meta.TransferSyntaxUID
    pixel_bytes = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8
    plugins, default = plugins_of(syntax)
    rows = []
    for plugin in plugins:
        try:
            rate, decoded = decode_rate(data, plugin, seconds)
        except Exception as exc:  # this plugin cannot decode this file; pydicom goes on to the next one
            rows.append(Row(group, syntax.name, plugin, plugin == default, "", 0.0, 0.0, 0.0,
                            f"fails ({type(exc).__name__})"))
            continue
        rows.append(Row(group, syntax.name, plugin or "pydicom (native)", plugin == default,
                        f"{ds.Rows}x{ds.Columns}x{ds.BitsStored}b", pixel_bytes / len(data), rate,
                        rate * pixel_bytes / 1e6, error_of(decoded, original)))
    return rows


def reader_rate(data: bytes, seconds: float) -> float:
    """``read_image`` from a file (decode, modality/VOI LUT, resampling, standardising), images per second."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "image.dcm"
        path.write_bytes(data)
        dicom.read_image(path, READER_SIZE)
        started, times = time.perf_counter(), []
        while time.perf_counter() - started < seconds or len(times) < 3:
            t0 = time.perf_counter()
            dicom.read_image(path, READER_SIZE)
            times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def main(
    rows: int = typer.Option(2560, help="radiograph rows"),
    cols: int = typer.Option(2048, help="radiograph columns"),
    seconds: float = typer.Option(1.5, help="minimum timing per case (median of the batches)"),
    quick: bool = typer.Option(False, help="1024 x 1024 radiograph, 0.3 s per case"),
) -> None:
    if quick:
        rows, cols, seconds = 1024, 1024, 0.3
    torch.set_num_threads(1)  # as on a node
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    console.print(f"machine: {platform.machine()}, {cores} CPU cores for this process (os.cpu_count() "
                  f"{os.cpu_count()}), torch threads {torch.get_num_threads()}, decoders single-threaded; "
                  f"Python {platform.python_version()}")
    console.print("packages: " + ", ".join(f"{p} {_version(p)}" for p in PACKAGES))

    results: list[Row] = []
    reader: dict[str, float] = {}
    source = radiograph(rows, cols)
    original = source.pixel_array
    source8 = eight_bit(source)
    for syntax, options, lossless in RADIOGRAPH_SYNTAXES:
        base = source8 if syntax == JPEGBaseline8Bit else source
        try:
            ds = encoded(base, syntax, **options)
        except Exception as exc:  # an encoder that is not installed here
            console.print(f"[yellow]{syntax.name}: not encoded here ({type(exc).__name__}: {exc})[/yellow]")
            continue
        data = bytes_of(ds)
        results += measure("radiograph", ds, data, base.pixel_array, seconds)
        reader[syntax.name] = reader_rate(data, seconds)
        console.print(f"  {syntax.name}: done", style="dim")

    for name, counterpart in SAMPLES:
        path = get_testdata_file(name)
        data = Path(path).read_bytes()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        reference = pydicom.dcmread(get_testdata_file(counterpart)).pixel_array if counterpart else None
        results += measure(f"sample {name}", ds, data, reference, seconds / 3)

    table = Table(title=f"Decode throughput per transfer syntax ({cores} cores, 1 thread; radiograph "
                        f"{rows}x{cols}, {READER_SIZE}-px reader)")
    for column in ("image", "transfer syntax", "plugin", "reader", "pixels", "ratio", "images/s", "MB/s",
                   "vs original", "read_image/s"):
        table.add_column(column, justify="right" if column in ("ratio", "images/s", "MB/s", "read_image/s") else "left")
    for row in results:
        through_reader = reader.get(row.syntax) if row.group == "radiograph" and row.reader else None
        table.add_row(row.group, row.syntax, row.plugin, "yes" if row.reader else "", row.size, f"{row.ratio:.2f}",
                      f"{row.images_per_s:.1f}" if row.images_per_s < 100 else f"{row.images_per_s:.0f}",
                      f"{row.mb_per_s:.1f}", row.error, f"{through_reader:.2f}" if through_reader else "")
    console.print(table)
    console.print("ratio: decoded pixel bytes / file bytes. reader: the plugin client/data/dicom.py decodes with. "
                  "read_image/s: decode + LUTs + resampling + standardising, one image at a time.")


if __name__ == "__main__":
    typer.run(main)
