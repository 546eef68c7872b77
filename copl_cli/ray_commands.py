"""`copl retrain`, `copl jobs status|stop|logs ID`, `copl schedule`: retraining as Ray jobs and on a schedule.

`copl retrain --address http://HOST:PORT` submits `copl train --ray-address auto ...` as a Ray job (the job's
driver runs on the cluster's head node, whose environment must have copl installed), prints the job id, and
follows the job's logs until it ends: exit 0 when it succeeded, 1 otherwise. Ctrl-C stops following, not the job.
"""
from __future__ import annotations

import asyncio
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

AddressOption = Annotated[str, typer.Option(
    "--address", envvar="RAY_API_SERVER_ADDRESS",
    help="the Ray cluster's job server (dashboard), e.g. http://127.0.0.1:8265")]
JobIdArgument = Annotated[str, typer.Argument(help="job id, as `copl retrain` printed it")]
FINISHED = ("SUCCEEDED", "FAILED", "STOPPED")


def _fail(message: str) -> None:
    typer.secho(f"error: {' '.join(str(message).split())}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _client(address: str):
    from trainer.ray_runtime import ensure_auth_mode
    ensure_auth_mode()  # before ray reads it: client and cluster must agree
    from ray.job_submission import JobSubmissionClient
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        _fail(f"cannot reach the Ray job server at {address}: {exc}")


def _train_flags(db: str | None, registry: Path | None, profile: str, max_regression: float, force: bool,
                 reward_max_steps: int | None) -> list[str]:
    """`copl train` flags shared by `retrain` and `schedule`."""
    from copl_common.settings import default_db_url, default_registry
    flags = ["--db", db or default_db_url(), "--registry", str((registry or default_registry()).resolve()),
             "--profile", profile, "--max-regression", str(max_regression), "--no-progress"]
    if force:
        flags.append("--force")
    if reward_max_steps is not None:
        flags += ["--reward-max-steps", str(reward_max_steps)]
    return flags


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def retrain(
    address: AddressOption,
    db: Annotated[Optional[str], typer.Option("--db", help="the preference store's URL as the cluster reaches it")] = None,
    registry: Annotated[Optional[Path], typer.Option("--registry", help="release registry on a filesystem the cluster shares")] = None,
    profile: Annotated[str, typer.Option(help="tiny | small | paper")] = "small",
    max_regression: Annotated[float, typer.Option(min=0.0, help="quality gate (see `copl train --help`)")] = 0.02,
    force: Annotated[bool, typer.Option("--force", help="make the release current even if the gate rejects it")] = False,
    reward_max_steps: Annotated[Optional[int], typer.Option(min=1, help="smoke runs: at most this many reward-model steps")] = None,
    gnn_cpus: Annotated[float, typer.Option(min=0.01, help="CPUs of the GNN's Ray task")] = 1.0,
    reward_workers: Annotated[int, typer.Option(min=1, help="Ray Train workers for the reward model")] = 1,
    use_gpu: Annotated[bool, typer.Option("--use-gpu", help="one GPU per Ray Train worker")] = False,
    env: Annotated[Optional[list[str]], typer.Option(help="KEY=VALUE for the job's environment (repeatable)")] = None,
    follow: Annotated[bool, typer.Option(help="follow the job's logs until it ends")] = True,
):
    """Submit a retraining run to a Ray cluster as a Ray job; print the job id and follow its logs."""
    from trainer.ray_runtime import ensure_auth_mode
    env_vars = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": ensure_auth_mode()}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--env takes KEY=VALUE, got {item!r}")
        env_vars[key] = value
    command = ["copl", "train", *_train_flags(db, registry, profile, max_regression, force, reward_max_steps),
               "--ray-address", "auto", "--gnn-cpus", str(gnn_cpus), "--reward-workers", str(reward_workers)]
    if use_gpu:
        command.append("--use-gpu")
    client = _client(address)
    try:
        job_id = client.submit_job(entrypoint=shlex.join(command), runtime_env={"env_vars": env_vars})
    except RuntimeError as exc:  # the job server refused it
        _fail(f"the Ray job server at {address} refused the job: {exc}")
    typer.echo(job_id)
    if not follow:
        return
    try:
        asyncio.run(_follow(client, job_id))
        status = client.get_job_status(job_id)
        while str(status.value) not in FINISHED:  # the log stream can close a moment before the status is final
            time.sleep(0.5)
            status = client.get_job_status(job_id)
    except KeyboardInterrupt:
        typer.echo(f"stopped following; job {job_id} keeps running (`copl jobs stop {job_id}` stops it)", err=True)
        raise typer.Exit(130)
    if str(status.value) != "SUCCEEDED":
        info = client.get_job_info(job_id)
        _fail(f"job {job_id} {status.value}: {info.message or 'see its logs'}")
    typer.echo(f"job {job_id} SUCCEEDED", err=True)


def jobs_status(job_id: JobIdArgument, address: AddressOption = "http://127.0.0.1:8265"):
    """A job's status and message."""
    info = _job_call(address, lambda c: c.get_job_info(job_id), job_id)
    typer.echo(f"{job_id} {info.status.value}" + (f": {info.message}" if info.message else ""))


def jobs_stop(job_id: JobIdArgument, address: AddressOption = "http://127.0.0.1:8265"):
    """Stop a running job (its staging directory is removed; the current release stays current)."""
    stopped = _job_call(address, lambda c: c.stop_job(job_id), job_id)
    typer.echo(f"{job_id} {'stop requested' if stopped else 'was not running'}")


def jobs_logs(job_id: JobIdArgument, address: AddressOption = "http://127.0.0.1:8265"):
    """A job's logs so far."""
    typer.echo(_job_call(address, lambda c: c.get_job_logs(job_id), job_id), nl=False)


def _job_call(address: str, call, job_id: str):
    client = _client(address)
    try:
        return call(client)
    except RuntimeError as exc:  # unknown job id, among others
        _fail(f"job {job_id}: {exc}")


def schedule(
    every: Annotated[Optional[str], typer.Option(help="retrain when the current release is older than this (90s, 15m, 2h, 1d)")] = None,
    new_preferences: Annotated[Optional[int], typer.Option(min=1, help="retrain once this many preferences arrived since the current release's snapshot")] = None,
    check_every: Annotated[str, typer.Option(help="how often to look")] = "30s",
    db: Annotated[Optional[str], typer.Option("--db", help="SQLAlchemy URL [env COPL_DB_URL]")] = None,
    registry: Annotated[Optional[Path], typer.Option("--registry", help="release registry [env COPL_REGISTRY]")] = None,
    profile: Annotated[str, typer.Option(help="tiny | small | paper")] = "small",
    max_regression: Annotated[float, typer.Option(min=0.0, help="quality gate (see `copl train --help`)")] = 0.02,
    reward_max_steps: Annotated[Optional[int], typer.Option(min=1, help="smoke runs: at most this many reward-model steps")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="each run on a private in-process Ray")] = False,
    ray_address: Annotated[Optional[str], typer.Option(help="each run's stages on this Ray cluster")] = None,
    once: Annotated[bool, typer.Option("--once", help="decide (and run) once, then exit")] = False,
):
    """Retrain every T or after N new preferences; one run at a time; one log line per decision."""
    from copl_common.registry import Registry
    from copl_common.settings import default_db_url, default_registry
    from graph_service.store import PreferenceStore
    from trainer.run_lock import lock_holder
    from trainer.schedule import Policy, decide, log_line, parse_duration
    try:
        policy = Policy(parse_duration(every) if every else None, new_preferences)
        interval = parse_duration(check_every)
    except ValueError as exc:
        _fail(str(exc))
    reg = Registry(registry or default_registry())
    command = [sys.executable, "-m", "copl_cli.main", "train",
               *_train_flags(db, reg.root, profile, max_regression, False, reward_max_steps)]
    if ray_address:
        command += ["--ray-address", ray_address]
    elif ray:
        command.append("--ray")

    def log(decision: str, reason: str) -> None:
        typer.echo(log_line(decision, reason))

    child: subprocess.Popen | None = None
    try:
        with PreferenceStore(db or default_db_url()) as store:
            while True:
                holder = lock_holder(reg.root)
                if holder:
                    log("skip", f"a run is in progress: {holder}")
                else:
                    decision = decide(policy, reg, store.preferences_stored_since)
                    log("run" if decision.run else "wait", decision.reason)
                    if decision.run:
                        child = subprocess.Popen(command)
                        code = child.wait()
                        child = None
                        log("done" if code == 0 else "failed", f"copl train exited {code}; current release "
                                                               f"{reg.current_id()}")
                if once:
                    return
                time.sleep(interval)
    except KeyboardInterrupt:
        if child is not None and child.poll() is None:  # let the run clean up its staging directory
            child.send_signal(signal.SIGINT)
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
        log("stop", "interrupted")


def register(app: typer.Typer) -> None:
    app.command("retrain")(retrain)
    jobs_app = typer.Typer(help="Ray jobs that `copl retrain` submitted.", no_args_is_help=True)
    jobs_app.command("status")(jobs_status)
    jobs_app.command("stop")(jobs_stop)
    jobs_app.command("logs")(jobs_logs)
    app.add_typer(jobs_app, name="jobs")
    app.command("schedule")(schedule)
