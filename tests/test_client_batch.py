"""The batch-job guarantee end to end: `copl score` over a JSONL file while a real reward-service process is
killed (SIGKILL) and started again on the same port, then the job itself is killed and resumed: every row
ends up in the output exactly once, scored by the release being served."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from copl_client import Client
from tests.service_harness import TOKEN, ServiceLoop, copy_registry, settings_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RewardProcess:
    """`copl serve reward` as a child process on a fixed port."""

    def __init__(self, port: int, graph_port: int, registry: Path, db_url: str, log: Path):
        self.port, self.log = port, log
        self.command = [sys.executable, "-m", "copl_cli.main", "serve", "reward", "--host", "127.0.0.1",
                        "--reward-port", str(port), "--graph-target", f"127.0.0.1:{graph_port}",
                        "--registry", str(registry), "--db", db_url, "--reward-metrics-port", "-1"]
        self.env = {**os.environ, "COPL_WRITE_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> float:
        """Start it and wait until its health check says SERVING; return how long that took."""
        start = time.monotonic()
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() - start < timeout:
                assert self.process.poll() is None, self.log.read_text()[-3000:]
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - start
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"the reward service did not start in {timeout} s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _wait_for_lines(path: Path, n: int, job: subprocess.Popen, timeout: float = 300) -> None:
    start = time.monotonic()
    while _lines(path) < n:
        assert job.poll() is None or _lines(path) >= n, f"the job ended early: {job.returncode}"
        assert time.monotonic() - start < timeout, f"{_lines(path)} of {n} lines after {timeout} s"
        time.sleep(0.05)


@pytest.mark.parametrize("rows", [pytest.param(1_000, id="1k"), pytest.param(10_000, id="10k", marks=pytest.mark.slow)])
def test_batch_job_survives_a_reward_service_restart_and_its_own_crash(tiny_release, tmp_path, rows):
    loop = ServiceLoop()
    registry = copy_registry(tiny_release.registry, tmp_path / "registry")
    graph = loop.graph(settings_for(tiny_release.db_url, registry.root))
    reward = RewardProcess(_free_port(), graph.port, registry.root, tiny_release.db_url, tmp_path / "reward.log")
    target = f"grpc://127.0.0.1:{reward.port}"
    users = sorted({r["user_id"] for r in tiny_release.dataset.train_seen + tiny_release.dataset.train_unseen})
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    with open(src, "w") as fh:      # short texts: the guarantee is under test, not the model's speed
        for i in range(rows):
            fh.write(json.dumps({"id": f"row-{i}", "user_id": users[i % len(users)], "prompt": f"question {i % 50}",
                                 "responses": [f"answer {i % 7}"]}) + "\n")
    job_command = [sys.executable, "-m", "copl_cli.main", "score", str(src), str(out), "--target", target,
                   "--concurrency", "64", "--no-progress", "--max-stall", "180"]
    try:
        first_start = reward.start()
        job = subprocess.Popen(job_command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_lines(out, rows // 4, job)
        reward.kill()                                  # the reward service dies in the middle of the job ...
        at_kill = _lines(out)
        restart = reward.start()                       # ... and comes back on the same port
        _wait_for_lines(out, rows * 6 // 10, job)      # the job went on through the restart
        assert _lines(out) > at_kill
        job.send_signal(signal.SIGKILL)                # then the job itself crashes,
        job.wait()
        with open(out, "ab") as fh:                    # in the middle of writing a line
            fh.write(b'{"line": 7, "id": "row-')
        resumed = subprocess.run(job_command, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr
        summary = json.loads(resumed.stdout.strip().splitlines()[-1])
        print(f"{rows} rows: reward service start {first_start:.1f} s, restart {restart:.1f} s; resumed: {summary}")
        assert summary["repaired"] and summary["failed"] == 0
        assert summary["already_done"] >= rows * 6 // 10 and summary["already_done"] + summary["scored"] == rows

        results = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(r["id"] for r in results) == sorted(f"row-{i}" for i in range(rows))   # each row once
        assert [r["line"] for r in results] == list(range(1, rows + 1))                      # in input order
        assert all(r["release_id"] == tiny_release.release.id and len(r["scores"]) == 1 for r in results)
        with Client(reward=target) as client:           # the scores are the service's scores for those rows
            for r in results[:: rows // 10]:
                i = r["line"] - 1
                again = client.score(users[i % len(users)], f"question {i % 50}", [f"answer {i % 7}"])
                assert again.scores == pytest.approx(r["scores"], rel=0.02, abs=0.05)
    finally:
        reward.stop()
        loop.close()
