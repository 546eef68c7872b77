"""`copl score` and `copl eval --target`: the command line through the client library (copl_client).

Connection options are shared: `--target` (repeat it for several reward-service replicas), `--token-file`
(else $COPL_TOKEN: a token never goes on the command line, where `ps` shows it) and the TLS files.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer

TargetOption = Annotated[Optional[list[str]], typer.Option(
    "--target", help="reward service, grpc://HOST:PORT or grpcs://HOST:PORT; repeat for replicas")]
TokenFileOption = Annotated[Optional[Path], typer.Option(
    "--token-file", help="file holding the bearer token (default: $COPL_TOKEN)")]
TlsCaOption = Annotated[Optional[Path], typer.Option("--tls-ca", help="PEM root certificates to trust (TLS)")]
TlsCertOption = Annotated[Optional[Path], typer.Option("--tls-cert", help="client certificate (mutual TLS)")]
TlsKeyOption = Annotated[Optional[Path], typer.Option("--tls-key", help="client certificate's key (mutual TLS)")]
ConcurrencyOption = Annotated[int, typer.Option(min=1, help="requests in flight at most")]


def make_client(targets: Sequence[str], token_file: Path | None = None, tls_ca: Path | None = None,
                tls_cert: Path | None = None, tls_key: Path | None = None):
    """A `copl_client.Client` for the reward service(s), or a one-line error."""
    from copl_cli.main import _fail
    from copl_client import Client, TLSConfig
    try:
        token = token_file.read_text().strip() if token_file else None
        tls = TLSConfig(ca=tls_ca, cert=tls_cert, key=tls_key) if (tls_ca or tls_cert or tls_key) else None
        return Client(reward=list(targets), token=token, tls=tls)
    except (OSError, ValueError) as exc:   # unreadable file, malformed target, half a client certificate
        _fail(str(exc))


def evaluate_remote(records, client, concurrency: int = 64, progress: bool = True) -> dict:
    """`copl eval`'s metrics, scoring each pair through the reward service: r(chosen) vs r(rejected) of one
    request per pair; a user is seen when the service's embedding of them is TRAINED."""
    from copl_cli.main import _fail, _print_errors
    from copl_client import CoplError, ScoreItem
    from trainer.metrics import pair_metrics
    items = [ScoreItem(user_id=r.user_id, prompt=r.prompt, responses=[r.chosen, r.rejected]) for r in records]
    as_of = datetime.now(timezone.utc)  # the graph service adapts unseen users from every pair stored when asked
    try:
        results = client.score_many(items, concurrency=concurrency, progress=progress)
    except CoplError as exc:
        _fail(f"scoring through the reward service failed: {exc}")
    if failed := [f"pair {r.index + 1}: {r.error.code}: {r.error.message}" for r in results if not r.ok]:
        _print_errors(failed, 20)
        _fail(f"{len(failed)} of {len(results)} pairs could not be scored")
    releases = sorted({r.release_id for r in results})
    if len(releases) > 1:
        _fail(f"the served release changed during the evaluation ({', '.join(releases)}): run it again")
    user_sources = {}
    for record, result in zip(records, results):
        user_sources.setdefault(record.user_id, result.embedding_source.value)
    return pair_metrics(releases[0], records, [r.scores[0] > r.scores[1] for r in results],
                        [r.embedding_source.value == "TRAINED" for r in results], list(user_sources.values()), as_of)


def score(
    input_file: Annotated[Path, typer.Argument(help='JSONL rows {"id"?, "user_id" | "embedding", "prompt", "responses"}')],
    output_file: Annotated[Path, typer.Argument(help="JSONL results, one line per row, in input order")],
    target: TargetOption = None,
    token_file: TokenFileOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    concurrency: ConcurrencyOption = 64,
    max_stall: Annotated[float, typer.Option(min=1, help="give up after this many seconds with no reply")] = 300.0,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
):
    """Score a JSONL file through the reward service. Resumable: run it again after a failure and it
    scores only the rows not yet in OUTPUT; no row is ever written twice."""
    from copl_cli.main import _fail, _print_errors
    from copl_client import CoplError, JobFileError
    if not target:
        _fail("--target is required: the reward service, e.g. grpc://127.0.0.1:50052")
    client = make_client(target, token_file, tls_ca, tls_cert, tls_key)
    try:
        summary = client.score_file(input_file, output_file, concurrency=concurrency, progress=progress,
                                    max_stall_s=max_stall)
    except JobFileError as exc:
        _print_errors(exc.errors, 20)
        _fail(str(exc))
    except CoplError as exc:
        _fail(f"{exc} (the rows scored so far are in {output_file}: run the same command again to resume)")
    finally:
        client.close()
    if summary.failed:
        typer.echo(f"{summary.failed} row(s) failed: their lines in {output_file} carry the error", err=True)
    typer.echo(json.dumps(summary.__dict__))


def register(app: typer.Typer) -> None:
    app.command()(score)
