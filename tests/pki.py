"""A throwaway PKI made with the openssl CLI, for the TLS tests (test_tls*.py)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import IN_CI


@dataclass
class Pki:
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    cluster_cert: Path
    cluster_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(name: str, cwd: Path) -> None:
    _openssl(
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1"),
        *("-subj", f"/CN=aioqueue test {name}"),
        cwd=cwd,
    )


def _leaf(name: str, ca: str, ext: str, cwd: Path) -> None:
    _openssl(
        *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}"),
        cwd=cwd,
    )
    (cwd / f"{name}.ext").write_text(ext)
    _openssl(
        *("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key"),
        *("-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext"),
        cwd=cwd,
    )


def make_pki(cwd: Path) -> Pki:
    """A throwaway CA, a server certificate for "localhost" only, a client certificate, a
    server certificate for the address 127.0.0.1 only (for the Redis Cluster nodes: redis-py
    dials a cluster node named "localhost" at 127.0.0.1), and a second CA that signed none of
    them, in ``cwd``."""
    if shutil.which("openssl") is None:
        if IN_CI:
            pytest.fail("openssl is needed for the TLS tests")
        pytest.skip("openssl not installed")
    _ca("ca", cwd)
    _ca("other", cwd)
    _leaf("server", "ca", "subjectAltName=DNS:localhost\n", cwd)
    _leaf("client", "ca", "extendedKeyUsage=clientAuth\n", cwd)
    _leaf("cluster", "ca", "subjectAltName=IP:127.0.0.1\n", cwd)
    return Pki(
        ca=cwd / "ca.pem",
        other_ca=cwd / "other.pem",
        server_cert=cwd / "server.pem",
        server_key=cwd / "server.key",
        client_cert=cwd / "client.pem",
        client_key=cwd / "client.key",
        cluster_cert=cwd / "cluster.pem",
        cluster_key=cwd / "cluster.key",
    )
