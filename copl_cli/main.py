"""`copl`: the command line. A thin layer: each command imports the heavy parts it needs when it runs,
so `copl --help` is instant and no command pays for another's imports."""
from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer

# Nothing may download weights at run time: Hugging Face loads resolve from local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

app = typer.Typer(help="CoPL: personalized reward models as services.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
db_app = typer.Typer(help="Preference-store schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")

DbOption = Annotated[Optional[str], typer.Option("--db", help="SQLAlchemy URL [env COPL_DB_URL; default: SQLite under COPL_HOME]")]


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


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
        _fail(f"cannot open the preference store {url}: {exc}")


@app.command()
def synth(
    preset: Annotated[str, typer.Option(help="uf-p-2 (helpfulness, honesty; 8 pairs) or uf-p-4 (4 types; 16 pairs)")] = "uf-p-4",
    avg: Annotated[bool, typer.Option("--avg", help="AVG mode: context size uniform in 1..2n-1")] = False,
    users: Annotated[int, typer.Option(min=1, help="number of users")] = 1000,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same files)")] = 0,
    unseen_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="share of users who arrive after training")] = 0.1,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("data/uf-p-4"),
):
    """Write an UltraFeedback-P-like synthetic dataset (train_seen / train_unseen / test JSONL)."""
    from trainer.synth import SynthConfig, generate, write
    try:
        config = SynthConfig(preset=preset, avg=avg, users=users, seed=seed, unseen_fraction=unseen_fraction)
    except ValueError as exc:
        _fail(str(exc))
    counts = write(generate(config), out)
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
    from graph_service.ingest import InvalidInput, ingest_files
    from graph_service.store import DEFAULT_BATCH_SIZE
    store = _store(db)
    try:
        report = ingest_files(store, files, skip_invalid=skip_invalid, batch_size=batch_size or DEFAULT_BATCH_SIZE,
                              progress=progress)
    except FileNotFoundError as exc:
        _fail(str(exc))
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
    store = _store(db)
    counts = store.stats()
    store.close()
    if as_json:
        typer.echo(json.dumps(counts))
    else:
        for name, n in counts.items():
            typer.echo(f"{name:12s} {n:>12,d}")


@db_app.command("upgrade")
def db_upgrade(db: DbOption = None,
               revision: Annotated[str, typer.Option(help="target revision")] = "head"):
    """Create or upgrade the schema (ingest does this itself; this is for operators)."""
    store = _store(db, migrate=False)
    store.migrate(revision)
    typer.echo(f"schema at revision {store.schema_revision()}")
    store.close()


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


@app.command()
def train(
    db: DbOption = None,
    registry: RegistryOption = None,
    profile: Annotated[str, typer.Option(help="tiny (tests) | small (CPU accuracy runs) | paper (reference sizes, GPU)")] = "small",
    until: Annotated[Optional[datetime], typer.Option(help="train on preferences stored up to this time (UTC)")] = None,
    baseline: Annotated[bool, typer.Option("--baseline", help="train the non-personalized baseline (one LoRA, no user input)")] = False,
    device: Annotated[Optional[str], typer.Option(help="reward-model device: auto | cpu | cuda (default: auto)")] = None,
    no_switch: Annotated[bool, typer.Option("--no-switch", help="publish without making the release current")] = False,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
):
    """Retrain the GNN and the reward model, publish them as one release, print its id."""
    from copl_common.settings import default_db_url
    from trainer.pipeline import TrainRequest, train_release
    from trainer.profiles import PROFILE_NAMES
    if profile not in PROFILE_NAMES:
        _fail(f"unknown profile {profile!r}: choose one of {', '.join(PROFILE_NAMES)}")
    reg = _registry(registry)
    request = TrainRequest(db_url=db or default_db_url(), registry=reg.root, profile=profile,
                           until=until.replace(tzinfo=timezone.utc) if until and until.tzinfo is None else until,
                           personalized=not baseline, device=device, make_current=not no_switch, progress=progress)
    try:
        release = train_release(request)
    except ValueError as exc:  # empty store, bad settings
        _fail(str(exc))
    metrics = release.manifest["metrics"]
    part = metrics["holdout"]
    if metrics["report_accuracy"] is None:  # too few users with pairs to hold out (README: awkward stores)
        typer.echo(f"no held-out report pairs ({part['selection_pairs']} selection pairs): held-out accuracy "
                   f"not measured; {metrics['seconds']:.0f}s", err=True)
    else:
        typer.echo(f"held-out report part ({part['report_pairs']} pairs of {part['report_users']} users, unseen by "
                   f"training and early stopping): reward model accuracy {metrics['report_accuracy']:.3f}, "
                   f"GNN accuracy {metrics['gnn']['report_accuracy']:.3f}; {metrics['seconds']:.0f}s", err=True)
    typer.echo(release.id)


@app.command("eval")
def evaluate(
    test_file: Annotated[Path, typer.Argument(help="JSONL test pairs (e.g. DATASET/test.jsonl)")],
    db: DbOption = None,
    registry: RegistryOption = None,
    release: Annotated[Optional[str], typer.Option(help="release id (default: the current one)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="pairs per forward pass")] = 64,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
):
    """Score held-out pairs in-process with a release; print accuracy overall, seen/unseen, by group."""
    from graph_service.ingest import InvalidInput, read_valid_records
    from trainer.evaluate import evaluate_release
    rel = _release(_registry(registry), release)
    try:
        records = read_valid_records([test_file])
    except FileNotFoundError as exc:
        _fail(str(exc))
    except InvalidInput as exc:
        _print_errors(exc.errors, 20)
        _fail(f"{len(exc.errors)} invalid line(s) in {test_file}")
    store = _store(db)
    try:
        metrics = evaluate_release(rel, records, store, batch_size=batch_size, device=device, progress=progress)
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


@releases_app.command("list")
def releases_list(registry: RegistryOption = None,
                  as_json: Annotated[bool, typer.Option("--json", help="print one JSON object a line")] = False):
    """Every release, oldest first; the current one is marked."""
    reg = _registry(registry)
    current = reg.current_id()
    for rel in reg.list():
        m = rel.manifest
        row = {"id": rel.id, "current": rel.id == current, "created_at": rel.created_at, "profile": m.get("profile"),
               "users": m.get("data", {}).get("users"),
               "report_accuracy": m.get("metrics", {}).get("report_accuracy")}
        typer.echo(json.dumps(row) if as_json else
                   f"{'*' if row['current'] else ' '} {rel.id}  {row['created_at']}  profile={row['profile']}  "
                   f"users={row['users']}  report_acc={row['report_accuracy']}")


@releases_app.command("rollback")
def releases_rollback(release_id: Annotated[str, typer.Argument(help="the release to make current")],
                      registry: RegistryOption = None):
    """Point CURRENT at another (older) release."""
    from copl_common.registry import RegistryError
    try:
        _registry(registry).set_current(release_id)
    except RegistryError as exc:
        _fail(str(exc))
    typer.echo(release_id)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where the demo's dataset, SQLite store and registry go")] = Path("data/demo"),
    preset: Annotated[str, typer.Option(help="uf-p-2 | uf-p-4")] = "uf-p-2",
    users: Annotated[int, typer.Option(min=8, help="synthetic users")] = 400,
    profile: Annotated[str, typer.Option(help="training profile (tiny | small | paper)")] = "tiny",
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
):
    """The whole path on the embedded default, in WORKDIR: synth -> ingest -> train -> ingest the
    users who arrive later -> eval on held-out prompts."""
    import shutil

    from graph_service.ingest import ingest_files, read_valid_records
    from graph_service.store import PreferenceStore
    from trainer.evaluate import evaluate_release
    from trainer.pipeline import TrainRequest, train_release
    from trainer.synth import SynthConfig, generate, majority_bound, write

    if workdir.exists():
        shutil.rmtree(workdir)  # a demo starts from nothing, so each run shows the same path
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
        release = train_release(TrainRequest(db_url=url, registry=registry, profile=profile))
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


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="copl")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
