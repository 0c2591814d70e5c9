"""A throwaway Orthanc PACS on 127.0.0.1 for tests and the retrieval benchmark.

Debian's ``orthanc`` and ``orthanc-dicomweb`` packages (``make system-deps``
installs them, without starting Debian's service): the ``Orthanc`` binary runs
directly with a JSON configuration and its own storage in a folder of ours, on
free ports, reachable from 127.0.0.1 only, with HTTP basic authentication.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from server.deploy import free_port

BINARY = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PACKAGE_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
AET = "ORTHANC"
USER = "fedhosp"
START_BOUND = 90.0  # seconds: Orthanc answers in about one; only a hang reaches this


def dicomweb_plugin() -> str | None:
    """The DICOMweb plugin's shared library, as the Debian package lists it."""
    if Path(PACKAGE_PLUGIN).exists():
        return PACKAGE_PLUGIN
    try:
        files = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True).stdout.split()
    except OSError:
        return None
    return next((f for f in files if Path(f).name.startswith("libOrthancDicomWeb.so") and Path(f).is_file()), None)


def missing() -> str | None:
    """Why no Orthanc can run here, or None."""
    if not Path(BINARY).is_file():
        return (f"Orthanc is not installed ({BINARY} not found): `make system-deps` installs Debian's orthanc and "
                "orthanc-dicomweb (apt-get), which tests/test_pacs.py needs")
    if dicomweb_plugin() is None:
        return ("Orthanc's DICOMweb plugin is not installed: `make system-deps` installs Debian's orthanc-dicomweb, "
                "which tests/test_pacs.py needs")
    return None


def version() -> str:
    try:
        return subprocess.run([BINARY, "--version"], capture_output=True, text=True).stdout.split("\n")[0].split()[-1]
    except (OSError, IndexError):
        return "?"


@dataclass
class Orthanc:
    folder: Path
    http_port: int
    dicom_port: int
    password: str
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def dimse(self) -> str:
        return f"{AET}@127.0.0.1:{self.dicom_port}"

    def session(self) -> requests.Session:
        session = requests.Session()
        session.auth = (USER, self.password)
        return session

    def upload(self, files: Iterable[Path]) -> int:
        """POST each file to Orthanc's REST API; the number it stored (it refuses what is not DICOM)."""
        stored = 0
        with self.session() as session:
            for path in files:
                answer = session.post(f"{self.url}/instances", data=path.read_bytes(), timeout=60)
                if answer.status_code == 200:
                    stored += 1
                elif answer.status_code != 400:  # 400: not DICOM (a truncated file, Thumbs.db)
                    answer.raise_for_status()
        return stored

    def answers(self) -> bool:
        try:
            return requests.get(f"{self.url}/system", auth=(USER, self.password), timeout=5).status_code == 200
        except requests.ConnectionError:
            return False


def _config(folder: Path, http_port: int, dicom_port: int, password: str) -> dict:
    return {
        "Name": "fedhosp-test-pacs", "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": AET,
        "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "storage"),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {USER: password},
        "Plugins": [dicomweb_plugin()], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        # our AE title is not registered with it: let any peer find and get (a hospital PACS registers the node)
        "DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True, "DicomCheckCalledAet": False,
    }


@contextlib.contextmanager
def running(folder: Path, password: str, http_port: int | None = None, dicom_port: int | None = None) -> Iterator[Orthanc]:
    """An Orthanc on free ports (or the given ones) until the block ends; storage stays in ``folder``."""
    reason = missing()
    if reason:
        raise RuntimeError(reason)
    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):  # a free port can be taken between asking and binding: new ports, new start
        ports = (http_port or free_port(), dicom_port or free_port())
        config = folder / "orthanc.json"
        config.write_text(json.dumps(_config(folder, *ports, password), indent=1))
        log = (folder / "orthanc.log").open("ab")
        process = subprocess.Popen([BINARY, str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=folder)
        log.close()
        orthanc = Orthanc(folder, *ports, password, process)
        deadline = time.monotonic() + START_BOUND
        while process.poll() is None and not orthanc.answers() and time.monotonic() < deadline:
            time.sleep(0.05)
        if process.poll() is None and orthanc.answers():
            break
        _stop(process)
        if attempt == 2 or (http_port and dicom_port):
            tail = (folder / "orthanc.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"Orthanc did not start (exit {process.returncode}): {tail}")
    try:
        yield orthanc
    finally:
        _stop(orthanc.process)


def _stop(process: subprocess.Popen) -> None:
    """Killed: a throwaway PACS has nothing to save, and its graceful stop takes seconds."""
    if process.poll() is None:
        process.kill()
    process.wait()
