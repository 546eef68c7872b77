"""`copl demo` as a user runs it: a real process that trains, starts both services as its children on
loopback, scores through gRPC and swaps a release under traffic; and Ctrl-C in the middle of it."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from trainer.synth import majority_bound

# A shell that starts a job in the background without job control (`make test &`, some CI runners) hands it SIGINT
# ignored, and Python then installs no KeyboardInterrupt handler, so the demo would not see our SIGINT at all. Ctrl-C
# in a terminal reaches a process whose SIGINT is at its default: run the demo that way, whatever started pytest.
_SIGINT_AS_IN_A_TERMINAL = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                            "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
COPL = [sys.executable, "-c", _SIGINT_AS_IN_A_TERMINAL, "-m", "copl_cli.main"]
RAY_WORKER_LINE = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+")
PIDS = re.compile(r"graph service pid (\d+) on .*, reward service pid (\d+) on ")
SWAP_LINE = re.compile(r"^\s*(\d+) requests, (\d+) failed, (\d+) mixed releases$", re.M)


def _env(home) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COPL_")}
    return {**env, "COPL_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a child that exited but was not reaped yet is a zombie: gone for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def _demo(tmp_path, *args):
    proc = subprocess.Popen([*COPL, "demo", "--workdir", str(tmp_path / "demo"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
    try:
        out, err = proc.communicate()
    finally:   # a test timeout: stop it as Ctrl-C does, so that it stops its services (SIGKILL would orphan them)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out


def _table(out: str) -> dict[str, list[str]]:
    """The accuracy table's rows by their label: the cells after it."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == ["all", "seen", "unseen", *line.split()[3:]])
    rows = {}
    for line in lines[start + 1:start + 5]:
        label, cells = re.match(r"^\s*(\D+?)\s{2,}(.*)$", line).groups()
        rows[label.strip()] = cells.split()
    return rows


def _check_clean_run(out: str) -> int:
    for n in range(1, 10):
        assert f"{n}/9 " in out, f"stage {n} missing"
    graph_pid, reward_pid = map(int, PIDS.search(out).groups())
    assert not _alive(graph_pid) and not _alive(reward_pid), "the demo left a service running"
    requests, failed, mixed = map(int, SWAP_LINE.search(out).groups())
    assert requests > 0 and failed == 0 and mixed == 0
    assert re.search(r"replies named releases \S+ then \S+;", out), "traffic must see both releases"
    assert "demo done in" in out
    return requests


def test_demo_smoke_size_through_the_services(tmp_path):
    """Every stage at a smoke size (uf-p-2, 16 users, 2 reward-model steps): the table, a clean swap under
    traffic, the plots, and no service left running."""
    out = _demo(tmp_path, "--preset", "uf-p-2", "--users", "16", "--reward-steps", "2")
    _check_clean_run(out)
    rows = _table(out)
    assert set(rows) == {"pairs", "CoPL (through gRPC)", "non-personalized baseline", "majority bound"}
    assert rows["pairs"][:3] == ["64", "56", "8"]      # 4 test pairs a user; 2 of 16 users arrive later
    assert all(0.0 <= float(c) <= 1.0 for c in rows["CoPL (through gRPC)"])
    plots = [line.strip() for line in out.splitlines() if line.strip().endswith(".png")]
    assert len(plots) == 3 and all(os.path.getsize(p) > 0 for p in plots)


@pytest.mark.slow
@pytest.mark.timeout(2400)   # about 15 minutes on 2 cores shared with other test runs
def test_demo_personalization_beats_the_baseline_through_the_services(tmp_path):
    """uf-p-2 with 200 users (720 seen test pairs) at the tiny profile: the personalized release, scored
    through gRPC, beats the non-personalized baseline on the seen users' pairs by more than luck explains.
    The directory holds an earlier demo's files, as after `make demo` twice: the demo starts over."""
    earlier = tmp_path / "demo"
    (earlier / "registry" / "releases" / "old").mkdir(parents=True)
    (earlier / "logs").mkdir()
    (earlier / "logs" / "reward.log").write_text("an earlier run's log\n")
    (earlier / "write-token").write_text("earlier-token\n")
    (earlier / ".copl-demo").write_text("made by `copl demo`\n")
    out = _demo(tmp_path, "--preset", "uf-p-2", "--users", "200", "--seed", "1")
    assert "old" not in os.listdir(earlier / "registry" / "releases")
    assert "an earlier run's log" not in (earlier / "logs" / "reward.log").read_text()
    _check_clean_run(out)
    rows = _table(out)
    n_seen = int(rows["pairs"][1])
    assert n_seen == 720
    copl_seen, base_seen = float(rows["CoPL (through gRPC)"][1]), float(rows["non-personalized baseline"][1])
    test = [json.loads(line) for line in open(tmp_path / "demo" / "dataset" / "test.jsonl")]
    bound = majority_bound(test)
    assert float(rows["majority bound"][0]) == pytest.approx(bound, abs=5e-4)
    # three standard errors of an accuracy near the bound on 720 pairs: chance passes this about once in 700
    margin = 3 * math.sqrt(bound * (1 - bound) / n_seen)
    assert copl_seen > base_seen + margin, (rows, margin)
    assert copl_seen > bound + margin, (rows, bound, margin)


def test_ctrl_c_mid_demo_stops_everything_and_exits_130(tmp_path):
    """SIGINT once both services run (the demo prints their pids): exit 130, no child left behind."""
    proc = subprocess.Popen([*COPL, "demo", "--workdir", str(tmp_path / "demo"), "--preset", "uf-p-2", "--users",
                             "24", "--reward-steps", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(tmp_path))
    pids = None
    try:
        deadline = time.monotonic() + 600
        for line in proc.stdout:
            if match := PIDS.search(line):
                pids = list(map(int, match.groups()))
                break
            assert time.monotonic() < deadline, "the services were not started in time"
        assert pids is not None, proc.stderr.read()[-3000:]
        assert all(_alive(pid) for pid in pids)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    # Ray's own processes may log tracebacks they recover from (e.g. a resource request that timed out on busy
    # cores), relayed with a "(ActorName pid=N)" prefix; none may come from the demo itself.
    ours = "\n".join(line for line in err.splitlines() if not RAY_WORKER_LINE.match(line))
    assert "interrupted" in err and "Traceback" not in ours, ours[-3000:]
    assert pids and not any(_alive(pid) for pid in pids), "a service outlived the demo"
