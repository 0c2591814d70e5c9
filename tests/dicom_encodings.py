"""Greyscale DICOM images in a chosen transfer syntax, for the transfer-syntax tests and the decode benchmark.

pydicom 3 encodes RLE, JPEG-LS (pyjpegls, a test dependency) and JPEG 2000
(pylibjpeg-openjpeg) itself (``Dataset.compress``). It has no JPEG encoder, and
pydicom's bundled samples hold no greyscale JPEG Lossless or JPEG Baseline
image, so this module writes those two codestreams: JPEG Lossless (Process 14,
first-order prediction, one fixed Huffman table) with numpy, JPEG Baseline
(8-bit) with Pillow.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    generate_uid,
)

# One Huffman table for every difference category (0..16): 17 five-bit codes, code k for category k.
_HUFFMAN_BITS = bytes([0, 0, 0, 0, 17] + [0] * 11)
_HUFFMAN_VALUES = bytes(range(17))


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def jpeg_lossless(pixels: np.ndarray, precision: int) -> bytes:
    """A JPEG Lossless codestream (ITU T.81 Process 14, predictor 1, no point transform) of one greyscale frame.

    ``pixels`` are the stored values (a signed image's two's-complement bit
    patterns are taken modulo ``2 ** precision``, as DICOM stores them).
    """
    rows, cols = pixels.shape
    x = np.asarray(pixels).astype(np.int64) & ((1 << precision) - 1)
    predicted = np.empty_like(x)
    predicted[:, 1:] = x[:, :-1]  # Ra, the sample to the left
    predicted[1:, 0] = x[:-1, 0]  # first column: Rb, the sample above
    predicted[0, 0] = 1 << (precision - 1)
    diff = (x - predicted).ravel() % 65536
    diff = np.where(diff > 32768, diff - 65536, diff)  # -32767..32768, as the standard reads it
    magnitude = np.abs(diff)
    category = np.zeros_like(magnitude)
    nonzero = magnitude > 0
    category[nonzero] = np.floor(np.log2(magnitude[nonzero])).astype(np.int64) + 1
    extra = np.where(diff < 0, diff + (1 << category) - 1, diff) & ((1 << category) - 1)
    extra_bits = np.where(category == 16, 0, category)  # category 16 (32768) has no extra bits
    code = (category << extra_bits) | np.where(category == 16, 0, extra)
    length = 5 + extra_bits
    start = np.concatenate(([0], np.cumsum(length)[:-1]))
    total = int(start[-1] + length[-1])
    bits = np.ones((total + 7) // 8 * 8, dtype=np.uint8)  # the last byte is padded with 1-bits
    for b in range(int(length.max())):
        has = length > b
        bits[start[has] + b] = (code[has] >> (length[has] - 1 - b)) & 1
    data = np.packbits(bits)
    data = np.insert(data, np.flatnonzero(data == 0xFF) + 1, 0)  # byte stuffing
    frame = bytes([precision]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    return b"".join([
        b"\xff\xd8",
        _segment(0xC3, frame),  # SOF3: lossless, Huffman
        _segment(0xC4, bytes([0x00]) + _HUFFMAN_BITS + _HUFFMAN_VALUES),
        _segment(0xDA, bytes([1, 1, 0x00, 1, 0, 0])),  # one component, table 0, predictor 1, Pt 0
        data.tobytes(),
        b"\xff\xd9",
    ])


def jpeg_baseline(pixels: np.ndarray, quality: int = 90) -> bytes:
    """A JPEG Baseline codestream of 8-bit greyscale pixels (Pillow)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="L").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _encapsulated(ds: Dataset, syntax: str, codestream: bytes) -> Dataset:
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def encoded(ds: Dataset, syntax: str, **options) -> Dataset:
    """A copy of a native greyscale single-frame ``ds`` in ``syntax``, with a new SOPInstanceUID.

    ``options``: ``jls_error`` / ``j2k_cr`` for pydicom's lossy encoders;
    ``quality`` for JPEG Baseline, which needs ``BitsAllocated`` 8.
    """
    out = pydicom.dcmread(io.BytesIO(bytes_of(ds)))  # a deep copy, as a file would give it
    out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if syntax in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        out.file_meta.TransferSyntaxUID = syntax
        return out
    if syntax == JPEGLosslessSV1:
        return _encapsulated(out, syntax, jpeg_lossless(out.pixel_array, int(out.BitsStored)))
    if syntax == JPEGBaseline8Bit:
        if out.BitsAllocated != 8:
            raise ValueError("JPEG Baseline holds 8-bit samples")
        return _encapsulated(out, syntax, jpeg_baseline(out.pixel_array, options.get("quality", 90)))
    out.compress(syntax, generate_instance_uid=False, **options)
    return out


def bytes_of(ds: Dataset) -> bytes:
    """The file as a PACS would send it (preamble, file meta, the data set in its transfer syntax)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
