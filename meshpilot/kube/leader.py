"""Leader election on a coordination.k8s.io/v1 Lease, so that one replica writes.

What Istio does (pilot/pkg/leaderelection, on client-go's leaderelection): every istiod
replica runs one elector per controller that writes to the cluster, named after it
(`istio-namespace-controller-election` for the controller that distributes the root
certificate ConfigMap), in the system namespace. The timings are a 30 s lease, a 15 s
renew deadline and a 7.5 s retry period. The holder renews the lease every retry
period; a follower takes the lease over only once it has seen the same record unchanged
for a whole lease duration (time is measured on the follower's own clock from when it
observed the record, never from the timestamps in it, so clock skew between replicas does
not matter). Updates are optimistic: a PUT with the resourceVersion that was read, a 409
means someone else wrote first and the attempt is retried next period. On shutdown the
holder releases the lease so another replica need not wait out the lease.

meshpilot does the same, with one difference in emphasis: the leader's work runs as
tasks that are cancelled, and awaited, the moment leadership is in doubt (the renew
deadline passed without a successful renewal, or another holder was seen), which is
before the lease can expire and be taken over, so two replicas never write at once.
Followers only read the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from kubernetes_asyncio.client import (
    ApiClient,
    CoordinationV1Api,
    V1Lease,
    V1LeaseSpec,
    V1ObjectMeta,
)
from kubernetes_asyncio.client.exceptions import ApiException

from meshpilot.kube.names import object_name

log = structlog.get_logger(__name__)

# Istio's election names (pilot/pkg/leaderelection).
NAMESPACE_CONTROLLER = "istio-namespace-controller-election"
STATUS_CONTROLLER = "istio-status-leader"
ANALYZE_CONTROLLER = "istio-analyze-leader"

LEASE_DURATION = 30.0
RENEW_DEADLINE = 15.0
RETRY_PERIOD = 7.5
# A release or a single API call must never hold up shutdown for long.
RELEASE_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class Timings:
    lease_duration: float = LEASE_DURATION
    renew_deadline: float = RENEW_DEADLINE
    retry_period: float = RETRY_PERIOD

    def __post_init__(self) -> None:
        # client-go's rules: the holder must give up before anyone may take over, and
        # must get several tries at renewing within its deadline.
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "leader election needs 0 < retry period < renew deadline < lease duration"
            )


def default_identity() -> str:
    """The pod name (POD_NAME, from the downward API) or the hostname, plus a random
    suffix so that a restarted process never mistakes the old holder's lease for its own."""
    base = os.environ.get("POD_NAME") or socket.gethostname() or "meshpilot"
    return f"{base}_{secrets.token_hex(4)}"


def _now() -> datetime.datetime:
    # Serialized with isoformat(), which drops the fraction when it is zero; a MicroTime
    # must have exactly six digits, so never let it be zero.
    now = datetime.datetime.now(datetime.UTC)
    return now if now.microsecond else now.replace(microsecond=1)


class LeaderElector:
    """Campaigns for one Lease; runs `on_started_leading` while it holds it.

    `on_started_leading()` returns the leader's work as a coroutine; it runs as a task
    that is cancelled (and awaited) when leadership ends, then `on_stopped_leading()` is
    called. Use `run()` as a task; cancelling it releases a held lease unless
    `release_on_cancel` is False.
    """

    def __init__(
        self,
        api: ApiClient,
        namespace: str,
        name: str,
        on_started_leading: Callable[[], Awaitable[None]],
        on_stopped_leading: Callable[[], None] | None = None,
        *,
        identity: str | None = None,
        timings: Timings | None = None,
        release_on_cancel: bool = True,
    ) -> None:
        self._api = CoordinationV1Api(api)
        self.namespace = namespace
        self.name = name
        self.identity = identity or default_identity()
        self.timings = timings or Timings()
        self.release_on_cancel = release_on_cancel
        self._on_started = on_started_leading
        self._on_stopped = on_stopped_leading
        self._what = object_name("Lease", namespace, name)
        # The record last observed, and when (monotonic) it was first observed so.
        self._observed: tuple[str, str, str] | None = None
        self._observed_at = 0.0
        self._observed_duration = self.timings.lease_duration
        self._work: asyncio.Task[None] | None = None
        self._last_renew = 0.0
        self.leading = asyncio.Event()
        self.terms = 0

    @property
    def is_leader(self) -> bool:
        return self._work is not None

    async def run(self) -> None:
        """Campaign forever (until cancelled)."""
        try:
            while True:
                if self._work is None:
                    await self._follow_once()
                    if self._work is None:
                        await asyncio.sleep(self.timings.retry_period)
                else:
                    await self._lead_once()
        finally:
            was_leader = self._work is not None
            await self._stop_leading("shutting down")
            if was_leader and self.release_on_cancel:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(RELEASE_TIMEOUT):
                        await self._release()

    # -- follower --

    async def _follow_once(self) -> None:
        # The renew deadline counts from before the write: the lease on the server is
        # never fresher than that, so the leader gives up early rather than late.
        attempt = time.monotonic()
        try:
            acquired = await self._try_acquire()
        except ApiException as e:
            log.warning(
                "leader election: cannot read or write the lease",
                lease=self._what,
                status=e.status,
                reason=e.reason,
            )
            return
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            log.warning("leader election: API server unreachable", lease=self._what, error=str(e))
            return
        except Exception:
            # Campaigning must outlive any surprise (a malformed lease, say).
            log.exception("leader election: attempt failed", lease=self._what)
            return
        if acquired:
            self._start_leading(attempt)

    async def _try_acquire(self) -> bool:
        try:
            lease = await self._api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            return await self._create()
        holder, renew, rv = self._record(lease)
        now = time.monotonic()
        if self._observed != (holder, renew, rv):
            self._observed = (holder, renew, rv)
            self._observed_at = now
            self._observed_duration = float(
                lease.spec.lease_duration_seconds or self.timings.lease_duration
            )
        if holder and holder != self.identity and now < self._observed_at + self._observed_duration:
            return False  # held by someone else, and alive as far as we can tell
        spec = lease.spec
        transitions = int(spec.lease_transitions or 0) + (0 if holder == self.identity else 1)
        body = self._body(rv, acquire_time=_now(), transitions=transitions)
        try:
            await self._api.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as e:
            if e.status == 409:  # someone else changed it since we read it
                return False
            raise
        log.info(
            "leader election: acquired",
            lease=self._what,
            identity=self.identity,
            previous=holder or None,
        )
        return True

    async def _create(self) -> bool:
        body = self._body(None, acquire_time=_now(), transitions=0)
        try:
            await self._api.create_namespaced_lease(self.namespace, body)
        except ApiException as e:
            if e.status == 409:  # another replica created it first
                return False
            raise
        log.info(
            "leader election: acquired (lease created)", lease=self._what, identity=self.identity
        )
        return True

    # -- leader --

    def _start_leading(self, since: float) -> None:
        self._last_renew = since
        self.terms += 1
        self._work = asyncio.create_task(self._guarded_work(), name=f"leader {self.name}")
        self.leading.set()

    async def _guarded_work(self) -> None:
        try:
            await self._on_started()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("leader election: leader work failed", lease=self._what)

    async def _lead_once(self) -> None:
        """Sleep a retry period, then renew before the deadline or stop leading."""
        await asyncio.sleep(self.timings.retry_period)
        deadline = self._last_renew + self.timings.renew_deadline
        while self._work is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await self._stop_leading("renew deadline passed")
                return
            attempt = time.monotonic()
            try:
                # A hanging call must not keep the leader writing past its deadline.
                async with asyncio.timeout(remaining):
                    result = await self._renew()
            except TimeoutError:
                continue
            except Exception as e:
                log.warning(
                    "leader election: renewal failed",
                    lease=self._what,
                    error=getattr(e, "reason", None) or str(e),
                )
                result = "retry"
            if result == "renewed":
                self._last_renew = attempt
                return
            if result == "lost":
                await self._stop_leading("another holder took the lease")
                return
            await asyncio.sleep(
                min(self.timings.retry_period, max(0.0, deadline - time.monotonic()))
            )

    async def _renew(self) -> str:
        lease = await self._api.read_namespaced_lease(self.name, self.namespace)
        holder, _, rv = self._record(lease)
        if holder != self.identity:
            return "lost"
        spec = lease.spec
        body = self._body(
            rv,
            acquire_time=spec.acquire_time,
            transitions=int(spec.lease_transitions or 0),
        )
        try:
            await self._api.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as e:
            if e.status == 409:
                return "retry"
            raise
        return "renewed"

    async def _stop_leading(self, why: str) -> None:
        work, self._work = self._work, None
        if work is None:
            return
        self.leading.clear()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        log.warning(
            "leader election: stopped leading", lease=self._what, identity=self.identity, reason=why
        )
        if self._on_stopped is not None:
            try:
                self._on_stopped()
            except Exception:
                log.exception("leader election: on_stopped_leading failed", lease=self._what)

    async def _release(self) -> None:
        lease = await self._api.read_namespaced_lease(self.name, self.namespace)
        holder, _, rv = self._record(lease)
        if holder != self.identity:
            return
        # client-go's release: no holder and a 1 s lease, so followers take over quickly.
        body = V1Lease(
            api_version="coordination.k8s.io/v1",
            kind="Lease",
            metadata=V1ObjectMeta(name=self.name, namespace=self.namespace, resource_version=rv),
            spec=V1LeaseSpec(
                lease_duration_seconds=1,
                acquire_time=_now(),
                renew_time=_now(),
                lease_transitions=int(lease.spec.lease_transitions or 0),
            ),
        )
        await self._api.replace_namespaced_lease(self.name, self.namespace, body)
        log.info("leader election: released", lease=self._what, identity=self.identity)

    # -- records --

    @staticmethod
    def _record(lease: V1Lease) -> tuple[str, str, str]:
        spec = lease.spec
        return (
            spec.holder_identity or "",
            _fmt_time(spec.renew_time) or "",
            lease.metadata.resource_version or "",
        )

    def _body(
        self, rv: str | None, *, acquire_time: datetime.datetime | None, transitions: int
    ) -> V1Lease:
        return V1Lease(
            api_version="coordination.k8s.io/v1",
            kind="Lease",
            metadata=V1ObjectMeta(name=self.name, namespace=self.namespace, resource_version=rv),
            spec=V1LeaseSpec(
                holder_identity=self.identity,
                lease_duration_seconds=max(1, math.ceil(self.timings.lease_duration)),
                acquire_time=acquire_time or _now(),
                renew_time=_now(),
                lease_transitions=transitions,
            ),
        )


def _fmt_time(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        return value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return str(value)
