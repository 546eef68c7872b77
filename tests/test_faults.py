"""Faults on real services (child processes on loopback, real SQLite and PostgreSQL, real `copl train`): the
scenarios of testkit/faults.py, one test each. Each asserts every invariant its scenario checks; a scenario
that cannot run on this machine (not root, no PostgreSQL binaries) skips with its reason."""
from __future__ import annotations

import pytest

from testkit import faults


@pytest.fixture(scope="module")
def env(tiny_release, tmp_path_factory):
    return faults.FaultEnv(db_url=tiny_release.db_url, registry=tiny_release.registry,
                           workdir=tmp_path_factory.mktemp("faults"))


def _run(scenario, env, *args) -> faults.Outcome:
    outcome = scenario(env, *args)
    if outcome.skipped:
        pytest.skip(outcome.skipped)
    assert outcome.passed, outcome.failed_checks()
    return outcome


@pytest.mark.slow   # the non-slow suite has the SQLite case below and test_service_lifecycle's database drop
def test_postgres_down_writes_unavailable_then_recover_nothing_lost(env):
    outcome = _run(faults.database_down_postgres, env)
    assert outcome.codes["UNAVAILABLE"] > 0 and outcome.acknowledged_writes >= 60 and outcome.lost_writes == 0


def test_readonly_sqlite_writes_unavailable_then_recover_nothing_lost(env):
    outcome = _run(faults.database_readonly_sqlite, env)
    assert outcome.codes["UNAVAILABLE"] > 0 and outcome.acknowledged_writes >= 60 and outcome.lost_writes == 0


@pytest.mark.slow
def test_graph_killed_explicit_embeddings_go_on_user_ids_fail_fast(env):
    outcome = _run(faults.graph_killed, env)
    assert outcome.codes["UNAVAILABLE"] > 0


@pytest.mark.slow
def test_reward_replica_killed_client_fails_over_and_restart_serves_current(env):
    _run(faults.reward_killed, env)


@pytest.mark.slow
def test_corrupt_and_truncated_releases_refused_current_keeps_serving(env):
    _run(faults.corrupt_release, env)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["training", "publishing"])
def test_copl_train_killed_leaves_the_registry_whole(env, phase):
    _run(faults.train_killed, env, phase)


@pytest.mark.slow
def test_registry_disk_full_train_fails_in_one_line_current_keeps_serving(env):
    _run(faults.registry_disk_full, env)
