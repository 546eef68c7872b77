"""Addresses, channels and the health of each server behind a client.

A target is `grpc://HOST:PORT` (plaintext), `grpcs://HOST:PORT` (TLS) or `HOST:PORT` (TLS when a `TLSConfig`
is given). An `EndpointPool` holds one channel per address and hands them out round robin, skipping those
marked down; a down endpoint comes back after the standard gRPC health check (`grpc.health.v1`) answers
SERVING, so a restarted replica that is still loading its release gets no traffic.
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Reconnect to a restarted server within about a second (gRPC's defaults back off up to two minutes).
_RECONNECT = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
              ("grpc.max_reconnect_backoff_ms", 1000))
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class TLSConfig:
    """TLS for every channel of a client. `ca`: PEM root certificates to trust (default: the system's);
    `cert` and `key`: a client certificate and its key, for servers that require mutual TLS;
    `server_name`: the name to check the server's certificate against, when it differs from the host."""

    ca: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None
    server_name: str | None = None

    def __post_init__(self):
        if (self.cert is None) != (self.key is None):
            raise ValueError("mutual TLS needs both a client certificate and its key")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path):
            return Path(path).expanduser().read_bytes() if path is not None else None
        return grpc.ssl_channel_credentials(root_certificates=read(self.ca), private_key=read(self.key),
                                            certificate_chain=read(self.cert))


def parse_target(target: str, tls: TLSConfig | None) -> tuple[str, bool]:
    """(host:port, use TLS) for a target string; ValueError when it is malformed or contradicts `tls`."""
    scheme, sep, address = target.partition("://")
    if not sep:
        scheme, address = "", target
    if scheme not in ("", "grpc", "grpcs"):
        raise ValueError(f"unsupported target {target!r}: use grpc://HOST:PORT or grpcs://HOST:PORT")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"target {target!r} has no HOST:PORT")
    if scheme == "grpc" and tls is not None:
        raise ValueError(f"target {target!r} is plaintext but TLS settings were given: use grpcs://")
    return address, scheme == "grpcs" or tls is not None


@dataclass(eq=False)
class Endpoint:
    """One server address: its channel, stubs, and whether it is believed to be up."""

    target: str
    address: str
    channel: grpc.aio.Channel
    health_service: str
    healthy: bool = True
    retry_at: float = 0.0               # when a down endpoint may be probed again
    _probing: asyncio.Lock = field(default_factory=asyncio.Lock)
    _stubs: dict = field(default_factory=dict)

    def method(self, stub_class, name: str):
        """The stub method `name` of `stub_class` on this endpoint's channel."""
        if stub_class not in self._stubs:
            self._stubs[stub_class] = stub_class(self.channel)
        return getattr(self._stubs[stub_class], name)


class EndpointPool:
    """Round robin over the healthy endpoints of one service; failover by marking an endpoint down."""

    def __init__(self, targets: str | Sequence[str], health_service: str, tls: TLSConfig | None = None,
                 channel_options: Sequence[tuple[str, object]] = (), cooldown_s: float = 1.0,
                 probe_timeout_s: float = 1.0):
        targets = [targets] if isinstance(targets, str) else list(targets)
        if not targets:
            raise ValueError(f"no address given for {health_service}")
        self._parsed = [(t, *parse_target(t, tls)) for t in targets]
        self._tls, self._health_service = tls, health_service
        self._options = [*_RECONNECT, ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
                         ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES), *channel_options]
        if tls is not None and tls.server_name:
            self._options.append(("grpc.ssl_target_name_override", tls.server_name))
        self._cooldown_s, self._probe_timeout_s = cooldown_s, probe_timeout_s
        self._endpoints: list[Endpoint] | None = None   # channels are made on first use, inside the event loop
        self._next = 0

    @property
    def endpoints(self) -> list[Endpoint]:
        if self._endpoints is None:
            self._endpoints = [Endpoint(target, address, self._channel(address, secure), self._health_service)
                               for target, address, secure in self._parsed]
        return self._endpoints

    def __len__(self) -> int:
        return len(self._parsed)

    def _channel(self, address: str, secure: bool) -> grpc.aio.Channel:
        if secure:
            creds = (self._tls or TLSConfig()).credentials()
            return grpc.aio.secure_channel(address, creds, options=self._options)
        return grpc.aio.insecure_channel(address, options=self._options)

    async def acquire(self) -> Endpoint | None:
        """The next endpoint in round-robin order that is up, or None when all are down. A down endpoint
        is probed once its cooldown is over, or at once when every endpoint is down (the caller backed off)."""
        loop_time = asyncio.get_running_loop().time()
        endpoints = self.endpoints
        n = len(endpoints)
        order = [(self._next + i) % n for i in range(n)]
        all_down = not any(ep.healthy for ep in endpoints)
        for i in order:
            ep = endpoints[i]
            if ep.healthy or ((all_down or loop_time >= ep.retry_at) and await self._probe(ep)):
                self._next = (i + 1) % n
                return ep
        return None

    def mark_down(self, ep: Endpoint) -> None:
        ep.healthy = False
        ep.retry_at = asyncio.get_running_loop().time() + self._cooldown_s

    def any_healthy(self) -> bool:
        return any(ep.healthy for ep in self.endpoints)

    async def _probe(self, ep: Endpoint) -> bool:
        """Health check: SERVING (or a server without the health service) brings the endpoint back."""
        if ep._probing.locked():     # another call is probing it right now
            return False
        async with ep._probing:
            check = ep.method(health_pb2_grpc.HealthStub, "Check")
            for service in (ep.health_service, ""):
                try:
                    reply = await check(health_pb2.HealthCheckRequest(service=service), timeout=self._probe_timeout_s)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                        ep.healthy = True
                        return True
                    if exc.code() == grpc.StatusCode.NOT_FOUND:
                        continue     # the server reports only its overall health ("")
                    break
                ep.healthy = reply.status == health_pb2.HealthCheckResponse.SERVING
                break
            if not ep.healthy:
                ep.retry_at = asyncio.get_running_loop().time() + self._cooldown_s
            return ep.healthy

    async def close(self) -> None:
        if self._endpoints is not None:
            await asyncio.gather(*(ep.channel.close() for ep in self._endpoints))
            self._endpoints = None


def token_from_env(token: str | None) -> str | None:
    """The bearer token: the argument, else $COPL_TOKEN, else none."""
    return token if token is not None else (os.environ.get("COPL_TOKEN") or None)
