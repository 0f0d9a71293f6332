"""Every tunable of `meshpilot serve` in one place: defaults, flags and MESHPILOT_* env."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from meshpilot.addresses import split_address

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclass(slots=True)
class Settings:
    config_dirs: list[Path] = field(default_factory=list)
    mesh_config: Path | None = None
    xds_address: str = "127.0.0.1:15010"
    monitoring_address: str = "127.0.0.1:15014"
    debounce_after: float = 0.1
    debounce_max: float = 10.0
    log_format: str = "console"
    log_level: str = "info"
    # CA and the secure port (15012): enabled by ca_dir; trust_domain None = mesh config's.
    ca_dir: Path | None = None
    trust_domain: str | None = None
    secure_xds_address: str = "127.0.0.1:15012"
    workload_cert_ttl: float = 24 * 3600.0
    max_workload_cert_ttl: float = 90 * 24 * 3600.0
    # Kubernetes: on with a kubeconfig or in-cluster. The CA is then always on (from
    # Secrets, or from ca_dir when given), and so is the injection webhook.
    kubeconfig: Path | None = None
    kube_context: str | None = None
    in_cluster: bool = False
    cluster_id: str = "Kubernetes"
    system_namespace: str = "istio-system"
    injection_address: str = "127.0.0.1:15017"
    injection_template: Path | None = None
    # Leader election lease; renew deadline and retry period follow Istio's ratios
    # (30 s / 15 s / 7.5 s): a half and a quarter of it.
    lease_duration: float = 30.0

    @property
    def kubernetes(self) -> bool:
        return self.kubeconfig is not None or self.in_cluster

    @staticmethod
    def env_default(name: str, default: str) -> str:
        return os.environ.get(f"MESHPILOT_{name}", default)

    def validate(self) -> None:
        split_address(self.xds_address)
        split_address(self.monitoring_address)
        split_address(self.secure_xds_address)
        if not 0 < self.workload_cert_ttl <= self.max_workload_cert_ttl:
            raise ValueError("--workload-cert-ttl must be > 0 and <= --max-workload-cert-ttl")
        if self.debounce_after < 0 or self.debounce_max < self.debounce_after:
            raise ValueError("debounce: need 0 <= --debounce-after <= --debounce-max")
        if self.kubeconfig is not None and self.in_cluster:
            raise ValueError("--kubeconfig and --in-cluster exclude each other: give one")
        if self.kube_context is not None and self.kubeconfig is None:
            raise ValueError("--context needs --kubeconfig")
        if self.kubernetes:
            split_address(self.injection_address)
            if not self.cluster_id.strip():
                raise ValueError("--cluster-id must not be empty")
            if not _DNS_LABEL.fullmatch(self.system_namespace):
                raise ValueError(
                    f"--system-namespace {self.system_namespace!r}: expected a namespace name "
                    "(lower-case letters, digits and '-', at most 63)"
                )
            if self.injection_template is not None and not self.injection_template.is_file():
                raise ValueError(f"--injection-template {self.injection_template}: not a file")
            if not 2.0 <= self.lease_duration <= 3600.0:
                raise ValueError("--lease-duration must be between 2s and 1h")
        for d in self.config_dirs:
            if not d.is_dir():
                raise ValueError(f"--config-dir {d}: not a directory")
