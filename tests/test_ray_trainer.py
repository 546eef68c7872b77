"""The trainer under real Ray and the quality gate, on real stores, registries and services: an in-process Ray
run publishes a release that the gate judges; a degraded run (labels shuffled) is rejected and not swapped
into running services, --force overrides, rollback swaps back; a run killed while publishing leaves the
previous release current and intact and the next run succeeds."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from copl.v1 import reward_pb2
from copl_common.checksums import sha256_file
from copl_common.registry import Registry
from graph_service.ingest import ingest_files
from graph_service.store import PreferenceStore
from tests.conftest import write_jsonl
from copl_cli.services import free_loopback_ports
from tests.service_harness import ServiceLoop, Stubs, copy_registry, settings_for, wait_for
from trainer.gate import apply_gate, judge
from trainer.pipeline import TrainRequest
from trainer.ray_stages import RaySettings, train_release_on_ray

REPO = Path(__file__).resolve().parents[1]
COPL = [sys.executable, "-m", "copl_cli.main"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _copl(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([*COPL, *args], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600, **kwargs)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _shuffled_store(records: list[dict], path: Path, seed: int = 0) -> str:
    """The same pairs with chosen and rejected swapped for a random half: no model can beat a coin on them,
    held-out part included."""
    rng = random.Random(seed)
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} if rng.random() < 0.5 else r for r in records]
    url = f"sqlite:///{path / 'shuffled.db'}"
    with PreferenceStore(url) as store:
        ingest_files(store, [write_jsonl(path / "shuffled.jsonl", swapped)], progress=False)
    return url


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


@contextmanager
def _services(tiny_release, registry: Registry):
    """Both services on `registry` (tiny_release's store); yields reward-service stubs and a score request."""
    loop = ServiceLoop()
    try:
        settings = settings_for(tiny_release.db_url, registry.root)
        graph = loop.graph(settings)
        reward = loop.reward(settings.with_overrides(graph_target=f"127.0.0.1:{graph.port}"))
        stubs = Stubs(reward.port)
        r = tiny_release.dataset.test[0]
        yield stubs, reward_pb2.ScoreRequest(user_id=r["user_id"], prompt=r["prompt"],
                                             responses=[r["chosen"], r["rejected"]])
        stubs.close()
    finally:
        loop.close()


def test_gate_rules(tiny_release, tmp_path):
    """The documented rule, including releases without a held-out report accuracy."""
    registry = copy_registry(tiny_release.registry, tmp_path / "registry")
    good = registry.get(tiny_release.release.id)
    old = good.manifest["metrics"]["report_accuracy"]
    assert old is not None and old > 0.7

    def with_accuracy(accuracy):
        return type(good)(good.id, good.path, {**good.manifest, "metrics": {"report_accuracy": accuracy}})

    assert judge(good, None, 0.02).accepted
    assert judge(with_accuracy(old - 0.01), good, 0.02).accepted
    worse = judge(with_accuracy(old - 0.05), good, 0.02)
    assert not worse.accepted and "worse than current release" in worse.reason
    unmeasured = judge(with_accuracy(None), good, 0.02)
    assert not unmeasured.accepted and "no held-out report accuracy" in unmeasured.reason
    assert judge(good, with_accuracy(None), 0.02).accepted


@pytest.mark.slow
def test_ray_run_gate_rejects_degraded_force_and_rollback_in_services(tiny_release, ray_local, tmp_path):
    """A Ray run (GNN task + Ray Train reward model) on a store whose labels are shuffled publishes a release the
    gate rejects: it stays out of the running services; `copl releases list` says why; rollback to it is refused;
    --force makes it current and the services swap to it; rollback swaps the good release back."""
    registry = copy_registry(tiny_release.registry, tmp_path / "registry")
    good = tiny_release.release.id
    degraded_url = _shuffled_store(tiny_release.dataset.train_seen, tmp_path)
    with _services(tiny_release, registry) as (stubs, request):
        assert stubs.reward.ScoreResponses(request).release_id == good

        degraded = train_release_on_ray(TrainRequest(db_url=degraded_url, registry=registry.root, profile="tiny",
                                                     reward_max_steps=10, progress=False), settings=RaySettings())
        status = registry.status(degraded.id)
        assert status["status"] == "rejected" and "worse than current release" in status["reason"], status
        assert degraded.manifest["metrics"]["report_accuracy"] < 0.65
        assert (degraded.path / "reward" / "manifest.json").is_file() and not (degraded.path / ".ray-train").exists()
        assert registry.current_id() == good
        time.sleep(1.0)  # several pointer polls: nothing to swap to
        assert stubs.reward.ScoreResponses(request).release_id == good

        listed = [json.loads(line) for line in _copl("releases", "list", "--registry", str(registry.root),
                                                     "--json").stdout.splitlines()]
        assert {row["id"]: row["status"] for row in listed} == {good: "current", degraded.id: "rejected"}
        assert "worse than current release" in listed[1]["reason"] and listed[1]["snapshot_time"]
        refused = _copl("releases", "rollback", degraded.id, "--registry", str(registry.root), check=False)
        assert refused.returncode == 1 and "rejected by the quality gate" in refused.stderr

        forced = apply_gate(registry, degraded, force=True)   # what `copl train --force` does after publishing
        assert not forced.accepted and registry.current_id() == degraded.id
        assert registry.status(degraded.id)["forced"] is True
        wait_for(lambda: stubs.reward.ScoreResponses(request).release_id == degraded.id, 120, "the forced swap")

        _copl("releases", "rollback", good, "--registry", str(registry.root))
        wait_for(lambda: stubs.reward.ScoreResponses(request).release_id == good, 120, "the rollback swap")


KILL_AT_PUBLISH = """
import os, signal, sys
import copl_common.registry as registry
point = sys.argv.pop(1)
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
rename = os.rename
def rename_or_die(src, dst, *args, **kwargs):
    if os.path.basename(src).startswith(".staging-"):
        die()
    return rename(src, dst, *args, **kwargs)
if point == "move":        # the staged release is complete and fsynced, about to be renamed into releases/
    os.rename = rename_or_die
else:                      # published, about to record the gate's decision and switch CURRENT
    registry.Registry.set_status = die
from copl_cli.main import main
sys.argv[0] = "copl"
main()
"""


@pytest.mark.slow
def test_run_killed_while_publishing_leaves_previous_release_current(tiny_release, tmp_path):
    """SIGKILL at the two moments of publishing: before the release directory moves into place, and after it has
    (before the gate's decision and CURRENT). The previous release stays current and byte-for-byte intact,
    nothing half-written is listed, and the next run succeeds and cleans the dead run's scratch up."""
    registry = copy_registry(tiny_release.registry, tmp_path / "registry")
    previous = tiny_release.release.id
    before = _tree_digest(registry.get(previous).path)
    args = ["train", "--db", tiny_release.db_url, "--registry", str(registry.root), "--profile", "tiny",
            "--reward-max-steps", "5", "--max-regression", "1", "--no-progress"]
    for point in ("move", "switch"):
        killed = subprocess.run([sys.executable, "-c", KILL_AT_PUBLISH, point, *args], capture_output=True,
                                text=True, env=ENV, cwd=REPO, timeout=600)
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert registry.current_id() == previous
        assert _tree_digest(registry.get(previous).path) == before
        releases, broken = registry.scan()
        assert broken == []
        if point == "move":
            assert [r.id for r in releases] == [previous]
            assert any(p.name.startswith(".staging-") for p in registry.root.iterdir())
        else:  # published, never judged: listed as such, not current
            orphan = next(r.id for r in releases if r.id != previous)
            assert registry.status(orphan) is None
    listed = _copl("releases", "list", "--registry", str(registry.root)).stdout
    assert "published" in listed and f"* {previous}" in listed

    after = _copl(*args)
    new_id = after.stdout.strip().splitlines()[-1]
    assert registry.current_id() == new_id != previous
    assert registry.status(new_id)["status"] == "accepted"
    assert not [p.name for p in registry.root.iterdir() if p.name.startswith((".staging-", ".CURRENT.", ".status."))]


@pytest.fixture
def ray_head(tmp_path_factory):
    """`ray start --head` on loopback with this test's own temp dir and ports (token auth off, explicitly on
    both sides); the address of its job server. Stopped by signalling the process group it started (never
    `ray stop`, which stops every Ray on the machine)."""
    import signal
    temp_dir = Path(f"/tmp/copl-raytest-{os.getpid()}")   # short: Unix socket paths are limited to 107 bytes
    gcs, dashboard, client, manager, objects, agent, agent_grpc, metrics, runtime_env = free_loopback_ports(9)
    env = {**ENV, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{ENV['PATH']}"}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--include-dashboard", "true", "--ray-client-server-port", str(client), "--node-manager-port", str(manager),
         "--object-manager-port", str(objects), "--dashboard-agent-listen-port", str(agent),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
         "--runtime-env-agent-port", str(runtime_env), "--num-cpus", "2", "--temp-dir", str(temp_dir),
         "--object-store-memory", str(256 * 2**20), "--disable-usage-stats"],
        env=env, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        import urllib.request
        deadline = time.monotonic() + 180
        while True:
            assert head.poll() is None, "ray start --head exited"
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head's job server did not come up"
                time.sleep(1)
        yield address
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(wait)
                time.sleep(2)  # Ray's children get the signal too; give them a moment
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(head.pid, signal.SIGKILL)   # anything of that group still alive
        except ProcessLookupError:
            pass
        import shutil
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_retrain_as_ray_job_on_a_cluster_is_served(tiny_release, ray_head, tmp_path):
    """`copl retrain --address` submits the run to a `ray start --head` cluster as a Ray job, follows its logs
    to the end; the job publishes a release that the running services then serve. `copl jobs` sees the job."""
    registry = copy_registry(tiny_release.registry, tmp_path / "registry")
    with _services(tiny_release, registry) as (stubs, request):
        assert stubs.reward.ScoreResponses(request).release_id == tiny_release.release.id

        env = {**ENV, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{ENV['PATH']}"}
        done = subprocess.run([*COPL, "retrain", "--address", ray_head, "--db", tiny_release.db_url,
                               "--registry", str(registry.root), "--profile", "tiny", "--reward-max-steps", "5",
                               "--max-regression", "1"],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
        assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
        job_id = done.stdout.splitlines()[0].strip()
        new_id = registry.current_id()
        assert new_id != tiny_release.release.id and new_id in done.stdout  # the job's `copl train` printed it
        assert registry.status(new_id)["status"] == "accepted"
        wait_for(lambda: stubs.reward.ScoreResponses(request).release_id == new_id, 120, "the new release")
        status = _copl("jobs", "status", job_id, "--address", ray_head).stdout
        assert status.startswith(f"{job_id} SUCCEEDED")
        assert new_id in _copl("jobs", "logs", job_id, "--address", ray_head).stdout
        unknown = _copl("jobs", "status", "raysubmit_nosuchjob", "--address", ray_head, check=False)
        assert unknown.returncode == 1 and unknown.stderr.startswith("error:")


def test_no_service_imports_ray():
    """The arrows of DESIGN.md: services, shared code and the client never import ray (only trainer/ and the
    command line's Ray commands do, inside the functions that need it)."""
    import ast
    offenders = []
    for package in ("graph_service", "reward_service", "copl_common", "clients"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert offenders == []


@pytest.mark.slow
def test_two_reward_workers_train_data_parallel(ray_local, tmp_path):
    """--reward-workers 2: two Ray Train workers (half a CPU each, to fit the test's 2-CPU Ray) split the training
    pairs and average gradients; the release publishes with the usual metrics."""
    from trainer.synth import SynthConfig, generate
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with PreferenceStore(url) as store:
        records = generate(SynthConfig(preset="uf-p-2", users=60, seed=2)).train_seen
        ingest_files(store, [write_jsonl(tmp_path / "seen.jsonl", records)], progress=False)
    release = train_release_on_ray(
        TrainRequest(db_url=url, registry=tmp_path / "registry", profile="tiny", reward_max_steps=6, progress=False),
        settings=RaySettings(reward_workers=2, reward_cpus_per_worker=0.5))
    reward = release.manifest["metrics"]["reward"]
    assert reward["steps"] == 6 and reward["selection_pairs"] > 0 and reward["report_accuracy"] is not None
    assert reward["user_head"]["steps"] >= 1  # fitted after the adapters, gradients averaged over both workers
    assert Registry(tmp_path / "registry").current_id() == release.id


def test_private_ray_listens_on_loopback_only(ray_local):
    """Ray maps a node IP of 127.0.0.1 to the machine's address and listens there (and on 0.0.0.0), with
    authentication off: the private instance must stay on loopback (trainer/ray_runtime.py)."""
    import psutil
    import ray

    @ray.remote
    def ready() -> int:
        return 1

    assert ray.get(ready.remote()) == 1 and ray.util.get_node_ip_address() == "127.0.0.1"
    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listening, "found none of the private Ray's listening sockets"
    wide = [(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()) for c in listening
            if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert wide == [], wide
