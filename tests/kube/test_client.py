"""new_api_client: kubeconfig and in-cluster modes, and errors naming what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes_asyncio.client import CoreV1Api, VersionApi

from meshpilot.kube.backoff import Backoff
from meshpilot.kube.client import KubeClientError, new_api_client
from meshpilot.kube.names import object_name
from tests.kube.apiserver import ApiServer


async def test_kubeconfig_mode_reaches_the_cluster_with_the_chosen_context(
    apiserver: ApiServer, tmp_path: Path
) -> None:
    path = apiserver.write_kubeconfig(tmp_path / "kc", context="laptop")
    api = await new_api_client(path, "laptop", False)
    try:
        names = [n.metadata.name for n in (await CoreV1Api(api).list_namespace()).items]
        assert "istio-system" in names
    finally:
        await api.close()


async def test_kubeconfig_errors_name_the_file_and_the_context(
    apiserver: ApiServer, tmp_path: Path
) -> None:
    path = apiserver.write_kubeconfig(tmp_path / "kc", context="laptop")
    with pytest.raises(KubeClientError, match=r"kc: context 'prod' not found; contexts: 'laptop'"):
        await new_api_client(path, "prod", False)
    with pytest.raises(KubeClientError, match=r"missing: cannot read kubeconfig"):
        await new_api_client(tmp_path / "missing", None, False)
    (tmp_path / "bad").write_text("- just\n- a list\n")
    with pytest.raises(KubeClientError, match=r"bad: not a kubeconfig"):
        await new_api_client(tmp_path / "bad", None, False)
    (tmp_path / "big").write_bytes(b"#" * (1024 * 1024 + 1))
    with pytest.raises(KubeClientError, match=r"big: kubeconfig larger than"):
        await new_api_client(tmp_path / "big", None, False)
    with pytest.raises(KubeClientError, match="either a kubeconfig file or in-cluster"):
        await new_api_client(path, None, True)


async def test_in_cluster_mode_uses_the_mounted_token_and_ca(
    apiserver: ApiServer, tmp_path: Path
) -> None:
    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text(apiserver.token)
    ca.write_bytes(apiserver.cert.ca_pem)
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(apiserver.port)}
    api = await new_api_client(None, None, True, environ=env, token_file=token, ca_file=ca)
    try:
        version = await VersionApi(api).get_code()
        assert version.major
    finally:
        await api.close()
    with pytest.raises(KubeClientError, match="KUBERNETES_SERVICE_HOST is not set"):
        await new_api_client(None, None, True, environ={}, token_file=token, ca_file=ca)
    with pytest.raises(KubeClientError, match=r"ServiceAccount token file .*nope"):
        await new_api_client(
            None, None, True, environ=env, token_file=tmp_path / "nope", ca_file=ca
        )


def test_backoff_doubles_with_jitter_up_to_30s_and_resets() -> None:
    b = Backoff()
    delays = [b.next() for _ in range(8)]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0
    assert all(15.0 <= d <= 30.0 for d in delays[5:])
    b.reset()
    assert b.next() <= 1.0


def test_object_names_carry_kind_namespace_and_cluster() -> None:
    assert object_name("Secret", "istio-system", "cacerts") == "Secret istio-system/cacerts"
    assert object_name("Namespace", None, "foo", "c1") == "Namespace foo (c1)"
