"""TLS for the services: server credentials (mutual TLS when a client CA is given), the reward service's
channel to the graph service, and the bind rule (a non-loopback address needs TLS or an explicit opt-out).

Certificates and keys are PEM files, read once at start-up; a renewed certificate takes a restart.
"""
from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror}") from None


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """TLS with `cert` and `key`; with `client_ca`, every client must present a certificate it signed."""
    pair = [(_read(key, "TLS key"), _read(cert, "TLS certificate"))]
    if client_ca:
        return grpc.ssl_server_credentials(pair, root_certificates=_read(client_ca, "TLS client CA"),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)


def channel_credentials(ca: str, cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """Trust `ca` (empty: the system's roots); present `cert` and `key` when given (mutual TLS)."""
    return grpc.ssl_channel_credentials(root_certificates=_read(ca, "TLS CA") if ca else None,
                                        private_key=_read(key, "TLS key") if key else None,
                                        certificate_chain=_read(cert, "TLS certificate") if cert else None)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1); a wildcard or any other name is not."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
