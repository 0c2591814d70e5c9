"""Throwaway TLS credentials for a local deployment: a CA and the SuperLink's certificate.

Production coordinators use certificates from their own CA; ``make deploy-local``
and the tests use these. A hospital's node key pair is made on the hospital's
side: ``client/credentials.py`` (``fedhosp site node-key``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from client.credentials import write_file as _write


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_tls(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "superlink"), days: int = 30) -> dict:
    """``ca.crt`` (+ key), and ``server.pem`` / ``server.key`` for the SuperLink, signed by that CA."""
    folder = Path(folder)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedhosp local CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA384()))
    return {
        "ca": _write(folder / "ca.crt", ca.public_bytes(serialization.Encoding.PEM)),
        "ca_key": _write(folder / "ca.key", _pem_key(ca_key), private=True),
        "cert": _write(folder / "server.pem", cert.public_bytes(serialization.Encoding.PEM)),
        "key": _write(folder / "server.key", _pem_key(key), private=True),
    }

