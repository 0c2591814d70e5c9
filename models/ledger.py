"""Hash-chained, signed JSON Lines ledgers, written by the coordinator and by every site.

Each line is one event: ``seq``, UTC ``time``, ``event``, ``data``, ``prev``
(the previous record's ``hash``; 64 zeros for the first), ``hash`` (SHA-256 of
the canonical JSON of the other five fields) and ``sig`` (Ed25519 over the hash,
base64). Records are appended and fsynced as events happen, so a crash keeps
everything up to the crash. Editing, removing or reordering a record breaks the
chain; recomputing the chain breaks the signatures. A chain cannot show a
cut-off tail: compare the last hash with a head hash kept elsewhere (MLflow tag,
the site's own ledger).

The module lives on the client side because sites write ledgers too; the
coordinator and the auditor CLI use the same code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS = "0" * 64
FIELDS = ("seq", "time", "event", "data", "prev")


def _clean(value):
    """JSON has no NaN or infinity; write them as strings so hashing is well defined."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def canonical(record: dict) -> bytes:
    return json.dumps({k: record[k] for k in FIELDS}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


def record_hash(record: dict) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The signing key, created on first use: PEM, mode 0600, in a 0700 folder; ``.pub`` beside it.

    Two processes may create it at once (two runs starting side by side): the key is written whole to a file of
    its own, then linked into place, so that exactly one key wins and every process loads that one.
    """
    path = Path(path)
    if path.exists():
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    draft = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(draft, path)  # atomic, and never replaces a key another process linked first
    except FileExistsError:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    finally:
        draft.unlink()
    path.with_suffix(".pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte public key, base64: short enough to sit in a record or an MLflow tag."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A PEM file's content, or the base64 raw key as written in the ledger."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        return serialization.load_pem_public_key(text.encode())
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text))


class Ledger:
    """Append-only writer; safe to reopen (a SuperNode runs each message in a fresh process).

    A new ledger starts with a ``ledger-open`` record that carries the signer's
    public key and ``opening`` (who writes it, for which run).
    """

    def __init__(self, path: Path, key: Ed25519PrivateKey, opening: dict | None = None):
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        last = read_records(self.path)[-1:] if self.path.exists() else []
        self.seq = last[0]["seq"] + 1 if last else 0
        self.head = last[0]["hash"] if last else GENESIS
        if not last:
            self.append("ledger-open", {"public_key": public_key_text(key), **(opening or {})})

    def append(self, event: str, data: dict) -> dict:
        record = {"seq": self.seq, "time": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                  "event": event, "data": _clean(data), "prev": self.head}
        record["hash"] = record_hash(record)
        record["sig"] = base64.b64encode(self.key.sign(bytes.fromhex(record["hash"]))).decode()
        line = json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self.seq += 1
        self.head = record["hash"]
        return record


def read_records(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@dataclass
class Verdict:
    ok: bool
    records: int
    head: str
    problem: str = ""


def verify(path: Path, public_key: Ed25519PublicKey | None = None, head: str | None = None) -> Verdict:
    """Check the chain, every hash and signature, and optionally the head.

    Without ``public_key`` the key named in the first record is used, which
    proves the ledger is self-consistent but not who wrote it: pass the
    coordinator's (or site's) published key for that.
    """
    try:
        records = read_records(path)
    except (OSError, ValueError) as exc:
        return Verdict(False, 0, "", f"cannot be read as JSON Lines ({type(exc).__name__})")
    if not records:
        return Verdict(False, 0, "", "is empty")
    if public_key is None:
        text = records[0].get("data", {}).get("public_key")
        if not text:
            return Verdict(False, len(records), "", "record 0 names no public key; pass --public-key")
        public_key = parse_public_key(text)
    prev = GENESIS
    for index, record in enumerate(records):
        name = f"record {index} (seq {record.get('seq')}, {record.get('event')})"
        try:
            recomputed = record_hash(record)
        except (KeyError, TypeError, ValueError):
            return Verdict(False, len(records), "", f"{name} is malformed")
        if recomputed != record.get("hash"):
            return Verdict(False, len(records), "", f"{name} was edited: its content does not match its hash")
        if record["seq"] != index or record["prev"] != prev:
            later = [r.get("seq") for r in records[index + 1:]]
            if record["seq"] > index and index not in later:
                what = f"removed: {record['seq'] - index} record(s) missing before it"
            elif record["seq"] != index:
                what = f"reordered: record seq {index} should stand here"
            else:
                what = "out of chain: its previous-hash does not match the record before it"
            return Verdict(False, len(records), "", f"{name} {what}")
        try:
            public_key.verify(base64.b64decode(record.get("sig", "")), bytes.fromhex(record["hash"]))
        except (InvalidSignature, ValueError):
            return Verdict(False, len(records), "", f"{name} has a bad signature: forged, or signed by another key")
        prev = record["hash"]
    if head and head != prev:
        known = [r["hash"] for r in records]
        if any(h.startswith(head) for h in known):
            return Verdict(False, len(records), prev, f"head {head[:16]}… is not the last record: records were appended after it")
        return Verdict(False, len(records), prev,
                       f"the ledger ends at {prev[:16]}… but the head is {head[:16]}…: records were cut off the end")
    return Verdict(True, len(records), prev)
