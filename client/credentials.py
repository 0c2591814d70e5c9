"""A hospital's SuperNode key pair, made on the node (``fedhosp site node-key``), and the file writer for keys.

Node keys are EC P-384 in OpenSSH format, which is what Flower's SuperNode
authentication reads: the node keeps ``node_key`` (``--auth-supernode-private-key``)
and the coordinator registers ``node_key.pub`` (``flwr supernode register``).
Nothing here imports the coordinator's package.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_file(path: Path, data: bytes, private: bool = False) -> Path:
    """``data`` into ``path``; a ``private`` file is 0600 from its first byte (not chmod-ed after the write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not private:
        path.write_bytes(data)
        return path
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fd, 0o600)  # a file that was already there keeps its old mode otherwise
        fh.write(data)
    return path


def make_node_key(folder: Path, name: str = "node") -> tuple[Path, Path]:
    """A hospital's SuperNode key pair: keep ``name`` (0600) on the node, send ``name.pub`` to the coordinator."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = write_file(Path(folder) / name, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), private=True)
    public = write_file(Path(folder) / f"{name}.pub", key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public
