"""Settings of the graph and reward services: one dataclass, one table.

Every field is a flag of `copl serve graph|reward` and `copl up` and an environment variable
(`COPL_` + the field name in capitals); a flag wins over the variable, the variable over the default.
`settings_table()` renders the table below from the fields themselves (README "Services" prints it, and a
test keeps the two equal). Tokens themselves are never flags (flags show in `ps`): they come from files
(--auth-file, --token-file, --graph-token-file) or COPL_WRITE_TOKEN (copl_common/auth.py). Booleans read
true/false (also 1/0, yes/no, on/off) from the environment.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from copl_common.settings import data_dir, default_db_url, default_registry
from copl_common.tls import is_loopback


def _setting(default: Any, help: str, unit: str = "") -> Any:
    return field(default=default, metadata={"help": help, "unit": unit})


@dataclass(frozen=True)
class ServiceSettings:
    # -- where ---------------------------------------------------------------------------------------
    host: str = _setting("127.0.0.1", "address both services bind; loopback unless told otherwise")
    graph_port: int = _setting(50051, "graph service gRPC port (0: any free port)")
    reward_port: int = _setting(50052, "reward service gRPC port (0: any free port)")
    graph_target: str = _setting("", "where the reward service finds the graph service (empty: HOST:GRAPH_PORT)")
    db_url: str = _setting("", "preference store, any SQLAlchemy URL (empty: COPL_DB_URL, else SQLite under COPL_HOME)")
    registry: str = _setting("", "release registry directory (empty: COPL_REGISTRY, else COPL_HOME/registry)")
    # -- security (README "Security") -----------------------------------------------------------------
    auth_file: str = _setting("", "tokens with roles, one 'ROLE TOKEN' a line (read, write, admin), re-read when "
                                  "it changes; when set, COPL_WRITE_TOKEN and the token file are not used")
    token_file: str = _setting("", "without an auth file: the write token (an admin token), first line (empty: "
                                   "COPL_HOME/write-token, created 0600 if missing); COPL_WRITE_TOKEN wins")
    require_read_token: bool = _setting(False, "reads (scores, embeddings, release info, reflection) need a "
                                               "read token too; health checks stay open")
    tls_cert: str = _setting("", "PEM certificate chain the services present (empty: plaintext)")
    tls_key: str = _setting("", "PEM private key of that certificate")
    tls_client_ca: str = _setting("", "PEM CA that client certificates must chain to: mutual TLS (empty: none asked)")
    allow_insecure_bind: bool = _setting(False, "let a non-loopback --host listen without TLS (else the "
                                                "services refuse to start)")
    graph_tls_ca: str = _setting("", "reward service -> graph service: PEM CA to trust; set to use TLS (empty: "
                                     "plaintext)")
    graph_tls_cert: str = _setting("", "reward service -> graph service: PEM client certificate, for mutual TLS")
    graph_tls_key: str = _setting("", "reward service -> graph service: the client certificate's key")
    graph_token_file: str = _setting("", "reward service -> graph service: file holding the read token it sends "
                                         "(when the graph service requires read tokens)")
    graph_metrics_port: int = _setting(9451, "graph service Prometheus port (0: any free port, -1: off)")
    reward_metrics_port: int = _setting(9452, "reward service Prometheus port (0: any free port, -1: off)")
    # -- limits (copl_common/settings.Limits bounds the text fields) -----------------------------------
    max_message_bytes: int = _setting(4 << 20, "largest request or reply message, 4 MiB (RESOURCE_EXHAUSTED above)", "bytes")
    max_responses_per_request: int = _setting(64, "responses in one ScoreRequest (INVALID_ARGUMENT above)")
    max_users_per_request: int = _setting(256, "users in one GetUserEmbedding call (INVALID_ARGUMENT above)")
    max_records_per_request: int = _setting(10_000, "records in one AddPreferences call (INVALID_ARGUMENT above)")
    max_context_pairs: int = _setting(256, "inline context pairs per user (INVALID_ARGUMENT above)")
    max_concurrent_requests: int = _setting(512, "calls in progress per service (RESOURCE_EXHAUSTED above)")
    max_queue_pairs: int = _setting(8192, "(prompt, response) pairs waiting for the model (RESOURCE_EXHAUSTED above)")
    # -- reward model and batching -------------------------------------------------------------------
    device: str = _setting("auto", "reward model device: auto (CUDA when present), cpu or cuda")
    dtype: str = _setting("auto", "reward model dtype: auto (bf16 on CUDA and bf16-capable CPUs), fp32 or bf16")
    torch_threads: int = _setting(0, "the reward model's intra-op CPU threads (0: torch's default, one per core); "
                                     "on cores shared with other busy processes 1 avoids threads spin-waiting "
                                     "for each other")
    max_batch_tokens: int = _setting(16_384, "token budget of one forward pass: pairs x longest sequence", "tokens")
    max_queue_delay_ms: float = _setting(2.0, "longest a request waits for others to join its batch "
                                              "when the model is idle", "ms")
    stream_max_in_flight: int = _setting(32, "ScoreResponsesStream requests being scored at once per stream; "
                                             "the next one is read when one finishes")
    embedding_deadline_ms: float = _setting(1000.0, "deadline of the reward service's calls to the graph "
                                                    "service (also bounded by the caller's)", "ms")
    embedding_cache_ttl_ms: float = _setting(500.0, "reward service's cache of user embeddings by (user, release); "
                                                    "with STORE_POLL_S it bounds label-to-score latency", "ms")
    embedding_cache_size: int = _setting(100_000, "entries of that cache")
    # -- graph service ---------------------------------------------------------------------------------
    adapted_cache_size: int = _setting(100_000, "cached ADAPTED/DEFAULT embeddings by (release, user)")
    store_poll_s: float = _setting(0.25, "how often the graph service looks for preferences stored by other "
                                         "replicas (invalidating those users' cached embeddings)", "s")
    store_poll_overlap_s: float = _setting(30.0, "how far back each look reaches, for transactions that commit "
                                                 "after their insertion time", "s")
    # -- releases and lifecycle ------------------------------------------------------------------------
    release_poll_s: float = _setting(2.0, "how often the services look at the registry's CURRENT pointer", "s")
    release_grace_s: float = _setting(300.0, "how long the graph service keeps answering for the previous "
                                             "release after a swap", "s")
    release_sync_timeout_s: float = _setting(30.0, "how long the reward service waits for the graph service to "
                                                   "serve a new release before it swaps anyway", "s")
    shutdown_grace_s: float = _setting(10.0, "on SIGTERM/SIGINT: how long calls in progress may finish", "s")
    log_level: str = _setting("INFO", "DEBUG logs one line per request")

    def __post_init__(self):
        for name in ("graph_port", "reward_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be in 0..65535, got {getattr(self, name)}")
        for name in ("graph_metrics_port", "reward_metrics_port"):
            if not -1 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be -1 (off) or in 0..65535, got {getattr(self, name)}")
        positive = ("max_message_bytes", "max_responses_per_request", "max_users_per_request",
                    "max_records_per_request", "max_context_pairs", "max_concurrent_requests", "max_queue_pairs",
                    "max_batch_tokens", "stream_max_in_flight", "embedding_deadline_ms", "embedding_cache_size",
                    "adapted_cache_size", "store_poll_s", "release_poll_s", "release_sync_timeout_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("torch_threads", "max_queue_delay_ms", "embedding_cache_ttl_ms", "store_poll_overlap_s", "release_grace_s",
                     "shutdown_grace_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_queue_pairs < self.max_responses_per_request:
            raise ValueError("max_queue_pairs must be >= max_responses_per_request (a request must fit the queue)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if bool(self.graph_tls_cert) != bool(self.graph_tls_key):
            raise ValueError("graph_tls_cert and graph_tls_key go together: set both or neither")
        if self.graph_tls_cert and not self.graph_tls_ca:
            raise ValueError("graph_tls_cert (mutual TLS to the graph service) needs graph_tls_ca")
        if not is_loopback(self.host) and not self.tls_cert and not self.allow_insecure_bind:
            raise ValueError(f"refusing to listen on {self.host} without TLS: set --tls-cert and --tls-key, "
                             "or --allow-insecure-bind to accept plaintext beyond this machine")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")

    # Resolved values: the empty defaults mean "from COPL_HOME", read when used, not at import.
    @property
    def store_url(self) -> str:
        return self.db_url or default_db_url()

    @property
    def registry_path(self) -> Path:
        return Path(self.registry).expanduser() if self.registry else default_registry()

    @property
    def token_path(self) -> Path:
        return Path(self.token_file).expanduser() if self.token_file else data_dir() / "write-token"

    @property
    def graph_address(self) -> str:
        return self.graph_target or f"{self.host}:{self.graph_port}"

    def with_overrides(self, **values: Any) -> ServiceSettings:
        return replace(self, **{k: v for k, v in values.items() if v is not None})


def env_name(name: str) -> str:
    return "COPL_" + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _parse(kind: type, name: str, text: str) -> Any:
    if kind is bool:
        if text.strip().lower() not in _BOOLEANS:
            raise ValueError(f"{env_name(name)}={text!r} is not a boolean: use true or false")
        return _BOOLEANS[text.strip().lower()]
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{env_name(name)}={text!r} is not a valid {kind.__name__}") from None


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def setting_fields() -> list[tuple[str, type, Any, str, str]]:
    """(name, type, default, help, unit) of every setting, in table order."""
    out = []
    for f in fields(ServiceSettings):
        kind = _TYPES[f.type] if isinstance(f.type, str) else f.type
        default = f.default if f.default is not MISSING else None
        out.append((f.name, kind, default, f.metadata["help"], f.metadata["unit"]))
    return out


def load_settings(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> ServiceSettings:
    """Defaults, overridden by COPL_* environment variables, overridden by flags (None: not given).
    ValueError names the offending variable or setting."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, kind, _default, _help, _unit in setting_fields():
        if (text := environ.get(env_name(name))) is not None:
            values[name] = _parse(kind, name, text)
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    return ServiceSettings(**values)


def settings_table() -> str:
    """The Markdown table of every setting: flag, environment variable, default, meaning."""
    rows = ["| flag | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for name, _kind, default, help, unit in setting_fields():
        shown = "(empty)" if default == "" else str(default).lower() if isinstance(default, bool) else str(default)
        rows.append(f"| `{flag_name(name)}` | `{env_name(name)}` | {shown}{' ' + unit if unit else ''} | {help} |")
    return "\n".join(rows)
