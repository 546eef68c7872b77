"""Fault scenarios on real services under a bounded client load, shared by tests/test_faults.py (one test
each) and bench/faults.py (all of them, with figures).

Each scenario starts what it needs as child processes (testkit/services.py), runs a load of its own
(a few calls a second per thread, so the faults, not the load, decide the outcome), injects one fault,
and returns an `Outcome`: the invariants it checked (each held or not), the writes the services
acknowledged and how many of them the store lacks afterwards, and how long the service took to answer
again once the fault was gone (`recovery_s`). A scenario that cannot run here (not root, no PostgreSQL
binaries) returns `skipped` with the reason.

The documented statuses (DESIGN.md "gRPC API", README "Reliability"): the database down -> writes
UNAVAILABLE, reads of trained users go on; the graph service down -> requests by user id UNAVAILABLE within
the reward service's embedding deadline, requests with an explicit embedding go on; a reward replica
killed -> the client fails over (several addresses) or raises UNAVAILABLE (one address); a broken release or
a trainer that dies -> the current release keeps serving.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from copl.v1 import common_pb2, graph_pb2, graph_pb2_grpc, reward_pb2, reward_pb2_grpc
from copl_common.auth import bearer_metadata
from copl_common.registry import Registry
from copl_cli.services import free_loopback_ports
from testkit.services import ROOT, TOKEN, OwnPostgres, ServiceProcess, copy_release, service_env

AUTH = bearer_metadata(TOKEN)
CALL_TIMEOUT_S = 10.0
EMBEDDING_DEADLINE_MS = 500   # the reward service's deadline on its graph calls in these scenarios


@dataclass
class Outcome:
    name: str
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    codes: Counter = field(default_factory=Counter)   # status names of every load call
    acknowledged_writes: int = 0
    lost_writes: int = 0
    recovery_s: float | None = None
    skipped: str | None = None

    @property
    def passed(self) -> bool:
        return self.skipped is None and bool(self.checks) and all(self.checks.values())

    def check(self, name: str, held: bool, detail: str = "") -> bool:
        self.checks[name] = bool(held)
        if not held and detail:
            self.notes.append(f"{name}: {detail}")
        return bool(held)

    def failed_checks(self) -> str:
        return "; ".join([k for k, v in self.checks.items() if not v] + self.notes)


@dataclass(frozen=True)
class FaultEnv:
    """What the scenarios share: a store with preferences (what `copl train` reads), a registry with a
    current release (scenarios that change a registry work on a copy), and a scratch directory."""
    db_url: str
    registry: Path
    workdir: Path

    @property
    def release_id(self) -> str:
        return Registry(self.registry).current_id()

    def trained_users(self, n: int = 40) -> list[str]:
        from graph_service.embeddings import GNNCheckpoint
        return list(GNNCheckpoint.load(Registry(self.registry).current().gnn_dir).user_ids[:n])

    def scratch(self, name: str) -> Path:
        path = self.workdir / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


@dataclass(frozen=True)
class Result:
    at: float            # monotonic time the call returned
    kind: str
    code: str            # a grpc.StatusCode name
    seconds: float
    release_id: str = ""


def code_of(exc: Exception) -> str:
    code = exc.code() if isinstance(exc, grpc.RpcError) else getattr(exc, "code", None)
    return code.name if isinstance(code, grpc.StatusCode) else f"EXCEPTION:{type(exc).__name__}"


class Load:
    """Calls from `threads` threads, each at most one every `interval_s`, until the block ends. A call is
    `(kind, fn)`: fn(i) returns the release id of its reply, or raises."""

    def __init__(self, calls: list[tuple[str, Callable[[int], str]]], threads: int = 2, interval_s: float = 0.05):
        self.calls, self.threads, self.interval_s = calls, threads, interval_s
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._next = iter(range(10**9))
        self._lock = threading.Lock()

    def _work(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                i = next(self._next)
            kind, fn = self.calls[i % len(self.calls)]
            started = time.monotonic()
            try:
                release_id, code = fn(i), "OK"
            except Exception as exc:   # every outcome is recorded and judged by the scenario
                release_id, code = "", code_of(exc)
            self.results.append(Result(time.monotonic(), kind, code, time.monotonic() - started, release_id))
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def __enter__(self) -> "Load":
        self._workers = [threading.Thread(target=self._work, daemon=True) for _ in range(self.threads)]
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(CALL_TIMEOUT_S + 5)

    def wait_ok(self, n: int, kind: str | None = None, after: float = 0.0, timeout: float = 60.0) -> float | None:
        """The time of the n-th successful call (of `kind`) that returned after `after`; None on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ok = sorted(r.at for r in list(self.results) if r.code == "OK" and r.at > after
                        and (kind is None or r.kind == kind))
            if len(ok) >= n:
                return ok[n - 1]
            time.sleep(0.02)
        return None

    def of(self, kind: str, start: float = 0.0, end: float = float("inf")) -> list[Result]:
        return [r for r in self.results if r.kind == kind and start <= r.at <= end]


# -- requests ---------------------------------------------------------------------------------------

class Writer:
    """AddPreferences of one new record a call; remembers the users of the acknowledged ones (one user a
    record, so the store's pair count of a user says whether its record is there)."""

    def __init__(self, graph_port: int, tag: str, distinct: int | None = None):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{graph_port}")
        self.stub = graph_pb2_grpc.GraphServiceStub(self.channel)
        self.tag = tag
        self.distinct = distinct   # cycle over this many records (duplicates after the first round)
        self.acknowledged: list[str] = []

    def __call__(self, i: int) -> str:
        i = i % self.distinct if self.distinct else i
        user = f"fault-{self.tag}-{i}"
        record = graph_pb2.PreferenceRecord(user_id=user, prompt=f"fault prompt {i}", chosen=f"kept answer {i}",
                                            rejected=f"dropped answer {i}")
        reply = self.stub.AddPreferences(graph_pb2.AddPreferencesRequest(records=[record]), metadata=AUTH,
                                         timeout=CALL_TIMEOUT_S)
        if reply.inserted + reply.duplicates == 1:
            self.acknowledged.append(user)
        return ""

    def lost(self, db_url: str) -> int:
        from graph_service.store import PreferenceStore
        with PreferenceStore(db_url, migrate=False) as store:
            counts = store.pair_counts(self.acknowledged)
        return sum(counts.get(u, 0) == 0 for u in self.acknowledged)

    def close(self) -> None:
        self.channel.close()


def embedding_reader(graph_port: int, users: list[str]) -> Callable[[int], str]:
    stub = graph_pb2_grpc.GraphServiceStub(grpc.insecure_channel(f"127.0.0.1:{graph_port}"))

    def read(i: int) -> str:
        request = graph_pb2.GetUserEmbeddingRequest(users=[graph_pb2.UserQuery(user_id=users[i % len(users)])])
        return stub.GetUserEmbedding(request, timeout=CALL_TIMEOUT_S).release_id
    return read


def scorer_by_user(reward_port: int, users: list[str]) -> Callable[[int], str]:
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(f"127.0.0.1:{reward_port}"))

    def score(i: int) -> str:
        request = reward_pb2.ScoreRequest(user_id=users[i % len(users)], prompt="How do I keep basil alive?",
                                          responses=["Water it when the soil is dry.", "Never water it."])
        return stub.ScoreResponses(request, timeout=CALL_TIMEOUT_S).release_id
    return score


def scorer_by_embedding(reward_port: int, graph_port: int, user: str) -> Callable[[int], str]:
    """Scores with an embedding fetched once, up front, from the graph service."""
    with grpc.insecure_channel(f"127.0.0.1:{graph_port}") as channel:
        reply = graph_pb2_grpc.GraphServiceStub(channel).GetUserEmbedding(
            graph_pb2.GetUserEmbeddingRequest(users=[graph_pb2.UserQuery(user_id=user)]), timeout=CALL_TIMEOUT_S)
    embedding = reward_pb2.UserEmbeddingInput(vector=reply.embeddings[0].vector, release_id=reply.release_id)
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(f"127.0.0.1:{reward_port}"))

    def score(i: int) -> str:
        request = reward_pb2.ScoreRequest(embedding=embedding, prompt="Is tea good for you?",
                                          responses=[f"In moderation ({i}).", "No."])
        return stub.ScoreResponses(request, timeout=CALL_TIMEOUT_S).release_id
    return score


def release_served(port: int, stub_class) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return stub_class(channel).GetReleaseInfo(common_pb2.ReleaseInfoRequest(), timeout=CALL_TIMEOUT_S).release_id


class Services:
    """Service processes of one scenario, stopped at the end of the block; their store is a SQLite file in
    `workdir` unless `db_url` says otherwise."""

    def __init__(self, workdir: Path, registry: Path, db_url: str | None = None, **settings):
        self.workdir = workdir
        self.settings = {"db_url": db_url or f"sqlite:///{workdir / 'store.db'}", "registry": registry, **settings}
        self.all: list[ServiceProcess] = []

    def add(self, kind: str, port: int | None = None, **settings) -> ServiceProcess:
        port = port or free_loopback_ports(1)[0]
        env = service_env(self.workdir, **{**self.settings, **settings})
        process = ServiceProcess(kind, port, env, self.workdir / f"{kind}-{len(self.all)}.log").start()
        self.all.append(process)
        return process

    def wait(self) -> None:
        for p in self.all:
            p.wait_serving()

    def graph_and_reward(self, **reward_settings) -> tuple[ServiceProcess, ServiceProcess]:
        """A graph service and a reward service that uses it, both serving."""
        graph = self.add("graph")
        reward = self.add("reward", graph_target=graph.address, **reward_settings)
        self.wait()
        return graph, reward

    def __enter__(self) -> "Services":
        return self

    def __exit__(self, *exc) -> None:
        for p in self.all:
            p.stop()


def _check_codes(out: Outcome, results: list[Result], allowed: set[str], what: str) -> None:
    seen = Counter(r.code for r in results)
    out.check(f"{what}: only {'/'.join(sorted(allowed))}", set(seen) <= allowed, f"saw {dict(seen)}")


# -- scenarios ---------------------------------------------------------------------------------------

def _database_outage(out: Outcome, env: FaultEnv, db_url: str, scratch: Path, break_db: Callable[[], None],
                     restore_db: Callable[[], None], outage_s: float) -> Outcome:
    """Writes and reads through the graph service while the database goes away and comes back."""
    users = env.trained_users()
    with Services(scratch, env.registry, db_url) as services:
        graph = services.add("graph")
        graph.wait_serving()
        writer = Writer(graph.port, out.name)
        try:
            with Load([("write", writer), ("read", embedding_reader(graph.port, users))]) as load:
                out.check("writes succeed before the fault", load.wait_ok(30, "write") is not None)
                break_db()
                down = time.monotonic()
                time.sleep(outage_s)
                during = load.of("write", down + 0.5)   # calls made once the fault had taken hold
                restore_db()
                up = time.monotonic()
                first = load.wait_ok(1, "write", after=up, timeout=30)
                load.wait_ok(30, "write", after=up, timeout=30)
            out.codes.update(r.code for r in load.results)
            out.check("writes fail with UNAVAILABLE while the database is away",
                      bool(during) and all(r.code == "UNAVAILABLE" for r in during),
                      f"saw {dict(Counter(r.code for r in during))}")
            _check_codes(out, load.of("write"), {"OK", "UNAVAILABLE"}, "writes")
            _check_codes(out, load.of("read"), {"OK"}, "reads of trained users")
            out.check("writes fail within their deadline", all(r.seconds < CALL_TIMEOUT_S for r in load.of("write")))
            out.recovery_s = None if first is None else first - up
            out.check("writes recover without a restart", first is not None and graph.proc.poll() is None)
            out.acknowledged_writes = len(writer.acknowledged)
            out.lost_writes = writer.lost(db_url)
            out.check("no acknowledged write lost", out.lost_writes == 0, f"{out.lost_writes} lost")
        finally:
            writer.close()
    return out


def database_down_postgres(env: FaultEnv, outage_s: float = 2.0) -> Outcome:
    """A PostgreSQL server of the scenario's own crashes (pg_ctl stop -m immediate) and starts again."""
    out = Outcome("database_down_postgres")
    try:
        pg = OwnPostgres()
    except RuntimeError as exc:
        out.skipped = str(exc)
        return out
    try:
        pg.start()
        return _database_outage(out, env, pg.url, env.scratch(out.name), pg.stop, pg.start, outage_s)
    finally:
        pg.close()


def _chattr(flag: str, paths: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, text=True)


def database_readonly_sqlite(env: FaultEnv, outage_s: float = 2.0) -> Outcome:
    """The SQLite file (and its WAL) made immutable under a running graph service (chattr +i: not even
    root can write it), then writable again."""
    out = Outcome("database_readonly_sqlite")
    scratch = env.scratch(out.name)
    db = scratch / "store.db"
    files = [db, db.with_name(db.name + "-wal")]
    probe = scratch / "probe"
    probe.touch()
    if (made := _chattr("+i", [probe])).returncode != 0:
        out.skipped = f"cannot make a file immutable here (chattr +i needs root on ext4/xfs): {made.stderr.strip()}"
        return out
    _chattr("-i", [probe])

    def make_readonly() -> None:
        if (made := _chattr("+i", files)).returncode != 0:
            raise RuntimeError(f"chattr +i failed: {made.stderr.strip()}")

    try:
        return _database_outage(out, env, f"sqlite:///{db}", scratch, make_readonly, lambda: _chattr("-i", files),
                                outage_s)
    finally:
        _chattr("-i", files)


def reward_killed(env: FaultEnv, after_kill_s: float = 3.0) -> Outcome:
    """Two reward replicas under a client with both addresses; one is SIGKILLed, then restarted."""
    from copl_client import Client, RetryPolicy, Unavailable
    out = Outcome("reward_killed")
    scratch = env.scratch(out.name)
    users, release = env.trained_users(), env.release_id
    with Services(scratch, env.registry, embedding_deadline_ms=EMBEDDING_DEADLINE_MS) as services:
        graph, victim = services.graph_and_reward()
        other = services.add("reward", graph_target=graph.address)
        other.wait_serving()
        with Client(reward=[f"grpc://{victim.address}", f"grpc://{other.address}"],
                    graph=f"grpc://{graph.address}", timeout=CALL_TIMEOUT_S) as client:
            def score(i: int) -> str:
                return client.score(users[i % len(users)], "How do I keep basil alive?",
                                    ["Water it when the soil is dry.", "Never water it."]).release_id
            with Load([("score", score)], threads=2) as load:
                out.check("scores before the kill", load.wait_ok(10) is not None)
                victim.kill()
                killed = time.monotonic()
                out.check("scores go on after the kill", load.wait_ok(10, after=killed, timeout=60) is not None)
                time.sleep(after_kill_s)
            out.codes.update(r.code for r in load.results)
            _check_codes(out, load.results, {"OK"}, "calls with two addresses")
            wrong = [r.release_id for r in load.results if r.code == "OK" and r.release_id != release]
            out.check("no reply from another release", not wrong, f"{len(wrong)} replies name {set(wrong)}")

        with Client(reward=f"grpc://{victim.address}", graph=f"grpc://{graph.address}", timeout=CALL_TIMEOUT_S,
                    retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.1)) as alone:
            started = time.monotonic()
            try:
                alone.score(users[0], "p", ["r"])
                code = "OK"
            except Unavailable:
                code = "UNAVAILABLE"
            elapsed = time.monotonic() - started
        out.check("one address: UNAVAILABLE, fast", code == "UNAVAILABLE" and elapsed < 2.0,
                  f"{code} after {elapsed:.2f} s")

        victim.start()
        out.recovery_s = victim.wait_serving()
        served = release_served(victim.port, reward_pb2_grpc.RewardServiceStub)
        reply = scorer_by_user(victim.port, users)(0)
        out.check("restarted replica serves the current release", served == reply == release,
                  f"serves {served}, scored with {reply}, current {release}")
    return out


def graph_killed(env: FaultEnv, outage_s: float = 2.0) -> Outcome:
    """The graph service SIGKILLed under a reward service: explicit embeddings go on, requests by user id
    fail with UNAVAILABLE within the embedding deadline; the graph service restarted, they work again."""
    out = Outcome("graph_killed")
    scratch = env.scratch(out.name)
    users = env.trained_users()
    with Services(scratch, env.registry) as services:
        graph, reward = services.graph_and_reward(embedding_deadline_ms=EMBEDDING_DEADLINE_MS,
                                                  embedding_cache_ttl_ms=0)
        calls = [("by_user", scorer_by_user(reward.port, users)),
                 ("by_embedding", scorer_by_embedding(reward.port, graph.port, users[0]))]
        with Load(calls, threads=2) as load:
            out.check("scores before the fault", load.wait_ok(10) is not None)
            graph.kill()
            down = time.monotonic()
            time.sleep(outage_s)
            restarting = time.monotonic()
            graph.start()
            graph.wait_serving()
            up = time.monotonic()
            first = load.wait_ok(1, "by_user", after=up, timeout=30)
            load.wait_ok(5, "by_user", after=up, timeout=30)
        out.codes.update(r.code for r in load.results)
        _check_codes(out, load.of("by_embedding"), {"OK"}, "explicit embeddings")
        during = load.of("by_user", down + 0.1, restarting)
        out.check("by user id: UNAVAILABLE while the graph service is away",
                  bool(during) and all(r.code == "UNAVAILABLE" for r in during),
                  f"saw {dict(Counter(r.code for r in during))}")
        slowest = max((r.seconds for r in during), default=0.0)
        out.check("by user id: fails within the embedding deadline", slowest < EMBEDDING_DEADLINE_MS / 1e3 + 1.0,
                  f"slowest failure took {slowest:.2f} s")
        out.recovery_s = None if first is None else first - up
        out.check("by user id recovers without a restart", first is not None and reward.proc.poll() is None)
    return out


def _serves(out: Outcome, graph: ServiceProcess, registry: Registry, timeout: float = 20.0) -> None:
    """Checks that the registry is whole and that the graph service serves its CURRENT release."""
    releases, broken = registry.scan()
    out.check("no broken release in the registry", not broken, "; ".join(b.reason for b in broken))
    current = registry.current()
    deadline = time.monotonic() + timeout
    while (served := release_served(graph.port, graph_pb2_grpc.GraphServiceStub)) != current.id \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    out.check("the service serves the CURRENT release", served == current.id, f"{served} != {current.id}")


def _copl(*args: str) -> list[str]:
    return [sys.executable, "-m", "copl_cli.main", *args]


def _train(env: FaultEnv, registry: Registry) -> list[str]:
    return _copl("train", "--db", env.db_url, "--registry", str(registry.root), "--profile", "tiny", "--no-progress")


def train_killed(env: FaultEnv, phase: str) -> Outcome:
    """`copl train` SIGKILLed during training (its staging directory exists) or during publishing (the
    release is written: metrics.json, the last file before release.json and the rename)."""
    marker = {"training": ".", "publishing": "metrics.json"}[phase]
    out = Outcome(f"train_killed_{phase}")
    scratch = env.scratch(out.name)
    registry = Registry(shutil.copytree(env.registry, scratch / "registry"))
    before, existing = registry.current_id(), {r.id for r in registry.list()}
    with Services(scratch, registry.root) as services:
        graph = services.add("graph")
        graph.wait_serving()
        train = subprocess.Popen(_train(env, registry), cwd=ROOT, env=service_env(scratch), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        staged = None
        while train.poll() is None and staged is None:
            staged = next((p for p in registry.root.glob(".staging-*") if (p / marker).exists()), None)
            time.sleep(0.005)
        train.send_signal(signal.SIGKILL)
        train.communicate(timeout=60)
        out.check(f"killed during {phase}", staged is not None and train.returncode == -signal.SIGKILL,
                  f"copl train exited {train.returncode} first")
        new = [r.id for r in registry.list() if r.id not in existing]
        out.notes.append(f"new release published before the kill: {new or 'none'}")
        out.check("CURRENT is the old release, or a complete new one", registry.current_id() in [before, *new])
        _serves(out, graph, registry)
        removed = registry.remove_stale()
        out.check("the next run removes the dead run's scratch", not list(registry.root.glob(".staging-*")),
                  f"left: {list(registry.root.glob('.staging-*'))}")
        out.notes.append(f"scratch entries removed: {[p.name for p in removed]}")
    return out


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def registry_disk_full(env: FaultEnv) -> Outcome:
    """The registry on a filesystem with room for the current release and little more (a tmpfs with a
    size): `copl train` fails in one line, leaves nothing behind, and the current release keeps serving."""
    out = Outcome("registry_disk_full")
    scratch = env.scratch(out.name)
    mount = scratch / "small-fs"
    mount.mkdir()
    size = _tree_bytes(env.registry) + (64 << 10)   # full before the new GNN is written: fails early
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        out.skipped = f"cannot mount a small tmpfs here (needs root): {made.stderr.strip()}"
        return out
    try:
        registry = Registry(shutil.copytree(env.registry, mount / "registry"))
        before = registry.current_id()
        with Services(scratch, registry.root) as services:
            graph = services.add("graph")
            graph.wait_serving()
            train = subprocess.run(_train(env, registry), cwd=ROOT, env=service_env(scratch), capture_output=True,
                                   text=True, timeout=1200)
            lines = [line for line in train.stderr.splitlines() if line.startswith("error:")]
            out.notes.append(f"copl train: exit {train.returncode}, {lines[-1] if lines else train.stderr[-300:]}")
            out.check("copl train fails with one line naming the full disk",
                      train.returncode == 1 and "Traceback" not in train.stderr and len(lines) == 1
                      and "No space left" in lines[0] and "unexpected" not in lines[0])
            out.check("CURRENT unchanged", registry.current_id() == before)
            out.check("nothing left behind", not list(registry.root.glob(".*")),
                      f"left: {list(registry.root.glob('.*'))}")
            _serves(out, graph, registry)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    return out


def corrupt_release(env: FaultEnv) -> Outcome:
    """CURRENT pointed at a release with a truncated weights file, then at one with a truncated release.json:
    both services refuse each (and log why), and go on serving the release they had."""
    out = Outcome("corrupt_release")
    scratch = env.scratch(out.name)
    registry = Registry(shutil.copytree(env.registry, scratch / "registry"))
    good = registry.current_id()
    users = env.trained_users()
    with Services(scratch, registry.root, release_poll_s=0.2) as services:
        graph, reward = services.graph_and_reward()
        with Load([("score", scorer_by_user(reward.port, users))], threads=1, interval_s=0.1) as load:
            truncated = copy_release(registry, good)
            for part in ("gnn/tables.safetensors", "reward/weights.safetensors"):
                (truncated.path / part).write_bytes((truncated.path / part).read_bytes()[:1000])
            registry.set_current(truncated.id)
            time.sleep(3.0)   # several polls; loading and refusing takes a moment
            unreadable = copy_release(registry, good)
            (unreadable.path / "release.json").write_text((unreadable.path / "release.json").read_text()[:40])
            (registry.root / "CURRENT").write_text(unreadable.id + "\n")   # by hand: set_current refuses it
            time.sleep(2.0)
        out.codes.update(r.code for r in load.results)
        _check_codes(out, load.results, {"OK"}, "scores")
        wrong = {r.release_id for r in load.results} - {good}
        out.check("every reply names the good release", not wrong, f"replies name {wrong}")
        for service, stub in ((graph, graph_pb2_grpc.GraphServiceStub), (reward, reward_pb2_grpc.RewardServiceStub)):
            out.check(f"{service.kind} still serves the good release", release_served(service.port, stub) == good)
            log = service.log.read_text()
            out.check(f"{service.kind} reports the truncated release",
                      truncated.id in log and "refus" in log, service.log_tail(500))
            out.check(f"{service.kind} reports the unreadable release.json", unreadable.id in log,
                      service.log_tail(500))
    return out


QUICK = ("database_down_postgres", "database_readonly_sqlite")
SCENARIOS: dict[str, Callable[[FaultEnv], Outcome]] = {
    "database_down_postgres": database_down_postgres,
    "database_readonly_sqlite": database_readonly_sqlite,
    "graph_killed": graph_killed,
    "reward_killed": reward_killed,
    "corrupt_release": corrupt_release,
    "train_killed_training": lambda env: train_killed(env, "training"),
    "train_killed_publishing": lambda env: train_killed(env, "publishing"),
    "registry_disk_full": registry_disk_full,
}


def summary(outcomes: list[Outcome]) -> dict:
    ran = [o for o in outcomes if o.skipped is None]
    recoveries = [o.recovery_s for o in ran if o.recovery_s is not None]
    return {"scenarios": len(ran), "passed": sum(o.passed for o in ran), "skipped": len(outcomes) - len(ran),
            "acknowledged_writes": sum(o.acknowledged_writes for o in ran),
            "lost_writes": sum(o.lost_writes for o in ran),
            "max_recovery_s": round(max(recoveries), 3) if recoveries else None,
            "failed": {o.name: o.failed_checks() for o in ran if not o.passed}}

