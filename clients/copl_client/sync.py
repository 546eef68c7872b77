"""The blocking client: `Client`, the asyncio client run on a private event-loop thread.

One implementation of every call (aio.py) serves both; the blocking methods carry the asyncio ones'
signatures and docstrings. A `Client` may be shared by threads, and works inside a program that runs an
event loop of its own (a notebook), since it never touches the caller's loop.
"""
from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Iterator

from copl_client.aio import AsyncClient
from copl_client.results import ItemResult


def _blocking(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return self._run(method(self._aio, *args, **kwargs))
    return call


class Client:
    """A client of the CoPL graph and reward services (blocking calls). Takes the arguments of `AsyncClient`.

    ```
    with Client(reward="grpc://127.0.0.1:50052", graph="grpc://127.0.0.1:50051") as client:
        client.score("alice", "Explain TLS.", ["short answer", "long answer"]).scores
    ```
    """

    def __init__(self, *args, **kwargs):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="copl-client", daemon=True)
        self._thread.start()
        self._aio = AsyncClient(*args, **kwargs)

    def _run(self, coro):
        if self._loop.is_closed():
            coro.close()
            raise RuntimeError("the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close every channel and stop the client's thread."""
        if self._loop.is_closed():
            return
        self._run(self._aio.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    score = _blocking(AsyncClient.score)
    embeddings = _blocking(AsyncClient.embeddings)
    add_preferences = _blocking(AsyncClient.add_preferences)
    release_info = _blocking(AsyncClient.release_info)
    reload = _blocking(AsyncClient.reload)
    score_many = _blocking(AsyncClient.score_many)
    score_file = _blocking(AsyncClient.score_file)

    @functools.wraps(AsyncClient.iter_score_many)
    def iter_score_many(self, items, **kwargs) -> Iterator[ItemResult]:
        results = self._aio.iter_score_many(items, **kwargs)
        try:
            while True:
                try:
                    yield self._run(results.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if not self._loop.is_closed():
                self._run(results.aclose())
