"""Analysis findings as log lines: each one once when it appears, once when it clears.

`istioctl analyze` is a command someone runs; istiod itself only reports analysis
through resource status (when `PILOT_ENABLE_STATUS` and the analysis controller are
on). meshpilot has no status to write in file mode, so the server runs analysis after
each push and logs the difference to the previous result: a config error shows up in
the log when the change that causes it is applied, without anyone reading
/debug/configz. Endpoint-only contexts share services and config indexes with the
context they came from, so their config findings are reused and only the
endpoint-dependent findings of the hosts whose endpoints changed are recomputed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog

from meshpilot.analysis import config_findings, endpoint_findings_by_host, ordered
from meshpilot.analysis.messages import Message
from meshpilot.model.push_context import PushContext

log = structlog.get_logger(__name__)


class FindingsReporter:
    """The latest analysis result, and the log of what changed between results."""

    def __init__(self) -> None:
        self.version = ""
        self.messages: list[Message] = []
        # What the cached findings were computed from, held by identity: services and
        # DestinationRules (shared by endpoint-only contexts), and endpoints per host.
        self._config_of: tuple[Mapping[str, Any], Any] | None = None
        self._config_found: list[Message] = []
        self._endpoints_of: Mapping[str, Any] = {}
        self._by_host: dict[str, list[Message]] = {}

    def update(self, push: PushContext) -> tuple[list[Message], list[Message]]:
        """Analyze `push` (unless already done for its version); log and return the
        findings that appeared and those that cleared."""
        if push.version == self.version:
            return [], []
        basis = (push.services, push.destination_rules)
        if (
            self._config_of is None
            or self._config_of[0] is not basis[0]
            or self._config_of[1] is not basis[1]
        ):
            self._config_found = config_findings(push)
            self._by_host = endpoint_findings_by_host(push, push.services)
            self._config_of = basis
        else:
            # Same services and config: redo the hosts whose endpoints are new objects
            # (an endpoint-only context replaces only those), however many contexts
            # went by since the last analysis.
            before = self._endpoints_of
            changed = [h for h, eps in push.endpoints.items() if before.get(h) is not eps]
            self._by_host.update(endpoint_findings_by_host(push, changed))
        self._endpoints_of = push.endpoints
        found = ordered(
            [*self._config_found, *(m for per_host in self._by_host.values() for m in per_host)]
        )
        before_set = set(self.messages)
        now = set(found)
        appeared = [m for m in found if m not in before_set]
        cleared = [m for m in self.messages if m not in now]
        for m in appeared:
            log.warning("config analysis finding", code=m.code, finding=str(m))
        for m in cleared:
            log.info("config analysis finding cleared", code=m.code, finding=str(m))
        self.version, self.messages = push.version, found
        return appeared, cleared
