"""Dynamic batching across callers, in plain asyncio (the shape of Ray Serve's @serve.batch, with a token
budget as TEI's `max_batch_tokens` and a queue delay as Triton's `max_queue_delay_microseconds`).

Callers `await batcher.score(...)`: their request joins a queue and they wait on a future. One loop takes
requests from the queue in arrival order while the batch's cost (pairs x longest sequence, i.e. the padded
tokens of one forward pass) stays within `max_batch_tokens`; when the model is idle it waits up to
`max_queue_delay_ms` after the first request for others to join. The batch, mixing users, runs as ONE
forward pass in ONE worker thread that owns the models (MoLE's routing state lives on the modules, so two
forward passes must never overlap), and each future gets its own slice of the scores.

A batch holds requests of one release only (requests carry the model they started with, so a hot swap
never mixes releases within a pass). A request larger than the budget runs alone. The queue is bounded by
`max_queue_pairs`: past it, callers get RESOURCE_EXHAUSTED at once rather than an unbounded wait.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Gauge, Histogram

from copl_common.errors import ResourceExhausted
from copl_common.observability import LATENCY_BUCKETS

log = logging.getLogger("copl.reward.batcher")

# A forward pass: the jobs of one batch (same `model`) -> their scores, concatenated in job order.
ForwardFn = Callable[[Sequence["ScoreJob"]], torch.Tensor]


@dataclass(eq=False)
class ScoreJob:
    model: Any                          # what `forward` runs: the release the request started with
    encoding: dict[str, list[list[int]]]  # token ids of the request's (prompt, response) pairs, unpadded
    user_emb: torch.Tensor | None       # (d_user,) for every pair of the request; None for a baseline model
    pairs: int
    longest: int                        # tokens of the request's longest sequence
    future: asyncio.Future = field(repr=False, default=None)
    enqueued: float = 0.0


class DynamicBatcher:
    def __init__(self, forward: ForwardFn, max_batch_tokens: int, max_queue_delay_ms: float, max_queue_pairs: int,
                 registry: CollectorRegistry | None = None, torch_threads: int = 0):
        self._forward = forward
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_delay_s = max_queue_delay_ms / 1e3
        self.max_queue_pairs = max_queue_pairs
        self._pending: deque[ScoreJob] = deque()
        self._queued_pairs = 0
        self._arrived = asyncio.Event()
        # The model's one owner. Intra-op threads are a per-thread setting in torch's OpenMP backend: set them here.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="copl-model",
                                          initializer=torch.set_num_threads if torch_threads else None,
                                          initargs=(torch_threads,) if torch_threads else ())
        self._loop_task: asyncio.Task | None = None
        self.queue_depth = Gauge("copl_queue_depth", "Pairs waiting for the model.", registry=registry)
        self.batch_pairs = Histogram("copl_batch_size", "Pairs per forward pass.", registry=registry,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.batch_tokens = Histogram("copl_batch_tokens", "Padded tokens per forward pass.", registry=registry,
                                      buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536))
        self.queue_seconds = Histogram("copl_queue_duration_seconds", "Time requests wait before their forward pass.",
                                       buckets=LATENCY_BUCKETS, registry=registry)
        self.inference_seconds = Histogram("copl_inference_duration_seconds", "Time of one forward pass.",
                                           buckets=LATENCY_BUCKETS, registry=registry)

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="copl-batcher")

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self._worker.shutdown(wait=True)

    async def run_in_worker(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the model's thread (warm-up of a new release, never beside a forward pass)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn)

    async def score(self, model: Any, encoding: dict[str, list[list[int]]], user_emb: torch.Tensor | None) -> list[float]:
        """Scores of one request's pairs, computed in a batch with whoever else is waiting."""
        pairs = len(encoding["input_ids"])
        if self._queued_pairs + pairs > self.max_queue_pairs:
            raise ResourceExhausted(f"the scoring queue is full ({self._queued_pairs} pairs waiting, limit "
                                    f"{self.max_queue_pairs}); retry with backoff")
        job = ScoreJob(model, encoding, user_emb, pairs, max(map(len, encoding["input_ids"])),
                       asyncio.get_running_loop().create_future(), time.perf_counter())
        self._pending.append(job)
        self._queued_pairs += pairs
        self.queue_depth.set(self._queued_pairs)
        self._arrived.set()
        return await job.future

    def _take(self, job: ScoreJob) -> None:
        self._queued_pairs -= job.pairs

    def _next_batch(self, batch: list[ScoreJob]) -> bool:
        """Move queued jobs into `batch` while they fit; True when the batch can take no more."""
        while self._pending:
            job = self._pending[0]
            if job.future.done():  # the caller went away (deadline, cancel): skip its work
                self._take(self._pending.popleft())
                continue
            rows = sum(j.pairs for j in batch) + job.pairs
            longest = max(max(j.longest for j in batch), job.longest)
            if job.model is not batch[0].model or rows * longest > self.max_batch_tokens:
                return True
            batch.append(self._pending.popleft())
            self._take(job)
        return False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            first = self._pending.popleft()
            self._take(first)
            if first.future.done():
                continue
            batch = [first]
            deadline = first.enqueued + self.max_queue_delay_s
            while not self._next_batch(batch) and (wait := deadline - time.perf_counter()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), wait)
                except TimeoutError:
                    pass
            self._next_batch(batch)
            self.queue_depth.set(self._queued_pairs)
            await self._execute(loop, batch)

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[ScoreJob]) -> None:
        started = time.perf_counter()
        for job in batch:
            self.queue_seconds.observe(started - job.enqueued)
        pairs = sum(j.pairs for j in batch)
        self.batch_pairs.observe(pairs)
        self.batch_tokens.observe(pairs * max(j.longest for j in batch))
        try:
            scores = await loop.run_in_executor(self._worker, self._forward, batch)
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the failure (INTERNAL)
            log.error("forward pass of %d pairs failed", pairs, exc_info=exc)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        self.inference_seconds.observe(time.perf_counter() - started)
        values = scores.tolist()
        at = 0
        for job in batch:
            if not job.future.done():
                job.future.set_result(values[at:at + job.pairs])
            at += job.pairs
