"""A minimal list+watch loop for the few kinds the writers here follow.

client-go's reflector lists, then watches from the list's resourceVersion, re-watches
from the last seen one when a watch ends, and lists again after a 410 Gone (history
compacted) or an error, with backoff. This is that loop, without a cache: the consumer
gets every watch event, plus a RELISTED event carrying the whole list after each list,
so that it can reconcile what it might have missed while disconnected (deletions, in
particular, are only visible as absences). The discovery informers are richer; this
exists so that `meshpilot/kube` needs nothing above it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from kubernetes_asyncio import watch
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from meshpilot.kube.backoff import Backoff

log = structlog.get_logger(__name__)

RELISTED = "RELISTED"
# client-go's reflector: a server-side watch timeout drawn from 5-10 minutes, so that
# watches of many clients do not all end together.
WATCH_TIMEOUT = (300, 600)


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """ADDED / MODIFIED / DELETED with `obj`, or RELISTED with every object in `objects`."""

    type: str
    obj: dict[str, Any] = field(default_factory=dict)
    objects: tuple[dict[str, Any], ...] = ()


async def list_watch(
    api: ApiClient,
    list_fn: Callable[..., Any],
    what: str,
    *,
    field_selector: str | None = None,
    label_selector: str | None = None,
    watch_timeout: tuple[int, int] = WATCH_TIMEOUT,
    backoff: Backoff | None = None,
) -> AsyncIterator[WatchEvent]:
    """Events of `list_fn` (e.g. `CoreV1Api(api).list_namespace`) forever; `what` names
    the watched objects in logs."""
    backoff = backoff or Backoff()
    selectors: dict[str, str] = {}
    if field_selector:
        selectors["field_selector"] = field_selector
    if label_selector:
        selectors["label_selector"] = label_selector
    while True:
        try:
            listed = await list_fn(**selectors)
        # Any failure (the client raises bare Exceptions for malformed answers) means
        # "try again later": the loop must outlive whatever the server sends.
        except Exception as e:
            delay = backoff.next()
            log.warning("list failed; retrying", what=what, error=_short(e), retry_in=delay)
            await asyncio.sleep(delay)
            continue
        objects = tuple(api.sanitize_for_serialization(o) for o in listed.items)
        rv = listed.metadata.resource_version
        yield WatchEvent(RELISTED, objects=objects)
        while True:
            w = watch.Watch()
            started, events = time.monotonic(), 0
            try:
                stream = w.stream(
                    list_fn,
                    resource_version=rv,
                    timeout_seconds=random.randint(*watch_timeout),
                    allow_watch_bookmarks=True,
                    **selectors,
                )
                async for event in stream:
                    kind = event["type"]
                    raw = event["raw_object"]
                    rv = raw.get("metadata", {}).get("resourceVersion") or rv
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        events += 1
                        backoff.reset()
                        yield WatchEvent(kind, obj=raw)
            except ApiException as e:
                if e.status == 410:
                    log.info("watch expired; listing again", what=what)
                    break
                delay = backoff.next()
                log.warning("watch failed; listing again", what=what, error=_short(e))
                await asyncio.sleep(delay)
                break
            except Exception as e:
                delay = backoff.next()
                log.warning("watch broken; listing again", what=what, error=_short(e))
                await asyncio.sleep(delay)
                break
            finally:
                await w.close()
            # The watch ended normally (server timeout): resume from the last revision,
            # after a pause if it ended at once with nothing, so as not to spin.
            if not events and time.monotonic() - started < 1.0:
                await asyncio.sleep(backoff.next())


def _short(e: BaseException) -> str:
    if isinstance(e, ApiException):
        return f"{e.status} {e.reason}"
    return str(e) or type(e).__name__
