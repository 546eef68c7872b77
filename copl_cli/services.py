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
import subprocess
import sys
import time
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


def up(flags: dict[str, Any]) -> None:
    """Run the graph and reward services together on loopback; Ctrl-C or SIGTERM stops both."""
    from copl_common.auth import load_write_token
    from copl_common.service_settings import env_name, setting_fields

    settings = _settings(flags)
    if settings.graph_port == 0 and not settings.graph_target:
        _fail("copl up needs a fixed --graph-port (the reward service must know where to find it)")
    if not settings.auth_file:
        try:
            load_write_token(settings.token_path)   # created once here, not raced by the two children
        except (OSError, ValueError) as exc:
            _fail(str(exc))
    env = dict(os.environ)
    for name, *_ in setting_fields():   # the children get exactly the parent's resolved settings
        env[env_name(name)] = str(getattr(settings, name))
    env["COPL_DB_URL"] = settings.store_url
    env["COPL_REGISTRY"] = str(settings.registry_path)
    env["COPL_TOKEN_FILE"] = str(settings.token_path)
    command = [sys.executable, "-m", "copl_cli.main", "serve"]
    children = {kind: subprocess.Popen([*command, kind], env=env) for kind in ("graph", "reward")}
    tokens = f"tokens in {settings.auth_file}" if settings.auth_file else f"write token in {settings.token_path}"
    typer.echo(f"graph service on {settings.host}:{settings.graph_port}, reward service on "
               f"{settings.host}:{settings.reward_port}; {tokens}; Ctrl-C stops both", err=True)

    stopping = False

    def stop(_signum=None, _frame=None) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    failed = None
    while not stopping and failed is None:
        failed = next((kind for kind, child in children.items() if child.poll() is not None), None)
        time.sleep(0.2)
    if failed is not None:
        stop()
    deadline = time.monotonic() + settings.shutdown_grace_s + 15
    for child in children.values():
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    if failed is not None:
        _fail(f"the {failed} service exited with status {children[failed].returncode}; stopped the other one")


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
