"""Prometheus metrics with Istio's names, in one registry owned by the process."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from meshpilot.untrusted import version_label

REGISTRY = CollectorRegistry(auto_describe=True)

_PUSH_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 3, 5, 10, 20, 30)

XDS_CLIENTS = Gauge(
    "pilot_xds",
    "Number of endpoints connected to this pilot using XDS.",
    ["version"],
    registry=REGISTRY,
)
# Distinct ISTIO_VERSION series at once; the rest share "other". Proxies report it
# themselves, so without a bound one client could mint a series per connection.
MAX_VERSION_SERIES = 32
OTHER = "other"


class ClientVersions:
    """`pilot_xds` by proxy version, with bounded label values.

    A version label exists while some proxy reporting it is connected: its series is
    removed with the last such proxy. Client-supplied values that are not
    version-shaped count as "unknown"; beyond MAX_VERSION_SERIES live versions, "other".
    """

    def __init__(self, gauge: Gauge, max_series: int = MAX_VERSION_SERIES) -> None:
        self._gauge = gauge
        self._max = max_series
        self._live: dict[str, int] = {}
        self._lock = threading.Lock()

    def connected(self, istio_version: str) -> str:
        """Count one connection; returns the label to pass to disconnected()."""
        label = version_label(istio_version)
        with self._lock:
            if label not in self._live and len(self._live) >= self._max:
                label = OTHER
            self._live[label] = self._live.get(label, 0) + 1
            self._gauge.labels(label).inc()
        return label

    def disconnected(self, label: str) -> None:
        with self._lock:
            if label not in self._live:
                return
            left = self._live[label] - 1
            if left > 0:
                self._live[label] = left
                self._gauge.labels(label).dec()
            else:
                self._live.pop(label, None)
                self._gauge.remove(label)

    @property
    def labels(self) -> frozenset[str]:
        """The label values that currently have a series."""
        with self._lock:
            return frozenset(self._live)


XDS_CLIENT_VERSIONS = ClientVersions(XDS_CLIENTS)
XDS_PUSHES = Counter(
    "pilot_xds_pushes",
    "Pilot build and send errors for lds, rds, cds and eds.",
    ["type"],
    registry=REGISTRY,
)
XDS_PUSH_TIME = Histogram(
    "pilot_xds_push_time",
    "Total time in seconds Pilot takes to push lds, rds, cds and eds.",
    ["type"],
    buckets=_PUSH_BUCKETS,
    registry=REGISTRY,
)
PROXY_CONVERGENCE_TIME = Histogram(
    "pilot_proxy_convergence_time",
    "Delay in seconds between config change and a proxy receiving all required configuration.",
    buckets=_PUSH_BUCKETS,
    registry=REGISTRY,
)
TOTAL_XDS_REJECTS = Counter(
    "pilot_total_xds_rejects",
    "Total number of XDS responses from pilot rejected by proxy.",
    ["type"],
    registry=REGISTRY,
)
XDS_EXPIRED_NONCE = Counter(
    "pilot_xds_expired_nonce",
    "Total number of XDS requests with an expired nonce.",
    ["type"],
    registry=REGISTRY,
)
DEBOUNCE_TIME = Histogram(
    "pilot_debounce_time",
    "Delay in seconds between the first config change and the merged push request.",
    buckets=_PUSH_BUCKETS,
    registry=REGISTRY,
)
PUSH_CONTEXT_INIT_TIME = Histogram(
    "pilot_pushcontext_init_seconds",
    "Total time in seconds Pilot takes to init pushContext.",
    buckets=_PUSH_BUCKETS,
    registry=REGISTRY,
)
PUSH_TRIGGERS = Counter(
    "pilot_push_triggers",
    "Total number of times a push was triggered, labeled by reason.",
    ["type"],
    registry=REGISTRY,
)
CONFIG_ERRORS = Gauge(
    "meshpilot_config_errors_current",
    "Config objects or documents currently rejected, by kind.",
    ["kind"],
    registry=REGISTRY,
)
CONFIG_ERRORS_TOTAL = Counter(
    "meshpilot_config_errors",
    "Config errors found, counted once per change.",
    ["kind"],
    registry=REGISTRY,
)
CONFIG_OBJECTS = Gauge(
    "pilot_k8s_cfg_events_current",
    "Config objects in the store, by kind.",
    ["type"],
    registry=REGISTRY,
)
SERVICES = Gauge("pilot_services", "Total services known to pilot.", registry=REGISTRY)


class XdsCacheMetrics:
    """Istio's XdsCache metrics, read from the cache when scraped: counting in the
    generator's hot path (thousands of lookups per proxy) would cost more than the
    lookups. The source returns `hits`, `misses`, `size` and `evictions`."""

    def __init__(self) -> None:
        self._source: Callable[[], Mapping[str, int]] | None = None

    def set_source(self, source: Callable[[], Mapping[str, int]] | None) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        return list(self._families({}))

    def collect(self) -> Iterator[Metric]:
        source = self._source
        yield from self._families(source() if source is not None else {})

    @staticmethod
    def _families(stats: Mapping[str, int]) -> Iterator[Metric]:
        reads = CounterMetricFamily(
            "pilot_xds_cache_reads", "Total number of xds cache xdsCache reads.", labels=["type"]
        )
        if stats:
            reads.add_metric(["hit"], stats.get("hits", 0))
            reads.add_metric(["miss"], stats.get("misses", 0))
        yield reads
        yield GaugeMetricFamily(
            "pilot_xds_cache_size", "Current size of xds cache", value=stats.get("size", 0)
        )
        evictions = CounterMetricFamily(
            "pilot_xds_cache_evictions", "Total number of xds cache evictions.", labels=["reason"]
        )
        if stats:
            evictions.add_metric(["size"], stats.get("evictions", 0))
        yield evictions


XDS_CACHE = XdsCacheMetrics()
REGISTRY.register(XDS_CACHE)

# --- CA (Citadel's names; prometheus_client adds `_total` to counters) ------------------
CA_CSR_COUNT = Counter(
    "citadel_server_csr_count", "The number of CSRs received by Citadel server.", registry=REGISTRY
)
CA_AUTHN_FAILURES = Counter(
    "citadel_server_authentication_failure_count",
    "The number of authentication failures.",
    registry=REGISTRY,
)
CA_CSR_PARSING_ERRORS = Counter(
    "citadel_server_csr_parsing_err_count",
    "The number of errors occurred when parsing the CSR.",
    registry=REGISTRY,
)
CA_CSR_SIGN_ERRORS = Counter(
    "citadel_server_csr_sign_err_count",
    "The number of errors occurred when signing the CSR.",
    ["error"],
    registry=REGISTRY,
)
CA_CERT_ISSUANCES = Counter(
    "citadel_server_success_cert_issuance_count",
    "The number of certificates issuances that have succeeded.",
    registry=REGISTRY,
)
CA_ROOT_CERT_EXPIRY = Gauge(
    "citadel_server_root_cert_expiry_timestamp",
    "The unix timestamp, in seconds, when Citadel root cert will expire.",
    registry=REGISTRY,
)
CA_CERT_CHAIN_EXPIRY = Gauge(
    "citadel_server_cert_chain_expiry_timestamp",
    "The unix timestamp, in seconds, when Citadel cert chain will expire.",
    registry=REGISTRY,
)
CA_CSR_REFUSED = Counter(
    "meshpilot_ca_csr_refused",
    "CSRs refused, by gRPC status code and reason (every refusal, including those "
    "Istio has no counter for).",
    ["code", "reason"],
    registry=REGISTRY,
)
XDS_SECURE_REFUSED = Counter(
    "meshpilot_xds_secure_refused",
    "ADS streams refused on the secure port, by reason.",
    ["reason"],
    registry=REGISTRY,
)
KUBE_INFORMER_CONNECTED = Gauge(
    "meshpilot_kube_informer_connected",
    "1 while the informer of a Kubernetes resource has a working list or watch, else 0.",
    ["resource"],
    registry=REGISTRY,
)
KUBE_INFORMER_RECONNECTS = Counter(
    "meshpilot_kube_informer_reconnects",
    "Failed lists or watches of a Kubernetes resource, each followed by a retry.",
    ["resource"],
    registry=REGISTRY,
)
