"""The one place an API client is made: from a kubeconfig (a laptop) or in-cluster.

istiod builds its client from `--kubeconfig` (and the kubeconfig's current context or
`--context`) when given one, else from the pod's mounted ServiceAccount (token and
cluster CA under /var/run/secrets/kubernetes.io/serviceaccount, host and port from
KUBERNETES_SERVICE_HOST/PORT). meshpilot does the same with `kubernetes_asyncio`, and
checks the inputs first so that a mistake is reported naming the file or context
rather than as the client library's own error from deep inside.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.config import ConfigException
from kubernetes_asyncio.config.incluster_config import (
    SERVICE_CERT_FILENAME,
    SERVICE_TOKEN_FILENAME,
    InClusterConfigLoader,
)
from kubernetes_asyncio.config.kube_config import load_kube_config

# A kubeconfig is a few KiB; refuse to parse something that is clearly not one.
MAX_KUBECONFIG_BYTES = 1024 * 1024


class KubeClientError(ValueError):
    """The client cannot be configured; the message names the file, context or variable."""


async def new_api_client(
    kubeconfig: Path | None,
    context: str | None,
    in_cluster: bool,
    *,
    environ: Mapping[str, str] | None = None,
    token_file: Path = Path(SERVICE_TOKEN_FILENAME),
    ca_file: Path = Path(SERVICE_CERT_FILENAME),
) -> ApiClient:
    """An ApiClient for `kubeconfig` (with `context`, else its current one) or in-cluster.

    Exactly one of `kubeconfig` and `in_cluster` must be given. `environ`, `token_file`
    and `ca_file` exist for tests of the in-cluster mode.
    """
    if (kubeconfig is None) == (not in_cluster):
        raise KubeClientError("give either a kubeconfig file or in-cluster mode, not both")
    configuration = Configuration()
    if kubeconfig is not None:
        await _from_kubeconfig(kubeconfig, context, configuration)
    else:
        if context is not None:
            raise KubeClientError("--context applies to a kubeconfig, not to in-cluster mode")
        _in_cluster(
            dict(os.environ if environ is None else environ), token_file, ca_file, configuration
        )
    return ApiClient(configuration=configuration)


async def _from_kubeconfig(path: Path, context: str | None, configuration: Configuration) -> None:
    doc = _read_kubeconfig(path)
    contexts = [c.get("name") for c in doc.get("contexts") or [] if isinstance(c, dict)]
    chosen = context or doc.get("current-context")
    if not chosen:
        raise KubeClientError(
            f"{path}: no current-context is set; pass a context (one of {_names(contexts)})"
        )
    if chosen not in contexts:
        raise KubeClientError(f"{path}: context {chosen!r} not found; contexts: {_names(contexts)}")
    try:
        # persist_config=False: the file is only read (a token refresh must not rewrite it).
        await load_kube_config(
            config_file=str(path),
            context=chosen,
            client_configuration=configuration,
            persist_config=False,
        )
    except (ConfigException, KeyError, ValueError, OSError) as e:
        raise KubeClientError(f"{path}: context {chosen!r}: {e}") from e


def _read_kubeconfig(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KUBECONFIG_BYTES + 1)
    except OSError as e:
        raise KubeClientError(f"{path}: cannot read kubeconfig: {e.strerror or e}") from e
    if len(data) > MAX_KUBECONFIG_BYTES:
        raise KubeClientError(f"{path}: kubeconfig larger than {MAX_KUBECONFIG_BYTES} bytes")
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise KubeClientError(f"{path}: not YAML: {e}") from e
    if not isinstance(doc, dict) or doc.get("kind", "Config") != "Config":
        raise KubeClientError(f"{path}: not a kubeconfig (expected a mapping of kind Config)")
    return doc


def _names(names: list[Any]) -> str:
    return ", ".join(repr(n) for n in names) or "none"


def _in_cluster(
    environ: dict[str, str], token_file: Path, ca_file: Path, configuration: Configuration
) -> None:
    for var in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        if not environ.get(var):
            raise KubeClientError(f"in-cluster mode: {var} is not set (not running in a pod?)")
    for what, path in (("ServiceAccount token", token_file), ("cluster CA", ca_file)):
        try:
            if not path.read_bytes().strip():
                raise KubeClientError(f"in-cluster mode: {what} file {path} is empty")
        except OSError as e:
            raise KubeClientError(
                f"in-cluster mode: cannot read {what} file {path}: {e.strerror or e}"
            ) from e
    try:
        # The loader re-reads the token file every minute: projected tokens rotate.
        InClusterConfigLoader(str(token_file), str(ca_file), environ=environ).load_and_set(
            configuration
        )
    except ConfigException as e:
        raise KubeClientError(f"in-cluster mode: {e}") from e
