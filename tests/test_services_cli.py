"""`copl up` and `copl serve` as an operator runs them: real processes, stock health checks, SIGTERM."""
from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time

import grpc

from copl.v1 import graph_pb2, graph_pb2_grpc, reward_pb2, reward_pb2_grpc
from copl_cli.services import free_loopback_ports, is_serving
from copl_common.auth import bearer_metadata
from tests.service_harness import copy_registry

COPL = [sys.executable, "-m", "copl_cli.main"]


def _serving(port: int) -> bool:
    return is_serving(f"127.0.0.1:{port}")


def _env(home) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COPL_")}
    return {**env, "COPL_HOME": str(home), "HF_HUB_OFFLINE": "1"}


def test_copl_up_serves_both_and_stops_both_on_sigterm(tiny_release, tmp_path):
    registry = copy_registry(tiny_release.registry, tmp_path / "registry")
    graph_port, reward_port, graph_metrics, reward_metrics = free_loopback_ports(4)
    proc = subprocess.Popen([*COPL, "up", "--db", tiny_release.db_url, "--registry", str(registry.root),
                             "--graph-port", str(graph_port), "--reward-port", str(reward_port),
                             "--graph-metrics-port", str(graph_metrics), "--reward-metrics-port", str(reward_metrics)],
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (_serving(graph_port) and _serving(reward_port)):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "copl up did not serve in time"
            time.sleep(0.5)
        token_file = tmp_path / "write-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        record = tiny_release.dataset.test[0]
        with grpc.insecure_channel(f"127.0.0.1:{reward_port}") as channel:
            reply = reward_pb2_grpc.RewardServiceStub(channel).ScoreResponses(reward_pb2.ScoreRequest(
                user_id=record["user_id"], prompt=record["prompt"], responses=[record["chosen"], record["rejected"]]))
        assert reply.release_id == tiny_release.release.id
        with grpc.insecure_channel(f"127.0.0.1:{graph_port}") as channel:
            added = graph_pb2_grpc.GraphServiceStub(channel).AddPreferences(
                graph_pb2.AddPreferencesRequest(records=[graph_pb2.PreferenceRecord(
                    user_id=record["user_id"], prompt=record["prompt"], chosen=record["chosen"],
                    rejected=record["rejected"])]), metadata=bearer_metadata(token_file.read_text().strip()))
        assert added.inserted + added.duplicates == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "shutting down" in err and "Traceback" not in err
    assert not _serving(graph_port) and not _serving(reward_port)


def test_serve_reports_a_port_in_use_in_one_line(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    proc = subprocess.run([*COPL, "serve", "graph", "--graph-port", str(port), "--graph-metrics-port", "-1",
                           "--db", f"sqlite:///{tmp_path / 'store.db'}", "--registry", str(tmp_path / "registry")],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    busy.close()
    assert proc.returncode == 1
    assert f"error: graph service: Failed to bind to address 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
