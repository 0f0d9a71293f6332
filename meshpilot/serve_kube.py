"""`meshpilot serve` in a Kubernetes cluster: the source, the CA, the leader and injection.

What istiod does when it runs in a cluster (pilot/pkg/bootstrap):

- it follows the cluster's Services, EndpointSlices, Pods and Istio's CRDs, and takes
  the MeshConfig from the `istio` ConfigMap of its namespace, and is not ready (nor
  serves xDS) before those caches have synced;
- its CA is always on: the plug-in CA of Secret `cacerts`, else the self-signed root
  kept in Secret `istio-ca-secret`; CSRs are authenticated with ServiceAccount tokens
  through TokenReview (beside client certificates);
- the replica holding a Lease distributes the root certificate ConfigMap
  `istio-ca-root-cert` to every namespace and keeps the injector webhook's caBundle;
  the others serve xDS and the CA but write nothing;
- the injection webhook listens on 15017 with a certificate from its own CA.

meshpilot does the same, with these differences: `--ca-dir` given with Kubernetes makes
that directory the CA (Secrets are not read); the root-cert publisher and the caBundle
patcher are both the work of one lease (`istio-namespace-controller-election`); the
trust domain is read once, after the first sync (a later change of the mesh ConfigMap's
trustDomain needs a restart, as the CA's does in Istio).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import Callable
from typing import Any

import structlog
from cryptography import x509
from kubernetes_asyncio.client import ApiClient

from meshpilot.addresses import split_address
from meshpilot.api.mesh import MeshConfig
from meshpilot.ca.authority import CertificateAuthority
from meshpilot.ca.kubeauth import KubeJWTAuthenticator
from meshpilot.ca.kubesecrets import CAUnavailable, load_ca_from_secrets
from meshpilot.discovery.kube.source import KubeSource
from meshpilot.discovery.store import ConfigStore
from meshpilot.inject import InjectionWebhook, ProxySettings
from meshpilot.inject.cabundle import CABundlePatcher
from meshpilot.kube.client import new_api_client
from meshpilot.kube.leader import NAMESPACE_CONTROLLER, LeaderElector, Timings
from meshpilot.kube.rootcert import RootCertPublisher, namespace_events
from meshpilot.settings import Settings

log = structlog.get_logger(__name__)

# The webhook's certificate: long enough that renewal is rare, short enough that a
# leaked key does not stay useful for the CA's whole life.
WEBHOOK_CERT_TTL = 7 * 24 * 3600.0
# Longest wait for the first sync before serving gives up with a clear error. Istio waits
# forever; a laptop pointed at the wrong cluster should hear about it.
SYNC_TIMEOUT = 600.0


def lease_timings(lease_duration: float) -> Timings:
    """Istio's 30 s / 15 s / 7.5 s, scaled: renew within a half, try every quarter."""
    return Timings(lease_duration, lease_duration / 2, lease_duration / 4)


class KubeControlPlane:
    """The Kubernetes parts of one `meshpilot serve`, started in order by MeshServer."""

    def __init__(self, settings: Settings, store: ConfigStore) -> None:
        self.settings = settings
        self.store = store
        self.api: ApiClient | None = None
        self.source: KubeSource | None = None
        self.elector: LeaderElector | None = None
        self.publisher: RootCertPublisher | None = None
        self.patcher: CABundlePatcher | None = None
        self.webhook: InjectionWebhook | None = None
        self.webhook_port = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def start_source(self, on_mesh_config: Callable[[MeshConfig], None] | None) -> None:
        """Connect and start the informers; returns after the first full sync."""
        s = self.settings
        self.api = await new_api_client(s.kubeconfig, s.kube_context, s.in_cluster)
        self.source = KubeSource(self.store, self.api, s.cluster_id, s.system_namespace)
        if on_mesh_config is not None:
            self.source.on_mesh_config(on_mesh_config)
        await self.source.start()
        log.info(
            "waiting for the kubernetes source to sync",
            cluster=s.cluster_id,
            kubeconfig=str(s.kubeconfig) if s.kubeconfig else None,
            in_cluster=s.in_cluster,
        )
        try:
            async with asyncio.timeout(SYNC_TIMEOUT):
                await self.source.synced.wait()
        except TimeoutError:
            raise ValueError(
                f"kubernetes cluster {s.cluster_id}: not synced within {SYNC_TIMEOUT:g}s; "
                f"informers: {self.source.status()['informers']}"
            ) from None

    async def load_ca(self, trust_domain: str) -> CertificateAuthority:
        """The CA from the system namespace's Secrets (cacerts, else istio-ca-secret)."""
        assert self.api is not None
        try:
            return await load_ca_from_secrets(
                self.api,
                self.settings.system_namespace,
                trust_domain,
                default_ttl=self.settings.workload_cert_ttl,
                max_ttl=self.settings.max_workload_cert_ttl,
            )
        except CAUnavailable as e:
            # Reported like any other start-up failure to reach something: exit 1.
            raise OSError(str(e)) from None

    def authenticator(self, trust_domain: str) -> KubeJWTAuthenticator:
        assert self.api is not None
        return KubeJWTAuthenticator(self.api, trust_domain)

    async def start_ca_users(self, ca: CertificateAuthority) -> None:
        """The injection webhook (every replica) and the leader's writers."""
        assert self.api is not None
        s = self.settings
        ns = s.system_namespace
        host, port = split_address(s.injection_address)
        chain, key = self._webhook_cert(ca, host)
        proxy = ProxySettings(
            discovery_address=f"istiod.{ns}.svc:15012",
            ca_address=f"istiod.{ns}.svc:15012",
            trust_domain=ca.trust_domain,
        )
        self.webhook = InjectionWebhook(s.injection_template, proxy, chain, key)
        self.webhook_port = await self.webhook.start(host, port)
        self._tasks.append(
            asyncio.create_task(self._renew_webhook_cert(ca, host, chain[0]), name="webhook-cert")
        )
        self.publisher = RootCertPublisher(
            self.api, ca.root_cert_pem, namespace_events(self.api), cluster_id=s.cluster_id
        )
        self.patcher = CABundlePatcher(self.api, ca.root_cert_pem, namespace=ns)
        self.elector = LeaderElector(
            self.api,
            ns,
            NAMESPACE_CONTROLLER,
            self._lead,
            timings=lease_timings(s.lease_duration),
        )
        self._tasks.append(asyncio.create_task(self.elector.run(), name="leader-election"))

    async def _lead(self) -> None:
        # Both writers end together when leadership does (the elector cancels this).
        assert self.publisher is not None and self.patcher is not None
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.publisher.run(), name="root-cert-publisher")
            tg.create_task(self.patcher.run(), name="cabundle-patcher")

    def _webhook_cert(self, ca: CertificateAuthority, host: str) -> tuple[list[str], str]:
        ns = self.settings.system_namespace
        dns = [f"{svc}.{ns}.svc" for svc in ("istiod", "meshpilot")]
        dns += [f"{name}.cluster.local" for name in dns]
        ips = ["127.0.0.1"]
        if host not in ("", "0.0.0.0", "::", "127.0.0.1", "localhost"):
            try:
                ips.append(str(ipaddress.ip_address(host)))
            except ValueError:
                dns.append(host)
        return ca.issue_server_cert(dns, ips, min(WEBHOOK_CERT_TTL, ca.max_ttl))

    async def _renew_webhook_cert(self, ca: CertificateAuthority, host: str, leaf: str) -> None:
        while True:
            cert = x509.load_pem_x509_certificate(leaf.encode())
            start = cert.not_valid_before_utc.timestamp()
            end = cert.not_valid_after_utc.timestamp()
            await asyncio.sleep(max(1.0, start + (end - start) / 2 - time.time()))
            try:
                chain, key = self._webhook_cert(ca, host)
                assert self.webhook is not None
                self.webhook.set_certificate(chain, key)
            except Exception:
                log.exception("injection webhook certificate renewal failed; retrying in 60s")
                await asyncio.sleep(60)
                continue
            leaf = chain[0]
            log.info("injection webhook certificate renewed")

    def status(self) -> dict[str, Any]:
        """For /debug/configz: the source's informers and who leads."""
        out: dict[str, Any] = self.source.status() if self.source is not None else {}
        if self.elector is not None:
            out["leader"] = {
                "lease": f"{self.elector.namespace}/{self.elector.name}",
                "identity": self.elector.identity,
                "leading": self.elector.is_leader,
                "terms": self.elector.terms,
            }
        else:
            out["leader"] = None
        out["injection"] = (
            {"address": self.settings.injection_address, "port": self.webhook_port}
            if self.webhook is not None
            else None
        )
        return out

    async def stop(self) -> None:
        # The elector first: cancelling it stops the leader's writers and releases the
        # lease, so another replica takes over at once instead of after the lease.
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.webhook is not None:
            await self.webhook.stop()
        if self.source is not None:
            await self.source.stop()
        if self.api is not None:
            await self.api.close()
