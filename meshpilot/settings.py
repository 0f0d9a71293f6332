"""Every tunable of `meshpilot serve` in one place: defaults, flags and MESHPILOT_* env."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from meshpilot.addresses import split_address


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
        for d in self.config_dirs:
            if not d.is_dir():
                raise ValueError(f"--config-dir {d}: not a directory")
