"""Radiology from the hospital's PACS: find the site's images, retrieve the new ones into the node's cache.

A PACS site's folder holds ``labels.csv`` (keyed by ``SOPInstanceUID``) and
``pacs.toml``, the query that says which images are the site's data::

    url = "https://pacs.hospital.local/dicom-web"   # DICOMweb, or "PACS@pacs.hospital.local:104" (DIMSE)
    calling-aet = "FEDHOSP"                          # DIMSE: our own AE title, as the PACS knows us

    [query]
    modality = ["CR", "DX"]                          # one query per modality
    body-part = "KNEE"                               # BodyPartExamined
    study-description = "KNEE*"                      # matched on the node: * and ?, case-insensitive
    study-date = "20190101-20241231"                 # YYYYMMDD, a range, or open-ended "20190101-"

Node config (the SuperNode's ``--node-config``) overrides or completes it:
``pacs`` (the address), ``pacs-aet`` (our AE title) and ``pacs-credentials``,
the path of a file holding ``user:password`` (HTTP basic) or a bearer token.
Credentials come from the node only: from node config, or, where Flower gives
a node no node config of its own (a simulation), from pacs.toml's
``credentials`` (again a file path). Never from the run config, and the
secret itself appears in no log, ledger, reply or error text.

:func:`sync` asks the PACS (QIDO-RS through ``dicomweb-client``, or a C-FIND
through ``pynetdicom``), retrieves the instances the node does not hold yet
(WADO-RS, or C-GET) and writes each, atomically (temp file + rename), into
``<cache root>/pacs/<site key>/``, one file per SOPInstanceUID (named by its
hash), inside the same private cache root as the folder reader's. Instances
that no longer match the query are removed from there (a query that finds
nothing at all is an error and removes nothing); everything else about a
PACS site is the folder reader's (client/data/dicom.py): labels, skip reasons,
preprocessing cache, fingerprint, site check. An interrupted or failed sync
keeps every instance already written; the next one retrieves only what is
missing.

A PACS that is down or refuses raises :class:`SiteDataError` naming the site
and the PACS address (without credentials or query), never a patient value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import re
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from models.errors import SiteDataError

log = logging.getLogger(__name__)

PACS_FILE = "pacs.toml"
DEFAULT_AET = "FEDHOSP"
DEFAULT_TIMEOUT = 120.0  # seconds one PACS request may take
PAGE = 1000  # QIDO-RS results asked for per request
BATCH = 50  # instances per C-GET
RETRIES = 3  # attempts per DICOMweb request
MIRROR = "pacs"  # below the cache root

# A PACS answers with UIDs, patient and study values: these libraries log them at DEBUG (request URLs, datasets).
for _noisy in ("dicomweb_client", "pynetdicom"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)

_AE = re.compile(r"^(?P<aet>[^@\s\\]{1,16})@(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>\d{1,5})$")
_CODE = re.compile(r"^[A-Z0-9_ ]{1,16}$")  # a CS value: modality, body part
_DATE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")
TOML_KEYS = {"url", "calling-aet", "credentials", "timeout", "query"}
QUERY_KEYS = {"modality", "body-part", "study-description", "study-date"}


@dataclasses.dataclass(frozen=True)
class Query:
    """Which instances are the site's: every given criterion must hold."""

    modalities: tuple[str, ...] = ()
    body_part: str = ""
    study_description: str = ""  # DICOM wildcards, matched on the node (PACS differ in matching free text)
    study_date: str = ""  # YYYYMMDD, YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD-

    def matches(self, modality: str, body_part: str, description: str, date: str) -> bool:
        """The check on the node, so that a PACS ignoring a filter can never widen the site's data."""
        if self.modalities and modality.strip().upper() not in self.modalities:
            return False
        if self.body_part and body_part.strip().upper() != self.body_part:
            return False
        if self.study_description and not _wildcard(self.study_description).fullmatch(description.strip()):
            return False
        if self.study_date:
            first, _, last = self.study_date.partition("-") if "-" in self.study_date else (self.study_date,) * 3
            if not re.fullmatch(r"\d{8}", date.strip()) or not (first or "0") <= date.strip() <= (last or "9"):
                return False
        return True


@dataclasses.dataclass(frozen=True)
class PacsSource:
    site: str
    address: str  # what is shown: a URL without credentials or query, or AET@host:port
    query: Query
    credentials: Path | None = None  # a file: "user:password" or a bearer token
    calling_aet: str = DEFAULT_AET
    timeout: float = DEFAULT_TIMEOUT

    @property
    def dimse(self) -> bool:
        return not self.address.startswith(("http://", "https://"))

    @property
    def key(self) -> str:
        """The copy's folder name: one per site (a UID names one instance whichever PACS serves it; a changed
        address or query keeps what is still found, and removes only the rest)."""
        return hashlib.sha256(f"pacs-site\n{self.site}".encode()).hexdigest()[:16]

    def error(self, problem: str) -> SiteDataError:
        return SiteDataError(f"site {self.site}: PACS {self.address} {problem}")


@dataclasses.dataclass
class PacsSync:
    """What one sync did; numbers only (plus the PACS address), safe to print or log."""

    pacs: str
    found: int  # instances matching the query
    retrieved: int  # written now
    cached: int  # already held by the node
    not_retrieved: int  # found, but the PACS sent nothing for them (deleted since, or a SOP class not offered)
    removed: int  # held, but no longer matching the query: removed from the node's copy
    seconds: float  # the whole sync
    retrieval_seconds: float  # retrieving and writing only
    folder: Path  # the node's copy of the instances, for the folder reader


@dataclasses.dataclass(frozen=True)
class _Instance:
    study: str
    series: str
    sop: str

    @property
    def name(self) -> str:
        """Its file name in the mirror: the UID's hash, so that no UID is in a path."""
        return hashlib.sha256(self.sop.encode()).hexdigest()[:40] + ".dcm"


# ---------------------------------------------------------------- configuration


def pacs_source(folder: Path, site: str, node_config: Mapping) -> PacsSource | None:
    """The site's PACS source from node config and the site folder's pacs.toml; None for a folder site."""
    path = Path(folder) / PACS_FILE
    address = str(node_config.get("pacs") or "").strip()
    if not address and not path.is_file():
        return None
    if not path.is_file():
        raise SiteDataError(f"site {site}: node config 'pacs' is set, but the site folder has no {PACS_FILE} "
                            "with the query (modality, body-part, study-description, study-date)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SiteDataError(f"site {site}: {PACS_FILE} cannot be read as TOML ({type(exc).__name__})") from None
    unknown = sorted(set(raw) - TOML_KEYS) + sorted(f"query.{k}" for k in set(raw.get("query") or {}) - QUERY_KEYS)
    if unknown:
        raise SiteDataError(f"site {site}: {PACS_FILE} has unknown keys: {', '.join(unknown)}")
    address = address or str(raw.get("url") or "").strip()
    if not address:
        raise SiteDataError(f"site {site}: no PACS address: set node config 'pacs' or 'url' in {PACS_FILE}")
    credentials = node_config.get("pacs-credentials") or raw.get("credentials")
    if credentials:
        credentials = Path(str(credentials)).expanduser()
        credentials = credentials if credentials.is_absolute() else Path(folder) / credentials
    calling = str(node_config.get("pacs-aet") or raw.get("calling-aet") or DEFAULT_AET).strip()
    if not re.fullmatch(r"[^\\\s]{1,16}", calling):
        raise SiteDataError(f"site {site}: the calling AE title must be 1 to 16 characters, no spaces or backslashes")
    try:
        timeout = float(raw.get("timeout", DEFAULT_TIMEOUT))
    except (TypeError, ValueError):
        timeout = -1.0
    if not timeout > 0:
        raise SiteDataError(f"site {site}: {PACS_FILE} timeout must be a positive number of seconds")
    return PacsSource(site, _shown_address(address, site), _query(raw.get("query") or {}, site),
                      credentials or None, calling, timeout)


def _shown_address(address: str, site: str) -> str:
    """The address as it may be shown; credentials in it are refused (they belong in pacs-credentials)."""
    if address.startswith(("http://", "https://")):
        parts = urlsplit(address)
        if parts.username is not None or parts.password is not None:
            raise SiteDataError(f"site {site}: the PACS address must not hold credentials; "
                                "put them in the file node config 'pacs-credentials' names")
        if not parts.hostname:
            raise SiteDataError(f"site {site}: the PACS address is not a URL with a host")
        return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    match = _AE.fullmatch(address)
    if not match or not 0 < int(match["port"]) < 65536:
        raise SiteDataError(f"site {site}: the PACS address is neither a DICOMweb URL (http:// or https://) "
                            "nor a DICOM peer AET@host:port")
    return address


def _query(raw: Mapping, site: str) -> Query:
    def bad(key: str, what: str) -> SiteDataError:
        return SiteDataError(f"site {site}: {PACS_FILE} query.{key} must be {what}")

    modalities = raw.get("modality", [])
    modalities = [modalities] if isinstance(modalities, str) else modalities
    if not isinstance(modalities, list) or not all(isinstance(m, str) and _CODE.fullmatch(m.strip().upper())
                                                   for m in modalities):
        raise bad("modality", "a modality code or a list of them (CR, DX, ...)")
    body_part = raw.get("body-part", "")
    if not isinstance(body_part, str) or (body_part and not _CODE.fullmatch(body_part.strip().upper())):
        raise bad("body-part", "a BodyPartExamined code (KNEE, ...)")
    description = raw.get("study-description", "")
    if not isinstance(description, str) or len(description) > 64:
        raise bad("study-description", "text of at most 64 characters")
    date = raw.get("study-date", "")
    if not isinstance(date, str) or not _DATE.fullmatch(date.strip()) or date.strip() == "-":
        raise bad("study-date", "YYYYMMDD, YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD-")
    query = Query(tuple(dict.fromkeys(m.strip().upper() for m in modalities)), body_part.strip().upper(),
                  description.strip(), date.strip())
    if query == Query():
        raise SiteDataError(f"site {site}: {PACS_FILE} needs a [query] (modality, body-part, study-description "
                            "or study-date): the node never asks for a whole PACS")
    return query


def _wildcard(pattern: str) -> re.Pattern:
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern),
                      re.IGNORECASE | re.DOTALL)


def _secret(source: PacsSource) -> tuple[str, str] | str | None:
    """``(user, password)`` for HTTP basic, a bearer token, or None; the file's content is never shown."""
    if source.credentials is None:
        return None
    try:
        lines = source.credentials.read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError):
        raise SiteDataError(f"site {source.site}: the PACS credentials file (node config pacs-credentials) "
                            "cannot be read") from None
    line = lines[0].strip() if lines else ""
    if not line:
        raise SiteDataError(f"site {source.site}: the PACS credentials file (node config pacs-credentials) is empty")
    if line.lower().startswith("bearer "):
        return line[7:].strip()
    if ":" in line:
        user, password = line.split(":", 1)
        return user, password
    return line


# ---------------------------------------------------------------- the sync


def cache_folder(cache_dir: str | Path | None) -> Path:
    """The node's private cache root: node config ``cache-dir``, else ``$FEDHOSP_HOME/cache/radiology`` (the
    folder reader's own default, client/data/dicom.py ``_scan``)."""
    from models.home import fedhosp_home

    return (Path(cache_dir) if cache_dir else fedhosp_home() / "cache" / "radiology").expanduser().resolve()


def synced_images(folder: Path, site: str, node_config: Mapping, cache_dir: str | Path | None) -> Path | None:
    """Where the folder reader finds a PACS site's instances (synced now); None for a folder site."""
    source = pacs_source(folder, site, node_config)
    return None if source is None else sync(source, cache_folder(cache_dir)).folder


def sync(source: PacsSource, cache_root: Path) -> PacsSync:
    """Find the query's instances, retrieve the ones the node lacks, drop the ones no longer found."""
    start = time.perf_counter()
    cache_root = Path(cache_root)
    cache_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder = cache_root / MIRROR / source.key
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = cache_root / MIRROR / f".partial-{source.key}"  # beside the copy: the reader never sees a temp file
    partial.mkdir(mode=0o700, exist_ok=True)
    client = _DicomWeb(source) if not source.dimse else _Dimse(source)
    with _guarded(source):
        with client:
            found = {instance.name: instance for instance in client.find()}
            held = {p.name for p in folder.glob("*.dcm")}
            if not found:  # and a PACS answering nothing is more likely broken than the site's data gone
                kept = f"; the node keeps its copy of {len(held)}" if held else ""
                raise source.error(f"found no instance for the site's query{kept}")
            missing = [found[name] for name in sorted(set(found) - held)]
            fetch_start = time.perf_counter()
            written = 0

            def store(instance: _Instance, data: bytes) -> None:
                nonlocal written
                try:
                    _write(folder / instance.name, partial, data)
                except OSError as exc:
                    raise SiteDataError(f"site {source.site}: the node's cache cannot be written "
                                        f"({type(exc).__name__}); what it holds is kept") from None
                written += 1

            client.retrieve(missing, store)
            fetched = time.perf_counter() - fetch_start
    stale = sorted(held - set(found))
    for name in stale:  # no longer the site's data (the query or the PACS changed)
        (folder / name).unlink(missing_ok=True)
    result = PacsSync(source.address, len(found), written, len(found) - len(missing), len(missing) - written,
                      len(stale), time.perf_counter() - start, fetched, folder)
    log.info("site %s: PACS %s: %d instances found, %d retrieved, %d already cached, %d not retrieved, %d removed "
             "(%.1f s)", source.site, source.address, result.found, result.retrieved, result.cached,
             result.not_retrieved, result.removed, result.seconds)
    return result


def _write(path: Path, partial: Path, data: bytes) -> None:
    """Atomic: a killed node leaves a temp file beside the copy, never a half instance in it."""
    fd, tmp = tempfile.mkstemp(dir=partial, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _guarded(source: PacsSource) -> Iterator[None]:
    """Every failure of the PACS or the network as one safe line; details (URLs hold UIDs) at DEBUG only."""
    try:
        yield
    except SiteDataError:
        raise
    except Exception as exc:
        log.debug("site %s: PACS sync failed", source.site, exc_info=True)
        raise source.error(_problem(exc)) from None


def _problem(exc: Exception) -> str:
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        stage = "the retrieval" if "/studies/" in (exc.response.request.path_url if exc.response.request else "") \
            else "the query"
        verb = "refused" if status in (401, 403, 404, 405, 400) else "failed"
        return f"{verb} {stage} (HTTP {status})"
    if isinstance(exc, requests.exceptions.SSLError):
        return "is unreachable (TLS error)"
    if isinstance(exc, requests.Timeout):
        return "is unreachable (timed out)"
    if isinstance(exc, requests.ConnectionError):
        text = str(exc).lower()
        if "refused" in text:
            return "is unreachable (connection refused)"
        if "name or service" in text or "resolve" in text or "nodename" in text:
            return "is unreachable (host name not resolved)"
        return "is unreachable (connection failed)"
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return f"is unreachable ({type(exc).__name__})"
    return f"sync failed ({type(exc).__name__})"


# ---------------------------------------------------------------- DICOMweb


class _DicomWeb:
    """QIDO-RS and WADO-RS through dicomweb-client, on a requests Session carrying the node's credentials."""

    FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality", "BodyPartExamined",
              "StudyDescription", "StudyDate")

    def __init__(self, source: PacsSource):
        self.source = source

    def __enter__(self):
        import requests
        from dicomweb_client.api import DICOMwebClient

        secret = _secret(self.source)
        session = requests.Session()
        if isinstance(secret, tuple):
            session.auth = secret
        elif secret:
            session.headers["Authorization"] = f"Bearer {secret}"
        # Pixel data over a hospital network: gzip costs the PACS and the node more CPU than it saves (a quarter
        # of the instances/s on loopback here).
        session.headers["Accept-Encoding"] = "identity"
        self.session = session
        self.client = DICOMwebClient(self.source.address, session=session, timeout=self.source.timeout)
        # Its default retries any failure 5 times over 30 s; a PACS that is down answers within 1.5 s here (the
        # next message tries again), a busy one (503, 429, timeouts) gets two more tries.
        self.client.set_http_retry_params(retry=True, max_attempts=RETRIES, wait_exponential_multiplier=250)
        return self

    def __exit__(self, *exc) -> None:
        self.session.close()

    def find(self) -> list[_Instance]:
        query = self.source.query
        filters: dict[str, str] = {}
        if query.body_part:
            filters["BodyPartExamined"] = query.body_part
        if query.study_date:
            filters["StudyDate"] = query.study_date
        found: dict[str, _Instance] = {}
        for modality in query.modalities or (None,):
            for item in self._search({**filters, **({"Modality": modality} if modality else {})}):
                value = _value_of(item)
                if not all(value(t) for t in ("0020000D", "0020000E", "00080018")):
                    continue
                if query.matches(value("00080060"), value("00180015"), value("00081030"), value("00080020")):
                    instance = _Instance(value("0020000D"), value("0020000E"), value("00080018"))
                    found[instance.sop] = instance
        return list(found.values())

    def _search(self, filters: dict[str, str]) -> Iterator[dict]:
        """Every page: until an empty one, or one with nothing new (a server ignoring the offset)."""
        offset, seen = 0, set()
        while True:
            page = self.client.search_for_instances(fields=list(self.FIELDS), search_filters=filters,
                                                    limit=PAGE, offset=offset)
            fresh = [item for item in page if _sop(item) not in seen]
            if not fresh:
                return
            seen.update(_sop(item) for item in fresh)
            yield from fresh
            offset += len(page)

    def retrieve(self, instances: list[_Instance], store: Callable[[_Instance, bytes], None]) -> None:
        import requests

        for instance in instances:
            try:  # as the PACS stores it: no transcoding there; the reader names what it cannot decode
                ds = self.client.retrieve_instance(instance.study, instance.series, instance.sop,
                                                   media_types=(("application/dicom", "*"),))
            except requests.HTTPError as exc:
                if exc.response is not None and exc.response.status_code in (404, 410):
                    continue  # deleted since the query: not retrieved, counted
                raise
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            store(instance, buffer.getvalue())


def _sop(item: dict) -> str:
    return _value_of(item)("00080018")


def _value_of(item: dict) -> Callable[[str], str]:
    """A DICOM JSON object's first value of a tag, as text ("" when absent)."""

    def value(tag: str) -> str:
        values = (item.get(tag) or {}).get("Value") or [""]
        return str(values[0] if values[0] is not None else "")

    return value


# ---------------------------------------------------------------- DIMSE


# What a knee X-ray study holds; an instance of any other SOP class is found but not retrieved (counted).
def _storage_classes() -> list[str]:
    from pynetdicom import sop_class as sc

    return [sc.ComputedRadiographyImageStorage, sc.DigitalXRayImageStorageForPresentation,
            sc.DigitalXRayImageStorageForProcessing, sc.SecondaryCaptureImageStorage,
            sc.DigitalMammographyXRayImageStorageForPresentation, sc.BasicTextSRStorage, sc.EnhancedSRStorage,
            sc.ComprehensiveSRStorage, sc.GrayscaleSoftcopyPresentationStateStorage]


def _transfer_syntaxes() -> list[str]:
    """One presentation context per syntax, so the PACS sends each instance as stored (no transcoding)."""
    from pydicom import uid

    return [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit,
            uid.JPEGLosslessSV1, uid.JPEGLSLossless, uid.JPEG2000Lossless, uid.JPEG2000, uid.RLELossless,
            uid.DeflatedExplicitVRLittleEndian, uid.ExplicitVRBigEndian]


class _Dimse:
    """C-FIND (Study Root, IMAGE level, relational) and C-GET over one association, through pynetdicom."""

    def __init__(self, source: PacsSource):
        self.source = source
        aet, _, rest = source.address.partition("@")
        host, _, port = rest.rpartition(":")
        self.called, self.host, self.port = aet, host.strip("[]"), int(port)

    def __enter__(self):
        from pynetdicom import AE, build_role, evt
        from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
        from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind as Find,
                                          StudyRootQueryRetrieveInformationModelGet as Get)

        if self.source.credentials is not None:
            log.info("site %s: PACS credentials are not used over DIMSE (the PACS admits our AE title)",
                     self.source.site)
        ae = AE(ae_title=self.source.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.source.timeout
        ae.connection_timeout = min(self.source.timeout, 30.0)
        ae.maximum_pdu_size = 0  # as large as the PACS offers
        ae.add_requested_context(Find)
        ae.add_requested_context(Get)
        roles = []
        for storage in _storage_classes():
            for syntax in _transfer_syntaxes():
                ae.add_requested_context(storage, syntax)
            roles.append(build_role(storage, scp_role=True))
        self._reachable()
        relational = SOPClassExtendedNegotiation()
        relational.sop_class_uid, relational.service_class_application_information = Find, b"\x01"
        self.received: dict[str, bytes] = {}
        self.stored = 0
        self.assoc = ae.associate(self.host, self.port, ae_title=self.called, ext_neg=[*roles, relational],
                                  evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        if not self.assoc.is_established:
            raise self.source.error("refused the association (A-ASSOCIATE-RJ)" if self.assoc.is_rejected
                                    else "is unreachable (no DICOM association)")
        self.find_class, self.get_class = Find, Get
        return self

    def _reachable(self) -> None:
        """Why a peer cannot be reached (pynetdicom only logs it): a plain TCP connect first, closed at once."""
        import socket

        try:
            socket.create_connection((self.host, self.port), timeout=min(self.source.timeout, 30.0)).close()
        except socket.gaierror:
            raise self.source.error("is unreachable (host name not resolved)") from None
        except ConnectionRefusedError:
            raise self.source.error("is unreachable (connection refused)") from None
        except TimeoutError:
            raise self.source.error("is unreachable (timed out)") from None
        except OSError as exc:
            raise self.source.error(f"is unreachable ({type(exc).__name__})") from None

    def __exit__(self, *exc) -> None:
        if self.assoc.is_established:
            self.assoc.release()

    def _on_store(self, event) -> int:
        self.received[str(event.request.AffectedSOPInstanceUID)] = event.encoded_dataset(include_meta=True)
        return 0x0000

    def find(self) -> list[_Instance]:
        from pydicom.dataset import Dataset

        query = self.source.query
        found: dict[str, _Instance] = {}
        for modality in query.modalities or ("",):
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "IMAGE"
            identifier.StudyInstanceUID = identifier.SeriesInstanceUID = identifier.SOPInstanceUID = ""
            identifier.Modality = modality
            identifier.BodyPartExamined = query.body_part
            identifier.StudyDate = query.study_date
            identifier.StudyDescription = ""  # returned, matched on the node
            for status, answer in self.assoc.send_c_find(identifier, self.find_class):
                code = _status(status, self.source, "query")
                if code in (0xFF00, 0xFF01) and answer is not None:
                    text = {k: str(answer.get(k, "") or "") for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                                                       "SOPInstanceUID", "Modality",
                                                                       "BodyPartExamined", "StudyDescription",
                                                                       "StudyDate")}
                    if all(text[k] for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")) and \
                            query.matches(text["Modality"], text["BodyPartExamined"], text["StudyDescription"],
                                          text["StudyDate"]):
                        found[text["SOPInstanceUID"]] = _Instance(text["StudyInstanceUID"],
                                                                  text["SeriesInstanceUID"], text["SOPInstanceUID"])
        return list(found.values())

    def retrieve(self, instances: list[_Instance], store: Callable[[_Instance, bytes], None]) -> None:
        refused = 0  # the last failure status of a C-GET that brought nothing
        for start in range(0, len(instances), BATCH):
            batch = instances[start:start + BATCH]
            stored, code = self._get(batch, store)
            if not stored and _failed(code) and len(batch) > 1:  # a PACS refusing UID lists: one at a time
                for instance in batch:
                    one, code = self._get([instance], store)
                    stored += one
                    refused = code if not one and _failed(code) else refused
            elif not stored and _failed(code):
                refused = code
        if instances and refused and not self.stored:  # nothing at all came: the PACS does not let us retrieve
            raise self.source.error(f"refused the retrieval (C-GET status 0x{refused:04X})")

    def _get(self, batch: list[_Instance], store: Callable[[_Instance, bytes], None]) -> tuple[int, int]:
        """One C-GET for the batch (UID lists at IMAGE level): the instances stored, the final status."""
        from pydicom.dataset import Dataset

        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.StudyInstanceUID = list(dict.fromkeys(i.study for i in batch))
        identifier.SeriesInstanceUID = list(dict.fromkeys(i.series for i in batch))
        identifier.SOPInstanceUID = [i.sop for i in batch]
        self.received.clear()
        code = 0
        for status, _ in self.assoc.send_c_get(identifier, self.get_class):
            code = _status(status, self.source, "retrieval", tolerate=True)
        wanted = {i.sop: i for i in batch}
        stored = 0
        for sop, data in self.received.items():
            if sop in wanted:
                store(wanted[sop], data)
                stored += 1
        self.received.clear()
        self.stored += stored
        return stored, code


def _failed(code: int) -> bool:
    return code in (0x0122, 0x0124, 0xA700, 0xA701, 0xA702, 0xA900, 0xFE00) or 0xC000 <= code <= 0xCFFF


def _status(status, source: PacsSource, stage: str, tolerate: bool = False) -> int:
    """A DIMSE response's status; a lost association or a failure status raises (the retrieval's may be tolerated)."""
    if status is None or "Status" not in status:
        raise source.error("is unreachable (association lost or timed out)")
    code = int(status.Status)
    if _failed(code) and not tolerate:
        raise source.error(f"refused {'the query' if stage == 'query' else 'the retrieval'} "
                           f"(C-{'FIND' if stage == 'query' else 'GET'} status 0x{code:04X})")
    return code
