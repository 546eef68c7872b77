"""`copl`: the command line. A thin layer: each command imports the heavy parts it needs when it runs,
so `copl --help` is instant and no command pays for another's imports."""
from __future__ import annotations

import json
import os
import sys
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
    batch_size: Annotated[int, typer.Option(min=1, help="records per transaction")] = 10_000,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
):
    """Load preference records idempotently (the same record twice is stored once)."""
    from graph_service.ingest import InvalidInput, ingest_files
    store = _store(db)
    try:
        report = ingest_files(store, files, skip_invalid=skip_invalid, batch_size=batch_size, progress=progress)
    except FileNotFoundError as exc:
        _fail(str(exc))
    except InvalidInput as exc:
        for error in exc.errors[:100]:
            typer.echo(str(error), err=True)
        if len(exc.errors) > 100:
            typer.echo(f"... and {len(exc.errors) - 100} more", err=True)
        _fail(f"{exc} (use --skip-invalid to load the valid lines)")
    finally:
        store.close()
    for error in report.invalid[:100]:
        typer.echo(f"skipped {error}", err=True)
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


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where the demo's dataset and SQLite store go")] = Path("data/demo"),
    users: Annotated[int, typer.Option(min=8, help="synthetic users")] = 400,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
):
    """The whole path on the embedded default: synth -> ingest -> stats, in WORKDIR."""
    import shutil

    from graph_service.ingest import ingest_files
    from graph_service.store import PreferenceStore
    from trainer.synth import SynthConfig, generate, write

    if workdir.exists():
        shutil.rmtree(workdir)  # a demo starts from nothing, so each run shows the same path
    data = workdir / "dataset"
    url = f"sqlite:///{(workdir / 'copl.db').resolve()}"

    typer.secho(f"1/3 synth: uf-p-4, {users} users, seed {seed} -> {data}", bold=True)
    counts = write(generate(SynthConfig(preset="uf-p-4", users=users, seed=seed)), data)
    typer.echo(f"    {json.dumps(counts)}")

    typer.secho(f"2/3 ingest: train_seen.jsonl into {url}", bold=True)
    with PreferenceStore(url) as store:
        report = ingest_files(store, [data / "train_seen.jsonl"])
        typer.echo(f"    inserted {report.inserted}, duplicates {report.duplicates}")
        again = ingest_files(store, [data / "train_seen.jsonl"], progress=False)
        typer.echo(f"    re-ingest is idempotent: inserted {again.inserted}, duplicates {again.duplicates}")

        typer.secho("3/3 stats", bold=True)
        typer.echo(f"    {json.dumps(store.stats())}")
    typer.secho("demo done: synth -> ingest -> stats on SQLite "
                "(training, serving and scoring join this path as they land)", fg=typer.colors.GREEN)


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="target revision ('base' drops every table)")],
                 db: DbOption = None):
    """Downgrade the schema to REVISION."""
    store = _store(db, migrate=False)
    store.downgrade(revision)
    typer.echo(f"schema at revision {store.schema_revision()}")
    store.close()


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="copl")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
