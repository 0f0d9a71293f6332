"""The injected istio-proxy container's command line is one `meshpilot agent` accepts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from meshpilot import cli
from meshpilot.agent.command import config_from_args
from meshpilot.inject.patch import ProxySettings, injection_patch
from meshpilot.inject.template import Template

from ._helpers import apply, deployment_pod

# What the kubelet puts in the container's environment from the downward API.
DOWNWARD = {
    "metadata.name": "reviews-v1-7c9f8d6b5-x2x9q",
    "metadata.namespace": "bookinfo",
    "status.podIP": "10.244.1.7",
    "spec.serviceAccountName": "bookinfo-reviews",
}


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: DOWNWARD[e["valueFrom"]["fieldRef"]["fieldPath"]] for e in container["env"]}


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion of command and args ($$ is a literal $)."""

    def one(m: re.Match[str]) -> str:
        if m[0] == "$$":
            return "$"
        return env.get(m[1], m[0])

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, arg)


def test_sidecar_command_line_parses_into_the_agents_config() -> None:
    pod = deployment_pod()
    proxy = ProxySettings(trust_domain="mesh.example")
    out = apply(pod, injection_patch(pod, "bookinfo", Template.load(), proxy))
    container = next(c for c in out["spec"]["containers"] if c["name"] == "istio-proxy")
    env = container_env(container)
    argv = [expand(a, env) for a in container["command"][1:] + container["args"]]

    _, args = cli.parse(argv)
    assert args.command == "agent"
    config = config_from_args(args)
    assert config.name == "reviews-v1-7c9f8d6b5-x2x9q"
    assert config.namespace == "bookinfo"
    assert config.service_account == "bookinfo-reviews"
    assert config.ip == "10.244.1.7"
    assert config.identity == "spiffe://mesh.example/ns/bookinfo/sa/bookinfo-reviews"
    assert config.ca_address == "istiod.istio-system.svc:15012"
    assert config.xds_address == "istiod.istio-system.svc:15012"
    assert config.xds_tls is True
    assert config.labels == {"app": "reviews", "version": "v1", "pod-template-hash": "7c9f8d6b5"}

    # The files the agent reads are where the pod mounts them.
    mounts = {m["name"]: Path(m["mountPath"]) for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    token = volumes["istio-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert config.token_file == mounts["istio-token"] / token["path"]
    assert config.root_cert == mounts["istiod-ca-cert"] / "root-cert.pem"
    assert config.workdir == mounts["istio-envoy"]
