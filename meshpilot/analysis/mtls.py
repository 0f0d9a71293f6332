"""Analysis of mutual TLS between workloads: STRICT servers their clients will not
speak mTLS to.

Auto mTLS (Istio's and meshpilot's, translators/upstream_tls.py) sends mTLS only to
endpoints labelled `security.istio.io/tlsMode: istio`; Istio's injector adds that
label to every pod with a sidecar. In file mode nothing adds it: a WorkloadEntry (or
ServiceEntry endpoint) of a workload that runs a sidecar must carry it. Without it,
clients send plaintext, and if a PeerAuthentication makes that workload STRICT, its
sidecar refuses every such connection. Istio has no such message (its pods get the
label); meshpilot reports it as MP0007.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from meshpilot.analysis.messages import STRICT_WITHOUT_TLS_MODE, Message, msg
from meshpilot.api.security import PeerAuthenticationSpec
from meshpilot.config import Config, ConfigKey, kinds
from meshpilot.model.push_context import PushContext
from meshpilot.model.registry import TLS_MODE_LABEL
from meshpilot.model.security import STRICT, UNSET, PeerAuthnPolicy
from meshpilot.model.service import Endpoint, Service

TLS_MODE_ISTIO = "istio"


def strict_without_tls_mode(push: PushContext, hosts: Iterable[str]) -> Iterator[Message]:
    """One finding per workload (WorkloadEntry, or ServiceEntry endpoint address) of
    `hosts` that some PeerAuthentication makes STRICT on a port clients reach it on,
    and whose labels lack `security.istio.io/tlsMode: istio`."""
    if not push.security.has_peer_authentication:
        return  # nothing is STRICT: PERMISSIVE by default
    seen: set[tuple[ConfigKey, str]] = set()
    for host in hosts:
        svc = push.services.get(host)
        if svc is None or svc.mesh_external or _explicit_istio_mutual(push, svc):
            continue
        for per_port in push.endpoints.get(host, {}).values():
            for ep in per_port:
                if ep.tls_mode == TLS_MODE_ISTIO:
                    continue
                found = _finding(push, svc, ep, seen)
                if found is not None:
                    yield found


def _finding(
    push: PushContext, svc: Service, ep: Endpoint, seen: set[tuple[ConfigKey, str]]
) -> Message | None:
    namespace = ep.namespace or svc.namespace
    if ep.workload_name:
        key = ConfigKey(kinds.WORKLOAD_ENTRY, namespace, ep.workload_name)
    elif svc.source is not None and svc.source.kind == kinds.SERVICE_ENTRY:
        key = svc.source
    else:
        return None  # DNS names and ExternalName targets are not workloads
    if (key, ep.address) in seen:
        return None
    peer = push.security.peer_authentication(namespace, ep.labels)
    if peer.mode_for(ep.port) != STRICT:
        return None
    cfg = push.snapshot.get(key)
    if cfg is None:
        return None
    seen.add((key, ep.address))
    policy = _deciding_policy(push, peer, ep.port)
    by = f"PeerAuthentication {policy.namespace}/{policy.name}" if policy else "PeerAuthentication"
    port = f" on port {ep.port}" if peer.port_modes.get(ep.port) == STRICT else ""
    if key.kind == kinds.WORKLOAD_ENTRY:
        who, field, fix = f"WorkloadEntry {namespace}/{key.name}", "spec.labels", "spec.labels"
    else:
        who = f"ServiceEntry {key.namespace}/{key.name} endpoint {ep.address}"
        field, fix = "spec.endpoints", "that endpoint's labels"
    return msg(
        STRICT_WITHOUT_TLS_MODE,
        cfg,
        field,
        f"{who} is STRICT{port} under {by}, but has no label "
        f"{TLS_MODE_LABEL}: {TLS_MODE_ISTIO}, so auto mTLS sends it plaintext and its "
        f"sidecar refuses those connections. If it runs a sidecar, add "
        f"'{TLS_MODE_LABEL}: {TLS_MODE_ISTIO}' to {fix} (Istio's injector adds it to pods).",
    )


def _deciding_policy(push: PushContext, peer: PeerAuthnPolicy, port: int) -> Config | None:
    """The narrowest PeerAuthentication that set the mode on `port` (the workload's
    portLevelMtls, else the last of mesh, namespace, workload that sets a mode)."""
    configs = push.configs(kinds.PEER_AUTHENTICATION)
    for ns, name, _ in reversed(peer.sources):
        cfg = configs.get(ConfigKey(kinds.PEER_AUTHENTICATION, ns, name))
        if cfg is None:
            continue
        spec: PeerAuthenticationSpec = cfg.spec
        port_mtls = spec.port_level_mtls.get(port)
        if port_mtls is not None and port_mtls.mode != UNSET:
            return cfg
        if spec.mtls is not None and spec.mtls.mode != UNSET:
            return cfg
    return None


def _explicit_istio_mutual(push: PushContext, svc: Service) -> bool:
    """A DestinationRule (as seen from the service's namespace) that asks for
    ISTIO_MUTUAL sends mTLS whatever the labels say."""
    dr = push.destination_rule(svc.namespace, svc)
    policy = dr.spec.traffic_policy if dr is not None else None
    tls = policy.tls if policy is not None else None
    return tls is not None and tls.mode == "ISTIO_MUTUAL"
