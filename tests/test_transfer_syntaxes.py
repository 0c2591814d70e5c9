"""Every common transfer syntax decodes: pydicom's own samples in each encoding, read through the node's entry points.

The pylibjpeg plugins are runtime dependencies; lossless encodings must give the
uncompressed image's pixels exactly. Where pydicom's bundled samples hold no
greyscale image in a syntax (JPEG Baseline, JPEG Lossless), the image is encoded
here from a bundled sample (``tests/dicom_encodings.py``). What still cannot be
decoded is skipped with the syntax's name, never its UID.
"""

import io
import json
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder, pixel_array
from pydicom.pixels.decoders.base import _PIXEL_DATA_DECODERS
from pydicom.uid import (
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    UID,
    generate_uid,
)
from typer.testing import CliRunner

from client.data.dicom import Skip, load_radiology_site, read_image, site_report, stored_pixels
from client.site_check import site_app
from tests.dicom_encodings import bytes_of, encoded

REPO = Path(__file__).resolve().parent.parent

# pydicom's bundled greyscale single-frame samples, one or two per transfer syntax
SAMPLES = (
    "MR_small.dcm",  # Explicit VR Little Endian
    "MR_small_implicit.dcm",  # Implicit VR Little Endian
    "MR_small_bigendian.dcm",  # Explicit VR Big Endian
    "image_dfl.dcm",  # Deflated Explicit VR Little Endian
    "MR_small_RLE.dcm",  # RLE Lossless
    "JPGExtended.dcm",  # JPEG Extended (Process 2 and 4), 12 bits
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless
    "JPEGLSNearLossless_16.dcm",  # JPEG-LS Near-Lossless
    "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless
    "JPEG2000.dcm",  # JPEG 2000
)
# each lossless encoding of MR_small.dcm among them
LOSSLESS = ("MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
            "MR_small_jp2klossless.dcm")
HTJ2K_SYNTAXES = {HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K}  # decodable, but neither a sample nor an encoder here


def sample(name):
    return get_testdata_file(name)


def made_here(path: Path) -> dict[str, Path]:
    """The syntaxes pydicom's samples hold no greyscale image in, encoded here from bundled samples."""
    mr, eight_bit = pydicom.dcmread(sample("MR_small.dcm")), pydicom.dcmread(sample("image_dfl.dcm"))
    lossless = encoded(mr, JPEGLosslessSV1)
    process14 = encoded(mr, JPEGLosslessSV1)
    process14.file_meta.TransferSyntaxUID = JPEGLossless  # the same codestream: SV1 is one case of Process 14
    files = {"jpeg-lossless-sv1": lossless, "jpeg-lossless": process14,
             "jpeg-baseline": encoded(eight_bit, JPEGBaseline8Bit)}
    path.mkdir(parents=True, exist_ok=True)
    for name, ds in files.items():
        (path / name).write_bytes(bytes_of(ds))
    return {name: path / name for name in files}


def as_new_image(source: str | Path, target: Path, patient: str) -> UID:
    """A copy with its own SOPInstanceUID and PatientID (the MR_small variants share theirs); pixel data unchanged."""
    ds = pydicom.dcmread(source)
    pixel_data = ds.PixelData
    ds.SOPInstanceUID = generate_uid()
    if "MediaStorageSOPInstanceUID" in ds.file_meta:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)
    again = pydicom.dcmread(target)
    assert again.PixelData == pixel_data and again.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    return again.file_meta.TransferSyntaxUID


def write_labels(folder: Path, files: list[str]) -> None:
    rows = [f"{name},{i % 5},{'test' if i < 3 else 'train'}" for i, name in enumerate(files)]
    (folder / "labels.csv").write_text("file,label,split\n" + "\n".join(rows) + "\n")


def test_our_dependencies_decode_every_encapsulated_syntax_pydicom_knows():
    """The node's own dependencies suffice: pylibjpeg (not Pillow, not the test-only pyjpegls) decodes each."""
    native = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"}
    syntaxes = set(_PIXEL_DATA_DECODERS)
    assert len(syntaxes) == 16 and native < syntaxes
    for syntax in syntaxes:
        decoder = get_decoder(syntax)
        assert decoder.is_available, syntax.name
        if syntax not in native:  # and pydicom tries it first (its order; available_plugins is sorted)
            assert next(iter(decoder._available)) == "pylibjpeg", syntax.name


def test_each_transfer_syntax_is_read_from_a_site_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDHOSP_HOME", str(tmp_path / "home"))
    site = tmp_path / "Aarhus"
    sources = {name: Path(sample(name)) for name in SAMPLES} | made_here(tmp_path / "made")
    syntaxes = {}
    for i, (name, source) in enumerate(sources.items()):
        syntaxes[name] = as_new_image(source, site / f"{i:02d}" / name, f"PAT{i:03d}")
    files = [f"{i:02d}/{name}" for i, name in enumerate(sources)]
    write_labels(site, files)
    # every syntax pydicom has a decoder for is here, but HTJ2K
    assert set(syntaxes.values()) == set(_PIXEL_DATA_DECODERS) - HTJ2K_SYNTAXES

    report = site_report(site, "Aarhus", image_size=32, cache_dir=tmp_path / "cache")
    assert report["skipped"] == {} and report["unmatched_labels"] == 0
    assert report["usable"] == report["decoded"] == len(files) == 13 and report["patients"] == 13

    loaded = load_radiology_site(site, "Aarhus", image_size=32, cache_dir=tmp_path / "cache")
    assert loaded.decoded == 0 and len(loaded.train) + len(loaded.test) == 13  # the check filled the cache
    images = np.concatenate([loaded.train.images, loaded.test.images])
    assert np.isfinite(images).all() and (images.std(axis=(1, 2, 3)) > 0.5).all()  # real images, not padding

    # (13 images are fewer than the default policy's minimum, so the check exits 1 and says so)
    result = CliRunner().invoke(site_app, ["check", str(site), "--image-size", "32"], env={"COLUMNS": "200"})
    assert "skipped files: 0" in result.output and "unsupported" not in result.output, result.output


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_samples_decode_to_the_uncompressed_pixels(name):
    original = pydicom.dcmread(sample("MR_small.dcm")).pixel_array
    decoded = stored_pixels(sample(name))
    assert decoded.dtype.newbyteorder("=") == original.dtype and decoded.shape == original.shape == (64, 64)
    np.testing.assert_array_equal(decoded, original)
    syntax = pydicom.dcmread(sample(name), stop_before_pixels=True).file_meta.TransferSyntaxUID
    if syntax.is_compressed:  # with the plugin the nodes install, whatever else pydicom would try first
        np.testing.assert_array_equal(pixel_array(sample(name), decoding_plugin="pylibjpeg"), original)
    np.testing.assert_array_equal(read_image(sample(name), 48), read_image(sample("MR_small.dcm"), 48))


def test_jpeg_lossless_decodes_exactly(tmp_path):
    """JPEG Lossless (Process 14): pydicom's colour sample through the plugin, greyscale ones through the reader."""
    rle = pydicom.dcmread(sample("SC_rgb_rle.dcm")).pixel_array  # the same 100 x 100 RGB image, RLE (lossless)
    np.testing.assert_array_equal(pixel_array(sample("SC_rgb_jpeg_gdcm.dcm"), decoding_plugin="pylibjpeg"), rle)
    with pytest.raises(Skip, match="^colour$"):  # the reader reads greyscale only
        stored_pixels(sample("SC_rgb_jpeg_gdcm.dcm"))

    original = pydicom.dcmread(sample("MR_small.dcm")).pixel_array  # signed 16 bits
    made = made_here(tmp_path)
    for name in ("jpeg-lossless-sv1", "jpeg-lossless"):
        np.testing.assert_array_equal(stored_pixels(made[name]), original)
    # JPEG Baseline is lossy: close to its 8-bit source (quality 90), not equal
    error = stored_pixels(made["jpeg-baseline"]).astype(int) - pydicom.dcmread(sample("image_dfl.dcm")).pixel_array
    assert 0 < np.abs(error).mean() < 2 and np.abs(error).max() < 64


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_an_image_reencoded_losslessly_decodes_exactly(bits):
    """RLE, JPEG Lossless, JPEG-LS and JPEG 2000 of one unsigned image: the full range of its bits, a flat patch."""
    rng = np.random.default_rng(bits)
    top = 2**bits - 1
    y, x = np.mgrid[:96, :80]
    pixels = np.clip(top * (0.5 + 0.3 * np.sin(x / 7.0) * np.cos(y / 11.0)) + rng.normal(0, top / 50, (96, 80)),
                     0, top)
    pixels[:8, :8], pixels[-1, -1], pixels[-1, -2] = 0, top, 0  # the extremes next to each other
    pixels = pixels.astype(np.uint8 if bits == 8 else np.uint16)
    ds = pydicom.dcmread(sample("MR_small.dcm"))
    ds.set_pixel_data(pixels, "MONOCHROME2", bits)
    for syntax in (RLELossless, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless):
        data = bytes_of(encoded(ds, syntax))
        out = pydicom.dcmread(io.BytesIO(data))
        assert out.file_meta.TransferSyntaxUID == syntax
        np.testing.assert_array_equal(out.pixel_array, pixels, err_msg=f"{syntax.name}, {bits} bits")


def _with_syntax(source: str, target: Path, syntax: str, patient: str) -> None:
    """A copy of ``source`` whose header claims ``syntax``; pydicom writes only syntaxes it knows, so a public
    one newer than it is put in place of a known UID of the same padded length."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = patient
    known = UID(syntax).is_private or UID(syntax).type == "Transfer Syntax"
    ds.file_meta.TransferSyntaxUID = syntax if known else "1.2.840.10008.1.2.4.201"  # HTJ2K Lossless: 23 chars
    target.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(target, ds, enforce_file_format=True, implicit_vr=False, little_endian=True)
    if not known:
        data = target.read_bytes()
        stand_in = b"1.2.840.10008.1.2.4.201"
        assert len(syntax) <= len(stand_in) and data.count(stand_in) == 1
        target.write_bytes(data.replace(stand_in, syntax.encode().ljust(len(stand_in), b"\0")))
    assert pydicom.dcmread(target, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax


def test_the_site_check_names_what_cannot_be_decoded(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDHOSP_HOME", str(tmp_path / "home"))
    site, private = tmp_path / "Vejle", "1.2.826.0.1.3680043.8.498.77"
    as_new_image(sample("MR_small.dcm"), site / "ok.dcm", "PAT001")
    _with_syntax(sample("MR_small_jp2klossless.dcm"), site / "a" / "part2", JPEG2000MCLossless, "PAT002")
    _with_syntax(sample("MR_small_jp2klossless.dcm"), site / "b" / "jxl", "1.2.840.10008.1.2.4.110", "PAT003")
    _with_syntax(sample("MR_small_jp2klossless.dcm"), site / "c" / "private", private, "PAT004")
    write_labels(site, ["ok.dcm", "a/part2", "b/jxl", "c/private"])

    report = site_report(site, "Vejle", image_size=16, cache_dir=tmp_path / "cache")
    assert report["usable"] == 1
    assert report["skipped"] == {
        "unsupported transfer syntax: JPEG 2000 Part 2 Multi-component Image Compression (Lossless Only) "
        "(no decoder)": 1,
        "unsupported transfer syntax: JPEG XL Lossless (no decoder)": 1,
        "unsupported transfer syntax: unknown (no decoder)": 1,
    }
    for reason in report["skipped"]:
        assert not re.search(r"\d+\.\d+\.\d+", reason) and "PAT" not in reason  # no UID, no patient
    # not remembered as a verdict: a pydicom that decodes them later reads them
    verdicts = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*.json")]
    assert len(verdicts) == 1 and "skip" not in verdicts[0]

    result = CliRunner().invoke(site_app, ["check", str(site), "--image-size", "16"], env={"COLUMNS": "200"})
    assert "JPEG XL Lossless (no decoder)" in result.output and "unknown (no decoder)" in result.output
    assert private not in result.output and "PAT00" not in result.output


def _installed(name: str) -> bool:
    try:
        return bool(metadata.distribution(name))
    except metadata.PackageNotFoundError:
        return False


def site_packages_without(folder: Path, *distributions: str) -> Path:
    """This environment's site-packages as links, less the named distributions' files: as if never installed."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    installed = [metadata.distribution(name) for name in distributions if _installed(name)]
    left_out = {Path(str(f)).parts[0] for distribution in installed for f in distribution.files}
    assert left_out and all((purelib / entry).exists() for entry in left_out)
    folder.mkdir()
    for entry in purelib.iterdir():
        if entry.name not in left_out:
            (folder / entry.name).symlink_to(entry)
    return folder


# site_report in a fresh interpreter (-S: no site-packages) that has only the site-packages it is given
REPORT = """
import json, site, sys
site.addsitedir(sys.argv[1])
from client.data.dicom import site_report
print(json.dumps(site_report(sys.argv[2], "Odense", image_size=16, cache_dir=sys.argv[3])))
"""


def test_a_missing_plugin_is_named_and_installing_it_takes_effect(tmp_path):
    """A node installed without the JPEG-LS decoders names them; once they are there, the same file is read."""
    site, cache = tmp_path / "Odense", tmp_path / "cache"
    as_new_image(sample("MR_small.dcm"), site / "native", "PAT001")
    as_new_image(sample("MR_small_jpeg_ls_lossless.dcm"), site / "jls", "PAT002")
    write_labels(site, ["native", "jls"])
    packages = site_packages_without(tmp_path / "site-packages", "pylibjpeg-libjpeg", "pyjpegls")
    done = subprocess.run([sys.executable, "-S", "-c", REPORT, str(packages), str(site), str(cache)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    without = json.loads(done.stdout.strip().splitlines()[-1])
    assert without["usable"] == 1 and without["skipped"] == {
        "unsupported transfer syntax: JPEG-LS Lossless Image Compression "
        "(needs gdcm or pylibjpeg-libjpeg or pyjpegls)": 1}

    installed = site_report(site, "Odense", image_size=16, cache_dir=cache)  # this process has the plugins
    assert installed["usable"] == 2 and installed["skipped"] == {} and installed["decoded"] == 1
    assert installed["fingerprint"] != without["fingerprint"]
