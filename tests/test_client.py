"""The client's retry, failover, streaming and resume logic against real gRPC peers on loopback
(tests/client_peers.py: servers of the test's own that implement the copl.v1 stubs, for fault injection).
The same client against the real graph and reward services: tests/test_client_live.py."""
from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest

from tests.client_peers import RELEASE, Peer, expected_scores
from copl_client import (AsyncClient, Client, EmbeddingSource, InvalidArgument, InvalidRecords, JobFileError,
                         RetryPolicy, ScoreItem, TLSConfig, Unauthenticated, Unavailable, UserEmbedding)
from copl_client.endpoints import parse_target

FAST = RetryPolicy(max_attempts=6, initial_backoff_s=0.01, max_backoff_s=0.05)
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def peer():
    p = Peer().start()
    yield p
    p.close()


@pytest.fixture
def peers():
    ps = [Peer().start(), Peer().start()]
    yield ps
    for p in ps:
        p.close()


def client_for(*peers: Peer, **kwargs) -> Client:
    targets = [p.target for p in peers]
    return Client(reward=targets, graph=targets, retry=kwargs.pop("retry", FAST), **kwargs)


def test_retry_policy_backoff_grows_to_its_cap_with_full_jitter():
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0)
    assert [policy.cap(n) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    waits = [policy.backoff(3) for _ in range(2000)]
    assert 0 <= min(waits) < 0.05 and 0.35 < max(waits) <= 0.4     # uniform over [0, cap]
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_targets_schemes_and_tls():
    assert parse_target("grpc://127.0.0.1:50052", None) == ("127.0.0.1:50052", False)
    assert parse_target("grpcs://h.example:443", None) == ("h.example:443", True)
    for bad in ("http://h:1", "grpc://nohost", "h:port"):
        with pytest.raises(ValueError):
            parse_target(bad, None)


def test_unavailable_twice_then_success(peer):
    peer.script.fail = [UNAVAILABLE, UNAVAILABLE]
    with client_for(peer) as client:
        scores = client.score("alice", "p", ["a", "bbb"])
    assert scores.scores == (1.0, 3.0) and scores.release_id == RELEASE
    assert scores.embedding_source is EmbeddingSource.TRAINED
    assert peer.calls["ScoreResponses"] == 3


def test_gives_up_after_max_attempts(peer):
    peer.script.fail = [UNAVAILABLE] * 10
    with client_for(peer, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.01)) as client:
        with pytest.raises(Unavailable):
            client.release_info()
    assert peer.calls["GetReleaseInfo"] == 3


def test_deadline_bounds_the_retries(peer):
    peer.script.fail = [UNAVAILABLE] * 100
    slow = RetryPolicy(max_attempts=100, initial_backoff_s=0.2, max_backoff_s=0.2, multiplier=1.0)
    with client_for(peer, retry=slow) as client:
        start = time.monotonic()
        with pytest.raises(Unavailable):
            client.release_info(timeout=0.5)
        assert time.monotonic() - start < 1.0


def test_other_codes_are_not_retried(peer):
    peer.script.fail = [grpc.StatusCode.INVALID_ARGUMENT, UNAVAILABLE]
    with client_for(peer) as client:
        with pytest.raises(InvalidArgument):
            client.score("alice", "p", ["a"])
    assert peer.calls["ScoreResponses"] == 1


def test_invalid_records_carry_the_bad_request_details(peer):
    records = [{"user_id": "u", "prompt": "p" if i % 2 == 0 else "", "chosen": "a", "rejected": "b"}
               for i in range(4)]
    with client_for(peer) as client:
        with pytest.raises(InvalidRecords) as err:
            client.add_preferences(records)
        assert err.value.violations == [(1, "prompt: prompt is empty"), (3, "prompt: prompt is empty")]
        result = client.add_preferences(records, skip_invalid=True)
    assert result.inserted == 2 and result.rejected == ((1, "prompt is empty"), (3, "prompt is empty"))


def test_token_from_argument_or_environment(peer, monkeypatch):
    with client_for(peer, token="s3cret-token") as client:
        client.add_preferences([{"user_id": "u", "prompt": "p", "chosen": "a", "rejected": "b"}])
    assert peer.metadata[-1]["authorization"] == "Bearer s3cret-token"
    monkeypatch.setenv("COPL_TOKEN", "from-env")
    with client_for(peer) as client:
        client.release_info()
    assert peer.metadata[-1]["authorization"] == "Bearer from-env"


def test_round_robin_over_replicas(peers):
    with client_for(*peers) as client:
        for _ in range(10):
            client.score("alice", "p", ["a"])
    assert [p.calls["ScoreResponses"] for p in peers] == [5, 5]


def test_failover_and_recovery_after_a_restart_on_the_same_port(peers):
    a, b = peers
    with client_for(a, b) as client:
        a.stop()
        for _ in range(6):
            assert client.score("alice", "p", ["ab"]).scores == (2.0,)
        assert b.calls["ScoreResponses"] == 6
        a.start()                          # back on its port; the client probes it after its cooldown
        time.sleep(1.2)
        for _ in range(6):
            client.score("alice", "p", ["ab"])
    assert a.calls["ScoreResponses"] >= 2


def test_a_replica_that_is_not_serving_gets_no_traffic(peers):
    a, b = peers
    with client_for(a, b) as client:
        a.script.fail = [UNAVAILABLE]      # marked down ...
        a.set_serving(False)               # ... and its health check says NOT_SERVING
        for _ in range(4):
            client.score("alice", "p", ["a"])
        time.sleep(1.2)
        for _ in range(4):
            client.score("alice", "p", ["a"])
        assert a.calls["ScoreResponses"] == 1
        a.set_serving(True)
        time.sleep(1.2)
        for _ in range(4):
            client.score("alice", "p", ["a"])
    assert a.calls["ScoreResponses"] >= 2


def test_embeddings_and_scores_by_embedding(peer):
    with client_for(peer) as client:
        embs = client.embeddings(["alice", "bob"], context={"bob": [("p", "a", "b")]})
        assert [(e.user_id, e.source, e.release_id) for e in embs] == [
            ("alice", EmbeddingSource.TRAINED, RELEASE), ("bob", EmbeddingSource.ADAPTED, RELEASE)]
        assert client.score(embs[0], "p", ["abc"]).scores == (3.0,)
        assert [r.service for r in client.reload()] == ["graph", "reward"]
        with pytest.raises(TypeError):
            client.embeddings("alice")


def _items(n: int) -> list[ScoreItem]:
    return [ScoreItem(prompt="bad" if i % 97 == 5 else f"p{i}", responses=["x" * (i % 7), "y" * (i % 3)],
                      user_id=f"u{i % 13}", id=f"row{i}") for i in range(n)]


def _check_in_order(results, items):
    assert [r.index for r in results] == list(range(len(items)))
    assert [r.id for r in results] == [it.id for it in items]
    for r, it in zip(results, items):
        if it.prompt == "bad":
            assert r.error.code == "INVALID_ARGUMENT" and r.scores is None
        else:
            assert r.ok and list(r.scores) == expected_scores(it.responses) and r.release_id == RELEASE


def test_score_many_bounds_in_flight_work_and_keeps_input_order(peer):
    peer.script.reply_delay_s = 0.0005
    items = _items(1000)
    with client_for(peer) as client:
        results = client.score_many(items, concurrency=8)
    _check_in_order(results, items)
    assert peer.max_in_flight <= 8 and peer.stream_received == 1000


def test_score_many_sends_unanswered_items_again_after_a_dropped_stream(peers):
    a, b = peers
    a.script.drop_stream_after = 150
    a.script.reply_delay_s = b.script.reply_delay_s = 0.0002
    items = _items(1200)
    with client_for(a, b) as client:
        results = client.score_many(items, concurrency=32)
    _check_in_order(results, items)
    assert a.stream_replies == 150                      # then the stream broke, with items unanswered ...
    assert set(a.answered) | set(b.answered) == {str(i) for i in range(1200)}   # ... which b answered


def test_score_many_survives_a_replica_that_goes_away_and_comes_back(peer):
    items = _items(1500)

    async def job():
        async with AsyncClient(reward=peer.target, graph=peer.target, retry=FAST) as client:
            out = []
            async for r in client.iter_score_many(items, concurrency=16, max_stall_s=20):
                out.append(r)
                if len(out) == 500:
                    await asyncio.to_thread(peer.stop)
                    asyncio.get_running_loop().call_later(0.5, peer.start)
            return out

    _check_in_order(asyncio.run(job()), items)
    assert peer.calls["ScoreResponsesStream"] >= 2


def test_score_many_whole_call_failure_raises_its_type(peer):
    peer.script.stream_abort = grpc.StatusCode.UNAUTHENTICATED
    with client_for(peer) as client:
        with pytest.raises(Unauthenticated):
            client.score_many(_items(10))


def test_score_many_gives_up_when_nothing_answers(peer):
    peer.stop()
    with client_for(peer) as client:
        start = time.monotonic()
        with pytest.raises(Unavailable):
            client.score_many(_items(5), max_stall_s=0.5)
        assert time.monotonic() - start < 5


def test_malformed_items_fail_alone(peer):
    rows = [{"user_id": "u", "prompt": "p", "responses": ["a"]}, {"prompt": "p", "responses": ["a"]},
            {"user_id": "u", "embedding": {"vector": [1.0], "release_id": "r"}, "prompt": "p", "responses": ["a"]},
            {"embedding": {"vector": [1, 2], "release_id": "r"}, "prompt": "p", "responses": ["ab"]}]
    with client_for(peer) as client:
        results = client.score_many(rows)
    assert [r.ok for r in results] == [True, False, False, True]
    assert "exactly one of" in results[1].error.message and results[3].scores == (2.0,)


# -- resumable JSONL jobs --------------------------------------------------------------------------------------

def _write_rows(path, n, with_ids=True):
    with open(path, "w") as fh:
        for i in range(n):
            row = {"user_id": f"u{i % 5}", "prompt": f"p{i}", "responses": ["a" * (i % 4 + 1), "b"]}
            if with_ids:
                row["id"] = f"r{i}"
            fh.write(json.dumps(row) + "\n")
    return path


def _output_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("with_ids", [True, False])
def test_score_file_resumes_after_a_cut_line_and_writes_each_row_once(peer, tmp_path, with_ids):
    src, out = _write_rows(tmp_path / "in.jsonl", 300, with_ids), tmp_path / "out.jsonl"
    with client_for(peer) as client:
        first = client.score_file(src, out, progress=False)
        assert (first.rows, first.already_done, first.scored, first.repaired) == (300, 0, 300, False)
        # A job killed mid-write: 120 whole rows, then half of the 121st.
        lines = out.read_text().splitlines(keepends=True)
        out.write_text("".join(lines[:120]) + lines[120][:17])
        second = client.score_file(src, out, progress=False)
    assert (second.already_done, second.scored, second.repaired) == (120, 180, True)
    rows = _output_rows(out)
    assert [r["line"] for r in rows] == list(range(1, 301))
    assert all(r["scores"] == [float((r["line"] - 1) % 4 + 1), 1.0] for r in rows)
    assert all(r["release_id"] == RELEASE and r["embedding_source"] == "TRAINED" for r in rows)
    assert ("id" in rows[0]) == with_ids


def test_score_file_refuses_bad_input_and_foreign_output(peer, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "user_id": "u", "prompt": "p", "responses": ["x"]}\n'
                   'not json\n{"id": "a", "user_id": "u", "prompt": "p", "responses": ["y"]}\n'
                   '{"id": "b", "prompt": "p", "responses": ["y"]}\n')
    out = tmp_path / "out.jsonl"
    with client_for(peer) as client:
        with pytest.raises(JobFileError) as err:
            client.score_file(src, out, progress=False)
        assert [e.split(":")[0] for e in err.value.errors] == ["line 2", "line 3", "line 4"]
        assert not out.exists()
        good = _write_rows(tmp_path / "good.jsonl", 5)
        out.write_text('{"line": 1, "id": "zz", "scores": [1.0]}\n')
        with pytest.raises(JobFileError, match="another input"):
            client.score_file(good, out, progress=False)


def test_two_jobs_cannot_write_one_output(peer, tmp_path):
    import fcntl
    import os
    src, out = _write_rows(tmp_path / "in.jsonl", 5), tmp_path / "out.jsonl"
    fd = os.open(out, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with client_for(peer) as client:
            with pytest.raises(JobFileError, match="another job"):
                client.score_file(src, out, progress=False)
    finally:
        os.close(fd)


def test_user_embedding_round_trips_through_json():
    emb = UserEmbedding("u", (0.5, -0.5), EmbeddingSource.ADAPTED, "r1")
    assert UserEmbedding.from_json(emb.to_json()) == emb
    with pytest.raises(ValueError):
        UserEmbedding.from_json({"vector": ["a"], "release_id": "r"})


def _certificates(directory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with the openssl tool."""
    import subprocess

    def run(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca")
    (directory / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", *(["-extfile", "san.ext"] if name == "server" else []))
    return directory


def test_tls_and_mutual_tls(tmp_path):
    certs = _certificates(tmp_path)
    read = lambda name: (certs / name).read_bytes()   # noqa: E731
    server_creds = grpc.ssl_server_credentials([(read("server.key"), read("server.pem"))],
                                               root_certificates=read("ca.pem"), require_client_auth=True)
    peer = Peer(tls=server_creds).start()
    quick = RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01)
    try:
        mutual = TLSConfig(ca=certs / "ca.pem", cert=certs / "client.pem", key=certs / "client.key")
        with Client(reward=peer.target, graph=peer.target, tls=mutual, retry=quick) as client:
            assert client.score("alice", "p", ["abcd"]).scores == (4.0,)
        with Client(reward=peer.target, tls=TLSConfig(ca=certs / "ca.pem"), retry=quick, timeout=3) as client:
            with pytest.raises(Unavailable):               # no client certificate: the handshake fails
                client.score("alice", "p", ["a"])
        with Client(reward=peer.target, retry=quick, timeout=3) as client:
            with pytest.raises(Unavailable):               # the system roots do not trust this CA
                client.score("alice", "p", ["a"])
        assert peer.calls["ScoreResponses"] == 1
        with pytest.raises(ValueError, match="plaintext"):
            Client(reward=f"grpc://127.0.0.1:{peer.port}", tls=mutual).close()
        with pytest.raises(ValueError, match="both"):
            TLSConfig(cert=certs / "client.pem")
    finally:
        peer.close()


def test_iter_score_many_hands_results_over_as_they_come_and_can_stop_early(peer):
    with client_for(peer) as client:
        got = []
        for result in client.iter_score_many(iter(_items(500)), concurrency=4):
            got.append(result)
            if len(got) == 10:
                break
        assert [r.index for r in got] == list(range(10))
        assert client.score("alice", "p", ["ab"]).scores == (2.0,)    # the client is still fine


def test_copl_score_command(peer, tmp_path):
    from typer.testing import CliRunner

    from copl_cli.main import app
    runner = CliRunner()
    src, out = _write_rows(tmp_path / "in.jsonl", 50), tmp_path / "out.jsonl"
    done = runner.invoke(app, ["score", str(src), str(out), "--target", peer.target, "--no-progress"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout.strip().splitlines()[-1])["scored"] == 50 and len(_output_rows(out)) == 50
    again = runner.invoke(app, ["score", str(src), str(out), "--target", peer.target, "--no-progress"])
    assert json.loads(again.stdout.strip().splitlines()[-1])["already_done"] == 50 and len(_output_rows(out)) == 50
    missing = runner.invoke(app, ["score", str(src), str(tmp_path / "o2.jsonl")])
    assert missing.exit_code == 1 and "--target is required" in missing.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user_id": "u", "prompt": "p", "responses": []}\n')
    refused = runner.invoke(app, ["score", str(bad), str(tmp_path / "o3.jsonl"), "--target", peer.target])
    assert refused.exit_code == 1 and "line 1: 'responses' must be a non-empty list" in refused.output
    assert "Traceback" not in refused.output and not (tmp_path / "o3.jsonl").exists()
