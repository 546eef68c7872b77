"""The release a service serves, and hot swaps to the next one.

A service hands the holder a `load(release) -> T` function that loads, validates (checksums, the parts
belong together, a smoke score) and warms what it needs; the holder runs it off the event loop, then
swaps ONE reference. A request takes the reference once, at its start (`require`), and keeps it, so
in-flight requests finish on the release they started with. A release whose load fails is refused,
logged and counted (copl_release_refused_total), and the old one keeps serving.

The holder watches the registry's CURRENT pointer by polling and acts when it changes; `reload()` (the
AdminService.Reload call) looks at once, or loads a named release. The graph service keeps the previous
release for a grace period (`keep_previous_s`), so a reward service that has not swapped yet still gets
embeddings of its own release.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from copl_common.errors import FailedPrecondition, NotFound
from copl_common.observability import ServiceMetrics
from copl_common.registry import Registry, RegistryError, Release

T = TypeVar("T")


@dataclass(frozen=True)
class Loaded(Generic[T]):
    release: Release
    value: T

    @property
    def id(self) -> str:
        return self.release.id


@dataclass(frozen=True)
class ReloadResult:
    release_id: str
    swapped: bool
    previous_release_id: str


class ReleaseHolder(Generic[T]):
    def __init__(self, registry: Registry, load: Callable[[Release], T], metrics: ServiceMetrics,
                 log: logging.Logger, keep_previous_s: float = 0.0,
                 before_swap: Callable[[Release], Awaitable[None]] | None = None,
                 on_swap: Callable[[Loaded[T]], Awaitable[None]] | None = None):
        self.registry = registry
        self._load = load
        self._metrics = metrics
        self._log = log
        self._keep_previous_s = keep_previous_s
        self._before_swap = before_swap  # e.g. the reward service waits for the graph service to serve it
        self._on_swap = on_swap          # e.g. health -> SERVING
        self._current: Loaded[T] | None = None
        self._retained: dict[str, tuple[Loaded[T], float]] = {}  # release id -> (loaded, monotonic expiry)
        self._lock = asyncio.Lock()  # one load at a time
        self._last_pointer: str | None = None

    @property
    def current(self) -> Loaded[T] | None:
        return self._current

    @property
    def pointer_seen(self) -> str | None:
        """The registry's CURRENT value as of the last look (the watcher acts when it changes)."""
        return self._last_pointer

    def require(self, release_id: str = "") -> Loaded[T]:
        """The current release, or the named one while this service still holds it; FailedPrecondition otherwise."""
        current = self._current
        if current is None:
            raise FailedPrecondition("no release loaded yet: train one (`copl train`) or wait for the registry poll")
        if not release_id or release_id == current.id:
            return current
        kept = self._retained.get(release_id)
        if kept is not None and kept[1] > time.monotonic():
            return kept[0]
        raise FailedPrecondition(f"release {release_id} is not served here (serving {current.id})")

    def serving_ids(self) -> list[str]:
        """The current release first, then the retained ones still in their grace period."""
        if self._current is None:
            return []
        now = time.monotonic()
        return [self._current.id] + [i for i, (_, expiry) in self._retained.items() if expiry > now]

    async def reload(self, release_id: str = "") -> ReloadResult:
        """Load and swap in `release_id` (empty: the registry's CURRENT). FailedPrecondition if it is refused."""
        async with self._lock:
            if not release_id:
                release_id = self.registry.current_id() or ""
                if not release_id:
                    raise FailedPrecondition(f"the registry {self.registry.root} has no current release")
                self._last_pointer = release_id
            current = self._current
            if current is not None and current.id == release_id:
                return ReloadResult(release_id, False, current.id)
            try:
                release = self.registry.get(release_id)
            except RegistryError as exc:
                self._metrics.release_refused.inc()
                self._log.error("release %s refused: %s", release_id, exc)
                raise NotFound(str(exc)) from None
            started = time.perf_counter()
            try:
                value = await asyncio.to_thread(self._load, release)
            except Exception as exc:  # noqa: BLE001 - any failure to load is a refusal; the old release serves on
                self._metrics.release_refused.inc()
                self._log.error("release %s refused: %s; still serving %s", release_id, exc,
                                current.id if current else "nothing")
                raise FailedPrecondition(f"release {release_id} refused: {exc}") from None
            if self._before_swap is not None:
                await self._before_swap(release)
            loaded = Loaded(release, value)
            self._current = loaded
            if current is not None and self._keep_previous_s > 0:
                self._retained[current.id] = (current, time.monotonic() + self._keep_previous_s)
            self._retained.pop(release_id, None)
            self._prune()
            self._metrics.set_release(release_id, current.id if current else None)
            self._metrics.release_swaps.inc()
            self._log.info("serving release %s (was %s; loaded and warmed in %.1f s)", release_id,
                           current.id if current else "nothing", time.perf_counter() - started)
            if self._on_swap is not None:
                await self._on_swap(loaded)
            return ReloadResult(release_id, True, current.id if current else "")

    def _prune(self) -> None:
        now = time.monotonic()
        for key in [k for k, (_, expiry) in self._retained.items() if expiry <= now]:
            del self._retained[key]

    async def poll_once(self) -> None:
        """Swap when the registry's CURRENT pointer has moved since the last look."""
        try:
            pointer = self.registry.current_id()
        except OSError as exc:
            self._log.warning("cannot read the registry pointer: %s", exc)
            return
        self._prune()
        if pointer is None or pointer == self._last_pointer:
            return
        self._last_pointer = pointer  # a refused release is not retried until the pointer moves (or Reload)
        try:
            await self.reload(pointer)
        except (FailedPrecondition, NotFound):
            pass  # logged and counted by reload

    async def watch(self, poll_s: float) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(poll_s)
