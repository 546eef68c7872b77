"""Real services and a real database as child processes, for fault tests and benchmarks: `copl serve graph`
and `copl serve reward` (each its own process, so a test can SIGKILL one), and a PostgreSQL instance of
the caller's own (initdb + pg_ctl on a free port in a scratch directory) that can be stopped and started.
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from copl_cli.services import free_loopback_ports, is_serving

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "fault-write-token-" + uuid.uuid4().hex[:16]


def prepare_release(workdir: Path) -> tuple[str, Path]:
    """(SQLite db url, registry) with a current tiny release (uf-p-2, 200 users, seed 1), trained in `workdir`
    on first use (about a minute on 2 cores) and reused afterwards."""
    from copl_common.registry import Registry
    registry, url = workdir / "registry", f"sqlite:///{(workdir / 'copl.db').resolve()}"
    if Registry(registry).current_id() is None:
        from graph_service.ingest import ingest_files
        from graph_service.store import PreferenceStore
        from trainer.pipeline import TrainRequest, train_release
        from trainer.synth import SynthConfig, generate, write
        print(f"training a tiny release once in {workdir} (about a minute)", file=sys.stderr)
        write(generate(SynthConfig(preset="uf-p-2", users=200, seed=1)), workdir / "dataset")
        with PreferenceStore(url) as store:
            ingest_files(store, [workdir / "dataset" / "train_seen.jsonl"], progress=False)
            train_release(TrainRequest(db_url=url, registry=registry, profile="tiny", progress=False))
    return url, registry


def serving(port: int, timeout: float = 1.0) -> bool:
    """Whether the server on loopback `port` answers the standard health check with SERVING."""
    return is_serving(f"127.0.0.1:{port}", timeout)


def service_env(workdir: Path, **settings) -> dict[str, str]:
    """The environment of a service process: COPL_* settings (upper-cased names), one torch thread, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COPL_")}
    env.update({"COPL_HOME": str(workdir), "COPL_WRITE_TOKEN": TOKEN, "COPL_TORCH_THREADS": "1",
                "COPL_GRAPH_METRICS_PORT": "-1", "COPL_REWARD_METRICS_PORT": "-1", "COPL_LOG_LEVEL": "WARNING",
                "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    env.update({f"COPL_{k.upper()}": str(v) for k, v in settings.items()})
    return env


class ServiceProcess:
    """`copl serve KIND` as a child process on a fixed port (a restart listens on the same one); its output
    goes to `log`."""

    def __init__(self, kind: str, port: int, env: dict[str, str], log: Path):
        self.kind, self.port, self.env, self.log = kind, port, {**env, f"COPL_{kind.upper()}_PORT": str(port)}, log
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> "ServiceProcess":
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "copl_cli.main", "serve", self.kind], env=self.env,
                                         cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        return self

    def wait_serving(self, timeout: float = 300.0) -> float:
        """Seconds until the health check says SERVING; RuntimeError (with the log's tail) if it never does."""
        started = time.monotonic()
        while not serving(self.port):
            if self.proc is None or self.proc.poll() is not None or time.monotonic() - started > timeout:
                raise RuntimeError(f"{self.kind} service did not serve: {self.log_tail()}")
            time.sleep(0.1)
        return time.monotonic() - started

    def log_tail(self, chars: int = 2000) -> str:
        return self.log.read_text()[-chars:] if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown, no drain."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else (Path(p).parent if (p := shutil.which("pg_ctl")) else None)


class OwnPostgres:
    """A PostgreSQL server of the caller's own, on a free loopback port, in a scratch directory; `stop()`
    crashes it (immediate mode: no checkpoint, recovery from the WAL on the next start). PostgreSQL refuses
    to run as root, so as root it runs as the `postgres` user."""

    def __init__(self):
        self.bin = postgres_bin()
        if self.bin is None:
            raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
        self.port = free_loopback_ports(1)[0]
        self.root = Path(tempfile.mkdtemp(prefix="copl-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self._as = []
        if os.geteuid() == 0:
            import pwd
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        proc = subprocess.run([*self._as, str(self.bin / tool), *args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed: {proc.stderr.strip() or proc.stdout.strip()}")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "start")

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def close(self) -> None:
        try:
            self.stop("fast")
        except RuntimeError:
            pass   # not running
        shutil.rmtree(self.root, ignore_errors=True)


def copy_release(registry, release_id: str, corrupt: str | None = None):
    """A copy of a release under a new id (not made current); `corrupt` names a file of it to damage."""
    copy = registry.publish_copy(registry.get(release_id), make_current=False)
    if corrupt is not None:
        data = bytearray((copy.path / corrupt).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy.path / corrupt).write_bytes(bytes(data))
    return copy
