"""A throwaway certificate authority for TLS tests: a CA, a server certificate for localhost / 127.0.0.1 and
a client certificate, written as PEM files (keys mode 0600). Made at test time, valid for a day."""
from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)


def _certificate(subject: str, key, issuer: str, issuer_key, extensions) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path, ca_name: str = "copl-test-ca") -> Pki:
    """Write ca.pem, server.pem/server.key (SAN localhost, 127.0.0.1) and client.pem/client.key."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(ca_name, ca_key, ca_name, ca_key, [(x509.BasicConstraints(ca=True, path_length=0), True)])
    out = {"ca": directory / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaves = {
        "server": [x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                   x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])],
        "client": [x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])],
    }
    for role, extensions in leaves.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"copl-test-{role}", key, ca_name, ca_key,
                            [(x509.BasicConstraints(ca=False, path_length=None), True),
                             *[(e, False) for e in extensions]])
        out[f"{role}_cert"] = directory / f"{role}.pem"
        out[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{role}_key"] = directory / f"{role}.key"
        _write_key(key, out[f"{role}_key"])
    return Pki(**out)
