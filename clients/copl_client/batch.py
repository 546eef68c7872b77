"""Batch scoring over `RewardService.ScoreResponsesStream`: bounded in-flight work, results in input order,
and no item lost or answered twice when a reward service goes away in the middle.

One stream ("lane") per reward-service address. Items wait in one priority queue keyed by their position;
each lane sends from it and remembers what it sent and has no answer for yet. The server answers a stream's
requests in order, so each answer is matched to the oldest unanswered request of its lane. When a lane's
stream fails with UNAVAILABLE (the server was killed or is restarting), its unanswered items go back into
the queue, where their low positions put them first in line, and the lane opens a new stream after a
backoff. A semaphore of `concurrency` slots, taken when an item is read from the input and given back when
its result is consumed, bounds both the requests in flight and the results waiting to be emitted in order.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping

import grpc

from copl.v1 import reward_pb2, reward_pb2_grpc
from copl_client.errors import ServerError, Unavailable, from_rpc_error
from copl_client.results import EmbeddingSource, ItemError, ItemResult, ScoreItem

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is optional: no progress bar without it
    tqdm = None

_END = object()


class BatchJob:
    """One `score_many` run. Use `results()` once."""

    def __init__(self, client, items: Iterable | AsyncIterable, *, concurrency: int, progress: bool,
                 total: int | None, max_stall_s: float):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._client, self._pool, self._items = client, client.reward, items
        self._max_stall_s = max_stall_s
        self._slots = asyncio.Semaphore(concurrency)
        self._queue: asyncio.PriorityQueue[tuple[int, reward_pb2.ScoreRequest]] = asyncio.PriorityQueue()
        self._ids: dict[int, object] = {}          # position -> the item's own id
        self._ready: dict[int, ItemResult] = {}    # answered, waiting for the items before them
        self._next = 0                             # the position of the next result to emit
        self._fed: int | None = None               # the number of items, once the input is read to its end
        self._out: asyncio.Queue = asyncio.Queue()
        self._last_progress = 0.0
        self._bar = tqdm(total=total, unit="item", desc="score", disable=not progress) if tqdm else None

    async def results(self) -> AsyncIterator[ItemResult]:
        self._last_progress = asyncio.get_running_loop().time()
        tasks = [asyncio.create_task(self._guard(self._feed()))]
        tasks += [asyncio.create_task(self._guard(self._lane())) for _ in range(len(self._pool))]
        try:
            while (result := await self._out.get()) is not _END:
                if isinstance(result, BaseException):
                    raise result
                self._slots.release()
                if self._bar is not None:
                    self._bar.update()
                yield result
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._bar is not None:
                self._bar.close()

    async def _guard(self, work) -> None:
        """Any failure of the feeder or a lane ends the job with that error."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._out.put_nowait(exc)

    async def _feed(self) -> None:
        position = 0
        async for item in _aiter(self._items):
            await self._slots.acquire()
            try:
                item = item if isinstance(item, ScoreItem) else ScoreItem.from_json(item)
                request = item.to_proto()
            except (ValueError, TypeError, KeyError) as exc:   # a malformed item fails alone, never sent
                self._ids[position] = item.get("id") if isinstance(item, Mapping) else getattr(item, "id", None)
                self._resolve(position, error=ItemError("INVALID_ARGUMENT", str(exc)))
            else:
                request.request_id = str(position)
                self._ids[position] = item.id
                self._queue.put_nowait((position, request))
            position += 1
        self._fed = position
        self._maybe_end()

    async def _lane(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            ep = await self._pool.acquire()
            if ep is not None:
                opened = loop.time()
                pending: deque[tuple[int, reward_pb2.ScoreRequest]] = deque()
                call = ep.method(reward_pb2_grpc.RewardServiceStub, "ScoreResponsesStream")(
                    metadata=self._client.metadata)
                write_failed = asyncio.Event()
                sender = asyncio.create_task(self._send(call, pending, write_failed))
                try:
                    why = f"{ep.target}: " + await self._receive(call, pending)
                except grpc.aio.AioRpcError as exc:
                    # grpc.aio marks a call INTERNAL when one of its writes fails because the server closed
                    # the stream or died; the server's own status is then lost. That is a broken stream.
                    broken = exc.code() == grpc.StatusCode.INTERNAL and write_failed.is_set()
                    if exc.code() != grpc.StatusCode.UNAVAILABLE and not broken:
                        raise from_rpc_error(exc) from None
                    why = f"{ep.target}: {exc.details()}"
                finally:
                    call.cancel()              # first: it ends a write in progress, then the task
                    sender.cancel()
                    with contextlib.suppress(BaseException):
                        await sender
                    for entry in pending:     # unanswered: send again, on the next stream
                        self._queue.put_nowait(entry)
                self._pool.mark_down(ep)
                if self._last_progress > opened:
                    failures = 0       # the stream answered some: back off from the start
            else:
                why = "no healthy reward service"
            failures += 1
            if loop.time() - self._last_progress > self._max_stall_s:
                raise Unavailable(grpc.StatusCode.UNAVAILABLE,
                                  f"no reply for {self._max_stall_s:.0f} s ({why})")
            await asyncio.sleep(self._client.retry.backoff(failures))

    async def _receive(self, call, pending: deque) -> str:
        """Read answers until the stream ends or stalls with requests unanswered; say which."""
        while True:
            reply = await self._read(call, self._max_stall_s if pending else None)
            if reply is None:
                return f"no reply for {self._max_stall_s:.0f} s"
            if reply is grpc.aio.EOF:
                return "the server closed the stream"   # anything unanswered is sent again
            if not pending:
                raise ServerError(grpc.StatusCode.INTERNAL, "the reward service answered a request never sent")
            position, _ = pending.popleft()
            if reply.request_id and reply.request_id != str(position):
                raise ServerError(grpc.StatusCode.INTERNAL,
                                  f"out-of-order answer: got request {reply.request_id}, expected {position}")
            self._last_progress = asyncio.get_running_loop().time()
            if reply.HasField("error") and reply.error.code:
                self._resolve(position, error=ItemError(reply.error.code, reply.error.message))
            else:
                self._resolve(position, scores=tuple(reply.scores), release_id=reply.release_id,
                              embedding_source=EmbeddingSource.from_proto(reply.embedding_source))

    @staticmethod
    async def _read(call, timeout: float | None):
        """The stream's next message, or None after `timeout` s. A pending read is never cancelled itself
        (grpc.aio may then wait forever): the call is cancelled, which ends the read."""
        read = asyncio.ensure_future(call.read())
        try:
            done, _ = await asyncio.wait({read}, timeout=timeout)
        finally:
            if not read.done():
                call.cancel()
                await asyncio.wait({read})
                if not read.cancelled():
                    read.exception()   # retrieved: the call was given up on purpose
        return read.result() if done else None

    async def _send(self, call, pending: deque, write_failed: asyncio.Event) -> None:
        while True:
            entry = await self._queue.get()
            pending.append(entry)      # before the write: if the stream breaks now, the item is sent again
            try:
                await call.write(entry[1])
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                write_failed.set()     # the reader sees the call's end and says why
                return

    def _resolve(self, position: int, **fields) -> None:
        if position < self._next or position in self._ready:
            return                     # answered twice (sent again after a failure): keep the first
        self._ready[position] = ItemResult(index=position, id=self._ids.pop(position, None), **fields)
        while self._next in self._ready:
            self._out.put_nowait(self._ready.pop(self._next))
            self._next += 1
        self._maybe_end()

    def _maybe_end(self) -> None:
        if self._fed is not None and self._next == self._fed:
            self._out.put_nowait(_END)


async def _aiter(items):
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
