"""Debounced pushes: merge change events, build one PushContext, fan it out.

Istio's debounce: a push waits for a quiet period (`debounce_after`, 100 ms) after
the last change, but never longer than `debounce_max` (10 s) after the first one.
Changes that arrive while a push is being built go into the next push, so a storm of
changes costs a few pushes, not one per change.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import structlog

from meshpilot.model.push_request import PushRequest
from meshpilot.monitoring import metrics
from meshpilot.xds.resources import PushContextLike

log = structlog.get_logger(__name__)

C = TypeVar("C", bound=PushContextLike)

DEBOUNCE_AFTER = 0.1
DEBOUNCE_MAX = 10.0

BuildContext = Callable[[C | None, PushRequest], C | Awaitable[C]]
PushTarget = Callable[[PushRequest, C], object]


class Pusher(Generic[C]):
    """Turns PushRequests into debounced pushes.

    `build_context(previous, request)` makes the new PushContext; `target(request,
    context)` fans it out (normally `DiscoveryServer.push`, which only queues work on
    each connection). A plain function is called on the event loop on purpose: it
    reads the config store, which the sources mutate on this same loop, so it sees a
    consistent snapshot without locks, and a thread would not make pure-Python work
    faster under the GIL. If a build ever gets long enough to hurt ACK latency, pass
    an async callable (e.g. one that offloads a frozen snapshot to a thread); it is
    awaited.
    """

    def __init__(
        self,
        build_context: BuildContext[C],
        target: PushTarget[C],
        *,
        debounce_after: float = DEBOUNCE_AFTER,
        debounce_max: float = DEBOUNCE_MAX,
        context: C | None = None,
    ) -> None:
        if debounce_after < 0 or debounce_max < debounce_after:
            raise ValueError(
                f"debounce_after={debounce_after} and debounce_max={debounce_max}: "
                "need 0 <= debounce_after <= debounce_max"
            )
        self._build = build_context
        self._target = target
        self.debounce_after = debounce_after
        self.debounce_max = debounce_max
        self._current = context
        self._pending: PushRequest | None = None
        self._failed: PushRequest | None = None
        self._first_event = 0.0
        self._last_event = 0.0
        self._events = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.pushes = 0

    @property
    def current(self) -> C | None:
        """The last PushContext built successfully."""
        return self._current

    @property
    def pending(self) -> PushRequest | None:
        """Changes waiting for the next push."""
        return self._pending

    def enqueue(self, request: PushRequest) -> None:
        """Record a change; cheap and synchronous, call it from any source on the loop."""
        now = time.monotonic()
        if self._pending is None:
            self._pending = request
            self._first_event = now
        else:
            self._pending = self._pending.merge(request)
        self._last_event = now
        self._events += 1
        self._wake.set()

    async def init(self, request: PushRequest | None = None) -> C:
        """Build and push the first context now, without debouncing (at startup)."""
        request = request or PushRequest(full=True, reasons=frozenset({"init"}))
        ctx = await self._build_and_push(request, events=0)
        if ctx is None:
            raise RuntimeError("building the initial push context failed; see the log")
        return ctx

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name="meshpilot-pusher")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def run(self) -> None:
        """Debounce loop; runs until cancelled."""
        while True:
            if self._pending is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = time.monotonic()
            due = min(self._last_event + self.debounce_after, self._first_event + self.debounce_max)
            if now < due:
                # Woken early by a new change, which moves the quiet deadline.
                self._wake.clear()
                try:
                    async with asyncio.timeout(due - now):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            request, events, first = self._pending, self._events, self._first_event
            self._pending, self._events = None, 0
            metrics.DEBOUNCE_TIME.observe(now - first)
            await self._build_and_push(request, events)

    async def _build_and_push(self, request: PushRequest, events: int) -> C | None:
        if self._failed is not None:
            request, self._failed = self._failed.merge(request), None
        for reason in request.reasons or ("unknown",):
            metrics.PUSH_TRIGGERS.labels(reason).inc()
        t0 = time.perf_counter()
        try:
            result = self._build(self._current, request)
            ctx = await result if inspect.isawaitable(result) else result
        except Exception:
            # Keep serving the last good context; retry these changes with the next ones.
            self._failed = request
            log.exception("push context build failed", reasons=sorted(request.reasons))
            return None
        build_time = time.perf_counter() - t0
        metrics.PUSH_CONTEXT_INIT_TIME.observe(build_time)
        self._current = ctx
        self.pushes += 1
        out = self._target(request, ctx)
        if inspect.isawaitable(out):
            await out
        log.info(
            "push",
            version=ctx.version,
            full=request.full,
            events=events,
            reasons=sorted(request.reasons),
            configs=len(request.config_keys),
            build_ms=round(build_time * 1000, 1),
        )
        return ctx
