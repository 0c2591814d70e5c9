"""A site reading from its PACS: a real Orthanc (Debian's package) on 127.0.0.1, DICOMweb and DIMSE.

One Orthanc per xdist worker serves the module (HTTP basic authentication with
a planted password); the tests that must take a PACS down start their own.
The DICOM files are the radiology demo generator's. No fixed sleeps: Orthanc is
waited for until it answers.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from pathlib import Path

import pydicom
import pytest
import requests
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from typer.testing import CliRunner

from client.data import pacs as pacs_source
from client.data.dicom import load_radiology_site, site_report
from client.data.radiology_demo import write_radiology_demo
from client.site_check import site_app
from models.errors import SiteDataError
from server.deploy import free_port
from tests import pacs_server
from tests.conftest import APP_DIR
from tests.node_replies import error_text

pytestmark = pytest.mark.timeout(600)

PASSWORD = "Pl4nted-PACS-s3cret-9QxZ"  # must appear in no output, log, ledger, store or reply
WRONG = "Wr0ng-PACS-passw0rd-K7vM"
TOKEN = "eyPlanted.T0ken.Xq81"
N_IMAGES = 32  # labelled images per demo site (the policy's minimum is 20 training images)
SYD_FOUND = N_IMAGES + 2  # Syddanmark in the PACS: the labelled images, one unlabelled image and an SR
DX_AND_SR = {"modality": ["DX", "SR"], "body-part": ""}


class Demo:
    """The module's PACS and demo files: Syddanmark (DX, with its broken objects) is in the PACS from the start;
    Hovedstaden (CR) is uploaded by the incremental test only; Midtjylland stays a folder."""

    def __init__(self, root: Path, orthanc: pacs_server.Orthanc, credentials: Path):
        self.root, self.orthanc, self.credentials = root, orthanc, credentials

    def files(self, site: str) -> list[Path]:
        return sorted(p for p in (self.root / site).rglob("*") if p.is_file() and p.name != "labels.csv")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    reason = pacs_server.missing()
    if reason:
        pytest.fail(reason)  # never a quiet skip: the suite needs a real PACS
    folder = tmp_path_factory.mktemp("pacs")
    root = folder / "demo"
    write_radiology_demo(root, 3, seed=7, n_images=N_IMAGES)
    credentials = folder / "pacs-credentials"
    credentials.write_text(f"{pacs_server.USER}:{PASSWORD}\n")
    credentials.chmod(0o600)
    with pacs_server.running(folder / "orthanc", PASSWORD) as orthanc:
        demo = Demo(root, orthanc, credentials)
        assert orthanc.upload(demo.files("Syddanmark")) == SYD_FOUND  # the truncated file and Thumbs.db refused
        yield demo


def pacs_site(folder: Path, labels_from: Path, query: dict, url: str = "", credentials: Path | None = None) -> Path:
    """A PACS site's folder: labels.csv and pacs.toml, no DICOM file."""
    folder.mkdir(parents=True)
    shutil.copy(labels_from / "labels.csv", folder / "labels.csv")
    lines = [f'url = "{url}"'] if url else []
    if credentials:
        lines.append(f'credentials = "{credentials}"')
    lines.append("[query]")
    for key, value in query.items():
        lines.append(f"{key} = {value!r}".replace("'", '"'))
    (folder / "pacs.toml").write_text("\n".join(lines) + "\n")
    return folder


def check(folder: Path, *args: str):
    return CliRunner().invoke(site_app, ["check", str(folder), "--image-size", "16", *args], env={"COLUMNS": "200"})


def row(output: str, label: str) -> str:
    """The value cell of a table row."""
    match = re.search(rf"│ {re.escape(label)}\s*│\s*(.*?)\s*│", output)
    assert match, f"no row {label!r} in:\n{output}"
    return match.group(1)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the site check


def test_site_check_on_a_pacs_reports_found_retrieved_cached_and_skipped(demo, tmp_path):
    site = pacs_site(tmp_path / "Syddanmark", demo.root / "Syddanmark", DX_AND_SR, demo.orthanc.dicomweb)
    cache = tmp_path / "cache"
    first = check(site, "--pacs-credentials", str(demo.credentials), "--cache-dir", str(cache))
    assert first.exit_code == 0, first.output
    assert f"site Syddanmark: PACS {demo.orthanc.dicomweb}" in first.output
    assert (row(first.output, "instances found"), row(first.output, "retrieved now"),
            row(first.output, "already cached")) == (str(SYD_FOUND), str(SYD_FOUND), "0")
    assert row(first.output, "not retrieved (gone, or a SOP class not offered)") == "0"
    # from there it is the folder reader's: the same images, labels and skip reasons as the folder, except the
    # two files the PACS refused to store (not DICOM)
    folder = site_report(demo.root / "Syddanmark", "Syddanmark", image_size=16, cache_dir=tmp_path / "folder-cache")
    assert folder["skipped"] == {"missing label": 1, "not an image": 1, "not DICOM": 2}
    assert row(first.output, "usable images") == str(folder["usable"]) == str(N_IMAGES)
    assert row(first.output, "missing label") == "1" and row(first.output, "not an image") == "1"
    assert "not DICOM" not in first.output and "skipped instances: 2" in first.output
    assert row(first.output, "images decoded now (not cached)") == str(N_IMAGES)
    for grade, count in folder["class_counts"].items():
        assert row(first.output, str(grade)).startswith(f"{count} ")

    again = check(site, "--pacs-credentials", str(demo.credentials), "--cache-dir", str(cache))
    assert again.exit_code == 0, again.output
    assert (row(again.output, "instances found"), row(again.output, "retrieved now"),
            row(again.output, "already cached")) == (str(SYD_FOUND), "0", str(SYD_FOUND))
    assert row(again.output, "images decoded now (not cached)") == "0"
    fingerprint = re.search(r"fingerprint: (\w+)", first.output).group(1)
    assert f"fingerprint: {fingerprint}" in again.output

    # DIMSE: C-FIND and C-GET from the same Orthanc, our own AE title; the same data
    dimse = check(site, "--pacs", demo.orthanc.dimse, "--pacs-aet", "FEDHOSP-TEST", "--cache-dir",
                  str(tmp_path / "dimse-cache"))
    assert dimse.exit_code == 0, dimse.output
    assert f"site Syddanmark: PACS {demo.orthanc.dimse}" in dimse.output
    assert (row(dimse.output, "instances found"), row(dimse.output, "retrieved now")) == (str(SYD_FOUND),) * 2
    assert row(dimse.output, "usable images") == str(N_IMAGES) and "skipped instances: 2" in dimse.output
    for output in (first.output, again.output, dimse.output):
        assert PASSWORD not in output and pacs_server.USER not in output


def test_a_second_sync_retrieves_only_the_new_instances_and_an_interrupted_one_keeps_what_it_wrote(
        demo, tmp_path, monkeypatch):
    site = pacs_site(tmp_path / "Hovedstaden", demo.root / "Hovedstaden", {"modality": "CR", "body-part": "KNEE"},
                     demo.orthanc.dicomweb, demo.credentials)
    files = demo.files("Hovedstaden")
    assert demo.orthanc.upload(files[:20]) == 20
    cache, dimse_cache = tmp_path / "cache", tmp_path / "dimse-cache"
    source = pacs_source.pacs_source(site, "Hovedstaden", {})
    dimse = pacs_source.pacs_source(site, "Hovedstaden", {"pacs": demo.orthanc.dimse})
    first = pacs_source.sync(source, cache)
    assert (first.found, first.retrieved, first.cached, first.removed) == (20, 20, 0, 0)
    assert (pacs_source.sync(dimse, dimse_cache).retrieved) == 20
    held = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first.folder.iterdir()}
    read = load_radiology_site(site, "Hovedstaden", image_size=16, cache_dir=cache, images=first.folder)
    assert read.decoded == len(read.train) + len(read.test) == 20

    assert demo.orthanc.upload(files[20:]) == N_IMAGES - 20  # new studies arrive at the PACS
    second = pacs_source.sync(source, cache)
    assert (second.found, second.retrieved, second.cached, second.removed) == (N_IMAGES, N_IMAGES - 20, 20, 0)
    assert second.folder == first.folder
    again = {name: ((first.folder / name).stat().st_ino, (first.folder / name).stat().st_mtime_ns) for name in held}
    assert again == held  # the instances held were neither written nor touched again
    read = load_radiology_site(site, "Hovedstaden", image_size=16, cache_dir=cache, images=second.folder)
    assert read.decoded == N_IMAGES - 20 and len(read.train) + len(read.test) == N_IMAGES
    dimse_second = pacs_source.sync(dimse, dimse_cache)
    assert (dimse_second.found, dimse_second.retrieved, dimse_second.cached) == (N_IMAGES, N_IMAGES - 20, 20)
    # the copy is the folder's images: the same pixels, labels and patient split as read from the demo folder
    folder = load_radiology_site(demo.root / "Hovedstaden", "Hovedstaden", image_size=16, cache_dir=tmp_path / "f")

    def images(split) -> list[tuple[str, int]]:
        return sorted((hashlib.sha256(x.tobytes()).hexdigest(), int(y)) for x, y in zip(split.images, split.labels))

    assert images(read.train) == images(folder.train) and images(read.test) == images(folder.test)
    assert read.class_counts == folder.class_counts

    # the PACS goes away after five retrievals: what was written stays, whole; the next sync fetches the rest
    from dicomweb_client.api import DICOMwebClient

    real, calls = DICOMwebClient.retrieve_instance, []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise requests.ConnectionError("[Errno 111] Connection refused")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DICOMwebClient, "retrieve_instance", flaky)
    fresh = tmp_path / "interrupted"
    with pytest.raises(SiteDataError) as failed:
        pacs_source.sync(source, fresh)
    assert str(failed.value) == f"site Hovedstaden: PACS {demo.orthanc.dicomweb} is unreachable (connection refused)"
    copy = fresh / pacs_source.MIRROR / source.key
    kept = sorted(copy.iterdir())
    assert len(kept) == 5 and all(pydicom.dcmread(p).SOPInstanceUID for p in kept)  # whole instances only
    monkeypatch.setattr(DICOMwebClient, "retrieve_instance", real)
    resumed = pacs_source.sync(source, fresh)
    assert (resumed.found, resumed.retrieved, resumed.cached) == (N_IMAGES, N_IMAGES - 5, 5)
    # a narrower query: what no longer matches leaves the node's copy (the PACS keeps it)
    (site / "pacs.toml").write_text((site / "pacs.toml").read_text() + 'study-date = "-20201231"\n')
    narrower = pacs_source.sync(pacs_source.pacs_source(site, "Hovedstaden", {}), fresh)
    assert 0 < narrower.found < N_IMAGES and narrower.removed == N_IMAGES - narrower.found
    assert narrower.retrieved == 0 and len(list(copy.iterdir())) == narrower.found


# ---------------------------------------------------------------- a PACS down, or refusing


def _message(kind: str) -> Message:
    meta = Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=600.0, message_type=kind)
    return Message(content=RecordDict({"config": ConfigRecord({"request": "describe"})}), metadata=meta)


def _describe(site: Path, home: Path, **node_config):
    """The describe query as a SuperNode hands it to the ClientApp: all that leaves the node is the reply."""
    from client.app import app

    context = Context(run_id=1, node_id=7, node_config={"site-name": site.name, "data-dir": str(site),
                                                        "cache-dir": str(home / "cache"), **node_config},
                      state=RecordDict(), run_config={"task": "radiology", "image-size": 16, "seed": 42})
    return app(_message(MessageType.QUERY), context)


def test_a_pacs_down_or_refusing_is_a_clear_error_naming_site_and_pacs_and_the_cache_is_kept(
        demo, tmp_path, caplog):
    caplog.set_level("DEBUG")
    home = Path(tmp_path / "fedhosp-home")  # the autouse fixture's FEDHOSP_HOME: the site ledger lands here
    site = pacs_site(tmp_path / "Syddanmark", demo.root / "Syddanmark", DX_AND_SR)
    good = _describe(site, home, **{"pacs": demo.orthanc.dicomweb, "pacs-credentials": str(demo.credentials)})
    assert not good.has_error(), good.error
    metrics = good.content["metrics"]
    assert metrics["num-train"] + metrics["num-test"] == N_IMAGES and metrics["skipped-rows"] == 2
    before = snapshot(home / "cache")
    assert sum(name.startswith("pacs/") for name in before) == SYD_FOUND

    closed = free_port()  # nothing listens there
    down = f"http://127.0.0.1:{closed}/dicom-web"
    reply = _describe(site, home, **{"pacs": down, "pacs-credentials": str(demo.credentials)})
    assert error_text(reply, "PACS") == f"site Syddanmark: PACS {down} is unreachable (connection refused)"
    reply = _describe(site, home, pacs=f"ORTHANC@127.0.0.1:{closed}")
    assert error_text(reply, "PACS") == f"site Syddanmark: PACS ORTHANC@127.0.0.1:{closed} is unreachable " \
                                        "(connection refused)"
    assert snapshot(home / "cache") == before  # nothing already cached was lost or changed

    wrong = tmp_path / "wrong-credentials"
    wrong.write_text(f"{pacs_server.USER}:{WRONG}\n")
    reply = _describe(site, home, **{"pacs": demo.orthanc.dicomweb, "pacs-credentials": str(wrong)})
    assert error_text(reply, "PACS") == f"site Syddanmark: PACS {demo.orthanc.dicomweb} refused the query (HTTP 401)"
    token = tmp_path / "token"  # a bearer token (this Orthanc knows basic authentication only)
    token.write_text(f"{TOKEN}\n")
    reply = _describe(site, home, **{"pacs": demo.orthanc.dicomweb, "pacs-credentials": str(token)})
    assert error_text(reply, "PACS") == f"site Syddanmark: PACS {demo.orthanc.dicomweb} refused the query (HTTP 401)"
    refused = check(site, "--pacs", demo.orthanc.dicomweb, "--pacs-credentials", str(wrong),
                    "--cache-dir", str(home / "cache"))
    assert refused.exit_code == 1
    assert f"error: site Syddanmark: PACS {demo.orthanc.dicomweb} refused the query (HTTP 401)" in refused.output
    unreachable = check(site, "--pacs", down, "--cache-dir", str(home / "cache"))
    assert unreachable.exit_code == 1 and "is unreachable (connection refused)" in unreachable.output
    with_user = check(site, "--pacs", f"http://{pacs_server.USER}:{WRONG}@127.0.0.1:{closed}/dicom-web")
    assert with_user.exit_code == 1 and "must not hold credentials" in with_user.output
    # a PACS that finds nothing at all (an emptied index, a broken filter) does not empty the node's copy
    empty = pacs_site(tmp_path / "other" / "Syddanmark", demo.root / "Syddanmark", {"modality": "MR"})
    reply = _describe(empty, home, **{"pacs": demo.orthanc.dicomweb, "pacs-credentials": str(demo.credentials)})
    assert error_text(reply, "PACS") == f"site Syddanmark: PACS {demo.orthanc.dicomweb} found no instance for the " \
                                        f"site's query; the node keeps its copy of {SYD_FOUND}"
    assert snapshot(home / "cache") == before

    # neither password, nor a UID, in any reply, output, log record (the node's DEBUG log included for the
    # passwords), or file the node wrote: its ledger, cache and copy of the instances
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in (home / "cache" / "pacs").rglob("*.dcm")]
    texts = [reply.error.reason, refused.output, unreachable.output, with_user.output]
    assert all(secret not in text for text in [*texts, caplog.text] for secret in (PASSWORD, WRONG, TOKEN))
    info = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= 20)
    assert not [uid for uid in uids if uid in info or any(uid in text for text in texts)]
    ledgers = list((home / "site-ledgers").rglob("*"))
    assert any(p.suffix == ".jsonl" for p in ledgers)
    for path in home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not [s for s in (PASSWORD, WRONG, TOKEN) if s.encode() in data], path


# ---------------------------------------------------------------- a federation


def test_radiology_federation_with_one_site_reading_from_orthanc(demo, superlink, tmp_path, mlflow_uri):
    import mlflow
    from mlflow.tracking import MlflowClient

    from server import runner

    root = tmp_path / "sites"
    for name in ("Hovedstaden", "Midtjylland"):
        shutil.copytree(demo.root / name, root / name)
    pacs_site(root / "Syddanmark", demo.root / "Syddanmark", DX_AND_SR, demo.orthanc.dicomweb, demo.credentials)
    config = {"task": "radiology", "num-server-rounds": 1, "local-steps": 2, "image-size": 32,
              "data-root": str(root), "mlflow-uri": mlflow_uri, "mlflow-experiment": "pacs"}
    outcome = runner.flwr_run(APP_DIR, superlink, config, num_supernodes=3)
    assert outcome.ok, outcome.log[-3000:]

    client = MlflowClient(mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("pacs").experiment_id])[0]
    assert run.info.status == "FINISHED"
    for site in ("Hovedstaden", "Midtjylland", "Syddanmark"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"{site}/num_images")] == [1]
    counts = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/sites.json")
    # from the PACS: the unlabelled image and the SR skipped (the two files that are not DICOM never got in)
    assert counts["Syddanmark"]["skipped_rows"] == 2 and counts["Hovedstaden"]["skipped_rows"] == 0
    home = Path(superlink["FEDHOSP_HOME"])
    copies = list((home / "cache" / "radiology" / pacs_source.MIRROR).glob("*/*.dcm"))
    assert len(copies) == SYD_FOUND  # the node's copy, in its private cache

    # the password in no file of the run (Flower's state, MLflow's store and artifacts, the ledgers, the caches,
    # the logs) and not in its output; the run config never held it
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".jsonl" and "site-ledgers" in str(p) for p in files)
    assert any(p.suffix == ".db" for p in files) and any("flwr-home" in str(p) for p in files)
    leaks = [str(p) for p in files if PASSWORD.encode() in p.read_bytes()]
    assert not leaks and PASSWORD not in outcome.log
    assert all(PASSWORD not in str(v) for v in run.data.params.values())
