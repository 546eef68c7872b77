"""`copl`: the command line. A thin layer: each command imports the heavy parts it needs when it runs,
so `copl --help` is instant and no command pays for another's imports.

Failures are one line on stderr, `error: ...`, and exit code 1 (bad input lines are listed before it,
one line each). Expected failures (bad input, an unreachable database, a broken release) are caught where
they happen and said in the user's terms; anything else is caught by `main` and printed the same way
(COPL_DEBUG=1 shows the traceback instead)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer

from copl_cli import client_commands

# Nothing may download weights at run time: Hugging Face loads resolve from local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

app = typer.Typer(help="CoPL: personalized reward models as services.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
db_app = typer.Typer(help="Preference-store schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")

DbOption = Annotated[Optional[str], typer.Option("--db", help="SQLAlchemy URL [env COPL_DB_URL; default: SQLite under COPL_HOME]")]


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {' '.join(str(message).split())}", fg=typer.colors.RED, err=True)  # one line, always
    raise typer.Exit(code)


def _database_error(url: str, exc: Exception) -> str:
    """What went wrong with the store at `url`, without its password or SQLAlchemy's SQL and links."""
    from sqlalchemy.engine import make_url
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: show it as given
        shown = url
    reason = getattr(exc, "orig", None) or exc
    return f"cannot use the preference store {shown}: {reason}"


def _print_errors(errors, limit: int, prefix: str = "") -> None:
    """Bad input lines on stderr, one each, at most `limit` of them."""
    for error in errors[:limit]:
        typer.echo(f"{prefix}{error}", err=True)
    if len(errors) > limit:
        typer.echo(f"... and {len(errors) - limit} more", err=True)


def _store(db: str | None, migrate: bool = True):
    from copl_common.settings import default_db_url
    from graph_service.store import PreferenceStore
    url = db or default_db_url()
    try:
        return PreferenceStore(url, migrate=migrate)
    except Exception as exc:  # bad URL, unreachable server: one clear line, not a traceback
        _fail(_database_error(url, exc))


@app.command()
def synth(
    family: Annotated[str, typer.Option(help="uf-p (UltraFeedback-P-like presets) or styles (trainer/synth_styles.py)")] = "uf-p",
    preset: Annotated[str, typer.Option(help="uf-p: uf-p-2 (helpfulness, honesty; 8 pairs) or uf-p-4 (4 types; 16 pairs)")] = "uf-p-4",
    avg: Annotated[bool, typer.Option("--avg", help="uf-p: AVG mode, context size uniform in 1..2n-1")] = False,
    users: Annotated[int, typer.Option(min=1, help="number of users")] = 1000,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same files)")] = 0,
    unseen_fraction: Annotated[Optional[float], typer.Option(
        min=0.0, max=0.9, help="share of users who arrive after training [default: uf-p 0.1, styles 0.2]")] = None,
    non_controversial_fraction: Annotated[float, typer.Option(
        min=0.0, max=0.9, help="uf-p: share of each user's pairs that no two types disagree on (controversial: false)")] = 0.0,
    types: Annotated[int, typer.Option(min=2, help="styles: user types")] = 3,
    pairs: Annotated[int, typer.Option(min=1, help="styles: context pairs per user")] = 8,
    prompts: Annotated[Optional[int], typer.Option(min=3, help="styles: prompts, train + test [default: from the data size]")] = None,
    responses_per_prompt: Annotated[int, typer.Option(min=2, help="styles: responses per prompt")] = 6,
    noise: Annotated[float, typer.Option(min=0.0, max=0.49, help="styles: probability a context label is flipped")] = 0.05,
    one_attribute: Annotated[bool, typer.Option("--one-attribute", help="styles: each type weighs one attribute (default: mixed signs and zeros)")] = False,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("data/uf-p-4"),
):
    """Write a synthetic dataset (train_seen / train_unseen / test JSONL): UltraFeedback-P-like or styles."""
    try:
        if family == "uf-p":
            from trainer.synth import SynthConfig, generate, write
            dataset = generate(SynthConfig(preset=preset, avg=avg, users=users, seed=seed,
                                           unseen_fraction=0.1 if unseen_fraction is None else unseen_fraction,
                                           non_controversial_fraction=non_controversial_fraction))
        elif family == "styles":
            from trainer.synth_styles import StylesConfig, generate, write
            dataset = generate(StylesConfig(
                users=users, types=types, pairs_per_user=pairs, prompts=prompts,
                responses_per_prompt=responses_per_prompt, noise=noise, mixed=not one_attribute, seed=seed,
                unseen_fraction=0.2 if unseen_fraction is None else unseen_fraction))
        else:
            raise ValueError(f"family must be uf-p or styles, got {family!r}")
    except ValueError as exc:
        _fail(str(exc))
    counts = write(dataset, out)
    typer.echo(json.dumps({"out": str(out), **counts}))


@app.command()
def ingest(
    files: Annotated[list[Path], typer.Argument(help="JSONL preference files")],
    db: DbOption = None,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="load the good lines, report the bad ones")] = False,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="records per transaction [default: 100000]")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
):
    """Load preference records idempotently (the same record twice is stored once)."""
    from sqlalchemy.exc import SQLAlchemyError

    from graph_service.ingest import InvalidInput, ingest_files
    from graph_service.store import DEFAULT_BATCH_SIZE
    store = _store(db)
    try:
        report = ingest_files(store, files, skip_invalid=skip_invalid, batch_size=batch_size or DEFAULT_BATCH_SIZE,
                              progress=progress)
    except FileNotFoundError as exc:
        _fail(str(exc))
    except SQLAlchemyError as exc:  # the store went away part way: whole batches only are stored, re-run to finish
        _fail(_database_error(store.url, exc) + " (batches stored so far are whole; re-running stores the rest)")
    except InvalidInput as exc:
        _print_errors(exc.errors, 100)
        _fail(f"{exc} (use --skip-invalid to load the valid lines)")
    finally:
        store.close()
    _print_errors(report.invalid, 100, prefix="skipped ")
    typer.echo(json.dumps({"valid": report.valid, "inserted": report.inserted,
                           "duplicates": report.duplicates, "invalid": len(report.invalid)}))


@app.command()
def stats(db: DbOption = None,
          as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False):
    """Counts in the preference store: users, prompts, responses, preferences."""
    from sqlalchemy.exc import SQLAlchemyError
    store = _store(db)
    try:
        counts = store.stats()
    except SQLAlchemyError as exc:
        _fail(_database_error(store.url, exc))
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps(counts))
    else:
        for name, n in counts.items():
            typer.echo(f"{name:12s} {n:>12,d}")


def _migrate(db: str | None, step, revision: str) -> None:
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from copl_common.settings import default_db_url
    store = _store(db, migrate=False)
    try:
        step(store, revision)
        typer.echo(f"schema at revision {store.schema_revision() or 'base (no tables)'}")
    except CommandError as exc:  # an unknown revision, or one on the wrong side of the current one
        _fail(f"cannot migrate to {revision!r}: {exc}")
    except SQLAlchemyError as exc:
        _fail(_database_error(db or default_db_url(), exc))
    finally:
        store.close()


@db_app.command("upgrade")
def db_upgrade(db: DbOption = None,
               revision: Annotated[str, typer.Option(help="target revision")] = "head"):
    """Create or upgrade the schema (ingest does this itself; this is for operators)."""
    _migrate(db, lambda store, rev: store.migrate(rev), revision)


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="target revision: an id, -1 for one step, base for none")],
                 db: DbOption = None,
                 yes: Annotated[bool, typer.Option("--yes", help="do not ask (downgrading can drop tables and data)")] = False):
    """Downgrade the schema to REVISION (base drops every table and the data in them)."""
    if not yes:
        try:
            confirmed = typer.confirm(f"Downgrade the schema to {revision!r}? Tables it drops lose their data.")
        except typer.Abort:  # no answer (stdin closed)
            confirmed = False
        if not confirmed:
            _fail("not confirmed; nothing changed (use --yes to skip the question)")
    _migrate(db, lambda store, rev: store.downgrade(rev), revision)


def _utc(moment: datetime | None) -> datetime | None:
    """A time from the command line: without a zone it is UTC."""
    return moment.replace(tzinfo=timezone.utc) if moment and moment.tzinfo is None else moment


RegistryOption = Annotated[Optional[Path], typer.Option("--registry", help="release registry [env COPL_REGISTRY; default: COPL_HOME/registry]")]


def _registry(path: Path | None):
    from copl_common.registry import Registry
    from copl_common.settings import default_registry
    return Registry(path or default_registry())


def _release(registry, release_id: str | None):
    from copl_common.registry import RegistryError
    try:
        release = registry.get(release_id) if release_id else registry.current()
    except RegistryError as exc:
        _fail(str(exc))
    if release is None:
        _fail(f"no current release in {registry.root}: run `copl train` first")
    return release


MaxRegressionOption = Annotated[float, typer.Option(
    min=0.0, help="quality gate: how much lower than the current release's held-out report accuracy a new "
                  "release's may be and still become current")]


@app.command()
def train(
    db: DbOption = None,
    registry: RegistryOption = None,
    profile: Annotated[str, typer.Option(help="tiny (tests) | small (CPU accuracy runs) | content (small with the content-aware GNN) | paper (reference sizes, GPU)")] = "small",
    until: Annotated[Optional[datetime], typer.Option(help="train on preferences stored up to this time (UTC)")] = None,
    baseline: Annotated[bool, typer.Option("--baseline", help="train the non-personalized baseline (one LoRA, no user input)")] = False,
    device: Annotated[Optional[str], typer.Option(help="reward-model device: auto | cpu | cuda (default: auto)")] = None,
    no_switch: Annotated[bool, typer.Option("--no-switch", help="publish without making the release current")] = False,
    max_regression: MaxRegressionOption = 0.02,
    force: Annotated[bool, typer.Option("--force", help="make the release current even if the quality gate rejects it")] = False,
    reward_max_steps: Annotated[Optional[int], typer.Option(min=1, help="smoke runs: at most this many reward-model steps")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="run the stages on a private Ray started in this process")] = False,
    ray_address: Annotated[Optional[str], typer.Option(help="run the stages on this Ray cluster (auto: the one of a Ray job)")] = None,
    ray_cpus: Annotated[Optional[int], typer.Option(min=1, help="CPUs of the in-process Ray (default: all)")] = None,
    gnn_cpus: Annotated[float, typer.Option(min=0.01, help="CPUs of the GNN's Ray task")] = 1.0,
    reward_workers: Annotated[int, typer.Option(min=1, help="Ray Train workers for the reward model (>1: data-parallel)")] = 1,
    use_gpu: Annotated[bool, typer.Option("--use-gpu", help="one GPU per Ray Train worker")] = False,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
):
    """Retrain the GNN and the reward model, publish them as one release, print its id. The release becomes
    current if the quality gate accepts it (README: "Retraining with Ray")."""
    from sqlalchemy.exc import SQLAlchemyError

    from copl_common.registry import RegistryError
    from copl_common.settings import default_db_url
    url = db or default_db_url()
    _store(url).close()  # an unreachable or unusable store fails here, in one line, before the heavy imports
    from safetensors import SafetensorError

    from trainer.pipeline import TrainRequest, train_release
    from trainer.profiles import PROFILE_NAMES
    from trainer.run_lock import RunInProgress
    if profile not in PROFILE_NAMES:
        _fail(f"unknown profile {profile!r}: choose one of {', '.join(PROFILE_NAMES)}")
    reg = _registry(registry)
    request = TrainRequest(db_url=url, registry=reg.root, profile=profile, until=_utc(until),
                           personalized=not baseline, device=device, make_current=not no_switch,
                           max_regression=max_regression, force=force, reward_max_steps=reward_max_steps,
                           progress=progress)
    try:
        if ray or ray_address:
            from trainer.ray_stages import RaySettings, train_release_on_ray
            release = train_release_on_ray(request, ray_address, RaySettings(
                num_cpus=ray_cpus, gnn_num_cpus=gnn_cpus, reward_workers=reward_workers, use_gpu=use_gpu))
        else:
            release = train_release(request)
    except (ValueError, RegistryError, RunInProgress) as exc:  # empty store, bad settings, another run, ...
        _fail(str(exc))
    except SQLAlchemyError as exc:  # the store went away while training
        _fail(_database_error(url, exc))
    except (OSError, SafetensorError) as exc:  # the registry's disk full or read-only; the staging directory is gone
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        _fail(f"cannot write the release into {reg.root}: {reason} (the current release is unchanged)")
    metrics = release.manifest["metrics"]
    part = metrics["holdout"]
    if metrics["report_accuracy"] is None:  # too few users with pairs to hold out (README: awkward stores)
        typer.echo(f"no held-out report pairs ({part['selection_pairs']} selection pairs): held-out accuracy "
                   f"not measured; {metrics['seconds']:.0f}s", err=True)
    else:
        typer.echo(f"held-out report part ({part['report_pairs']} pairs of {part['report_users']} users, unseen by "
                   f"training and early stopping): reward model accuracy {metrics['report_accuracy']:.3f}, "
                   f"GNN accuracy {metrics['gnn']['report_accuracy']:.3f}; {metrics['seconds']:.0f}s", err=True)
    status = reg.status(release.id)
    if status is not None:
        outcome = ("current (forced past the quality gate)" if status["forced"] else
                   "current" if status["accepted"] else "NOT current (rejected by the quality gate; --force overrides)")
        typer.echo(f"release {release.id} is {outcome}: {status['reason']}", err=True)
    typer.echo(release.id)


@app.command("eval")
def evaluate(
    test_file: Annotated[Path, typer.Argument(help="JSONL test pairs (e.g. DATASET/test.jsonl)")],
    db: DbOption = None,
    registry: RegistryOption = None,
    release: Annotated[Optional[str], typer.Option(help="release id (default: the current one)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="pairs per forward pass")] = 64,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda")] = None,
    as_of: Annotated[Optional[datetime], typer.Option(
        "--as-of", help="unseen users' context: pairs stored up to this time (UTC) [default: now]")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    target: client_commands.TargetOption = None,
    token_file: client_commands.TokenFileOption = None,
    tls_ca: client_commands.TlsCaOption = None,
    tls_cert: client_commands.TlsCertOption = None,
    tls_key: client_commands.TlsKeyOption = None,
):
    """Score held-out pairs with a release, in-process or through a running reward service (--target);
    print accuracy overall, seen/unseen, by group."""
    from sqlalchemy.exc import SQLAlchemyError

    from copl_common.settings import default_db_url
    from graph_service.ingest import InvalidInput, read_valid_records
    try:
        records = read_valid_records([test_file])
    except FileNotFoundError as exc:
        _fail(str(exc))
    except InvalidInput as exc:
        _print_errors(exc.errors, 20)
        _fail(f"{len(exc.errors)} invalid line(s) in {test_file}")
    if not records:
        _fail(f"no test pairs in {test_file}")
    if target:
        if as_of is not None:
            _fail("--as-of applies to in-process evaluation; a running graph service answers as of now")
        with client_commands.make_client(target, token_file, tls_ca, tls_cert, tls_key) as client:
            metrics = client_commands.evaluate_remote(records, client, progress=progress)
    else:
        from trainer.evaluate import evaluate_release
        rel = _release(_registry(registry), release)
        store = _store(db)
        try:
            metrics = evaluate_release(rel, records, store, batch_size=batch_size, device=device, progress=progress,
                                       as_of=_utc(as_of))
        except ValueError as exc:  # a release that does not load (ReleaseUnusable), an as-of before the release
            _fail(str(exc))
        except SQLAlchemyError as exc:
            _fail(_database_error(db or default_db_url(), exc))
        finally:
            store.close()
    if as_json:
        typer.echo(json.dumps(metrics))
        return
    typer.echo(f"release {metrics['release']}: {metrics['n_pairs']} pairs, accuracy {metrics['accuracy']:.4f}")
    for name in ("seen", "unseen"):
        part = metrics[name]
        if part["n_pairs"]:
            typer.echo(f"  {name:8s} {part['n_pairs']:>7d} pairs  accuracy {part['accuracy']:.4f}")
    for group, part in metrics["by_group"].items():
        typer.echo(f"  group {group:24s} {part['n_pairs']:>7d} pairs  accuracy {part['accuracy']:.4f}")


releases_app = typer.Typer(help="Published releases (GNN + reward model).", no_args_is_help=True)
app.add_typer(releases_app, name="releases")


def _release_status(reg, release_id: str, current: str | None) -> tuple[str, str]:
    """(status, reason): current | accepted | rejected | published (nobody judged it: --no-switch, or a run
    that stopped between publishing and the gate)."""
    decision = reg.status(release_id) or {}
    if release_id == current:
        return "current", decision.get("reason", "")
    return decision.get("status", "published"), decision.get("reason", "")


@releases_app.command("list")
def releases_list(registry: RegistryOption = None,
                  as_json: Annotated[bool, typer.Option("--json", help="print one JSON object a line")] = False):
    """Every release, oldest first: id, time, data snapshot, held-out report accuracy, status (current,
    accepted, rejected with the reason). A directory that is not a usable release is named on stderr (and
    the exit code is 1) after the good ones are listed."""
    from copl_common.registry import RegistryError
    reg = _registry(registry)
    current = reg.current_id()
    releases, broken = reg.scan()
    for rel in releases:
        m = rel.manifest
        try:
            status, reason = _release_status(reg, rel.id, current)
        except RegistryError as exc:
            status, reason = "unknown", str(exc)
        row = {"id": rel.id, "current": rel.id == current, "created_at": rel.created_at,
               "snapshot_time": m.get("snapshot_time"), "profile": m.get("profile"),
               "users": m.get("data", {}).get("users"), "preferences": m.get("data", {}).get("preferences"),
               "report_accuracy": m.get("metrics", {}).get("report_accuracy"), "status": status, "reason": reason}
        accuracy = "-" if row["report_accuracy"] is None else f"{row['report_accuracy']:.4f}"
        typer.echo(json.dumps(row) if as_json else
                   f"{'*' if row['current'] else ' '} {rel.id}  {row['created_at']}  snapshot={row['snapshot_time']}  "
                   f"prefs={row['preferences']}  report_acc={accuracy}  {status}"
                   + (f" ({reason})" if status == "rejected" else ""))
    for bad in broken:
        typer.secho(f"error: {' '.join(bad.reason.split())}", fg=typer.colors.RED, err=True)
    if broken:
        raise typer.Exit(1)


@releases_app.command("rollback")
def releases_rollback(release_id: Annotated[str, typer.Argument(help="the release to make current")],
                      registry: RegistryOption = None,
                      force: Annotated[bool, typer.Option("--force", help="also a release the quality gate rejected")] = False):
    """Point CURRENT at another (older) release; running services swap to it."""
    from copl_common.registry import RegistryError
    reg = _registry(registry)
    try:
        status = reg.status(release_id)
        if status and status["status"] == "rejected" and not force:
            _fail(f"release {release_id} was rejected by the quality gate ({status['reason']}); --force makes it "
                  "current anyway")
        reg.set_current(release_id)
    except RegistryError as exc:
        _fail(str(exc))
    typer.echo(release_id)


DEMO_MARKER = ".copl-demo"
DEMO_USERS = 200   # `make demo` in a few minutes on 2 cores (README "Quick start")
# tiny's own 40 reward-model steps are a smoke test's: on uf-p-4 (four user types) they learn one type and stay
# below the majority bound; 300 learn three of the four (README, Quick start) in about 6 minutes of demo.
DEMO_TINY_REWARD_STEPS = 300
DEMO_ENTRIES = ("dataset", "registry", "copl.db", "copl.db-wal", "copl.db-shm", "logs", "write-token")  # what a demo writes


def _demo_workdir(workdir: Path) -> None:
    """Empty WORKDIR of an earlier demo's files, or refuse: only a directory the demo marked as its own
    is cleaned, and then only of the entries the demo writes (`--workdir .` must not delete a checkout)."""
    if workdir.exists() and not workdir.is_dir():
        _fail(f"--workdir {workdir} is not a directory")
    if workdir.is_dir() and any(workdir.iterdir()):
        if not (workdir / DEMO_MARKER).is_file():
            _fail(f"--workdir {workdir} is not empty and was not made by `copl demo` (it has no {DEMO_MARKER}); "
                  "nothing was deleted: choose a new or empty directory")
        for name in DEMO_ENTRIES:
            entry = workdir / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / DEMO_MARKER).write_text(f"made by `copl demo`; a later demo may delete {', '.join(DEMO_ENTRIES)} here\n")


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where the demo's dataset, SQLite store, registry and logs go")] = Path("data/demo"),
    preset: Annotated[str, typer.Option(help="uf-p-2 | uf-p-4")] = "uf-p-4",
    users: Annotated[int, typer.Option(min=8, help="synthetic users")] = DEMO_USERS,
    profile: Annotated[str, typer.Option(help="training profile (tiny | small | paper)")] = "tiny",
    reward_steps: Annotated[Optional[int], typer.Option(min=2, help="reward-model steps instead of the profile's "
                                                      f"(default: {DEMO_TINY_REWARD_STEPS} with the tiny profile)")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    in_process: Annotated[bool, typer.Option("--in-process", help="no services, no ports: train and evaluate in this process")] = False,
):
    """The whole system on the embedded default, in WORKDIR: synth -> ingest -> train -> start both services
    on loopback -> later users through AddPreferences -> score held-out pairs through gRPC -> swap in a second
    release under client traffic -> plots. WORKDIR must be new, empty, or an earlier demo's. Ctrl-C stops
    everything it started (exit 130)."""
    from trainer.synth import SynthConfig
    try:
        SynthConfig(preset=preset, users=users, seed=seed)
    except ValueError as exc:
        _fail(str(exc))
    if reward_steps is None and profile == "tiny":
        reward_steps = DEMO_TINY_REWARD_STEPS
    _demo_workdir(workdir)  # a demo starts from nothing, so each run shows the same path
    signal.signal(signal.SIGTERM, _interrupt)   # `kill` and `timeout` stop it as Ctrl-C does: children first
    try:
        if in_process:
            _demo_in_process(workdir, preset, users, profile, seed, reward_steps)
        else:
            from copl_cli.demo import run
            run(workdir, preset, users, profile, seed, reward_steps, fail=_fail)
    except KeyboardInterrupt:   # everything it started is stopped by now (the stages clean up as they unwind)
        typer.secho("interrupted: the demo stopped everything it started", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None


def _demo_in_process(workdir: Path, preset: str, users: int, profile: str, seed: int, reward_steps: int | None) -> None:
    """`copl demo --in-process`: the same data and training, evaluated in this process (no ports needed)."""
    from graph_service.ingest import ingest_files, read_valid_records
    from graph_service.store import PreferenceStore
    from trainer.evaluate import evaluate_release
    from trainer.pipeline import TrainRequest, train_release
    from trainer.synth import SynthConfig, generate, majority_bound, write
    data, registry = workdir / "dataset", workdir / "registry"
    url = f"sqlite:///{(workdir / 'copl.db').resolve()}"

    def step(text: str) -> None:
        typer.secho(text, bold=True)

    step(f"1/5 synth: {preset}, {users} users, seed {seed} -> {data}")
    dataset = generate(SynthConfig(preset=preset, users=users, seed=seed))
    typer.echo(f"    {json.dumps(write(dataset, data))}")
    with PreferenceStore(url) as store:
        step(f"2/5 ingest the seen users into {url}")
        report = ingest_files(store, [data / "train_seen.jsonl"])
        again = ingest_files(store, [data / "train_seen.jsonl"], progress=False)
        typer.echo(f"    inserted {report.inserted}; again: inserted {again.inserted}, duplicates {again.duplicates}")
        typer.echo(f"    {json.dumps(store.stats())}")

        step(f"3/5 train: GNN -> user embeddings -> MoLE reward model (profile {profile}) -> release")
        release = train_release(TrainRequest(db_url=url, registry=registry, profile=profile,
                                             reward_max_steps=reward_steps))
        typer.echo(f"    release {release.id} in {release.path}")

        step("4/5 ingest the users who arrived after training (they get adapted embeddings, no training)")
        ingest_files(store, [data / "train_unseen.jsonl"], progress=False)

        step("5/5 eval on held-out prompts")
        metrics = evaluate_release(release, read_valid_records([data / "test.jsonl"]), store)
    bound = majority_bound(dataset.test)
    typer.echo(f"    accuracy {metrics['accuracy']:.3f}: seen users {metrics['seen']['accuracy']:.3f}, "
               f"unseen users {metrics['unseen']['accuracy']:.3f}; best non-personalized (majority bound) {bound:.3f}")
    for group, part in metrics["by_group"].items():
        typer.echo(f"    {group:24s} {part['accuracy']:.3f}")
    typer.secho(f"demo done. Plots: {release.path / 'plots'}", fg=typer.colors.GREEN)


from copl_cli import ray_commands, services  # noqa: E402  (serve, up; retrain, jobs, schedule: modules of their own)

services.register(app)
ray_commands.register(app)
client_commands.register(app)


def main() -> None:
    """The console entry point (through copl_cli.launcher): the app, with a last line of defence."""
    try:
        app(prog_name="copl")
    except Exception as exc:  # a failure no command anticipated: still one line, never a traceback
        if os.environ.get("COPL_DEBUG"):
            raise
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        typer.secho(f"error: unexpected {message} (COPL_DEBUG=1 shows the traceback)", fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
