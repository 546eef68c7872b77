"""`copl serve graph`, `copl serve reward` and `copl up`: the services from the command line.

Every setting of copl_common/service_settings.py is a flag of these commands (and a COPL_* variable); the
flags are generated from the settings dataclass, so the table there is the one source. `copl up` runs the
two services as two child processes on loopback (the reward service is its own process, as in production,
and the model's CPU work never competes with the graph service for one interpreter lock), and stops both
cleanly on Ctrl-C or SIGTERM; if one of them dies, it stops the other and exits 1.
"""
from __future__ import annotations

import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

# Flags that the rest of the command line spells differently: `--db` as in `copl ingest --db`.
_ALIASES = {"db_url": ("--db",)}


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _with_setting_flags(run: Callable[..., None], skip: tuple[str, ...] = ()) -> Callable[..., None]:
    """A typer command whose options are the service settings (all optional: None means env or default)."""
    from copl_common.service_settings import env_name, flag_name, setting_fields

    params, annotations = [], {}
    for name, kind, default, help, unit in setting_fields():
        if name in skip:
            continue
        shown = "empty" if default == "" else f"{default}{' ' + unit if unit else ''}"
        option = typer.Option(flag_name(name), *_ALIASES.get(name, ()), show_default=False,
                              help=f"{help} (env {env_name(name)}; default: {shown})")
        annotation = Annotated[Optional[kind], option]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
        annotations[name] = annotation

    def command(**flags: Any) -> None:
        run(flags)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = annotations
    command.__doc__ = run.__doc__
    return command


def _settings(flags: dict[str, Any]):
    from copl_common.service_settings import load_settings
    try:
        return load_settings(flags)
    except ValueError as exc:
        _fail(str(exc))


def _run_service(kind: str, flags: dict[str, Any]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import sqlalchemy.exc

    from copl_common.observability import configure_logging
    settings = _settings(flags)
    configure_logging(settings.log_level)
    if kind == "graph":
        from graph_service.server import serve
    else:
        from reward_service.server import serve
    try:
        serve(settings)
    except (OSError, RuntimeError, ValueError, sqlalchemy.exc.SQLAlchemyError) as exc:
        # a port in use, an unreachable database, an unreadable token file: one line, not a traceback
        _fail(f"{kind} service: {str(exc).splitlines()[0]}")


def serve_graph(flags: dict[str, Any]) -> None:
    """Run the graph service (preference store, user embeddings) until SIGINT or SIGTERM."""
    _run_service("graph", flags)


def serve_reward(flags: dict[str, Any]) -> None:
    """Run the reward service (personalized scores) until SIGINT or SIGTERM."""
    _run_service("reward", flags)


def free_loopback_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 now (the services bind them a moment later)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def is_serving(address: str, timeout_s: float = 2.0) -> bool:
    """Whether the server at HOST:PORT (plaintext) answers the standard gRPC health check with SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class ServiceProcesses:
    """The graph and reward services as two child processes of this one, with exactly `settings` (resolved
    here and handed down as COPL_* variables): what `copl up` runs, and `copl demo` and bench/hotswap.py start.
    `log_dir`: each child's output goes to LOG_DIR/KIND.log instead of this process's stderr."""

    KINDS = ("graph", "reward")

    def __init__(self, settings, log_dir: Path | None = None):
        from copl_common.auth import load_write_token
        self.settings, self.log_dir = settings, log_dir
        if settings.graph_port == 0 and not settings.graph_target:
            raise ValueError("the services need a fixed --graph-port (the reward service must know where to find it)")
        # created once here, not raced by the two children; with an --auth-file the roles file holds the tokens
        self.token = None if settings.auth_file else load_write_token(settings.token_path)
        self.children: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        from copl_common.service_settings import env_name, setting_fields
        env = dict(os.environ)
        for name, *_ in setting_fields():   # the children get exactly the parent's resolved settings
            env[env_name(name)] = str(getattr(self.settings, name))
        env["COPL_DB_URL"] = self.settings.store_url
        env["COPL_REGISTRY"] = str(self.settings.registry_path)
        env["COPL_TOKEN_FILE"] = str(self.settings.token_path)
        command = [sys.executable, "-m", "copl_cli.main", "serve"]
        for kind in self.KINDS:
            log = None
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                log = open(self.log_dir / f"{kind}.log", "ab")
            try:
                self.children[kind] = subprocess.Popen([*command, kind], env=env, stdout=log, stderr=log)
            finally:
                if log is not None:
                    log.close()   # the child holds its own copy

    def target(self, kind: str) -> str:
        port = self.settings.graph_port if kind == "graph" else self.settings.reward_port
        return f"grpc://{self.settings.host}:{port}"

    def exited(self) -> str | None:
        """The first service that is no longer running, if any."""
        return next((kind for kind, child in self.children.items() if child.poll() is not None), None)

    def wait_serving(self, timeout_s: float) -> None:
        """Until both answer the standard health check with SERVING; RuntimeError if one exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        waiting = list(self.KINDS)
        while waiting:
            if (dead := self.exited()) is not None:
                raise RuntimeError(f"the {dead} service exited with status {self.children[dead].returncode}"
                                   + (f" (see {self.log_dir / dead}.log)" if self.log_dir else ""))
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {waiting[0]} service was not SERVING after {timeout_s:.0f} s")
            if is_serving(self.target(waiting[0]).removeprefix("grpc://")):
                waiting.pop(0)
            else:
                time.sleep(0.3)

    def stop(self) -> None:
        """SIGTERM to each child still running, then wait for both (SIGKILL after the shutdown grace)."""
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_s + 15
        for child in self.children.values():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def up(flags: dict[str, Any]) -> None:
    """Run the graph and reward services together on loopback; Ctrl-C or SIGTERM stops both."""
    settings = _settings(flags)
    try:
        services = ServiceProcesses(settings)
    except (OSError, ValueError) as exc:   # no fixed graph port, an unreadable token file
        _fail(f"copl up: {exc}")
    services.start()
    tokens = f"tokens in {settings.auth_file}" if settings.auth_file else f"write token in {settings.token_path}"
    typer.echo(f"graph service on {settings.host}:{settings.graph_port}, reward service on "
               f"{settings.host}:{settings.reward_port}; {tokens}; Ctrl-C stops both", err=True)

    stopping = False

    def stop(_signum=None, _frame=None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    failed = None
    while not stopping and failed is None:
        failed = services.exited()
        time.sleep(0.2)
    services.stop()
    if failed is not None:
        _fail(f"the {failed} service exited with status {services.children[failed].returncode}; stopped the other one")


def health(
    target: Annotated[str, typer.Option("--target", help="HOST:PORT of a graph or reward service")],
    service: Annotated[str, typer.Option(help="the service name to ask about (empty: the whole server)")] = "",
    timeout: Annotated[float, typer.Option(help="seconds to wait for the answer")] = 3.0,
    tls_ca: Annotated[Optional[str], typer.Option("--tls-ca", help="PEM CA to trust: use TLS")] = None,
    tls_cert: Annotated[Optional[str], typer.Option("--tls-cert", help="client certificate (mutual TLS)")] = None,
    tls_key: Annotated[Optional[str], typer.Option("--tls-key", help="client certificate's key (mutual TLS)")] = None,
) -> None:
    """Ask a service's standard gRPC health check (grpc.health.v1); exit 0 when SERVING, else one line and 1.
    Container health checks run it."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from copl_common.tls import channel_credentials
    try:
        channel = (grpc.secure_channel(target, channel_credentials(tls_ca, tls_cert or "", tls_key or ""))
                   if tls_ca else grpc.insecure_channel(target))
    except ValueError as exc:   # an unreadable certificate file
        _fail(str(exc))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        except grpc.RpcError as exc:
            _fail(f"{target}: {exc.code().name} {exc.details() or ''}".strip())
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        _fail(f"{target}: {status}")
    typer.echo(status)


def register(app: typer.Typer) -> None:
    serve_app = typer.Typer(help="Run one service (graph or reward).", no_args_is_help=True)
    serve_app.command("graph")(_with_setting_flags(serve_graph))
    serve_app.command("reward")(_with_setting_flags(serve_reward))
    app.add_typer(serve_app, name="serve")
    app.command("up")(_with_setting_flags(up))
    app.command("health")(health)
