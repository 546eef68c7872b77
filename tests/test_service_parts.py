"""The services' plain-Python parts: the dynamic batcher, settings, the write token, and the interceptor's
mapping of failures to statuses (on a real grpc.aio server)."""
from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from copl.v1 import common_pb2, common_pb2_grpc
from copl_common.auth import TokenTable, bearer_metadata, load_write_token
from copl_common.errors import NotFound, ResourceExhausted
from copl_common.server import GrpcServer
from copl_common.service_settings import ServiceSettings, load_settings, settings_table
from reward_service.batcher import DynamicBatcher

README = Path(__file__).resolve().parents[1] / "README.md"


# -- the dynamic batcher -------------------------------------------------------------------------------

class Recorder:
    """A forward pass that scores each pair with its user's first embedding value, records every batch,
    and checks that no two passes ever overlap."""

    def __init__(self, hold: threading.Event | None = None):
        self.batches: list[list[int]] = []
        self.active = 0
        self.overlapped = False
        self.hold = hold

    def __call__(self, jobs) -> torch.Tensor:
        self.active += 1
        self.overlapped |= self.active > 1
        if self.hold is not None:
            self.hold.wait(10)
        time.sleep(0.01)
        self.batches.append([j.pairs for j in jobs])
        self.active -= 1
        return torch.cat([j.user_emb[0].expand(j.pairs) + torch.arange(j.pairs) for j in jobs])


def _encoding(pairs: int, tokens: int) -> dict:
    return {"input_ids": [[1] * tokens for _ in range(pairs)], "attention_mask": [[1] * tokens for _ in range(pairs)]}


def _run(coro):
    return asyncio.run(coro)


def test_batcher_mixes_callers_in_one_pass_and_returns_each_its_slice():
    async def main():
        forward = Recorder()
        batcher = DynamicBatcher(forward, max_batch_tokens=10_000, max_queue_delay_ms=50, max_queue_pairs=100)
        batcher.start()
        model = object()
        results = await asyncio.gather(*[batcher.score(model, _encoding(n, 8), torch.tensor([100.0 * i]))
                                         for i, n in enumerate([1, 3, 2, 1])])
        await batcher.close()
        return forward, results

    forward, results = _run(main())
    assert forward.batches == [[1, 3, 2, 1]]   # one pass for all four callers
    assert results == [[0.0], [100.0, 101.0, 102.0], [200.0, 201.0], [300.0]]


def test_batcher_keeps_to_the_token_budget_and_one_model_per_pass():
    async def main():
        forward = Recorder()
        batcher = DynamicBatcher(forward, max_batch_tokens=40, max_queue_delay_ms=50, max_queue_pairs=100)
        batcher.start()
        a, b = object(), object()
        calls = [(a, 2, 10), (a, 2, 10), (a, 1, 10), (b, 1, 10), (a, 8, 10)]   # 2x10 + 2x10 = 40 tokens: full
        results = await asyncio.gather(*[batcher.score(m, _encoding(n, t), torch.tensor([0.0])) for m, n, t in calls])
        await batcher.close()
        return forward, results

    forward, results = _run(main())
    # [a 2, a 2] fills 40 tokens; [a 1] stops at model b; [b 1]; [a 8] is over budget on its own and runs alone
    assert forward.batches == [[2, 2], [1], [1], [8]]
    assert [len(r) for r in results] == [2, 2, 1, 1, 8]
    assert not forward.overlapped


def test_batcher_queue_full_is_resource_exhausted_and_passes_never_overlap():
    async def main():
        hold = threading.Event()
        forward = Recorder(hold)
        batcher = DynamicBatcher(forward, max_batch_tokens=16, max_queue_delay_ms=0, max_queue_pairs=4)
        batcher.start()
        model = object()
        first = asyncio.ensure_future(batcher.score(model, _encoding(2, 8), torch.tensor([1.0])))
        await asyncio.sleep(0.1)    # the first pass is running (held); these wait in the queue
        waiting = [asyncio.ensure_future(batcher.score(model, _encoding(2, 8), torch.tensor([2.0]))) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(ResourceExhausted, match="queue is full"):
            await batcher.score(model, _encoding(1, 8), torch.tensor([3.0]))
        hold.set()
        done = await asyncio.gather(first, *waiting)
        await batcher.close()
        return forward, done

    forward, done = _run(main())
    assert done == [[1.0, 2.0], [2.0, 3.0], [2.0, 3.0]]
    assert not forward.overlapped and forward.batches == [[2], [2], [2]]


# -- settings --------------------------------------------------------------------------------------

def test_settings_from_defaults_environment_and_flags():
    settings = load_settings({"reward_port": 7000}, environ={"COPL_GRAPH_PORT": "6000", "COPL_REWARD_PORT": "6001",
                                                             "COPL_MAX_QUEUE_DELAY_MS": "0.5"})
    assert (settings.graph_port, settings.reward_port, settings.max_queue_delay_ms) == (6000, 7000, 0.5)
    assert settings.graph_address == "127.0.0.1:6000"
    with pytest.raises(ValueError, match="COPL_MAX_BATCH_TOKENS='many' is not a valid int"):
        load_settings(environ={"COPL_MAX_BATCH_TOKENS": "many"})
    with pytest.raises(ValueError, match="max_batch_tokens must be > 0"):
        ServiceSettings(max_batch_tokens=0)


def test_readme_documents_every_setting():
    assert settings_table() in README.read_text(), "README's settings table is out of date: paste settings_table()"


# -- the write token -------------------------------------------------------------------------------

def test_write_token_file_is_created_private_and_the_environment_wins(tmp_path):
    path = tmp_path / "home" / "write-token"
    token = load_write_token(path, environ={})
    assert len(token) >= 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_write_token(path, environ={}) == token
    assert load_write_token(path, environ={"COPL_WRITE_TOKEN": "from-the-environment-123"}) == "from-the-environment-123"
    path.write_text("short\n")
    with pytest.raises(ValueError, match="shorter than 16"):
        load_write_token(path, environ={})


# -- failures -> statuses, on a real server ----------------------------------------------------------

class _FailingAdmin(common_pb2_grpc.AdminServiceServicer):
    async def Reload(self, request, context):
        if request.release_id == "missing":
            raise NotFound("no release missing")
        raise RuntimeError("something we did not expect, with a secret detail")


def test_unexpected_failures_are_internal_with_a_request_id_never_unknown(tmp_path):
    token = "interceptor-test-token"

    async def main():
        server = GrpcServer("test", ServiceSettings(), TokenTable.fixed(token), [], logging.getLogger("test"))
        common_pb2_grpc.add_AdminServiceServicer_to_server(_FailingAdmin(), server.server)
        port = await server.start(0, -1)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            admin = common_pb2_grpc.AdminServiceStub(channel)
            metadata = (*bearer_metadata(token), ("x-request-id", "caller-chosen-id"))
            out = []
            for release_id in ("boom", "missing"):
                call = admin.Reload(common_pb2.ReloadRequest(release_id=release_id), metadata=metadata)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                out.append((info.value.code(), info.value.details(), dict(await call.trailing_metadata())))
        await server.stop()
        samples = {s.labels["grpc_code"]: s.value for m in server.metrics.registry.collect()
                   if m.name == "grpc_server_handled" for s in m.samples if s.name.endswith("_total")}
        return out, samples

    (internal, not_found), handled = _run(main())
    assert internal[0] == grpc.StatusCode.INTERNAL
    assert "request id caller-chosen-id" in internal[1] and "secret" not in internal[1]
    assert internal[2]["x-request-id"] == "caller-chosen-id"
    assert not_found[0] == grpc.StatusCode.NOT_FOUND and not_found[1] == "no release missing"
    assert handled == {"INTERNAL": 1.0, "NOT_FOUND": 1.0}
