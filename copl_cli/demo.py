"""`copl demo`: the system as it runs in production, on one machine, through the services.

synth -> ingest the seen users into SQLite -> train a release (and the non-personalized baseline) -> start
the graph and reward services as child processes on free loopback ports -> the later users arrive through
`AddPreferences` -> every held-out pair scored through gRPC with the client -> the accuracy table -> a
second release published and swapped in while client threads keep scoring -> where the plots are.
Everything it starts is stopped when it ends, fails or is interrupted (the caller turns Ctrl-C into exit 130).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import typer

from copl_cli.swap_traffic import Probe, SwapTraffic
# The training stage: the pipeline of `copl train` with its stages on a private in-process Ray, as `copl train
# --ray` runs it (one Ray for both trainings: its start-up is paid once).
from trainer.ray_runtime import ray_session
from trainer.ray_stages import RaySettings, train_release_on_ray

STAGES = 9
RECORDS_PER_CALL = 2_000            # AddPreferences batches (the service takes up to 10,000)
SERVING_TIMEOUT_S = 300.0           # loading the backbone on 2 busy cores takes a while
STEADY_S, AFTER_SWAP_S = 3.0, 3.0   # traffic before the swap and after both services serve the new release


def _step(n: int, text: str) -> None:
    typer.secho(f"{n}/{STAGES} {text}", bold=True)


def _say(text: str) -> None:
    typer.echo(f"    {text}")


def _accuracy_table(copl: dict, baseline: dict, bound: float, unseen_bound: float) -> list[str]:
    groups = sorted(copl["by_group"])
    def cell(part) -> str:
        return f"{part['accuracy']:.3f}" if part and part.get("n_pairs") else "-"
    header = ["", "all", "seen", "unseen", *groups]
    rows = [["pairs", str(copl["n_pairs"]), str(copl["seen"]["n_pairs"]), str(copl["unseen"]["n_pairs"]),
             *[str(copl["by_group"][g]["n_pairs"]) for g in groups]],
            ["CoPL (through gRPC)", cell(copl), cell(copl["seen"]), cell(copl["unseen"]),
             *[cell(copl["by_group"][g]) for g in groups]],
            ["non-personalized baseline", cell(baseline), cell(baseline["seen"]), cell(baseline["unseen"]),
             *[cell(baseline["by_group"].get(g)) for g in groups]],
            ["majority bound", f"{bound:.3f}", "", f"{unseen_bound:.3f}", *["" for _ in groups]]]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in [header, *rows]]


def run(workdir: Path, preset: str, users: int, profile: str, seed: int, reward_steps: int | None,
        fail: Callable[[str], None]) -> None:
    """The demo in WORKDIR (already emptied and marked by the caller). `fail` prints one line and exits 1."""
    from copl_cli.client_commands import evaluate_remote
    from copl_cli.services import ServiceProcesses, free_loopback_ports
    from copl_client import Client
    from copl_common.registry import Registry
    from copl_common.service_settings import ServiceSettings
    from graph_service.ingest import ingest_files, read_valid_records
    from graph_service.store import PreferenceStore
    from trainer.evaluate import evaluate_release
    from trainer.pipeline import TrainRequest
    from trainer.synth import SynthConfig, generate, majority_bound, write

    started = time.monotonic()
    data, registry = workdir / "dataset", Registry(workdir / "registry")
    url = f"sqlite:///{(workdir / 'copl.db').resolve()}"

    _step(1, f"synth: {preset}, {users} users, seed {seed} -> {data}")
    dataset = generate(SynthConfig(preset=preset, users=users, seed=seed))
    _say(json.dumps(write(dataset, data)))

    _step(2, f"ingest the seen users into {url}")
    with PreferenceStore(url) as store:
        report = ingest_files(store, [data / "train_seen.jsonl"])
        _say(f"inserted {report.inserted}; {json.dumps(store.stats())}")

    def train(personalized: bool):   # the baseline is published, not made current
        # one reward-model worker with every CPU of the private Ray (Ray gives a worker as many torch threads as
        # CPUs: with the default one, a tiny step on uf-p-4 took 1.0 s instead of 0.78 s on 2 cores)
        return train_release_on_ray(
            TrainRequest(db_url=url, registry=registry.root, profile=profile, personalized=personalized,
                         reward_max_steps=reward_steps, make_current=personalized),
            settings=RaySettings(reward_cpus_per_worker=float(os.cpu_count() or 1)))

    with ray_session():
        _step(3, f"train on an in-process Ray: GNN (Ray task) -> user embeddings -> MoLE reward model (Ray Train) "
                 f"(profile {profile}) -> release")
        first = train(personalized=True)
        _say(f"release {first.id} (current) in {first.path}")
        _step(4, "train the non-personalized baseline (one LoRA, no user input; published, not made current)")
        baseline = train(personalized=False)
        _say(f"release {baseline.id}")

    graph_port, reward_port = free_loopback_ports(2)
    settings = ServiceSettings(host="127.0.0.1", graph_port=graph_port, reward_port=reward_port,
                               graph_metrics_port=-1, reward_metrics_port=-1, db_url=url, registry=str(registry.root),
                               token_file=str(workdir / "write-token"), release_poll_s=1.0, torch_threads=1,
                               shutdown_grace_s=2.0)
    services = ServiceProcesses(settings, log_dir=workdir / "logs")
    try:
        _step(5, f"start the graph and reward services on loopback (logs in {workdir / 'logs'})")
        services.start()
        _say(f"graph service pid {services.children['graph'].pid} on {services.target('graph')}, "
             f"reward service pid {services.children['reward'].pid} on {services.target('reward')}")
        try:
            services.wait_serving(SERVING_TIMEOUT_S)
        except RuntimeError as exc:
            fail(str(exc))
        _say("both SERVING (gRPC health)")
        with Client(reward=services.target("reward"), graph=services.target("graph"), token=services.token,
                    timeout=60.0) as client:
            _step(6, "the later users arrive through AddPreferences (no retraining)")
            unseen = [json.loads(line) for line in open(data / "train_unseen.jsonl")]
            inserted = sum(client.add_preferences(unseen[i:i + RECORDS_PER_CALL]).inserted
                           for i in range(0, len(unseen), RECORDS_PER_CALL))
            _say(f"{inserted} preferences of {len({r['user_id'] for r in unseen})} users stored")

            _step(7, "score every held-out pair through gRPC (client score_many)")
            test = read_valid_records([data / "test.jsonl"])
            metrics = evaluate_remote(test, client)
            with PreferenceStore(url) as store:
                base = evaluate_release(baseline, test, store, progress=False)
            test_rows = [json.loads(line) for line in open(data / "test.jsonl")]
            unseen_users = {r["user_id"] for r in unseen}
            unseen_bound = majority_bound([r for r in test_rows if r["user_id"] in unseen_users], votes_from=test_rows)
            _say(f"release {metrics['release']}: test-pair accuracy (held-out prompts); embeddings by source "
                 f"{json.dumps(metrics['users_by_source'])}")
            for line in _accuracy_table(metrics, base, majority_bound(test_rows), unseen_bound):
                _say(line)

            _step(8, "publish a second release (the first one's parts under a new id) and swap it in under client traffic")
            probes = [Probe(r.user_id, r.prompt, (r.chosen, r.rejected)) for r in test[:64]]
            known = {first.id}
            traffic = SwapTraffic(client, probes, known_releases=lambda: known).start()
            try:
                time.sleep(STEADY_S)
                second = registry.publish_copy(first, make_current=False)
                known.add(second.id)   # before any reply can name it
                registry.set_current(second.id)   # the services would follow the pointer; Reload: look now
                swapped = client.reload(second.id)
                time.sleep(AFTER_SWAP_S)
            finally:
                outcome = traffic.stop()
            _say(", ".join(f"{r.service} {r.previous_release_id} -> {r.release_id}" for r in swapped))
            _say(f"replies named releases {' then '.join(outcome.releases)}; {outcome.refetches} embedding(s) "
                 "fetched again after a ReleaseMismatch refusal")
            _say(outcome.summary())
            if outcome.failed or outcome.mixed:
                fail(f"the swap was not clean: {outcome.summary()}; first errors: {outcome.errors[:3]}")
    finally:
        services.stop()

    _step(9, "plots")
    for plot in sorted((first.path / "plots").glob("*.png")):   # training curves, the user-embedding map
        _say(str(plot))
    typer.secho(f"demo done in {time.monotonic() - started:.0f} s. Next:", fg=typer.colors.GREEN)
    for line in (f"copl up --db {url} --registry {registry.root} --token-file {workdir / 'write-token'}",
                 f"copl eval {data / 'test.jsonl'} --target grpc://127.0.0.1:50052",
                 f"copl releases list --registry {registry.root}",
                 ".venv/bin/python bench/hotswap.py --quick"):
        _say(line)
